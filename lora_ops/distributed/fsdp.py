"""Making QLoRALinear layers shardable by FSDP2: the frozen NF4 base becomes one frozen parameter
(:class:`~lora_ops.distributed.nf4_tensor.NF4Tensor`), which ``fully_shard`` shards by rows and
all-gathers as 4-bit bytes.

FSDP2 shards only parameters (buffers stay whole on every rank), so :func:`make_nf4_shardable` moves
each layer's base buffers (``weight_packed``, ``weight_absmax``, ...) into the parameter
``weight_nf4`` (``requires_grad=False``). The layer's ``state_dict`` keeps the ordinary QLoRALinear
keys: after ``fully_shard`` the sharded ``weight_packed`` / ``weight_absmax`` are DTensors
(``Shard(0)`` over the mesh) of the bitsandbytes byte layout, so ``torch.distributed.checkpoint``
saves the base byte-exact and loads it into any rank count, including one plain process.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lora_ops.distributed.nf4_tensor import NF4Tensor, shard_error
from lora_ops.nf4 import NF4Weight
from lora_ops.nn import QLoRALinear

_PARAM = "weight_nf4"
_BASE_KEYS = ("packed", "absmax", "absmax2", "nested_code", "offset")
_SHARDED_KEYS = ("packed", "absmax")  # sharded by rows; the others are the replicated nested state


def _dtensor_types():
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


class ShardableQLoRALinear(QLoRALinear):
    """A :class:`QLoRALinear` whose NF4 base is the frozen parameter ``weight_nf4`` (an NF4Tensor, or a
    DTensor of NF4Tensor shards after ``fully_shard``). Made by :func:`make_nf4_shardable`; same forward,
    same state_dict keys."""

    def _nf4_local(self) -> NF4Tensor:
        p = self._parameters[_PARAM]
        DTensor, _ = _dtensor_types()
        local = p._local_tensor if isinstance(p, DTensor) else p
        return local

    @property
    def weight(self) -> NF4Weight:
        """The whole base weight. Inside an FSDP2 forward/backward the parameter is the all-gathered one."""
        return self._nf4_local().nf4_weight()

    # The state_dict names of the base, as read-only attributes (this rank's part of the sharded ones):
    # torch.distributed.checkpoint.state_dict resolves every state_dict key as an attribute path.
    weight_packed = property(lambda self: self._nf4_local().packed.view(-1, 1))
    weight_absmax = property(lambda self: self._nf4_local().absmax)
    weight_absmax2 = property(lambda self: (self._nf4_local().nested or (None,) * 3)[0])
    weight_nested_code = property(lambda self: (self._nf4_local().nested or (None,) * 3)[1])
    weight_offset = property(lambda self: (self._nf4_local().nested or (None,) * 3)[2])

    def _set_base(self, w: NF4Weight) -> None:
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QLoRALinear: base weight shape {tuple(w.shape)} != "
                             f"({self.out_features}, {self.in_features})")
        if _PARAM in self._parameters and not self._nf4_local().is_full:
            raise RuntimeError("ShardableQLoRALinear: the base is sharded; replace it before fully_shard")
        self.blocksize, self.base_dtype = w.blocksize, w.dtype
        self._parameters[_PARAM] = nn.Parameter(NF4Tensor.from_nf4(w), requires_grad=False)

    def _apply(self, fn, recurse=True):
        return nn.Module._apply(self, fn, recurse)  # the NF4Tensor keeps its storage dtypes itself

    # ---- state_dict: the ordinary QLoRALinear keys -------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        p = destination.pop(prefix + _PARAM)
        local = self._nf4_local()
        nested = dict(zip(("absmax2", "nested_code", "offset"), local.nested or ()))
        own = {"packed": local.packed.view(-1, 1), "absmax": local.absmax}
        DTensor, Shard = _dtensor_types()
        if isinstance(p, DTensor):  # this rank's rows, as a row shard of the bitsandbytes byte tensors
            n, k = local.full_rows, local.shape[1]
            full_shapes = {"packed": (n * k // 2, 1), "absmax": (-(-n * k // local.blocksize),)}
            for name, t in own.items():
                own[name] = DTensor.from_local(t, p.device_mesh, [Shard(0)], run_check=False,
                                               shape=torch.Size(full_shapes[name]),
                                               stride=torch.empty(full_shapes[name], device="meta").stride())
        for name, t in {**own, **nested}.items():
            destination[prefix + f"weight_{name}"] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        has_base = prefix + "weight_packed" in state_dict
        base = {k: state_dict.pop(prefix + f"weight_{k}") for k in _BASE_KEYS if prefix + f"weight_{k}" in state_dict}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + _PARAM in missing_keys:
            missing_keys.remove(prefix + _PARAM)
        if not has_base:
            if strict:
                missing_keys.extend(prefix + f"weight_{k}" for k in _SHARDED_KEYS)
            return
        try:
            self._load_base(base)
        except (ValueError, RuntimeError) as e:
            error_msgs.append(f"{prefix}weight_*: {e}")

    @torch.no_grad()
    def _load_base(self, base: dict[str, torch.Tensor]) -> None:
        DTensor, _ = _dtensor_types()
        local = self._nf4_local()
        k, bs = local.shape[1], local.blocksize
        rows = (local.row_start, local.row_start + local.shape[0])
        mine = self._parameters[_PARAM]
        for name in _SHARDED_KEYS:
            src = base[name]
            if isinstance(src, DTensor):
                if isinstance(mine, DTensor) and src.device_mesh == mine.device_mesh and \
                        src.placements == mine.placements:  # sharded as we are: the local piece is our rows
                    getattr(local, name).copy_(src.to_local().reshape(-1))
                    continue
                src = src.full_tensor()  # sharded otherwise (a collective): take the whole, keep our rows
            src = src.reshape(-1)
            if name == "packed":
                part = src[rows[0] * k // 2 : rows[1] * k // 2]
            else:
                part = src[rows[0] * k // bs : -(-rows[1] * k // bs)]
            dst = getattr(local, name)
            if part.dtype != dst.dtype or part.numel() != dst.numel():
                raise ValueError(f"{name}: expected {dst.dtype} with {dst.numel()} elements for rows "
                                 f"{rows[0]}..{rows[1]}, got {part.dtype} with {part.numel()}")
            dst.copy_(part)
        if local.nested:
            for name, dst in zip(("absmax2", "nested_code", "offset"), local.nested):
                src = base.get(name)
                if src is None:
                    raise ValueError(f"the double-quantized base needs weight_{name}")
                src = src.full_tensor() if isinstance(src, DTensor) else src
                dst.copy_(src.reshape(dst.shape))


def make_nf4_shardable(model: nn.Module) -> nn.Module:
    """Turns every :class:`QLoRALinear` in ``model`` (in place) into a :class:`ShardableQLoRALinear`:
    the NF4 base moves from buffers to the frozen parameter ``weight_nf4`` that ``fully_shard`` shards
    by rows. Call it before ``fully_shard``; the bytes, the forward and the state_dict keys are unchanged.
    Returns ``model``."""
    codes: list[torch.Tensor] = []  # the dynamic map is the same 1 KiB in every layer: keep one copy
    for module in model.modules():
        if isinstance(module, QLoRALinear) and not isinstance(module, ShardableQLoRALinear):
            w = module.weight
            if w.nested:
                same = next((c for c in codes if c.device == w.device and torch.equal(c, w.nested_code)), None)
                if same is None:
                    codes.append(w.nested_code)
                else:
                    w = dataclasses.replace(w, nested_code=same)
            for name in _BASE_KEYS:
                module._buffers.pop(f"weight_{name}", None)
            module.__class__ = ShardableQLoRALinear
            module._set_base(w)
    return model


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Raises ValueError naming the first layer whose NF4 base FSDP2 cannot shard over ``world_size``
    ranks (rows must split evenly into whole 4-bit blocks)."""
    for name, module in model.named_modules():
        if isinstance(module, ShardableQLoRALinear):
            local = module._nf4_local()
            why = shard_error((local.full_rows, local.shape[1]), local.blocksize, world_size)
            if why:
                raise ValueError(f"{name}: the NF4 base cannot be sharded over {world_size} ranks: {why}")


def nf4_storage_nbytes(model: nn.Module) -> dict[str, int]:
    """NF4 bytes this rank holds now, summed over the model's shardable layers: ``sharded`` (codes and
    absmax of its rows) and ``replicated`` (the double-quantization state every rank keeps)."""
    total = {"sharded": 0, "replicated": 0}
    counted: set[int] = set()  # a tensor shared by layers (the dynamic map) is held once
    for module in model.modules():
        if isinstance(module, ShardableQLoRALinear):
            local = module._nf4_local()
            total["sharded"] += local.storage_nbytes()["sharded"]
            for t in local.nested or ():
                if t.data_ptr() not in counted:
                    counted.add(t.data_ptr())
                    total["replicated"] += t.numel() * t.element_size()
    return total
