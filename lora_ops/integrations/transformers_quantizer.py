"""``from_pretrained(..., quantization_config=lora_ops.NF4Config())``: lora_ops' NF4 as a transformers
quantization method (``quant_method: "lora_ops"``), through transformers' public extension point
(``register_quantization_config`` / ``register_quantizer``, transformers >= 5).

Loading a dense checkpoint quantizes each targeted ``nn.Linear`` weight as it is read, one tensor at a time,
into the frozen :class:`lora_ops.nn.NF4Linear` layers :func:`lora_ops.quantize_model` makes (default: every
linear except the output head). ``save_pretrained`` writes the bitsandbytes 4-bit tensor keys (spec section
6) plus ``quantization_config = {"quant_method": "lora_ops", ...}``; ``from_pretrained`` reads them back
byte-exact. A checkpoint saved by bitsandbytes (``*-bnb-4bit``) loads through the same quantizer without
bitsandbytes: ``from_pretrained(path, config=lora_ops.bnb_checkpoint_config(path))``.

No bitsandbytes is imported anywhere here: the loaded model says ``is_loaded_in_4bit = True`` (what PEFT's
``prepare_model_for_kbit_training`` and TRL look at), and its ``num_parameters`` is replaced by one that
does not import bitsandbytes (transformers' own does whenever ``is_loaded_in_4bit`` is set).
"""

from __future__ import annotations

import os
import re
import types
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from lora_ops import format as fmt
from lora_ops.nf4 import NF4Weight, quantize_nf4
from lora_ops.nf4_tensor import NF4Tensor
from lora_ops.nn import NF4Linear

QUANT_METHOD = "lora_ops"
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The checkpoint entries of one quantized weight (bitsandbytes' names); fp4 only to refuse it by name.
_FP4_STATE = "quant_state.bitsandbytes__fp4"
SERIALIZED_NAMES = ["weight", *(f"weight.{s}" for s in fmt.HF_SUFFIXES), f"weight.{_FP4_STATE}"]


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"NF4Config: compute_dtype must be one of {sorted(_FLOAT_DTYPES)} or None, got {dtype!r}")
    return name


class NF4Config(QuantizationConfigMixin):
    """lora_ops' NF4 quantization for ``from_pretrained(..., quantization_config=NF4Config())``.

    Args:
        blocksize: 4-bit block size (32 .. 4096, a power of two; bitsandbytes' default 64).
        double_quant: 8-bit absmax (nested blocksize 256), as QLoRA (bitsandbytes' ``bnb_4bit_use_double_quant``).
        compute_dtype: the matmul dtype (``bnb_4bit_compute_dtype``): a torch dtype, its name, or None (the input's).
        modules_to_not_convert: linears to keep dense: a module name, a name suffix, a regular expression
            matched from the start of the name (transformers' rule), or an enclosing module's name (``"mlp"``);
            the output head is always kept dense.
    """

    def __init__(self, blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | str | None = None,
                 modules_to_not_convert: list[str] | None = None, **kwargs: Any):
        kwargs.pop("quant_method", None)
        quant_type = kwargs.pop("quant_type", "nf4")
        if kwargs:
            raise TypeError(f"NF4Config: unknown arguments {sorted(kwargs)}")
        if quant_type != "nf4":
            raise ValueError(f"NF4Config: quant_type must be 'nf4', got {quant_type!r}")
        if blocksize not in fmt.BLOCKSIZES:
            raise ValueError(f"NF4Config: blocksize must be one of {fmt.BLOCKSIZES}, got {blocksize!r}")
        if not isinstance(double_quant, bool):
            raise TypeError(f"NF4Config: double_quant must be a bool, got {double_quant!r}")
        if modules_to_not_convert is not None and (
                isinstance(modules_to_not_convert, str) or not all(isinstance(m, str) for m in modules_to_not_convert)):
            raise TypeError(f"NF4Config: modules_to_not_convert must be a list of names, got {modules_to_not_convert!r}")
        self.quant_method = QUANT_METHOD
        self.quant_type = "nf4"
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = _dtype_name(compute_dtype)
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        return _FLOAT_DTYPES[self.compute_dtype] if self.compute_dtype else None

    @classmethod
    def from_bnb(cls, bnb_config: dict | Any) -> NF4Config:
        """The NF4Config of a bitsandbytes 4-bit ``quantization_config`` (a dict from ``config.json`` or a
        ``BitsAndBytesConfig``). ValueError for 8-bit or fp4 checkpoints, naming what they are."""
        d = bnb_config if isinstance(bnb_config, dict) else bnb_config.to_dict()
        if d.get("quant_method") == QUANT_METHOD:
            return cls.from_dict(d)
        if d.get("load_in_8bit"):
            raise ValueError("NF4Config.from_bnb: the checkpoint is bitsandbytes 8-bit (LLM.int8), not 4-bit NF4")
        if not d.get("load_in_4bit"):
            raise ValueError(f"NF4Config.from_bnb: not a bitsandbytes 4-bit quantization_config: {d}")
        quant_type = d.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default is fp4
        if quant_type != "nf4":
            raise ValueError(f"NF4Config.from_bnb: the checkpoint's 4-bit quant type is {quant_type!r}; lora_ops "
                             "reads only 'nf4'")
        compute = d.get("bnb_4bit_compute_dtype")
        return cls(double_quant=bool(d.get("bnb_4bit_use_double_quant", False)),
                   compute_dtype=None if compute in (None, "float32") else compute,
                   modules_to_not_convert=d.get("llm_int8_skip_modules"))


