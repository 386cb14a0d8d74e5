"""Bad-input table (issue 15): every public op x {wrong dtype, wrong shape, 0-d, empty, meta, mixed
devices (CPU with one meta argument), sparse, non-contiguous, misaligned views, NaN/Inf} gives either a
clear exception that names the argument, or a documented correct result (checked here).

Documented results: any shape and any strides of a weight / activation are accepted (the op flattens
or views them), a 0-d weight is a one-element tensor, an empty batch gives an empty output, all-meta
arguments give meta outputs, NaN/Inf activations propagate as in torch (they are not rejected: that
would cost a sync per call), and NaN/Inf weights or absmax are rejected.
"""

import dataclasses

import pytest
import torch

import lora_ops
from lora_ops import QLoRALinear
from lora_ops import reference as R
from lora_ops.ops import qlora as Q

N, K, RANK = 16, 64, 4
HP = torch.tensor([[1e-3, 0.9, 0.999, 0.0, 1e-8, 1.0, 0.0]], dtype=torch.float64)


def _setup():
    g = torch.Generator().manual_seed(15)
    w = torch.randn(N, K, generator=g)
    wq = lora_ops.quantize_nf4(w, 64, double_quant=True)
    x = torch.randn(3, K, generator=g)
    A = torch.randn(RANK, K, generator=g) / 8
    B = torch.randn(N, RANK, generator=g)
    return w, wq, x, A, B


W, WQ, X, A, B = _setup()
CODE = R.dynamic_map()


def _meta(wq, **fields):
    return dataclasses.replace(wq, **{k: getattr(wq, k).to("meta") for k in fields})


