#!/usr/bin/env bash
# Prepares bitsandbytes 0.50.2 for the GPU machine (no network there, no bitsandbytes installed):
# the wheel's Python files and its CUDA 13.0 library only (~5 MB), unpacked into .bnb/site (ignored
# by git), which scripts/gpu_check.sh puts on PYTHONPATH. Carry `.bnb` with the device call.
# The wheel is cached like build_cuda_prebuilt.sh's (LORA_OPS_WHEEL_CACHE).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${LORA_OPS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora_ops/wheels}
mkdir -p "$cache"
whl=$(find "$cache" -maxdepth 1 -name 'bitsandbytes-0.50.2-*.whl' | head -n 1)
if [ -z "$whl" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d "$cache" bitsandbytes==0.50.2
  whl=$(find "$cache" -maxdepth 1 -name 'bitsandbytes-0.50.2-*.whl' | head -n 1)
fi
rm -rf "$root/.bnb" && mkdir -p "$root/.bnb/site"
# Python sources + metadata, and the one native library torch 2.11.0+cu130 loads (libbitsandbytes_cuda130).
(cd "$root/.bnb/site" && unzip -q "$whl" -x 'bitsandbytes/libbitsandbytes_*' &&
  unzip -q "$whl" 'bitsandbytes/libbitsandbytes_cuda130.so')
du -sh "$root/.bnb"
