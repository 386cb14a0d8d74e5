"""DistributedDataParallel and the frozen NF4 bases: DDP broadcasts every parameter from rank 0 when it
wraps a model, by flattening them into dense buckets, which a 4-bit base (an NF4Tensor parameter) cannot
join. The bases are frozen and every rank loads the same bytes, so DDP may skip them: it reads the names to
skip from the module it wraps."""

from __future__ import annotations

from torch import nn

from lora_ops.nf4_tensor import NF4Tensor


def ddp_ignore_nf4_bases(module: nn.Module) -> nn.Module:
    """Marks the NF4 base parameters of ``module`` (names relative to it) for DDP to leave alone; call it
    on the very module passed to ``DistributedDataParallel`` (e.g. the PeftModel). Returns ``module``."""
    names = [n for n, p in module.named_parameters() if isinstance(p, NF4Tensor)]
    old = list(getattr(module, "_ddp_params_and_buffers_to_ignore", None) or [])
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, sorted(set(old) | set(names)))
    return module


__all__ = ["ddp_ignore_nf4_bases"]
