#!/usr/bin/env bash
# The GPU check: ONE command for the lent GPU machine (H200/H100, torch 2.11.0+cu130, Python 3.12,
# nvcc 13.0, compute-sanitizer, no network), inside one device call (default budget 470 s).
#   LORA_OPS_COMMIT=<sha> bash scripts/gpu_check.sh [--dry-run] [--budget S] [PREBUILT_DIR]
# PREBUILT_DIR: the carried module (default build/cuda-prebuilt/out; scripts/README.md). LORA_OPS_COMMIT:
# the commit the caller means to test (the device copy has no .git); compared with the module's manifest
# and written into every JSON.
#
# A deadline holds the whole run to the budget: each step runs under `timeout`, capped at the time left
# (a step that no longer fits is recorded as skipped). Everything goes to $OUT as it happens (the device
# tool's folder; default ./gpu_check_out), at most these 6 files at any moment, so a run killed at the
# call's limit still returns what it did:
#   gpu_check.log    every step's output, tests one line each   summary.json   steps so far, env, commits
#   smoke.json       scripts/gpu_smoke.py, rewritten per check   sanitizer.log  the compute-sanitizer runs
#   junit.xml        the tests step (written when pytest ends)   microbench.json rewritten per row
# Steps (their own limits in seconds): env 60 | load 60 (+ build 300 only when the carried module itself
# does not load) | smoke 120 | memcheck, racecheck, synccheck 60 each, initcheck 60 (fails only on reports
# naming a lora_ops kernel) | tests 150 (one pytest run, CUDA tests, most important files first, 60 s per
# test) | bench 100. bitsandbytes, when carried as .bnb/site, joins the benchmark.
#
# --dry-run (a CPU machine, e.g. CI with PYTHON = the GPU stack's venv, scripts/gpu_stack_venv.sh): runs in
# a staged copy of the tree, and every step up to its first CUDA call: the environment report, the carried
# module's load (import, op registration incl. CUDA kernels), smoke and benchmark on the CPU, the test
# selection collected, the compute-sanitizer command lines assembled and printed.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
dry=0 budget=470 prebuilt=
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --budget) budget=$2; shift ;;
    -h | --help) sed -n 2,26p "$0"; exit 0 ;;
    *) prebuilt=$1 ;;
  esac
  shift
