"""FSDP2 and lora_ops NF4 layers: the frozen NF4 base of every :class:`~lora_ops.nn.QLoRALinear` and
:class:`~lora_ops.nn.NF4Linear` is the parameter ``weight`` (an :class:`~lora_ops.nf4_tensor.NF4Tensor`),
which ``fully_shard`` shards by rows and all-gathers as 4-bit bytes with no conversion step.

The layer's ``state_dict`` keeps its ordinary keys: after ``fully_shard`` the sharded ``weight_packed`` /
``weight_absmax`` are DTensors (``Shard(0)`` over the mesh) of the bitsandbytes byte layout, so
``torch.distributed.checkpoint`` saves the base byte-exact and loads it into any rank count, including one
plain process. :func:`make_nf4_shardable` remains for code written when a conversion was needed: it now
only shares one copy of the double-quantization map between layers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lora_ops.nf4_tensor import shard_error
from lora_ops.nn import NF4Linear, QLoRALinear, _NF4Base

# Earlier name of a QLoRALinear whose base FSDP2 can shard: every QLoRALinear is one now.
ShardableQLoRALinear = QLoRALinear


def _nf4_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, _NF4Base) and module.base_loaded:
            yield name, module


def make_nf4_shardable(model: nn.Module) -> nn.Module:
    """No conversion is needed any more (the base is already a parameter); shares one copy of the 1 KiB
    dynamic map among the unsharded double-quantized layers of ``model`` (in place). Returns ``model``."""
    codes: list[torch.Tensor] = []
    for _, module in _nf4_layers(model):
        local = module._nf4_local()
        if not local.is_full or not local.nested:
            continue
        code = local.nested_code
        same = next((c for c in codes if c.device == code.device and torch.equal(c, code)), None)
        if same is None:
            codes.append(code)
        elif same is not code:
            module._set_base(dataclasses.replace(local.nf4_weight(), nested_code=same))
    return model


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Raises ValueError naming the first layer whose NF4 base FSDP2 cannot shard over ``world_size``
    ranks (rows must split evenly into whole 4-bit blocks)."""
    for name, module in _nf4_layers(model):
        local = module._nf4_local()
        why = shard_error((local.full_rows, local.shape[1]), local.blocksize, world_size)
        if why:
            raise ValueError(f"{name}: the NF4 base cannot be sharded over {world_size} ranks: {why}")


def nf4_storage_nbytes(model: nn.Module) -> dict[str, int]:
    """NF4 bytes this rank holds now, summed over the model's NF4 layers: ``sharded`` (codes and absmax of
    its rows) and ``replicated`` (the double-quantization state every rank keeps)."""
    total = {"sharded": 0, "replicated": 0}
    counted: set[int] = set()  # a tensor shared by layers (the dynamic map) is held once
    for _, module in _nf4_layers(model):
        local = module._nf4_local()
        total["sharded"] += local.storage_nbytes()["sharded"]
        for t in local.nested_state or ():
            if t.data_ptr() not in counted:
                counted.add(t.data_ptr())
                total["replicated"] += t.numel() * t.element_size()
    return total


__all__ = ["NF4Linear", "QLoRALinear", "ShardableQLoRALinear", "check_shardable", "make_nf4_shardable",
           "nf4_storage_nbytes"]
