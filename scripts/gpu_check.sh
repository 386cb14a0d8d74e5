#!/usr/bin/env bash
# The GPU check: ONE command for the lent GPU machine (H200/H100, torch 2.11.0+cu130, Python 3.12,
# nvcc 13.0, compute-sanitizer, no network), about 7 minutes, well inside one 8-minute call.
#   bash scripts/gpu_check.sh [PREBUILT_DIR]     (default build/cuda-prebuilt/out; see scripts/README.md)
# Every step runs under its own `timeout` and appends to $OUT as it goes, so a run killed at its limit
# still returns what it did. $OUT (set by the device tool; default ./gpu_check_out) gets at most the
# 8 files the tool brings back:
#   gpu_check.log   everything, step by step          summary.json   one row per step, rewritten after each
#   smoke.json      scripts/gpu_smoke.py results        sanitizer.log  the four compute-sanitizer runs
#   junit.tar       one JUnit XML per test file         microbench.json scripts/gpu_microbench.py
# Steps (seconds are the timeouts):
#   env 20 | load 60 (+ build 300 only when the carried module does not load) | smoke 120 |
#   memcheck, racecheck, synccheck, initcheck 60 each | tests 150 | bench 100
# bitsandbytes, when carried as .bnb/site (scripts/README.md), joins the benchmark.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
prebuilt=${1:-build/cuda-prebuilt/out}
out=${OUT:-$root/gpu_check_out}
mkdir -p "$out"
log=$out/gpu_check.log
py=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d "$root/.bnb/site" ] && export PYTHONPATH="$PYTHONPATH:$root/.bnb/site"
declare -a names=() statuses=() seconds=()
t_all=$SECONDS

summary() {  # rewrites summary.json from the steps so far
  "$py" - "$out/summary.json" "${names[*]:-}" "${statuses[*]:-}" "${seconds[*]:-}" <<'EOF'
import json, sys
path, names, statuses, secs = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
rows = [{"step": n, "exit": int(s), "ok": s == "0", "timed_out": s in ("124", "137"), "seconds": int(t)}
        for n, s, t in zip(names, statuses, secs)]
json.dump({"steps": rows, "all_ok": all(r["ok"] for r in rows)}, open(path, "w"), indent=1)
EOF
}

step() {  # step NAME TIMEOUT_S COMMAND...: runs it under timeout, appends to the log, records status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a process
    timeout -k 5 "$limit" bash -c '"$@"' step "$@" >>"$log" 2>&1
  else
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
  fi
  rc=$?
  names+=("$name"); statuses+=("$rc"); seconds+=($((SECONDS - t0)))
  echo "== $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (TIMED OUT)')" | tee -a "$log"
  summary
  return $rc
}

env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability(), 'SMs', torch.cuda.get_device_properties(0).multi_processor_count)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2
  ldd --version | head -n 1
  git rev-parse HEAD 2>/dev/null || true
  cat "$prebuilt/manifest.json" 2>/dev/null | head -n 20 || echo "no prebuilt manifest at $prebuilt"
}

import_smoke() {
  "$py" - <<'EOF'
import torch, lora_ops
import lora_ops._C as C
print("module", C.__file__, "WITH_CUDA", lora_ops.WITH_CUDA)
assert lora_ops.WITH_CUDA, "lora_ops was built without CUDA"
w = lora_ops.quantize_nf4(torch.randn(64, 128, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
print("nf4_quantize on", w.packed.device, "ok")
EOF
}

load() {  # the carried module into the package (a freshly built in-tree one would take precedence)
  rm -f lora_ops/_C*.so
  cp "$prebuilt"/_C*.so lora_ops/ && import_smoke
}

build_here() {  # only when the carried module does not load: sm_90a only, all cores
  rm -f lora_ops/_C*.so
  command -v nvcc >/dev/null || { [ -x /usr/local/cuda/bin/nvcc ] && export PATH=/usr/local/cuda/bin:$PATH; }
  TORCH_CUDA_ARCH_LIST=9.0a LORA_OPS_WITH_CUDA=ON JOBS=16 scripts/dev_build.sh "$root/build/gpu-check" && import_smoke
}

sanitize() {  # sanitize TOOL: the tiny smoke (one call per kernel) under compute-sanitizer, our kernels only
  local tool=$1
  echo "---- $tool" >>"$out/sanitizer.log"
  # kns=lora_ops: only kernels whose (mangled) name holds lora_ops are checked, not torch's own.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 --kernel-name kns=lora_ops \
    "$py" scripts/gpu_smoke.py --tiny >>"$out/sanitizer.log" 2>&1
  local rc=$?
  tail -n 3 "$out/sanitizer.log"
  return $rc
}

cuda_tests() {  # -x, one JUnit file per test file (added to junit.tar as each finishes); emulation tests are CPU-only
  local rc=0 f base t0=$SECONDS
  mkdir -p "$out/.junit"
  for f in tests/test_*.py; do
    case $f in *emulated*) continue ;; esac
    base=$(basename "$f" .py)
    # -k cuda: the "cuda" device parameter, and every test of a file whose name says cuda.
    "$py" -m pytest -x -q -rs -p no:cacheprovider -k cuda --junitxml="$out/.junit/$base.xml" "$f"
    case $? in 0 | 5) ;; *) rc=1; echo "FAILED: $f" ;; esac  # 5: nothing selected in that file
    [ -f "$out/.junit/$base.xml" ] && tar -C "$out/.junit" -rf "$out/junit.tar" "$base.xml"
    [ $rc = 0 ] || break
    echo "-- $f done at $((SECONDS - t0)) s"
  done
  return $rc
}

# The step functions run in child shells (under timeout): they and what they read are exported.
export -f env_info import_smoke load build_here sanitize cuda_tests
export root prebuilt out log py
: >"$log"
rm -f "$out/junit.tar" "$out/sanitizer.log"
step env 20 env_info
if ! step load 60 load; then
  step build 300 build_here
fi
CUDA_LAUNCH_BLOCKING=1 step smoke 120 "$py" scripts/gpu_smoke.py --json "$out/smoke.json"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck initcheck; do step "$tool" 60 sanitize "$tool"; done
else
  echo "compute-sanitizer not found: sanitizer steps skipped" | tee -a "$log"
fi
step tests 150 cuda_tests
step bench 100 "$py" scripts/gpu_microbench.py --out "$out" --budget 80
rm -rf "$out/.junit"

echo "== gpu_check: $((SECONDS - t_all)) s" | tee -a "$log"
for i in "${!names[@]}"; do printf '%-10s exit %-4s %4s s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}"; done
grep -E "^(FAIL|gpu_smoke:|gpu_microbench:)|ERROR SUMMARY|passed|failed" "$log" | tail -n 20
# A load that failed but was repaired by the build is not a failure of the check.
failed=0
for i in "${!names[@]}"; do
  [ "${statuses[$i]}" = 0 ] && continue
  [ "${names[$i]}" = load ] && [ "${names[$((i + 1))]:-}" = build ] && [ "${statuses[$((i + 1))]}" = 0 ] && continue
  failed=1
done
exit $failed
