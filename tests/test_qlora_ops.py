"""Fused QLoRA linear ops: forward and gradients against the float64 reference, dropout, odd shapes,
opcheck, torch.compile and error paths."""

from __future__ import annotations

import os

import pytest
import torch
from qlora_utils import (
    DEVICES,
    HAS_CUDA,
    assert_close_rule,
    dense_weight,
    make_problem,
    run_script_in_fresh_process,
    torch_same_dtype,
)

from lora_ops import reference
from lora_ops.ops.qlora import lora_dropout_mask, make_rng, qlora_linear, qlora_matmul

ops = torch.ops.lora_ops
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

# (x leading shape, N, K, r, x dtype, adapter dtype, blocksize, double quant, dropout p)
CASES = [
    ((1,), 70, 200, 8, bf16, fp32, 64, True, 0.0),  # decode row-dot path, K tail
    ((3,), 130, 300, 1, fp16, fp16, 32, False, 0.1),  # rank 1, plain absmax
    ((17,), 64, 520, 64, fp32, fp32, 128, True, 0.0),  # K = 2 reduction blocks + tail
    ((255,), 96, 264, 8, bf16, bf16, 64, True, 0.2),  # many 6-row groups + tail rows
    ((2, 5), 37, 45, 8, fp32, fp32, 32, True, 0.0),  # 3-D x, odd N*K, blocks straddle rows
    ((4, 3), 100, 256, 16, fp16, fp32, 64, False, 0.3),  # N not a multiple of 16/64
    ((300,), 40, 96, 16, fp16, fp16, 64, True, 0.0),  # one output panel split over row parts, LoRA folded into K
]


def _run_ours(x, wq, A, B, scale, bias, p, rng):
    x = x.detach().clone().requires_grad_()
    A = A.detach().clone().requires_grad_()
    B = B.detach().clone().requires_grad_()
    y = qlora_linear(x, wq, A, B, scale, bias, p, rng)
    return x, A, B, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-r{c[3]}-{c[4]}-{c[5]}-bs{c[6]}-p{c[8]}"
)
def test_forward_and_grads_match_reference(device, case, rng):
    m_shape, n, k, r, dtype, adt, bs, dq, p = case
    wq, x, A, B, bias = make_problem(m_shape, n, k, r, dtype, device, adt, bs, dq, generator=rng)
    scale, seed, offset = 0.75, 1234 + k, 17
    rng = make_rng(seed, offset)
    w = dense_weight(wq, dtype)

    xo, Ao, Bo, y = _run_ours(x, wq, A, B, scale, bias, p, rng)
    assert y.dtype == dtype and y.shape == (*m_shape, n)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    y.backward(dy)
    assert Ao.grad.dtype == adt and Bo.grad.dtype == adt and xo.grad.dtype == dtype

    # float64 reference (autograd through the oracle)
    x64 = x.detach().cpu().double().requires_grad_()
    A64 = A.detach().cpu().double().requires_grad_()
    B64 = B.detach().cpu().double().requires_grad_()
    bias64 = bias.cpu().double() if bias is not None else None
    y64, _ = reference.qlora_linear(x64, w, A64, B64, scale, bias64, p, seed, offset)
    y64.backward(dy.cpu().double())
    # the same math in x's dtype with plain PyTorch (the error yardstick)
    xp = x.detach().cpu().requires_grad_()
    Ap = A.detach().cpu().requires_grad_()
    Bp = B.detach().cpu().requires_grad_()
    yp = torch_same_dtype(xp, w, Ap, Bp, scale, bias.cpu() if bias is not None else None, p, seed, offset)
    yp.backward(dy.cpu())

    assert_close_rule(y, y64, yp, dtype, "y")
    assert_close_rule(xo.grad, x64.grad, xp.grad, dtype, "dx")
    assert_close_rule(Ao.grad, A64.grad, Ap.grad, adt, "dA")
    assert_close_rule(Bo.grad, B64.grad, Bp.grad, adt, "dB")


