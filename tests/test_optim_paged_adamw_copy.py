"""PagedAdamW survives copy.deepcopy and pickle (issue 15): the copy has the same state and steps on
its own, like torch.optim.AdamW's copies."""

import copy
import pickle

import pytest
import torch

from lora_ops import PagedAdamW


def _stepped(rng, page_size):
    params = [torch.nn.Parameter(torch.randn(n, generator=rng)) for n in (100, 37)]
    opt = PagedAdamW(params, lr=1e-2, page_size=page_size)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=rng)
        opt.step()
    return params, opt


def _moments(opt):
    return [(s["step"].item(), s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for s in opt.state_dict()["state"].values()]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("page_size", [64, 1 << 20])
def test_copy_has_the_state_and_steps_independently(rng, how, page_size):
    params, opt = _stepped(rng, page_size)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    before = _moments(opt)
    for (s0, m0, v0), (s1, m1, v1) in zip(before, _moments(clone)):
        assert s0 == s1 and torch.equal(m0, m1) and torch.equal(v0, v1)
    # the copy steps its own parameters; the original's state is untouched
    cparams = [p for g in clone.param_groups for p in g["params"]]
    assert all(cp is not p for cp, p in zip(cparams, params))
    grads = [torch.randn(p.shape, generator=rng) for p in params]
    for cp, g in zip(cparams, grads):
        cp.grad = g.clone()
    clone.step()
    ref = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    ref.load_state_dict(opt.state_dict())
    for rp, g in zip(ref.param_groups[0]["params"], grads):
        rp.grad = g.clone()
    ref.step()
    for cp, rp in zip(cparams, ref.param_groups[0]["params"]):
        assert torch.allclose(cp, rp, rtol=0, atol=1e-6)
    for (s0, m0, v0), (s1, m1, v1) in zip(before, _moments(opt)):
        assert s0 == s1 and torch.equal(m0, m1) and torch.equal(v0, v1)
