"""NF4 storage at the ends of the float32 range (issue 15): tiny blocks whose 1/absmax overflows, huge
weights whose absmax sum overflows, non-finite absmax given to double quantization.

The oracle for tiny blocks is scale invariance, a property of the spec's formula: multiplying a block
by a power of two (exactly representable both ways) cannot change its codes, so a block of absmax
<= 2^-128 must get the codes of the same block scaled into the normal range.
"""

import pytest
import torch
from conftest import randn

import lora_ops
from lora_ops import reference as R

# (dtype, power-of-two scale): absmax <= 2^-126, and the 1/8 grid of the data still representable
TINY_CASES = [(torch.float32, 2.0**e) for e in (-127, -128, -133, -140)] + [
    (torch.bfloat16, 2.0**e) for e in (-127, -128)
]


def _grid_blocks(rng, scale, dtype):
    """[4, 64] blocks of multiples of 1/8 (|v| <= 4, so bf16/fp32 hold them exactly even times a tiny
    power of two), with exact zeros and one all-zero (dead) block; returns (w = base * scale, base)."""
    base = (randn(4, 64, generator=rng) * 8).round().clamp(-32, 32) / 8
    base[0, 0] = 3.0  # never an all-zero draw
    base[1] = 0.0
    base[2, ::3] = 0.0
    return (base * scale).to(dtype), base


@pytest.mark.parametrize("dtype,scale", TINY_CASES)
def test_tiny_blocks_get_the_codes_of_the_scaled_block(device, rng, dtype, scale):
    w, base = _grid_blocks(rng, scale, dtype)
    assert torch.equal(w.float() / scale, base)  # exact: the premise of scale invariance
    packed, absmax = lora_ops.nf4_quantize(w.to(device), 64)
    expected_packed, expected_absmax = R.nf4_quantize(base, 64)  # normal range: the plain formula
    assert torch.equal(packed.cpu(), expected_packed)
    assert torch.equal(absmax.cpu(), expected_absmax * scale)
    assert torch.equal(R.nf4_quantize(w, 64)[0], expected_packed)  # the reference states the same rule
    # exact zeros decode as zeros, not -absmax
    dense = lora_ops.nf4_dequantize(packed, absmax, 64, w.shape, torch.float32)
    assert torch.all(dense.cpu()[w.float() == 0] == 0)


def test_smallest_subnormal_block(device):
    t = 2.0**-149
    w = torch.tensor([t, 0.0, -t, t, 0.0, 0.0], device=device)
    packed, absmax = lora_ops.nf4_quantize(w, 32)
    # codes 15 (1.0), 7 (0.0), 0 (-1.0), 15, 7, 7
    assert packed.view(-1).tolist() == [0xF7, 0x0F, 0x77] and absmax.item() == t


@pytest.mark.parametrize("scale", [2.0**-128, 2.0**-140])
def test_tiny_nested_groups_encode_like_the_reference(device, rng, scale):
    # absmax values tiny and spread out: absmax - offset is tiny too, so absmax2 <= 2^-126
    absmax = ((randn(300, generator=rng).abs() * 8).round() / 8 + 0.25) * scale
    code = R.dynamic_map().to(device)
    q, absmax2, offset = lora_ops.nf4_double_quantize(absmax.to(device), code)
    q_ref, absmax2_ref, offset_ref = R.nf4_double_quantize(absmax, offset.cpu())
    assert torch.equal(q.cpu(), q_ref) and torch.equal(absmax2.cpu(), absmax2_ref)
    assert 0 < offset.item() <= absmax.max().item()
    # the nested codes carry the values: 8-bit error relative to the group's spread, not garbage
    recon = R.nested_absmax(q.cpu(), absmax2.cpu(), offset.cpu())
    assert (recon - absmax).abs().max().item() <= 0.02 * absmax.max().item()


def test_tiny_double_quantized_weight_round_trips(device, rng):
    w = randn(8, 256, generator=rng) * 2.0**-140
    w[3] = 0.0
    wq = lora_ops.quantize_nf4(w.to(device), 64, double_quant=True)
    dense = wq.dequantize(torch.float32).cpu()
    assert torch.isfinite(dense).all()
    assert torch.all(dense[w == 0] == 0)
    # NF4's own rounding (< half the largest code gap of the block scale) plus the nested absmax error
    err = (dense - w).abs().max().item()
    assert err <= 0.2 * w.abs().max().item()


@pytest.mark.parametrize("magnitude", [1e38, 3.0e38, torch.finfo(torch.float32).max])
def test_huge_weights_double_quantize_to_finite_values(device, rng, magnitude):
    # enough blocks that sum(absmax) passes FLT_MAX
    w = (randn(16, 256, generator=rng).clamp(-1, 1) * magnitude).clamp(-magnitude, magnitude)
    w[:, 0] = magnitude  # every block holds the extreme value
    wq = lora_ops.quantize_nf4(w.to(device), 64, double_quant=True)
    assert torch.isfinite(wq.offset).all()
    _, absmax = R.nf4_quantize(w, 64)
    ref_offset = R.absmax_mean(absmax)
    assert torch.isfinite(ref_offset)
    assert torch.equal(wq.offset.cpu(), ref_offset)
    # the mean of equal values is that value (both the plain and the rescaled rule agree on this)
    assert ref_offset.item() == pytest.approx(absmax.double().mean().item(), rel=1e-6)
    q_ref, absmax2_ref, _ = R.nf4_double_quantize(absmax)
    assert torch.equal(wq.absmax.cpu(), q_ref) and torch.equal(wq.absmax2.cpu(), absmax2_ref)
    dense = wq.dequantize(torch.float32).cpu()
    assert torch.isfinite(dense).all()
    assert (dense - w).abs().max().item() <= 0.2 * magnitude


def test_offset_is_torch_mean_when_it_does_not_overflow(device, rng):
    absmax = randn(1000, generator=rng).abs() * 1e30
    _, _, offset = lora_ops.nf4_double_quantize(absmax.to(device), R.dynamic_map().to(device))
    assert torch.equal(offset, absmax.to(device).mean())  # bitsandbytes' value, bit for bit


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_double_quantize_rejects_non_finite_absmax(device, bad):
    absmax = torch.tensor([0.5, bad, 1.0], device=device)
    with pytest.raises(ValueError, match="absmax contains NaN or Inf"):
        lora_ops.nf4_double_quantize(absmax, R.dynamic_map().to(device))
