"""FSDP2, DDP and torch.distributed.checkpoint with lora_ops on 2 CPU ranks (gloo), spawned by the tests
themselves. The oracle is the single-process run of the same model on the same global batches; the
NF4 bytes are compared with the bytes quantize_nf4 wrote."""

import dist_workers as W
import pytest
import torch
from dist_spawn import run_ranks

from lora_ops.demo import build_lora_ops_model, make_config
from lora_ops.nf4_tensor import NF4Tensor
from lora_ops.nn import QLoRALinear

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2


@pytest.fixture(scope="module")
def single():
    """The single-process run: losses, and the model afterwards (its base is the quantizer's bytes)."""
    model = build_lora_ops_model(W.config())
    opt = W.optimizer(model)
    losses = W.train(model, opt)
    return {"losses": losses, "model": model, "opt": opt}


def assert_same_trajectory(got, want):
    assert len(got) == len(want) == W.STEPS
    assert want[-1] < want[0]  # the run learns: the comparison is between moving trajectories
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_fsdp2_shards_nf4_bytes_trains_like_one_process_and_checkpoints(single, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(single["model"], single["opt"])  # the 1-process save the ranks load
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ckpt1"))
    ranks = run_ranks(W.fsdp_rank, WORLD, tmp_path, timeout=240)
    for r in ranks:
        assert_same_trajectory(r["losses"], single["losses"])

    # Each rank holds half of the codes + absmax; the replicated double-quant state is small.
    whole = ranks[0]["before"]
    for r in ranks:
        assert r["after"]["sharded"] * WORLD == whole["sharded"]
        assert r["after"]["replicated"] == whole["replicated"]
        assert r["after"]["sharded"] + r["after"]["replicated"] < 0.55 * (whole["sharded"] + whole["replicated"])

    # Inside forward every rank sees the whole weight, byte for byte the quantizer's (bitsandbytes) layout.
    ref = single["model"]
    for r in ranks:
        for name in W.WATCHED:
            want = ref.get_submodule(name).weight.tensors()
            for key, t in r["seen"][name].items():
                assert torch.equal(t, want[key]), (name, key)

    # The all-gather moves the 4-bit bytes, nothing dequantized: per step every decoder layer is gathered
    # for forward and again for backward (the root, holding the embedding and final norm, once), so the
    # bytes are 2 x (NF4 codes + absmax + float32 parameters) less the root's float32 bytes.
    nf4_bytes = whole["sharded"]
    float_bytes = sum(p.numel() * p.element_size() for p in ref.parameters() if not isinstance(p, NF4Tensor))
    root_bytes = sum(p.numel() * p.element_size() for p in ref.model.embed_tokens.parameters())
    root_bytes += sum(p.numel() * p.element_size() for p in ref.model.norm.parameters())
    assert ranks[0]["gathered_bytes_per_step"] == 2 * (nf4_bytes + float_bytes) - root_bytes

    # A save on 1 process loaded on 2 ranks (into a sharded model of another seed): the same base bytes
    # in forward, the same adapters and moments.
    want_adapters, want_moments = W._full_state(msd, osd)
    for r in ranks:
        for name in W.WATCHED:
            want = ref.get_submodule(name).weight.tensors()
            for key, t in r["seen_loaded"][name].items():
                assert torch.equal(t, want[key]), (name, key)
        assert r["loaded_adapters"].keys() == want_adapters.keys()
        for key, t in want_adapters.items():
            assert torch.equal(r["loaded_adapters"][key], t), key
        assert r["loaded_moments"].keys() == want_moments.keys()
        for fqn, st in want_moments.items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(r["loaded_moments"][fqn][k]), torch.as_tensor(v)), (fqn, k)

    # A save on 2 ranks loads on 1: into a model built from another seed (other base, other adapters).
    target = build_lora_ops_model(make_config("ci", "cpu", steps=W.STEPS, seed=1))
    opt = W.optimizer(target)
    msd, osd = get_state_dict(target, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(target, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, m in target.named_modules():
        if isinstance(m, QLoRALinear):
            want = ref.get_submodule(name).weight.tensors()
            for key, t in m.weight.tensors().items():
                assert torch.equal(t, want[key]), (name, key)
    tsd = target.state_dict()
    for key, t in ranks[0]["adapters"].items():
        assert torch.equal(tsd[key], t), key
    _, loaded = get_state_dict(target, opt)
    assert set(loaded["state"]) == set(ranks[0]["moments"])
    for fqn, st in ranks[0]["moments"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(loaded["state"][fqn][k]), torch.as_tensor(v)), (fqn, k)


def test_ddp_trains_like_one_process_reducing_only_adapters(single, tmp_path):
    ranks = run_ranks(W.ddp_rank, WORLD, tmp_path, timeout=180)
    for r in ranks:
        assert_same_trajectory(r["losses"], single["losses"])
        assert r["reduced"] and all(".lora_A." in n or ".lora_B." in n for n in r["reduced"])
