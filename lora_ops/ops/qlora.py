"""Fused QLoRA linear ops: wrappers over torch.ops.lora_ops.{qlora_linear, qlora_matmul, lora_down,
lora_outer, lora_dropout_mask}, their fake kernels, and the autograd of ``qlora_linear``.

Math (x viewed as [M, K], W = dequant(NF4) [N, K], A [r, K], B [N, r], drop(x) = x∘mask/(1-p)):

    forward   s  = drop(x)·Aᵀ                       (float32 [M, r], saved)
              y  = x·Wᵀ + scale·s·Bᵀ + bias         (x's dtype)
    backward  u  = dy·B                              lora_down(dy, Bᵀ)            (computed once)
              dx = dy·W + scale·(u·A)∘mask/(1-p)     qlora_matmul(transpose_w=True)
              dA = scale·uᵀ·drop(x)                  lora_outer(u, x, dropout on)
              dB = scale·dyᵀ·s                       lora_outer(dy, s)

Saved for backward: x, s, A, B, the weight's tensors and the rng tensor (the dropout mask is
regenerated from it). No gradient for W, absmax or bias; dA/dB come back in A's/B's own dtype.
Every backward step is a custom op, so ``torch.compile(fullgraph=True)`` traces forward + backward.
"""

from __future__ import annotations

import torch

from lora_ops import _native  # noqa: F401  (registers the ops)
from lora_ops.ops._checks import check_one_device, explain_dispatch_error, weight_parts

_ops = torch.ops.lora_ops
_ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _rows(shape) -> int:
    m = 1
    for d in shape[:-1]:
        m = m * d
    return m


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- fake (meta) kernels -----------------------------------------------------------------------
# The weight is one value (w, w_meta) = NF4Weight.op_args(): w_meta = [blocksize, N, K].
@torch.library.register_fake("lora_ops::qlora_linear")
def _qlora_linear_fake(x, w, w_meta, A, B, bias, scale, dropout_p, rng):
    check_one_device("qlora_linear", "x", x, host={"rng": rng}, **weight_parts(w), A=A, B=B, bias=bias)
    y = x.new_empty((*x.shape[:-1], w_meta[1]))
    s = x.new_empty((_rows(x.shape), A.shape[0]), dtype=_acc_dtype(x))
    return y, s


@torch.library.register_fake("lora_ops::qlora_matmul")
def _qlora_matmul_fake(a, w, w_meta, transpose_w, lora_s, lora_w, scale, bias, dropout_p, rng):
    check_one_device(
        "qlora_matmul", "a", a, host={"rng": rng}, **weight_parts(w), lora_s=lora_s, lora_w=lora_w, bias=bias
    )
    return a.new_empty((*a.shape[:-1], w_meta[2] if transpose_w else w_meta[1]))


@torch.library.register_fake("lora_ops::lora_down")
def _lora_down_fake(a, f, dropout_p, rng):
    check_one_device("lora_down", "a", a, host={"rng": rng}, f=f)
    return a.new_empty((_rows(a.shape), f.shape[0]), dtype=_acc_dtype(a))


@torch.library.register_fake("lora_ops::lora_outer")
def _lora_outer_fake(left, right, scale, dropout_p, rng, out_dtype):
    check_one_device("lora_outer", "left", left, host={"rng": rng}, right=right)
    return left.new_empty((left.shape[-1], right.shape[-1]), dtype=out_dtype)


@torch.library.register_fake("lora_ops::lora_dropout_mask")
def _lora_dropout_mask_fake(rows, cols, dropout_p, rng):
    # The real op reads rng on the host and returns a CPU mask: meta in, meta out.
    return rng.new_empty((rows, cols), dtype=torch.bool)


# ---- autograd of qlora_linear ------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, w, w_meta, A, B, _bias, scale, dropout_p, rng = inputs
    _, s = output
    ctx.mark_non_differentiable(s)
    ctx.w_meta, ctx.scale, ctx.dropout_p = w_meta, scale, dropout_p
    ctx.save_for_backward(x, s, A, B, rng, *w)


def _grads(dy, x, s, A, B, rng, w, w_meta, scale, dropout_p, need_dx, need_dA, need_dB):
    """(dx, dA, dB) of qlora_linear (None where not needed): the one backward of both autograd paths."""
    dx = dA = dB = None
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    u = _ops.lora_down(dy, B.t(), 0.0, None) if (need_dx or need_dA) else None  # dy·B, once
    if need_dx:
        dx = _ops.qlora_matmul(dy, w, w_meta, True, u, A.t(), scale, None, dropout_p, rng)
    if need_dA:
        dA = _ops.lora_outer(u, x, scale, dropout_p, rng, A.dtype)
    if need_dB:
        dB = _ops.lora_outer(dy, s, scale, 0.0, None, B.dtype)
    return dx, dA, dB


