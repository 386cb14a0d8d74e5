"""The fused multi-tensor AdamW op (torch.ops.lora_ops.adamw_step_) against the reference, bit for bit,
and its error paths."""

from __future__ import annotations

import pytest
import torch
from conftest import randn

from lora_ops import reference
from lora_ops.ops.adamw import adamw_step_, adamw_step_pages_, hparams_row

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(numels, dtype, device, rng):
    params = [randn(n, generator=rng, dtype=dtype, device=device) for n in numels]
    grads = [randn(n, generator=rng, dtype=dtype, device=device) for n in numels]
    exp_avgs = [randn(n, generator=rng, device=device, scale=0.1) for n in numels]
    exp_avg_sqs = [randn(n, generator=rng, device=device, scale=0.1).square() for n in numels]
    return params, grads, exp_avgs, exp_avg_sqs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # 1 - beta1 < 0.5 and >= 0.5: both lerp branches
def test_matches_reference_bitwise(device, rng, dtype, maximize, beta1):
    # Odd sizes (tails of the 16-byte vector path), one tensor spanning several CPU work blocks.
    numels = [1, 3, 8, 17, 255, 4096 + 5, 40_003]
    params, grads, ms, vs = _case(numels, dtype, device, rng)
    hp_rows, expected = [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
        kw = {
            "lr": 1e-2 * (i + 1),
            "beta1": beta1,
            "beta2": 0.999,
            "weight_decay": 0.1 * (i % 3),
            "eps": 1e-8,
            "step": i + 1,
        }
        hp_rows.append(hparams_row(**kw, maximize=maximize))
        expected.append(
            reference.adamw_step_reference(p.cpu(), g.cpu(), m.cpu(), v.cpu(), **kw, maximize=maximize)
        )
    adamw_step_(params, grads, ms, vs, torch.tensor(hp_rows, dtype=torch.float64))
    for (ep, em, ev), p, m, v in zip(expected, params, ms, vs):
        assert torch.equal(p.cpu(), ep)
        assert torch.equal(m.cpu(), em)
        assert torch.equal(v.cpu(), ev)


def test_close_to_torch_adamw_one_step(device, rng):
    p = randn(10_001, generator=rng, device=device)
    g = randn(10_001, generator=rng, device=device)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ref = p.clone().requires_grad_()
    ref.grad = g.clone()
    torch.optim.AdamW([ref], lr=3e-3, weight_decay=0.05).step()
    adamw_step_(
        [p], [g], [m], [v], torch.tensor([hparams_row(3e-3, 0.9, 0.999, 0.05, 1e-8, 1, False)]).double()
    )
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-5)


def test_nan_inf_propagate_like_reference(device, rng):
    p = randn(64, generator=rng, device=device)
    g = randn(64, generator=rng, device=device)
    g[3], g[10], g[20] = float("nan"), float("inf"), float("-inf")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    kw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01, "eps": 1e-8, "step": 1}
    ep, _em, ev = reference.adamw_step_reference(p.cpu(), g.cpu(), m.cpu(), v.cpu(), **kw)
    adamw_step_([p], [g], [m], [v], torch.tensor([hparams_row(**kw, maximize=False)], dtype=torch.float64))
    assert torch.equal(p.isnan().cpu(), ep.isnan()) and p.isnan()[[3, 10, 20]].all()
    torch.testing.assert_close(p.cpu(), ep, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v.cpu(), ev, rtol=0, atol=0, equal_nan=True)


def test_empty_list_and_empty_tensor(device):
    adamw_step_([], [], [], [], torch.empty(0, 7, dtype=torch.float64))
    z = torch.empty(0, device=device)
    adamw_step_(
        [z],
        [z.clone()],
        [z.clone()],
        [z.clone()],
        torch.tensor([hparams_row(1e-3, 0.9, 0.99, 0, 1e-8, 1, 0)]).double(),
    )


def _good(device="cpu", n=8):
    p = torch.randn(n, device=device)
    return (
        [p],
        [torch.randn(n, device=device)],
        [torch.zeros(n, device=device)],
        [torch.zeros(n, device=device)],
    )


HP = torch.tensor([hparams_row(1e-3, 0.9, 0.999, 0.01, 1e-8, 1, False)], dtype=torch.float64)


def test_errors():
    p, g, m, v = _good()
    with pytest.raises(ValueError, match="same length"):
        adamw_step_(p, g + g, m, v, HP)
    with pytest.raises(TypeError, match="float64"):
        adamw_step_(p, g, m, v, HP.float())
    with pytest.raises(ValueError, match=r"\[len\(params\), 7\]"):
        adamw_step_(p, g, m, v, HP[:, :6])
    with pytest.raises(ValueError, match="step must be >= 1"):
        adamw_step_(p, g, m, v, torch.tensor([hparams_row(1e-3, 0.9, 0.999, 0, 1e-8, 0, False)]).double())
    with pytest.raises(ValueError, match="betas"):
        adamw_step_(p, g, m, v, torch.tensor([hparams_row(1e-3, 1.0, 0.999, 0, 1e-8, 1, False)]).double())
    with pytest.raises(TypeError, match="grads\\[0\\] must be Float"):
        adamw_step_(p, [g[0].double()], m, v, HP)
    with pytest.raises(TypeError, match="exp_avgs\\[0\\] must be Float"):
        adamw_step_(p, g, [m[0].half()], v, HP)
    with pytest.raises(RuntimeError, match="elements"):
        adamw_step_(p, g, [torch.zeros(9)], v, HP)
    with pytest.raises(RuntimeError, match="contiguous"):
        adamw_step_([torch.randn(8, 2).t()], [torch.randn(2, 8)], [torch.zeros(16)], [torch.zeros(16)], HP)
    with pytest.raises(TypeError, match="complex"):
        adamw_step_(
            [torch.randn(4, dtype=torch.complex64)], [torch.randn(4, dtype=torch.complex64)], m, v, HP
        )
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        adamw_step_([torch.randn(8).double()], [torch.randn(8).double()], m, v, HP)
    with pytest.raises(TypeError, match="sparse"):
        adamw_step_(p, [g[0].to_sparse()], m, v, HP)


