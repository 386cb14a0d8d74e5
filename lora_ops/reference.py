"""Pure-PyTorch oracle of every lora_ops op. Tests compare the kernels against this file.

It restates ``shared/spec/nf4-format.md`` as code, favouring clarity over speed, and never calls
the compiled kernels or bitsandbytes.
"""

from __future__ import annotations

import torch

# The format's facts (codebook, blocksizes, nested blocksize, the signed dynamic map) are the
# library's (lora_ops/format.py); the oracle imports them and restates only the arithmetic.
from lora_ops.format import BLOCKSIZES, NESTED_BLOCKSIZE, NF4_CODEBOOK, NF4_ZERO_CODE, dynamic_map

# Section 2: decision thresholds, float32 midpoints of adjacent codebook values.
NF4_THRESHOLDS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [n_blocks, blocksize], the partial last block padded with zeros."""
    n_blocks = -(-flat.numel() // blocksize)
    padded = torch.zeros(n_blocks * blocksize, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded.view(n_blocks, blocksize)


def normalize_blocks(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """y = x * (1/absmax) per row of ``blocks`` with the correctly rounded float32 reciprocal; rows with
    absmax 0 give 0. A subnormal absmax (< 2^-126) would overflow 1/absmax, so x and absmax are first
    scaled by 2^64 (exact): y is the spec's value without exponent limits (csrc nf4_normalizer)."""
    pre = torch.where(absmax < 2.0**-126, torch.tensor(2.0**64), torch.tensor(1.0))
    scaled = absmax * pre
    recip = torch.where(absmax > 0, 1.0 / scaled, torch.zeros_like(absmax))
    return (blocks * pre[:, None]) * recip[:, None]


def nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Sections 2-3. Returns (packed uint8 [ceil(n/2), 1], absmax float32 [ceil(n/blocksize)])."""
    assert blocksize in BLOCKSIZES
    flat = w.detach().reshape(-1).to(torch.float32).cpu()
    if not torch.isfinite(flat).all():
        raise ValueError("NF4 cannot represent NaN or Inf")
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # y = x * (1/absmax) with a correctly rounded float32 reciprocal; zero blocks stay all-zero.
    y = normalize_blocks(blocks, absmax)
    # code = number of thresholds strictly below y (a value on a threshold keeps the lower code).
    codes = torch.searchsorted(NF4_THRESHOLDS, y.contiguous(), side="left").to(torch.uint8)
    codes[absmax == 0] = NF4_ZERO_CODE
    codes = codes.reshape(-1)[: flat.numel()]
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([NF4_ZERO_CODE], dtype=torch.uint8)])
    pairs = codes.view(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]  # element 2j in the high nibble
    return packed.reshape(-1, 1), absmax


def absmax_mean(absmax: torch.Tensor) -> torch.Tensor:
    """The double-quant offset: torch's float32 mean (what bitsandbytes stores), except where the sum
    overflows float32 (huge weights): then the mean of absmax * 2^-64, times 2^64 (power-of-two
    scaling is exact, so it is the same mean computed without overflow), capped at FLT_MAX."""
    m = absmax.mean()
    if torch.isfinite(m):
        return m
    return ((absmax * 2.0**-64).mean() * 2.0**64).clamp_max(torch.finfo(torch.float32).max)


def nf4_double_quantize(
    absmax: torch.Tensor, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Section 5. Returns (qabsmax uint8 [nb], absmax2 float32 [ceil(nb/256)], offset float32 []).

    ``offset`` defaults to torch's float32 mean of absmax on the CPU; pass the one a device computed
    (a CUDA mean may differ from the CPU's in the last bit) to check the rest of the encoding."""
    absmax = absmax.to(torch.float32).cpu()
    if not torch.isfinite(absmax).all():
        raise ValueError("absmax must be finite")
    offset = absmax_mean(absmax) if offset is None else offset.reshape(()).to(torch.float32).cpu()
    a = _blocks(absmax - offset, NESTED_BLOCKSIZE)
    absmax2 = a.abs().amax(dim=1)
    v = normalize_blocks(a, absmax2).to(torch.float64)
    # Exact nearest entry, ties to the lower index: count the midpoints strictly below v.
    # (Midpoints of adjacent float32 values are exact in float64.)
    dyn = dynamic_map().to(torch.float64)
    mids = (dyn[:-1] + dyn[1:]) / 2
    q = torch.searchsorted(mids, v.contiguous(), side="left").to(torch.uint8)
    return q.reshape(-1)[: absmax.numel()], absmax2, offset