def _backward(ctx, grad_y, grad_s):
    x, s, A, B, rng, *w = ctx.saved_tensors
    no_dw = [None] * len(w)  # one entry per tensor of the weight list (never differentiated)
    if grad_y is None:
        return None, no_dw, None, None, None, None, None, None, None
    need = ctx.needs_input_grad
    dx, dA, dB = _grads(grad_y, x, s, A, B, rng, w, ctx.w_meta, ctx.scale, ctx.dropout_p, need[0], need[3], need[4])
    return dx, no_dw, None, dA, dB, None, None, None, None


torch.library.register_autograd("lora_ops::qlora_linear", _backward, setup_context=_setup_context)


# ---- the eager fast path -----------------------------------------------------------------------
# Why a second autograd path: the registered autograd above is what torch.compile traces, but in eager
# mode its generic machinery (pytree flattening of the weight list, default filling, a Python
# redispatch) costs more than the kernels at small sizes. In eager mode the wrapper below runs the same
# op below the autograd key inside this Function, and its backward is the same _grads: results are
# bit-identical (tests/test_qlora_eager_fast_path.py). False sends every call through the registered
# autograd (for tests and benchmarks that compare the two).
EAGER_FAST_PATH = True


class _QLoRALinearEager(torch.autograd.Function):
    # The weight comes as one list argument: it is never differentiated, and Function.apply costs more
    # per tensor argument. Its tensors are still saved with save_for_backward (in-place checks, hooks).
    @staticmethod
    def forward(ctx, x, A, B, bias, rng, w, w_meta, scale, dropout_p):
        with torch._C._AutoDispatchBelowAutograd():
            y, s = _ops.qlora_linear(x, w, w_meta, A, B, bias, scale, dropout_p, rng)
        ctx.w_meta, ctx.scale, ctx.dropout_p = w_meta, scale, dropout_p
        ctx.save_for_backward(x, s, A, B, rng, *w)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, s, A, B, rng, *w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA, dB = _grads(grad_y, x, s, A, B, rng, w, ctx.w_meta, ctx.scale, ctx.dropout_p, need[0], need[1], need[2])
        return dx, dA, dB, None, None, None, None, None, None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(*tensors: torch.Tensor | None) -> bool:
    """True in plain eager mode on plain tensors: not traced by torch.compile/export, no functorch
    transform, no tensor subclass (those keep the registered path, whatever they do with it)."""
    return (EAGER_FAST_PATH and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in _PLAIN for t in tensors))


