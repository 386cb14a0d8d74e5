"""NF4 kernels (CPU, and CUDA when present) against the reference, byte for byte."""

import sys

import pytest
import torch
from conftest import randn
from nf4_cases import BLOCKSIZES, DTYPES, SHAPES

import lora_ops
from lora_ops import reference as R


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_quantize_matches_reference(device, rng, dtype, shape, blocksize):
    w = randn(*shape, generator=rng, dtype=dtype, device=device, scale=0.02)
    packed, absmax = lora_ops.nf4_quantize(w, blocksize)
    ref_packed, ref_absmax = R.nf4_quantize(w.cpu(), blocksize)
    assert packed.shape == ref_packed.shape and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(absmax.cpu(), ref_absmax)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize(device, rng, blocksize):
    w = randn(5, 1000 + 3, generator=rng, device=device)
    packed, absmax = lora_ops.nf4_quantize(w, blocksize)
    ref_packed, ref_absmax = R.nf4_quantize(w.cpu(), blocksize)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)


@pytest.mark.parametrize("shape", [(1,), (255,), (256 * 64 + 65,), (3000 * 64 - 1,)])
def test_double_quantize_matches_reference(device, rng, shape):
    w = randn(*shape, generator=rng, device=device)
    _, absmax = lora_ops.nf4_quantize(w, 64)
    code = R.dynamic_map().to(device)
    q, absmax2, offset = lora_ops.nf4_double_quantize(absmax, code)
    # offset is torch's float32 mean on the op's device (a CUDA mean may differ from the CPU's in
    # the last bit); everything after it must match the reference exactly.
    assert torch.equal(offset, absmax.mean())
    rq, rabsmax2, _ = R.nf4_double_quantize(absmax.cpu(), offset)
    assert torch.equal(absmax2.cpu(), rabsmax2)
    assert torch.equal(q.cpu(), rq)


def test_double_quantize_constant_absmax_gives_zero_code(device):
    # Every block has the same absmax: a == 0 everywhere, so absmax2 == 0 and the code is 0.0's.
    w = torch.ones(64 * 300, device=device) * torch.tensor([1.0, -1.0], device=device).repeat(64 * 150)
    q = lora_ops.quantize_nf4(w, 64, double_quant=True)
    assert (q.absmax2.cpu() == 0).all() and (q.absmax.cpu() == 127).all()
    assert torch.equal(q.dequantize(torch.float32).cpu(), w.cpu())


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_bit_identical(device, rng, out_dtype, double_quant, shape):
    w = randn(*shape, generator=rng, device=device, scale=0.05)
    q = lora_ops.quantize_nf4(w, 64, double_quant=double_quant)
    out = q.dequantize(out_dtype)
    assert out.shape == w.shape and out.dtype == out_dtype and out.device.type == device
    absmax = q.absmax_float().cpu()
    if double_quant:
        absmax = R.nested_absmax(q.absmax.cpu(), q.absmax2.cpu(), q.offset.cpu())
    ref = R.nf4_dequantize(q.packed.cpu(), absmax, 64, w.shape, out_dtype)
    assert torch.equal(out.cpu().view(torch.uint8) if out_dtype != torch.float32 else out.cpu(),
                       ref.view(torch.uint8) if out_dtype != torch.float32 else ref)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_into_out_writes_the_reference_bits(device, rng, out_dtype, double_quant):
    w = randn(37, 3, 71, generator=rng, device=device, scale=0.05)  # odd numel: a partial last block
    q = lora_ops.quantize_nf4(w, 64, double_quant=double_quant)
    absmax = R.nested_absmax(q.absmax.cpu(), q.absmax2.cpu(), q.offset.cpu()) if double_quant else q.absmax.cpu()
    ref = R.nf4_dequantize(q.packed.cpu(), absmax, 64, w.shape, out_dtype)
    out = torch.full(w.shape, float("nan"), dtype=out_dtype, device=device)  # poisoned: every element written
    assert q.dequantize(out=out) is out
    assert torch.equal(out.cpu().view(torch.uint8), ref.view(torch.uint8))
    out2 = torch.full(w.shape, float("nan"), dtype=out_dtype, device=device)
    got = lora_ops.nf4_dequantize(q.packed, q.absmax, 64, w.shape, None, q.absmax2, q.nested_code, q.offset,
                                  out=out2)
    assert got is out2 and torch.equal(out2.cpu().view(torch.uint8), ref.view(torch.uint8))


