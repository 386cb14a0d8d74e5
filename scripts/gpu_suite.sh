#!/usr/bin/env bash
# The GPU suite: ONE command for a machine with an NVIDIA GPU, a CUDA torch and no network.
#   scripts/gpu_suite.sh [OUT_DIR]        (default: bench/results/<device-name>)
# Steps (each runs even if an earlier one failed; every step's status is reported at the end):
#   env       device, driver, torch, CUDA, nvcc, git commit          -> OUT/env.json (+ header of summary.md)
#   build     in-place CUDA build (scripts/dev_build.sh, LORA_OPS_WITH_CUDA=ON, archs of this GPU)
#   nvcc      scripts/nvcc_check.py (torch-free compile + ptxas report) -> OUT/nvcc_check.json
#   tests     the full pytest suite, CUDA tests included (slow ones too) -> OUT/pytest.log, OUT/pytest.xml
#   bench     every bench/bench_*.py --out OUT                         -> OUT/bench_*.json / .md
# Logs: OUT/<step>.log. Summary: OUT/summary.json and OUT/summary.md.
# bitsandbytes may come from a carried folder: PYTHONPATH=/path/to/site python ... is kept as is.
# Knobs: LORA_OPS_CUDA_ARCHS (default: this GPU's arch, e.g. 90a on H100), JOBS (build jobs),
#        BENCH_ARGS (extra benchmark arguments, e.g. "--quick" for a dry run without a GPU).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# CMake's CUDA detection needs nvcc: GPU images often have the toolkit without it on PATH.
if ! command -v nvcc >/dev/null; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then export PATH="$d/bin:$PATH"; break; fi
  done
fi

device_name=$("$py" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown)
slug=$(echo "$device_name" | tr '[:upper:]' '[:lower:]' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
out=${1:-$root/bench/results/${slug:-unknown}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
declare -a names=() statuses=() seconds=()

step() {  # step NAME COMMAND...: runs it, logs to OUT/NAME.log, records status; never exits the suite
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*" | tee "$out/$name.log"
  "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  names+=("$name"); statuses+=("$rc"); seconds+=($((SECONDS - t0)))
  echo "== $name: exit $rc after $((SECONDS - t0)) s (log: $out/$name.log)"
  tail -n 5 "$out/$name.log" | sed 's/^/   /'
}

write_env() {
  "$py" - "$out/env.json" <<'EOF'
import json, platform, subprocess, sys
import torch

def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__})"

env = {
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None,
    "driver": sh("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines()[:1],
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "nvcc": sh("nvcc", "--version").splitlines()[-1:],
    "python": platform.python_version(),
    "git_commit": sh("git", "rev-parse", "HEAD"),
    "git_dirty": bool(sh("git", "status", "--porcelain", "--untracked-files=no")),
    "bitsandbytes": None,
}
try:
    import bitsandbytes
    env["bitsandbytes"] = bitsandbytes.__version__
except Exception as e:  # noqa: BLE001
    env["bitsandbytes"] = f"not importable ({type(e).__name__})"
env = {k: (v[0] if isinstance(v, list) and v else v) for k, v in env.items()}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
EOF
}

build() {
  local archs=${LORA_OPS_CUDA_ARCHS:-$("$py" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}' + ('a' if c[0] == 9 else ''))")}
  echo "archs: $archs"
  LORA_OPS_WITH_CUDA=ON LORA_OPS_CUDA_ARCHS="$archs" JOBS=${JOBS:-$(nproc)} scripts/dev_build.sh "$root/build/gpu-suite" &&
    "$py" -c "import lora_ops; assert lora_ops.WITH_CUDA, 'built without CUDA'; print('lora_ops WITH_CUDA =', lora_ops.WITH_CUDA)"
}

run_tests() {  # LORA_OPS_LARGE_TESTS=1: also the > 2^31-element cases (tests/test_nf4_cuda_large.py)
  LORA_OPS_LARGE_TESTS=1 "$py" -m pytest -q -rs -p no:cacheprovider --junitxml="$out/pytest.xml" tests
}

run_benches() {
  local rc=0
  for b in bench/bench_*.py; do
    echo "-- $b"
    # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose (e.g. "--quick")
    "$py" "$b" --out "$out" ${BENCH_ARGS:-} || rc=1
  done
  return $rc
}

step env write_env
step build build
step nvcc "$py" scripts/nvcc_check.py --out "$out/nvcc_check.json"
step tests run_tests
step bench run_benches

# ---- summary ----------------------------------------------------------------------------------
"$py" - "$out" "${names[*]}" "${statuses[*]}" "${seconds[*]}" <<'EOF'
import json, re, sys
from pathlib import Path
out, names, statuses, secs = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), sys.argv[4].split()
env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
steps = [{"step": n, "exit": int(s), "ok": s == "0", "seconds": int(t)} for n, s, t in zip(names, statuses, secs)]
log = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
tests = (re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped).*?) in [\d.]+s", log, re.M) or [""])[-1]
(out / "summary.json").write_text(json.dumps({"env": env, "steps": steps, "pytest": tests}, indent=1))
md = ["# lora_ops GPU suite", "", "| key | value |", "|---|---|"]
md += [f"| {k} | {v} |" for k, v in env.items()]
md += ["", "| step | status | seconds | log |", "|---|---|---|---|"]
md += [f"| {s['step']} | {'ok' if s['ok'] else 'FAILED (exit %d)' % s['exit']} | {s['seconds']} | {s['step']}.log |" for s in steps]
md += ["", f"pytest: {tests or 'no summary line (see tests.log)'}", ""]
for b in sorted(out.glob("bench_*.md")):
    md += [f"## {b.stem}", "", b.read_text()]
(out / "summary.md").write_text("\n".join(md))
print("\n".join(md[: 8 + len(env) + len(steps)]))
EOF
failed=0
for s in "${statuses[@]}"; do [ "$s" = 0 ] || failed=1; done
echo "gpu_suite: results in $out ($([ $failed = 0 ] && echo 'all steps ok' || echo 'SOME STEPS FAILED'))"
exit $failed
