"""One-line drop-in for PEFT QLoRA models: every LoRA layer over a bitsandbytes ``Linear4bit`` runs
lora_ops' fused NF4 + LoRA op instead of bitsandbytes' ``matmul_4bit`` plus PEFT's separate LoRA
matmuls.

    model = get_peft_model(bnb_4bit_model, LoraConfig(...))
    lora_ops.integrations.peft.patch_peft_model(model)     # the one line
    ...train, save_pretrained, load_adapter, merge_and_unload as usual...
    lora_ops.integrations.peft.unpatch_peft_model(model)   # back to PEFT's own forward

What is shared, not copied: the packed NF4 bytes and quantization state of the base layer (read
through :meth:`NF4Weight.from_bnb` at every forward, so ``.to(device)``, merging and adapter swaps
are always seen) and PEFT's own ``lora_A``/``lora_B`` parameters (so optimizers, ``state_dict``,
``save_pretrained`` and adapter loading keep working). Patching changes only each layer's class
(to a subclass whose ``forward`` is replaced); unpatching restores it.

Semantics follow PEFT's ``lora.bnb.Linear4bit.forward`` (peft 0.21):

- base: ``x`` cast to the layer's ``compute_dtype`` (bitsandbytes' rule: when unset, it becomes the
  input dtype on the first call), output cast back to the input dtype;
- LoRA branch: ``scaling · B(A(dropout(x)))`` with the adapters in their own dtype (fp32 by
  default), dropout on this branch only, ``scaling`` read from the layer at every call (rsLoRA,
  ``set_scale`` and friends included); the fused op accumulates it in fp32;
- several active adapters are summed (fused into one rank-(r1+r2+...) call); disabled adapters
  or a merged layer run the base alone (lora_ops' fused base matmul);
- under ``torch.autocast`` the compute dtype is the autocast dtype, as PEFT/bitsandbytes get.

DoRA (PEFT's ``use_dora=True``, QDoRA over bitsandbytes): a single active DoRA adapter runs lora_ops'
fused DoRA op (:mod:`lora_ops.ops.dora`; PEFT's magnitude parameter, PEFT's DoRA dropout semantics; the
base's row norms are cached per weight storage: bitsandbytes replaces the weight when it merges).

Anything else falls back to PEFT's own forward, with a warning once per reason: other LoRA variants
and DoRA with several active adapters, ``lora_bias``, mixed-adapter batches (``adapter_names=``),
several active adapters with dropout in training mode (PEFT draws an independent mask per adapter), FP4
bases, or unexpected extra arguments.

bitsandbytes' AVX-512 BF16 CPU inference path (eval mode, no grad) repacks a 4-bit weight in place and
rounds its absmax to bf16. Patched layers are kept from that repack (their forward is lora_ops'); a
layer already repacked before patching is converted back to the format-of-record layout (codes exact,
bf16-rounded absmax, warned once): see :mod:`lora_ops.bnb_cpu_layout`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lora_ops import bnb_cpu_layout
from lora_ops import format as fmt
from lora_ops.nf4 import NF4Weight
from lora_ops.ops import dora as dora_ops
from lora_ops.ops import qlora as qlora_ops

__all__ = ["PatchReport", "fallback_reasons", "is_patched", "patch_peft_model", "patched", "unpatch_peft_model"]

_ORIGINAL_CLASS_ATTR = "_lora_ops_original_class"
_SAVED_REPACK_ATTR = "_lora_ops_saved_support_avx512bf16_for_cpu"
_patched_classes: dict[type, type] = {}
_warned: set[str] = set()
_fallback_counts: dict[str, int] = {}


class PatchReport(int):
    """What :func:`patch_peft_model` did: the int value is the number of layers newly patched;
    ``skipped`` maps each LoRA layer left on PEFT's own forward (module path) to the reason."""

    patched: int
    skipped: dict[str, str]

    def __new__(cls, patched: int, skipped: dict[str, str]):
        obj = super().__new__(cls, patched)
        obj.patched, obj.skipped = patched, skipped
        return obj

    def __repr__(self) -> str:
        return f"PatchReport(patched={self.patched}, skipped={self.skipped})"


