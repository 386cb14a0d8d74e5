"""CUDA-only tests of the individual qlora_matmul kernels (tc decode, decode, tensor core, slab, FFMA), forced with
LORA_OPS_QLORA_FORCE so that each path is checked on shapes the automatic dispatch would not give it:
split-K, each M regime, K not a multiple of 32 or 64, N tails, unaligned / strided activations, the
transposed (dx) form with dropout. Oracle: float64 on the dequantized weight rounded to the compute
dtype (the kernels' exact operand). Skipped without a GPU build and a GPU."""

from __future__ import annotations

import pytest
import torch

import lora_ops
from lora_ops import reference
from lora_ops.nf4 import quantize_nf4
from lora_ops.ops.qlora import qlora_matmul

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and lora_ops.WITH_CUDA),
                                reason="needs a GPU build and a GPU")

# Output rounding dominates: half an ulp of the output dtype relative to the largest output, doubled
# for the fp32 accumulation-order differences.
REL_TOL = {torch.float32: 2e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _problem(m, n, k, r, dtype, blocksize, double_quant, gen):
    w = torch.randn(n, k, generator=gen) * 0.5
    wq = quantize_nf4(w, blocksize, double_quant).to("cuda")
    dense = reference.nf4_dequantize(wq.packed.cpu(), wq.absmax_float().cpu(), blocksize, (n, k), dtype).double()
    return wq, dense


def _check(ours, ref, dtype, what):
    ours = ours.double().cpu()
    assert torch.isfinite(ours).all(), f"{what}: non-finite"
    err = (ours - ref).abs().max().item()
    bound = REL_TOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


CASES = [
    # (m, n, k, forced path, dtypes)
    (1, 256, 4096, "decode", [torch.bfloat16, torch.float16, torch.float32]),   # split-K at small N
    (3, 72, 1024, "decode", [torch.bfloat16, torch.float32]),                    # N tail, M not a power of 2
    (16, 1000, 2048, "decode", [torch.float16]),                                  # largest decode M
    (5, 130, 96, "decode", [torch.bfloat16]),                                     # K = 3 chunks (idle lanes)
    (4, 520, 1056, "decode", [torch.bfloat16, torch.float32]),                    # dx form: 2 column CTAs, N split
    (1, 4096, 4096, "tc_decode", [torch.bfloat16, torch.float16]),               # decode shape, 2 full rounds
    (16, 72, 2112, "tc_decode", [torch.bfloat16]),                               # N tail, masked last round
    (64, 136, 192, "tc_decode", [torch.float16]),                                # largest M, 8 n8 tiles
    (33, 40, 8192, "tc_decode", [torch.bfloat16]),                               # small N: K splits (dx: N split)
    (4, 1000, 4096, "tc_decode", [torch.float16, torch.bfloat16]),               # dx: N tail, 16 column CTAs
    (1, 64, 256, "mma", [torch.bfloat16, torch.float16]),                         # M = 1 padded to a tile
    (17, 136, 96, "mma", [torch.bfloat16]),                                       # K % 64 != 0 (fast path)
    (100, 200, 200, "mma", [torch.float16, torch.bfloat16]),                      # K % 32 != 0 (scalar path)
    (130, 320, 1024, "mma", [torch.bfloat16]),                                    # M and N tails, 16 K tiles
    (300, 136, 200, "slab", [torch.float32, torch.bfloat16]),                    # large M: W slabs + cuBLAS (bf16: bf16 GEMM)
    (70, 1000, 77, "slab", [torch.float32, torch.bfloat16]),                     # odd K (bf16: fp32 window narrowed), N tail
    (7, 50, 77, "ffma", [torch.float32, torch.bfloat16]),                         # odd everything
    (2, 64, 4096, "ffma", [torch.float32]),                                       # split-K in the FFMA path
]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("m,n,k,path,dtypes", CASES)
def test_forced_path(monkeypatch, m, n, k, path, dtypes, transpose):
    monkeypatch.setenv("LORA_OPS_QLORA_FORCE", path)
    gen = torch.Generator().manual_seed(1000 * m + n + k)
    r, scale = 8, 0.75
    for dtype in dtypes:
        for blocksize, dq in ((64, True), (128, False)):
            wq, dense = _problem(m, n, k, r, dtype, blocksize, dq, gen)
            n_in, n_out = (n, k) if transpose else (k, n)
            a = torch.randn(m, n_in, generator=gen).to(dtype)
            s = torch.randn(m, r, generator=gen)
            lw = torch.randn(n_out, r, generator=gen)
            bias = None if transpose else torch.randn(n_out, generator=gen).to(dtype)
            p, seed, off = (0.25, 1234, 7) if transpose else (0.0, 0, 0)
            rng = torch.tensor([seed, off], dtype=torch.int64) if p > 0 else None
            out = qlora_matmul(a.cuda(), wq, transpose_w=transpose, lora_s=s.cuda(), lora_w=lw.cuda(), scale=scale,
                               bias=None if bias is None else bias.cuda(), dropout_p=p, rng=rng)
            wop = dense if transpose else dense.t()
            lora = (s.double() @ lw.double().t())
            if p > 0:
                lora = lora * reference.dropout_keep(m, k, p, seed, off).double() * reference.dropout_keep_scale(p)
            ref = a.double() @ wop + scale * lora
            if bias is not None:
                ref = ref + bias.double()
            _check(out, ref, dtype, f"{path} {dtype} bs={blocksize} dq={dq} T={transpose}")


@pytest.mark.parametrize("path", ["tc_decode", "decode", "mma", "slab", "ffma"])
def test_strided_and_unaligned_activations(monkeypatch, path):
    """A column-strided x and a row view at an odd element offset must take the scalar paths (or be
    rejected by the decode kernel's conditions and fall back) and still be exact."""
    monkeypatch.setenv("LORA_OPS_QLORA_FORCE", path)
    gen = torch.Generator().manual_seed(7)
    m, n, k = 4, 96, 256
    dtype = torch.bfloat16
    wq, dense = _problem(m, n, k, 4, dtype, 64, True, gen)
    big = torch.randn(m, 2 * k + 1, generator=gen).to(dtype)
    big_gpu = big.cuda()  # slice on the device: .cuda() of a non-dense view would make it contiguous
    for sl in ((slice(None), slice(1, k + 1)), (slice(None), slice(0, 2 * k, 2))):
        a_gpu = big_gpu[sl]
        assert not a_gpu.is_contiguous()
        out = qlora_matmul(a_gpu, wq)
        _check(out, big[sl].double() @ dense.t(), dtype, f"{path} strided {a_gpu.stride()}")


def test_paths_agree_with_cpu(monkeypatch):
    """Every CUDA path against the CPU kernel on the same inputs (both fp32-accumulating)."""
    gen = torch.Generator().manual_seed(11)
    m, n, k = 9, 192, 512
    dtype = torch.bfloat16
    wq, dense = _problem(m, n, k, 8, dtype, 64, True, gen)
    a = torch.randn(m, k, generator=gen).to(dtype)
    cpu = qlora_matmul(a, wq.to("cpu")).double()
    for path in ("tc_decode", "decode", "mma", "slab", "ffma"):
        monkeypatch.setenv("LORA_OPS_QLORA_FORCE", path)
        _check(qlora_matmul(a.cuda(), wq), cpu, dtype, f"{path} vs cpu")


@pytest.mark.parametrize("m", [1, 33, 5000])
def test_lora_down_outer_cuda(m):
    """lora_down with dropout and lora_outer (split over M when the output is small) vs float64."""
    gen = torch.Generator().manual_seed(m)
    k, n, r, p, seed, off = 300, 72, 16, 0.3, 99, 5
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    A = torch.randn(r, k, generator=gen)
    rng = torch.tensor([seed, off], dtype=torch.int64)
    s = torch.ops.lora_ops.lora_down(x.cuda(), A.cuda(), p, rng)
    xd = reference.lora_dropout(x.double(), p, seed, off)
    s_ref = xd @ A.double().t()
    _check(s, s_ref, torch.float32, "lora_down")
    dy = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    dB = torch.ops.lora_ops.lora_outer(dy.cuda(), s, 0.5, 0.0, None, torch.float32)
    _check(dB, 0.5 * dy.double().t() @ s.double().cpu(), torch.float32, "lora_outer dB")
    u = torch.randn(m, r, generator=gen)
    dA = torch.ops.lora_ops.lora_outer(u.cuda(), x.cuda(), 0.5, p, rng, torch.bfloat16)
    _check(dA, 0.5 * u.double().t() @ xd, torch.bfloat16, "lora_outer dA")
