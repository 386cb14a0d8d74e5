"""Property fuzzing (issue 15) with hypothesis: random shapes, blocksizes, dtypes, magnitudes from 2^-140
to near FLT_MAX, heavy tails, dead blocks, values exactly on the code-book thresholds, and
non-contiguous / offset views, checked against the spec oracle (lora_ops/reference.py) and, for the
fused layer, against float64 under the suite's error rule (tests/qlora_utils.py).

CI runs a bounded number of examples per property (FUZZ_EXAMPLES below, ~30 s in all on a 2-core
CPU). Long mode: LORA_OPS_FUZZ_EXAMPLES=<n> runs n examples per property, e.g.
    LORA_OPS_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz_properties.py
Failures print the falsifying example (a seed and the drawn parameters) for a replay.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from qlora_utils import ATOL, MEAN_REL, dense_weight, torch_same_dtype

import lora_ops
from lora_ops import reference as R
from lora_ops.ops.qlora import make_rng, qlora_linear

FUZZ_EXAMPLES = {"quantize": 150, "double_quantize": 80, "fused": 50}


def _settings(kind: str):
    n = int(os.environ.get("LORA_OPS_FUZZ_EXAMPLES", 0)) or FUZZ_EXAMPLES[kind]
    return settings(
        max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
    )


# ---- data ---------------------------------------------------------------------------------------
# |values| <= 4 * 2^exp: up to 2^127 (finite) for fp32 and bf16, sums of absmax past FLT_MAX
DTYPE_EXP_RANGE = {torch.float32: (-140, 125), torch.bfloat16: (-125, 125), torch.float16: (-10, 12)}


def _values(g, n, dtype, exp, tail, dead_frac, blocksize, on_thresholds):
    """n values in dtype: normal or heavy-tailed (Student-t like: normal / |normal|^tail) times 2^exp,
    a fraction of whole blocks zeroed (dead), and optionally whole blocks made of exact thresholds."""
    v = torch.randn(n, generator=g, dtype=torch.float64)
    if tail > 0:
        v = v / torch.randn(n, generator=g, dtype=torch.float64).abs().clamp_min(1e-3) ** tail
    v = v / v.abs().max().clamp_min(1e-300) * 4.0  # |v| <= 4, then scale by an exact power of two
    if on_thresholds:
        # block absmax = 2^exp exactly, other elements exactly on a threshold times absmax (exact: the
        # thresholds are floats, times a power of two): y hits t[i], which must keep the lower code.
        t = torch.cat([R.NF4_THRESHOLDS, -R.NF4_THRESHOLDS, torch.tensor([1.0, -1.0, 0.0])]).double()
        idx = torch.randint(0, t.numel(), (n,), generator=g)
        v = t[idx] * 4.0
        v[::blocksize] = 4.0
    w = (v * 2.0**exp).to(torch.float32)
    n_blocks = -(-n // blocksize)
    dead = torch.rand(n_blocks, generator=g) < dead_frac
    w.view(-1)[(dead.repeat_interleave(blocksize)[:n])] = 0.0
    w = w.to(dtype)
    w[~torch.isfinite(w)] = 0.0
    return w


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as `t` (2-D) in another memory layout."""
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "strided":
        buf = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        buf[:, ::2] = t
        return buf[:, ::2]
    if kind == "offset":
        buf = torch.zeros(t.numel() + 3, dtype=t.dtype)
        buf[3:] = t.reshape(-1)
        return buf[3:].view(t.shape)
    return t


LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided", "offset"])
BLOCKSIZES = st.sampled_from(R.BLOCKSIZES)
NF4_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def weights(draw):
    dtype = draw(NF4_DTYPES)
    lo, hi = DTYPE_EXP_RANGE[dtype]
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, 300))
    blocksize = draw(BLOCKSIZES)
    exp = draw(st.one_of(st.integers(lo, hi), st.sampled_from([lo, 0, hi])))
    tail = draw(st.sampled_from([0.0, 0.0, 1.0, 2.0]))
    dead = draw(st.sampled_from([0.0, 0.3, 0.9]))
    on_thr = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    w = _values(g, rows * cols, dtype, exp, tail, dead, blocksize, on_thr).view(rows, cols)
    return _layout(w, draw(LAYOUTS)), blocksize