# ---- public wrappers ---------------------------------------------------------------------------
def make_rng(seed: int | torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """The op's ``rng`` argument: int64 CPU tensor ``[2] = (seed, offset)``.

    ``seed=None`` draws a seed from torch's default CPU generator (so ``torch.manual_seed`` makes
    dropout reproducible; traceable by ``torch.compile``)."""
    if seed is None:
        s = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        return torch.cat([s, torch.tensor([offset], dtype=torch.int64)])
    if isinstance(seed, torch.Tensor):
        if seed.numel() == 2:
            return seed.to(device="cpu", dtype=torch.int64).reshape(2)
        return torch.cat([seed.to(device="cpu", dtype=torch.int64).reshape(1), torch.tensor([offset])])
    return torch.tensor([int(seed), int(offset)], dtype=torch.int64)


# Why the default rng is drawn by an op, not inline: Inductor lowers torch.randint to its own Philox
# stream, so a seed drawn inline in a compiled forward would differ from the eager one. As a custom op
# tagged nondeterministic_seeded the draw runs as is at run time (eager == compiled for one
# torch.manual_seed), is never merged with another draw and never recomputed in the backward.
@torch.library.custom_op("lora_ops_py::draw_dropout_rng", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def draw_dropout_rng() -> torch.Tensor:
    """A fresh ``(seed, offset)`` int64 CPU tensor, the seed drawn from torch's default CPU generator
    (:func:`make_rng` with ``seed=None``): what ``qlora_linear(..., rng=None)`` uses when dropout_p > 0."""
    return make_rng()


@draw_dropout_rng.register_fake
def _draw_dropout_rng_fake() -> torch.Tensor:
    return torch.empty(2, dtype=torch.int64, device="cpu")


def qlora_linear(
    x: torch.Tensor,
    weight,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x·Wᵀ + scale·(drop(x)·Aᵀ)·Bᵀ + bias`` with an NF4 ``weight`` (:class:`lora_ops.NF4Weight`).

    Args:
        x: ``[..., K]`` float16 / bfloat16 / float32 (float64 on CPU only), any strides.
        weight: NF4Weight of shape ``[N, K]`` (plain or double-quantized absmax, any blocksize).
        A: ``[r, K]``, B: ``[N, r]`` (r in 1..``lora_ops.format.MAX_LORA_RANK``), in x's dtype or float32 (other dtypes are cast to
            float32 here, differentiably).
        scale: LoRA scaling (``alpha / r`` or ``alpha / sqrt(r)``).
        bias: frozen ``[N]`` (x's dtype or float32; cast otherwise), never differentiated.
        dropout_p: LoRA dropout probability in [0, 1), applied to the LoRA branch only.
        rng: from :func:`make_rng`; when None and dropout_p > 0, drawn from torch's default CPU generator
            by :func:`draw_dropout_rng` (the same in eager mode and under ``torch.compile``).

    Returns ``y [..., N]`` in x's dtype. Differentiable w.r.t. x, A and B. Shapes, dtypes and devices
    are checked by the op (csrc/bindings/ops_qlora.cpp), with messages naming the argument.
    """
    w, w_meta = weight.op_args()
    return qlora_linear_args(x, w, w_meta, A, B, scale, bias, dropout_p, rng)


def qlora_linear_args(
    x: torch.Tensor,
    w: list[torch.Tensor],
    w_meta: list[int],
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`qlora_linear` with the weight given as the ops take it, ``(w, w_meta)`` =
    ``NF4Weight.op_args()``: what the layers call, so that no NF4Weight is built per call."""
    A, B = _adapter(A, x), _adapter(B, x)
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        bias = bias.to(x.dtype)
    eager = _eager(x, A, B, bias)
    if dropout_p > 0 and rng is None:
        rng = make_rng() if eager else draw_dropout_rng()  # the op's own eager body: the same draw
    scale, dropout_p = float(scale), float(dropout_p)
    try:
        if not eager:
            y, _ = _ops.qlora_linear(x, w, w_meta, A, B, bias, scale, dropout_p, rng)
        elif torch.is_grad_enabled() and torch._C._any_requires_grad(x, A, B, bias, *w):
            y = _QLoRALinearEager.apply(x, A, B, bias, rng, w, w_meta, scale, dropout_p)
        else:  # nothing to differentiate: the kernel alone (what the registered autograd does too)
            with torch._C._AutoDispatchBelowAutograd():
                y, _ = _ops.qlora_linear(x, w, w_meta, A, B, bias, scale, dropout_p, rng)
    except NotImplementedError:
        explain_dispatch_error("qlora_linear", x=x, A=A, B=B, bias=bias, rng=rng)
        raise
    return y


def _adapter(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if t.dtype in (x.dtype, torch.float32) or t.dtype not in _ADAPTER_DTYPES:
        return t  # unsupported dtypes reach the op, which raises a clear TypeError
    return t.to(torch.float32)


def qlora_matmul(
    a: torch.Tensor,
    weight,
    transpose_w: bool = False,
    lora_s: torch.Tensor | None = None,
    lora_w: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused dequant-GEMM: ``a·Wᵀ + scale·lora_s·lora_wᵀ + bias`` (``a [..., K] -> [..., N]``), or with
    ``transpose_w`` ``a·W + scale·(lora_s·lora_wᵀ)∘mask/(1-p)`` (``a [..., N] -> [..., K]``, the dx form).
    ``lora_s``: float32 ``[M, r]``; ``lora_w``: ``[n_out, r]`` (any strides). Not differentiable."""
    w, w_meta = weight.op_args()
    return qlora_matmul_args(a, w, w_meta, transpose_w, lora_s, lora_w, scale, bias, dropout_p, rng)


def qlora_matmul_args(
    a: torch.Tensor,
    w: list[torch.Tensor],
    w_meta: list[int],
    transpose_w: bool = False,
    lora_s: torch.Tensor | None = None,
    lora_w: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`qlora_matmul` with the weight given as ``(w, w_meta)`` = ``NF4Weight.op_args()``."""
    try:
        return _ops.qlora_matmul(
            a, w, w_meta, transpose_w, lora_s, lora_w, float(scale), bias, float(dropout_p), rng
        )
    except NotImplementedError:
        explain_dispatch_error("qlora_matmul", a=a, lora_s=lora_s, lora_w=lora_w, bias=bias, rng=rng)
        raise


def lora_dropout_mask(rows: int, cols: int, dropout_p: float, rng: torch.Tensor) -> torch.Tensor:
    """The keep-mask (bool ``[rows, cols]``, CPU) the kernels use for x viewed as ``[rows, cols]``."""
    try:
        return _ops.lora_dropout_mask(rows, cols, float(dropout_p), rng)
    except NotImplementedError:
        explain_dispatch_error("lora_dropout_mask", rng=rng)
        raise