def _misaligned(t):
    """The same values as `t` in a view whose storage offset is 1 element (not 16-byte aligned)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    buf[1:] = t.reshape(-1)
    return buf[1:].view(t.shape)


def _strided(t):
    """The same values as 2-D `t` with a column stride of 2 (non-contiguous)."""
    buf = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
    buf[:, ::2] = t
    return buf[:, ::2]


def _linear(x=X, w=WQ, a=A, b=B, scale=1.0, bias=None, p=0.0, rng=None):
    return lora_ops.qlora_linear(x, w, a, b, scale, bias, p, rng)


def _dequant(packed=WQ.packed, absmax=WQ.absmax, shape=WQ.shape, dtype=torch.float32, absmax2=WQ.absmax2,
             code=WQ.nested_code, offset=WQ.offset):
    return lora_ops.nf4_dequantize(packed, absmax, 64, shape, dtype, absmax2, code, offset)


def _adamw(p=None, g=None, m=None, v=None, hp=HP):
    p = torch.randn(10) if p is None else p
    g = torch.randn(10) if g is None else g
    m = torch.zeros(10) if m is None else m
    v = torch.zeros(10) if v is None else v
    return lora_ops.adamw_step_([p], [g], [m], [v], hp)


def _layer_with_meta_buffer():
    layer = QLoRALinear(K, N, RANK, 8.0)
    layer.weight_absmax2 = layer.weight_absmax2.to("meta")
    return layer


NAN_X = X.clone()
NAN_X[1, 5] = float("nan")
NAN_W = W.clone()
NAN_W[2, 3] = float("inf")

# (id, call, exception type, message that names the argument)
ERRORS = [
    # nf4_quantize
    ("quantize-wrong-dtype", lambda: lora_ops.nf4_quantize(W.int(), 64), TypeError, "weight must be a float32"),
    ("quantize-float64", lambda: lora_ops.nf4_quantize(W.double(), 64), TypeError, "weight must be float32"),
    ("quantize-empty", lambda: lora_ops.nf4_quantize(torch.empty(0, K), 64), RuntimeError, "empty"),
    ("quantize-inf", lambda: lora_ops.nf4_quantize(NAN_W, 64), ValueError, "NaN or Inf"),
    ("quantize-sparse", lambda: lora_ops.nf4_quantize(W.to_sparse(), 64), TypeError, "w is torch.sparse_coo"),
    ("quantize-blocksize", lambda: lora_ops.nf4_quantize(W, 48), RuntimeError, "blocksize must be one of"),
    # nf4_double_quantize
    ("dq-wrong-dtype", lambda: lora_ops.nf4_double_quantize(WQ.absmax_float().half(), CODE), TypeError,
     "absmax must be float32"),
    ("dq-code-shape", lambda: lora_ops.nf4_double_quantize(WQ.absmax_float(), CODE[:16]), RuntimeError,
     "nested_code has 16 elements"),
    ("dq-empty", lambda: lora_ops.nf4_double_quantize(torch.empty(0), CODE), RuntimeError, "absmax is empty"),
    ("dq-nan", lambda: lora_ops.nf4_double_quantize(torch.tensor([1.0, float("nan")]), CODE), ValueError,
     "absmax contains NaN or Inf"),
    ("dq-meta-code", lambda: lora_ops.nf4_double_quantize(WQ.absmax_float(), CODE.to("meta")), RuntimeError,
     "nested_code is on meta but absmax is on cpu"),
    ("dq-sparse", lambda: lora_ops.nf4_double_quantize(WQ.absmax_float().to_sparse(), CODE), TypeError,
     "absmax is torch.sparse_coo"),
    # nf4_dequantize
    ("deq-packed-dtype", lambda: _dequant(packed=WQ.packed.to(torch.int8)), TypeError, "packed weight must be uint8"),
    ("deq-out-dtype", lambda: _dequant(dtype=torch.int32), TypeError, "dtype must be float32"),
    ("deq-packed-shape", lambda: _dequant(packed=WQ.packed[:-1]), RuntimeError, "packed weight has"),
    ("deq-empty-shape", lambda: _dequant(shape=(0, K)), RuntimeError, "at least one element"),
    ("deq-offset-size", lambda: _dequant(offset=torch.zeros(2)), RuntimeError, "offset has 2 elements, expected 1"),
    ("deq-offset-dtype", lambda: _dequant(offset=WQ.offset.double()), TypeError, "offset must be Float"),
    ("deq-noncontig-packed", lambda: _dequant(packed=_strided(WQ.packed.view(-1, 2))), RuntimeError,
     "packed weight must be contiguous"),
    ("deq-meta-absmax2", lambda: _dequant(absmax2=WQ.absmax2.to("meta")), RuntimeError, "absmax2 is on meta"),
    ("deq-meta-offset", lambda: _dequant(offset=WQ.offset.to("meta")), RuntimeError, "offset is on meta"),
    ("deq-meta-code", lambda: _dequant(code=WQ.nested_code.to("meta")), RuntimeError, "nested_code is on meta"),
    ("deq-sparse", lambda: _dequant(absmax2=WQ.absmax2.to_sparse()), TypeError, "absmax2 is torch.sparse_coo"),
    # qlora_linear
    ("linear-x-dtype", lambda: _linear(x=X.int()), TypeError, "x must be float32"),
    ("linear-x-shape", lambda: _linear(x=X[:, :-1]), ValueError, "x has 63 features"),
    ("linear-x-0d", lambda: _linear(x=torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
    ("linear-x-sparse", lambda: _linear(x=X.to_sparse()), TypeError, "x is torch.sparse_coo"),
    ("linear-A-shape", lambda: _linear(a=A[:, :-1]), ValueError, "A must be"),
    ("linear-B-rank", lambda: _linear(b=B[:, :-1]), ValueError, "B must be"),
    ("linear-A-dtype", lambda: _linear(a=A.int()), TypeError, "A must have x's dtype"),
    ("linear-bias-shape", lambda: _linear(bias=torch.zeros(N + 1)), ValueError, "bias must be"),
    ("linear-scale-nan", lambda: _linear(scale=float("nan")), ValueError, "scale must be finite"),
    ("linear-rng-dtype", lambda: _linear(p=0.5, rng=torch.zeros(2)), TypeError, "rng must be int64"),
    ("linear-meta-A", lambda: _linear(a=A.to("meta")), RuntimeError, "A is on meta but x is on cpu"),
    ("linear-meta-B", lambda: _linear(b=B.to("meta")), RuntimeError, "B is on meta but x is on cpu"),
    ("linear-meta-bias", lambda: _linear(bias=torch.zeros(N, device="meta")), RuntimeError, "bias is on meta"),
    ("linear-meta-absmax", lambda: _linear(w=_meta(WQ, absmax=1)), RuntimeError, "absmax is on meta"),
    ("linear-meta-absmax2", lambda: _linear(w=_meta(WQ, absmax2=1)), RuntimeError, "absmax2 is on meta"),
    ("linear-meta-code", lambda: _linear(w=_meta(WQ, nested_code=1)), RuntimeError, "nested_code is on meta"),
    ("linear-meta-offset", lambda: _linear(w=_meta(WQ, offset=1)), RuntimeError, "offset is on meta"),
    ("linear-meta-rng", lambda: _linear(p=0.5, rng=Q.make_rng(1).to("meta")), RuntimeError,
     "rng must be a CPU tensor"),
    ("linear-meta-x", lambda: _linear(x=X.to("meta")), RuntimeError, "is on cpu but x is on meta"),
    # qlora_matmul
    ("matmul-a-shape", lambda: lora_ops.qlora_matmul(X[:, :-1], WQ), ValueError, "a must be"),
    ("matmul-a-0d", lambda: lora_ops.qlora_matmul(torch.tensor(1.0), WQ), ValueError, "a must have at least one"),
    ("matmul-meta-bias", lambda: lora_ops.qlora_matmul(X, WQ, bias=torch.zeros(N, device="meta")), RuntimeError,
     "bias is on meta but a is on cpu"),
    ("matmul-lora-s-dtype", lambda: lora_ops.qlora_matmul(X, WQ, False, torch.zeros(3, RANK, dtype=torch.half), B),
     TypeError, "lora_s must be"),
    ("matmul-meta-lora-w", lambda: lora_ops.qlora_matmul(X, WQ, False, torch.zeros(3, RANK), B.to("meta")),
     RuntimeError, "lora_w is on meta"),
    ("matmul-sparse", lambda: lora_ops.qlora_matmul(X.to_sparse(), WQ), TypeError, "a is torch.sparse_coo"),
    # the backward's ops (torch.ops.lora_ops, no Python wrapper): the meta rule lives in their fakes
    ("down-meta-f", lambda: torch.ops.lora_ops.lora_down(X, A.to("meta"), 0.0, None), RuntimeError,
     "f is on meta but a is on cpu"),
    ("outer-meta-right", lambda: torch.ops.lora_ops.lora_outer(X, X.to("meta"), 1.0, 0.0, None, torch.float32),
     RuntimeError, "right is on meta but left is on cpu"),
    ("outer-meta-rng", lambda: torch.ops.lora_ops.lora_outer(X, X, 1.0, 0.5, Q.make_rng(1).to("meta"), torch.float32),
     RuntimeError, "rng must be a CPU tensor"),
    # lora_dropout_mask
    ("mask-rng-dtype", lambda: lora_ops.lora_dropout_mask(3, 4, 0.5, torch.zeros(2)), TypeError, "rng must be int64"),
    ("mask-rng-size", lambda: lora_ops.lora_dropout_mask(3, 4, 0.5, torch.zeros(3, dtype=torch.long)), ValueError,
     "rng must hold 2 values"),
    # adamw_step_
    ("adamw-meta-state", lambda: _adamw(v=torch.zeros(10, device="meta")), RuntimeError, "exp_avg_sqs\\[0\\] is on meta"),
    ("adamw-meta-grad", lambda: _adamw(g=torch.zeros(10, device="meta")), RuntimeError, "grads\\[0\\] is on meta"),
    ("adamw-meta-hparams", lambda: _adamw(hp=HP.to("meta")), RuntimeError, "hparams must be a CPU tensor"),
    ("adamw-sparse-grad", lambda: _adamw(g=torch.randn(10).to_sparse()), TypeError, "grads\\[0\\] is torch.sparse_coo"),
    # QLoRALinear
    ("module-0d", lambda: QLoRALinear(K, N, RANK, 8.0)(torch.tensor(1.0)), ValueError,
     "x must have at least one dimension"),
    ("module-meta-buffer", lambda: _layer_with_meta_buffer()(X), RuntimeError, "absmax2 is on meta"),
]


@pytest.mark.parametrize("call,exc,match", [pytest.param(c, e, m, id=i) for i, c, e, m in ERRORS])
def test_bad_input_raises_clearly(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _linear_ref(x):
    w = R.nf4_dequantize(WQ.packed, WQ.absmax_float(), 64, WQ.shape, torch.float32)
    return R.qlora_linear(x, w, A, B, 1.0)[0]


def _close(ours, ref, rel=1e-5):
    assert ours.shape == ref.shape
    assert (ours.double() - ref.double()).abs().max().item() <= rel * max(1.0, ref.abs().max().item())


# (id, check): documented correct results
def _quantize_any_view():
    for view in (W.t(), _misaligned(W), _strided(W)):
        packed, absmax = lora_ops.nf4_quantize(view, 64)
        ref_packed, ref_absmax = R.nf4_quantize(view.contiguous(), 64)
        assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)


def _quantize_0d():
    packed, absmax = lora_ops.nf4_quantize(torch.tensor(-0.5), 64)
    assert packed.view(-1).tolist() == [0x07] and absmax.tolist() == [0.5]


def _quantize_meta():
    packed, absmax = lora_ops.nf4_quantize(W.to("meta"), 64)
    assert packed.device.type == "meta" and packed.shape == (N * K // 2, 1) and absmax.shape == (N * K // 64,)


def _dq_views():
    absmax = WQ.absmax_float()
    for view in (_misaligned(absmax), _strided(absmax.view(1, -1)).view(-1), torch.tensor(absmax[0].item())):
        q, absmax2, offset = lora_ops.nf4_double_quantize(view, CODE)
        q_ref, absmax2_ref, offset_ref = R.nf4_double_quantize(view.reshape(-1).contiguous())
        assert torch.equal(q, q_ref) and torch.equal(absmax2, absmax2_ref) and torch.equal(offset, offset_ref)


def _deq_offset_shapes():
    ref = _dequant()
    assert torch.equal(_dequant(offset=WQ.offset.reshape(1)), ref)
    assert torch.equal(_dequant(offset=WQ.offset.reshape(())), ref)
    assert torch.equal(_dequant(packed=_misaligned(WQ.packed)), ref)


def _linear_views():
    ref = _linear_ref(X)
    for view in (_misaligned(X), _strided(X), X.t().contiguous().t()):
        _close(_linear(x=view), ref)
    _close(_linear(a=_strided(A), b=B.t().contiguous().t()), ref)


def _linear_empty():
    y = _linear(x=torch.empty(0, K))
    assert y.shape == (0, N)
    y = _linear(x=torch.empty(2, 0, K))
    assert y.shape == (2, 0, N)


def _linear_1d():
    _close(_linear(x=X[0]), _linear_ref(X[0:1])[0])


def _linear_nan_propagates():
    y = _linear(x=NAN_X)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def _linear_all_meta():
    wm = _meta(WQ, packed=1, absmax=1, absmax2=1, nested_code=1, offset=1)
    y = _linear(x=X.to("meta"), w=wm, a=A.to("meta"), b=B.to("meta"))
    assert y.device.type == "meta" and y.shape == (3, N)


def _mask_meta():
    m = lora_ops.lora_dropout_mask(3, 4, 0.5, Q.make_rng(1).to("meta"))
    assert m.device.type == "meta" and m.shape == (3, 4)


RESULTS = [
    ("quantize-views", _quantize_any_view),
    ("quantize-0d", _quantize_0d),
    ("quantize-all-meta", _quantize_meta),
    ("dq-views-and-0d", _dq_views),
    ("deq-offset-shapes-and-misaligned", _deq_offset_shapes),
    ("linear-views", _linear_views),
    ("linear-empty-batch", _linear_empty),
    ("linear-1d-x", _linear_1d),
    ("linear-nan-x-propagates", _linear_nan_propagates),
    ("linear-all-meta", _linear_all_meta),
    ("mask-meta-rng", _mask_meta),
]


@pytest.mark.parametrize("check", [pytest.param(c, id=i) for i, c in RESULTS])
def test_documented_result(check):
    check()
