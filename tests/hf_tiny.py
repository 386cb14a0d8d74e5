"""Tiny random Llama models for the integration tests (no downloads): a LlamaConfig small enough
to load through transformers + bitsandbytes 4-bit on a CPU in a second or two."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    # Every in_features (64, 128) is a multiple of the NF4 blocksize 64: bitsandbytes 0.50's AVX-512 CPU
    # dequantize indexes absmax per row and is wrong when blocks straddle rows, and these models are also
    # its witnesses. Odd sizes are tested against the float64 reference (float64_twin).
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_random_llama(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Saves a randomly initialised tiny Llama (dense, ``dtype``) to ``path``; returns ``path``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    with torch.no_grad():  # LlamaForCausalLM zero-inits nothing we need, but make norms non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def load_bnb_4bit(path: Path, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                  dtype: torch.dtype = torch.float32):
    """The model at ``path`` loaded by transformers with bitsandbytes NF4 quantization on the CPU."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", dtype=dtype)
    from bnb_required import no_bnb_cpu_repack

    return no_bnb_cpu_repack(model)


def reference_weight(linear4bit) -> torch.Tensor:
    """The float64 dense weight of a 4-bit layer (bitsandbytes Linear4bit or lora_ops NF4Linear) decoded
    by the spec oracle (reference.py) from the raw bytes and quant state (neither library's own decode
    is trusted)."""
    from lora_ops import reference
    from lora_ops.nn import NF4Linear

    if isinstance(linear4bit, NF4Linear):
        w = linear4bit.weight
        absmax = reference.nested_absmax(w.absmax, w.absmax2, w.offset) if w.nested else w.absmax
        return reference.nf4_dequantize(w.packed, absmax, w.blocksize, w.shape, torch.float64)
    from bnb_required import spec_absmax

    qs = linear4bit.weight.quant_state
    absmax = spec_absmax(qs)
    return reference.nf4_dequantize(linear4bit.weight.data.view(torch.uint8), absmax, qs.blocksize, qs.shape,
                                     torch.float64)


def float64_twin(peft_model, weights: dict | None = None):
    """A dense float64 LlamaForCausalLM computing what a PEFT LoRA model over 4-bit layers (or a model
    of lora_ops NF4 layers without PEFT) should compute in eval mode: each LoRA layer's weight is dequant(W) + sum of active adapters' scaling * B @ A, in
    float64. ``weights`` (module path -> float64 [N, K]) overrides the decoded base weights."""
    from peft.tuners.lora.layer import LoraLayer
    from transformers import LlamaForCausalLM

    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    twin = LlamaForCausalLM(inner.config).to(torch.float64).eval()
    sd = {}
    for name, mod in inner.named_modules():
        if isinstance(mod, LoraLayer):
            w = (weights or {}).get(name)
            w = reference_weight(mod.get_base_layer()) if w is None else w
            for a in (a for a in mod.active_adapters if a in mod.lora_A):
                w = w + mod.scaling[a] * (mod.lora_B[a].weight.double() @ mod.lora_A[a].weight.double())
            sd[name + ".weight"] = w
    for name, mod in inner.named_modules():  # lora_ops NF4 layers without an adapter
        if type(mod).__name__ == "NF4Linear" and not name.endswith("base_layer"):
            sd[name + ".weight"] = reference_weight(mod)
    for name, p in inner.named_parameters():
        if "lora_" not in name and ".base_layer." not in name and name not in sd:
            sd.setdefault(name, p.detach().double())
    twin.load_state_dict(sd, strict=True)
    return twin


@torch.no_grad()
def randomize_adapters(model):
    """Random (non-zero) LoRA A and B, so the LoRA branch matters in a comparison."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.normal_(0, 0.05 if "lora_B" in name else 0.2)
