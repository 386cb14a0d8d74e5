"""The NF4 base of NF4Linear / QLoRALinear is one frozen parameter ``weight`` (an NF4Tensor): what
``model.parameters()`` sees, what the ops take, what FSDP2 shards with ``fully_shard`` alone; the state
dict keeps the layer's keys and the bitsandbytes bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randn

from lora_ops import NF4Linear, QLoRALinear, quantize_model, quantize_nf4
from lora_ops.nf4_tensor import NF4Tensor


def _bias_free_model(rng):
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(48, 32, bias=False))
    with torch.no_grad():
        for m in model:
            m.weight.copy_(randn(*m.weight.shape, generator=rng))
    return model


def test_parameters_include_each_frozen_base(rng):
    model = quantize_model(_bias_free_model(rng), target_modules="all-linear")
    params = dict(model.named_parameters())
    assert sorted(params) == ["0.weight", "1.weight"]  # a bias-free NF4 model is not parameter-less
    for name, p in params.items():
        assert isinstance(p, torch.nn.Parameter) and isinstance(p, NF4Tensor) and not p.requires_grad, name
        assert p.shape == model.get_submodule(name[0]).weight.shape and p.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 64 * 48 + 48 * 32  # dense element counts


def test_state_dict_keys_and_bytes_are_the_quantizers(rng):
    w = randn(40, 64, generator=rng, dtype=torch.bfloat16)
    ref = quantize_nf4(w, 64, True)
    layer = NF4Linear(ref)
    sd = layer.state_dict()
    assert sorted(sd) == sorted(f"weight_{k}" for k in ("packed", "absmax", "absmax2", "nested_code", "offset"))
    for k, v in ref.tensors().items():
        assert sd[f"weight_{k}"].dtype == v.dtype and torch.equal(sd[f"weight_{k}"], v), k
    assert sd["weight_packed"].shape == ref.packed.shape  # [n/2, 1], as bitsandbytes stores the codes
    hf = layer.hf_base_state_dict("p.")
    assert sorted(hf) == sorted(ref.hf_state_dict("p.weight"))
    # The op arguments are the very tensors of the state dict: no copy between storage and kernels.
    w_args, meta = layer._weight_op_args()
    assert meta == [64, 40, 64] and w_args[0].data_ptr() == sd["weight_packed"].data_ptr()


def test_weight_answers_the_nf4weight_interface(rng):
    ref = quantize_nf4(randn(24, 64, generator=rng), 64, False)
    layer = NF4Linear(ref)
    w = layer.weight
    assert not w.nested and w.blocksize == 64 and w.absmax2 is None
    assert torch.equal(w.dequantize(), ref.dequantize())
    assert {k: v is None for k, v in w.tensors().items()} == {k: v is None for k, v in ref.tensors().items()}
    assert w.op_args()[1] == ref.op_args()[1]


def test_forward_load_deepcopy_and_to_empty(rng):
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(randn(32, 64, generator=rng))
    a = QLoRALinear.from_linear(lin, 4, 8)
    with torch.no_grad():
        a.lora_B.weight.copy_(randn(32, 4, generator=rng, scale=0.1))
    b = QLoRALinear(64, 32, 4, 8, bias=True, base_dtype=torch.float32)
    b.load_state_dict(a.state_dict())
    x = randn(3, 64, generator=rng)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    c = copy.deepcopy(b)
    assert c.weight.packed.data_ptr() != b.weight.packed.data_ptr()
    torch.testing.assert_close(c(x), a(x), rtol=0, atol=0)
    with torch.device("meta"):
        m = QLoRALinear(64, 32, 4, 8, base_dtype=torch.float32)
    m = m.to_empty(device="cpu")
    m.load_state_dict(a.state_dict(), strict=False)  # the bias is a buffer only in a
    assert torch.equal(m.weight_packed, a.weight_packed) and isinstance(m.weight, NF4Tensor)


def test_half_keeps_the_storage_dtypes(rng):
    layer = NF4Linear(quantize_nf4(randn(32, 64, generator=rng), 64, True))
    before = {k: v.dtype for k, v in layer.weight.tensors().items()}
    layer.half()
    assert {k: v.dtype for k, v in layer.weight.tensors().items()} == before
    assert layer.weight.dtype == torch.float32  # the dequantization dtype is data, not a cast target


def test_unloaded_layer_refuses_forward_by_name():
    layer = NF4Linear.unloaded(64, 32, bias=False, dtype=torch.bfloat16)
    assert not layer.base_loaded and "weight" in layer.state_dict()
    with pytest.raises(RuntimeError, match="not loaded yet"):
        layer(torch.randn(2, 64))


def test_fully_shard_alone_on_one_rank(rng, tmp_path):
    """FSDP2's fully_shard takes the model as it is (no conversion call): forward and the state dict are
    the unsharded model's. (Two ranks: tests/test_distributed_2ranks.py.)"""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = quantize_model(_bias_free_model(rng), target_modules="all-linear")
        ref = copy.deepcopy(model)
        for m in model:
            fully_shard(m)
        fully_shard(model)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        x = randn(4, 64, generator=rng)
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        sd = model.state_dict()
        for k, v in ref.state_dict().items():
            got = sd[k].full_tensor() if hasattr(sd[k], "full_tensor") else sd[k]
            assert torch.equal(got, v), k
    finally:
        dist.destroy_process_group()
