"""NF4 storage ops: thin wrappers over torch.ops.lora_ops.nf4_* and their fake kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_ops import _native  # noqa: F401  (registers the ops)
from lora_ops import format as fmt
from lora_ops.ops._checks import check_one_device, explain_dispatch_error, weight_parts

_ops = torch.ops.lora_ops


@torch.library.register_fake("lora_ops::nf4_quantize")
def _nf4_quantize_fake(w: torch.Tensor, blocksize: int):
    n = w.numel()
    return (
        w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
        w.new_empty((-(-n // blocksize),), dtype=torch.float32),
    )


@torch.library.register_fake("lora_ops::nf4_double_quantize")
def _nf4_double_quantize_fake(absmax: torch.Tensor, nested_code: torch.Tensor):
    check_one_device("nf4_double_quantize", "absmax", absmax, nested_code=nested_code)
    n = absmax.numel()
    return (
        absmax.new_empty((n,), dtype=torch.uint8),
        absmax.new_empty((-(-n // fmt.NESTED_BLOCKSIZE),), dtype=torch.float32),
        absmax.new_empty((), dtype=torch.float32),
    )


@torch.library.register_fake("lora_ops::nf4_dequantize")
def _nf4_dequantize_fake(w, w_meta, dtype):
    # The weight is one value (w, w_meta) = NF4Weight.op_args(): w_meta = [blocksize, *shape].
    check_one_device("nf4_dequantize", "the weight", w[0], **weight_parts(w))
    return w[0].new_empty(tuple(w_meta[1:]), dtype=dtype)


@torch.library.register_fake("lora_ops::nf4_dequantize_into")
def _nf4_dequantize_into_fake(w, w_meta, out):
    check_one_device("nf4_dequantize_into", "the weight", w[0], out=out, **weight_parts(w))
    if tuple(out.shape) != tuple(w_meta[1:]):
        raise ValueError(f"nf4_dequantize_into: out has shape {tuple(out.shape)}, the weight {tuple(w_meta[1:])}")


def dequantize_weight(w: list[torch.Tensor], w_meta: list[int], dtype: torch.dtype | None,
                      out: torch.Tensor | None) -> torch.Tensor:
    """The op call behind :func:`nf4_dequantize` and :meth:`lora_ops.NF4Weight.dequantize` (the weight
    as ``op_args()``): a new tensor in ``dtype``, or ``out`` written in place (its dtype; ``dtype``
    must then be None or the same)."""
    if out is None:
        return _ops.nf4_dequantize(w, w_meta, dtype)
    if dtype is not None and dtype != out.dtype:
        raise TypeError(f"nf4_dequantize: dtype {dtype} differs from out's dtype {out.dtype}")
    _ops.nf4_dequantize_into(w, w_meta, out)
    return out


def nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 codes of ``w`` (any shape, float32/float16/bfloat16, CPU or CUDA).

    Returns ``packed`` uint8 ``[ceil(n/2), 1]`` (high nibble = even element) and ``absmax`` float32
    ``[ceil(n/blocksize)]``. Raises ``ValueError`` if ``w`` holds NaN/Inf (on CUDA this check costs
    one device synchronization).
    """
    try:
        return _ops.nf4_quantize(w, blocksize)
    except NotImplementedError:
        explain_dispatch_error("nf4_quantize", w=w)
        raise


def nf4_double_quantize(
    absmax: torch.Tensor, nested_code: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compresses float32 ``absmax [nb]`` to ``(qabsmax uint8 [nb], absmax2 float32 [ceil(nb/256)],
    offset float32 [])`` against the 256-entry ``nested_code`` (the signed dynamic map).

    ``offset`` is torch's float32 mean of ``absmax`` (bitsandbytes' value); where that sum would
    overflow float32 (weights near FLT_MAX) it is the same mean computed on ``absmax * 2^-64``, so it
    stays finite. Raises ``ValueError`` if ``absmax`` holds NaN/Inf (one device sync on CUDA)."""
    try:
        return _ops.nf4_double_quantize(absmax, nested_code)
    except NotImplementedError:
        explain_dispatch_error("nf4_double_quantize", absmax=absmax, nested_code=nested_code)
        raise


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype | None = None,
    absmax2: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense weight ``[*shape]`` in ``dtype`` (float32/float16/bfloat16; default bfloat16), bit-identical
    to the spec. With ``out`` (contiguous, ``[*shape]``, on the weight's device) the values are written
    there, in out's dtype, and ``out`` is returned: no new allocation (a fresh CPU output's first-touch
    page faults cost more than the decode itself).

    ``absmax`` is float32 (plain) or the uint8 codes of a double-quantized absmax, in which case
    ``absmax2``, ``nested_code`` and ``offset`` are required (decoded inside the same kernel). The
    loose-parts form of :meth:`lora_ops.NF4Weight.dequantize`; the op checks every part.
    """
    nested = [t for t in (absmax2, nested_code, offset) if t is not None]
    try:
        if out is None and dtype is None:
            dtype = torch.bfloat16
        return dequantize_weight([packed, absmax, *nested], [blocksize, *shape], dtype, out)
    except NotImplementedError:
        explain_dispatch_error(
            "nf4_dequantize", packed=packed, absmax=absmax, absmax2=absmax2, nested_code=nested_code, offset=offset,
            out=out,
        )
        raise
