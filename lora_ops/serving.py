"""Serving many LoRA adapters over one NF4 base: each row of a batch picks its own adapter, and the base is
read once per layer call for all rows (:func:`lora_ops.ops.multi_lora.multi_lora_linear`).

    server = AdapterServer(lora_ops.quantize_model(model), capacity=16, r_max=64)
    server.load_adapter("adapters/sql", name="sql")        # a PEFT adapter directory, into a free slot
    server.load_adapter("adapters/chat", name="chat")
    with server.batch(["sql", "chat", None]):               # one adapter per batch row; None: the base alone
        logits = model(input_ids).logits                    # or model.generate(input_ids, ...)
    server.unload("sql")                                    # frees its slot

Hot swap: loading writes only the new slot's rows of the pool tensors (rank and scale last) and unloading
sets its rank to 0, so another row's output is bit-for-bit what it was (tests/test_serving_pool.py). A full
pool raises; nothing is evicted behind the caller's back. Adapters may differ in target modules, rank (up
to ``r_max``; a slot costs the kernel its own rank, not ``r_max``) and alpha; an adapter that does not fit
the base (unknown module, wrong shape, rank above ``r_max``, a LoRA variant) is refused whole, naming the
adapter and the module, before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lora_ops.nn import NF4Linear
from lora_ops.ops.multi_lora import multi_lora_linear_args

__all__ = ["AdapterPool", "MultiLoRALinear", "AdapterServer", "read_peft_adapter"]


class AdapterPool:
    """The stacked adapters of one layer: ``A [C, r_max, K]``, ``Bt [C, r_max, N]`` (Bᵀ per slot),
    ``scales`` float32 ``[C]``, ``ranks`` int32 ``[C]`` (0: empty)."""

    def __init__(self, in_features: int, out_features: int, capacity: int, r_max: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if capacity < 1 or not 1 <= r_max <= 256:
            raise ValueError(f"AdapterPool: capacity >= 1 and r_max in 1..256, got {capacity}, {r_max}")
        self.in_features, self.out_features = in_features, out_features
        self.capacity, self.r_max = capacity, r_max
        self.A = torch.zeros(capacity, r_max, in_features, dtype=dtype, device=device)
        self.Bt = torch.zeros(capacity, r_max, out_features, dtype=dtype, device=device)
        self.scales = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.ranks = torch.zeros(capacity, dtype=torch.int32, device=device)

    def check(self, A: torch.Tensor, B: torch.Tensor, what: str) -> None:
        """Raises ValueError naming ``what`` when (A [r, K], B [N, r]) does not fit this layer's pool."""
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or A.shape[1] != self.in_features:
            raise ValueError(f"{what}: lora_A is {tuple(A.shape)}, the layer needs [r, {self.in_features}]")
        if B.dim() != 2 or tuple(B.shape) != (self.out_features, r):
            raise ValueError(f"{what}: lora_B is {tuple(B.shape)}, the layer needs "
                             f"[{self.out_features}, {r}]")
        if not 1 <= r <= self.r_max:
            raise ValueError(f"{what}: rank {r} is above the pool's r_max = {self.r_max}")

    @torch.no_grad()
    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        r = A.shape[0]
        self.ranks[slot] = 0  # a row naming this slot sees the base alone until the slot is complete
        self.A[slot, :r].copy_(A)
        self.Bt[slot, :r].copy_(B.t())
        self.scales[slot] = scale
        self.ranks[slot] = r

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.ranks[slot] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.Bt, self.scales, self.ranks))


class MultiLoRALinear(nn.Module):
    """An :class:`NF4Linear` base plus an :class:`AdapterPool`; ``forward(x)`` uses the per-row slot ids
    set by :meth:`set_row_slots` (one per leading row of x, or one per batch row of a ``[B, T, K]`` x)."""

    def __init__(self, base: NF4Linear, capacity: int, r_max: int,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, NF4Linear):
            raise TypeError(f"MultiLoRALinear: base must be lora_ops.nn.NF4Linear, got {type(base).__name__}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.pool = AdapterPool(base.in_features, base.out_features, capacity, r_max, adapter_dtype,
                                base.weight_packed.device)
        self._slots: torch.Tensor | None = None

    def set_row_slots(self, slots: torch.Tensor | None) -> None:
        self._slots = slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self._slots is None:
            return base(x)
        xc, fused_bias, trainable_bias = base._call_inputs(x, "MultiLoRALinear")
        ids = rows_ids(self._slots, x)
        w, w_meta = base._weight_op_args()
        p = self.pool
        y = multi_lora_linear_args(xc, w, w_meta, p.A, p.Bt, p.scales, p.ranks, ids, fused_bias)
        if trainable_bias:
            y = y + base.bias.to(y.dtype)
        return y.to(x.dtype)


