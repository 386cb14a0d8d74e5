"""NF4Weight: one quantized weight (codes + absmax state + shape + dtype + blocksize), and its
conversions to bitsandbytes and to Hugging Face 4-bit state-dict keys (spec section 6)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import torch

from lora_ops import bnb_cpu_layout
from lora_ops import format as fmt
from lora_ops.ops import nf4 as nf4_ops
from lora_ops.ops._checks import explain_dispatch_error, weight_parts

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class NF4Weight:
    """An NF4 (optionally double-quantized) weight, byte-compatible with bitsandbytes.

    Attributes:
        packed: uint8 ``[ceil(n/2), 1]``, two codes per byte, element 2j in the high nibble.
        absmax: float32 ``[nb]`` (plain) or uint8 ``[nb]`` codes (double-quantized), nb = ceil(n/blocksize).
        blocksize: 4-bit block size (32 .. 4096).
        shape: the original weight's shape (e.g. ``[out_features, in_features]``).
        dtype: the original weight's dtype (the default dequantization dtype).
        absmax2: float32 ``[ceil(nb/256)]`` nested scales (double quant only).
        nested_code: float32 ``[256]`` signed dynamic map (double quant only).
        offset: float32 ``[]`` mean of the original absmax (double quant only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    absmax2: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if self.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"NF4Weight: dtype must be one of {_FLOAT_DTYPES}, got {self.dtype}")
        nested = (self.absmax2, self.nested_code, self.offset)
        if self.absmax.dtype == torch.uint8:
            if any(t is None for t in nested):
                raise ValueError("NF4Weight: uint8 absmax needs absmax2, nested_code and offset")
        elif self.absmax.dtype != torch.float32 or any(t is not None for t in nested):
            raise ValueError("NF4Weight: absmax must be float32 (plain) or uint8 with the nested state")

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.nested}, device={self.device}, nbytes={self.nbytes})")

    # ---- basic properties ------------------------------------------------------------------------
    @property
    def nested(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of storage (codes + absmax state)."""
        ts = [self.packed, self.absmax, self.absmax2, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {
            "packed": self.packed,
            "absmax": self.absmax,
            "absmax2": self.absmax2,
            "nested_code": self.nested_code,
            "offset": self.offset,
        }

    # ---- ops -----------------------------------------------------------------------------------------
    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        """The weight as every op takes it, one value ``(w, w_meta)``: ``w = [packed, absmax]`` (plain)
        or ``[packed, absmax codes, absmax2, nested_code, offset]`` (double-quantized), and
        ``w_meta = [blocksize, *shape]``. The op validates it (csrc/bindings/weight_arg.cpp)."""
        w = [self.packed.view(torch.uint8), self.absmax]
        if self.nested:
            w += [self.absmax2, self.nested_code, self.offset]
        return w, [self.blocksize, *self.shape]

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight ``[*shape]`` in ``dtype`` (default: the original dtype), or written into
        ``out`` (contiguous, ``[*shape]``, same device; its dtype) and returned."""
        w, w_meta = self.op_args()
        try:
            return nf4_ops.dequantize_weight(w, w_meta, dtype if out is not None else (dtype or self.dtype), out)
        except NotImplementedError:
            explain_dispatch_error("nf4_dequantize", **weight_parts(w), out=out)
            raise

    def absmax_float(self) -> torch.Tensor:
        """The float32 absmax per block (reconstructed from the nested form when double-quantized)."""
        if not self.nested:
            return self.absmax
        # absmax[i] = code[q[i]] * absmax2[i // 256] + offset, rounded after the product and the sum.
        nb = self.absmax.numel()
        scales = self.absmax2.repeat_interleave(fmt.NESTED_BLOCKSIZE)[:nb]
        return self.nested_code[self.absmax.long()] * scales + self.offset

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on ``device`` (the bytes are unchanged)."""
        moved = {k: (v.to(device) if v is not None else None) for k, v in self.tensors().items()}
        return replace(self, **moved)

    # ---- bitsandbytes ------------------------------------------------------------------------------
    def to_bnb(self):
        """``(packed uint8 tensor, bitsandbytes.functional.QuantState)``; needs bitsandbytes."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.nested_code, blocksize=fmt.NESTED_BLOCKSIZE, dtype=torch.float32)
        qs = QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=fmt.NF4_CODEBOOK.to(self.device),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )
        return self.packed, qs

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state: Any) -> NF4Weight:
        """From bitsandbytes' packed data (``Params4bit.data``, any storage dtype) and its QuantState.

        Zero-copy: the tensors are shared, not cloned. Exception: a weight that bitsandbytes repacked
        for its AVX-512 BF16 CPU inference path is converted back (a copy, with its bf16-rounded
        absmax; warned once, see :mod:`lora_ops.bnb_cpu_layout`)."""
        qs = quant_state
        if getattr(qs, "quant_type", "nf4") != "nf4":
            raise ValueError(f"NF4Weight.from_bnb: only nf4 is supported, got quant_type={qs.quant_type!r}")
        if bnb_cpu_layout.is_repacked(qs):
            return bnb_cpu_layout.nf4_from_repacked(packed, qs)
        data = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
        data = data.reshape(-1, 1)
        if qs.nested:
            if qs.state2.blocksize != fmt.NESTED_BLOCKSIZE:
                raise ValueError(f"NF4Weight.from_bnb: nested blocksize must be 256, got {qs.state2.blocksize}")
            return cls(data, qs.absmax, qs.blocksize, qs.shape, qs.dtype, qs.state2.absmax, qs.state2.code,
                       qs.offset.reshape(()).to(torch.float32))
        return cls(data, qs.absmax, qs.blocksize, qs.shape, qs.dtype)

    # ---- Hugging Face 4-bit checkpoints (spec section 6) ------------------------------------------
    def hf_state_dict(self, key: str) -> dict[str, torch.Tensor]:
        """The checkpoint entries of a layer whose weight key is ``key`` (e.g. ``"model.q_proj.weight"``)."""
        meta: dict[str, Any] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        out = {
            key: self.packed,
            f"{key}.{fmt.HF_ABSMAX}": self.absmax,
            f"{key}.{fmt.HF_QUANT_MAP}": fmt.NF4_CODEBOOK.to(self.device),
        }
        if self.nested:
            out[f"{key}.{fmt.HF_NESTED_ABSMAX}"] = self.absmax2
            out[f"{key}.{fmt.HF_NESTED_QUANT_MAP}"] = self.nested_code.clone()
            meta.update(nested_blocksize=fmt.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
        blob = json.dumps(meta).encode("utf-8")
        out[f"{key}.{fmt.HF_QUANT_STATE}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_hf_state_dict(cls, state_dict: dict[str, torch.Tensor], key: str) -> NF4Weight:
        """Reads the entries written by :meth:`hf_state_dict` (or bitsandbytes / transformers)."""
        try:
            blob = state_dict[f"{key}.{fmt.HF_QUANT_STATE}"]
        except KeyError:
            raise KeyError(f"{key}: no '{key}.{fmt.HF_QUANT_STATE}' entry: not an NF4 4-bit checkpoint") from None
        meta = json.loads(bytes(blob.cpu().numpy().tobytes()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{key}: quant_type is {meta.get('quant_type')!r}, only 'nf4' is supported")
        quant_map = state_dict.get(f"{key}.{fmt.HF_QUANT_MAP}")
        if quant_map is not None and not torch.equal(quant_map.cpu().float(), fmt.NF4_CODEBOOK):
            raise ValueError(f"{key}: quant_map is not the NF4 codebook")
        packed = state_dict[key].view(torch.uint8).reshape(-1, 1)
        dtype = getattr(torch, meta["dtype"])
        if "nested_absmax" in meta or f"{key}.{fmt.HF_NESTED_ABSMAX}" in state_dict:
            if meta.get("nested_blocksize", fmt.NESTED_BLOCKSIZE) != fmt.NESTED_BLOCKSIZE:
                raise ValueError(f"{key}: nested_blocksize must be {fmt.NESTED_BLOCKSIZE}, got {meta['nested_blocksize']}")
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
            return cls(packed, state_dict[f"{key}.{fmt.HF_ABSMAX}"], meta["blocksize"], meta["shape"], dtype,
                       state_dict[f"{key}.{fmt.HF_NESTED_ABSMAX}"], state_dict[f"{key}.{fmt.HF_NESTED_QUANT_MAP}"],
                       offset)
        return cls(packed, state_dict[f"{key}.{fmt.HF_ABSMAX}"], meta["blocksize"], meta["shape"], dtype)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantizes ``w`` (any shape; float32/float16/bfloat16; CPU or CUDA) to an :class:`NF4Weight`.

    ``double_quant`` compresses the absmax to 8 bits (nested blocksize 256), as QLoRA and
    bitsandbytes' ``compress_statistics=True`` do."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4: expected a tensor, got {type(w).__name__}")
    if w.dim() == 0:  # the format stores a shape of at least one dimension (w_meta = [blocksize, *shape])
        raise ValueError("quantize_nf4: w must have at least one dimension, got a 0-d tensor (use w.reshape(1))")
    packed, absmax = nf4_ops.nf4_quantize(w.detach(), blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, blocksize, w.shape, w.dtype)
    code = fmt.dynamic_map(w.device)
    qabsmax, absmax2, offset = nf4_ops.nf4_double_quantize(absmax, code)
    return NF4Weight(packed, qabsmax, blocksize, w.shape, w.dtype, absmax2, code, offset)
