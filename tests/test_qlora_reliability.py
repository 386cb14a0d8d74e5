"""Fused QLoRA linear: the wrong-answer paths of issue 15 (float64 scale, NaN under dropout, long
backward reductions) and the clear errors it asked for."""

import pytest
import torch
from qlora_utils import dense_weight, make_problem

import lora_ops
from lora_ops import reference
from lora_ops.ops.qlora import make_rng, qlora_linear

_ops = torch.ops.lora_ops


def test_float64_uses_a_float64_scale(rng):
    # 16/7 is not a float32: a float32 scale errs by ~1e-7 relative in the LoRA term.
    wq, x, A, B, bias = make_problem((5,), 24, 64, 4, torch.float64, "cpu", generator=rng)
    x, A, B = x.requires_grad_(), A.double().requires_grad_(), (B.double() * 10).requires_grad_()
    scale = 16 / 7
    y = qlora_linear(x, wq, A, B, scale, bias)
    w = dense_weight(wq, torch.float64)
    x_ref, A_ref, B_ref = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y_ref, _ = reference.qlora_linear(x_ref, w, A_ref, B_ref, scale, bias)
    assert (y - y_ref).abs().max().item() <= 1e-12 * max(1.0, y_ref.abs().max().item())
    dy = torch.randn(y.shape, generator=rng, dtype=torch.float64)
    y.backward(dy)
    y_ref.backward(dy)
    for ours, ref, name in ((x.grad, x_ref.grad, "dx"), (A.grad, A_ref.grad, "dA"), (B.grad, B_ref.grad, "dB")):
        err = (ours - ref).abs().max().item()
        assert err <= 1e-12 * max(1.0, ref.abs().max().item()), f"{name}: {err}"


@pytest.mark.parametrize("r", [4, 8])  # r = 8: lora_outer's panel kernel (ranks in whole vectors)
def test_dropout_propagates_nan_like_torch(rng, r):
    # torch's dropout is x * mask / (1 - p): a NaN at a dropped position still reaches s, y, dA.
    wq, x, A, B, _ = make_problem((6,), 16, 64, r, torch.float32, "cpu", bias=False, generator=rng)
    p, r = 0.5, make_rng(7)
    keep = lora_ops.lora_dropout_mask(6, 64, p, r)
    i, j = (~keep).nonzero()[0].tolist()
    x[i, j] = float("nan")
    A, B = A.requires_grad_(), B.requires_grad_()
    y = qlora_linear(x, wq, A, B, 2.0, None, p, r)
    y.backward(torch.ones_like(y))
    # the reference (torch semantics): NaN in every dA entry of column j, as uᵀ·drop(x) multiplies it in
    x_ref, A_ref, B_ref = x.clone(), A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    y_ref, _ = reference.qlora_linear(x_ref, dense_weight(wq, torch.float32), A_ref, B_ref, 2.0, None, p, 7)
    y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(torch.isnan(A.grad), torch.isnan(A_ref.grad))
    assert torch.isnan(A.grad[:, j]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


@pytest.mark.parametrize("m", [1 << 16, 1 << 20])
def test_long_backward_reductions_are_as_accurate_as_torch(rng, m):
    # dA / dB reduce over M rows; all-positive data makes a sequential fp32 sum drift like M * eps.
    left = torch.rand(m, 4, generator=rng) + 0.5
    right = torch.rand(m, 16, generator=rng) + 0.5
    ours = _ops.lora_outer(left, right, 1.0, 0.0, None, torch.float32)
    exact = left.double().t() @ right.double()
    plain = left.t() @ right  # torch's own fp32 matmul on the same data
    rel = lambda t: ((t.double() - exact).abs().max() / exact.abs().max()).item()  # noqa: E731
    assert rel(ours) <= 2 * rel(plain) + 2e-7, f"ours {rel(ours):.3g}, torch {rel(plain):.3g}"


def test_long_backward_through_autograd(rng):
    m = 1 << 17
    wq, x, A, B, _ = make_problem((m,), 8, 32, 4, torch.float32, "cpu", bias=False, generator=rng)
    x = x.abs() + 0.5  # same-sign terms: the worst case for a long sequential sum
    A, B = A.requires_grad_(), B.requires_grad_()
    y = qlora_linear(x, wq, A, B, 1.0)
    dy = torch.rand(y.shape, generator=rng) + 0.5
    y.backward(dy)
    A64, B64 = A.detach().double(), B.detach().double()
    u = dy.double() @ B64
    dA_exact = u.t() @ x.double()
    dB_exact = dy.double().t() @ (x.double() @ A64.t())
    dA_torch = (dy @ B.detach()).t() @ x
    dB_torch = dy.t() @ (x @ A.detach().t())
    for ours, exact, plain, name in ((A.grad, dA_exact, dA_torch, "dA"), (B.grad, dB_exact, dB_torch, "dB")):
        scale = exact.abs().max()
        err, err_plain = ((ours.double() - exact).abs().max() / scale).item(), ((plain.double() - exact).abs().max() / scale).item()
        assert err <= 2 * err_plain + 2e-7, f"{name}: ours {err:.3g}, torch {err_plain:.3g}"


def test_zero_dim_x_is_a_clear_error():
    wq, _, A, B, _ = make_problem((2,), 8, 32, 4, torch.float32, "cpu", seed=3)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        qlora_linear(torch.tensor(1.0), wq, A, B, 1.0)
    layer = lora_ops.QLoRALinear(32, 8, 4, 8)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        layer(torch.tensor(1.0))
