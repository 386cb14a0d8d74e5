"""The reference implementation restates the spec: check it against the spec's stated facts."""

import pytest
import torch

from lora_ops import reference as R


def test_codebook_facts():
    c = R.NF4_CODEBOOK
    assert c.dtype == torch.float32 and c.numel() == 16
    assert c[0].item() == -1.0 and c[7].item() == 0.0 and c[15].item() == 1.0
    assert (c[1:] > c[:-1]).all()  # sorted, 7 negative, exact zero, 8 positive
    assert (c < 0).sum() == 7 and (c > 0).sum() == 8


def test_codebook_origin_quantiles():
    # Spec section 1: normal quantiles at evenly spaced probabilities, normalized by the largest.
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64))[:-1]
    neg = -normal.icdf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64))[:-1]
    vals = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    vals = vals / vals.max()
    torch.testing.assert_close(vals.float(), R.NF4_CODEBOOK, atol=2e-6, rtol=0)


def test_worked_example():
    packed, absmax = R.nf4_quantize(torch.tensor([0.5, -1.0, 0.0, 0.25]))
    assert packed.flatten().tolist() == [0xC0, 0x7A]
    assert absmax.tolist() == [1.0]


def test_value_on_threshold_takes_lower_code():
    t = R.NF4_THRESHOLDS
    # absmax 1.0 (a 1.0 in the block) makes y == x exactly.
    for i in range(15):
        packed, _ = R.nf4_quantize(torch.stack([t[i], torch.tensor(1.0)]))
        assert packed.item() >> 4 == i, i
        above = torch.nextafter(t[i], torch.tensor(2.0))
        packed, _ = R.nf4_quantize(torch.stack([above, torch.tensor(1.0)]))
        assert packed.item() >> 4 == i + 1, i


def test_dynamic_map_facts():
    d = R.dynamic_map()
    assert d.numel() == 256 and d.dtype == torch.float32
    assert d[127].item() == 0.0 and d[255].item() == 1.0
    assert d[0].item() == pytest.approx(-0.99296875, abs=1e-7)
    assert (d[1:] > d[:-1]).all()
    assert d.abs()[d != 0].min().item() == pytest.approx(5.5e-7, rel=1e-6)


def test_zero_block_partial_block_and_odd_numel():
    w = torch.cat([torch.zeros(64), torch.randn(37) + 3.0])  # one zero block, one partial block
    packed, absmax = R.nf4_quantize(w, 64)
    assert absmax[0].item() == 0.0 and absmax[1].item() == w[64:].abs().max().item()
    assert (packed[:32] == 0x77).all()
    assert packed.numel() == (101 + 1) // 2
    assert packed[-1].item() & 0x0F == 7  # odd numel: last low nibble is the zero code


def test_double_quant_is_exact_nearest_search():
    absmax = torch.rand(1000) * 3 + 0.01
    q, absmax2, offset = R.nf4_double_quantize(absmax)
    dyn = R.dynamic_map().double()
    a = (absmax - offset).view(-1)
    pad = torch.zeros(1024)
    pad[:1000] = a
    v = (pad.view(-1, 256) * (1.0 / absmax2)[:, None]).reshape(-1)[:1000].double()
    dist = (v[:, None] - dyn[None, :]).abs()
    brute = dist.argmin(dim=1)  # first minimum = ties to the lower index
    assert torch.equal(q.long(), brute)
