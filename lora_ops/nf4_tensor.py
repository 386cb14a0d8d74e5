"""NF4Tensor: an NF4 weight as a torch tensor subclass, the storage of every lora_ops NF4 layer's frozen base
(the parameter ``weight`` of :class:`lora_ops.nn.NF4Linear` and :class:`lora_ops.nn.QLoRALinear`), which
FSDP2 (``torch.distributed.fsdp.fully_shard``) can shard and all-gather as its 4-bit bytes.

As a parameter it is what ``model.parameters()``, accelerate's device maps and transformers' loader see; it
also answers the :class:`lora_ops.nf4.NF4Weight` interface (``op_args``, ``dequantize``, ``tensors``,
``hf_state_dict``, ``nested``, ...) for the whole weight. Two names keep torch's meaning: ``numel()`` (the
dense element count) and ``nbytes`` (dense bytes); :meth:`NF4Tensor.storage_nbytes` gives the 4-bit bytes.

The tensor looks like the dense weight (shape ``[N, K]``, the base dtype) but holds only the NF4 storage
of rows ``[r0, r0 + R)`` of it: the packed codes and the per-block absmax of those rows (the part that
grows with the weight), plus the small double-quantization state (``absmax2``, the dynamic map, the
offset) of the whole weight, which every shard keeps in full (4 bytes per 256 blocks, replicated).

FSDP2 shards a parameter by ``torch.chunk(param, world_size, dim=0)``. For the pieces to be NF4 storage
of their own rows, a row chunk must hold whole 4-bit blocks: ``(N / world_size) * K`` must be a
multiple of ``blocksize`` (which is even, so a chunk also holds whole bytes). FSDP2's all-gather
extension (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``) then gathers the packed bytes and the
absmax bytes of every rank; concatenated in rank order they are exactly the bitsandbytes byte layout
of the whole weight (spec sections 3 and 5), so the gathered weight is an ordinary
:class:`lora_ops.nf4.NF4Weight` and runs the same fused kernels as a single-process model.

Only the tensor operations that FSDP2 needs to shard, pad, move and wrap a parameter are implemented
(``__torch_dispatch__`` below); any other op is a clear error (use :meth:`NF4Tensor.nf4_weight` and
``NF4Weight.dequantize`` for the values).
"""

from __future__ import annotations

from typing import Any

import torch

from lora_ops import format as fmt
from lora_ops.nf4 import NF4Weight

aten = torch.ops.aten
_NESTED_GROUP = fmt.NESTED_BLOCKSIZE  # absmax values per absmax2 scale (spec section 5)


