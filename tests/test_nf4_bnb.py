"""Byte compatibility with bitsandbytes 0.50.x (its CPU backend; CUDA too when present)."""

import json

import pytest
import torch
from bnb_required import import_bnb, spec_absmax
from conftest import randn
from nf4_cases import DTYPES

import lora_ops
from lora_ops import reference

bnb = import_bnb()
F = bnb.functional

SHAPES = [(64, 64), (300, 130), (7, 129), (4096 + 3,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_plain_codes_and_absmax_byte_exact(device, rng, dtype, shape, blocksize):
    w = randn(*shape, generator=rng, dtype=dtype, device=device, scale=0.03)
    bq, bs = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    q = lora_ops.quantize_nf4(w, blocksize, double_quant=False)
    if device == "cuda" and dtype == torch.float32:
        # Spec section 7: bnb's CUDA quantizer uses an approximate reciprocal (~5 codes in 16.8M differ).
        assert (bq.view(-1) != q.packed.view(-1)).sum() <= max(2, w.numel() // 1_000_000)
    else:
        assert torch.equal(bq.view(torch.uint8).view(-1), q.packed.view(-1))
    assert torch.equal(bs.absmax, q.absmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(512, 256), (300, 130), (129 * 64 * 3 + 5,)])
def test_double_quant_state(device, rng, dtype, shape):
    w = randn(*shape, generator=rng, dtype=dtype, device=device, scale=0.03)
    bq, bs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = lora_ops.quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(bq.view(torch.uint8).view(-1), q.packed.view(-1))
    assert torch.equal(bs.offset.reshape(()), q.offset)
    assert torch.equal(bs.state2.absmax, q.absmax2)
    assert torch.equal(bs.state2.code, q.nested_code)
    _assert_nearest_and_rarely_different(w, bs.absmax, q, max_fraction=None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_codes_differ_rarely(device, rng, dtype):
    # Spec section 7: bnb's CPU 8-bit quantizer snaps to a grid before its search, so ~0.2% of its
    # codes differ from the exact nearest search. The rate is not binomial per block: it moves with the
    # draw (the offset and the nested scales set where the grid falls), most with bf16 inputs. Measured
    # on 16384 blocks, 300 draws per dtype (Zen 4 EPYC): 99th percentile 0.24% (fp32), 0.35% (fp16),
    # 0.45% (bf16), and one CI run drew 0.96% (bf16), over the 0.5% bound this test had. A 3% bound
    # leaves room for that tail, yet a systematic encoding difference (one block in a few) fails it.
    w = randn(1024, 1024, generator=rng, dtype=dtype, device=device, scale=0.03)
    _, bs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = lora_ops.quantize_nf4(w, 64, double_quant=True)
    _assert_nearest_and_rarely_different(w, bs.absmax, q, max_fraction=0.03)


def _assert_nearest_and_rarely_different(w, bnb_codes, q, max_fraction):
    """Our qabsmax is the exact nearest code, so wherever bnb's differs, ours is strictly closer to
    the value being encoded, (absmax - offset) / absmax2; and (optionally) differences are rare."""
    _, absmax = lora_ops.nf4_quantize(w, 64)  # the plain absmax that was double-quantized
    a = (absmax - q.offset).cpu().view(-1)
    group = torch.arange(a.numel()) // 256
    v = (a * (1.0 / q.absmax2.cpu())[group]).double()
    dyn = q.nested_code.double().cpu()
    ours, theirs = q.absmax.long().cpu(), bnb_codes.long().cpu()
    diff = ours != theirs
    assert ((v - dyn[ours]).abs()[diff] < (v - dyn[theirs]).abs()[diff]).all()
    if max_fraction is not None:
        assert diff.float().mean().item() <= max_fraction


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_matches_bnb_bit_for_bit(device, rng, out_dtype, double_quant):
    w = randn(300, 130, generator=rng, dtype=out_dtype, device=device, scale=0.03)
    bq, bs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = lora_ops.NF4Weight.from_bnb(bq, bs)  # zero-copy view of bnb's state
    assert ours.packed.data_ptr() == bq.data_ptr()
    assert torch.equal(ours.dequantize(out_dtype), _spec_dequantize(bq, bs, out_dtype))  # the oracle
    # The witness: K = 130 is not a multiple of 16, so bnb takes its scalar CPU path on every machine.
    assert torch.equal(F.dequantize_4bit(bq, bs), ours.dequantize(out_dtype))


def _spec_dequantize(bq, bs, dtype):
    absmax = spec_absmax(bs)
    return reference.nf4_dequantize(bq.view(torch.uint8), absmax, bs.blocksize, bs.shape, dtype).to(bq.device)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_avx512_dequantize_when_blocks_straddle_rows(rng, double_quant):
    """Documents a bitsandbytes 0.50.2 difference (CPU): where torch reports AVX512, its dequantize_4bit
    kernel looks up absmax per row as ``row * (K // blocksize) + k // blocksize``, which is wrong when
    blocksize does not divide K (here K = 96, blocksize 64). lora_ops must equal the spec everywhere;
    bnb is expected to equal it too, and this test xfails (rather than passes) only where bnb's AVX-512
    kernel ran and differed, so a future bnb fix shows up as a pass."""
    w = randn(128, 96, generator=rng, dtype=torch.bfloat16, scale=0.03)
    bq, bs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    spec = _spec_dequantize(bq, bs, torch.bfloat16)
    assert torch.equal(lora_ops.NF4Weight.from_bnb(bq, bs).dequantize(), spec)
    theirs = F.dequantize_4bit(bq, bs)
    if not torch.equal(theirs, spec):
        assert torch.backends.cpu.get_cpu_capability() == "AVX512", "bnb differs from the spec off its AVX-512 path"
        pytest.xfail(f"bitsandbytes {bnb.__version__} AVX-512 dequantize_4bit: absmax indexed per row "
                     f"(max abs difference {(theirs.float() - spec.float()).abs().max().item():.3g})")


def test_to_bnb_roundtrip(device, rng):
    # K = 128: bnb's AVX-512 CPU dequantize is right only when blocksize divides K (see the test above).
    w = randn(200, 128, generator=rng, dtype=torch.bfloat16, device=device)
    q = lora_ops.quantize_nf4(w, 64, double_quant=True)
    packed, qs = q.to_bnb()
    assert torch.equal(F.dequantize_4bit(packed, qs), q.dequantize())
    back = lora_ops.NF4Weight.from_bnb(packed, qs)
    for k, v in q.tensors().items():
        assert torch.equal(v, back.tensors()[k]), k
    assert (back.blocksize, back.shape, back.dtype) == (q.blocksize, q.shape, q.dtype)


def test_from_params4bit(rng):
    w = randn(96, 64, generator=rng, dtype=torch.bfloat16)
    # Params4bit quantizes itself when moved to a device.
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
    assert p.bnb_quantized
    q = lora_ops.NF4Weight.from_bnb(p.data, p.quant_state)
    assert q.packed.data_ptr() == p.data.data_ptr()  # zero-copy
    assert torch.equal(q.dequantize(), F.dequantize_4bit(p.data, p.quant_state))


@pytest.mark.parametrize("double_quant", [False, True])
def test_hf_state_dict_matches_bnb_serialization(rng, double_quant):
    w = randn(96, 128, generator=rng, dtype=torch.bfloat16)  # K % 64 == 0: see the straddling test
    bq, bs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    theirs = {f"layer.weight.{k}": v for k, v in bs.as_dict(packed=True).items()}
    theirs["layer.weight"] = bq
    ours = lora_ops.NF4Weight.from_bnb(bq, bs).hf_state_dict("layer.weight")
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k].cpu(), theirs[k].cpu()), k
    meta = json.loads(bytes(ours["layer.weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert meta["quant_type"] == "nf4" and meta["shape"] == [96, 128] and meta["dtype"] == "bfloat16"
    # And back: bnb reads ours, we read theirs.
    qs = F.QuantState.from_dict({k.removeprefix("layer.weight."): v for k, v in ours.items()
                                 if k != "layer.weight"}, device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(ours["layer.weight"], qs), F.dequantize_4bit(bq, bs))
    back = lora_ops.NF4Weight.from_hf_state_dict(theirs, "layer.weight")
    assert torch.equal(back.dequantize(), F.dequantize_4bit(bq, bs))
