"""Long fp32 reductions on the CPU kernels against the float64 reference, with the shared error rule
(max error within 2x plain PyTorch's + atol, mean relative error <= 1e-6 for fp32).

fp32 activations are transformers' default compute dtype for 4-bit layers. A kernel that sums a
4096-long reduction in one fp32 chain has several times the error of torch's blocked matmul and fails
that rule: the kGemm tile (forward and dx above the small-M paths) and the kAxpy dx (M <= 16, a chain
over N) did, up to 2026-12-07. Each case is one kernel's long reduction; the SIMD levels below the
machine's run in fresh processes (the level is read once at load)."""

import pytest
import torch
from cpu_tiers import lower_tiers, tier_params
from qlora_utils import run_script_in_fresh_process
from test_qlora_slab_path import check_case

fp32 = torch.float32

# (x leading shape, N, K, r, x dtype, adapter dtype, blocksize, double quant, dropout p, bias)
CASES = [
    ((300,), 64, 8192, 16, fp32, fp32, 64, True, 0.0, False),  # forward, GEMM tile: 32 blocks of the reduction
    ((2, 20), 4096, 256, 16, fp32, fp32, 64, True, 0.0, True),  # dx, GEMM tile: reduction over N = 4096
    ((4,), 8192, 256, 8, fp32, fp32, 64, True, 0.1, False),  # dx, axpy path (M <= 16): over N = 8192, dropout
    ((3,), 64, 16384, 16, fp32, fp32, 64, False, 0.0, False),  # forward, row-dot (M <= 16): K = 16384
    ((20,), 48, 8192, 33, fp32, fp32, 4096, True, 0.0, False),  # blocksize 4096, odd rank (folded into K)
    ((2,), 257, 2048, 1, fp32, fp32, 32, False, 0.2, False),  # r = 1, M = 2: u's error is dA's (fp64 lora_down)
    ((1,), 16, 64, 1, fp32, fp32, 64, False, 0.0, True),  # M = 1: s's error is dB's
    ((300,), 64, 1, 2, fp32, fp32, 64, False, 0.0, False),  # K = 1: dA has 2 elements (fp64 lora_outer)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}-{c[1]}x{c[2]}")
def test_long_fp32_reductions_match_reference(case, rng):
    check_case(case, int(torch.randint(0, 2**30, (1,), generator=rng).item()))


_AT_LEVEL = r"""
import sys, torch
sys.path.insert(0, 'tests')
import test_qlora_cpu_accuracy as t
seed = int(sys.argv[1])
for i, case in enumerate(t.CASES):
    t.check_case(case, seed + i)
"""


@pytest.mark.parametrize("tier_env", tier_params(lower_tiers()))
def test_long_fp32_reductions_at_lower_simd_levels(tier_env, rng):
    seed = str(int(torch.randint(0, 2**30, (1,), generator=rng).item()))
    run_script_in_fresh_process(_AT_LEVEL, [seed], tier_env, timeout=300)


# lora_down with few outputs (M · r <= 16): each element of s = drop(x)·Aᵀ or u = dy·B scales a whole row
# of dB or dA, so its error is not averaged away; those sums are accumulated in fp64 and rounded once.
# Bound: within 1 ulp of the float64 value (an fp32 sum over a few hundred terms with cancellation was more
# than 2x plain PyTorch's error in 16 % of draws).
_FEW_OUTPUTS = r"""
import sys, torch
import lora_ops  # noqa: F401  (registers the ops)
gen = torch.Generator().manual_seed(int(sys.argv[1]))
for m, l, r, dtype in [(1, 257, 1, torch.float32), (2, 2048, 1, torch.float32), (1, 300, 16, torch.bfloat16),
                       (4, 1031, 4, torch.float32), (16, 64, 1, torch.float16)]:
    for trial in range(20):
        a = torch.randn(m, l, generator=gen).to(dtype)
        for f in (torch.randn(r, l, generator=gen), torch.randn(l, r, generator=gen).t()):  # A, and Bᵀ (strided)
            s = torch.ops.lora_ops.lora_down(a, f, 0.0, None)
            exact = a.double() @ f.double().t()
            ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(1e-30)
            err = (s.double() - exact).abs()
            assert (err <= ulp).all(), (m, l, r, dtype, (err / ulp).max().item())
# lora_outer with few outputs (p · q <= 16: dA of a K = 1 layer, dB of an N = 1 layer) likewise.
for m, np_, q, dtype in [(300, 4, 1, torch.bfloat16), (2000, 1, 16, torch.float32), (7, 2, 2, torch.float32)]:
    for trial in range(20):
        left = torch.randn(m, np_, generator=gen)
        right = torch.randn(m, q, generator=gen).to(dtype)
        g = torch.ops.lora_ops.lora_outer(left, right, 0.5, 0.0, None, torch.float32)
        exact = 0.5 * left.double().t() @ right.double()
        ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(1e-30)
        err = (g.double() - exact).abs()
        assert (err <= ulp).all(), (m, np_, q, dtype, (err / ulp).max().item())
"""


@pytest.mark.parametrize("cap", [None, "LORA_OPS_NO_AVX2"])
def test_lora_factors_with_few_outputs_are_correctly_rounded(cap, rng):
    seed = str(int(torch.randint(0, 2**30, (1,), generator=rng).item()))
    run_script_in_fresh_process(_FEW_OUTPUTS, [seed], {cap: "1"} if cap else {}, timeout=120)
