"""Checksums of CPU qlora_matmul / dequantize / dropout outputs over every kernel path, for checking that
a refactor of the CPU kernels changes no bit. Run it before and after with the same environment
(LORA_OPS_NO_AVX512=1 / LORA_OPS_NO_AVX512_BF16=1 / LORA_OPS_NO_AVX2=1 pick the tier) and compare:

    python scripts/cpu_kernel_checksums.py > before.txt   # ... change, rebuild ...
    python scripts/cpu_kernel_checksums.py | diff before.txt -

Paths are steered by the crossover overrides (LORA_OPS_GEMV_MAX_M etc. are read at load, so each path
runs in its own child process)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

# path name -> the overrides that send M = 1..40 calls there
PATHS = {
    "row_dot": {"LORA_OPS_GEMV_MAX_M": "64", "LORA_OPS_FUSED_ROWDOT_MAX_M": "0", "LORA_OPS_AXPY_MAX_M": "64"},
    "row_dot_fused": {"LORA_OPS_GEMV_MAX_M": "64", "LORA_OPS_FUSED_ROWDOT_MAX_M": "64", "LORA_OPS_AXPY_MAX_M": "64"},
    "gemm": {"LORA_OPS_GEMV_MAX_M": "0", "LORA_OPS_AXPY_MAX_M": "0", "LORA_OPS_SLAB_MIN_M": str(1 << 40)},
    "slab": {"LORA_OPS_GEMV_MAX_M": "0", "LORA_OPS_AXPY_MAX_M": "0", "LORA_OPS_SLAB_MIN_M": "1"},
}

CHILD = r"""
import hashlib, torch, lora_ops
from lora_ops.nf4 import quantize_nf4
from lora_ops.ops.qlora import qlora_matmul, lora_dropout_mask
print("tier", lora_ops._native.CPU_SIMD)
g = torch.Generator().manual_seed(1234)
def h(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
for (n, k, bs, dq) in [(96, 256, 64, True), (80, 320, 32, False), (64, 4096, 64, True), (130, 200, 64, False)]:
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    wq = quantize_nf4(w, bs, dq)
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for m in (1, 3, 7, 17, 40):
            for tw in (False, True):
                kin, kout = (n, k) if tw else (k, n)
                a = torch.randn(m, kin, generator=g).to(dt)
                for r, p in ((0, 0.0), (8, 0.0), (8, 0.3)):
                    s = torch.randn(m, r, generator=g) if r else None
                    if s is not None and dt == torch.float64:
                        s = s.double()
                    lw = torch.randn(kout, r, generator=g).to(dt if dt != torch.float64 else dt) if r else None
                    b = torch.randn(kout, generator=g).to(dt) if not tw else None
                    rng = torch.tensor([5, 7], dtype=torch.int64) if p else None
                    try:
                        y = qlora_matmul(a, wq, tw, s, lw, 0.5, b, p, rng)
                        print(n, k, bs, dq, dt, m, tw, r, p, h(y))
                    except Exception as e:
                        print(n, k, bs, dq, dt, m, tw, r, p, "error", type(e).__name__)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        print("dequant", n, k, bs, dq, dt, h(wq.dequantize(dt)))
print("mask", h(lora_dropout_mask(33, 77, 0.3, torch.tensor([3, 9], dtype=torch.int64))))
"""


def main() -> None:
    for name, env in PATHS.items():
        out = subprocess.run([sys.executable, "-c", CHILD], env=dict(os.environ, **env), capture_output=True,
                             text=True, check=True).stdout
        print(f"== {name}")
        print(out, end="")
        print("digest", hashlib.sha256(out.encode()).hexdigest()[:16], file=sys.stderr)


if __name__ == "__main__":
    main()
