"""QLoRALinear: construction (nn.Linear, bitsandbytes, PEFT), PEFT-like init, frozen base, state_dict,
merging, dropout modes and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from qlora_utils import DEVICES, dense_weight
from torch import nn

from lora_ops import QLoRALinear, reference
from lora_ops.nf4 import quantize_nf4
from lora_ops.ops.qlora import qlora_matmul

bf16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _fresh_torch_seed(rng):
    """Seeds torch's global generator from the per-test fresh seed (conftest prints it on failure)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))


def _linear(k=96, n=40, dtype=bf16, device="cpu", bias=True):
    return nn.Linear(k, n, bias=bias).to(dtype).to(device)


def _randomize_adapter(layer):
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape))


@pytest.mark.parametrize("device", DEVICES)
def test_from_linear_starts_as_the_base_layer_with_peft_init(device):
    lin = _linear(device=device)
    layer = QLoRALinear.from_linear(lin, r=8, alpha=16, dropout=0.1)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (8, 96) and B.shape == (40, 8) and A.dtype == torch.float32
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(96)  # kaiming_uniform(a=sqrt(5)) on fan_in = in_features
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound and A.std() > 0.3 * bound
    x = torch.randn(5, 96).to(bf16).to(device)
    layer.eval()
    torch.testing.assert_close(
        layer(x), qlora_matmul(x, layer.weight, bias=lin.bias.detach()), rtol=0, atol=0
    )
    # and the base is the NF4 quantization of the linear weight
    w = dense_weight(quantize_nf4(lin.weight.detach(), 64, True), bf16)
    ref = x.double().cpu() @ w.double().t() + lin.bias.detach().double().cpu()
    assert (layer(x).double().cpu() - ref).abs().max() <= 2**-7 * ref.abs().max()
    assert layer.scaling == 2.0
    assert QLoRALinear.from_linear(lin, r=16, alpha=16, use_rslora=True).scaling == pytest.approx(4.0)


@pytest.mark.parametrize("device", DEVICES)
def test_only_adapters_train_and_the_base_is_unchanged(device):
    layer = QLoRALinear.from_linear(_linear(device=device), r=4, alpha=8, dropout=0.2)
    _randomize_adapter(layer)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "lora_A.weight", "lora_B.weight"]
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    before = {k: v.clone() for k, v in layer.state_dict().items() if not k.startswith("lora_")}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(3, 7, 96).to(bf16).to(device).requires_grad_()
    a0 = layer.lora_A.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        layer(x).float().square().mean().backward()
        opt.step()
    assert x.grad is not None and x.grad.shape == x.shape
    assert not torch.equal(a0, layer.lora_A.weight)
    for k, v in before.items():
        t = layer.state_dict()[k]
        assert torch.equal(t, v), f"base buffer {k} changed"
        assert not t.requires_grad and t.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_only_in_training_mode(device):
    layer = QLoRALinear.from_linear(_linear(device=device), r=4, alpha=8, dropout=0.5)
    _randomize_adapter(layer)
    x = torch.randn(6, 96).to(bf16).to(device)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(0)
    y2 = layer(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, y_eval)  # seeded by torch's generator


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_and_peft_key_names(device):
    layer = QLoRALinear.from_linear(_linear(device=device), r=4, alpha=8)
    _randomize_adapter(layer)
    sd = layer.state_dict()
    assert {"lora_A.weight", "lora_B.weight", "bias", "weight_packed", "weight_absmax"} <= set(sd)
    assert set(layer.adapter_state_dict()) == {"lora_A.weight", "lora_B.weight"}
    fresh = QLoRALinear(96, 40, r=4, alpha=8, bias=True, device=device)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 96).to(bf16).to(device)
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))
    hf = layer.hf_base_state_dict("model.q_proj.")
    assert "model.q_proj.weight.quant_state.bitsandbytes__nf4" in hf and "model.q_proj.bias" in hf