# ---- NF4 storage ----------------------------------------------------------------------------------
@_settings("quantize")
@given(case=weights(), out_dtype=NF4_DTYPES)
def test_quantize_and_decode_match_the_oracle(case, out_dtype):
    w, blocksize = case
    packed, absmax = lora_ops.nf4_quantize(w, blocksize)
    ref_packed, ref_absmax = R.nf4_quantize(w.contiguous(), blocksize)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)
    dense = lora_ops.nf4_dequantize(packed, absmax, blocksize, w.shape, out_dtype)
    ref = R.nf4_dequantize(ref_packed, ref_absmax, blocksize, w.shape, out_dtype)
    assert torch.equal(dense.view(torch.uint8), ref.view(torch.uint8))  # bit for bit
    # the nearest-code property, independently of the oracle: |w - decoded| <= half the largest code
    # gap times the block scale, plus the output dtype's rounding (relative eps, absolute subnormal step)
    finite = torch.isfinite(dense)  # fp16 output overflows past 65504
    err = (dense.double() - w.double()).abs()[finite]
    scale = ref_absmax.double().repeat_interleave(blocksize)[: w.numel()].view(w.shape)[finite]
    gap = (R.NF4_CODEBOOK[1:] - R.NF4_CODEBOOK[:-1]).max().item()
    fi = torch.finfo(out_dtype)
    sub = fi.smallest_normal * fi.eps
    assert torch.all(err <= scale * (gap / 2 * (1 + 1e-6) + fi.eps) + sub)


@_settings("double_quantize")
@given(case=weights(), out_dtype=NF4_DTYPES)
def test_double_quantized_storage_matches_the_oracle(case, out_dtype):
    w, blocksize = case
    wq = lora_ops.quantize_nf4(w, blocksize, double_quant=True)
    _, absmax = R.nf4_quantize(w.contiguous(), blocksize)
    q_ref, absmax2_ref, offset_ref = R.nf4_double_quantize(absmax)
    assert torch.isfinite(wq.offset).all()
    assert torch.equal(wq.offset, offset_ref)
    assert torch.equal(wq.absmax, q_ref) and torch.equal(wq.absmax2, absmax2_ref)
    nested = R.nested_absmax(q_ref, absmax2_ref, offset_ref)
    dense = lora_ops.nf4_dequantize(
        wq.packed, wq.absmax, blocksize, w.shape, out_dtype, wq.absmax2, wq.nested_code, wq.offset
    )
    ref = R.nf4_dequantize(wq.packed, nested, blocksize, w.shape, out_dtype)
    assert torch.equal(torch.isnan(dense), torch.isnan(ref))
    assert torch.equal(dense.nan_to_num(), ref.nan_to_num())
    # finite weights decode to finite float32 values, except where the format itself cannot: a
    # reconstructed absmax that rounds past FLT_MAX (fp16/bf16 outputs may overflow legitimately)
    if out_dtype == torch.float32 and torch.isfinite(nested).all():
        assert torch.isfinite(dense).all()


# ---- fused QLoRA linear -----------------------------------------------------------------------------
FUSED_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])