def nested_absmax(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """absmax[i] = dyn[q[i]] * absmax2[i // 256] + offset, rounded after the product and the sum."""
    dyn = dynamic_map()
    idx = torch.arange(qabsmax.numel()) // NESTED_BLOCKSIZE
    scaled = dyn[qabsmax.long().cpu()] * absmax2.cpu()[idx]
    return scaled + offset.cpu().to(torch.float32)


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype: torch.dtype
) -> torch.Tensor:
    """Section 4: w[i] = dtype(c[code(i)] * absmax[i // blocksize]), the product rounded once."""
    numel = 1
    for d in shape:
        numel *= d
    packed = packed.reshape(-1).cpu()
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:numel]
    scale = absmax.cpu().to(torch.float32)[torch.arange(numel) // blocksize]
    return (NF4_CODEBOOK[codes.long()] * scale).to(dtype).reshape(shape)


def nf4_roundtrip_values(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Convenience: quantize then dequantize (plain absmax), float32, for error statistics."""
    packed, absmax = nf4_quantize(w, blocksize)
    return nf4_dequantize(packed, absmax, blocksize, w.shape, torch.float32)


# ==== Paged AdamW (issue 4) ======================================================================
# torch.optim.AdamW's update (torch/optim/adam.py, _single_tensor_adam, decoupled weight decay)
# written as separate elementwise ops, each rounding once in float32, with float32 state for any
# parameter dtype. The fused kernels (csrc/kernels/common/adamw_params.h) follow the same order.


def adamw_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    step: float,
    maximize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step; returns new ``(param, exp_avg, exp_avg_sq)`` without touching the inputs.

    ``param``/``grad``: float32/float16/bfloat16, any shape; ``exp_avg``/``exp_avg_sq``: float32, same
    shape. ``step`` counts this update (>= 1). The parameter is updated in float32 and rounded once.
    """
    g = grad.float()
    if maximize:
        g = -g
    p = param.float() * (1 - lr * weight_decay)
    w = 1 - beta1
    diff = g - exp_avg
    m = exp_avg + w * diff if abs(w) < 0.5 else g - diff * (1 - torch.tensor(w, dtype=torch.float32)).item()
    v = exp_avg_sq * beta2 + (g * (1 - beta2)) * g
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    # sqrt via float64 is exactly rounded (torch's CPU sqrt may use MKL VML, which is not always).
    denom = v.double().sqrt().float() / bias_correction2_sqrt + eps
    p = p + (m * (-(lr / bias_correction1))) / denom
    return p.to(param.dtype), m, v
# ==================================================================================================
# Fused QLoRA linear (issue 3): dropout mask, forward and backward, in float64.
# Restates csrc/kernels/common/dropout_rng.h and csrc/kernels/common/qlora_params.h.
# ==================================================================================================
MIX32_MUL1 = 0x7FEB352D
MIX32_MUL2 = 0x846CA68B
DROPOUT_SEED_SALT = 0x85EBCA6B
DROPOUT_BITS = 24
_U32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 tensors holding uint32 values, with 16-bit limbs (no int64 overflow)."""
    lo, hi = a & 0xFFFF, a >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _U32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16 (mod 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX32_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX32_MUL2)
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """floor(p * 2^24); 0 means no dropout."""
    return int(p * float(1 << DROPOUT_BITS)) if p > 0 else 0


def dropout_keep_scale(p: float) -> float:
    """float32(1 / (1 - p)) as the kernels use it (1 when dropout is off)."""
    if dropout_threshold(p) == 0:
        return 1.0
    return torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()


def dropout_keep(rows: int, cols: int, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """bool [rows, cols]: keep(i, j) of element (i, j) of x viewed [rows, cols] (see dropout_rng.h)."""
    thr = dropout_threshold(p)
    if thr == 0:
        return torch.ones(rows, cols, dtype=torch.bool)
    seed = int(seed)
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    key = _mix32(t(seed & _U32) ^ _mix32(t(((seed >> 32) & _U32) ^ DROPOUT_SEED_SALT)))
    ctr = int(offset) + torch.arange(rows, dtype=torch.int64)[:, None] * cols + torch.arange(cols, dtype=torch.int64)
    lo, hi = ctr & _U32, (ctr >> 32) & _U32
    hi_key = _mix32((hi + key) & _U32)
    h = _mix32(_mix32(lo ^ key) ^ hi_key)
    return (h >> (32 - DROPOUT_BITS)) >= thr


def lora_dropout(x2d: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """drop(x) = x ∘ mask · keep_scale for x viewed [M, K] (same dtype as x2d)."""
    if dropout_threshold(p) == 0:
        return x2d
    mask = dropout_keep(x2d.shape[0], x2d.shape[1], p, seed, offset).to(x2d.device)
    return x2d * mask.to(x2d.dtype) * dropout_keep_scale(p)


def qlora_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 oracle of the fused layer. ``w`` is the dense dequantized weight ``[N, K]`` (use
    nf4_dequantize(..., dtype=x.dtype) to get the values the kernels use); every operand is widened
    to float64, so autograd through this function gives the float64 reference gradients.

    Returns (y [..., N] float64, s [M, r] float64) with s = drop(x)·Aᵀ."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(torch.float64)
    s = lora_dropout(x2, dropout_p, seed, offset) @ A.to(torch.float64).t()
    y = x2 @ w.to(torch.float64).t() + scale * (s @ B.to(torch.float64).t())
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.reshape(*x.shape[:-1], w.shape[0]), s


def qlora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The closed-form backward in float64 (architecture.md section 2): (dx, dA, dB)."""
    k, n = x.shape[-1], w.shape[0]
    d = torch.float64
    x2, dy2 = x.reshape(-1, k).to(d), dy.reshape(-1, n).to(d)
    A, B, w = A.to(d), B.to(d), w.to(d)
    mask = dropout_keep(x2.shape[0], k, dropout_p, seed, offset).to(d) * dropout_keep_scale(dropout_p)
    xd = x2 * mask
    u = dy2 @ B
    dx = dy2 @ w + scale * (u @ A) * mask
    dA = scale * u.t() @ xd
    dB = scale * dy2.t() @ (xd @ A.t())
    return dx.reshape(x.shape), dA, dB


def multi_lora_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]],
    adapter_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 oracle of the per-row multi-adapter layer, one row at a time: row m is :func:`qlora_linear`
    of that row with ``adapters[adapter_ids[m]] = (A [r, K], B [N, r], scale)``, or the base alone when the
    id is negative or not in ``adapters``. ``w`` as for :func:`qlora_linear`. Returns y [..., N] float64."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    ids = adapter_ids.reshape(-1).tolist()
    rows = []
    for m, c in enumerate(ids):
        xm = x2[m : m + 1].to(torch.float64)
        if c in adapters:
            A, B, scale = adapters[c]
            ym, _ = qlora_linear(xm, w, A, B, scale, bias)
        else:
            ym = xm @ w.to(torch.float64).t()
            if bias is not None:
                ym = ym + bias.to(torch.float64)
        rows.append(ym)
    return torch.cat(rows).reshape(*x.shape[:-1], w.shape[0])