done
prebuilt=${prebuilt:-build/cuda-prebuilt/out}
case $prebuilt in /*) ;; *) prebuilt=$root/$prebuilt ;; esac
out=${OUT:-$root/gpu_check_out}
mkdir -p "$out" && out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
deadline=$((SECONDS + budget))
reserve=8  # seconds kept for the closing summary

if [ $dry = 1 ]; then  # never load a foreign module into this tree: a staged copy takes it
  stage=$(mktemp -d)/tree
  bash "$root/scripts/stage_tree.sh" "$stage" || exit 1
  cd "$stage"
else
  cd "$root"
fi
tree=$(pwd)
# compute-sanitizer and nvcc live in the toolkit's bin, which need not be on PATH
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LORA_OPS_COMMIT=${LORA_OPS_COMMIT:-}
[ -d "$root/.bnb/site" ] && export PYTHONPATH="$PYTHONPATH:$root/.bnb/site"
log=$out/gpu_check.log
rm -f "$out/junit.xml" "$out/sanitizer.log" "$out/smoke.json" "$out/microbench.json" "$out/summary.json"
: >"$log"
declare -a names=() statuses=() seconds=()

summary() {  # rewrites summary.json (atomically) from the steps so far; $1: "running" or "done"
  "$py" - "$out/summary.json" "$1" "${names[*]:-}" "${statuses[*]:-}" "${seconds[*]:-}" "$prebuilt/manifest.json" \
    "$dry" "$budget" <<'EOF'
import json, os, sys
path, state, names, statuses, secs, manifest, dry, budget = sys.argv[1:9]
rows = [{"step": n, "exit": None if s == "skip" else int(s), "ok": s == "0", "skipped": s == "skip",
         "timed_out": s in ("124", "137"), "seconds": int(t)}
        for n, s, t in zip(names.split(), statuses.split(), secs.split())]
try:
    built = json.load(open(manifest)).get("commit")
except (OSError, ValueError):
    built = None
asked = os.environ.get("LORA_OPS_COMMIT") or None
data = {"state": state, "dry_run": dry == "1", "budget_s": int(budget), "commit": asked,
        "module_commit": built, "commit_matches_module": None if not (asked and built) else asked == built,
        "steps": rows, "all_ok": bool(rows) and all(r["ok"] for r in rows)}
with open(path + ".tmp", "w") as f:
    json.dump(data, f, indent=1)
os.replace(path + ".tmp", path)
EOF
}

record() {  # record NAME STATUS SECONDS
  names+=("$1"); statuses+=("$2"); seconds+=("$3")
  summary running
}

step() {  # step NAME LIMIT COMMAND...: under timeout, capped by the deadline; appends to the log
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS - reserve)) t0=$SECONDS rc
  if [ $left -lt 10 ]; then
    echo "== $name: SKIPPED, ${left}s left before the deadline" | tee -a "$log"
    record "$name" skip 0
    return 1
  fi
  [ $left -lt "$limit" ] && limit=$left
  echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a process
    timeout -k 5 "$limit" bash -c '"$@"' step "$@" >>"$log" 2>&1
  else
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
  fi
  rc=$?
  record "$name" "$rc" $((SECONDS - t0))
  echo "== $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (TIMED OUT)')" | tee -a "$log"
  return $rc
}

env_info() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$py" - <<'EOF'
import sys, torch
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(), "cc", (p.major, p.minor), "SMs", p.multi_processor_count,
          "L2", getattr(p, "L2_cache_size", "?"), "memory", p.total_memory)
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
  ldd --version | head -n 1
  echo "commit asked: ${LORA_OPS_COMMIT:-<not given>}"
  cat "$prebuilt/manifest.json" 2>/dev/null | head -n 20 || echo "no prebuilt manifest at $prebuilt"
}

# Exit 3: the module itself did not load (a rebuild here may help); other failures are not the module's.
import_check() {
  "$py" - "$dry" <<'EOF'
import sys
dry = sys.argv[1] == "1"
import torch
try:
    import lora_ops
    import lora_ops._C as C
except Exception as e:  # noqa: BLE001
    print(f"module load failed: {type(e).__name__}: {e}")
    sys.exit(3)
print("module", C.__file__, "WITH_CUDA", lora_ops.WITH_CUDA)
assert lora_ops.WITH_CUDA, "lora_ops was built without CUDA"
for op in ("nf4_quantize", "nf4_dequantize", "qlora_matmul", "lora_down", "lora_outer", "adamw_step_"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ops::{op}", "CUDA"), f"{op}: no CUDA kernel"
if dry:
    print("dry run: ops registered with CUDA kernels; no CUDA call made")
    sys.exit(0)
w = lora_ops.quantize_nf4(torch.randn(64, 128, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
print("nf4_quantize on", w.packed.device, "ok")
EOF
}

load() {  # the carried module into the package (a freshly built in-tree one would take precedence)
  ls "$prebuilt"/_C*.so >/dev/null 2>&1 || { echo "no module in $prebuilt"; return 3; }
  rm -f lora_ops/_C*.so
  cp "$prebuilt"/_C*.so lora_ops/ && import_check
}

build_here() {  # only when the carried module does not load: sm_90a only, all cores
  rm -f lora_ops/_C*.so
  TORCH_CUDA_ARCH_LIST=9.0a LORA_OPS_WITH_CUDA=ON JOBS=16 scripts/dev_build.sh "$tree/build/gpu-check" && import_check
}

# compute-sanitizer on the tiny smoke (one call per kernel). API errors are torch's business (it probes
# the driver), launches may take long under the tool, and 100 reports are plenty.
sanitizer_cmd() {  # sanitizer_cmd TOOL: prints the command, one word per line
  local tool=$1
  printf '%s\n' compute-sanitizer --tool "$tool" --report-api-errors no --launch-timeout 0 --print-limit 100
  # initcheck must see torch's writes too (an unchecked kernel's writes look uninitialized): no filter,
  # no error exit; sanitize() fails it only on reports naming a lora_ops kernel.
  [ "$tool" != initcheck ] && printf '%s\n' --error-exitcode 9 --kernel-name kns=lora_ops
  printf '%s\n' "$py" scripts/gpu_smoke.py --tiny
}

sanitize() {
  local tool=$1 cmd rc
  mapfile -t cmd < <(sanitizer_cmd "$tool")
  echo "---- $tool: ${cmd[*]}" >>"$out/sanitizer.log"
  if [ "$dry" = 1 ]; then
    echo "dry run: ${cmd[*]}"
    return 0
  fi
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 127; }
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${cmd[@]}" >>"$out/sanitizer.log" 2>&1
  rc=$?
  tail -n 3 "$out/sanitizer.log"
  if [ "$tool" = initcheck ]; then  # this run's reports that name one of our kernels
    awk '/^---- initcheck/{on=1} on' "$out/sanitizer.log" | grep -A3 '^========= .*[Uu]ninitialized' |
      grep -q 'lora_ops' && return 9
    return 0
  fi
  return $rc
}

# The test files that hold CUDA tests, most important first; then every other file (-k cuda selects the
# CUDA cases; emulation tests run on the CPU in CI and are left out).
PRIORITY="tests/test_qlora_cuda_paths.py tests/test_qlora_ops.py tests/test_qlora_module.py tests/test_nf4_ops.py
tests/test_nf4_cuda_large.py tests/test_optim_kernel.py tests/test_optim_paged_adamw.py tests/test_bad_inputs.py"
test_files() {
  local f
  for f in $PRIORITY; do [ -f "$f" ] && echo "$f"; done
  for f in tests/test_*.py; do
    case " $(echo $PRIORITY) " in *" $f "*) continue ;; esac
    case $f in *emulated*) continue ;; esac
    echo "$f"
  done
}

cuda_tests() {  # one pytest run: no -x, collection errors of one file do not stop the others
  local files rc
  mapfile -t files < <(test_files)
  if [ "$dry" = 1 ]; then
    "$py" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -k cuda --collect-only "${files[@]}" \
      >"$tree/.collect.txt" 2>&1
    rc=$?
    grep -v "^$" "$tree/.collect.txt" | tail -n 3
    local n
    n=$(grep -c "\\[cuda" "$tree/.collect.txt")
    rm -f "$tree/.collect.txt"
    echo "dry run: $n CUDA test cases selected in ${#files[@]} files (first: ${files[0]})"
    [ "$rc" = 0 ] && [ "$n" -gt 0 ]
    return
  fi
  LORA_OPS_TEST_TIMEOUT=60 "$py" -m pytest -v -rfEs -p no:cacheprovider --continue-on-collection-errors -k cuda \
    --junitxml="$out/junit.xml" "${files[@]}"
  rc=$?
  [ $rc = 5 ] && rc=0  # nothing selected is not a failure of this step
  return $rc
}

# The step functions run in child shells (under timeout): they and what they read are exported.
export -f env_info import_check load build_here sanitizer_cmd sanitize test_files cuda_tests
export root tree prebuilt out log py dry PRIORITY
summary running
step env 60 env_info
step load 60 load
load_rc=$?
module_ok=0
if [ $load_rc = 0 ]; then
  module_ok=1
elif [ $load_rc = 3 ] && [ $dry = 0 ]; then  # the module itself failed: build one here
  step build 300 build_here && module_ok=1
fi
if [ $module_ok = 1 ]; then
  if [ $dry = 1 ]; then
    step smoke 120 "$py" scripts/gpu_smoke.py --device cpu --tiny --json "$out/smoke.json"
  else
    CUDA_LAUNCH_BLOCKING=1 step smoke 120 "$py" scripts/gpu_smoke.py --json "$out/smoke.json"
  fi
  for tool in memcheck racecheck synccheck initcheck; do step "$tool" 60 sanitize "$tool"; done
  step tests 150 cuda_tests
  if [ $dry = 1 ]; then
    step bench 100 "$py" scripts/gpu_microbench.py --device cpu --quick --out "$out"
  else
    left=$((deadline - SECONDS - reserve - 15))
    step bench 100 "$py" scripts/gpu_microbench.py --out "$out" --budget $((left < 80 ? left : 80))
  fi
else
  echo "no loadable module: the CUDA steps are not run" | tee -a "$log"
fi
summary done

echo "== gpu_check: $((SECONDS - deadline + budget)) s of a ${budget} s budget$([ $dry = 1 ] && echo ' (dry run)')" |
  tee -a "$log"
for i in "${!names[@]}"; do printf '%-10s exit %-4s %4s s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}"; done
grep -E "^(FAIL|gpu_smoke:|gpu_microbench:|dry run:)|ERROR SUMMARY|passed|failed" "$log" | tail -n 20
# A load that failed but was repaired by the build is not a failure of the check.
failed=0
for i in "${!names[@]}"; do
  [ "${statuses[$i]}" = 0 ] && continue
  [ "${names[$i]}" = load ] && [ "${names[$((i + 1))]:-}" = build ] && [ "${statuses[$((i + 1))]}" = 0 ] && continue
  failed=1
done
[ $module_ok = 1 ] || failed=1
[ $dry = 1 ] && rm -rf "$(dirname "$tree")"
exit $failed
