"""CUDA-only NF4 cases the device-parametrized tests do not reach: CUDA vs CPU kernels bit for bit
around the CUDA kernels' segment boundaries, unaligned pointers (the kernels' scalar fallback), a
non-default stream, and (LORA_OPS_LARGE_TESTS=1, a GPU with >= 24 GB free) a weight of more than
2^31 elements. Everything here is skipped without a GPU."""

import os

import pytest
import torch
from conftest import randn

import lora_ops
from lora_ops import reference as R

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and lora_ops.WITH_CUDA), reason="needs an NVIDIA GPU and a CUDA build"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The dequantize kernel works in 1024-element warp segments (16-byte loads of 32 codes per lane);
# quantize in tiles of 256 threads x 8 or 16 elements. Sizes on both sides of those boundaries.
SIZES = [31, 33, 1023, 1024, 1025, 2 * 1024 * 8 + 1, 3 * 65536 + 17, 1 << 20]


def _dequant(q, dtype):
    return lora_ops.nf4_dequantize(q.packed, q.absmax, q.blocksize, q.shape, dtype, q.absmax2, q.nested_code, q.offset)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 512, 4096])
def test_cuda_quantize_equals_cpu_kernel(rng, n, dtype, blocksize):
    w = randn(n, generator=rng, dtype=dtype, scale=0.1)
    packed_c, absmax_c = lora_ops.nf4_quantize(w, blocksize)
    packed_g, absmax_g = lora_ops.nf4_quantize(w.cuda(), blocksize)
    assert torch.equal(packed_g.cpu(), packed_c)
    assert torch.equal(absmax_g.cpu(), absmax_c)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_cuda_dequantize_equals_cpu_kernel(rng, n, out_dtype, double_quant, blocksize):
    q = lora_ops.quantize_nf4(randn(n, generator=rng, scale=0.1), blocksize, double_quant=double_quant)
    expect = _dequant(q, out_dtype)
    got = _dequant(q.to("cuda"), out_dtype)
    assert torch.equal(got.cpu().view(torch.uint8), expect.view(torch.uint8))


def _misaligned_copy(t: torch.Tensor, shift_bytes: int) -> torch.Tensor:
    """The same values in a contiguous view whose data pointer is NOT 16-byte aligned."""
    item = t.element_size()
    assert shift_bytes % item == 0
    base = torch.empty(t.numel() + 16 // item, dtype=t.dtype, device=t.device)
    view = base[shift_bytes // item : shift_bytes // item + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_input_and_packed(rng, dtype):
    n = 5 * 1024 + 77
    w = randn(n, generator=rng, dtype=dtype)
    shift = 2 if dtype != torch.float32 else 4
    packed_g, absmax_g = lora_ops.nf4_quantize(_misaligned_copy(w.cuda(), shift), 64)
    packed_c, absmax_c = lora_ops.nf4_quantize(w, 64)
    assert torch.equal(packed_g.cpu(), packed_c) and torch.equal(absmax_g.cpu(), absmax_c)

    q = lora_ops.quantize_nf4(w, 64, double_quant=True)
    packed_odd = _misaligned_copy(q.packed.cuda(), 1)
    qc = q.to("cuda")
    got = lora_ops.nf4_dequantize(packed_odd, qc.absmax, 64, q.shape, torch.bfloat16, qc.absmax2, qc.nested_code,
                                  qc.offset)
    assert torch.equal(got.cpu().view(torch.int16), _dequant(q, torch.bfloat16).view(torch.int16))


def test_side_stream(rng):
    """The ops enqueue on the CURRENT stream: results made on a side stream are complete once it syncs."""
    w = randn(4099, 257, generator=rng).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q = lora_ops.quantize_nf4(w, 64, double_quant=False)
        out = q.dequantize(torch.float32)
    s.synchronize()
    expect = lora_ops.quantize_nf4(w.cpu(), 64, double_quant=False)
    assert torch.equal(q.packed.cpu(), expect.packed) and torch.equal(q.absmax.cpu(), expect.absmax)
    assert torch.equal(out.cpu(), expect.dequantize(torch.float32))


def _double_quant_given_offset(absmax: torch.Tensor, offset: torch.Tensor):
    """Spec section 5 with a given offset (the device's own mean), in plain torch on the CPU."""
    a = absmax.cpu() - offset.cpu()
    nb = a.numel()
    pad = torch.zeros(-nb % 256)
    absmax2 = torch.cat([a.abs(), pad]).view(-1, 256).amax(1)
    r = torch.where(absmax2 == 0, torch.zeros(()), 1.0 / absmax2)
    v = (torch.cat([a, pad]).view(-1, 256) * r[:, None]).reshape(-1)[:nb].double()
    dyn = R.dynamic_map().double()
    q = torch.searchsorted((dyn[:-1] + dyn[1:]) / 2, v, right=False).to(torch.uint8)
    q = torch.where(absmax2.repeat_interleave(256)[:nb] == 0, torch.full_like(q, 127), q)
    return q, absmax2


@pytest.mark.skipif(os.environ.get("LORA_OPS_LARGE_TESTS") != "1", reason="set LORA_OPS_LARGE_TESTS=1 (slow, ~12 GB)")
def test_more_than_2_31_elements(rng):
    free, _ = torch.cuda.mem_get_info()
    if free < (24 << 30):
        pytest.skip(f"needs 24 GB of free GPU memory, {free >> 30} GB free")
    bs, group = 64, 64 * 256  # a window starting on a multiple of `group` owns whole nested blocks
    n = (1 << 31) + 3 * group + 37  # odd, partial last block and partial last nested block
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    packed, absmax = lora_ops.nf4_quantize(w, bs)
    windows = [(0, 1 << 20), ((1 << 31) - (1 << 20), (1 << 31) + group), (n - n % group - group, n)]
    for a, b in windows:  # quantization blocks are independent: a block-aligned slice quantizes alike
        p_ref, m_ref = lora_ops.nf4_quantize(w[a:b].cpu(), bs)
        assert torch.equal(packed[a // 2 : (b + 1) // 2].cpu(), p_ref), (a, b)
        assert torch.equal(absmax[a // bs : -(-b // bs)].cpu(), m_ref), (a, b)

    qabsmax, absmax2, offset = lora_ops.nf4_double_quantize(absmax, R.dynamic_map().cuda())
    q_ref, absmax2_ref = _double_quant_given_offset(absmax, offset)
    assert torch.equal(absmax2.cpu(), absmax2_ref) and torch.equal(qabsmax.cpu(), q_ref)

    code = R.dynamic_map().cuda()
    out = lora_ops.nf4_dequantize(packed, qabsmax, bs, (n,), torch.bfloat16, absmax2, code, offset)
    del w
    for a, b in windows:
        expect = lora_ops.nf4_dequantize(
            packed[a // 2 : (b + 1) // 2].cpu(), qabsmax[a // bs : -(-b // bs)].cpu(), bs, (b - a,), torch.bfloat16,
            absmax2[a // group : -(-b // group)].cpu(), code.cpu(), offset.cpu())
        assert torch.equal(out[a:b].cpu().view(torch.int16), expect.view(torch.int16)), (a, b)
