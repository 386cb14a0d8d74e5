"""Fused DoRA linear over an NF4 base (QDoRA) without a dense weight: ``lora_ops_py::dora_linear`` and
``lora_ops_py::nf4_row_sq_norms``, Python custom ops composed of the fused QLoRA ops
(:mod:`lora_ops.ops.qlora`), with fake kernels and autograd so ``torch.compile(fullgraph=True)`` traces
them. They run wherever the fused ops run (CPU and CUDA): no kernel of their own.

Math (x viewed as [M, K], W = dequant(NF4) [N, K], A [r, K], B [N, r], m [N], s = scale; the norm is
detached, DoRA section 4.3, as PEFT does):

    n_i² = ‖W_i‖² + 2s·B_i·(W·Aᵀ)_iᵀ + s²·B_i·(A·Aᵀ)·B_iᵀ      (float64 [N]; no dense W, no dense B·A)
    g    = m / n
    no dropout:  y = g ⊙ z + bias,               z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ   (qlora_linear)
    dropout p:   y = g ⊙ z̃ + (x - x̃)·Wᵀ + bias,  z̃ = x̃·Wᵀ + s·(x̃·Aᵀ)·Bᵀ, x̃ = drop(x)

The dropout form is PEFT 0.21's (``DoraLinearVariant.forward``): with dropout active it computes
``base(x) + (g - 1)⊙(x̃·Wᵀ) + g⊙s·lora(x̃)``, i.e. the base result of the undropped x plus the magnitude
scaling applied to the dropped x's full weight; written as above it costs two NF4 GEMMs (as PEFT's).
Without dropout (p = 0, or eval mode) PEFT reuses the base result: one GEMM.

‖W_i‖² is a constant of the frozen base: computed from the NF4 codes and the absmax (chunks of rows,
never the whole weight) and cached per weight storage, keyed by the tensors' version counters (an
in-place write, ``load_state_dict`` or a replaced base invalidates it). ``W·Aᵀ`` is the fused NF4
matmul (float32) with A as r rows of input; the three terms are summed in float64. Where W and s·B·A
nearly cancel (a row's norm² below 1/16 of ‖W_i‖² + s²‖(B·A)_i‖²) the float32 cross term's rounding
could dominate, so those rows alone are decoded and summed directly in float64 (adversarial cases;
a trained DoRA update is far from it, and no row is decoded).

Backward (dy scaled per output column by g into the fused LoRA backward):
    dx, dA, dB = qlora backward of (dy ⊙ g) at x (at x̃ with dropout; plus (dy·W)∘(1 - mask/(1-p)))
    dm_i       = Σ_rows dy_i · z_i / n_i

Saved for backward: x, s = x·Aᵀ (float32 [M, r]), A, B, m, the weight's tensors, rng, n (float64 [N])
and z ([M, N] in x's dtype). z is what dm needs: Σ_rows dy⊙(x·Wᵀ) per column cannot come from dyᵀ·x
without a dense N×K product, and recomputing z would cost a full NF4 GEMM; z is the size of the
output, as PEFT keeps its base result. No gradient for W, absmax, bias, the base norms.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from lora_ops import format as fmt
from lora_ops.ops import qlora as qlora_ops
from lora_ops.ops._checks import check_one_device, weight_parts

_ops = torch.ops.lora_ops
_ROW_CHUNK_ELEMENTS = 1 << 20  # elements decoded at a time for the base row norms
_COL_CHUNK_ELEMENTS = 1 << 21  # elements of [M, N] scaled in float32 at a time (8 MiB: few op calls)


def _norm_dtype() -> torch.dtype:
    return torch.float64


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- base row norms ||W_i||² from the codes --------------------------------------------------------
def _absmax_float(w: list[torch.Tensor]) -> torch.Tensor:
    """float32 absmax per block (the nested form decoded as NF4Weight.absmax_float does)."""
    if w[1].dtype != torch.uint8:
        return w[1]
    q, absmax2, code, offset = w[1], w[2], w[3], w[4]
    scales = absmax2.repeat_interleave(fmt.NESTED_BLOCKSIZE)[: q.numel()]
    return code[q.long()] * scales + offset


def _decode_elements(w: list[torch.Tensor], blocksize: int, idx: torch.Tensor) -> torch.Tensor:
    """The spec's float32 decode ``codebook[code] * absmax[block]`` of the flat elements ``idx`` (int64)."""
    packed = w[0].reshape(-1)
    byte = packed[idx // 2]
    codes = torch.where(idx % 2 == 0, byte >> 4, byte & 0x0F)
    codebook = fmt.NF4_CODEBOOK.to(device=packed.device, dtype=torch.float32)
    return codebook[codes.long()] * _absmax_float(w)[idx // blocksize]


def _row_sq_norms_compute(w: list[torch.Tensor], w_meta: list[int]) -> torch.Tensor:
    blocksize, n, k = w_meta
    device = w[0].device
    out = torch.empty(n, dtype=torch.float64, device=device)
    rows = max(1, _ROW_CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        vals = _decode_elements(w, blocksize, torch.arange(r0 * k, r1 * k, device=device))
        out[r0:r1] = vals.double().square().view(r1 - r0, k).sum(dim=1)
    return out


def _dense_rows(w: list[torch.Tensor], w_meta: list[int], rows: torch.Tensor) -> torch.Tensor:
    """float64 [len(rows), K]: a few rows of W decoded (for rows whose norm the identity cannot give)."""
    blocksize, _, k = w_meta
    idx = rows.to(w[0].device)[:, None] * k + torch.arange(k, device=w[0].device)
    return _decode_elements(w, blocksize, idx.reshape(-1)).double().view(-1, k)


# Cache: one entry per weight storage (held by a weak reference, so an entry never outlives or mistakes
# its weight); valid while every tensor of the weight keeps its version counter, data pointer and shape.
_sq_norm_cache: dict[tuple, tuple[StorageWeakRef, tuple, torch.Tensor]] = {}


def _cache_key(w: list[torch.Tensor], w_meta: list[int]) -> tuple[tuple, tuple]:
    ident = (w[0].untyped_storage()._cdata, w[0].storage_offset(), w[0].device, tuple(w_meta))
    state = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in w)
    return ident, state


def clear_base_norm_cache() -> None:
    """Drops every cached base row norm (they are recomputed on next use)."""
    _sq_norm_cache.clear()


@torch.library.custom_op("lora_ops_py::nf4_row_sq_norms", mutates_args=())
def nf4_row_sq_norms(w: list[torch.Tensor], w_meta: list[int]) -> torch.Tensor:
    """‖W_i‖² (float64 ``[N]``) of the NF4 weight ``(w, w_meta)`` = ``NF4Weight.op_args()``, from the
    codes (float32 decode as the spec, squares summed in float64) a chunk of rows at a time. Cached per
    weight storage until any of its tensors changes (version counter); the cache lives in the op's body,
    so compiled graphs use it too."""
    ident, state = _cache_key(w, w_meta)
    hit = _sq_norm_cache.get(ident)
    if hit is not None and not hit[0].expired() and hit[1] == state:
        return hit[2].clone()
    for key in [k for k, v in _sq_norm_cache.items() if v[0].expired()]:
        del _sq_norm_cache[key]
    with torch.no_grad():
        sq = _row_sq_norms_compute(w, w_meta)
    _sq_norm_cache[ident] = (StorageWeakRef(w[0].untyped_storage()), state, sq)
    return sq.clone()


@nf4_row_sq_norms.register_fake
def _nf4_row_sq_norms_fake(w, w_meta):
    check_one_device("nf4_row_sq_norms", "the weight", w[0], **weight_parts(w))
    return w[0].new_empty((w_meta[1],), dtype=torch.float64)


# A row whose norm² is below this fraction of ‖W_i‖² + s²‖(B·A)_i‖² is cancelled enough that the
# float32 cross term's rounding (about 2^-24·sqrt(K) of its size) could dominate it: such rows are
# recomputed from their decoded values. Trained DoRA updates are far from it, so none are decoded.
_CANCELLATION = 2.0**-4
_DENSE_ROWS_AT_ONCE = 256


def _row_norms(w, w_meta, A, B, base_sq, scale) -> torch.Tensor:
    """‖W_i + s·(B·A)_i‖ (float64 [N]) by the identity: W·Aᵀ through the fused NF4 matmul (float32) with
    A as r rows of input, A·Aᵀ r×r, the sums in float64; no dense W or B·A. Rows with heavy cancellation
    (see _CANCELLATION) are recomputed directly from their decoded values in float64."""
    d = torch.float64
    ad, bd = A.detach().to(d), B.detach().to(d)
    p = _ops.qlora_matmul(A.detach().to(torch.float32), w, w_meta, False, None, None, 1.0, None, 0.0, None)
    cross = (bd * p.t().to(d)).sum(dim=1)
    quad = ((bd @ (ad @ ad.t())) * bd).sum(dim=1)
    base_sq = base_sq.to(d)
    sq = base_sq + (2.0 * scale) * cross + (scale * scale) * quad
    cancelled = (sq < _CANCELLATION * (base_sq + (scale * scale) * quad)).nonzero().flatten()
    if cancelled.numel():
        for i in range(0, cancelled.numel(), _DENSE_ROWS_AT_ONCE):
            rows = cancelled[i: i + _DENSE_ROWS_AT_ONCE]
            exact = _dense_rows(w, w_meta, rows) + scale * (bd[rows] @ ad)
            sq[rows] = exact.square().sum(dim=1)
    return sq.clamp_min(0.0).sqrt()


# ---- helpers ---------------------------------------------------------------------------------------------
def _scale_cols(z: torch.Tensor, g: torch.Tensor, add: torch.Tensor | None, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """``z ⊙ g (+ add) (+ bias)`` for z [M, N] (any dtype), computed in float32 (float64 for float64 z)
    and rounded once to z's dtype. A chunk of rows at a time through one float32 buffer: torch's
    mixed-dtype elementwise path is several times slower than same-dtype copies and multiplies."""
    acc = _acc_dtype(z)
    g = g.to(acc)
    bias = None if bias is None else bias.to(acc)
    out = torch.empty_like(z)
    rows = max(1, _COL_CHUNK_ELEMENTS // max(z.shape[1], 1))
    buf = torch.empty((min(rows, z.shape[0]), z.shape[1]), dtype=acc, device=z.device)
    for i in range(0, z.shape[0], rows):
        j = min(z.shape[0], i + rows)
        b = buf[: j - i]
        b.copy_(z[i:j])
        if add is not None:
            torch.addcmul(add[i:j], b, g, out=b)
        elif bias is not None:
            torch.addcmul(bias, b, g, out=b)
        else:
            b.mul_(g)
        out[i:j].copy_(b)
    return out


def _scale_cols_and_dots(dy: torch.Tensor, g: torch.Tensor, z: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``dy ⊙ g`` rounded once to dy's dtype, Σ_rows dy ⊙ z per column in float64): the two backward
    passes over [M, N] sharing one float32 copy of each chunk of dy."""
    acc = _acc_dtype(dy)
    g = g.to(acc)
    out = torch.empty_like(dy)
    dots = torch.zeros(dy.shape[1], dtype=torch.float64, device=dy.device)
    rows = max(1, _COL_CHUNK_ELEMENTS // max(dy.shape[1], 1))
    n = min(rows, dy.shape[0])
    buf_dy = torch.empty((n, dy.shape[1]), dtype=acc, device=dy.device)
    buf_z = torch.empty((n, dy.shape[1]), dtype=acc, device=dy.device)
    for i in range(0, dy.shape[0], rows):
        j = min(dy.shape[0], i + rows)
        pd, pz = buf_dy[: j - i], buf_z[: j - i]
        pd.copy_(dy[i:j])
        pz.copy_(z[i:j])
        dots += pz.mul_(pd).sum(dim=0)
        out[i:j].copy_(pd.mul_(g))
    return out, dots


def _col_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_rows a ⊙ b per column (float64 [N]) for a, b [M, N]: exact float32 products of 16-bit values,
    summed in float32 over a few rows at a time and in float64 across them."""
    acc = _acc_dtype(a)
    out = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
    rows = max(1, _COL_CHUNK_ELEMENTS // max(a.shape[1], 1))
    n = min(rows, a.shape[0])
    buf_a = torch.empty((n, a.shape[1]), dtype=acc, device=a.device)
    buf_b = torch.empty((n, a.shape[1]), dtype=acc, device=a.device)
    for i in range(0, a.shape[0], rows):
        j = min(a.shape[0], i + rows)
        pa, pb = buf_a[: j - i], buf_b[: j - i]
        pa.copy_(a[i:j])
        pb.copy_(b[i:j])
        out += pa.mul_(pb).sum(dim=0)
    return out


def _keep_scale(p: float) -> float:
    """float32(1/(1-p)) as the kernels use it; 1 when p rounds to no dropout (floor(p·2^24) = 0)."""
    if int(p * float(1 << 24)) == 0:
        return 1.0
    return torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()


def _dropout_parts(x2: torch.Tensor, p: float, rng: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x̃ = drop(x), x - x̃, keep·scale) for x viewed [M, K]: x̃ and x - x̃ each rounded once to x's dtype
    from the float32 products (the fused kernels' own mask for this rng)."""
    acc = _acc_dtype(x2)
    keep = qlora_ops.lora_dropout_mask(x2.shape[0], x2.shape[1], p, rng).to(x2.device)
    factor = keep.to(acc) * _keep_scale(p)
    xa = x2.to(acc)
    x_drop = xa * factor
    return x_drop.to(x2.dtype), (xa - x_drop).to(x2.dtype), factor


# ---- the op ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lora_ops_py::dora_linear", mutates_args=())
def dora_linear_op(
    x: torch.Tensor,
    w: list[torch.Tensor],
    w_meta: list[int],
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    base_sq: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    rng: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y [..., N] in x's dtype, s [M, r] float32, z [M, N] in x's dtype, n float64 [N]); s, z
    and n are for the backward (module docstring)."""
    k, n_out = x.shape[-1], w_meta[1]
    x2 = x.reshape(-1, k)
    norm = _row_norms(w, w_meta, A, B, base_sq, scale)
    g = magnitude.to(torch.float64) / norm
    if dropout_p > 0:
        x_drop, x_rest, _ = _dropout_parts(x2, dropout_p, rng)
        s = _ops.lora_down(x2, A, dropout_p, rng)  # drop(x)·Aᵀ with the kernels' own float32 dropout
        z = _ops.qlora_matmul(x_drop, w, w_meta, False, s, B, scale, None, 0.0, None)
        rest = _ops.qlora_matmul(x_rest, w, w_meta, False, None, None, 1.0, bias, 0.0, None)
        y = _scale_cols(z, g, rest.to(_acc_dtype(x)), None)
    else:
        z, s = _ops.qlora_linear(x2, w, w_meta, A, B, None, scale, 0.0, None)
        y = _scale_cols(z, g, None, None if bias is None else bias.to(_acc_dtype(x)))
    return y.reshape(*x.shape[:-1], n_out), s, z, norm


@dora_linear_op.register_fake
def _dora_linear_fake(x, w, w_meta, A, B, magnitude, base_sq, bias, scale, dropout_p, rng):
    check_one_device("dora_linear", "x", x, host={"rng": rng}, **weight_parts(w), A=A, B=B,
                     magnitude=magnitude, base_sq=base_sq, bias=bias)
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    n_out = w_meta[1]
    y = x.new_empty((*x.shape[:-1], n_out))
    s = x.new_empty((m, A.shape[0]), dtype=_acc_dtype(x))
    z = x.new_empty((m, n_out))
    norm = x.new_empty((n_out,), dtype=torch.float64)
    return y, s, z, norm


def _setup_context(ctx, inputs, output):
    x, w, w_meta, A, B, magnitude, _base_sq, _bias, scale, dropout_p, rng = inputs
    _, s, z, norm = output
    ctx.mark_non_differentiable(s, z, norm)
    ctx.w_meta, ctx.scale, ctx.dropout_p = w_meta, scale, dropout_p
    ctx.save_for_backward(x, s, z, norm, A, B, magnitude, rng, *w)


def _backward(ctx, grad_y, _gs, _gz, _gn):
    x, s, z, norm, A, B, magnitude, rng, *w = ctx.saved_tensors
    no_dw = [None] * len(w)
    if grad_y is None:
        return None, no_dw, None, None, None, None, None, None, None, None, None
    need = ctx.needs_input_grad
    need_dx, need_dA, need_dB, need_dm = need[0], need[3], need[4], need[5]
    k, n_out = x.shape[-1], ctx.w_meta[1]
    dy = grad_y.reshape(-1, n_out).to(x.dtype)
    x2 = x.reshape(-1, k)
    g = magnitude.to(torch.float64) / norm
    dx = dA = dB = dm = None
    p = ctx.dropout_p
    factor = None
    if p > 0 and need_dx:
        _, _, factor = _dropout_parts(x2, p, rng)
    if need_dx or need_dA:
        # u = (dy ⊙ g)·B = dy·(g ⊙ B): g folded into B in float32, so dA keeps dy unrounded (as PEFT's
        # float32 LoRA branch); only the base term's dy ⊙ g is rounded to x's dtype for the NF4 GEMM.
        bg = B.to(torch.float32 if x.dtype != torch.float64 else torch.float64) * g.to(_acc_dtype(x))[:, None]
        u = _ops.lora_down(dy, bg.t(), 0.0, None)
    if need_dA:
        dA = _ops.lora_outer(u, x2, ctx.scale, p, rng, A.dtype)  # uᵀ·drop(x), the kernels' own dropout
    if need_dB:  # (dy ⊙ g)ᵀ·s = g ⊙ (dyᵀ·s)
        acc = _acc_dtype(x)
        dB = (_ops.lora_outer(dy, s, ctx.scale, 0.0, None, acc) * g.to(acc)[:, None]).to(B.dtype)
    dy_g = dots = None
    if need_dx and need_dm:
        dy_g, dots = _scale_cols_and_dots(dy, g, z)
    if need_dx:
        if dy_g is None:
            dy_g = _scale_cols(dy, g, None, None)
        dx = _ops.qlora_matmul(dy_g, w, ctx.w_meta, True, u, A.t(), ctx.scale, None, 0.0, None)
        if factor is not None:  # d/dx of (x - x̃)·Wᵀ and of x̃: (dy·W)∘(1 - f) + dx̃∘f, f = keep/(1-p)
            d_rest = _ops.qlora_matmul(dy, w, ctx.w_meta, True, None, None, 1.0, None, 0.0, None)
            acc = _acc_dtype(x)
            dx = (d_rest.to(acc) + (dx.to(acc) - d_rest.to(acc)) * factor).to(x.dtype)
        dx = dx.reshape(x.shape)
    if need_dm:
        dm = ((_col_dots(dy, z) if dots is None else dots) / norm).to(magnitude.dtype)
    return dx, no_dw, None, dA, dB, dm, None, None, None, None, None


torch.library.register_autograd("lora_ops_py::dora_linear", _backward, setup_context=_setup_context)


# ---- public wrappers ---------------------------------------------------------------------------------------
def _check_magnitude(magnitude: torch.Tensor, n_out: int, x: torch.Tensor) -> None:
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"dora_linear: magnitude must be a tensor, got {type(magnitude).__name__}")
    if magnitude.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dora_linear: magnitude must be float32, float16, bfloat16 or float64, "
                        f"got {magnitude.dtype}")
    if tuple(magnitude.shape) != (n_out,):
        raise ValueError(f"dora_linear: magnitude must have shape [{n_out}] (out_features), got "
                         f"{tuple(magnitude.shape)}")
    if magnitude.device != x.device and x.device.type != "meta":
        raise RuntimeError(f"dora_linear: magnitude is on {magnitude.device} but x is on {x.device}")


def base_row_sq_norms(weight) -> torch.Tensor:
    """‖W_i‖² (float64 ``[N]``) of an :class:`~lora_ops.NF4Weight` from its codes (cached)."""
    return nf4_row_sq_norms(*weight.op_args())


def weight_norm_args(w, w_meta, A, B, scale: float, base_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + scale·B·A‖ per row (float64 ``[N]``) without a dense W or B·A: PEFT's DoRA weight norm, what
    the magnitude starts at and what merging divides by. Not differentiable."""
    with torch.no_grad():
        if base_sq is None:
            base_sq = nf4_row_sq_norms(w, w_meta)
        return _row_norms(w, w_meta, A.detach(), B.detach(), base_sq, float(scale))


def dora_linear(x, weight, A, B, magnitude, scale: float, bias=None, dropout_p: float = 0.0, rng=None):
    """``y = m/‖W + scale·B·A‖_row ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + bias`` with an NF4 ``weight``
    (:class:`lora_ops.NF4Weight`) and PEFT's DoRA dropout semantics (module docstring).

    Args: as :func:`lora_ops.ops.qlora.qlora_linear`, plus ``magnitude`` ``[N]`` (DoRA's m; float32,
    float16, bfloat16 or float64). Differentiable w.r.t. x, A, B and magnitude; the norm is detached."""
    w, w_meta = weight.op_args()
    return dora_linear_args(x, w, w_meta, A, B, magnitude, scale, bias, dropout_p, rng)


def dora_linear_args(x, w, w_meta, A, B, magnitude, scale: float, bias=None, dropout_p: float = 0.0, rng=None,
                     base_sq: torch.Tensor | None = None):
    """:func:`dora_linear` with the weight as ``(w, w_meta)`` = ``NF4Weight.op_args()``; ``base_sq`` the
    cached ‖W_i‖² (drawn from the cache when None)."""
    _check_magnitude(magnitude, w_meta[1], x)
    A, B = qlora_ops._adapter(A, x), qlora_ops._adapter(B, x)
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        bias = bias.to(x.dtype)
    if dropout_p > 0 and rng is None:
        rng = qlora_ops.make_rng() if qlora_ops._eager(x, A, B, bias) else qlora_ops.draw_dropout_rng()
    if base_sq is None:
        base_sq = nf4_row_sq_norms(w, w_meta)
    y, _, _, _ = dora_linear_op(x, w, w_meta, A, B, magnitude, base_sq, bias, float(scale), float(dropout_p),
                                rng)
    return y
