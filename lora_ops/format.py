"""Facts of the storage format (``shared/spec/nf4-format.md``) and of the kernels' limits, stated once.

The library reads them from here; the float64 oracle (:mod:`lora_ops.reference`) imports them too, so
a fact never lives only in the test oracle. The C++ side states the same facts once, in
``csrc/kernels/common/nf4_format.h`` (and ``kMaxLoraRank`` in ``qlora_params.h``).
"""

from __future__ import annotations

import functools

import torch

# ---- Section 1: the NF4 codebook, index = 4-bit code ---------------------------------------------
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# Code 7 is the exact zero: zero blocks, partial-block padding and the odd last nibble use it.
NF4_ZERO_CODE = 7
# Section 2: the 4-bit blocksizes the format allows.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# ---- Section 5: double quantization of absmax ------------------------------------------------------
# The nested (8-bit) blocksize is always 256, whatever the 4-bit blocksize.
NESTED_BLOCKSIZE = 256
# Index of 0.0 in the signed dynamic map (the code of an all-zero nested block).
DYNAMIC_MAP_ZERO_CODE = 127


@functools.lru_cache(maxsize=1)
def _dynamic_map_values() -> tuple[float, ...]:
    values: list[float] = []
    for i in range(7):
        points = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        means = (points[:-1] + points[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return tuple(values)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry signed dynamic map of section 5 (ascending float32), computed as the spec states
    it; a fresh tensor on every call (callers may keep or modify it)."""
    return torch.tensor(_dynamic_map_values(), dtype=torch.float32, device=device)


# ---- LoRA ------------------------------------------------------------------------------------------
# Largest LoRA rank the kernels support (fixed-size tiles of the rank dimension; C++: kMaxLoraRank).
MAX_LORA_RANK = 256

# ---- Section 6: Hugging Face 4-bit checkpoint keys ---------------------------------------------------
# A layer whose weight key is P holds P itself (the packed codes) and P.<suffix> for each suffix below.
HF_ABSMAX = "absmax"
HF_QUANT_MAP = "quant_map"
HF_NESTED_ABSMAX = "nested_absmax"
HF_NESTED_QUANT_MAP = "nested_quant_map"
HF_QUANT_STATE = "quant_state.bitsandbytes__nf4"  # JSON metadata blob (uint8)
HF_SUFFIXES = (HF_ABSMAX, HF_QUANT_MAP, HF_NESTED_ABSMAX, HF_NESTED_QUANT_MAP, HF_QUANT_STATE)