def test_to_moves_buffers_and_adapters():
    layer = QLoRALinear.from_linear(_linear(), r=4, alpha=8)
    moved = QLoRALinear.from_linear(_linear(), r=4, alpha=8).to("meta")
    assert all(t.device.type == "meta" for t in moved.state_dict().values())
    # a dtype cast reaches the adapters and bias but never the quantization state
    state = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("weight_")}
    layer.to(torch.float16)
    assert layer.lora_A.weight.dtype == torch.float16 and layer.bias.dtype == torch.float16
    for k, v in state.items():
        assert torch.equal(layer.state_dict()[k], v) and layer.state_dict()[k].dtype == v.dtype
    y = layer(torch.randn(3, 96, dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_placeholder_base_is_exact_zero():
    layer = QLoRALinear(33, 7, r=2, alpha=2, blocksize=32)
    assert torch.count_nonzero(layer.merge()) == 0
    assert torch.count_nonzero(layer.weight.dequantize(torch.float32)) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_merge_merge_to_nf4_and_unmerge(device):
    layer = QLoRALinear.from_linear(_linear(device=device), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.01)
    delta = layer.scaling * layer.lora_B.weight.detach().float() @ layer.lora_A.weight.detach().float()
    merged = layer.merge()
    torch.testing.assert_close(merged, layer.weight.dequantize(torch.float32) + delta)
    new, report = layer.merge_to_nf4()
    err = new.dequantize(torch.float32) - merged
    assert report["max_abs_error"] == pytest.approx(err.abs().max().item())
    assert 0 < report["rel_fro_error"] < 0.2  # NF4's own rounding error, not garbage
    base_bytes = layer.weight_packed.clone()
    x = torch.randn(8, 96).to(bf16).to(device)
    layer.eval()
    y_adapter = layer(x)
    layer.merge_to_nf4(inplace=True)
    assert layer.merged and torch.equal(layer.weight_packed, new.packed)
    y_merged = layer(x)
    rel = (y_merged.float() - y_adapter.float()).norm() / y_adapter.float().norm()
    assert rel < 0.2
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight_packed, base_bytes)
    assert torch.equal(layer(x), y_adapter)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_module_forward_backward(device):
    layer = QLoRALinear.from_linear(_linear(device=device, dtype=torch.float32), r=8, alpha=16, dropout=0.0)
    _randomize_adapter(layer)
    x = torch.randn(2, 5, 96, device=device)

    def run(fn):
        layer.zero_grad()
        xs = x.clone().requires_grad_()
        fn(xs).square().sum().backward()
        return xs.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
    # with dropout in training mode the seed is drawn inside the graph: still one graph
    layer.lora_dropout_p = 0.3
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert torch.isfinite(out).all()


def _bnb_layer(lin):
    bnb = pytest.importorskip("bitsandbytes")
    l4 = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=bf16,
        compress_statistics=True,
        quant_type="nf4",
    )
    l4.load_state_dict(lin.state_dict())
    return l4.to("cpu")  # bitsandbytes quantizes on .to()


def test_from_bnb_is_zero_copy_and_matches_bitsandbytes():
    lin = _linear(k=128)  # K % 64 == 0: bnb (the witness) is right on every CPU (tests/test_nf4_bnb.py)
    l4 = _bnb_layer(lin)
    layer = QLoRALinear.from_bnb(l4, r=4, alpha=8)
    assert layer.weight_packed.data_ptr() == l4.weight.data.data_ptr()
    assert layer.weight_absmax.data_ptr() == l4.weight.quant_state.absmax.data_ptr()
    layer.eval()
    x = torch.randn(6, 128).to(bf16)
    with torch.no_grad():
        y_bnb = l4(x)  # l4 is in training mode: bnb's CPU repack (eval only) does not run
    y = layer(x)  # B = 0: the base layer
    w = dense_weight(layer.weight, bf16)
    ref = x.double() @ w.double().t() + l4.bias.detach().double()
    err, err_bnb = (y.double() - ref).abs().max(), (y_bnb.double() - ref).abs().max()
    assert err <= 2 * err_bnb + 2**-8 * ref.abs().max()


def test_from_peft_matches_peft_forward():
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self, l4):
            super().__init__()
            self.proj = l4

        def forward(self, x):
            return self.proj(x)

    from bnb_required import no_bnb_cpu_repack

    # K = 128 (a multiple of the blocksize) and no CPU repack: the shapes and path on which bnb, the
    # witness here, computes the checkpoint's weight on every CPU (see tests/test_bnb_cpu_layout.py).
    lin = _linear(k=128)
    model = peft.get_peft_model(
        Net(_bnb_layer(lin)), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["proj"])
    )
    no_bnb_cpu_repack(model)
    plora = model.base_model.model.proj
    with torch.no_grad():
        plora.lora_B["default"].weight.normal_()
    layer = QLoRALinear.from_peft(plora)
    assert layer.lora_A.weight is plora.lora_A["default"].weight  # shared Parameters
    model.eval(), layer.eval()
    x = torch.randn(5, 128).to(bf16)
    with torch.no_grad():
        y_peft = model(x)
    y = layer(x)
    w = dense_weight(layer.weight, bf16).double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    ref, _ = reference.qlora_linear(x, w, A, B, layer.scaling, lin.bias.detach())
    err, err_peft = (y.double() - ref).abs().max(), (y_peft.double() - ref).abs().max()
    assert err <= 2 * err_peft + 2**-8 * ref.abs().max()


def test_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="r must be"):
        QLoRALinear(16, 16, r=0, alpha=1)
    with pytest.raises(ValueError, match="dropout"):
        QLoRALinear(16, 16, r=2, alpha=1, dropout=1.0)
