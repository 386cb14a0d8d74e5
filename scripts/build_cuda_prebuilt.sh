#!/usr/bin/env bash
# Builds the WHOLE extension (every kernel and binding) against the GPU machine's torch on a machine
# with nvcc and no GPU, and checks the result without running it.
#   scripts/build_cuda_prebuilt.sh OUT_DIR      -> OUT_DIR/_C.abi3.so, OUT_DIR/manifest.json
#
# The GPU machine (see scripts/README.md) runs PyPI's torch==2.11.0 (+cu130, CUDA 13.0) on Python 3.12.
# That same wheel is downloaded here with `pip download --no-deps` (never installed, never imported:
# this machine's Python is another version, and no CUDA torch may enter an environment that runs
# tests); only its headers, libraries, CMake config and version.py are unpacked. CMake reads them
# through LORA_OPS_TORCH_DIR. The module is built against Python's stable ABI (LORA_OPS_STABLE_ABI:
# csrc/torch_bindings.cpp uses the limited API only), so `_C.abi3.so` built with this machine's
# Python headers loads on the GPU machine's 3.12.
#
# Nothing else is needed for the link: the local CUDA toolkit provides nvcc and cudart; libnvrtc, which
# torch's CMake config names, is dropped by CMakeLists.txt. Two more wheels, pinned to the versions
# torch's metadata names (through its cuda-toolkit requirement) or, for the tools, to the oldest on
# PyPI, serve the checks (scripts/check_cuda_prebuilt.py):
#   nvidia-cuda-runtime   libcudart.so.13 as torch 2.11.0 ships it: exported symbols to link against
#   nvidia-cuda-cuobjdump cuobjdump --list-elf / --dump-resource-usage (no 13.0 release on PyPI)
#   nvidia-cuda-nvdisasm  used by scripts/sass_report.py
# Downloads are kept in LORA_OPS_WHEEL_CACHE (default ~/.cache/lora_ops/wheels): a wheel already there
# is not asked for again, so repeated CI runs need no network. About 540 MB.
#
# Knobs: LORA_OPS_CUDA_ARCHS (default "80;90a"), JOBS (default: nproc), LORA_OPS_PREBUILT_WORK (the
# unpacked wheels and the CMake build dir, default build/cuda-prebuilt; kept for incremental rebuilds).
# Exit status: non-zero when anything fails to compile or link, or any check fails.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)

torch_version=2.11.0
# Oldest releases of the tool wheels (they start at 13.2); they read 13.0 cubins.
tools_version=13.2.86
archs=${LORA_OPS_CUDA_ARCHS:-80;90a}
cache=${LORA_OPS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora_ops/wheels}
work=${LORA_OPS_PREBUILT_WORK:-$root/build/cuda-prebuilt}
py=$(command -v python3)
mkdir -p "$cache" "$work"
t0=$SECONDS

# ---- toolchain ----------------------------------------------------------------------------------
command -v nvcc >/dev/null || { echo "build_cuda_prebuilt: nvcc not found on PATH" >&2; exit 1; }
# nvcc may be a wrapper script: its own dry run names the toolkit's bin directory.
cuda_bin=$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
cuda_root=$(cd "$cuda_bin/.." && pwd)
nvcc_release=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
echo "== nvcc $nvcc_release at $cuda_root"

