"""NF4Tensor without a process group: the row chunks FSDP2 cuts (torch.chunk along dim 0) are the
bitsandbytes bytes of those rows, and shapes that would split a 4-bit block are refused by name."""

import pytest
import torch
from conftest import randn

from lora_ops import quantize_nf4
from lora_ops.distributed import NF4Tensor, check_shardable, make_nf4_shardable, shard_error
from lora_ops.nn import QLoRALinear


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize,world", [((64, 96), 64, 2), ((128, 256), 128, 4), ((6, 64), 64, 3)])
def test_row_chunks_are_the_weights_bytes(rng, shape, blocksize, world, double_quant):
    w = quantize_nf4(randn(*shape, generator=rng), blocksize, double_quant)
    t = NF4Tensor.from_nf4(w)
    chunks = torch.chunk(t, world, dim=0)
    assert len(chunks) == world and all(isinstance(c, NF4Tensor) for c in chunks)
    assert torch.equal(torch.cat([c.packed for c in chunks]), w.packed.reshape(-1))
    assert torch.equal(torch.cat([c.absmax for c in chunks]), w.absmax)
    assert [c.row_start for c in chunks] == [i * shape[0] // world for i in range(world)]
    for c in chunks:
        assert c.shape == (shape[0] // world, shape[1]) and not c.is_full
        assert c.storage_nbytes()["sharded"] * world == t.storage_nbytes()["sharded"]
        with pytest.raises(RuntimeError, match="shard"):
            c.nf4_weight()
    # FSDP2's shard buffer: new_zeros + narrow + copy_ must carry the rows and the nested state.
    buf = t.new_zeros(chunks[1].shape)
    buf.narrow(0, 0, chunks[1].shape[0]).copy_(chunks[1])
    assert buf.row_start == chunks[1].row_start and torch.equal(buf.packed, chunks[1].packed)
    assert t.nf4_weight().dequantize(torch.float32).equal(w.dequantize(torch.float32))


@pytest.mark.parametrize("shape,world,why", [((63, 64), 2, "do not split evenly"),
                                             ((2, 48), 2, "not a multiple of the blocksize"),
                                             ((4, 4, 4), 2, "2-D")])
def test_unshardable_shapes_are_refused_by_name(shape, world, why):
    assert why in shard_error(shape, 64, world)
    if len(shape) == 2 and shape[0] * shape[1] % 64 == 0:
        t = NF4Tensor.from_nf4(quantize_nf4(torch.randn(*shape) + 0.5))
        with pytest.raises(ValueError, match="cannot split|split a 4-bit block"):
            torch.chunk(t, world, dim=0)


def test_check_shardable_names_the_layer():
    model = torch.nn.Sequential(QLoRALinear(64, 64, 4, 8), QLoRALinear(48, 2, 4, 8))
    make_nf4_shardable(model)
    check_shardable(model, 1)
    with pytest.raises(ValueError, match=r"^1: the NF4 base cannot be sharded over 2 ranks"):
        check_shardable(model, 2)


def test_other_ops_are_refused():
    t = NF4Tensor.from_nf4(quantize_nf4(torch.randn(8, 64)))
    with pytest.raises(NotImplementedError, match="dequantize"):
        t + 1


def test_shardable_layer_keeps_forward_and_state_dict(rng):
    lin = torch.nn.Linear(64, 32, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(randn(32, 64, generator=rng))
    plain = QLoRALinear.from_linear(lin, 4, 8)
    with torch.no_grad():
        plain.lora_B.weight.copy_(randn(32, 4, generator=rng, scale=0.1))
    model = torch.nn.Sequential(QLoRALinear.from_linear(lin, 4, 8))
    model[0].load_state_dict(plain.state_dict())
    make_nf4_shardable(model)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.lora_A.weight", "0.lora_B.weight"]
    assert isinstance(model[0].weight, NF4Tensor) and not model[0].weight.requires_grad
    x = randn(5, 64, generator=rng)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    sd = model[0].state_dict()
    want = plain.state_dict()
    assert sorted(sd) == sorted(want)
    for k in want:
        assert torch.equal(sd[k], want[k]), k
    # Loading another layer's dict replaces the base bytes (adapter and base).
    other = QLoRALinear.from_linear(torch.nn.Linear(64, 32), 4, 8)
    model[0].load_state_dict(other.state_dict())
    for k, v in other.weight.tensors().items():
        if v is not None:
            assert torch.equal(model[0].weight.tensors()[k], v), k