def test_opcheck(rng):
    params, grads, ms, vs = _case([5, 33], torch.float32, "cpu", rng)
    hp = torch.tensor([hparams_row(1e-3, 0.9, 0.999, 0.01, 1e-8, 3, False)] * 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lora_ops.adamw_step_.default, (params, grads, ms, vs, hp))


def test_pages_form_matches_list_form(device, rng):
    """adamw_step_pages_ on (param piece -> page slot) rows == adamw_step_ on the equivalent views."""
    numels, page = [100, 37, 260], 64
    params, grads, _, _ = _case(numels, torch.bfloat16, device, rng)
    pages = randn(9, 2, page, generator=rng, device=device, scale=0.1).abs()
    # (param, begin, end, slot, offset): pieces of 16-aligned offsets scattered over slots
    pieces = torch.tensor(
        [[0, 0, 64, 3, 0], [0, 64, 100, 0, 16], [1, 0, 37, 5, 0], [2, 0, 64, 8, 0], [2, 64, 128, 1, 0],
         [2, 128, 192, 2, 0], [2, 192, 256, 4, 0], [2, 256, 260, 6, 48]],
        dtype=torch.int64,
    )  # fmt: skip
    hp = torch.tensor(
        [hparams_row(1e-2 * (i + 1), 0.9, 0.99, 0.1, 1e-8, 2, i == 1) for i in range(3)]
    ).double()
    before = [p.clone() for p in params]
    params2, grads2, pages2 = [p.clone() for p in params], [g.clone() for g in grads], pages.clone()
    views = {k: [] for k in ("p", "g", "m", "v", "hp")}
    for i, b, e, slot, off in pieces.tolist():
        views["p"].append(params2[i].view(-1)[b:e])
        views["g"].append(grads2[i].view(-1)[b:e])
        views["m"].append(pages2[slot, 0, off : off + e - b])
        views["v"].append(pages2[slot, 1, off : off + e - b])
        views["hp"].append(hp[i])
    adamw_step_(views["p"], views["g"], views["m"], views["v"], torch.stack(views["hp"]))
    adamw_step_pages_(params, grads, pages, pieces, hp)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert torch.equal(pages, pages2)
    assert all(not torch.equal(a, b) for a, b in zip(params, before))  # every parameter was updated


def test_pages_form_bounds_checked():
    p, g = [torch.randn(10)], [torch.randn(10)]
    pages = torch.zeros(2, 2, 16)
    hp = torch.tensor([hparams_row(1e-3, 0.9, 0.999, 0, 1e-8, 1, False)], dtype=torch.float64)

    def call(row, pages=pages):
        adamw_step_pages_(p, g, pages, torch.tensor([row], dtype=torch.int64), hp)

    with pytest.raises(ValueError, match="names params"):
        call([1, 0, 10, 0, 0])
    with pytest.raises(ValueError, match="outside params"):
        call([0, 0, 11, 0, 0])
    with pytest.raises(ValueError, match="does not fit"):
        call([0, 0, 10, 2, 0])
    with pytest.raises(ValueError, match="does not fit"):
        call([0, 0, 10, 0, 7])
    with pytest.raises(ValueError, match=r"\[n_slots, 2, page_elems\]"):
        call([0, 0, 10, 0, 0], pages=torch.zeros(2, 3, 16))
    with pytest.raises(TypeError, match="int64"):
        adamw_step_pages_(p, g, pages, torch.tensor([[0, 0, 10, 0, 0]], dtype=torch.int32), hp)
    call([0, 0, 10, 1, 6])  # fits exactly
    assert pages[1, 0, 6:16].abs().sum() > 0 and pages[0].abs().sum() == 0


def test_pages_form_opcheck(rng):
    params, grads, _, _ = _case([40], torch.float32, "cpu", rng)
    pages = randn(2, 2, 32, generator=rng, scale=0.1).abs()
    pieces = torch.tensor([[0, 0, 32, 1, 0], [0, 32, 40, 0, 16]], dtype=torch.int64)
    hp = torch.tensor([hparams_row(1e-3, 0.9, 0.999, 0.01, 1e-8, 3, False)], dtype=torch.float64)
    torch.library.opcheck(torch.ops.lora_ops.adamw_step_pages_.default, (params, grads, pages, pieces, hp))