def bnb_checkpoint_config(path: str | os.PathLike, **config_kwargs: Any):
    """The ``config`` to pass to ``from_pretrained`` so that a checkpoint saved from a bitsandbytes 4-bit NF4
    model loads through lora_ops (no bitsandbytes needed)::

        model = AutoModelForCausalLM.from_pretrained(path, config=lora_ops.bnb_checkpoint_config(path))

    ``config_kwargs`` go to ``AutoConfig.from_pretrained``. ValueError for a checkpoint that is not 4-bit
    NF4 (fp4, 8-bit, dense), naming what it is."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise ValueError(f"bnb_checkpoint_config: {path} has no quantization_config; load the dense checkpoint "
                         "with from_pretrained(path, quantization_config=lora_ops.NF4Config())")
    config.quantization_config = NF4Config.from_bnb(qc).to_dict()
    return config


# ---- the conversion ops: one tensor at a time ---------------------------------------------------------------
class _PassThrough(ConversionOps):
    """The reverse of the load ops for ``save_pretrained``: the state dict it gets is already in the
    checkpoint's layout (:meth:`LoraOpsNF4Quantizer.get_state_dict_and_metadata`)."""

    def convert(self, input_dict, **kwargs):
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return self


def _frozen(w: NF4Weight) -> nn.Parameter:
    return nn.Parameter(NF4Tensor.from_nf4(w), requires_grad=False)


class NF4Quantize(ConversionOps):
    """A dense weight as it is read -> the NF4 parameter of its NF4Linear (on the device it was read to)."""

    def __init__(self, hf_quantizer: LoraOpsNF4Quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, **kwargs):
        cfg = self.hf_quantizer.quantization_config
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            if getattr(module, "_lora_ops_from_conv1d", False):
                value = value.t()  # Conv1D stores [in, out]
            if not value.is_floating_point() or value.dtype == torch.float64:
                raise TypeError(f"{name}: NF4 quantizes float32, float16 or bfloat16 weights, got {value.dtype}")
            out[name] = _frozen(quantize_nf4(value.contiguous(), cfg.blocksize, cfg.double_quant))
            module.blocksize, module.base_dtype = cfg.blocksize, value.dtype
        return out

    @property
    def reverse_op(self) -> ConversionOps:
        return _PassThrough()


class NF4Deserialize(ConversionOps):
    """The checkpoint entries of one ``*.weight`` (bitsandbytes' six, or one dense tensor for the layers left
    unquantized: the ``weight`` pattern also catches norms and embeddings) -> the module's parameter."""

    def __init__(self, hf_quantizer: LoraOpsNF4Quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        entries = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        if f"weight.{_FP4_STATE}" in entries:
            raise ValueError(f"{full_layer_name}: the checkpoint holds bitsandbytes fp4; lora_ops reads only nf4")
        if not isinstance(module, NF4Linear):
            if set(entries) != {"weight"}:
                raise ValueError(f"{full_layer_name}: 4-bit entries {sorted(entries)} for a "
                                 f"{type(module).__name__}, which is not quantized in this model")
            value = entries["weight"]
            expected = model.get_parameter_or_buffer(full_layer_name)
            if value.is_floating_point() and value.dtype != expected.dtype:  # as the loader casts others
                value = value.to(expected.dtype)
            return {"weight": value}
        if f"weight.{fmt.HF_QUANT_STATE}" not in entries:
            raise ValueError(f"{full_layer_name}: no 'weight.{fmt.HF_QUANT_STATE}' entry: the checkpoint does not "
                             "hold this layer in 4-bit NF4")
        w = NF4Weight.from_hf_state_dict(entries, "weight")
        module.blocksize, module.base_dtype = w.blocksize, w.dtype
        return {"weight": _frozen(w)}

    @property
    def reverse_op(self) -> ConversionOps:
        return _PassThrough()


# ---- the quantizer ------------------------------------------------------------------------------------------
def _skipped(name: str, patterns: list[str]) -> bool:
    # transformers' rule (quantizers_utils.should_convert_module): a prefix up to a module boundary, a regular
    # expression with the same boundary, or a suffix; and any enclosing module of that name ("mlp").
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) or f".{p}." in f".{name}."
               for p in patterns)


def _checkpoint_keys(files: list[str] | None) -> list[str]:
    keys: list[str] = []
    for f in files or ():
        if str(f).endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as h:
                keys.extend(h.keys())
        else:
            keys.extend(torch.load(f, map_location="meta", weights_only=True, mmap=True).keys())
    return keys


