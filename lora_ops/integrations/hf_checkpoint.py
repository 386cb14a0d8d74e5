"""Hugging Face "4-bit" (bitsandbytes NF4) checkpoints, read and written without bitsandbytes.

A checkpoint saved by transformers from a model loaded with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` holds, for every quantized
linear layer ``P``, the keys of spec section 6 (``P.weight``, ``P.weight.absmax``,
``P.weight.quant_map``, ``P.weight.nested_absmax``, ``P.weight.nested_quant_map``,
``P.weight.quant_state.bitsandbytes__nf4``). This module splits such a state dict into
:class:`~lora_ops.nf4.NF4Weight` objects plus the ordinary tensors, writes them back in the same
form (byte-identical), reads/writes safetensors files (single or sharded), and turns a whole
checkpoint directory into a transformers model whose quantized linears are lora_ops
``NF4Linear`` (PEFT-ready) or ``QLoRALinear`` layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_ops import format as fmt
from lora_ops.nf4 import NF4Weight

QUANT_STATE_SUFFIX = "." + fmt.HF_QUANT_STATE
# Every key an NF4 layer contributes besides ``P.weight`` itself (spec section 6).
_NF4_AUX_SUFFIXES = tuple("." + s for s in fmt.HF_SUFFIXES)


def nf4_weight_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The weight keys (``"model.layers.0.self_attn.q_proj.weight"``, ...) of every NF4 layer in
    ``state_dict``, in the state dict's order."""
    return [k[: -len(QUANT_STATE_SUFFIX)] for k in state_dict if k.endswith(QUANT_STATE_SUFFIX)]


def split_nf4_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, NF4Weight], dict[str, torch.Tensor]]:
    """Splits a bitsandbytes-format state dict into ``(weights, other)``.

    ``weights`` maps each NF4 weight key to its :class:`NF4Weight` (tensors shared, not copied);
    ``other`` holds every remaining tensor (embeddings, norms, biases, unquantized layers) unchanged.
    Raises ``ValueError`` for a 4-bit layer that is not NF4 (e.g. FP4) and ``KeyError`` when one of
    a layer's entries is missing."""
    weights: dict[str, NF4Weight] = {}
    consumed: set[str] = set()
    for key in nf4_weight_keys(state_dict):
        if key not in state_dict:
            raise KeyError(f"split_nf4_state_dict: '{key}{QUANT_STATE_SUFFIX}' present but '{key}' missing")
        weights[key] = NF4Weight.from_hf_state_dict(state_dict, key)
        consumed.add(key)
        consumed.update(key + s for s in _NF4_AUX_SUFFIXES if key + s in state_dict)
    other = {k: v for k, v in state_dict.items() if k not in consumed}
    return weights, other