def rows_ids(slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row ids for x [..., K]: ``slots`` has one id per batch row (x.shape[0]), repeated over the other
    leading dims, or one per row already."""
    lead = x.shape[:-1]
    if slots.shape == lead:
        return slots
    if len(lead) >= 1 and slots.dim() == 1 and slots.shape[0] == lead[0]:
        return slots.view(-1, *([1] * (len(lead) - 1))).expand(lead)
    raise ValueError(f"adapter ids: {tuple(slots.shape)} ids for input rows {tuple(lead)}; "
                     "give one per batch row")


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank/alpha pattern rule: a key matches a module whose name is the key or ends with '.key'
    (keys may be regular expressions)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft_adapter(path: str) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """Reads a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` as
    ``save_pretrained`` writes it) into ``(config, {module name: (A [r, K], B [N, r], scale)})``."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    name = os.path.basename(os.path.normpath(path))
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if config.get(flag):
            raise ValueError(f"adapter {name!r}: {flag}=True is not supported by the multi-adapter layers")
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight (other trained "
                             "modules are not supported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {name!r}: module {module!r} has lora_{''.join(ab)} only")
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[module] = (A, B, float(scale))
    return config, out


class AdapterServer:
    """Wraps every :class:`NF4Linear` of ``model`` (in place) in a :class:`MultiLoRALinear` with a pool of
    ``capacity`` slots of rank up to ``r_max``; loads, unloads and selects adapters by name."""

    def __init__(self, model: nn.Module, capacity: int = 8, r_max: int = 64,
                 adapter_dtype: torch.dtype = torch.float32):
        self.model, self.capacity, self.r_max = model, capacity, r_max
        self.layers: dict[str, MultiLoRALinear] = {}
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, NF4Linear):
                    full = f"{name}.{child_name}" if name else child_name
                    layer = MultiLoRALinear(child, capacity, r_max, adapter_dtype)
                    setattr(module, child_name, layer)
                    self.layers[full] = layer
        if not self.layers:
            raise ValueError("AdapterServer: the model has no lora_ops NF4Linear layers "
                             "(quantize_model first)")
        self.slots: dict[str, int] = {}

    def _free_slot(self, name: str) -> int:
        used = set(self.slots.values())
        for s in range(self.capacity):
            if s not in used:
                return s
        raise RuntimeError(f"AdapterServer: the pool is full ({self.capacity} adapters: "
                           f"{sorted(self.slots)}); unload one before loading {name!r}")

    def load_adapter(self, path: str, name: str | None = None) -> int:
        """Loads a PEFT adapter directory into a free slot; returns the slot."""
        name = name or os.path.basename(os.path.normpath(path))
        _, modules = read_peft_adapter(path)
        return self.add_adapter(name, modules)

    def add_adapter(self, name: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> int:
        """Adds ``{module name: (A [r, K], B [N, r], scale)}`` as adapter ``name``; returns its slot. Every
        module is checked before anything is written."""
        if name in self.slots:
            raise ValueError(f"AdapterServer: an adapter named {name!r} is loaded already")
        if not modules:
            raise ValueError(f"adapter {name!r}: no LoRA modules")
        for module, (A, B, _) in modules.items():
            layer = self.layers.get(module)
            if layer is None:
                raise ValueError(f"adapter {name!r}: module {module!r} is not an NF4 layer of this model")
            layer.pool.check(A, B, f"adapter {name!r}, module {module!r}")
        slot = self._free_slot(name)
        for module, layer in self.layers.items():
            if module in modules:
                A, B, scale = modules[module]
                layer.pool.set_slot(slot, A, B, scale)
            else:
                layer.pool.clear_slot(slot)  # not a target module of this adapter: the base alone there
        self.slots[name] = slot
        return slot

    def unload(self, name: str) -> None:
        slot = self.slots.pop(name, None)
        if slot is None:
            raise KeyError(f"AdapterServer: no adapter named {name!r} is loaded ({sorted(self.slots)})")
        for layer in self.layers.values():
            layer.pool.clear_slot(slot)

    def slot_ids(self, names: Sequence[str | None]) -> torch.Tensor:
        """int64 ids of per-row adapter names (None or '__base__': -1)."""
        ids = []
        for n in names:
            if n is None or n == "__base__":
                ids.append(-1)
            elif n in self.slots:
                ids.append(self.slots[n])
            else:
                raise KeyError(f"AdapterServer: adapter {n!r} is not loaded ({sorted(self.slots)})")
        return torch.tensor(ids, dtype=torch.int64)

    @contextlib.contextmanager
    def batch(self, names: Sequence[str | None]) -> Iterator[None]:
        """Within the block every layer uses adapter ``names[b]`` for batch row b."""
        ids = self.slot_ids(names)
        for layer in self.layers.values():
            layer.set_row_slots(ids.to(layer.pool.ranks.device))
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.set_row_slots(None)

    def adapter_nbytes(self) -> int:
        """Pool memory per adapter slot, all layers."""
        return sum(layer.pool.nbytes() for layer in self.layers.values()) // self.capacity