@_settings("fused")
@given(
    m=st.one_of(st.integers(0, 20), st.integers(21, 300)),
    n=st.integers(1, 80),
    k=st.integers(1, 160),
    r=st.sampled_from([1, 2, 4, 8, 16]),
    dtype=FUSED_DTYPES,
    adapter_fp32=st.booleans(),
    blocksize=BLOCKSIZES,
    double_quant=st.booleans(),
    bias=st.booleans(),
    p=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
    layout=LAYOUTS,
    x_exp=st.integers(-6, 6),
    outliers=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_forward_backward_match_float64(
    m, n, k, r, dtype, adapter_fp32, blocksize, double_quant, bias, p, layout, x_exp, outliers, seed
):
    g = torch.Generator().manual_seed(seed)
    adt = torch.float32 if adapter_fp32 or dtype == torch.float64 else dtype
    wq = lora_ops.quantize_nf4(torch.randn(n, k, generator=g) * 0.5, blocksize, double_quant)
    x = torch.randn(m, k, generator=g) * 2.0**x_exp
    if outliers and x.numel():
        x.view(-1)[torch.randint(0, x.numel(), (max(1, x.numel() // 50),), generator=g)] *= 50.0
    x = _layout(x.to(dtype), layout)
    A = (torch.randn(r, k, generator=g) / k**0.5).to(adt)
    B = torch.randn(n, r, generator=g).to(adt)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    scale, rng_seed, offset = 16 / 7, seed, 5
    w = dense_weight(wq, dtype)

    xo, Ao, Bo = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = qlora_linear(xo, wq, Ao, Bo, scale, b, p, make_rng(rng_seed, offset))
    assert y.shape == (m, n) and y.dtype == dtype
    dy = torch.randn(m, n, generator=g).to(dtype)
    y.backward(dy)
    if m == 0:
        assert xo.grad.shape == x.shape and torch.all(Ao.grad == 0) and torch.all(Bo.grad == 0)
        return
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64, _ = R.qlora_linear(x64, w, A64, B64, scale, b.double() if b is not None else None, p, rng_seed, offset)
    y64.backward(dy.double())
    xp, Ap, Bp = (t.detach().clone().requires_grad_() for t in (x, A, B))
    yp = torch_same_dtype(xp, w, Ap, Bp, scale, b, p, rng_seed, offset)
    yp.backward(dy)
    # a result past the output dtype's range (fp16 dA with outliers) is an overflow in any
    # implementation, not a comparison: such draws are discarded
    for ref, dt in ((y64, dtype), (x64.grad, dtype), (A64.grad, adt), (B64.grad, adt)):
        assume(ref.abs().max().item() < torch.finfo(dt).max / 4)
    # magnitudes: the same float64 math on |operands|, the scale of every rounding error
    absd = lambda t: t.detach().double().abs()  # noqa: E731
    mag_y, _ = R.qlora_linear(absd(x), absd(w), absd(A), absd(B), scale, absd(b) if b is not None else None, p,
                              rng_seed, offset)
    mags = (mag_y,) + R.qlora_linear_backward(absd(dy), absd(x), absd(w), absd(A), absd(B), scale, p, rng_seed,
                                              offset)
    outs = ((y, y64, yp, dtype, "y"), (xo.grad, x64.grad, xp.grad, dtype, "dx"),
            (Ao.grad, A64.grad, Ap.grad, adt, "dA"), (Bo.grad, B64.grad, Bp.grad, adt, "dB"))
    for (ours, ref, plain, dt, what), mag in zip(outs, mags):
        _rule(ours, ref, plain, dt, what, mag)


def _rule(ours, ref, plain, dtype, what, mag):
    """The suite's rule (qlora_utils.assert_close_rule): max error <= 2 x plain PyTorch's + atol, and a
    mean relative error bound. Fuzzed shapes include degenerate ones (K = 1, a 1x1 dA, outputs that
    cancel to ~0) where plain PyTorch itself is past the fixed mean bound; there the bound is 2 x
    plain's mean relative error, the same "no worse than torch" yardstick as the max part."""
    ours, ref, plain = (t.detach().double() for t in (ours, ref, plain))
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    if ref.numel() < 16:
        # Too few outputs for error statistics (a 1x1 dB is one short sum whose error is one draw,
        # and "2 x plain PyTorch's" compares two coin flips): the worst-case bound of an fp32
        # summation tree instead, elementwise, plus the output dtype's one rounding.
        bound = 256 * 2.0**-24 * mag.reshape(ref.shape) + torch.finfo(dtype).eps * ref.abs() + 1e-300
        assert torch.all((ours - ref).abs() <= bound), f"{what}: error past the fp32 summation bound"
        return
    err, err_plain = (ours - ref).abs().max().item(), (plain - ref).abs().max().item()
    bound = 2 * err_plain + ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > 2 * plain-PyTorch error {err_plain:.3g} + atol"
    denom = ref.abs().mean().clamp_min(1e-30)
    mean_rel = ((ours - ref).abs().mean() / denom).item()
    plain_rel = ((plain - ref).abs().mean() / denom).item()
    assert mean_rel <= max(MEAN_REL[dtype], 2 * plain_rel), (
        f"{what}: mean relative error {mean_rel:.3g} > {MEAN_REL[dtype]} (plain PyTorch: {plain_rel:.3g})"
    )


def test_long_mode_is_documented():
    # docs/development.md's Reliability section states the CI example counts of this file
    readme = open(os.path.join(os.path.dirname(__file__), "..", "docs", "development.md")).read()
    assert "LORA_OPS_FUZZ_EXAMPLES" in readme
    for kind, n in FUZZ_EXAMPLES.items():
        assert f"{n} {kind.replace('_', '-')}" in readme, kind
