"""lora_ops.quantize_model and NF4Linear: a dense model's linears become frozen NF4 layers (spec
quantization of the original weights), the model computes what the float64 model of the decoded
weights computes, gradients flow through frozen layers, target_modules follows PEFT's rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_ops
from lora_ops import reference
from lora_ops.nn import NF4Linear

pytest.importorskip("transformers", reason="CI installs transformers; these tests build a tiny Llama")
from hf_tiny import float64_twin, reference_weight, tiny_llama_config  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(autouse=True)
def _fresh_torch_seed(rng):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))


def _tiny(dtype=torch.float32, **overrides):
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _nf4_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_all_linears_but_the_head_become_frozen_nf4_with_spec_codes():
    model = _tiny()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert lora_ops.quantize_model(model, double_quant=False) is model
    paths = _nf4_paths(model)
    assert len(paths) == LINEARS_PER_LAYER * model.config.num_hidden_layers
    assert type(model.lm_head) is nn.Linear  # the output head stays dense
    assert not any(p.requires_grad for p in model.parameters())  # embeddings, norms, head frozen too
    for path in paths:
        layer = model.get_submodule(path)
        codes, absmax = reference.nf4_quantize(dense[path], 64)  # the spec's quantization of the original
        assert torch.equal(layer.weight_packed.reshape(-1), codes.reshape(-1)), path
        torch.testing.assert_close(layer.weight_absmax, absmax, rtol=0, atol=0)
        assert layer.weight.dtype == torch.float32 and layer.blocksize == 64


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_model_matches_the_float64_model_of_its_decoded_weights(double_quant):
    model = _tiny()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    lora_ops.quantize_model(model, double_quant=double_quant)
    twin = float64_twin(model)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        ref = twin(input_ids=ids).logits
    assert _rel_err(ours, ref) <= 1e-4
    assert _rel_err(ours, dense_logits) > 1e-3  # quantization is really in effect


def test_target_modules_follows_peft_rules():
    n_layers = 2
    model = _tiny()
    lora_ops.quantize_model(model, target_modules=["q_proj", "v_proj"])
    assert sorted(p.rpartition(".")[2] for p in _nf4_paths(model)) == ["q_proj"] * n_layers + ["v_proj"] * n_layers
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear) and not isinstance(
        model.model.layers[0].mlp.up_proj, NF4Linear)
    model = _tiny()
    lora_ops.quantize_model(model, target_modules=r".*layers\.1\.mlp\..*")  # a regex: the full name
    assert _nf4_paths(model) == [f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    model = _tiny()
    lora_ops.quantize_model(model, target_modules="all-linear")
    assert len(_nf4_paths(model)) == LINEARS_PER_LAYER * n_layers and type(model.lm_head) is nn.Linear
    with pytest.raises(ValueError, match=r"target_modules=\['qproj'\] matches no nn.Linear.*'q_proj'"):
        lora_ops.quantize_model(_tiny(), target_modules=["qproj"])
    lora_ops.quantize_model(model, target_modules=["lm_head"])  # the head only when named
    assert isinstance(model.lm_head, NF4Linear)


def test_bf16_model_keeps_its_dtype_and_compute_dtype_is_honoured():
    model = _tiny(torch.bfloat16)
    lora_ops.quantize_model(model, compute_dtype=torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.compute_dtype == torch.float32
    x = torch.randn(3, 5, layer.in_features).to(torch.bfloat16)
    w = reference_weight(layer)
    y = layer(x)
    assert y.dtype == torch.bfloat16  # back in x's dtype
    ref = x.double() @ w.T
    # computed in fp32 (x exact in fp32, W's bf16 values exact): only the final bf16 rounding
    assert (y.double() - ref).abs().max() <= 2**-8 * ref.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the compute dtype
        y_auto = layer(x.float())
    assert y_auto.dtype == torch.float32
    assert (y_auto.double() - ref).abs().max() <= 2**-6 * ref.abs().max()


def test_gradients_flow_through_frozen_nf4_layers_and_a_trainable_bias_learns():
    lin = nn.Linear(128, 40)
    layer = NF4Linear.from_linear(lin)
    assert [n for n, p in layer.named_parameters()] == ["weight", "bias"] and not layer.bias.requires_grad
    assert not layer.weight.requires_grad
    x = torch.randn(4, 3, 128, requires_grad=True)
    dy = torch.randn(4, 3, 40)
    (layer(x) * dy).sum().backward()
    w = reference_weight(layer)
    assert _rel_err(x.grad, dy.double() @ w) <= 1e-5
    layer.bias.requires_grad_(True)  # e.g. PEFT's bias="all"
    x.grad = None
    y = layer(x)
    (y * dy).sum().backward()
    assert _rel_err(y.detach(), x.detach().double() @ w.T + lin.bias.detach().double()) <= 1e-5
    torch.testing.assert_close(layer.bias.grad, dy.sum((0, 1)))
    assert _rel_err(x.grad, dy.double() @ w) <= 1e-5


def test_shared_linears_are_quantized_once_and_state_dict_round_trips():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    lora_ops.quantize_model(model, progress=False)
    assert model[0] is model[2] and isinstance(model[0], NF4Linear)
    fresh = lora_ops.quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), progress=False)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(5, 64)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    moved = model.to(torch.bfloat16)  # .to(dtype) leaves the quantization state's float32 alone
    assert moved[0].weight_offset.dtype == torch.float32 and moved[0].weight_absmax.dtype == torch.uint8


def test_progress_bar_and_torch_compile(capsys):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    lora_ops.quantize_model(model, progress=True)
    assert "quantizing to NF4" in capsys.readouterr().err
    x = torch.randn(6, 64, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    g = x.grad.clone()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lora_ops.quantize_model("model")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="'0' is on the meta device"):
        lora_ops.quantize_model(meta)
    double = nn.Sequential(nn.Linear(64, 64).double())
    with pytest.raises(TypeError, match="'0' has a torch.float64 weight"):
        lora_ops.quantize_model(double)
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    with pytest.raises(ValueError, match="NF4Linear: x must have at least one dimension .*0-d"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="NF4Linear: x must be float32.*torch.int64"):
        layer(torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="x has 63 features"):
        layer(torch.randn(2, 63))
    with pytest.raises(TypeError, match="weight must be an NF4Weight"):
        NF4Linear(torch.randn(8, 64))


def test_a_peft_model_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has PEFT layers"):
        lora_ops.quantize_model(model)


# ---- the loader: a 4-bit checkpoint into the same layers ---------------------------------------------
def _save_nf4_checkpoint(model, path):
    """A 4-bit checkpoint directory written by lora_ops alone (bitsandbytes' layout, spec section 6)."""
    from lora_ops.integrations.hf_checkpoint import nf4_model_state_dict, save_nf4_checkpoint, split_nf4_state_dict

    path.mkdir()
    model.config.save_pretrained(path)
    save_nf4_checkpoint(path / "model.safetensors", *split_nf4_state_dict(nf4_model_state_dict(model)))
    return path


def test_loader_reads_a_4bit_checkpoint_into_frozen_nf4_layers(tmp_path):
    import warnings

    from lora_ops.integrations.hf_checkpoint import load_quantized_model
    from lora_ops.nn import QLoRALinear

    model = lora_ops.quantize_model(_tiny(), progress=False)
    path = _save_nf4_checkpoint(model, tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no "torch_dtype is deprecated" from our own call
        loaded = load_quantized_model(path)
    assert _nf4_paths(loaded) == _nf4_paths(model)
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    # with adapters on the chosen layers only; only the adapters train
    with_lora = load_quantized_model(path, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert sorted(n.rpartition(".")[2] for n, m in with_lora.named_modules() if isinstance(m, QLoRALinear)) == [
        "q_proj", "q_proj", "v_proj", "v_proj"]
    assert len(_nf4_paths(with_lora)) == 10
    trainable = [n for n, p in with_lora.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with pytest.raises(ValueError, match="matches none of the quantized layers"):
        load_quantized_model(path, target_modules=["qproj"], r=4, lora_alpha=8)
    dense = tmp_path / "dense"
    _tiny().save_pretrained(dense)
    with pytest.raises(ValueError, match="no NF4 .*lora_ops.quantize_model"):
        load_quantized_model(dense)


def test_loaded_checkpoint_takes_peft_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    from lora_ops.integrations.hf_checkpoint import load_quantized_model
    from lora_ops.integrations.peft_native import LoraOpsLinear

    path = _save_nf4_checkpoint(lora_ops.quantize_model(_tiny(), progress=False), tmp_path / "ckpt")
    pm = peft.get_peft_model(load_quantized_model(path), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    assert sum(isinstance(m, LoraOpsLinear) for m in pm.modules()) == 4
