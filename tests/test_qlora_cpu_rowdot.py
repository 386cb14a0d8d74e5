"""The CPU forward with few x rows has these kernels: kRowDotFused (codes decoded in registers) at each SIMD
level, AVX2 (bf16 byte tables or vpermps tables) and AVX-512 (vdpbf16ps or vpermps); kRowDot (rows
decoded into a buffer); the portable one. Each is checked against the float64 reference on shapes that
reach its corners: more than 64 blocks per row (the absmax run), N tails, x-row chunks of 4 (AVX2) and 8
(AVX-512) with remainders, non-contiguous x, every blocksize kind, plain and nested absmax. The levels
below the CPU's and the buffered kernel run in fresh processes (tests/cpu_tiers.py's caps,
LORA_OPS_FUSED_ROWDOT_MAX_M=0: read at load)."""

import os
import subprocess
import sys

import pytest
import torch
from cpu_tiers import TIER_ENV, lower_tiers, runnable
from qlora_utils import (assert_close_rule, dense_weight, make_problem, run_script_in_fresh_process,
                         torch_same_dtype)

import lora_ops
from lora_ops import reference
from lora_ops.ops.qlora import qlora_linear, qlora_matmul

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

# (dtype, blocksize, double quant, m_shape, n, k): K is a whole number of blocks (the fused kernels'
# condition); 4480 = 70 blocks of 64 and 4160 = 130 blocks of 32 pass the 64-block absmax run.
CASES = [
    (bf16, 64, True, (1,), 130, 4480),    # byte tables, M = 1 (4 accumulators), N tail
    (bf16, 128, False, (7,), 70, 1024),   # byte tables, x rows in chunks of 4 + 3 (AVX-512: x packed in 8 lanes)
    (bf16, 256, True, (2, 8), 64, 512),   # byte tables, M = 16 (AVX-512: x packed across rows), 3-D x
    (bf16, 64, False, (11,), 67, 4480),   # M = 11: AVX-512 packed x, column blocks of 256 + 128, W rows 16 + 3
    (bf16, 64, True, (4,), 67, 4480),     # M = 4: AVX-512 W rows in pairs (+ a last single row), 70 blocks
    (bf16, 128, False, (3,), 33, 1024),   # M = 3: W rows in pairs (+ a last single row), 2 chunks per block
    (bf16, 32, True, (2,), 96, 4160),     # bf16 with blocksize 32: vpermps tables
    (fp32, 64, True, (4,), 100, 640),     # vpermps tables, fp32 values
    (fp16, 1024, False, (3,), 33, 2048),  # vpermps tables, fp16 values
    (fp32, 32, False, (13,), 40, 1024),   # vpermps, one block per 32-column group, x rows 8 + 5 / 4·3 + 1
]


def _run(case, seed, transpose_x):
    dtype, bs, dq, m_shape, n, k = case
    wq, x, A, B, b = make_problem(m_shape, n, k, 8, dtype, "cpu", blocksize=bs, double_quant=dq, seed=seed)
    if transpose_x:  # the same values through a non-contiguous view
        x = x.reshape(-1, k).t().contiguous().t().reshape(x.shape)
    return wq, x, A, B, b, qlora_linear(x, wq, A, B, 0.5, b)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-bs{c[1]}-m{c[3]}-{c[4]}x{c[5]}")
def test_fused_row_dot_matches_reference(case, rng):
    seed = int(torch.randint(0, 2**30, (1,), generator=rng).item())
    for transpose_x in (False, True):
        wq, x, A, B, b, y = _run(case, seed, transpose_x)
        w = dense_weight(wq, case[0])
        ref, _ = reference.qlora_linear(x, w, A, B, 0.5, b, 0.0, 0, 0)
        plain = torch_same_dtype(x, w, A, B, 0.5, b, 0.0, 0, 0)
        assert_close_rule(y, ref, plain, case[0], f"{case} transpose_x={transpose_x}")