@pytest.mark.parametrize("device", DEVICES)
def test_closed_form_backward_matches_autograd_of_reference(device, rng):
    # The closed-form reference backward (used by the CUDA helper's tests) agrees with autograd.
    wq, x, A, B, _ = make_problem((9,), 40, 72, 4, fp32, "cpu", generator=rng)
    w = dense_weight(wq, fp32)
    x64, A64, B64 = (t.double().requires_grad_() for t in (x, A, B))
    y, _ = reference.qlora_linear(x64, w, A64, B64, 0.5, None, 0.25, 99, 3)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dA, dB = reference.qlora_linear_backward(dy, x, w, A, B, 0.5, 0.25, 99, 3)
    torch.testing.assert_close(dx, x64.grad)
    torch.testing.assert_close(dA, A64.grad)
    torch.testing.assert_close(dB, B64.grad)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("double_quant", [True, False])
def test_gradcheck_float64_cpu(dropout_p, double_quant, rng):
    # The CPU kernels have a float64 path (fp64 accumulation, W = exact fp32 decode products), so
    # gradcheck runs on the real ops, backward included.
    wq, x, A, B, bias = make_problem(
        (2, 3), 11, 40, 3, torch.float64, "cpu", torch.float64, 32, double_quant, generator=rng
    )
    rng = make_rng(7, 0)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    assert torch.autograd.gradcheck(
        lambda x, A, B: qlora_linear(x, wq, A, B, 0.6, bias, dropout_p, rng), (x, A, B)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_3d_x_give_identical_results(device, rng):
    wq, _, A, B, bias = make_problem((6, 2), 48, 80, 8, bf16, device, generator=rng)
    base = torch.randn(6, 2, 160, generator=rng).to(bf16).to(device)
    strided = base[..., ::2]  # column stride 2
    permuted = base[..., :80].permute(1, 0, 2)  # rows not in memory order
    for xs in (strided, permuted):
        assert not xs.is_contiguous()
        y_nc = qlora_linear(xs, wq, A, B, 0.5, bias, 0.2, make_rng(5))
        y_c = qlora_linear(xs.contiguous(), wq, A, B, 0.5, bias, 0.2, make_rng(5))
        assert torch.equal(y_nc, y_c)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_transposed_is_dy_times_w(device, rng):
    # The dx kernel (same family, W never transposed in memory) with and without the LoRA term.
    wq, _, A, B, _ = make_problem((1,), 90, 150, 8, fp32, device, generator=rng)
    dy = torch.randn(13, 90).to(device)
    w = dense_weight(wq, fp32).double()
    out = qlora_matmul(dy, wq, transpose_w=True)
    torch.testing.assert_close(out.double().cpu(), dy.double().cpu() @ w, rtol=1e-5, atol=1e-4)
    u = ops.lora_down(dy, B.t(), 0.0, None)
    out2 = qlora_matmul(dy, wq, True, u, A.t(), 0.5)
    ref = dy.double().cpu() @ w + 0.5 * (dy.double().cpu() @ B.double().cpu()) @ A.double().cpu()
    torch.testing.assert_close(out2.double().cpu(), ref, rtol=1e-5, atol=1e-4)


# ---- the LoRA factor ops on their own (lora_down: s = drop(a)·fᵀ; lora_outer: scale · leftᵀ·drop(right)) ----
# Shapes for the CPU's many-row kernels: rows in 4-row groups with a tail, 256-row blocks with a partial
# 8-row chunk, column panels with tails that are not whole 4-column tiles, ranks with an 8-wide tail.
_FACTOR_CASES = [(1030, 1000, 24, bf16), (517, 260, 8, fp16), (300, 4096, 16, bf16), (259, 333, 64, fp32)]


def _factor_bound(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """|left|ᵀ·|right| in float64: the scale of an fp32 sum's rounding error, per output element."""
    return left.double().abs().t() @ right.double().abs()


@pytest.mark.parametrize("m,l,r,dtype", _FACTOR_CASES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_down_matches_float64(m, l, r, dtype, p, rng):
    x = torch.randn(m, l, generator=rng).to(dtype)
    A = torch.randn(r, l, generator=rng)
    seed = int(torch.randint(0, 2**40, (1,), generator=rng))
    keep = reference.dropout_keep(m, l, p, seed).double() * reference.dropout_keep_scale(p)
    xd = x.double() * keep
    for f in (A, A.t().contiguous().t()):  # A's rows contiguous, and the Bᵀ-like view (rank stride 1)
        s = torch.full((m, r), float("nan"))
        s.copy_(ops.lora_down(x, f, p, make_rng(seed) if p else None))
        ref = xd @ f.double().t()
        bound = _factor_bound(xd.t(), f.t())
        assert ((s.double() - ref).abs() <= 1e-5 * bound + 1e-30).all()


@pytest.mark.parametrize("m,big,r,dtype", _FACTOR_CASES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_outer_matches_float64(m, big, r, dtype, p, rng):
    small = torch.randn(m, r, generator=rng)  # u or s: fp32 [M, r]
    g = torch.randn(big, m, generator=rng).to(dtype).t()  # x or dy, and not contiguous (column stride M)
    seed = int(torch.randint(0, 2**40, (1,), generator=rng))
    keep = reference.dropout_keep(m, big, p, seed).double() * reference.dropout_keep_scale(p)
    # dA form: out [r, big] = 0.5 · smallᵀ·drop(g), the dropout on the long side
    dA = ops.lora_outer(small, g, 0.5, p, make_rng(seed) if p else None, fp32)
    gd = g.double() * keep
    ref = 0.5 * small.double().t() @ gd
    assert ((dA.double() - ref).abs() <= 1e-5 * _factor_bound(small, gd) + 1e-30).all()
    # dB form: out [big, r] = 0.5 · gᵀ·small (contiguous g too), rounded to bf16 once
    for gg in (g, g.contiguous()):
        dB = ops.lora_outer(gg, small, 0.5, 0.0, None, bf16)
        ref = 0.5 * gg.double().t() @ small.double()
        err = (dB.double() - ref).abs()
        assert (err <= 2**-8 * ref.abs() + 1e-5 * _factor_bound(gg, small) + 1e-30).all()


# ---- dropout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789012345, 5), (-7, 2**33 - 100), (2**62 - 1, 0)])
def test_dropout_mask_matches_reference(seed, offset):
    # offset 2^33 - 100 makes the counters cross a high-word boundary inside the tensor.
    mask = lora_dropout_mask(37, 301, 0.3, make_rng(seed, offset))
    assert torch.equal(mask, reference.dropout_keep(37, 301, 0.3, seed, offset))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_dropout_keep_rate_and_independence(p):
    rows, cols = 1000, 1000
    mask = lora_dropout_mask(rows, cols, p, make_rng(2024, 0)).double()
    n = rows * cols
    keep = 1.0 - reference.dropout_threshold(p) / 2**24
    sigma = (keep * (1 - keep) / n) ** 0.5
    assert abs(mask.mean().item() - keep) < 6 * sigma
    # neighbours along a row and down a column are uncorrelated
    for a, b in ((mask[:, :-1], mask[:, 1:]), (mask[:-1], mask[1:])):
        a, b = a.reshape(-1) - keep, b.reshape(-1) - keep
        corr = (a * b).mean().item() / (keep * (1 - keep))
        assert abs(corr) < 6 / n**0.5


def test_dropout_offset_shifts_the_counter():
    rng0, rng1 = make_rng(99, 0), make_rng(99, 50)
    m0 = lora_dropout_mask(3, 50, 0.5, rng0)
    m1 = lora_dropout_mask(2, 50, 0.5, rng1)
    assert torch.equal(m0[1:], m1)
    assert not torch.equal(
        lora_dropout_mask(4, 64, 0.5, make_rng(1)), lora_dropout_mask(4, 64, 0.5, make_rng(2))
    )


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_same_mask_in_forward_and_backward(device, rng):
    wq, x, A, B, _ = make_problem((8,), 32, 64, 4, fp32, device, generator=rng, bias=False)
    p, rng = 0.5, make_rng(31337, 9)
    mask = lora_dropout_mask(8, 64, p, rng).to(device)
    keep_scale = reference.dropout_keep_scale(p)
    y, s = ops.qlora_linear(
        x,
        *wq.op_args(),
        A,
        B,
        None,
        1.0,
        p,
        rng,
    )
    torch.testing.assert_close(s, (x * mask * keep_scale) @ A.t(), rtol=1e-5, atol=1e-5)
    # dx: the LoRA part is exactly zero wherever the mask dropped the element
    xr = x.clone().requires_grad_()
    Ar = A.clone().requires_grad_()
    qlora_linear(xr, wq, Ar, B, 1.0, None, p, rng).backward(torch.ones(8, 32, device=device))
    base = qlora_matmul(torch.ones(8, 32, device=device), wq, transpose_w=True)
    lora_part = xr.grad - base
    assert (lora_part[~mask] == 0).all() and (lora_part[mask] != 0).float().mean() > 0.9
    # dA uses drop(x) with the same mask
    u = torch.ones(8, 32, device=device) @ B
    torch.testing.assert_close(Ar.grad, u.t() @ (x * mask * keep_scale), rtol=1e-5, atol=1e-5)
    # same seed -> same output; another seed -> another output
    y2 = qlora_linear(x, wq, A, B, 1.0, None, p, make_rng(31337, 9))
    y3 = qlora_linear(x, wq, A, B, 1.0, None, p, make_rng(31338, 9))
    assert torch.equal(y, y2) and not torch.equal(y, y3)


def test_portable_path_matches_reference():
    # LORA_OPS_NO_AVX2=1 selects the portable kernels; run them in a fresh process.
    script = r"""
import torch, sys
sys.path.insert(0, 'tests')
from qlora_utils import make_problem, dense_weight
from lora_ops import reference
from lora_ops.ops.qlora import qlora_linear, qlora_matmul, make_rng
for dtype, m in ((torch.float32, 17), (torch.bfloat16, 2), (torch.float16, 9)):
    wq, x, A, B, b = make_problem((m,), 70, 300, 8, dtype, 'cpu', seed=m)
    w = dense_weight(wq, dtype)
    y = qlora_linear(x, wq, A, B, 0.5, b, 0.2, make_rng(3))
    ref, _ = reference.qlora_linear(x, w, A, B, 0.5, b, 0.2, 3, 0)
    err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype], (dtype, err)
    dx = qlora_matmul(y, wq, transpose_w=True)
    refdx = y.double() @ w.double()
    assert (dx.double() - refdx).abs().max().item() / refdx.abs().max().item() < 1e-2
wq, x, A, B, b = make_problem((17,), 70, 300, 8, torch.float32, 'cpu', seed=17)
torch.save(qlora_linear(x, wq, A, B, 0.5, b), sys.argv[1])
"""
    out = os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"qlora_portable_{os.getpid()}.pt")
    run_script_in_fresh_process(script, [out], {"LORA_OPS_NO_AVX2": "1"}, timeout=120)
    y_portable = torch.load(out)
    os.remove(out)
    wq, x, A, B, b = make_problem((17,), 70, 300, 8, fp32, "cpu", seed=17)
    y = qlora_linear(x, wq, A, B, 0.5, b)
    torch.testing.assert_close(y_portable, y, rtol=1e-5, atol=1e-5)
    with open("/proc/cpuinfo") as f:
        has_avx2 = " avx2 " in f.read()
    if has_avx2:  # a different summation order proves the other code path ran
        assert not torch.equal(y_portable, y)


# ---- opcheck and torch.compile ---------------------------------------------------------------------
def _op_samples(device, rng):
    wq, x, A, B, bias = make_problem((3, 5), 40, 72, 4, bf16, device, generator=rng)
    wt = wq.op_args()
    rng = make_rng(77, 1)
    xg = x.clone().requires_grad_()
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
    s = ops.lora_down(x, A, 0.2, rng)
    dy = torch.randn(3, 5, 40).to(bf16).to(device)
    u = ops.lora_down(dy, B.t(), 0.0, None)
    return [
        (ops.qlora_linear, (xg, *wt, Ag, Bg, bias, 0.5, 0.2, rng)),
        (ops.qlora_linear, (x, *wt, A, B, None, 0.5, 0.0, None)),
        (ops.qlora_matmul, (x, *wt, False, s, B, 0.5, bias, 0.0, None)),
        (ops.qlora_matmul, (dy, *wt, True, u, A.t(), 0.5, None, 0.2, rng)),
        (ops.lora_down, (x, A, 0.2, rng)),
        (ops.lora_outer, (u, x, 0.5, 0.2, rng, torch.float32)),
        (ops.lora_outer, (dy, s, 0.5, 0.0, None, torch.float32)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, rng):
    for op, args in _op_samples(device, rng):
        torch.library.opcheck(op, args)
    torch.library.opcheck(ops.lora_dropout_mask, (5, 7, 0.3, make_rng(1)))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_forward_backward_matches_eager(device, rng):
    wq, x, A, B, bias = make_problem((4, 6), 48, 96, 8, fp32, device, generator=rng)
    rng = make_rng(4321, 0)

    def step(x, A, B):
        y = qlora_linear(x, wq, A, B, 0.5, bias, 0.25, rng)
        return (y * y).sum()

    def grads(fn):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        loss = fn(xs, As, Bs)
        loss.backward()
        return loss.detach(), xs.grad, As.grad, Bs.grad

    eager = grads(step)
    compiled = grads(torch.compile(step, fullgraph=True, backend="inductor"))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(rng):
    wq, x, A, B, bias = make_problem((4,), 32, 64, 4, bf16, "cpu", generator=rng)
    wt = wq.op_args()
    with pytest.raises(ValueError, match="features"):
        qlora_linear(torch.randn(4, 60).to(bf16), wq, A, B, 1.0)
    with pytest.raises(RuntimeError, match="not match the quantized weight"):  # w_meta vs the bytes
        ops.qlora_linear(torch.randn(4, 60).to(bf16), wt[0], [64, 32, 60], A[:, :60], B, None, 1.0, 0.0, None)
    with pytest.raises(ValueError, match=r"A must be \[r, K\]"):
        qlora_linear(x, wq, torch.randn(4, 65), B, 1.0)
    with pytest.raises(ValueError, match="rank mismatch"):
        qlora_linear(x, wq, A, torch.randn(32, 5), 1.0)
    with pytest.raises(ValueError, match="out_features"):
        qlora_linear(x, wq, A, torch.randn(31, 4), 1.0)
    with pytest.raises(ValueError, match="rank must be in"):
        qlora_linear(x, wq, torch.randn(300, 64), torch.randn(32, 300), 1.0)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        qlora_linear(torch.randint(0, 5, (4, 64)), wq, A, B, 1.0)
    with pytest.raises(TypeError, match="x's dtype"):
        ops.qlora_linear(x, *wt, A.double(), B, None, 1.0, 0.0, None)
    with pytest.raises(TypeError, match="x's dtype"):
        ops.qlora_linear(x, *wt, A, B, bias.to(torch.float16), 1.0, 0.0, None)
    with pytest.raises(ValueError, match="bias must be"):
        qlora_linear(x, wq, A, B, 1.0, torch.randn(31))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        qlora_linear(x, wq, A, B, 1.0, None, 1.0, make_rng(1))
    with pytest.raises(ValueError, match="needs rng"):
        ops.qlora_linear(x, *wt, A, B, None, 1.0, 0.5, None)
    with pytest.raises(TypeError, match="rng must be int64"):
        ops.qlora_linear(x, *wt, A, B, None, 1.0, 0.5, torch.zeros(2))
    with pytest.raises(ValueError, match="scale must be finite"):
        qlora_linear(x, wq, A, B, float("nan"))
    with pytest.raises(RuntimeError, match="move all inputs to one device"):
        qlora_linear(x, wq, A.to("meta"), B, 1.0)
    with pytest.raises(ValueError, match="dropout applies to the LoRA term only"):
        ops.qlora_matmul(x, *wt, False, None, None, 1.0, None, 0.5, make_rng(1))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU build and a GPU")
def test_mixed_devices_and_float64_on_cuda_raise():
    wq, x, A, B, _ = make_problem((4,), 32, 64, 4, bf16, "cuda", seed=41)
    wt = wq.op_args()
    with pytest.raises(RuntimeError, match="one device"):
        ops.qlora_linear(x, *wt, A.cpu(), B, None, 1.0, 0.0, None)
    with pytest.raises(TypeError, match="float64"):
        ops.qlora_linear(x.double(), *wt, A.double(), B.double(), None, 1.0, 0.0, None)
