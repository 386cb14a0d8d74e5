"""bitsandbytes' CPU inference layout, undone: recover the format-of-record NF4 bytes from a weight that
bitsandbytes (0.50.x) repacked for its AVX-512 BF16 CPU kernel.

On a CPU with avx512_bf16, ``bitsandbytes.nn.Linear4bit.forward`` in eval mode with an input that does
not require grad rewrites the layer's weight in place (``quant_state.packing_format_for_cpu = True``):

- codes: the ``[N, K]`` code matrix is cut into groups of 32 output rows; for each group and each pair
  of columns ``(2c, 2c+1)`` the 64 codes ``C[32g + i, 2c + j]`` are laid out at position ``2i + j`` of a
  64-code run, and the run is stored as 32 bytes, byte ``b`` = ``(run[32 + b] << 4) | run[b]``. The
  result is viewed as ``[N, K/2]`` uint8. This re-layout is lossless (needs N % 32 == 0, K even).
- absmax: decoded from its nested (double-quant) form if any, then stored as **bfloat16** ``[K/blocksize,
  N]`` (needs K % blocksize == 0); ``quant_state.dtype`` becomes bfloat16, the original is kept in
  ``quant_state.original_dtype``. The bfloat16 rounding is lossy: it cannot be undone.

:func:`nf4_from_repacked` inverts the code layout exactly and keeps the absmax bfloat16 values (as
float32, non-nested), warning once that the layer now computes with bf16-rounded scales.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

_GROUP_ROWS = 32  # output rows per repacked group (bitsandbytes' block_n)
_warned = False


def is_repacked(quant_state: Any) -> bool:
    """True when bitsandbytes' CPU inference path has re-laid this quant state's weight."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def warn_precision_loss_once() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        "lora_ops: this bitsandbytes 4-bit weight was repacked by bitsandbytes' AVX-512 BF16 CPU inference "
        "path (quant_state.packing_format_for_cpu), which rounds its absmax scales to bfloat16. lora_ops "
        "recovers the codes exactly but computes with the bf16-rounded scales, so results differ from the "
        "checkpoint by that rounding. To keep full precision, convert or patch the model before its first "
        "eval-mode forward (lora_ops.integrations.peft.patch_peft_model does this), or set "
        "`layer.support_avx512bf16_for_cpu = False` on bitsandbytes' Linear4bit layers. (Warned once.)",
        stacklevel=3,
    )


def unpack_repacked_codes(repacked: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The ``[n, k]`` uint8 code matrix (values 0..15) from bitsandbytes' repacked ``[n, k/2]`` bytes."""
    if n % _GROUP_ROWS or k % 2:
        raise ValueError(f"repacked bitsandbytes weight: shape ({n}, {k}) needs N % 32 == 0 and even K")
    if repacked.numel() * 2 != n * k:
        raise ValueError(f"repacked bitsandbytes weight: {repacked.numel()} bytes do not hold a ({n}, {k}) matrix")
    runs = repacked.reshape(-1, _GROUP_ROWS)  # one row = 32 bytes = one 64-code run
    codes = torch.cat([runs & 0xF, runs >> 4], dim=1)  # run[b] is the low nibble, run[32 + b] the high
    codes = codes.reshape(n // _GROUP_ROWS, k // 2, _GROUP_ROWS, 2).transpose(1, 2)
    return codes.reshape(n, k)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Format-of-record packing (spec section 3): element 2j in the high nibble of byte j -> ``[n/2, 1]``."""
    flat = codes.reshape(-1)
    return ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8).reshape(-1, 1)


def nf4_from_repacked(packed: torch.Tensor, quant_state: Any):
    """The :class:`~lora_ops.nf4.NF4Weight` of a repacked bitsandbytes weight: the original codes
    (exact) and the bf16-rounded absmax as float32 (not double-quantized). A copy, not a view."""
    from lora_ops.nf4 import NF4Weight

    if getattr(quant_state, "quant_type", "nf4") != "nf4":
        raise ValueError(f"repacked bitsandbytes weight: only nf4 is supported, got {quant_state.quant_type!r}")
    n, k = (int(s) for s in quant_state.shape)
    bs = int(quant_state.blocksize)
    if k % bs:
        raise ValueError(f"repacked bitsandbytes weight: K={k} is not a multiple of blocksize {bs}")
    codes = unpack_repacked_codes(packed.view(torch.uint8).reshape(-1), n, k)
    absmax = quant_state.absmax
    if tuple(absmax.shape) != (k // bs, n):
        raise ValueError(f"repacked bitsandbytes weight: absmax shape {tuple(absmax.shape)} != ({k // bs}, {n})")
    absmax = absmax.t().reshape(-1).to(torch.float32).contiguous()
    dtype = getattr(quant_state, "original_dtype", None) or quant_state.dtype
    warn_precision_loss_once()
    return NF4Weight(pack_codes(codes), absmax, bs, (n, k), dtype)


def restore_layout_in_place(params4bit: torch.nn.Parameter) -> None:
    """Rewrites a repacked bitsandbytes ``Params4bit`` (and its quant state) back into the format-of-record
    layout, keeping the bf16-rounded absmax as float32 (non-nested). bitsandbytes' own code then reads it
    as an ordinary NF4 weight; lora_ops can share its bytes zero-copy again."""
    qs = params4bit.quant_state
    w = nf4_from_repacked(params4bit.data, qs)
    data = w.packed
    storage = getattr(qs, "original_storage_type", None)
    if storage is not None and storage != torch.uint8:
        data = data.view(storage)
    shape = getattr(qs, "original_qshape", None)
    params4bit.data = data.reshape(shape) if shape is not None else data
    qs.absmax = w.absmax
    qs.dtype = w.dtype
    qs.nested = False
    qs.offset = None
    qs.state2 = None
    qs.packing_format_for_cpu = False