# ---- wheels (cached) ----------------------------------------------------------------------------
# cached FILE_PREFIX: the cached wheel of that name and version for cp312 or with pure-Python /
# platform-only tags (never another Python's build of the same release); empty when there is none.
cached() {
  find "$cache" -maxdepth 1 -name "$1-*.whl" | grep -E -- '-(cp312|py3|py2\.py3)-' | sort | head -n 1 || true
}
# fetch DIST VERSION: prints the path of DIST's wheel for cp312 manylinux x86_64, downloading it into
# the cache only when no such file is there yet.
fetch() {
  local file=${1//-/_}-$2 hit
  hit=$(cached "$file")
  if [ -z "$hit" ]; then
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$cache" "$1==$2" >&2
    hit=$(cached "$file")
  fi
  [ -n "$hit" ] || { echo "build_cuda_prebuilt: no wheel $1==$2 in $cache" >&2; return 1; }
  echo "$hit"
}
# requirement WHEEL NAME [EXTRA]: the exact version WHEEL's metadata pins NAME to (for that extra).
requirement() {
  "$py" - "$@" <<'EOF'
import re, sys, zipfile
wheel, name, extra = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
z = zipfile.ZipFile(wheel)
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    m = re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([0-9][0-9.]*)(\.\*)?\s*(;.*)?$", line)
    if m and m.group(1) == name and (extra is None or f"extra == '{extra}'" in (m.group(5) or "")):
        print(m.group(3)); sys.exit(0)
sys.exit(f"{wheel}: no '{name}==' requirement" + (f" for extra {extra}" if extra else ""))
EOF
}

echo "== wheels (cache: $cache)"
torch_whl=$(fetch torch "$torch_version")
toolkit_version=$(requirement "$torch_whl" cuda-toolkit)
toolkit_whl=$(fetch cuda-toolkit "$toolkit_version")
cudart_version=$(requirement "$toolkit_whl" nvidia-cuda-runtime cudart)
cudart_whl=$(fetch nvidia-cuda-runtime "$cudart_version")
cuobjdump_whl=$(fetch nvidia-cuda-cuobjdump "$tools_version")
nvdisasm_whl=$(fetch nvidia-cuda-nvdisasm "$tools_version")
echo "   torch $torch_version -> cuda-toolkit $toolkit_version -> nvidia-cuda-runtime $cudart_version; tools $tools_version"

# unpack WHEEL DEST PATTERN...: extracts the members matching the patterns once per wheel file.
unpack() {
  local wheel=$1 dest=$2; shift 2
  if [ "$(cat "$dest/.from" 2>/dev/null)" != "$(basename "$wheel")" ]; then
    rm -rf "$dest" && mkdir -p "$dest"
    (cd "$dest" && unzip -q -o "$wheel" "$@")
    basename "$wheel" >"$dest/.from"
  fi
}
unpack "$torch_whl" "$work/wheel-torch" 'torch/include/*' 'torch/lib/*' 'torch/share/cmake/*' torch/version.py
unpack "$cudart_whl" "$work/wheel-cudart" 'nvidia/*/lib/libcudart.so*'
unpack "$cuobjdump_whl" "$work/wheel-tools" 'nvidia/*/bin/cuobjdump'
unpack "$nvdisasm_whl" "$work/wheel-nvdisasm" 'nvidia/*/bin/nvdisasm'
torch_dir=$work/wheel-torch/torch
cudart_lib=$(find "$work/wheel-cudart" -name 'libcudart.so.*' | head -n 1)
cuobjdump=$(find "$work/wheel-tools" -name cuobjdump -type f | head -n 1)
nvdisasm=$(find "$work/wheel-nvdisasm" -name nvdisasm -type f | head -n 1)
chmod +x "$cuobjdump" "$nvdisasm"
echo "   unpacked after $((SECONDS - t0)) s"

# ---- build --------------------------------------------------------------------------------------
# No RPATH: the module is loaded by a process that has already loaded torch's libraries by soname.
echo "== build (archs $archs)"
cmake -S "$root" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_SKIP_RPATH=ON \
  -DCMAKE_CUDA_COMPILER="$cuda_root/bin/nvcc" -DCUDAToolkit_ROOT="$cuda_root" -DCUDA_TOOLKIT_ROOT_DIR="$cuda_root" \
  -DLORA_OPS_TORCH_DIR="$torch_dir" -DLORA_OPS_STABLE_ABI=ON -DLORA_OPS_WITH_CUDA=ON \
  -DLORA_OPS_CUDA_ARCHS="$archs" -DLORA_OPS_INPLACE=OFF -DPython_EXECUTABLE="$py" >"$work/cmake.log" 2>&1 ||
  { cat "$work/cmake.log" >&2; echo "build_cuda_prebuilt: CMake configure failed" >&2; exit 1; }
grep -F 'lora_ops: CUDA kernels ON' "$work/cmake.log" ||
  { cat "$work/cmake.log" >&2; echo "build_cuda_prebuilt: CMake did not enable the CUDA kernels" >&2; exit 1; }
cmake --build "$work/build" -j "${JOBS:-$(nproc)}"
so=$(find "$work/build" -maxdepth 1 -name '_C*.so' | head -n 1)
[ -n "$so" ] || { echo "build_cuda_prebuilt: no _C*.so in $work/build" >&2; exit 1; }
rm -f "$out"/_C*.so
cp "$so" "$out/"
echo "   built after $((SECONDS - t0)) s"

# ---- checks + manifest --------------------------------------------------------------------------
"$py" "$root/scripts/check_cuda_prebuilt.py" --so "$out/$(basename "$so")" --build-dir "$work/build" \
  --torch-dir "$torch_dir" --cudart "$cudart_lib" --cuobjdump "$cuobjdump" --archs "$archs" \
  --nvcc-release "$nvcc_release" --manifest "$out/manifest.json" \
  --wheels "$torch_whl" "$toolkit_whl" "$cudart_whl" "$cuobjdump_whl" "$nvdisasm_whl"
# Where scripts/sass_report.py finds the disassembler (it also accepts --nvdisasm / --cuobjdump).
printf '%s\n%s\n' "$cuobjdump" "$nvdisasm" >"$work/tools.txt"
echo "build_cuda_prebuilt: ok after $((SECONDS - t0)) s -> $out"
