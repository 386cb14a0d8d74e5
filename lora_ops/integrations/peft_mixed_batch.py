"""PEFT's mixed batches (``model(input_ids, adapter_names=[...])``, ``generate(..., adapter_names=...)``) on
lora_ops NF4 layers through the fused per-row op: :class:`~lora_ops.integrations.peft_native.LoraOpsLinear`
calls :func:`mixed_batch_forward` instead of PEFT's ``_mixed_batch_forward`` (which runs the base, then per
distinct adapter a gather, two small GEMMs and a scatter).

Each layer keeps its PEFT adapters stacked in an :class:`~lora_ops.serving.AdapterPool` (float32), one slot
per adapter in ``lora_A``'s order, refreshed when an adapter is added or deleted, or its weights or scaling
change (the tensors' identity and in-place version counters are compared per call, so an adapter being
trained is re-read). Falls back to PEFT's own code where the fused op does not apply: LoRA variants,
active dropout (training), merged adapters, or extra forward arguments.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from lora_ops.ops.multi_lora import multi_lora_linear_args
from lora_ops.serving import AdapterPool, rows_ids

_POOL_ATTR = "_lora_ops_mixed_pool"


def _adapter_key(layer, name: str):
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return (a.data_ptr(), a._version, a.dtype, b.data_ptr(), b._version, float(layer.scaling[name]))


def _pool(layer) -> tuple[AdapterPool, dict[str, int]]:
    names = list(layer.lora_A.keys())
    keys = {n: _adapter_key(layer, n) for n in names}
    cached = getattr(layer, _POOL_ATTR, None)
    base = layer.get_base_layer()
    r_max = max(layer.r[n] for n in names)
    if cached is None or list(cached[1]) != names or cached[0].r_max < r_max:
        pool = AdapterPool(base.in_features, base.out_features, len(names), r_max, torch.float32,
                           base.weight_packed.device)
        cached = (pool, {n: i for i, n in enumerate(names)}, {})
        setattr(layer, _POOL_ATTR, cached)
    pool, slots, seen = cached
    for n in names:
        if seen.get(n) != keys[n]:
            with torch.no_grad():
                pool.set_slot(slots[n], layer.lora_A[n].weight.float(), layer.lora_B[n].weight.float(),
                              float(layer.scaling[n]))
            seen[n] = keys[n]
    return pool, slots


def _applies(layer, args, kwargs) -> bool:
    if layer.merged or args or any(v is not None for v in kwargs.values()) or not layer.lora_A:
        return False
    for n in layer.lora_A:
        if n in layer.lora_variant:
            return False
        drop = layer.lora_dropout[n]
        if isinstance(drop, torch.nn.Dropout) and drop.training and drop.p > 0:
            return False
    return True


def mixed_batch_forward(layer, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
    """PEFT's mixed-batch semantics (row b of x uses ``adapter_names[b]``; ``'__base__'`` or an adapter this
    layer does not have: the base alone) in one fused op call."""
    if not _applies(layer, args, kwargs):
        return PeftLoraLinear._mixed_batch_forward(layer, x, *args, adapter_names=adapter_names, **kwargs)
    if len(adapter_names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]} rows")
    pool, slots = _pool(layer)
    ids = torch.tensor([slots.get(n, -1) for n in adapter_names], dtype=torch.int64, device=x.device)
    base = layer.get_base_layer()
    xc, fused_bias, trainable_bias = base._call_inputs(x, "LoraOpsLinear")
    w, w_meta = base._weight_op_args()
    y = multi_lora_linear_args(xc, w, w_meta, pool.A, pool.Bt, pool.scales, pool.ranks, rows_ids(ids, x),
                               fused_bias)
    if trainable_bias:
        y = y + base.bias.to(y.dtype)
    return y.to(x.dtype)