def _bnb_linear4bit_class() -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def _lora_layer_class() -> type | None:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` is a PEFT 4-bit LoRA layer patched by :func:`patch_peft_model`."""
    return _ORIGINAL_CLASS_ATTR in type(module).__dict__


def _runs_lora_ops_natively(module: nn.Module) -> bool:
    """A LoRA layer PEFT built over a lora_ops NF4Linear (:mod:`lora_ops.integrations.peft_native`):
    it runs the fused op already; nothing to patch."""
    from lora_ops.integrations.peft_native import LoraOpsLinear

    return isinstance(module, LoraOpsLinear)


def _skip_reason(module: nn.Module, bnb_linear4bit: type) -> str | None:
    """Why this PEFT LoRA layer cannot be patched, or None. PEFT wraps a bitsandbytes 4-bit base in
    either its bnb-specific ``lora.bnb.Linear4bit`` or (e.g. for hand-built models) its generic
    ``lora.Linear``; both are LoRA-over-Linear forwards and both are patched."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = module.get_base_layer()
    if not isinstance(base, bnb_linear4bit):
        return f"base layer is {type(base).__name__}, not bitsandbytes Linear4bit"
    try:
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except ImportError:  # pragma: no cover - peft without its bnb module
        PeftLinear4bit = ()
    if not isinstance(module, (PeftLinear, PeftLinear4bit)):
        return f"{type(module).__name__} is not a LoRA-over-Linear layer"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    return None


def _patched_class(cls: type) -> type:
    """A subclass of ``cls`` (PEFT's Linear4bit or generic Linear, or a subclass) with the fused forward.

    Registered as a module global so that patched models stay picklable / deep-copyable."""
    if cls not in _patched_classes:
        name = f"LoraOps{cls.__name__}_{len(_patched_classes)}"
        sub = type(name, (cls,), {"forward": _fused_forward, _ORIGINAL_CLASS_ATTR: cls, "__module__": __name__})
        sub.__qualname__ = name
        setattr(sys.modules[__name__], name, sub)
        _patched_classes[cls] = sub
    return _patched_classes[cls]


def _own_base(base: nn.Module) -> None:
    """Keeps bitsandbytes from repacking a base that lora_ops now computes with (its AVX-512 BF16 CPU
    inference path rounds the absmax to bf16), and undoes a repack that already happened."""
    if _SAVED_REPACK_ATTR not in base.__dict__:
        base.__dict__[_SAVED_REPACK_ATTR] = getattr(base, "support_avx512bf16_for_cpu", None)
    if hasattr(base, "support_avx512bf16_for_cpu"):
        base.support_avx512bf16_for_cpu = False
    qs = getattr(base.weight, "quant_state", None)
    if qs is not None and bnb_cpu_layout.is_repacked(qs):
        bnb_cpu_layout.restore_layout_in_place(base.weight)


def _release_base(base: nn.Module) -> None:
    saved = base.__dict__.pop(_SAVED_REPACK_ATTR, None)
    if saved is not None:
        base.support_avx512bf16_for_cpu = saved


def patch_peft_model(model: nn.Module, strict: bool = True) -> PatchReport:
    """Makes every PEFT LoRA layer over a bitsandbytes ``Linear4bit`` in ``model`` run lora_ops' fused op.

    ``model``: a ``PeftModel`` (or any module containing PEFT LoRA layers). Both ways PEFT wraps a 4-bit
    base are patched: ``peft.tuners.lora.bnb.Linear4bit`` and the generic ``peft.tuners.lora.Linear``
    over a ``bitsandbytes.nn.Linear4bit``. Idempotent. Returns a :class:`PatchReport` (an int: the number
    of layers newly patched; ``.skipped``: every other LoRA layer and why). With ``strict`` (default),
    raises ``RuntimeError`` when the model has LoRA layers but none of them runs lora_ops afterwards,
    so a patch that does nothing cannot go unnoticed. Needs peft and bitsandbytes (they built the model).
    """
    bnb_linear4bit, lora_layer = _bnb_linear4bit_class(), _lora_layer_class()
    if bnb_linear4bit is None or lora_layer is None:
        raise ImportError("patch_peft_model: needs peft and bitsandbytes (the model's 4-bit LoRA layers come from them)")
    patched, skipped, n_lora, n_active = 0, {}, 0, 0
    for path, module in model.named_modules():
        if not isinstance(module, lora_layer):
            continue
        n_lora += 1
        if is_patched(module) or _runs_lora_ops_natively(module):
            n_active += 1
            continue
        reason = _skip_reason(module, bnb_linear4bit)
        if reason is not None:
            skipped[path] = reason
            continue
        _own_base(module.get_base_layer())
        module.__class__ = _patched_class(type(module))
        patched += 1
        n_active += 1
    report = PatchReport(patched, skipped)
    if strict and n_lora and not n_active:
        reasons = sorted(set(skipped.values()))
        raise RuntimeError(f"patch_peft_model: the model has {n_lora} LoRA layers but none could be patched "
                           f"(reasons: {reasons}); pass strict=False to allow this")
    return report


def unpatch_peft_model(model: nn.Module) -> int:
    """Restores PEFT's own classes (and forward) on every layer patched by :func:`patch_peft_model`.
    Returns the number of layers restored."""
    n = 0
    for module in model.modules():
        if is_patched(module):
            module.__class__ = type(module).__dict__[_ORIGINAL_CLASS_ATTR]
            _release_base(module.get_base_layer())
            n += 1
    return n


@contextmanager
def patched(model: nn.Module) -> Iterator[nn.Module]:
    """``with patched(model): ...`` patches for the duration of the block (restores on exit)."""
    patch_peft_model(model)
    try:
        yield model
    finally:
        unpatch_peft_model(model)


def fallback_reasons() -> dict[str, int]:
    """How many forwards fell back to PEFT's own code, by reason (process-wide, for diagnostics)."""
    return dict(_fallback_counts)


# ---- the forward ----------------------------------------------------------------------------------------
def _fallback(layer: nn.Module, reason: str, x: torch.Tensor, args, kwargs) -> torch.Tensor:
    _fallback_counts[reason] = _fallback_counts.get(reason, 0) + 1
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"lora_ops.integrations.peft: {reason}; this layer runs PEFT's own forward "
                      "(warned once per reason)", stacklevel=3)
    return type(layer).__dict__[_ORIGINAL_CLASS_ATTR].forward(layer, x, *args, **kwargs)


def _active_adapters(layer: nn.Module) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _unsupported(layer: nn.Module, base: nn.Module, adapters: list[str], args, kwargs) -> str | None:
    """Why this call cannot run the fused op, or None."""
    if args or kwargs.get("adapter_names") is not None:
        return ("mixed-adapter batches (adapter_names=...)" if kwargs.get("adapter_names") is not None
                else "extra positional arguments to forward")
    if any(v is not None for k, v in kwargs.items()):
        return f"unexpected forward keyword arguments {sorted(kwargs)}"
    qs = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
    if qs is None:
        return "the base weight is not quantized yet"
    if getattr(qs, "quant_type", "nf4") != "nf4":
        return f"quant_type {qs.quant_type!r} (only nf4 is fused)"
    variants = getattr(layer, "lora_variant", {})
    for a in adapters:
        if _is_dora(layer, a):
            if len(adapters) > 1:
                return f"DoRA adapter {a!r} active together with other adapters"
            continue
        if a in variants or layer.use_dora.get(a, False):
            return f"LoRA variant {type(variants.get(a)).__name__ if a in variants else 'DoRA'} (adapter {a!r})"
        if layer.lora_bias.get(a, False):
            return f"lora_bias=True (adapter {a!r})"
    if sum(layer.r[a] for a in adapters) > fmt.MAX_LORA_RANK:
        return f"active adapters of total rank above {fmt.MAX_LORA_RANK}"
    if len(adapters) > 1 and any(_dropout_p(layer, a) > 0 for a in adapters):
        return "several active adapters with dropout in training mode"
    return None


def _is_dora(layer: nn.Module, adapter: str) -> bool:
    """PEFT's DoRA variant with its magnitude module (what the fused DoRA op replaces)."""
    from peft.tuners.lora.variants import DoraLinearVariant

    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return (type(variant) is DoraLinearVariant and adapter in getattr(layer, "lora_magnitude_vector", {})
            and not getattr(layer, "fan_in_fan_out", False))


def _dropout_p(layer: nn.Module, adapter: str) -> float:
    drop = layer.lora_dropout[adapter]
    return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0


def _compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit.forward would compute in for input ``x``."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if not getattr(base, "compute_type_is_set", True):
        base.set_compute_type(x)  # bitsandbytes' own lazy rule (first input decides)
        base.compute_type_is_set = True
    return base.compute_dtype or x.dtype


def _base_nf4(base: nn.Module) -> NF4Weight:
    qs = getattr(base.weight, "quant_state", None) or base.quant_state
    return NF4Weight.from_bnb(base.weight.data, qs)  # zero-copy view of bitsandbytes' tensors


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    self._check_forward_args(x, *args, **kwargs)
    base = self.get_base_layer()
    if self.disable_adapters and self.merged:
        self.unmerge()
    use_adapters = not self.disable_adapters and not self.merged
    adapters = _active_adapters(self) if use_adapters else []
    reason = _unsupported(self, base, adapters, args, kwargs)
    if reason is not None:
        return _fallback(self, reason, x, args, kwargs)

    inp_dtype = x.dtype
    xc = x.to(_compute_dtype(base, x))
    weight = _base_nf4(base)
    bias = base.bias
    if not adapters:
        return qlora_ops.qlora_matmul(xc, weight, bias=bias).to(inp_dtype)

    if len(adapters) == 1:
        a = adapters[0]
        A, B, scale = self.lora_A[a].weight, self.lora_B[a].weight, float(self.scaling[a])
        p = _dropout_p(self, a)
        if _is_dora(self, a):  # QDoRA: the fused DoRA op, PEFT's DoRA dropout semantics
            m = self.lora_magnitude_vector[a].weight
            return dora_ops.dora_linear(xc, weight, A, B, m, scale, bias, p).to(inp_dtype)
    else:
        # Sum of adapters = one adapter of rank r1+r2+... with each B pre-scaled (differentiable,
        # so gradients still reach every adapter's own parameters).
        A = torch.cat([self.lora_A[a].weight.to(torch.float32) for a in adapters], dim=0)
        B = torch.cat([self.lora_B[a].weight.to(torch.float32) * float(self.scaling[a]) for a in adapters], dim=1)
        scale, p = 1.0, 0.0
    return qlora_ops.qlora_linear(xc, weight, A, B, scale, bias, p).to(inp_dtype)
