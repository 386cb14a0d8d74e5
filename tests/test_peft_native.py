"""PEFT over lora_ops NF4 layers without bitsandbytes (lora_ops.integrations.peft_native): get_peft_model
on a quantize_model'd tiny Llama makes LoRA layers that run lora_ops' fused op and compute what the
float64 model computes; PEFT's save/load, merge_and_unload, disable_adapter, several adapters and
rsLoRA work; an adapter trained on a bitsandbytes PEFT model loads onto it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lora_ops
from lora_ops.nn import NF4Linear

pytest.importorskip("peft", reason="CI installs peft; these tests need it")
pytest.importorskip("transformers", reason="CI installs transformers; these tests build a tiny Llama")
from hf_tiny import float64_twin, randomize_adapters, reference_weight, save_random_llama  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from lora_ops.integrations.peft_native import LoraOpsLinear  # noqa: E402

VOCAB = 96
N_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(autouse=True)
def _fresh_torch_seed(rng):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("dense") / "llama", seed=int(torch.randint(0, 10_000, ())))


def _quantized(dense_dir, **kw):
    model = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    return lora_ops.quantize_model(model, progress=False, **kw)


def _peft(dense_dir, randomize=True, **lora_kw):
    kw = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    kw.update(lora_kw)
    pm = get_peft_model(_quantized(dense_dir), LoraConfig(**kw))
    if randomize:
        randomize_adapters(pm)
    return pm




def _ids(batch=3, seq=11):
    return torch.randint(0, VOCAB, (batch, seq))


def _rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraOpsLinear)}


def test_get_peft_model_makes_fused_lora_layers_that_match_float64(dense_dir):
    model = _peft(dense_dir)
    layers = _lora_layers(model)
    assert len(layers) == N_LINEARS and all(isinstance(m.get_base_layer(), NF4Linear) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids = _ids()
    model.eval()
    with torch.no_grad():
        twin = float64_twin(model)
        assert _rel_err(model(input_ids=ids).logits, twin(input_ids=ids).logits) <= 1e-4
    # gradients of the adapters: against the float64 twin's gradient w.r.t. its merged weight
    model.train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    names = [e.name for e in prof.events()]
    assert sum(n == "lora_ops::qlora_linear" for n in names) == N_LINEARS
    twin.train()
    twin.zero_grad()
    twin(input_ids=ids, labels=ids).loss.backward()
    for path, layer in _lora_layers(model.get_base_model()).items():
        gW = twin.get_submodule(path).weight.grad  # dL/dW_merged; dL/dB = s·gW·Aᵀ, dL/dA = s·Bᵀ·gW
        A, B, s = (layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double(),
                   layer.scaling["default"])
        assert _rel_err(layer.lora_B["default"].weight.grad, s * gW @ A.T) <= 1e-4, path
        assert _rel_err(layer.lora_A["default"].weight.grad, s * B.T @ gW) <= 1e-4, path


def test_save_pretrained_and_peft_model_from_pretrained(dense_dir, tmp_path):
    from safetensors.torch import load_file

    model = _peft(dense_dir).eval()
    ids = _ids()
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    # PEFT's own adapter format: the same keys a plain PEFT model over the dense model writes
    dense_peft = get_peft_model(LlamaForCausalLM.from_pretrained(dense_dir),
                                LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    dense_peft.save_pretrained(tmp_path / "dense_adapter")
    assert set(saved) == set(load_file(tmp_path / "dense_adapter" / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(_quantized(dense_dir), tmp_path / "adapter").eval()
    assert len(_lora_layers(loaded)) == N_LINEARS
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    # is_trainable=True gives trainable adapters again
    again = PeftModel.from_pretrained(_quantized(dense_dir), tmp_path / "adapter", is_trainable=True)
    assert sum(p.requires_grad for p in again.parameters()) == 2 * N_LINEARS


def test_merge_and_unload_requantizes_and_unmerge_restores_exactly(dense_dir):
    model = _peft(dense_dir).eval()
    ids = _ids()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before = {k: v.clone() for k, v in q.get_base_layer().state_dict().items()}
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        model.merge_adapter()
        assert q.merged
        merged_logits = model(input_ids=ids).logits
        model.unmerge_adapter()
    after = q.get_base_layer().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    # merged = re-quantized dequant(W) + s·B·A: the float64 model of the merged layers' decoded weights
    merged = copy.deepcopy(model).merge_and_unload()
    assert not _lora_layers(merged) and len([m for m in merged.modules() if isinstance(m, NF4Linear)]) == N_LINEARS
    with torch.no_grad():
        out = merged(input_ids=ids).logits
        assert _rel_err(out, float64_twin(merged)(input_ids=ids).logits) <= 1e-4
    torch.testing.assert_close(out, merged_logits, rtol=0, atol=0)
    assert _rel_err(out, ref) > 1e-6  # the re-quantization really happened
    # each merged weight is the NF4 rounding of dequant(W) + s·B·A: a few % (Frobenius), where adding
    # the update twice or not at all would be off by about |s·B·A| (larger than W here)
    for path, layer in _lora_layers(model.get_base_model()).items():
        target = reference_weight(layer.get_base_layer()) + layer.scaling["default"] * (
            layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double())
        err = (reference_weight(merged.get_submodule(path)) - target).norm() / target.norm()
        assert err < 0.15, (path, err.item())


def test_disable_adapter_is_the_quantized_base(dense_dir):
    model = _peft(dense_dir).eval()
    base = _quantized(dense_dir).eval()
    ids = _ids()
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
        torch.testing.assert_close(off, base(input_ids=ids).logits, rtol=0, atol=0)
    assert _rel_err(on, off) > 1e-3


def test_several_adapters_with_rslora_and_dropout(dense_dir):
    model = _peft(dense_dir)
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model)
    model.base_model.set_adapter(["default", "other"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["other"] == pytest.approx(8 / 2)  # alpha / sqrt(r)
    ids = _ids()
    model.eval()
    with torch.no_grad():
        assert _rel_err(model(input_ids=ids).logits, float64_twin(model)(input_ids=ids).logits) <= 1e-4
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert q.lora_A["other"].weight.grad is not None and q.lora_A["default"].weight.grad is not None
    # with dropout: each adapter its own mask; the expectation over masks is the eval output
    model2 = _peft(dense_dir, lora_dropout=0.4, target_modules=["q_proj"])
    model2.add_adapter("b", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.4, target_modules=["q_proj"]))
    randomize_adapters(model2)
    model2.base_model.set_adapter(["default", "b"])
    layer = model2.base_model.model.model.layers[1].self_attn.q_proj
    x = torch.randn(32, layer.in_features)
    with torch.no_grad():
        layer.eval()
        y_eval = layer(x)
        with model2.disable_adapter():
            y_base = layer(x)
        layer.train()
        draws = torch.stack([layer(x) for _ in range(300)])
    assert not torch.equal(draws[0], draws[1])
    lora_eval = y_eval - y_base
    assert ((draws.mean(0) - y_base) - lora_eval).abs().mean() < 0.1 * lora_eval.abs().mean()


def test_mixed_adapter_batches_in_eval(dense_dir):
    model = _peft(dense_dir).eval()
    ids = _ids()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["default", "__base__", "default"]).logits
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert _rel_err(mixed[0], on[0]) <= 1e-5 and _rel_err(mixed[2], on[2]) <= 1e-5
    assert _rel_err(mixed[1], off[1]) <= 1e-5


def test_dropout_follows_torch_seed_and_compiled_equals_eager(dense_dir):
    model = _peft(dense_dir, lora_dropout=0.3, target_modules=["v_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    layer.train()
    x = torch.randn(16, layer.in_features, requires_grad=True)

    def run(fn):
        torch.manual_seed(1234)
        x.grad = None
        layer.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), layer.lora_A["default"].weight.grad.clone()

    eager, again = run(layer), run(layer)
    for a, b in zip(eager, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    compiled = run(torch.compile(layer, backend="inductor"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)  # the same masks (a different mask would be off by O(1))


def test_unsupported_configs_raise_clearly(dense_dir):
    with pytest.raises(ValueError, match="plain LoRA .* and DoRA, not other LoRA variants"):
        _peft(dense_dir, randomize=False, use_bdlora={"target_modules_bd_a": ["q_proj"], "nblocks": 2})
    with pytest.raises(ValueError, match="lora_bias=True is not supported"):
        _peft(dense_dir, randomize=False, lora_bias=True)
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported"):
        _peft(dense_dir, randomize=False, init_lora_weights="pissa")


def test_an_adapter_trained_on_a_bitsandbytes_model_loads_onto_the_lora_ops_model(dense_dir, tmp_path):
    """bitsandbytes is a witness here: the same checkpoint quantized by bnb (NF4 is one format) with a PEFT
    adapter; the adapter file loads onto the lora_ops model, which then gives the bnb PEFT model's logits."""
    pytest.importorskip("bitsandbytes", reason="CI installs bitsandbytes; this test needs it")
    from hf_tiny import load_bnb_4bit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_model = get_peft_model(load_bnb_4bit(dense_dir),
                                   LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_adapters(bnb_model)
    bnb_model.save_pretrained(tmp_path / "bnb_adapter")
    ours = PeftModel.from_pretrained(_quantized(dense_dir), tmp_path / "bnb_adapter").eval()
    assert len(_lora_layers(ours)) == N_LINEARS
    ids = _ids()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        assert _rel_err(logits, float64_twin(ours)(input_ids=ids).logits) <= 1e-4  # the oracle
        assert _rel_err(logits, bnb_model.eval()(input_ids=ids).logits) <= 1e-3  # the witness
    # and the other way round: an adapter trained on the lora_ops model loads onto a bnb 4-bit model
    theirs_dir = tmp_path / "lora_ops_adapter"
    ours_trained = _peft(dense_dir)
    ours_trained.save_pretrained(theirs_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onto_bnb = PeftModel.from_pretrained(load_bnb_4bit(dense_dir), theirs_dir).eval()
    with torch.no_grad():
        logits = ours_trained.eval()(input_ids=ids).logits
        assert _rel_err(onto_bnb(input_ids=ids).logits, logits) <= 1e-3
        assert _rel_err(logits, ours(input_ids=ids).logits) > 1e-3  # a different adapter really arrived


def test_quantize_peft_train_save_load_without_bitsandbytes(dense_dir, tmp_path):
    """The issue's "done when": with bitsandbytes unimportable, quantize, get_peft_model, a training
    step with PagedAdamW, save and reload the adapter; bitsandbytes is never imported."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        sys.modules["bitsandbytes"] = None  # any import of it now raises ImportError
        import torch
        import lora_ops
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import LlamaForCausalLM
        model = lora_ops.quantize_model(LlamaForCausalLM.from_pretrained({str(dense_dir)!r}), progress=False)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        opt = lora_ops.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 96, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.save_pretrained({str(tmp_path / "adapter")!r})
        fresh = lora_ops.quantize_model(LlamaForCausalLM.from_pretrained({str(dense_dir)!r}), progress=False)
        loaded = PeftModel.from_pretrained(fresh, {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
        assert "bitsandbytes" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        print("ok", sum(type(m).__name__ == "LoraOpsLinear" for m in loaded.modules()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok 14")


def _dense_peft_twin(model, dtype):
    """PEFT's own unfused LoRA over a dense ``dtype`` model whose weights are the spec decode of the NF4
    layers rounded to ``dtype`` once (what the fused kernels multiply with): the same-dtype PyTorch
    implementation of the project's error rule, with the same adapters."""
    inner = model.get_base_model()
    dense = LlamaForCausalLM(inner.config).to(dtype).eval()
    sd = {}
    for name, mod in inner.named_modules():
        if isinstance(mod, NF4Linear):
            sd[name.removesuffix(".base_layer") + ".weight"] = reference_weight(mod).to(dtype)
    for name, p in inner.named_parameters():
        if "lora_" not in name and ".base_layer." not in name:
            sd[name] = p.detach()
    dense.load_state_dict(sd, strict=True)
    twin = get_peft_model(dense, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    return twin.eval()


@pytest.mark.parametrize("mode", ["bf16-model", "fp32-model-autocast-bf16"])
def test_bf16_numerics_within_twice_peft_unfused_error(dense_dir, mode):
    """bf16 activations, fp32 adapters: our error against the float64 model is at most 2x that of PEFT's
    own unfused bf16 computation over the same (decoded) weights, plus a bf16 rounding term."""
    if mode == "bf16-model":
        model = get_peft_model(lora_ops.quantize_model(
            LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16), progress=False),
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    else:
        model = get_peft_model(_quantized(dense_dir), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_adapters(model)
    model.eval()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    ids = _ids()
    with torch.no_grad():
        ref = float64_twin(model)(input_ids=ids).logits
        if mode == "bf16-model":
            ours = model(input_ids=ids).logits
            peft_ref = _dense_peft_twin(model, torch.bfloat16)(input_ids=ids).logits
        else:
            twin = _dense_peft_twin(model, torch.float32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ours = model(input_ids=ids).logits
                peft_ref = twin(input_ids=ids).logits
    err = (ours.double() - ref).abs().max().item()
    err_peft = (peft_ref.double() - ref).abs().max().item()
    assert err <= 2 * err_peft + 2**-8 * ref.abs().max().item(), (err, err_peft)


def test_patch_peft_model_on_a_native_model_is_a_no_op(dense_dir):
    """Older instructions said to patch: on a native model there is nothing to patch and nothing fails."""
    pytest.importorskip("bitsandbytes", reason="patch_peft_model needs bitsandbytes")
    from lora_ops.integrations import peft as lo_peft

    report = lo_peft.patch_peft_model(_peft(dense_dir, randomize=False))
    assert report == 0 and report.skipped == {}