def _num_parameters(model, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """transformers' ``num_parameters`` without its bitsandbytes branch: an NF4 parameter counts the elements
    of the dense weight it stands for."""
    skip = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else ()
    return sum(p.numel() for n, p in model.named_parameters() if n not in skip and (p.requires_grad or not only_trainable))


class LoraOpsNF4Quantizer(HfQuantizer):
    """transformers' quantizer for :class:`NF4Config` (see the module docstring)."""

    requires_calibration = False
    quantization_config: NF4Config
    serialized_names: ClassVar[dict[str, list[str]]] = {"weight": SERIALIZED_NAMES}

    @property
    def quantized_element_size(self) -> float:
        return 0.5  # what device_map="auto" budgets per element of a layer that gets quantized

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            on_disk = sorted(k for k, v in device_map.items() if v == "disk")
            raise ValueError(f"lora_ops NF4: disk offload is not supported (device_map puts {on_disk[:4]} on "
                             "'disk'); give max_memory room on the GPUs/CPU, or device_map='cpu'")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, NF4Linear) and name == "weight"

    def _targets(self, model, checkpoint_files) -> list[str]:
        """The linear layers to make NF4: those the checkpoint holds in 4-bit (pre-quantized), else every
        ``nn.Linear`` (or ``Conv1D``) but the output head and the skipped names."""
        from transformers.pytorch_utils import Conv1D

        linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, Conv1D)}
        if self.pre_quantized:
            keys = _checkpoint_keys(checkpoint_files)
            fp4 = [k for k in keys if k.endswith(_FP4_STATE)]
            if fp4:
                raise ValueError(f"lora_ops NF4: the checkpoint's 4-bit layers are bitsandbytes fp4 ({fp4[0]}); "
                                 "lora_ops reads only nf4")
            suffix = f".weight.{fmt.HF_QUANT_STATE}"
            quantized = [k[: -len(suffix)] for k in keys if k.endswith(suffix)]
            if checkpoint_files and not quantized:
                raise ValueError("lora_ops NF4: the checkpoint says quant_method 'lora_ops' but holds no NF4 layer")
            not_linear = [k for k in quantized if k not in linears]
            if not_linear:
                raise ValueError(f"lora_ops NF4: checkpoint NF4 layers {not_linear[:4]} are not linear layers of "
                                 f"{type(model).__name__}")
            return quantized
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip = list(self.quantization_config.modules_to_not_convert or []) + list(model._keep_in_fp32_modules or [])
        return [n for n, m in linears.items() if m is not head and not _skipped(n, skip)]

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from transformers.pytorch_utils import Conv1D

        compute = self.quantization_config.torch_compute_dtype
        for name in self._targets(model, checkpoint_files):
            old = model.get_submodule(name)
            conv1d = isinstance(old, Conv1D)
            in_f, out_f = old.weight.shape if conv1d else (old.in_features, old.out_features)
            new = NF4Linear.unloaded(in_f, out_f, old.bias is not None, old.weight.dtype, compute,
                                     device=old.weight.device)
            new._lora_ops_from_conv1d = conv1d and not self.pre_quantized
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        unloaded = [n for n, m in model.named_modules() if isinstance(m, NF4Linear) and not m.base_loaded]
        if unloaded:
            raise ValueError(f"lora_ops NF4: no checkpoint weight for the NF4 layers {unloaded[:4]}")
        # The load ops need no reverse on save (get_state_dict_and_metadata writes the checkpoint layout).
        model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or []
                                     if not any(isinstance(op, (NF4Deserialize, NF4Quantize))
                                                for op in getattr(c, "operations", ()))]
        model.is_loaded_in_4bit = True
        model.num_parameters = types.MethodType(_num_parameters, model)
        from lora_ops.quantize import enable_peft

        enable_peft()
        return model

    def get_quantize_ops(self):
        return NF4Quantize(self)

    def get_load_operations(self):
        return {"deserialize": NF4Deserialize}

    def get_state_dict_and_metadata(self, model):
        """The model's tensors with each NF4 layer in bitsandbytes' 4-bit keys (byte-identical entries)."""
        from lora_ops.integrations.hf_checkpoint import nf4_model_state_dict

        sd = nf4_model_state_dict(model)
        seen: set[int] = set()
        for k, v in sd.items():  # safetensors refuses shared storage (one codebook for every layer): copy those
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen:
                sd[k] = v.clone()
            seen.add(ptr)
        return sd, {}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Registers ``"lora_ops"`` with transformers (idempotent; done when lora_ops is imported)."""
    from transformers.quantizers import auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not NF4Config:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(NF4Config)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LoraOpsNF4Quantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LoraOpsNF4Quantizer)


register()

__all__ = ["QUANT_METHOD", "LoraOpsNF4Quantizer", "NF4Config", "bnb_checkpoint_config", "register"]
