"""torch.library.opcheck on every NF4 op, and torch.compile over quantize -> dequantize."""

import pytest
import torch
from conftest import randn

import lora_ops
from lora_ops import reference as R

ops = torch.ops.lora_ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_quantize(device, rng, dtype):
    w = randn(17, 130, generator=rng, dtype=dtype, device=device)
    torch.library.opcheck(ops.nf4_quantize.default, (w, 64))


def test_opcheck_double_quantize(device, rng):
    absmax = (torch.rand(700, generator=rng) + 0.1).to(device)
    torch.library.opcheck(ops.nf4_double_quantize.default, (absmax, R.dynamic_map().to(device)))


@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck_dequantize(device, rng, double_quant):
    q = lora_ops.quantize_nf4(randn(33, 70, generator=rng, device=device), 64, double_quant)
    args = (*q.op_args(), torch.float16)
    torch.library.opcheck(ops.nf4_dequantize.default, args)


@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck_dequantize_into(device, rng, double_quant):
    q = lora_ops.quantize_nf4(randn(33, 70, generator=rng, device=device), 64, double_quant)
    out = torch.full((33, 70), float("nan"), dtype=torch.bfloat16, device=device)
    torch.library.opcheck(ops.nf4_dequantize_into.default, (*q.op_args(), out))


def test_compile_fullgraph_dequantize_into(device, rng):
    q = lora_ops.quantize_nf4(randn(40, 64, generator=rng, device=device), 64, True)

    def into(out):
        q.dequantize(out=out)
        return out * 2

    torch._dynamo.reset()
    compiled = torch.compile(into, fullgraph=True)
    got = compiled(torch.full((40, 64), float("nan"), device=device))
    assert torch.equal(got, 2 * q.dequantize(torch.float32))


def test_compile_fullgraph_quantize_dequantize(device, rng):
    def roundtrip(w, code):
        packed, absmax = ops.nf4_quantize(w, 64)
        q, absmax2, offset = ops.nf4_double_quantize(absmax, code)
        return ops.nf4_dequantize([packed, q, absmax2, code, offset], [64, *w.shape], torch.bfloat16)

    torch._dynamo.reset()
    compiled = torch.compile(roundtrip, fullgraph=True)
    w = randn(64, 96, generator=rng, device=device)
    code = R.dynamic_map().to(device)
    assert torch.equal(compiled(w, code), roundtrip(w, code))
