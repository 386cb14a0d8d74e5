"""The demo fine-tune on several processes: ``torchrun --nproc-per-node N -m lora_ops demo --distributed
fsdp|ddp``. Every rank builds the same model (same seed), takes its 1/N of each global batch, and
trains the adapters with PagedAdamW under FSDP2 (``fully_shard`` on each decoder layer and the root,
the NF4 base sharded by rows, see :mod:`lora_ops.distributed`) or DDP. Backend: nccl on GPUs, gloo on
the CPU. Rank 0 prints the loss, tokens/s, each rank's resident NF4 bytes and (FSDP2) the bytes
all-gathered per step next to what FSDP2 would gather for the same weights in bf16."""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist

from lora_ops.distributed.gather_count import count_all_gather_bytes


def run_distributed(mode: str, cfg, checkpoint: str | None = None) -> dict:
    """One rank of the distributed demo (the process group comes from torchrun's environment)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from lora_ops.demo import build_lora_ops_model, copy_batches, device_name, lr_schedule
    from lora_ops.distributed import check_shardable, ddp_ignore_nf4_bases, nf4_storage_nbytes
    from lora_ops.nn import QLoRALinear
    from lora_ops.optim import PagedAdamW

    if "RANK" not in os.environ:
        raise SystemExit("demo --distributed: start it with torchrun, e.g. "
                         "torchrun --nproc-per-node 2 -m lora_ops demo --distributed fsdp")
    cuda = cfg.device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        cfg.device = f"cuda:{local_rank}"
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if cfg.batch % world:
            raise SystemExit(f"demo --distributed: the global batch {cfg.batch} does not split over {world} ranks")
        per_rank = cfg.batch // world
        model = build_lora_ops_model(cfg)
        layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
        n_weights = sum(m.in_features * m.out_features for m in layers)
        whole_nf4 = sum(sum(m.weight.storage_nbytes().values()) for m in layers)
        codes_and_scales = sum(m.weight.packed.numel() + m.weight.absmax.nbytes for m in layers)  # what FSDP2 gathers
        if mode == "fsdp":  # fully_shard alone: the NF4 bases are parameters FSDP2 shards as they are
            whole = nf4_storage_nbytes(model)  # one shared copy of the dynamic map from here on
            whole_nf4 = whole["sharded"] + whole["replicated"]
            check_shardable(model, world)
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            held = nf4_storage_nbytes(model)
            resident = held["sharded"] + held["replicated"]
        else:
            model = DistributedDataParallel(ddp_ignore_nf4_bases(model), device_ids=[local_rank] if cuda else None)
            resident = whole_nf4
        params = [p for p in model.parameters() if p.requires_grad]
        opt = PagedAdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = lr_schedule(opt, cfg.steps)
        if rank == 0:
            print(f"lora_ops demo --distributed {mode} | {world} ranks, {backend} | torch {torch.__version__} | "
                  f"{device_name(cfg.device)}")
            print(f"Llama {cfg.hidden} hidden x {cfg.layers} layers, NF4 base, LoRA r={cfg.rank} | global batch "
                  f"{cfg.batch} ({per_rank} per rank) x {cfg.seq_len} tokens | {cfg.steps} steps | {cfg.dtype}",
                  flush=True)
        gathered = [0]
        counting = count_all_gather_bytes(gathered) if mode == "fsdp" else contextlib.nullcontext()
        losses: list[float] = []
        batches = copy_batches(cfg)
        warmup = min(5, cfg.steps // 10)
        t0 = time.perf_counter()
        with counting:
            for step in range(cfg.steps):
                if step == warmup:
                    gathered[0] = 0
                    t0 = time.perf_counter()
                ids, labels = next(batches)
                rows = slice(rank * per_rank, (rank + 1) * per_rank)
                loss = model(input_ids=ids[rows], labels=labels[rows]).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                total = loss.detach().clone()
                dist.all_reduce(total)
                losses.append(total.item() / world)
                if rank == 0 and (step % 25 == 0 or step == cfg.steps - 1):
                    print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        timed = cfg.steps - warmup
        summary = {
            "mode": mode, "world": world, "backend": backend, "losses": losses,
            "tokens_per_s": timed * cfg.batch * cfg.seq_len / elapsed,
            "nf4_bytes_whole": whole_nf4, "nf4_bytes_per_rank": resident,
            "all_gather_bytes_per_step": gathered[0] / max(timed, 1) if mode == "fsdp" else None,
            # FSDP2 gathers each decoder layer for forward and again for backward: 2 x bf16 weights.
            "bf16_weight_gather_bytes_per_step": 2 * 2 * n_weights,
            "nf4_weight_gather_bytes_per_step": 2 * codes_and_scales,
        }
        if checkpoint:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=checkpoint)
        if rank == 0:
            _print_summary(summary, cfg)
        # Release the wrapped model while the process group exists, and meet: without this the ddp run
        # hung at exit (seen with torch 2.13 + gloo, DDP model still alive at destroy_process_group).
        del model, opt, params, sched
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()


def _print_summary(s: dict, cfg) -> None:
    first, last = s["losses"][:5], s["losses"][-10:]
    print(f"loss {sum(first) / len(first):.3f} -> {sum(last) / len(last):.4f} (mean of the first 5 / last 10 "
          f"steps) | {s['tokens_per_s']:,.0f} tokens/s (all ranks)")
    print(f"NF4 base bytes: whole {s['nf4_bytes_whole']:,}, held per rank {s['nf4_bytes_per_rank']:,}")
    if s["all_gather_bytes_per_step"] is not None:
        print(f"all-gathered per step (measured, all FSDP2 params incl. float32 adapters/norms/embedding): "
              f"{s['all_gather_bytes_per_step']:,.0f} B; of it the NF4 weights {s['nf4_weight_gather_bytes_per_step']:,} B "
              f"vs {s['bf16_weight_gather_bytes_per_step']:,} B for the same weights in bf16 "
              f"({s['bf16_weight_gather_bytes_per_step'] / s['nf4_weight_gather_bytes_per_step']:.2f}x)")
