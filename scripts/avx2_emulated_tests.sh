#!/usr/bin/env bash
# The test suite as it runs on an AVX2-only x86 CPU (no AVX-512), on an AVX-512 machine: Python runs under
# qemu-user (TCG) with QEMU's EPYC-Rome CPU model, so cpuid -- what torch, oneDNN, bitsandbytes and
# lora_ops' kernel choice read -- reports AVX2 + FMA + F16C and no AVX-512; in a private mount namespace
# /proc/cpuinfo is replaced by this machine's with the AVX-512 flags removed (tests and `lora_ops env` read
# it). Child Pythons (tests that start `sys.executable`) come back under qemu through a wrapper venv;
# other children run natively, so torch.compile's C++ compiler (CXX) gets -march=znver2 for -march=native
# (natively that targets this machine's CPU: code built so ran with wrong results under qemu 7.2, no fault).
# Correctness only: emulated time means nothing. Needs root (unshare -m, mount --bind) and Debian's apt
# (qemu-user 7.2+: TCG runs AVX2 / FMA / F16C). Run from the repository's venv:
#   scripts/avx2_emulated_tests.sh [pytest args]     (default: the whole suite, -q)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${LORA_OPS_QEMU_DIR:-$repo/build/qemu-avx2}
python=${PYTHON:-python}
mkdir -p "$work/debs" "$work/root" "$work/venv/bin"

# qemu-user and the libraries Debian 12's build links that a minimal system may lack, unpacked, not installed.
if [ ! -x "$work/root/usr/bin/qemu-x86_64" ]; then
  (cd "$work/debs" && apt-get download qemu-user libcapstone4 liburing2 2>&1 |
    grep -v '^W: Download is performed unsandboxed')
  for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/root"; done
fi
qemu="$work/root/usr/bin/qemu-x86_64"

# A venv whose interpreter is a script: sys.executable names it, so children start under qemu as well.
venv=$("$python" -c 'import sys; print(sys.prefix)')
base=$("$python" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
cp "$venv/pyvenv.cfg" "$work/venv/pyvenv.cfg"
ln -sfn "$venv/lib" "$work/venv/lib"
cat > "$work/venv/bin/python" <<EOF
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$work/root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$qemu" -cpu EPYC-Rome -0 "$work/venv/bin/python" "$base" "\$@" \
  2> >(grep --line-buffered -v "TCG doesn't support" >&2)
EOF
chmod +x "$work/venv/bin/python"
ln -sfn python "$work/venv/bin/python3"

# The C++ compiler torch.compile runs, with -march=native meaning EPYC-Rome (Zen 2).
cxx=$(command -v "${CXX:-g++}")
mkdir -p "$work/bin"
cat > "$work/bin/g++" <<EOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do [ "\$a" = -march=native ] && a=-march=znver2; args+=("\$a"); done
exec "$cxx" "\${args[@]}"
EOF
chmod +x "$work/bin/g++"

# This machine's /proc/cpuinfo without the flags EPYC-Rome lacks.
sed -E 's/ (avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni|vaes|vpclmulqdq|gfni)\b//g' /proc/cpuinfo > "$work/cpuinfo"

check='import torch, lora_ops._native as n; print(torch.backends.cpu.get_cpu_capability(), n.CPU_SIMD)'
[ $# -gt 0 ] || set -- -q
cd "$repo"
exec unshare -m bash -c '
  mount --bind "$0/cpuinfo" /proc/cpuinfo
  echo "under qemu EPYC-Rome: torch capability, lora_ops kernels: $("$0/venv/bin/python" -c "$1")"
  export PYTHONPATH="$2${PYTHONPATH:+:$PYTHONPATH}" CXX="$0/bin/g++"
  shift 2
  exec "$0/venv/bin/python" -m pytest -p no:cacheprovider "$@"' "$work" "$check" "$repo" "$@"
