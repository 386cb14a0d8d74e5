#!/usr/bin/env bash
# Developer build without pip: compiles lora_ops/_C*.so into the source tree (incremental).
# Usage: scripts/dev_build.sh [build-dir]     then: python -m pytest
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build/dev}
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLORA_OPS_INPLACE=ON \
  -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$build" -j "${JOBS:-2}"
