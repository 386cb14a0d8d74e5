"""Interop with weights that bitsandbytes 0.50 repacked for its AVX-512 BF16 CPU inference path.

The repack is produced here by bitsandbytes' own converter (the function its Linear4bit.forward calls on
avx512_bf16 machines), so these tests run the same on every CPU. The oracle is the spec: the codes must
come back byte-exact, the absmax as the original values rounded to bfloat16 (what the repack keeps)."""

from __future__ import annotations

import warnings

import pytest
import torch
from bnb_required import import_bnb, spec_absmax
from conftest import randn

import lora_ops
from lora_ops import bnb_cpu_layout, reference

bnb = import_bnb()
F = bnb.functional


def _repack(data: torch.Tensor, qs):
    """What bnb's Linear4bit.forward does to a weight on an avx512_bf16 CPU (in place on qs)."""
    return F._convert_weight_packed_for_cpu(data.clone(), qs)


@pytest.fixture(autouse=True)
def _fresh_warning():
    bnb_cpu_layout._warned = False
    yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((96, 256), 128), ((160, 64), 64)])
def test_codes_recovered_exactly_absmax_bf16_rounded(rng, dtype, double_quant, shape, blocksize):
    w = randn(*shape, generator=rng, dtype=dtype, scale=0.03)
    bq, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    original_bytes, original_absmax = bq.clone(), spec_absmax(qs)
    repacked, qs = _repack(bq, qs)
    assert bnb_cpu_layout.is_repacked(qs) and not torch.equal(repacked.reshape(-1), original_bytes.reshape(-1))
    with pytest.warns(UserWarning, match="bfloat16"):
        ours = lora_ops.NF4Weight.from_bnb(repacked, qs)
    assert torch.equal(ours.packed.view(-1), original_bytes.view(-1))  # the re-layout is lossless
    assert not ours.nested and ours.absmax.dtype == torch.float32
    assert torch.equal(ours.absmax, original_absmax.to(torch.bfloat16).float())  # the bf16 rounding is not
    assert (ours.shape, ours.dtype, ours.blocksize) == (torch.Size(shape), dtype, blocksize)
    expected = reference.nf4_dequantize(original_bytes, original_absmax.to(torch.bfloat16).float(), blocksize,
                                        shape, dtype)
    assert torch.equal(ours.dequantize(), expected)


def test_warns_once_and_never_for_a_layer_that_was_not_repacked(rng):
    w = randn(64, 64, generator=rng, dtype=torch.bfloat16)
    bq, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = lora_ops.NF4Weight.from_bnb(bq, qs)  # untouched: zero-copy, no warning
    assert plain.packed.data_ptr() == bq.data_ptr()
    repacked, qs2 = _repack(bq, F.quantize_4bit(w, blocksize=64, quant_type="nf4")[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_ops.NF4Weight.from_bnb(repacked, qs2)
        lora_ops.NF4Weight.from_bnb(repacked, qs2)
    assert sum("bfloat16" in str(c.message) for c in caught) == 1


def test_restore_in_place_makes_bnb_and_lora_ops_read_the_standard_layout(rng):
    lin = torch.nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    l4 = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                           quant_type="nf4")
    l4.load_state_dict(lin.state_dict())
    l4 = l4.to("cpu")
    original_bytes, original_absmax = l4.weight.data.clone(), spec_absmax(l4.weight.quant_state)
    original_dtype = l4.weight.quant_state.dtype
    l4.weight.data, l4.weight.quant_state = _repack(l4.weight.data, l4.weight.quant_state)
    with pytest.warns(UserWarning, match="bfloat16"):
        bnb_cpu_layout.restore_layout_in_place(l4.weight)
    qs = l4.weight.quant_state
    assert not bnb_cpu_layout.is_repacked(qs) and not qs.nested and qs.dtype == original_dtype
    assert torch.equal(l4.weight.data.view(-1), original_bytes.view(-1))
    assert torch.equal(qs.absmax, original_absmax.to(torch.bfloat16).float())
    ours = lora_ops.NF4Weight.from_bnb(l4.weight.data, qs)
    assert ours.packed.data_ptr() == l4.weight.data.data_ptr()  # zero-copy again


def test_rejects_inconsistent_repacked_state(rng):
    w = randn(64, 128, generator=rng, dtype=torch.float32)
    bq, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    repacked, qs = _repack(bq, qs)
    qs.absmax = qs.absmax[:, :10]
    with pytest.raises(ValueError, match="absmax shape"):
        lora_ops.NF4Weight.from_bnb(repacked, qs)