_AT_LEVEL = r"""
import sys, torch
sys.path.insert(0, 'tests')
import lora_ops
import test_qlora_cpu_rowdot as t
print(lora_ops._native.CPU_SIMD)
for case in t.CASES:
    t.test_fused_row_dot_matches_reference(case, torch.Generator().manual_seed(int(sys.argv[1])))
"""


@pytest.mark.parametrize("tier", lower_tiers())
def test_lower_simd_levels_match_reference(tier, rng):
    # The kernels of each tier below the CPU's (AVX-512 without BF16: the vpermps kernel for bf16 too; AVX2;
    # portable) against the reference, each forced in a fresh process; a tier the CPU lacks is skipped.
    if not runnable(tier):
        pytest.skip(f"this CPU cannot run the {tier} tier")
    seed = str(int(torch.randint(0, 2**30, (1,), generator=rng).item()))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), **TIER_ENV[tier])
    res = subprocess.run([sys.executable, "-c", _AT_LEVEL, seed], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.split()[0] == tier


_BUFFERED = r"""
import sys, torch
sys.path.insert(0, 'tests')
import test_qlora_cpu_rowdot as t
seed = int(sys.argv[2])
torch.save([t._run(c, seed, False)[-1] for c in t.CASES], sys.argv[1])
"""


def test_buffered_row_dot_matches_fused(tmp_path, rng):
    seed = int(torch.randint(0, 2**30, (1,), generator=rng).item())
    path = str(tmp_path / "buffered.pt")
    run_script_in_fresh_process(_BUFFERED, [path, str(seed)], {"LORA_OPS_FUSED_ROWDOT_MAX_M": "0"}, timeout=180)
    buffered = torch.load(path)
    for case, yb in zip(CASES, buffered):
        *_, y = _run(case, seed, False)
        tol = {bf16: 1e-2, fp16: 2e-3, fp32: 1e-5}[case[0]]
        atol = tol * max(1.0, y.abs().max().item())  # another summation order: differences scale with |y|
        torch.testing.assert_close(yb, y, rtol=tol, atol=atol, msg=lambda m: f"{case}: {m}")
    with open("/proc/cpuinfo") as f:
        has_avx2 = " avx2 " in f.read()
    if has_avx2 and not os.environ.get("LORA_OPS_NO_AVX2"):  # another summation order: the other kernel ran
        fp32_case = next(i for i, c in enumerate(CASES) if c[0] == fp32)
        assert not torch.equal(buffered[fp32_case], _run(CASES[fp32_case], seed, False)[-1])


@pytest.mark.parametrize("dtype,bs", [(bf16, 64), (bf16, 32), (fp16, 128), (fp32, 64)])
def test_fused_row_dot_uses_the_exact_weight_values(dtype, bs, rng):
    # One-hot x rows make each output one product, so y shows the kernel's weight values bit for bit:
    # T(code · absmax) rounded once (qlora_params.h), ties included (row 0 of every row's first block is
    # 1 + 3·2^-8 with plain absmax: code 1.0 decodes to it, halfway between two bf16 values).
    n, k = 70, 1024
    w = (torch.randn(n, k, generator=rng) * 0.3).clamp(-1.0, 1.0)
    w[:, 0] = 1.0 + 3 * 2.0**-8
    wq = lora_ops.quantize_nf4(w, bs, False)
    expect = dense_weight(wq, dtype)
    seen = torch.empty(n, k, dtype=dtype)
    for k0 in range(0, k, 16):
        x = torch.zeros(16, k, dtype=dtype)
        x[torch.arange(16), k0 + torch.arange(16)] = 1.0
        seen[:, k0:k0 + 16] = qlora_matmul(x, wq).t()
    assert torch.equal(seen.view(torch.int16 if dtype != fp32 else torch.int32),
                       expect.view(torch.int16 if dtype != fp32 else torch.int32))
