"""PEFT's ``use_dora=True`` over lora_ops NF4 layers (QDoRA, lora_ops.integrations.peft_native): the layers
run lora_ops' fused DoRA op, match the float64 model and PEFT's own DoRA over a dense base, save and load
PEFT's DoRA adapter files (both ways with bitsandbytes + PEFT), merge and unmerge."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lora_ops
from lora_ops.nn import NF4Linear

pytest.importorskip("peft", reason="CI installs peft; these tests need it")
pytest.importorskip("transformers", reason="CI installs transformers; these tests build a tiny Llama")
from hf_tiny import float64_twin, reference_weight, save_random_llama  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from lora_ops.integrations.peft_native import LoraOpsLinear  # noqa: E402

VOCAB = 96
N_LINEARS = 14
DORA_OP = "lora_ops_py::dora_linear"


@pytest.fixture(autouse=True)
def _fresh_torch_seed(rng):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    seed = int(torch.randint(0, 10_000, ()))
    return save_random_llama(tmp_path_factory.mktemp("dense") / "llama", seed=seed)


def _quantized(dense_dir, dtype=torch.float32):
    return lora_ops.quantize_model(LlamaForCausalLM.from_pretrained(dense_dir, dtype=dtype), progress=False)


def _config(**kw):
    base = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, use_dora=True)
    base.update(kw)
    return LoraConfig(**base)


@torch.no_grad()
def _randomize_dora(model):
    """Random non-zero A and B, and magnitudes perturbed around their start (so g = m/‖W + ΔW‖ ≠ 1)."""
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.normal_(0, 0.05 if "lora_B" in name else 0.2)
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.3 * torch.randn_like(p))


def _peft(dense_dir, randomize=True, **kw):
    pm = get_peft_model(_quantized(dense_dir), _config(**kw))
    if randomize:
        _randomize_dora(pm)
    return pm


def _ids(batch=3, seq=11):
    return torch.randint(0, VOCAB, (batch, seq))


def _rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraOpsLinear)}


def _dora_twin(model):
    """The float64 model of an eval-mode DoRA model: each layer's weight m/‖W + ΔW‖ ⊙ (W + ΔW), W the spec
    decode of the NF4 base (float64_twin adds ΔW = s·B·A on top of what ``weights`` gives)."""
    weights = {}
    for name, layer in model.get_base_model().named_modules():
        if isinstance(layer, LoraOpsLinear):
            a = "default"
            w = reference_weight(layer.get_base_layer())
            delta = layer.scaling[a] * (layer.lora_B[a].weight.double() @ layer.lora_A[a].weight.double())
            m = layer.lora_magnitude_vector[a].weight.double()
            g = m / torch.linalg.vector_norm(w + delta, dim=1)
            weights[name] = g[:, None] * (w + delta) - delta
    return float64_twin(model, weights)


def _dense_peft_dora(model, dtype=torch.float32):
    """PEFT's own DoRA over a dense ``dtype`` model whose weights are the spec decode of the NF4 layers,
    with the same adapters: the second witness."""
    inner = model.get_base_model()
    dense = LlamaForCausalLM(inner.config).to(dtype).eval()
    sd = {}
    for name, mod in inner.named_modules():
        if isinstance(mod, NF4Linear):
            sd[name.removesuffix(".base_layer") + ".weight"] = reference_weight(mod).to(dtype)
    for name, p in inner.named_parameters():
        if "lora_" not in name and ".base_layer." not in name:
            sd[name] = p.detach().to(dtype)
    dense.load_state_dict(sd, strict=True)
    twin = get_peft_model(dense, _config())
    adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    missing = twin.load_state_dict(adapters, strict=False)
    assert not [k for k in missing.missing_keys if "lora_" in k]
    return twin


def test_use_dora_runs_the_fused_op_and_matches_float64_and_peft_dense(dense_dir):
    model = _peft(dense_dir)
    layers = _layers(model)
    assert len(layers) == N_LINEARS
    assert all(isinstance(m.get_base_layer(), NF4Linear) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum("lora_magnitude_vector" in n for n in trainable) == N_LINEARS
    ids = _ids()
    model.eval()
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours = model(input_ids=ids).logits
    names = [e.name for e in prof.events()]
    assert sum(n == DORA_OP for n in names) == N_LINEARS
    assert not any("dequantize" in n for n in names)
    with torch.no_grad():
        ref = _dora_twin(model)(input_ids=ids).logits
        peft_dense = _dense_peft_dora(model)(input_ids=ids).logits
    assert _rel_err(ours, ref) <= 1e-4
    err, err_peft = (ours.double() - ref).abs().max().item(), (peft_dense.double() - ref).abs().max().item()
    assert err <= 2 * err_peft + 1e-6 * ref.abs().max().item(), (err, err_peft)  # the suite's rule
    # gradients of A, B and the magnitude against PEFT's dense DoRA (float32, same adapters)
    model.train()
    twin = _dense_peft_dora(model).train()
    model(input_ids=ids, labels=ids).loss.backward()
    twin(input_ids=ids, labels=ids).loss.backward()
    theirs = dict(twin.named_parameters())
    n_checked = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert _rel_err(p.grad, theirs[name].grad) <= 1e-3, name
            n_checked += 1
    assert n_checked == 3 * N_LINEARS


def test_magnitude_starts_at_the_weight_norm(dense_dir):
    model = _peft(dense_dir, randomize=False, init_lora_weights="gaussian")  # B != 0 at init
    for layer in _layers(model).values():
        w = reference_weight(layer.get_base_layer())
        delta = layer.scaling["default"] * (layer.lora_B["default"].weight.double()
                                            @ layer.lora_A["default"].weight.double())
        m = layer.lora_magnitude_vector["default"].weight
        assert m.dtype == layer.lora_A["default"].weight.dtype
        torch.testing.assert_close(m.double(), torch.linalg.vector_norm(w + delta, dim=1), rtol=1e-6, atol=0)


def test_save_load_keys_are_peft_dora_keys(dense_dir, tmp_path):
    from safetensors.torch import load_file

    model = _peft(dense_dir).eval()
    ids = _ids()
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    dense_peft = get_peft_model(LlamaForCausalLM.from_pretrained(dense_dir), _config())
    dense_peft.save_pretrained(tmp_path / "dense_adapter")
    assert set(saved) == set(load_file(tmp_path / "dense_adapter" / "adapter_model.safetensors"))
    assert sum(k.endswith("lora_magnitude_vector") for k in saved) == N_LINEARS
    loaded = PeftModel.from_pretrained(_quantized(dense_dir), tmp_path / "adapter").eval()
    assert len(_layers(loaded)) == N_LINEARS
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_dora_adapter_round_trips_with_bitsandbytes_peft(dense_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="CI installs bitsandbytes; this test needs it")
    from hf_tiny import load_bnb_4bit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_model = get_peft_model(load_bnb_4bit(dense_dir), _config())
    _randomize_dora(bnb_model)
    bnb_model.save_pretrained(tmp_path / "bnb_adapter")
    ours = PeftModel.from_pretrained(_quantized(dense_dir), tmp_path / "bnb_adapter").eval()
    assert len(_layers(ours)) == N_LINEARS
    ids = _ids()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        assert _rel_err(logits, _dora_twin(ours)(input_ids=ids).logits) <= 1e-4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert _rel_err(logits, bnb_model.eval()(input_ids=ids).logits) <= 1e-3
    # the other way: a DoRA adapter of the lora_ops model onto a bnb 4-bit PEFT model
    ours_trained = _peft(dense_dir)
    ours_trained.save_pretrained(tmp_path / "lora_ops_adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onto_bnb = PeftModel.from_pretrained(load_bnb_4bit(dense_dir), tmp_path / "lora_ops_adapter").eval()
        with torch.no_grad():
            mine = ours_trained.eval()(input_ids=ids).logits
            assert _rel_err(onto_bnb(input_ids=ids).logits, mine) <= 1e-3
    assert _rel_err(mine, logits) > 1e-3  # a different adapter really arrived


def test_merge_unmerge_exact_and_merge_and_unload_requantizes(dense_dir):
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
        assert all(torch.equal(before[k], v) for k, v in q.get_base_layer().state_dict().items())
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not _layers(merged) and len([m for m in merged.modules() if isinstance(m, NF4Linear)]) == N_LINEARS
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    torch.testing.assert_close(out, merged_logits, rtol=0, atol=0)
    assert _rel_err(out, ref) > 1e-6  # the re-quantization really happened (the per-layer checks below)
    for path, layer in _layers(model.get_base_model()).items():
        w = reference_weight(layer.get_base_layer())
        delta = layer.scaling["default"] * (layer.lora_B["default"].weight.double()
                                            @ layer.lora_A["default"].weight.double())
        m = layer.lora_magnitude_vector["default"].weight.double()
        g = m / torch.linalg.vector_norm(w + delta, dim=1)
        target = g[:, None] * (w + delta)
        err = (reference_weight(merged.get_submodule(path)) - target).norm() / target.norm()
        assert err < 0.15, (path, err.item())
        # forgetting g would be off by |g - 1| (about 0.3 here)
        assert (reference_weight(merged.get_submodule(path)) - (w + delta)).norm() / target.norm() > 2 * err


def test_dropout_semantics_and_bf16(dense_dir):
    """Training-mode dropout runs the fused op (PEFT's DoRA dropout form), and the expectation over masks
    is the eval output; a bf16 model with fp32 adapters (PEFT's autocast_adapter_dtype) runs too."""
    model = _peft(dense_dir, lora_dropout=0.3, target_modules=["v_proj"])
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    x = torch.randn(32, layer.in_features)
    with torch.no_grad():
        layer.eval()
        y_eval = layer(x)
        layer.train()
        draws = torch.stack([layer(x) for _ in range(300)])
    assert not torch.equal(draws[0], draws[1])
    assert (draws.mean(0) - y_eval).abs().mean() < 0.05 * y_eval.abs().mean()
    bf = get_peft_model(_quantized(dense_dir, torch.bfloat16), _config())
    _randomize_dora(bf)
    v = bf.base_model.model.model.layers[0].self_attn.v_proj
    assert v.lora_magnitude_vector["default"].weight.dtype == torch.float32
    ids = _ids()
    bf(input_ids=ids, labels=ids).loss.backward()
    assert v.lora_magnitude_vector["default"].weight.grad is not None


def test_dora_with_another_active_adapter_raises_clearly(dense_dir):
    model = _peft(dense_dir, target_modules=["q_proj"])
    model.add_adapter("plain", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "plain"])
    with pytest.raises(NotImplementedError, match="activate one adapter at a time"):
        model(input_ids=_ids())


def test_patch_peft_model_runs_dora_over_bitsandbytes(dense_dir):
    """patch_peft_model on PEFT's QDoRA over bitsandbytes: every DoRA layer runs the fused op, with PEFT's
    own (dequantizing) DoRA as the witness for logits and for the gradients of A, B and the magnitude."""
    pytest.importorskip("bitsandbytes", reason="CI installs bitsandbytes; this test needs it")
    from hf_tiny import load_bnb_4bit

    from lora_ops.integrations import peft as lo_peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_bnb_4bit(dense_dir), _config())
    _randomize_dora(model)
    ids = _ids()

    def run():
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.detach(), grads, sum(e.name == DORA_OP for e in prof.events())

    ref_logits, ref_grads, n_ref = run()
    lo_peft._fallback_counts.clear()
    assert lo_peft.patch_peft_model(model) == N_LINEARS
    logits, grads, n_ops = run()
    assert n_ref == 0 and n_ops == N_LINEARS and lo_peft.fallback_reasons() == {}
    assert _rel_err(logits, ref_logits) <= 1e-4
    assert len(grads) == 3 * N_LINEARS
    for n in grads:
        assert _rel_err(grads[n], ref_grads[n]) <= 1e-3, n
