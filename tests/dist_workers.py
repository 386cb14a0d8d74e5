"""The per-rank programs of the 2-rank tests (module level, so spawned ranks can import them): a tiny
random Llama from lora_ops.demo (ci size) fine-tuned with QLoRALinear adapters and PagedAdamW, the
global batch split over the ranks."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from lora_ops.distributed.gather_count import count_all_gather_bytes
from lora_ops.demo import build_lora_ops_model, copy_batches, make_config
from lora_ops.optim import PagedAdamW

STEPS = 10
# Layers whose all-gathered NF4 bytes the FSDP2 run records inside forward (a square and a wide one).
WATCHED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def config():
    return make_config("ci", "cpu", steps=STEPS)


def optimizer(model):
    return PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=config().lr, weight_decay=0.0)


def train(model, opt, rank: int = 0, world: int = 1) -> list[float]:
    """STEPS steps on the same global batches for any world size; returns the global mean loss per step
    (every rank has the same number of loss tokens, so the mean of the rank means is the global mean)."""
    cfg = config()
    per_rank = cfg.batch // world
    losses = []
    for _, (ids, labels) in zip(range(STEPS), copy_batches(cfg)):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = model(input_ids=ids[rows], labels=labels[rows]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def fsdp_rank(rank: int, world: int, folder: Path) -> dict:
    """FSDP2 over the decoder layers and the root; records resident NF4 bytes, the bytes all-gathered
    per step, the NF4 bytes the watched layers see in forward; saves model + optimizer with DCP
    (folder/ckpt) and loads the single-process checkpoint folder/ckpt1 into a fresh sharded model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from lora_ops.distributed import check_shardable, make_nf4_shardable, nf4_storage_nbytes

    model = build_lora_ops_model(config())  # fully_shard alone: the NF4 bases are parameters already
    before = nf4_storage_nbytes(model)
    check_shardable(model, world)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    after = nf4_storage_nbytes(model)

    seen = {}
    for name in WATCHED:
        model.get_submodule(name).register_forward_pre_hook(_record(seen, name))

    gathered = [0]
    opt = optimizer(model)
    with count_all_gather_bytes(gathered):  # FSDP2's all-gathers: count what they move
        losses = train(model, opt, rank, world)

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / "ckpt"))
    adapters, moments = _full_state(msd, osd)

    # The other way: the single-process checkpoint the test wrote loads into a sharded model of another
    # seed; one forward records the bytes the watched layers see.
    target = build_lora_ops_model(make_config("ci", "cpu", steps=STEPS, seed=1))
    make_nf4_shardable(target)  # the former conversion call: kept working, now a no-op
    for layer in target.model.layers:
        fully_shard(layer)
    fully_shard(target)
    target_opt = optimizer(target)
    tmsd, tosd = get_state_dict(target, target_opt)
    state = {"model": tmsd, "optim": tosd}
    dcp.load(state, checkpoint_id=str(folder / "ckpt1"))
    set_state_dict(target, target_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    seen_loaded = {}
    for name in WATCHED:
        target.get_submodule(name).register_forward_pre_hook(_record(seen_loaded, name))
    ids, labels = next(copy_batches(config()))
    with torch.no_grad():
        target(input_ids=ids, labels=labels)
    loaded_adapters, loaded_moments = _full_state(*get_state_dict(target, target_opt))
    return {"losses": losses, "before": before, "after": after, "seen": seen,
            "gathered_bytes_per_step": gathered[0] / STEPS, "adapters": adapters, "moments": moments,
            "seen_loaded": seen_loaded, "loaded_adapters": loaded_adapters, "loaded_moments": loaded_moments}


def _record(store: dict, name: str):
    def hook(module, _args):
        w = module.weight  # inside forward: the all-gathered weight
        store[name] = {k: t.clone() for k, t in w.tensors().items() if t is not None}
    return hook


def _full_state(msd, osd):
    """The adapters and optimizer moments of a (possibly sharded) model/optimizer state dict, whole."""
    full = (lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v)
    adapters = {k: full(v) for k, v in msd.items() if ".lora_" in k}
    moments = {fqn: {k: full(v) for k, v in st.items()} for fqn, st in osd["state"].items()}
    return adapters, moments


def ddp_rank(rank: int, world: int, folder: Path) -> dict:
    """DistributedDataParallel around the plain QLoRALinear model: only adapter gradients are reduced."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lora_ops.distributed import ddp_ignore_nf4_bases

    model = DDP(ddp_ignore_nf4_bases(build_lora_ops_model(config())))
    opt = optimizer(model)
    losses = train(model, opt, rank, world)
    reduced = sorted(n for n, p in model.module.named_parameters() if p.requires_grad)
    return {"losses": losses, "reduced": reduced}
