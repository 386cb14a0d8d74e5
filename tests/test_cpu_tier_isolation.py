"""The avx512 tier (AVX-512 without AVX512_BF16: Skylake-SP to Ice Lake Xeons) must never execute a BF16
instruction. On a CPU with BF16 a stray one would simply run, so two checks that work there too:

- static, on the built extension: every function of lora_ops._C whose code holds a BF16 instruction
  (vdpbf16ps, vcvtne2ps2bf16, vcvtneps2bf16) is one of the vdpbf16ps row-dot kernels
  (csrc/kernels/cpu/nf4_rowdot_avx512_bf16.cpp), and the tier entry points hold none;
- dispatch: vdpbf16ps counts subnormal bf16 inputs as zero, the vpermps kernel does not, so x rows of
  subnormal values give 0 at the avx512_bf16 tier and the true (normal fp32) products at the avx512 tier:
  a forced avx512 process that reached the bf16 kernels would return 0.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from cpu_tiers import TIER_ENV, runnable
from qlora_utils import run_script_in_fresh_process

import lora_ops
from lora_ops import _C, _native

BF16_OPS = re.compile(r"\s(vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16)\s")


def _functions_with_bf16_instructions() -> dict[str, int]:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True,
                         text=True, check=True).stdout
    found: dict[str, int] = {}
    fn = None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            fn = head.group(1)
        elif fn is not None and BF16_OPS.search(line):
            found[fn] = found.get(fn, 0) + 1
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils) to disassemble lora_ops._C")
def test_bf16_instructions_only_in_the_avx512_bf16_row_dot():
    found = _functions_with_bf16_instructions()
    assert found, "no BF16 instruction at all: the vdpbf16ps row-dot kernels are missing from the build"
    strays = [fn for fn in found if "rowdot_detail" not in fn or "bf16" not in fn]
    assert not strays, f"BF16 instructions outside the avx512_bf16 row-dot kernels: {strays[:5]}"
    # The tier dispatchers, which the avx512 tier runs, must hold none themselves.
    entries = [fn for fn in found if re.search(r"rowdot_avx512\(|rowdot_prepare_x_avx512\(", fn)]
    assert not entries, entries


def subnormal_row_dot() -> tuple[torch.Tensor, torch.Tensor]:
    """y = x·Wᵀ for bf16 x rows of subnormal values (K = 1024, blocksize 64: the fused row-dot), and the
    float64 reference; the LoRA term is zero (scale 0)."""
    g = torch.Generator().manual_seed(7)
    n, k = 64, 1024
    wq = lora_ops.quantize_nf4(torch.rand(n, k, generator=g) + 0.5, 64, False)  # positive: no cancellation
    x = (torch.rand(1, k, generator=g) * 1e-39 + 1e-39).to(torch.bfloat16)  # below 2^-126 ~ 1.18e-38
    assert (x.float().abs() < torch.finfo(torch.float32).tiny).all() and (x != 0).all()
    A, B = torch.zeros(4, k), torch.zeros(n, 4)
    with torch.no_grad():
        y = lora_ops.qlora_linear(x, wq, A, B, 0.0)
    ref = x.double() @ wq.dequantize(torch.bfloat16).double().t()
    return y, ref


_AT_AVX512 = r"""
import sys
sys.path.insert(0, "tests")
import torch, lora_ops._native as n, test_cpu_tier_isolation as t
assert n.CPU_SIMD == "avx512", n.CPU_SIMD
assert n.cpu_matmul_path(1, 64, 1024, "bfloat16") == "row_dot_fused"
y, ref = t.subnormal_row_dot()
assert (y != 0).all(), "the avx512 tier returned the vdpbf16ps kernel's flushed products"
torch.testing.assert_close(y.double(), ref.to(torch.bfloat16).double(), rtol=1e-2, atol=0)
"""


def test_avx512_tier_never_reaches_the_vdpbf16ps_kernels():
    if not runnable("avx512"):
        pytest.skip("this CPU cannot run the avx512 tier")
    run_script_in_fresh_process(_AT_AVX512, [], TIER_ENV["avx512"], timeout=120)
    if _native.CPU_SIMD == "avx512_bf16":  # the property the check relies on: vdpbf16ps flushes them
        y, _ = subnormal_row_dot()
        assert (y == 0).all()
