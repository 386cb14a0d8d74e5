"""PagedAdamW against torch.optim.AdamW and against itself across paging backends and budgets."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import randn

from lora_ops import reference
from lora_ops.optim import PagedAdamW

# LoRA-like tensors (A [r, K], B [N, r]) plus odd sizes, so tensors share pages and span them.
SHAPES = [(8, 40), (40, 8), (8, 33), (33, 8), (57,), (3, 5), (130,)]
PAGE = 64  # elements per page in tests: the state above spans ~20 pages
TOL = {"atol": 1e-6, "rtol": 1e-5}  # fp32 params vs torch.optim.AdamW


def make_params(rng, device, dtype=torch.float32):
    return [randn(*s, generator=rng, dtype=dtype, device=device).requires_grad_() for s in SHAPES]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def two_groups(params):
    """Different lr / weight decay / betas per group."""
    return [
        {"params": params[:4], "lr": 3e-3, "weight_decay": 0.1},
        {"params": params[4:], "lr": 1e-2, "weight_decay": 0.0, "betas": (0.8, 0.99)},
    ]


def grads_for(params, step, seed, skip=()):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for i, p in enumerate(params):
        t = None if i in skip else torch.randn(p.shape, generator=g).to(p.dtype).to(p.device)
        out.append(t)
    return out


def run(opt, params, steps, seed, start=0, skip_fn=lambda s: ()):
    for s in range(start, start + steps):
        for p, g in zip(params, grads_for(params, s, seed, skip_fn(s))):
            p.grad = g
        opt.step()
    return opt


def assert_state_close(ours, theirs, params_a, params_b, exact=False):
    sa, sb = ours.state_dict()["state"], theirs.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert float(sa[k]["step"]) == float(sb[k]["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            a, b = sa[k][name].float().cpu(), sb[k][name].float().cpu()
            if exact:
                assert torch.equal(a, b), (k, name)
            else:
                torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(params_a, params_b):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.detach(), b.detach(), **TOL)


PAGINGS = {
    "resident": {"paging": "none"},
    "explicit_tiny": {"paging": "explicit", "page_size": PAGE, "state_budget_bytes": 2 * 8 * PAGE},
    "explicit_3": {"paging": "explicit", "page_size": PAGE, "state_budget_bytes": 3 * 8 * PAGE},
}


@pytest.mark.parametrize("paging", list(PAGINGS))
def test_matches_torch_adamw(device, rng, paging):
    params = make_params(rng, device)
    ref_params = clone_params(params)
    skip = lambda s: (1,) if s % 5 == 2 else ()
    ours = run(PagedAdamW(two_groups(params), **PAGINGS[paging]), params, 25, seed=1, skip_fn=skip)
    theirs = run(torch.optim.AdamW(two_groups(ref_params)), ref_params, 25, seed=1, skip_fn=skip)
    assert_state_close(ours, theirs, params, ref_params)
    if paging != "resident":
        assert ours.paging_backend == "explicit"


@pytest.mark.parametrize("budget_pages", [2, 3, 7])
def test_explicit_paging_bitwise_equals_resident(device, rng, budget_pages):
    params = make_params(rng, device)
    res_params = clone_params(params)
    skip = lambda s: (0, 5) if s % 3 == 1 else ()
    paged = PagedAdamW(two_groups(params), page_size=PAGE, state_budget_bytes=budget_pages * 8 * PAGE)
    resident = PagedAdamW(two_groups(res_params), page_size=PAGE, paging="none")
    run(paged, params, 21, seed=2, skip_fn=skip)
    run(resident, res_params, 21, seed=2, skip_fn=skip)
    assert paged.paging_backend == "explicit" and resident.paging_backend == "resident"
    assert paged.paging_totals.pages_in > paged.paging_stats.pages_total  # it really paged, every step
    assert_state_close(paged, resident, params, res_params, exact=True)


def test_paging_stats_cyclic_pattern(device, rng):
    params = make_params(rng, device)
    opt = PagedAdamW(params, page_size=PAGE, state_budget_bytes=4 * 8 * PAGE)
    run(opt, params, 1, seed=3)
    st = opt.paging_stats
    n, slots, page_bytes = st.pages_total, 4, 8 * PAGE
    assert (
        st.backend == "explicit"
        and st.budget_bytes == slots * page_bytes
        and st.state_bytes == n * page_bytes
    )
    assert (st.pages_updated, st.pages_in, st.pages_out, st.pages_resident) == (n, n, n - slots, slots)
    run(opt, params, 3, seed=3, start=1)
    st = opt.paging_stats  # resident pages go first, so only the others move: n - slots each way
    assert (st.pages_in, st.pages_out) == (n - slots, n - slots)
    assert (st.bytes_in, st.bytes_out) == ((n - slots) * page_bytes, (n - slots) * page_bytes)
    assert opt.paging_totals.pages_in == n + 3 * (n - slots)


@pytest.mark.parametrize(
    ("src", "dst"),
    [("explicit_tiny", "resident"), ("resident", "explicit_3"), ("explicit_3", "explicit_tiny")],
)
def test_state_dict_resume_across_backends(device, rng, src, dst):
    params = make_params(rng, device)
    opt = run(PagedAdamW(two_groups(params), **PAGINGS[src]), params, 10, seed=4)
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = clone_params(params)
    run(opt, params, 10, seed=4, start=10)  # not stopping
    resumed = PagedAdamW(two_groups(resumed_params), **PAGINGS[dst])
    resumed.load_state_dict(saved)
    run(resumed, resumed_params, 10, seed=4, start=10)
    assert_state_close(resumed, opt, resumed_params, params, exact=True)


def test_state_dict_layout_is_torch_adamw(rng):
    params = make_params(rng, "cpu")
    opt = run(PagedAdamW(two_groups(params), **PAGINGS["explicit_tiny"]), params, 3, seed=5)
    sd = opt.state_dict()
    ref_params = clone_params(params)
    ref = run(torch.optim.AdamW(two_groups(ref_params)), ref_params, 1, seed=5).state_dict()
    assert sd["state"][0].keys() == ref["state"][0].keys() == {"step", "exp_avg", "exp_avg_sq"}
    for i, p in enumerate(params):
        assert sd["state"][i]["exp_avg"].shape == p.shape and sd["state"][i]["exp_avg"].dtype == torch.float32
        assert sd["state"][i]["step"].dtype == torch.float32 and float(sd["state"][i]["step"]) == 3
    assert [g["params"] for g in sd["param_groups"]] == [g["params"] for g in ref["param_groups"]]


def test_state_dict_into_and_out_of_torch_adamw(device, rng):
    params = make_params(rng, device)
    # ours -> torch
    ours = run(PagedAdamW(two_groups(params), **PAGINGS["explicit_tiny"]), params, 10, seed=6)
    torch_params = clone_params(params)
    theirs = torch.optim.AdamW(two_groups(torch_params))
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    run(ours, params, 10, seed=6, start=10)
    run(theirs, torch_params, 10, seed=6, start=10)
    assert_state_close(ours, theirs, params, torch_params)
    # torch -> ours
    ours2_params = clone_params(torch_params)
    ours2 = PagedAdamW(two_groups(ours2_params), **PAGINGS["explicit_3"])
    ours2.load_state_dict(copy.deepcopy(theirs.state_dict()))
    run(theirs, torch_params, 10, seed=6, start=20)
    run(ours2, ours2_params, 10, seed=6, start=20)
    assert_state_close(ours2, theirs, ours2_params, torch_params)


def test_params_without_grads_are_skipped(device, rng):
    params = make_params(rng, device)
    frozen_before = params[2].detach().clone()
    skip = lambda s: (2,) + ((3,) if s < 2 else ())
    opt = run(PagedAdamW(params, **PAGINGS["explicit_tiny"]), params, 5, seed=7, skip_fn=skip)
    assert torch.equal(params[2].detach(), frozen_before)
    sd = opt.state_dict()["state"]
    assert 2 not in sd and float(sd[3]["step"]) == 3 and float(sd[0]["step"]) == 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_fp32_state(device, rng, dtype):
    params = make_params(rng, device, dtype)
    ref_p = [p.detach().cpu().clone() for p in params]
    ref_m = [torch.zeros(p.shape) for p in params]
    ref_v = [torch.zeros(p.shape) for p in params]
    opt = PagedAdamW(params, lr=1e-2, weight_decay=0.05, **PAGINGS["explicit_tiny"])
    for s in range(20):
        grads = grads_for(params, s, seed=8)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):
            ref_p[i], ref_m[i], ref_v[i] = reference.adamw_step_reference(
                ref_p[i],
                g.cpu(),
                ref_m[i],
                ref_v[i],
                lr=1e-2,
                beta1=0.9,
                beta2=0.999,
                weight_decay=0.05,
                eps=1e-8,
                step=s + 1,
            )
    sd = opt.state_dict()["state"]
    for i, p in enumerate(params):
        assert p.dtype == dtype and sd[i]["exp_avg"].dtype == torch.float32
        assert torch.equal(p.detach().cpu(), ref_p[i])
        assert torch.equal(sd[i]["exp_avg"], ref_m[i]) and torch.equal(sd[i]["exp_avg_sq"], ref_v[i])


def test_nan_inf_grads_like_torch(device, rng):
    params = make_params(rng, device)
    ref_params = clone_params(params)
    ours = PagedAdamW(params, **PAGINGS["explicit_tiny"])
    theirs = torch.optim.AdamW(ref_params)
    for s in range(6):
        grads = grads_for(params, s, seed=9)
        if s == 3:
            grads[0].view(-1)[5] = float("nan")
            grads[1].view(-1)[7] = float("inf")
            grads[4].view(-1)[0] = float("-inf")
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert params[0].isnan().any() and params[1].isnan().any()
    for a, b in zip(params, ref_params):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.detach(), b.detach(), equal_nan=True, **TOL)


def test_maximize_like_torch(device, rng):
    params = make_params(rng, device)
    ref_params = clone_params(params)
    ours = run(PagedAdamW(params, lr=1e-2, maximize=True, **PAGINGS["explicit_3"]), params, 20, seed=10)
    theirs = run(torch.optim.AdamW(ref_params, lr=1e-2, maximize=True), ref_params, 20, seed=10)
    assert_state_close(ours, theirs, params, ref_params)


def test_lr_scheduler_and_closure(device, rng):
    params = make_params(rng, device)
    ref_params = clone_params(params)
    ours = PagedAdamW(two_groups(params), **PAGINGS["explicit_tiny"])
    theirs = torch.optim.AdamW(two_groups(ref_params))
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(ours, T_max=20)
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=20)
    target = [randn(*p.shape, generator=rng, device=device) for p in params]
    for _ in range(20):
        for opt, ps in ((ours, params), (theirs, ref_params)):

            def closure(ps=ps, opt=opt):
                opt.zero_grad()
                loss = sum(((p - t) ** 2).sum() for p, t in zip(ps, target))
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert torch.is_tensor(loss) and loss.item() > 0
        sched_a.step()
        sched_b.step()
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] < 3e-3
    assert_state_close(ours, theirs, params, ref_params)
    ours.zero_grad()
    assert all(p.grad is None for p in params)


def test_add_param_group_after_steps(device, rng):
    params = make_params(rng, device)
    ref_params = clone_params(params)
    ours = PagedAdamW(params[:3], **PAGINGS["explicit_tiny"])
    theirs = torch.optim.AdamW(ref_params[:3])
    run(ours, params[:3], 5, seed=11)
    run(theirs, ref_params[:3], 5, seed=11)
    ours.add_param_group({"params": params[3:], "lr": 5e-3})
    theirs.add_param_group({"params": ref_params[3:], "lr": 5e-3})
    run(ours, params, 5, seed=12)
    run(theirs, ref_params, 5, seed=12)
    assert_state_close(ours, theirs, params, ref_params)


def test_rejections(rng):
    p = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        PagedAdamW([p], amsgrad=True)
    with pytest.raises(TypeError, match="complex"):
        PagedAdamW([torch.randn(4, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        PagedAdamW([torch.randn(4, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="paging"):
        PagedAdamW([p], paging="magic")
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW([p], betas=(1.0, 0.9))
    opt = PagedAdamW([p])
    p.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    params = make_params(rng, "cpu")
    opt = PagedAdamW(params, page_size=PAGE, state_budget_bytes=8 * PAGE)  # one page: no double buffering
    for q in params:
        q.grad = torch.randn_like(q)
    with pytest.raises(ValueError, match="at least 2"):
        opt.step()
    ams = torch.optim.AdamW([torch.randn(3, requires_grad=True)], amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        PagedAdamW([torch.randn(3, requires_grad=True)]).load_state_dict(ams.state_dict())


def test_managed_on_cpu_parameters_is_a_clear_error(rng):
    params = make_params(rng, "cpu")
    with pytest.raises(ValueError, match="paging='managed' .*needs CUDA parameters, got one on cpu"):
        PagedAdamW(params, paging="managed", page_size=PAGE)
    opt = PagedAdamW(params[:1], page_size=PAGE)
    opt._paging = "managed"  # a later group is checked too
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        opt.add_param_group({"params": params[1:]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_managed_on_cuda_bitwise_equals_resident(rng):
    params = make_params(rng, "cuda")
    ref_params = clone_params(params)
    opt = run(PagedAdamW(two_groups(params), paging="managed", page_size=PAGE), params, 12, seed=14)
    ref = run(PagedAdamW(two_groups(ref_params), paging="none", page_size=PAGE), ref_params, 12, seed=14)
    if opt.paging_backend == "managed":
        assert opt.paging_stats.pages_in == opt.paging_stats.pages_total
    assert_state_close(opt, ref, params, ref_params, exact=True)


@pytest.mark.parametrize("budget_pages", [2, 5])
def test_explicit_paging_random_subsets_bitwise(device, rng, budget_pages):
    """Each step a random subset of parameters has gradients (pages needed change every step)."""
    params = make_params(rng, device)
    res_params = clone_params(params)
    pick = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    subsets = [
        tuple(i for i in range(len(SHAPES)) if torch.rand(1, generator=pick).item() < 0.5) for _ in range(30)
    ]
    paged = PagedAdamW(two_groups(params), page_size=PAGE, state_budget_bytes=budget_pages * 8 * PAGE)
    resident = PagedAdamW(two_groups(res_params), page_size=PAGE, paging="none")
    run(paged, params, 30, seed=15, skip_fn=lambda s: subsets[s])
    run(resident, res_params, 30, seed=15, skip_fn=lambda s: subsets[s])
    assert paged.paging_stats.pages_resident <= budget_pages
    assert_state_close(paged, resident, params, res_params, exact=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("paging", ["explicit_tiny", "resident", "managed"])
def test_cuda_step_never_synchronizes(rng, paging):
    """After the first step (which sizes the pool from free memory), a step issues no device sync."""
    params = make_params(rng, "cuda")
    kw = {"paging": "managed", "page_size": PAGE} if paging == "managed" else PAGINGS[paging]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # managed may fall back on this GPU
        opt = run(PagedAdamW(params, **kw), params, 1, seed=16)
    grads = [grads_for(params, s, seed=16) for s in range(1, 4)]  # host->device copies may sync: before
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
