"""Rejected inputs: each a clear Python exception, never a crash or garbage."""

import pytest
import torch

import lora_ops
from lora_ops import reference as R


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_float_input(device, dtype):
    w = torch.ones(64, dtype=dtype, device=device)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        lora_ops.nf4_quantize(w, 64)


def test_float64_input_rejected(device):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        lora_ops.nf4_quantize(torch.randn(64, dtype=torch.float64, device=device), 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input(device, bad):
    w = torch.randn(1000, device=device)
    w[777] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        lora_ops.nf4_quantize(w, 64)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 65, 8192, -64])
def test_bad_blocksize(device, blocksize):
    with pytest.raises(RuntimeError, match="blocksize"):
        lora_ops.nf4_quantize(torch.randn(128, device=device), blocksize)


def test_empty_tensor(device):
    with pytest.raises(RuntimeError, match="empty"):
        lora_ops.nf4_quantize(torch.empty(0, 64, device=device), 64)


def test_zero_dim_weight_refused(device):
    # a 0-d weight has no [blocksize, *shape] meta the ops accept: refused up front, not at dequantize
    with pytest.raises(ValueError, match="at least one dimension.*0-d"):
        lora_ops.quantize_nf4(torch.randn((), device=device), 64)
    q = lora_ops.quantize_nf4(torch.randn(64, device=device).reshape(1, 64), 64)
    with pytest.raises(ValueError, match="at least one dimension"):
        torch.ops.lora_ops.nf4_dequantize(q.op_args()[0], [64], torch.float32)


def _state(device):
    q = lora_ops.quantize_nf4(torch.randn(64, 100, device=device), 64, double_quant=True)
    return q


def test_mismatched_state_sizes(device):
    q = _state(device)
    with pytest.raises(RuntimeError, match="packed weight has"):
        lora_ops.nf4_dequantize(q.packed[:-1], q.absmax, 64, q.shape, torch.bfloat16, q.absmax2, q.nested_code,
                                q.offset)
    with pytest.raises(RuntimeError, match="absmax has"):
        lora_ops.nf4_dequantize(q.packed, q.absmax[:-1], 64, q.shape, torch.bfloat16, q.absmax2, q.nested_code,
                                q.offset)
    with pytest.raises(RuntimeError, match="absmax has"):  # blocksize that does not fit the state
        lora_ops.nf4_dequantize(q.packed, q.absmax, 128, q.shape, torch.bfloat16, q.absmax2, q.nested_code,
                                q.offset)
    with pytest.raises(RuntimeError, match="nested_code has"):
        lora_ops.nf4_dequantize(q.packed, q.absmax, 64, q.shape, torch.bfloat16, q.absmax2, q.nested_code[:16],
                                q.offset)


def test_missing_nested_state(device):
    q = _state(device)
    with pytest.raises(RuntimeError, match="required"):
        lora_ops.nf4_dequantize(q.packed, q.absmax, 64, q.shape, torch.bfloat16)
    with pytest.raises(ValueError, match="needs absmax2"):
        lora_ops.NF4Weight(q.packed, q.absmax, 64, q.shape, torch.bfloat16)


def test_wrong_state_dtypes(device):
    q = _state(device)
    with pytest.raises(TypeError, match="absmax must be float32"):
        lora_ops.nf4_dequantize(q.packed, q.absmax.to(torch.int32), 64, q.shape, torch.bfloat16)
    with pytest.raises(TypeError, match="packed weight must be uint8"):
        lora_ops.nf4_dequantize(q.packed.to(torch.int16), q.absmax, 64, q.shape, torch.bfloat16, q.absmax2,
                                q.nested_code, q.offset)
    with pytest.raises(TypeError, match="dtype must be float32"):
        lora_ops.nf4_dequantize(q.packed, q.absmax, 64, q.shape, torch.int8, q.absmax2, q.nested_code, q.offset)


def test_wrong_device_state():
    q = _state("cpu")
    with pytest.raises(RuntimeError, match="device"):
        lora_ops.nf4_dequantize(q.packed, q.absmax.to("meta"), 64, q.shape, torch.bfloat16, q.absmax2,
                                q.nested_code, q.offset)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device"):
            lora_ops.nf4_dequantize(q.packed, q.absmax.cuda(), 64, q.shape, torch.bfloat16, q.absmax2,
                                    q.nested_code, q.offset)


def test_non_contiguous_state_rejected(device):
    q = lora_ops.quantize_nf4(torch.randn(64, 128, device=device), 64, double_quant=False)
    strided = torch.stack([q.absmax, q.absmax], 1)[:, 0]
    with pytest.raises(RuntimeError, match="contiguous"):
        lora_ops.nf4_dequantize(q.packed, strided, 64, q.shape, torch.bfloat16)


def test_reference_rejects_nan():
    with pytest.raises(ValueError):
        R.nf4_quantize(torch.tensor([1.0, float("nan")]))