def join_nf4_state_dict(
    weights: Mapping[str, NF4Weight], other: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_nf4_state_dict`: one state dict in bitsandbytes' layout."""
    out: dict[str, torch.Tensor] = dict(other or {})
    for key, w in weights.items():
        entries = w.hf_state_dict(key)
        clash = set(entries) & set(out)
        if clash:
            raise ValueError(f"join_nf4_state_dict: keys {sorted(clash)} given both as NF4 and as plain tensors")
        out.update(entries)
    return out


# ---- files -------------------------------------------------------------------------------------------
def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise FileNotFoundError(f"no model.safetensors(.index.json) or pytorch_model*.bin in {path}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file or directory (safetensors, sharded safetensors or
    ``pytorch_model*.bin``), on the CPU."""
    out: dict[str, torch.Tensor] = {}
    for f in _checkpoint_files(Path(path)):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            out.update(load_file(str(f)))
        else:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def load_nf4_checkpoint(path: str | os.PathLike) -> tuple[dict[str, NF4Weight], dict[str, torch.Tensor]]:
    """``split_nf4_state_dict(load_state_dict_file(path))``: a 4-bit checkpoint without bitsandbytes."""
    return split_nf4_state_dict(load_state_dict_file(path))


def save_nf4_checkpoint(
    path: str | os.PathLike,
    weights: Mapping[str, NF4Weight],
    other: Mapping[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes one safetensors file in bitsandbytes' 4-bit layout (``metadata`` defaults to
    ``{"format": "pt"}``, what transformers writes)."""
    from safetensors.torch import save_file

    sd = join_nf4_state_dict(weights, other)
    seen: set[int] = set()
    for k, v in sd.items():
        v = v.detach().contiguous().cpu()
        # safetensors refuses tensors sharing storage (e.g. one codebook for every layer): copy those.
        ptr = v.untyped_storage().data_ptr()
        sd[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    save_file(sd, str(path), metadata=metadata if metadata is not None else {"format": "pt"})


# ---- whole models -------------------------------------------------------------------------------------
def _parent_and_name(model: torch.nn.Module, module_path: str) -> tuple[torch.nn.Module, str]:
    parent_path, _, name = module_path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def qlora_from_nf4(weight: NF4Weight, bias: torch.Tensor | None = None, r: int = 16, lora_alpha: float = 32.0,
                   lora_dropout: float = 0.0, use_rslora: bool = False,
                   adapter_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A :class:`lora_ops.nn.QLoRALinear` whose frozen base IS ``weight`` (its tensors are shared,
    nothing is re-quantized), with fresh PEFT-style adapters (A Kaiming-uniform, B zero)."""
    from lora_ops.nn import QLoRALinear

    out_f, in_f = weight.shape
    # Built on the meta device so that the constructor's placeholder base costs nothing.
    layer = QLoRALinear(in_f, out_f, r, lora_alpha, lora_dropout, bias is not None, use_rslora, weight.blocksize,
                        weight.nested, weight.dtype, adapter_dtype, device="meta")
    layer = layer.to_empty(device=weight.device)
    layer._set_base(weight)
    layer.reset_lora_parameters()
    if bias is not None:
        layer.bias = bias.detach()
    return layer


def replace_linears_with_nf4(
    model: torch.nn.Module,
    weights: Mapping[str, NF4Weight],
    biases: Mapping[str, torch.Tensor] | None = None,
    target_modules=None,
    compute_dtype: torch.dtype | None = None,
    **qlora_kwargs,
) -> list[str]:
    """Replaces each ``nn.Linear`` whose ``<path>.weight`` is a key of ``weights`` by a lora_ops layer over
    that NF4 weight (shared, not copied): a frozen :class:`lora_ops.nn.NF4Linear` (``compute_dtype``), or,
    when ``qlora_kwargs`` are given (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
    ``adapter_dtype``), a :class:`lora_ops.nn.QLoRALinear` for the layers matching ``target_modules``
    (PEFT's rule, see :func:`lora_ops.quantize.matches_target`; None: all). ``biases`` maps
    ``<path>.bias`` to a bias tensor. Returns the replaced module paths."""
    from lora_ops.nn import NF4Linear
    from lora_ops.quantize import matches_target

    replaced = []
    for key, w in weights.items():
        if not key.endswith(".weight"):
            raise ValueError(f"replace_linears_with_nf4: '{key}' is not a '<module>.weight' key")
        path = key[: -len(".weight")]
        parent, name = _parent_and_name(model, path)
        old = getattr(parent, name)
        if not isinstance(old, torch.nn.Linear):
            raise TypeError(f"replace_linears_with_nf4: '{path}' is a {type(old).__name__}, not nn.Linear")
        if tuple(w.shape) != (old.out_features, old.in_features):
            raise ValueError(f"'{path}': checkpoint shape {tuple(w.shape)} != module {tuple(old.weight.shape)}")
        bias = None
        if old.bias is not None:
            bias = (biases or {}).get(path + ".bias")
            if bias is None:
                raise KeyError(f"'{path}' has a bias but the checkpoint holds no '{path}.bias'")
        if qlora_kwargs and (target_modules is None or matches_target(path, target_modules)):
            new = qlora_from_nf4(w, bias, **qlora_kwargs)
        else:
            new = NF4Linear(w, bias, compute_dtype)
        setattr(parent, name, new)
        replaced.append(path)
    return replaced


def load_quantized_model(path: str | os.PathLike, model_class=None, target_modules=None,
                         compute_dtype: torch.dtype | None = None, **qlora_kwargs) -> torch.nn.Module:
    """A transformers model from a 4-bit checkpoint directory (``config.json`` + weights, as saved from a
    bitsandbytes 4-bit model); no bitsandbytes needed. Every parameter is frozen except LoRA adapters.

    Without ``qlora_kwargs``: every quantized linear becomes a frozen :class:`lora_ops.nn.NF4Linear`,
    ready for PEFT's ``get_peft_model`` (as after :func:`lora_ops.quantize_model`). With them (``r``,
    ``lora_alpha``, ``lora_dropout``, ...): the quantized linears matching ``target_modules`` (PEFT's
    rule; None: all) become :class:`lora_ops.nn.QLoRALinear` layers with fresh adapters, the others
    ``NF4Linear``. ``model_class`` defaults to ``AutoModelForCausalLM``. A checkpoint without 4-bit
    layers raises ``ValueError`` (quantize a dense model with :func:`lora_ops.quantize_model`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_ops.nn import QLoRALinear

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the NF4 layers are ours; no bitsandbytes quantizer
    weights, other = load_nf4_checkpoint(path)
    if not weights:
        raise ValueError(f"load_quantized_model: {path} holds no NF4 (4-bit) layers; load a dense model with "
                         "transformers and call lora_ops.quantize_model(model)")
    dtype = next((w.dtype for w in weights.values()), torch.float32)
    with init_empty_weights(include_buffers=False):
        model = (model_class or AutoModelForCausalLM).from_config(config, dtype=dtype)
    replaced = replace_linears_with_nf4(model, weights, other, target_modules, compute_dtype, **qlora_kwargs)
    if qlora_kwargs and not any(isinstance(m, QLoRALinear) for m in model.modules()):
        raise ValueError(f"load_quantized_model: target_modules={target_modules!r} matches none of the "
                         f"quantized layers {sorted({p.rpartition('.')[2] for p in replaced})}")
    biases = {p + ".bias" for p in replaced}
    plain = {k: v for k, v in other.items() if k not in biases}
    _missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    if unexpected:
        raise KeyError(f"load_quantized_model: checkpoint keys not in the model: {unexpected[:8]}")
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise KeyError(f"load_quantized_model: no checkpoint entry for {still_meta[:8]}")
    for name, p in model.named_parameters():  # the base is frozen; only LoRA adapters train
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    from lora_ops.quantize import enable_peft

    enable_peft()
    return model


def nf4_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a model whose NF4 layers are ``QLoRALinear`` or ``NF4Linear`` in bitsandbytes' 4-bit layout
    (what :func:`load_quantized_model` reads back). LoRA adapter tensors are left out: save them
    separately (they are what changes during fine-tuning)."""
    from lora_ops.nn import NF4Linear, QLoRALinear

    qlora_paths = {n for n, m in model.named_modules() if isinstance(m, (QLoRALinear, NF4Linear))}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        while owner and owner not in qlora_paths:
            owner = owner.rpartition(".")[0]
        if not owner:
            out[key] = value
    for path in sorted(qlora_paths):
        layer = model.get_submodule(path)
        out.update(layer.hf_base_state_dict(f"{path}."))
    return out