# ==================================================================================================
# Fused DoRA linear (issue 34), in float64 from the DoRA paper's definition with the dense weight:
# never the identity the fused op uses for the norm, never PEFT. Autograd through dora_linear gives
# the float64 reference gradients (the norm detached, DoRA section 4.3).
#     n = ‖W + scale·B·A‖ per row (dense), g = m / n
#     no dropout:  y = g ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + bias
#     dropout p:   y = x·Wᵀ + bias + (g - 1) ⊙ (x̃·Wᵀ) + g ⊙ scale·(x̃·Aᵀ)·Bᵀ,  x̃ = drop(x)  (PEFT 0.21's)
# ==================================================================================================
def dora_weight_norm(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W + scale·B·A‖ per row, float64 [N], from the dense matrices."""
    d = torch.float64
    return torch.linalg.vector_norm(w.to(d) + scale * (B.to(d) @ A.to(d)), dim=1)


def dora_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    w_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] float64. ``w``: the dense weight the matmuls use; ``w_norm``: the one the norm uses
    (default ``w``; the fused op takes the norm from the format's float32 decode, its matmuls from the
    decode rounded to x's dtype). Every operand is widened to float64 differentiably."""
    d = torch.float64
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(d)
    W, Ad, Bd, m = w.to(d), A.to(d), B.to(d), magnitude.to(d)
    norm = dora_weight_norm(w if w_norm is None else w_norm, Ad.detach(), Bd.detach(), scale).detach()
    g = m / norm
    if dropout_p > 0:
        xd = lora_dropout(x2, dropout_p, seed, offset)
        y = x2 @ W.t() + (g - 1) * (xd @ W.t()) + g * (scale * ((xd @ Ad.t()) @ Bd.t()))
    else:
        y = g * (x2 @ W.t() + scale * ((x2 @ Ad.t()) @ Bd.t()))
    if bias is not None:
        y = y + bias.to(d)
    return y.reshape(*x.shape[:-1], w.shape[0])
