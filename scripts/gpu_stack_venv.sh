#!/usr/bin/env bash
# The GPU machine's Python stack on this CPU machine: a Python 3.12 venv with PyPI's torch==2.11.0
# (the CUDA 13.0 build the GPU machine runs; it imports without a GPU) and the test extra's packages.
#   scripts/gpu_stack_venv.sh          -> prints the venv's python path (last line of stdout)
# The venv is cached (LORA_OPS_GPU_STACK_VENV, default ~/.cache/lora_ops/venv-gpu-stack) and rebuilt only
# when its stamp (Python minor, torch pin, the test extra's requirements) changes. Cold: ~4.7 GB of
# downloads (torch + its nvidia-* packages); warm: nothing. Never used for the CPU build or the main venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
torch_pin=${LORA_OPS_GPU_STACK_TORCH:-2.11.0}
venv=${LORA_OPS_GPU_STACK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lora_ops/venv-gpu-stack}

# Python 3.12, as on the GPU machine: LORA_OPS_PYTHON312, pyenv's newest 3.12, or python3.12 on PATH (a pyenv
# shim on PATH may name a version that is not active, so each candidate must run).
py312=
for cand in ${LORA_OPS_PYTHON312:-} \
  $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r) \
  $(command -v python3.12 || true); do
  if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py312=$cand; break; fi
done
[ -n "$py312" ] || { echo "gpu_stack_venv: no Python 3.12 found (PATH or pyenv)" >&2; exit 1; }

# The test extra's requirements, read from pyproject.toml (the same pins CI's main venv installs).
reqs=$("$py312" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
extra = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["test"]
print("\n".join(sorted(extra)))
PY
)
stamp="python=$("$py312" -c 'import sys; print(sys.version_info[:2])') torch==$torch_pin
$reqs"
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "gpu_stack_venv: cached venv at $venv" >&2
else
  echo "gpu_stack_venv: creating $venv (torch==$torch_pin and the test extra; cold: ~4.7 GB download)" >&2
  rm -rf "$venv"
  "$py312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # torch first and alone, so that nothing below can pick another torch
  "$venv/bin/python" -m pip install -q "torch==$torch_pin" >&2
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q "torch==$torch_pin" $reqs >&2
  printf '%s' "$stamp" >"$venv/.stamp"
fi
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('$torch_pin'), torch.__version__" >&2
echo "$venv/bin/python"
