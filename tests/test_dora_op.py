"""The fused DoRA linear (lora_ops.ops.dora) against the float64 DoRA oracle (lora_ops.reference)
with the suite's error rule: y, dx, dA, dB, dm on odd shapes, ranks 1-256, 3-D x, dropout, 16-bit
adapters; the norm identity under cancellation; the base-norm cache; no dense weight; opcheck; compile."""

from __future__ import annotations

import pytest
import torch
from qlora_utils import DEVICES, assert_close_rule, dense_weight, make_problem

from lora_ops import reference
from lora_ops.nf4 import quantize_nf4
from lora_ops.ops import dora as dora_ops
from lora_ops.ops.qlora import make_rng


def _magnitude(wq, A, B, scale, g, dtype=torch.float32):
    """A magnitude near the initial one (the weight norm), perturbed so that g = m/n differs per row."""
    n = reference.dora_weight_norm(dense_weight(wq, torch.float32), A.cpu(), B.cpu(), scale)
    return (n * (1 + 0.3 * torch.randn(n.shape, generator=g, dtype=torch.float64))).to(dtype).to(A.device)


def _plain(x, w, A, B, m, scale, bias, p, seed, offset):
    """Plain PyTorch in x's dtype, PEFT 0.21's DoRA arithmetic and casting (the LoRA branch and the norm
    in the adapter dtype, base result in x's dtype): the error yardstick."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    base = x2 @ w.to(x.dtype).t()
    xa = x2.to(A.dtype)
    weight = w.to(A.dtype)
    norm = torch.linalg.vector_norm(weight + scale * (B @ A).detach(), dim=1).detach()
    g = m / norm
    if p > 0:
        xd = reference.lora_dropout(xa, p, seed, offset)
        base_d = xd @ weight.t()
    else:
        xd, base_d = xa, base
    y = base + (g - 1) * base_d + g * ((xd @ A.t()) @ B.t()) * scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def _grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


CASES = [
    # m_shape, n, k, r, dtype, adapter dtype, dropout p
    ((5,), 37, 53, 1, torch.float32, torch.float32, 0.0),
    ((3, 7), 65, 129, 16, torch.bfloat16, torch.float32, 0.0),
    ((2, 3, 5), 33, 71, 8, torch.bfloat16, torch.float32, 0.3),
    ((9,), 31, 47, 256, torch.float32, torch.float32, 0.1),
    ((4, 6), 47, 96, 32, torch.float16, torch.float32, 0.0),
    ((17,), 64, 64, 4, torch.bfloat16, torch.bfloat16, 0.0),
    ((1,), 129, 257, 2, torch.float16, torch.float16, 0.2),
    ((2, 31), 96, 130, 64, torch.float32, torch.float32, 0.0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-r{c[3]}-{c[4]}-{c[5]}-p{c[6]}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_forward_backward_match_float64(device, rng, case, with_bias, monkeypatch):
    m_shape, n, k, r, dtype, adt, p = case
    if with_bias:  # the [M, N] passes and the base-norm decode in chunks of a few rows (ragged last one)
        monkeypatch.setattr(dora_ops, "_COL_CHUNK_ELEMENTS", 3 * n)
        monkeypatch.setattr(dora_ops, "_ROW_CHUNK_ELEMENTS", 5 * k)
        dora_ops.clear_base_norm_cache()
    wq, x, A, B, bias = make_problem(m_shape, n, k, r, dtype, device, adapter_dtype=adt, bias=with_bias,
                                     generator=rng)
    scale = 1.7
    m = _magnitude(wq, A, B, scale, rng)
    seed, offset = int(torch.randint(0, 2**40, (1,), generator=rng)), 3
    dy = torch.randn(*m_shape, n, generator=rng).to(dtype).to(device)
    w_mm, w_norm = dense_weight(wq, dtype).to(device), dense_weight(wq, torch.float32).to(device)

    ours, (dx, dA, dB, dm) = _grads(
        lambda x_, A_, B_, m_: dora_ops.dora_linear(x_, wq, A_, B_, m_, scale, bias, p,
                                                    make_rng(seed, offset)),
        [x, A, B, m], dy)
    ref, (rdx, rdA, rdB, rdm) = _grads(
        lambda x_, A_, B_, m_: reference.dora_linear(x_, w_mm, A_, B_, m_, scale, bias, p, seed, offset,
                                                          w_norm=w_norm),
        [x, A, B, m], dy)
    plain, (pdx, pdA, pdB, pdm) = _grads(
        lambda x_, A_, B_, m_: _plain(x_, w_mm, A_, B_, m_, scale, bias, p, seed, offset), [x, A, B, m], dy)

    assert ours.dtype == dtype and dx.dtype == dtype and dm.dtype == m.dtype
    assert dA.dtype == adt and dB.dtype == adt
    assert_close_rule(ours, ref, plain, dtype, "y")
    assert_close_rule(dx, rdx, pdx, dtype, "dx")
    assert_close_rule(dA, rdA, pdA, adt, "dA")
    assert_close_rule(dB, rdB, pdB, adt, "dB")
    assert_close_rule(dm, rdm, pdm, dtype, "dm")


def test_dropout_changes_output_and_follows_the_rng(rng):
    wq, x, A, B, _ = make_problem((6,), 20, 33, 4, torch.float32, "cpu", bias=False, generator=rng)
    m = _magnitude(wq, A, B, 1.0, rng)
    y0 = dora_ops.dora_linear(x, wq, A, B, m, 1.0)
    y1 = dora_ops.dora_linear(x, wq, A, B, m, 1.0, None, 0.5, make_rng(5, 0))
    y2 = dora_ops.dora_linear(x, wq, A, B, m, 1.0, None, 0.5, make_rng(5, 0))
    y3 = dora_ops.dora_linear(x, wq, A, B, m, 1.0, None, 0.5, make_rng(6, 0))
    assert torch.equal(y1, y2) and not torch.equal(y0, y1) and not torch.equal(y1, y3)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_identity_under_cancellation(device, rng):
    """Rows of W + s·B·A that (almost) cancel: B fitted so that s·B·A ≈ -W on half of the rows (A has
    full column rank). The identity ‖W‖² + 2s·B·(W·Aᵀ) + s²·B·(A·Aᵀ)·Bᵀ then subtracts nearly equal
    numbers; its error must stay within 2x that of the plain float32 dense computation."""
    n, k, r, scale = 40, 24, 32, 0.5
    w = torch.randn(n, k, generator=rng) * torch.exp(torch.randn(n, 1, generator=rng))
    wq = quantize_nf4(w, 64, True)
    wd = dense_weight(wq, torch.float32).double()
    A = torch.randn(r, k, generator=rng) / k**0.5
    B = torch.randn(n, r, generator=rng)
    fit = -(torch.linalg.pinv(A.double()).t() @ wd.t()).t() / scale  # s·fit·A = -W exactly in float64
    rows = torch.randperm(n, generator=rng)[: n // 2]
    B[rows] = fit[rows].float()
    noise = 10.0 ** torch.empty(n // 2).uniform_(-6, -1, generator=rng)
    B[rows] += noise[:, None] * torch.randn(n // 2, r, generator=rng) * B[rows].abs().mean()
    ref = reference.dora_weight_norm(wd, A, B, scale)
    assert ref[rows].max() < 0.1 * ref.max()  # real cancellation
    w_args, meta = wq.to(device).op_args()
    ours = dora_ops.weight_norm_args(w_args, meta, A.to(device), B.to(device), scale).cpu()
    plain = torch.linalg.vector_norm(wd.float() + scale * (B @ A), dim=1)
    # relative per row (the cancelled rows are the small ones), the suite's max rule over rows
    rel, rel_plain = (ours - ref).abs() / ref, (plain.double() - ref).abs() / ref
    assert rel.max() <= 2 * rel_plain.max() + 1e-12, (rel.max().item(), rel_plain.max().item())
    assert rel[rows].max() <= 2 * rel_plain[rows].max() + 1e-12


def test_base_norms_from_codes_and_cache(rng):
    for n, k, bs, dq in [(37, 53, 64, True), (8, 4096, 256, False), (300, 7, 32, True)]:
        wq = quantize_nf4(torch.randn(n, k, generator=rng), bs, dq)
        exact = dense_weight(wq, torch.float32).double().square().sum(dim=1)
        sq = dora_ops.base_row_sq_norms(wq)
        torch.testing.assert_close(sq, exact, rtol=1e-13, atol=0)
    # the cache follows the bytes: an in-place write to the codes (version counter) gives fresh norms
    wq = quantize_nf4(torch.randn(16, 40, generator=rng), 64, True)
    first = dora_ops.base_row_sq_norms(wq)
    assert torch.equal(dora_ops.base_row_sq_norms(wq), first)
    wq.packed[:20] ^= 0x77
    second = dora_ops.base_row_sq_norms(wq)
    assert not torch.equal(second, first)
    exact = dense_weight(wq, torch.float32).double().square().sum(1)
    torch.testing.assert_close(second, exact, rtol=1e-13, atol=0)
    # ... and so does a write to the absmax
    wq.absmax[:1] ^= 9
    third = dora_ops.base_row_sq_norms(wq)
    exact = dense_weight(wq, torch.float32).double().square().sum(1)
    torch.testing.assert_close(third, exact, rtol=1e-13, atol=0)
    assert not torch.equal(third, second)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_never_builds_a_dense_weight(rng, p):
    """Forward + backward run the fused ops only: no dequantize, and no [N, K]-sized tensor."""
    n, k = 96, 160
    wq, x, A, B, bias = make_problem((12,), n, k, 8, torch.bfloat16, "cpu", generator=rng)
    m = _magnitude(wq, A, B, 2.0, rng).requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    x.requires_grad_(True)
    dora_ops.base_row_sq_norms(wq)  # the cached constant (computed once per weight)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        y = dora_ops.dora_linear(x, wq, A, B, m, 2.0, bias, p)
        y.float().sum().backward()
    names = [e.name for e in prof.events()]
    fused = {"lora_ops::qlora_matmul", "lora_ops::lora_down", "lora_ops::lora_outer"}
    assert fused <= set(names) and ("lora_ops::qlora_linear" in names) == (p == 0)
    assert not any("dequantize" in nm for nm in names)
    for e in prof.events():
        for shp in e.input_shapes or []:
            dense = isinstance(shp, list) and len(shp) == 2 and sorted(shp) == sorted([n, k])
            assert not dense, (e.name, shp)


def test_bad_magnitude_is_named(rng):
    wq, x, A, B, _ = make_problem((3,), 16, 32, 2, torch.float32, "cpu", generator=rng)
    with pytest.raises(ValueError, match=r"magnitude must have shape \[16\]"):
        dora_ops.dora_linear(x, wq, A, B, torch.ones(15), 1.0)
    with pytest.raises(TypeError, match="magnitude must be float32"):
        dora_ops.dora_linear(x, wq, A, B, torch.ones(16, dtype=torch.int32), 1.0)
    with pytest.raises(TypeError, match="magnitude must be a tensor"):
        dora_ops.dora_linear(x, wq, A, B, [1.0] * 16, 1.0)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck(rng, p):
    wq, x, A, B, bias = make_problem((2, 5), 24, 40, 4, torch.float32, "cpu", generator=rng)
    m = _magnitude(wq, A, B, 1.5, rng)
    w, meta = wq.op_args()
    base_sq = dora_ops.base_row_sq_norms(wq)
    x.requires_grad_(True)
    A.requires_grad_(True)
    m.requires_grad_(True)
    rng_t = make_rng(11, 0) if p else None
    torch.library.opcheck(dora_ops.dora_linear_op, (x, w, meta, A, B, m, base_sq, bias, 1.5, p, rng_t))
    torch.library.opcheck(dora_ops.nf4_row_sq_norms, (w, meta))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compile_fullgraph_matches_eager(rng, p):
    wq, x, A, B, bias = make_problem((3, 4), 40, 72, 8, torch.bfloat16, "cpu", generator=rng)
    m = _magnitude(wq, A, B, 0.8, rng)
    w, meta = wq.op_args()
    dy = torch.randn(3, 4, 40, generator=rng).to(torch.bfloat16)

    def step(x_, A_, B_, m_):
        rng_t = make_rng(21, 0) if p else None
        return dora_ops.dora_linear_args(x_, w, meta, A_, B_, m_, 0.8, bias, p, rng_t)

    eager, eg = _grads(step, [x, A, B, m], dy)
    compiled, cg = _grads(torch.compile(step, fullgraph=True), [x, A, B, m], dy)
    assert torch.equal(eager, compiled)
    for a, b in zip(eg[:3], cg[:3]):
        assert torch.equal(a, b)
    # dm: the backward's column sums are traced and compiled by Inductor, which may order them differently
    torch.testing.assert_close(eg[3], cg[3], rtol=1e-6, atol=0)