def test_dequantize_into_rejects_bad_out(device, rng):
    q = lora_ops.quantize_nf4(randn(16, 64, generator=rng, device=device), 64, double_quant=True)
    with pytest.raises(ValueError, match="shape"):
        q.dequantize(out=torch.empty(64, 16, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        q.dequantize(out=torch.empty(64, 16, device=device).t())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        q.dequantize(out=torch.empty(16, 64, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="differs"):
        q.dequantize(torch.float16, out=torch.empty(16, 64, device=device))
    # out overlapping the weight's own bytes (here: its packed codes) would be read while written
    buf = torch.empty(16 * 64, dtype=torch.float32, device=device)
    packed_alias = buf.view(torch.uint8)[: q.packed.numel()].view(q.packed.shape)
    packed_alias.copy_(q.packed)
    w, meta = q.op_args()
    with pytest.raises(ValueError, match="shares memory"):
        torch.ops.lora_ops.nf4_dequantize_into([packed_alias, *w[1:]], meta, buf.view(16, 64))


def test_dequantize_large_output_is_an_ordinary_tensor(rng):
    # CPU outputs of >= 8 MiB come from huge-page memory (csrc/bindings/cpu_huge_pages.h): the values are
    # the reference's, and the tensor behaves as any other (in-place ops, views, freed with its last use).
    w = randn(1031, 4096, generator=rng, scale=0.05)  # 8.06 MiB of fp16: just above the threshold
    q = lora_ops.quantize_nf4(w, 64, double_quant=True)
    absmax = R.nested_absmax(q.absmax, q.absmax2, q.offset)
    ref = R.nf4_dequantize(q.packed, absmax, 64, w.shape, torch.float16)
    for _ in range(3):  # fresh memory each time
        out = q.dequantize(torch.float16)
        assert out.is_contiguous() and out.shape == w.shape
        if sys.platform.startswith("linux"):  # the huge-page allocation ran: 2 MiB-aligned
            assert out.data_ptr() % (2 << 20) == 0
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
        out.add_(1.0)[5:9].mul_(0.0)
        assert torch.equal(out[5:9], torch.zeros(4, 4096, dtype=torch.float16))
        del out


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_dequantize_blocksizes(device, rng, blocksize):
    w = randn(3, 4100, generator=rng, device=device)
    q = lora_ops.quantize_nf4(w, blocksize, double_quant=True)
    absmax = R.nested_absmax(q.absmax.cpu(), q.absmax2.cpu(), q.offset.cpu())
    ref = R.nf4_dequantize(q.packed.cpu(), absmax, blocksize, w.shape, torch.bfloat16)
    assert torch.equal(q.dequantize(torch.bfloat16).cpu(), ref)


def test_zero_and_partial_blocks(device, rng):
    w = torch.cat([torch.zeros(128), randn(77, generator=rng) * 5]).to(device)
    q = lora_ops.quantize_nf4(w, 64, double_quant=False)
    assert (q.packed[:64].cpu() == 0x77).all() and (q.absmax[:2].cpu() == 0).all()
    assert q.packed[-1].item() & 0x0F == 7
    assert (q.dequantize(torch.float32)[:128] == 0).all()


def test_non_contiguous_input_is_flattened_row_major(device, rng):
    w = randn(130, 70, generator=rng, device=device)
    wt = w.t()  # non-contiguous view
    packed, absmax = lora_ops.nf4_quantize(wt, 64)
    ref_packed, ref_absmax = R.nf4_quantize(wt.contiguous().cpu(), 64)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)


def test_roundtrip_error_bounded(device, rng):
    # Hard bound: a value is at most half the widest codebook gap (times absmax) from its code.
    w = randn(512, 512, generator=rng, device=device)
    q = lora_ops.quantize_nf4(w, 64, double_quant=False)
    err = (q.dequantize(torch.float32) - w).abs().cpu().view(-1, 64)
    half_gap = (R.NF4_CODEBOOK[1:] - R.NF4_CODEBOOK[:-1]).max() / 2
    bound = half_gap * q.absmax.cpu()[:, None] * (1 + 1e-6)
    assert (err <= bound).all()


def test_roundtrip_error_statistics(rng):
    # Statistical bound (mean + 7 sigma over many independent samples of the reference) for the
    # mean relative error of N(0,1) weights, then one fresh kernel sample must fall inside it.
    def rel_err(deq, w):
        return ((deq - w).abs().mean() / w.abs().mean()).item()

    samples = []
    for _ in range(30):
        w = torch.randn(64 * 256, generator=rng)
        samples.append(rel_err(R.nf4_roundtrip_values(w, 64), w))
    s = torch.tensor(samples, dtype=torch.float64)
    w = torch.randn(64 * 256, generator=rng)
    got = rel_err(lora_ops.quantize_nf4(w, 64, double_quant=True).dequantize(torch.float32), w)
    assert s.mean() - 7 * s.std() <= got <= s.mean() + 7 * s.std() + 2e-3  # +double-quant slack
    assert 0.05 < s.mean() < 0.15  # NF4 at blocksize 64 sits near 9% mean relative error


def test_to_device_roundtrip(rng):
    w = randn(33, 65, generator=rng)
    q = lora_ops.quantize_nf4(w, 64)
    q2 = q.to("cpu")
    assert torch.equal(q2.dequantize(), q.dequantize())
    if torch.cuda.is_available():
        qc = q.to("cuda")
        assert qc.device.type == "cuda"
        assert torch.equal(qc.dequantize().cpu(), q.dequantize())
