"""PEFT over lora_ops' own NF4 layers, no bitsandbytes: ``get_peft_model`` on a model prepared by
:func:`lora_ops.quantize_model` (or loaded by ``hf_checkpoint.load_quantized_model``) wraps each
:class:`lora_ops.nn.NF4Linear` in :class:`LoraOpsLinear`, a PEFT LoRA layer whose forward is lora_ops'
fused NF4 + LoRA op.

    model = lora_ops.quantize_model(model)                     # nn.Linear -> NF4Linear, frozen
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ...train, save_pretrained, PeftModel.from_pretrained, merge_and_unload, disable_adapter...

How PEFT learns about the layer: PEFT's extension point for custom base layers,
``LoraConfig._register_custom_module({NF4Linear: LoraOpsLinear})`` (:func:`register`). Because a
config made by the user, or read back by ``PeftModel.from_pretrained``, does not carry that mapping,
:func:`enable` (called by ``quantize_model`` and the loader) makes PEFT's module factory
(``LoraModel._create_new_module``) add it to any config the moment it meets an ``NF4Linear``: only
layers of that lora_ops class are affected, every other layer type dispatches as before.

Semantics (PEFT's LoRA over a 4-bit base, as ``peft.tuners.lora.bnb.Linear4bit``):

- base: x cast to the base's ``compute_dtype`` (the autocast dtype under ``torch.autocast``, x's own
  dtype when unset), output cast back to x's dtype;
- LoRA: ``scaling · B(A(dropout(x)))`` with the adapters in their own dtype (fp32 by default),
  ``scaling`` read at every call (rsLoRA, ``set_scale``); dropout masks from torch's default generator;
- several active adapters: summed in one fused call when none drops out; with dropout, the first
  adapter is fused and each further one runs PEFT's own arithmetic (its own independent mask);
- ``adapter_names=`` mixed batches run the fused per-row op (lora_ops.integrations.peft_mixed_batch; PEFT's
  own code where that does not apply);
- merging re-quantizes ``dequant(W) + Σ scaling·B·A`` to NF4 (the base's blocksize and double
  quant); ``unmerge`` restores the original base exactly (it is kept while merged).

DoRA (``LoraConfig(use_dora=True)``, QDoRA): the layer runs lora_ops' fused DoRA op
(:mod:`lora_ops.ops.dora`: no dense weight, the base's row norms cached per weight); the magnitude is
PEFT's own ``lora_magnitude_vector`` (same adapter-file keys), started at ``‖W + scaling·B·A‖`` computed
from the NF4 codes; dropout follows PEFT's DoRA semantics; merging re-quantizes
``m/‖W + ΔW‖ ⊙ (W + ΔW)``. A DoRA adapter must be the only active adapter of its layer (PEFT composes
several sequentially, on a dense base; a clear error here).

Not supported (a clear error at ``get_peft_model``): other LoRA variants, ``lora_bias``,
``fan_in_fan_out`` and initialisations that need the dense base weight (PiSSA, OLoRA, LoftQ, ...).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from lora_ops import format as fmt
from lora_ops.nf4 import quantize_nf4
from lora_ops.nn import NF4Linear
from lora_ops.ops import dora as dora_ops
from lora_ops.ops import qlora as qlora_ops

__all__ = ["LoraOpsDoraVariant", "LoraOpsLinear", "enable", "is_enabled", "register"]

_MAX_FUSED_RANK = fmt.MAX_LORA_RANK  # the fused op's rank limit


class LoraOpsLinear(PeftLoraLinear):
    """PEFT's LoRA-over-Linear layer with an :class:`~lora_ops.nn.NF4Linear` base and lora_ops' fused
    forward. Everything else (adapter bookkeeping, ``state_dict`` names, ``set_adapter``,
    ``delete_adapter``, ``scaling``) is PEFT's own."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, NF4Linear):
            raise TypeError(f"LoraOpsLinear: the base layer must be lora_ops.nn.NF4Linear, got {type(base).__name__}")
        if config.fan_in_fan_out:
            raise ValueError("LoraOpsLinear: fan_in_fan_out=True is for Conv1D bases; NF4Linear is [out, in]")
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    # ---- what is supported -----------------------------------------------------------------------------
    @property
    def lora_variants(self):
        # plain LoRA and DoRA: PEFT raises for any other variant requested in the config
        return {(): None, ("use_dora",): LoraOpsDoraVariant}

    def resolve_lora_variant(self, *, config, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as e:
            raise ValueError(f"lora_ops NF4 layers run plain LoRA (rsLoRA included) and DoRA, not other LoRA "
                             f"variants: {e}") from None

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if config.lora_bias:
            raise ValueError("lora_ops NF4 layers: lora_bias=True is not supported")
        init = config.init_lora_weights
        if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
            raise ValueError(f"lora_ops NF4 layers: init_lora_weights={init!r} is not supported "
                             f"(it needs the dense base weight); use True, False or 'gaussian'")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not active or args or any(v is not None for v in kwargs.values()):
            return self.base_layer(x, *args, **kwargs)  # the base alone (it rejects unknown arguments)

        base = self.get_base_layer()
        xc, fused_bias, trainable_bias = base._call_inputs(x, "LoraOpsLinear")
        bias = base.bias

        w, w_meta = base._weight_op_args()
        drops = {a: _dropout_p(self, a) for a in active}
        dora = [a for a in active if a in self.lora_magnitude_vector]
        if dora:
            if len(active) > 1:
                others = [a for a in active if a != dora[0]]
                raise NotImplementedError(f"LoraOpsLinear: DoRA adapter {dora[0]!r} is active together with "
                                          f"{others}; activate one adapter at a time")
            a = dora[0]
            y = dora_ops.dora_linear_args(xc, w, w_meta, self.lora_A[a].weight, self.lora_B[a].weight,
                                          self.lora_magnitude_vector[a].weight, float(self.scaling[a]),
                                          fused_bias, drops[a])
            if trainable_bias:
                y = y + bias.to(y.dtype)
            return y.to(x.dtype)
        if len(active) > 1 and not any(drops.values()) and sum(self.r[a] for a in active) <= _MAX_FUSED_RANK:
            # Sum of adapters = one adapter of rank r1+r2+... with each B pre-scaled (differentiable,
            # so gradients reach every adapter's own parameters).
            A = torch.cat([self.lora_A[a].weight.to(torch.float32) for a in active], dim=0)
            B = torch.cat([self.lora_B[a].weight.to(torch.float32) * float(self.scaling[a]) for a in active], dim=1)
            y = qlora_ops.qlora_linear_args(xc, w, w_meta, A, B, 1.0, fused_bias, 0.0)
            rest = []
        else:
            first, rest = active[0], active[1:]
            p = drops[first]
            y = qlora_ops.qlora_linear_args(xc, w, w_meta, self.lora_A[first].weight, self.lora_B[first].weight,
                                            float(self.scaling[first]), fused_bias, p)
        if trainable_bias:
            y = y + bias.to(y.dtype)
        for a in rest:  # PEFT's own arithmetic: an independent dropout mask per adapter
            xa = self._cast_input_dtype(x, self.lora_A[a].weight.dtype)
            y = y + (self.lora_B[a](self.lora_A[a](self.lora_dropout[a](xa))) * self.scaling[a]).to(y.dtype)
        return y.to(x.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        from lora_ops.integrations.peft_mixed_batch import mixed_batch_forward

        return mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)

    # ---- merging --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Folds the adapters into the base: NF4 re-quantization of ``dequant(W) + Σ scaling·B·A``."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        original = self._lora_ops_unmerged_base if self.merged_adapters else base.weight
        unmerged = original.dequantize(torch.float32)
        merged = base.weight.dequantize(torch.float32)
        for a in adapter_names:
            delta = self.get_delta_weight(a).to(torch.float32)
            if a in self.lora_magnitude_vector:
                # PEFT's DoRA merge: m/‖W + ΔW‖ ⊙ (W' + ΔW), the norm from the unmerged base W (as forward
                # computes it), W' the weight so far (it holds adapters merged before this one)
                norm = torch.linalg.vector_norm(unmerged.double() + delta.double(), dim=1)
                factor = (self.lora_magnitude_vector[a].weight.detach().double() / norm).float()
                merged = factor[:, None] * (merged + delta)
            else:
                merged += delta
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapters {adapter_names} seem to be broken")
        if not self.merged_adapters:
            self._lora_ops_unmerged_base = original  # unmerge() restores it exactly
        base.set_weight(quantize_nf4(merged.to(original.dtype), original.blocksize, original.nested))
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restores the base as it was before the first merge (bit for bit)."""
        if not self.merged:
            return
        base = self.get_base_layer()
        base.set_weight(self._lora_ops_unmerged_base.to(base.weight.device))
        self._lora_ops_unmerged_base = None
        self.merged_adapters.clear()


class LoraOpsDoraVariant(DoraLinearVariant):
    """PEFT's DoRA variant over an :class:`~lora_ops.nn.NF4Linear`: PEFT's own magnitude module
    (``lora_magnitude_vector[adapter]``, a ``DoraLinearLayer`` whose ``weight`` is m), started at
    ``‖W + scaling·B·A‖`` per row computed from the NF4 codes (PEFT's init dequantizes the whole base).
    Forward and merging are :class:`LoraOpsLinear`'s."""

    @staticmethod
    def init(module: LoraOpsLinear, adapter_name: str, **kwargs) -> None:
        if not module.lora_magnitude_vector:  # the first DoRA adapter: m becomes an adapter parameter
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        A, B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        w, w_meta = module.get_base_layer()._weight_op_args()
        norm = dora_ops.weight_norm_args(w, w_meta, A, B, float(module.scaling[adapter_name]))
        magnitude = DoraLinearLayer(fan_in_fan_out=False)
        magnitude.weight = torch.nn.Parameter(norm.to(A.dtype), requires_grad=True)
        module.lora_magnitude_vector[adapter_name] = magnitude


def _dropout_p(layer: PeftLoraLinear, adapter: str) -> float:
    drop = layer.lora_dropout[adapter]
    return float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0


# ---- telling PEFT --------------------------------------------------------------------------------------------
def register(config):
    """Adds ``{NF4Linear: LoraOpsLinear}`` to a ``LoraConfig`` (PEFT's custom-module extension point);
    returns the config. Not needed after :func:`enable`, which does it for every config."""
    config._register_custom_module({NF4Linear: LoraOpsLinear})
    return config


_ENABLED_ATTR = "_lora_ops_enabled"


def is_enabled() -> bool:
    """True once :func:`enable` has run in this process."""
    fn = getattr(LoraModel.__dict__.get("_create_new_module"), "__func__", None)
    return bool(getattr(fn, _ENABLED_ATTR, False))


def enable() -> None:
    """Makes PEFT wrap every :class:`~lora_ops.nn.NF4Linear` in :class:`LoraOpsLinear`, for every
    ``LoraConfig`` (including those read by ``PeftModel.from_pretrained``). Idempotent; other layer
    types are not affected."""
    if is_enabled():
        return
    original = LoraModel.__dict__.get("_create_new_module")
    if not isinstance(original, staticmethod):
        raise RuntimeError("lora_ops.integrations.peft_native.enable: this PEFT version has no "
                           "LoraModel._create_new_module; call register(config) on each LoraConfig instead")
    create = original.__func__

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, NF4Linear):
            register(lora_config)
        return create(lora_config, adapter_name, target, **kwargs)

    _create_new_module.__dict__[_ENABLED_ATTR] = True
    _create_new_module.__wrapped__ = create
    LoraModel._create_new_module = staticmethod(_create_new_module)
