"""QLoRALinear / NF4Weight state that must survive saving and loading (issue 15): a merged module's
state_dict reloads merged (never LoRA twice), and an NF4Weight loads with torch.load(weights_only=True)."""

import io

import torch

import lora_ops
from lora_ops import QLoRALinear


def _trained_layer(rng):
    layer = QLoRALinear(64, 32, 4, 8.0, base_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(32, 4, generator=rng))
    return layer


def test_merged_state_dict_reloads_merged(rng):
    layer = _trained_layer(rng)
    x = torch.randn(5, 64, generator=rng)
    y_unmerged = layer(x)
    layer.merge_to_nf4(inplace=True)
    y_merged = layer(x)
    assert (y_merged - y_unmerged).abs().max() < 0.5 * y_unmerged.abs().max()  # same layer, re-rounded
    fresh = QLoRALinear(64, 32, 4, 8.0, base_dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged
    assert torch.equal(fresh(x), y_merged)  # the LoRA term is not applied a second time


def test_unmerged_state_dict_keys_are_unchanged_and_reload_unmerged(rng):
    layer = _trained_layer(rng)
    sd = layer.state_dict()
    assert "lora_merged" not in sd
    merged = _trained_layer(rng)
    merged.merge_to_nf4(inplace=True)
    merged.load_state_dict(sd)  # the dict's (unmerged) state wins
    assert not merged.merged
    x = torch.randn(3, 64, generator=rng)
    assert torch.equal(merged(x), layer(x))


def test_adapter_only_load_keeps_the_merged_state(rng):
    layer = _trained_layer(rng)
    layer.merge_to_nf4(inplace=True)
    layer.load_state_dict(layer.adapter_state_dict(), strict=False)  # no base in it
    assert layer.merged


def test_nf4weight_loads_with_weights_only(rng):
    w = lora_ops.quantize_nf4(torch.randn(32, 64, generator=rng), 64, double_quant=True)
    buf = io.BytesIO()
    torch.save({"w": w}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["w"]
    assert isinstance(loaded, lora_ops.NF4Weight)
    assert loaded.shape == w.shape and loaded.dtype == w.dtype and loaded.blocksize == w.blocksize
    assert torch.equal(loaded.dequantize(torch.float32), w.dequantize(torch.float32))
