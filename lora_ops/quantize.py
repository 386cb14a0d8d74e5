"""quantize_model: a dense model's ``nn.Linear`` layers to frozen NF4 (:class:`lora_ops.nn.NF4Linear`)
in one call, in place, without bitsandbytes; ready for PEFT's ``get_peft_model``."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from lora_ops.nn import NF4Linear

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def matches_target(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's ``target_modules`` rule: a string is a regular expression matched against the full
    module name; a list matches a name equal to an entry or ending in ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _is_peft_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.")


def quantize_model(
    model: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Replaces ``nn.Linear`` layers of ``model`` by frozen NF4 layers (:class:`~lora_ops.nn.NF4Linear`),
    in place, and freezes every parameter of the model. Returns ``model``.

    Args:
        target_modules: which linears, by PEFT's rule (a list of names or name suffixes such as
            ``["q_proj", "v_proj"]``, or a regular expression for the full name). ``None`` or
            ``"all-linear"``: every ``nn.Linear`` except the output head (``get_output_embeddings()``).
        blocksize, double_quant: the NF4 format (``double_quant``: 8-bit absmax, as QLoRA).
        compute_dtype: the matmul dtype (bitsandbytes' ``bnb_4bit_compute_dtype``); ``None``: the input's.
        progress: a progress bar over the layers (tqdm); ``None``: only on a terminal.

    Each layer's base dtype is its weight's dtype (quantize a bf16 model to get bf16 dequantization).
    Weights shared by several modules are quantized once. After this, ``get_peft_model`` wraps the
    NF4 layers in lora_ops' fused LoRA layer (:mod:`lora_ops.integrations.peft_native`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be an nn.Module, got {type(model).__name__}")
    if any(_is_peft_layer(m) for m in model.modules()):
        raise ValueError("quantize_model: the model already has PEFT layers; quantize the base model first, "
                         "then call get_peft_model")
    everything = target_modules is None or (isinstance(target_modules, str) and target_modules.lower() == "all-linear")
    head = _output_head(model) if everything else None
    # remove_duplicate=False: a linear reachable under two names is replaced under both
    linears = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, nn.Linear) and not isinstance(m, NF4Linear) and m is not head]
    chosen = linears if everything else [(n, m) for n, m in linears if matches_target(n, target_modules)]
    if not everything and not chosen:
        names = sorted({n.rpartition(".")[2] for n, _ in linears})
        raise ValueError(f"quantize_model: target_modules={target_modules!r} matches no nn.Linear of the model "
                         f"(its linear layers are named {names})")
    for name, m in chosen:
        w = m.weight
        if w.is_meta:
            raise ValueError(f"quantize_model: '{name}' is on the meta device; load its weights first")
        if w.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"quantize_model: '{name}' has a {w.dtype} weight; NF4 quantizes float32, float16 "
                            "or bfloat16 weights (is this layer already quantized?)")

    done: dict[int, NF4Linear] = {}
    for name, m in _progress(chosen, progress):
        new = done.get(id(m))
        if new is None:
            new = done[id(m)] = NF4Linear.from_linear(m, blocksize, double_quant, compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.requires_grad_(False)
    enable_peft()
    return model


def _progress(items: list, progress: bool | None):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return items
    # tqdm's disable=None means "only on a terminal"
    return tqdm(items, desc="lora_ops: quantizing to NF4", unit="layer", disable=None if progress is None else not progress)


def enable_peft() -> None:
    """Lets PEFT wrap NF4Linear layers in lora_ops' fused LoRA layer (a no-op without PEFT: lora_ops does
    not need it). See :func:`lora_ops.integrations.peft_native.enable`."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return
    from lora_ops.integrations import peft_native

    peft_native.enable()
