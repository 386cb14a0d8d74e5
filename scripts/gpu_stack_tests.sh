#!/usr/bin/env bash
# The suite under the GPU machine's software, on this CPU machine: Python 3.12 + torch 2.11.0+cu130
# (scripts/gpu_stack_venv.sh, cached) with the prebuilt CUDA module, the very file the GPU check carries,
# in a staged copy of the tree (this tree's own module is not touched). Without a GPU the CUDA tests
# skip; the rest prove that module loads, registers every op and computes right on the CPU under that torch.
#   scripts/gpu_stack_tests.sh [PREBUILT_DIR] [pytest args...]     (default build/cuda-prebuilt/out)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
prebuilt=${1:-$root/build/cuda-prebuilt/out}
[ $# -gt 0 ] && shift
so=$(ls "$prebuilt"/_C*.so 2>/dev/null | head -n 1 || true)
[ -n "$so" ] || { echo "gpu_stack_tests: no prebuilt module in $prebuilt (scripts/build_cuda_prebuilt.sh)" >&2; exit 1; }
py=$(bash "$root/scripts/gpu_stack_venv.sh" | tail -n 1)
tree=${LORA_OPS_GPU_STACK_TREE:-$root/build/gpu-stack/tree}
bash "$root/scripts/stage_tree.sh" "$tree"
cp "$so" "$tree/lora_ops/"
cd "$tree"
"$py" - <<'PY'
import torch, lora_ops, lora_ops._C as C
print(f"gpu_stack_tests: torch {torch.__version__}, module {C.__file__}, WITH_CUDA {lora_ops.WITH_CUDA}")
assert lora_ops.WITH_CUDA, "the prebuilt module has no CUDA kernels"
PY
PYTHONPATH="$tree" "$py" -m pytest -q -p no:cacheprovider "$@"
