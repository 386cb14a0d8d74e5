"""Tiny random Llama models for the integration tests (no downloads): a LlamaConfig small enough
to load through transformers + bitsandbytes 4-bit on a CPU in a second or two."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
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
        return LlamaForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", dtype=dtype)