def shard_error(shape: tuple[int, ...], blocksize: int, world_size: int) -> str | None:
    """Why an ``[N, K]`` NF4 weight cannot be split into ``world_size`` equal row chunks of whole
    blocks (None when it can)."""
    if len(shape) != 2:
        return f"only 2-D weights are sharded, got shape {tuple(shape)}"
    n, k = shape
    if world_size < 1 or n % world_size:
        return (f"{n} rows do not split evenly over {world_size} ranks (FSDP2 needs equal row chunks "
                "for NF4 storage)")
    if world_size > 1 and (n // world_size) * k % blocksize:  # the last chunk may end in a partial block
        return (f"a chunk of {n // world_size} rows x {k} columns = {(n // world_size) * k} elements is not "
                f"a multiple of the blocksize {blocksize}: the chunk would split a 4-bit block")
    return None


class NF4Tensor(torch.Tensor):
    """Rows ``[row_start, row_start + shape[0])`` of an NF4 weight of ``full_rows`` rows, as a tensor of
    the dense weight's shape and dtype. Frozen: never requires grad."""

    packed: torch.Tensor  # uint8 [R*K/2] codes of these rows (flat)
    absmax: torch.Tensor  # float32 or uint8 [R*K/blocksize] block scales of these rows
    blocksize: int
    full_rows: int
    # {"row_start": first row held, "nested": (absmax2, code, offset) of the whole weight or None}, shared
    # by the views of one storage, so that copy_ into a view (FSDP2 fills its shard buffer that way)
    # updates them all.
    _info: dict[str, Any]

    @staticmethod
    def __new__(cls, packed, absmax, blocksize, shape, dtype, nested, row_start, full_rows, info=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(self, packed, absmax, blocksize, shape, dtype, nested, row_start, full_rows, info=None):
        self.packed, self.absmax, self.blocksize, self.full_rows = packed, absmax, blocksize, full_rows
        self._info = info if info is not None else {"row_start": row_start, "nested": nested}

    @property
    def row_start(self) -> int:
        return self._info["row_start"]

    @property
    def nested_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(absmax2, nested_code, offset)`` of the whole weight (double quant), else None."""
        return self._info["nested"]

    # ---- the NF4Weight interface (the whole weight) ------------------------------------------------------
    @property
    def nested(self) -> bool:
        """Double-quantized (uint8 absmax codes), as :attr:`NF4Weight.nested`."""
        return self._info["nested"] is not None

    absmax2 = property(lambda self: (self._info["nested"] or (None,) * 3)[0])
    nested_code = property(lambda self: (self._info["nested"] or (None,) * 3)[1])
    offset = property(lambda self: (self._info["nested"] or (None,) * 3)[2])

    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        """As :meth:`NF4Weight.op_args` (the ops take the packed codes flat): the whole weight only."""
        if not self.is_full:
            self.nf4_weight()  # raises, naming the shard
        w = [self.packed, self.absmax]
        nested = self._info["nested"]
        if nested is not None:
            w += nested
        return w, [self.blocksize, *self.shape]

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.nf4_weight().dequantize(dtype, out)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return self.nf4_weight().tensors()

    def hf_state_dict(self, key: str) -> dict[str, torch.Tensor]:
        return self.nf4_weight().hf_state_dict(key)

    def absmax_float(self) -> torch.Tensor:
        return self.nf4_weight().absmax_float()

    def to_bnb(self):
        return self.nf4_weight().to_bnb()

    # ---- conversions ------------------------------------------------------------------------------------
    @classmethod
    def from_nf4(cls, w: NF4Weight) -> NF4Tensor:
        """The whole weight ``w`` (shares its tensors)."""
        if len(w.shape) != 2:
            raise ValueError(f"NF4Tensor: only 2-D weights are supported, got shape {tuple(w.shape)}")
        nested = (w.absmax2, w.nested_code, w.offset) if w.nested else None
        return cls(w.packed.reshape(-1), w.absmax, w.blocksize, w.shape, w.dtype, nested, 0, w.shape[0])

    @property
    def is_full(self) -> bool:
        return self.row_start == 0 and self.shape[0] == self.full_rows

    def nf4_weight(self) -> NF4Weight:
        """The whole weight as an :class:`NF4Weight` (shares the tensors); only on an unsharded tensor
        (inside an FSDP2 forward/backward the module holds the all-gathered one)."""
        if not self.is_full:
            raise RuntimeError(
                f"NF4Tensor: rows {self.row_start}..{self.row_start + self.shape[0]} of {self.full_rows} are "
                "a shard; the whole weight exists only after FSDP2's all-gather (inside forward/backward)"
            )
        nested = self.nested_state or (None, None, None)
        return NF4Weight(self.packed.view(-1, 1), self.absmax, self.blocksize, tuple(self.shape), self.dtype,
                         *nested)

    def storage_nbytes(self) -> dict[str, int]:
        """Bytes held here: ``sharded`` (codes + absmax of these rows) and ``replicated`` (the nested state
        every shard keeps)."""
        nested = self._info["nested"]
        rep = sum(t.numel() * t.element_size() for t in nested) if nested else 0
        return {"sharded": self.packed.numel() + self.absmax.numel() * self.absmax.element_size(),
                "replicated": rep}

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={tuple(self.shape)}, rows={self.row_start}..{self.row_start + self.shape[0]} "
                f"of {self.full_rows}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.nested}, device={self.device})")

    def _like(self, packed, absmax, shape=None, row_start=None) -> NF4Tensor:
        """Same weight; ``row_start`` given: other storage (new info), else a view of this one."""
        shape = self.shape if shape is None else shape
        if row_start is None:
            return NF4Tensor(packed, absmax, self.blocksize, shape, self.dtype, None, 0, self.full_rows, self._info)
        return NF4Tensor(packed, absmax, self.blocksize, shape, self.dtype, self.nested_state, row_start,
                         self.full_rows)

    def _rows(self, start: int, stop: int) -> NF4Tensor:
        """Rows [start, stop) of this tensor (relative), cut on whole blocks."""
        k = self.shape[1]
        if (start * k) % self.blocksize or (stop * k) % self.blocksize and stop != self.shape[0]:
            raise ValueError(
                f"NF4Tensor: rows {start}..{stop} of a [{self.shape[0]}, {k}] weight would split a 4-bit block "
                f"of {self.blocksize} elements (a row chunk must hold whole blocks)"
            )
        b0, b1 = start * k // self.blocksize, -(-stop * k // self.blocksize)
        p1 = -(-stop * k // 2)  # a weight of odd numel ends in a half-used byte
        return self._like(self.packed[start * k // 2 : p1], self.absmax[b0:b1],
                          (stop - start, k), self.row_start + start)

    # ---- FSDP2 all-gather extension -------------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        # The 4-bit bytes travel as they are: a mixed-precision param_dtype does not apply to storage.
        meta = (self.blocksize, self.nested_state, tuple(outer_size), self.dtype, self.absmax.dtype)
        if mesh.size() == 1:
            # FSDP2 copies only the first input on a 1-rank mesh: one buffer, absmax first (aligned).
            return (torch.cat([self.absmax.view(torch.uint8), self.packed]),), meta
        return (self.packed, self.absmax), meta

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        blocksize, nested, shape, dtype, absmax_dtype = metadata
        if len(all_gather_outputs) == 1:  # the 1-rank layout of fsdp_pre_all_gather
            (buf,) = all_gather_outputs
            n_absmax = -(-shape[0] * shape[1] // blocksize) * torch.empty((), dtype=absmax_dtype).element_size()
            packed, absmax = buf[n_absmax:], buf[:n_absmax].view(absmax_dtype)
        else:
            packed, absmax = all_gather_outputs
        if out is not None:  # FSDP2 re-gathered into the same buffers the unsharded tensor views
            return None
        full = NF4Tensor(packed, absmax, blocksize, shape, dtype, nested, 0, shape[0])
        # Only the gathered buffers are FSDP2's to free on reshard; the nested state belongs to the shard.
        return full, tuple(all_gather_outputs)

    # ---- the tensor ops FSDP2 uses on a parameter ----------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"NF4Tensor does not implement {func}: it holds 4-bit storage for FSDP2 sharding; use "
                ".nf4_weight().dequantize() for the dense values"
            )
        return handler(*args, **kwargs)


def _same(t: NF4Tensor, *_args, **_kwargs) -> NF4Tensor:
    return t._like(t.packed, t.absmax)


def _split(t: NF4Tensor, split_size: int, dim: int = 0) -> list[NF4Tensor]:
    if dim not in (0, -2) or t.dim() != 2:
        raise ValueError(f"NF4Tensor: only splits along dim 0 of a 2-D weight are supported, got dim={dim}")
    rows = t.shape[0]
    if rows % split_size:  # FSDP2 would pad the short last chunk, which NF4 storage cannot hold
        why = shard_error(tuple(t.shape), t.blocksize, -(-rows // split_size))
        raise ValueError(f"NF4Tensor: cannot split {rows} rows into chunks of {split_size}: {why}")
    return [t._rows(s, s + split_size) for s in range(0, rows, split_size)]


def _slice(t: NF4Tensor, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1):
    rows = t.shape[0]
    start, end = max(0, start or 0), min(rows, rows if end is None else end)
    if dim not in (0, -2) or step != 1:
        raise ValueError(f"NF4Tensor: only contiguous row slices are supported, got dim={dim}, step={step}")
    return _same(t) if (start, end) == (0, rows) else t._rows(start, end)


def _new_zeros(t: NF4Tensor, size, **_kwargs) -> NF4Tensor:
    # FSDP2 makes its shard buffer this way (rows of the same width), then copy_ fills it.
    size = tuple(size)
    if len(size) != 2 or size[1] != t.shape[1] or size[0] * size[1] % t.blocksize:
        raise ValueError(f"NF4Tensor.new_zeros: {size} is not whole 4-bit blocks of [*, {t.shape[1]}] rows")
    n = size[0] * size[1]
    return t._like(t.packed.new_zeros(n // 2), t.absmax.new_zeros(n // t.blocksize), size, 0)


def _copy_(dst: NF4Tensor, src: torch.Tensor, non_blocking: bool = False) -> NF4Tensor:
    if not isinstance(src, NF4Tensor) or src.shape != dst.shape or src.blocksize != dst.blocksize:
        raise ValueError("NF4Tensor.copy_: the source must be an NF4Tensor of the same shape and blocksize")
    dst.packed.copy_(src.packed)
    dst.absmax.copy_(src.absmax)
    dst._info.update(row_start=src.row_start, nested=src.nested_state)
    return dst


def _view(t: NF4Tensor, size) -> NF4Tensor:
    size = list(size)
    if size == [-1]:  # FSDP2 keeps a flat view of the shard; the storage is the same
        size = [t.numel()]
    if torch.Size(size).numel() != t.numel():
        raise ValueError(f"NF4Tensor.view: {tuple(size)} has another numel than {tuple(t.shape)}")
    return t._like(t.packed, t.absmax, size)


def _as_strided(t: NF4Tensor, size, stride, storage_offset=0) -> NF4Tensor:
    if storage_offset or torch.Size(size).numel() != t.numel():
        raise ValueError("NF4Tensor.as_strided: only a full contiguous view is supported")
    return _view(t, size)


def _to_copy(t: NF4Tensor, *, dtype=None, device=None, non_blocking=False, **_kwargs) -> NF4Tensor:
    # The codes and scales keep their storage dtypes (like QLoRALinear._apply); only the device moves.
    if device is None:
        return _same(t)
    move = (lambda x: x.to(device, non_blocking=non_blocking))
    nested = tuple(move(x) for x in t.nested_state) if t.nested else None
    return NF4Tensor(move(t.packed), move(t.absmax), t.blocksize, t.shape, t.dtype, nested, t.row_start,
                     t.full_rows)


def _empty_like(t: NF4Tensor, *, dtype=None, device=None, **_kwargs) -> NF4Tensor:
    # Module.to_empty: storage of the same layout on ``device`` (its values are to be filled in).
    device = t.device if device is None else device
    nested = tuple(torch.empty_like(x, device=device) for x in t.nested_state) if t.nested else None
    return NF4Tensor(torch.empty_like(t.packed, device=device), torch.empty_like(t.absmax, device=device),
                     t.blocksize, t.shape, t.dtype, nested, t.row_start, t.full_rows)


def _is_same_size(a, b) -> bool:
    return a.shape == b.shape


_OPS: dict[Any, Any] = {
    aten.detach.default: _same,
    aten.alias.default: _same,
    aten.clone.default: lambda t, **kw: t._like(t.packed.clone(), t.absmax.clone(), row_start=t.row_start),
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.copy_.default: _copy_,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided,
    aten._to_copy.default: _to_copy,
    aten.is_same_size.default: _is_same_size,
    aten.empty_like.default: _empty_like,
}

__all__ = ["NF4Tensor", "shard_error"]
