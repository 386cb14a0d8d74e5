"""The adapter pool with hot swap (lora_ops.serving) and PEFT's mixed batches through the fused per-row op
(lora_ops.integrations.peft_mixed_batch), on a tiny quantized Llama with PEFT adapters saved to disk."""

from __future__ import annotations

import pytest
import torch

import lora_ops

pytest.importorskip("peft", reason="CI installs peft; these tests need it")
pytest.importorskip("transformers", reason="CI installs transformers; these tests build a tiny Llama")
from hf_tiny import randomize_adapters, save_random_llama  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from lora_ops.serving import AdapterServer, read_peft_adapter  # noqa: E402

VOCAB = 96
N_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)
ADAPTERS = {  # differing target modules, ranks and alphas (and rsLoRA)
    "a": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "b": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "c": dict(r=16, lora_alpha=4, target_modules=["v_proj", "o_proj", "up_proj"]),
    "d": dict(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"q_proj": 2},
              alpha_pattern={"down_proj": 24}),  # per-module rank and alpha
}


@pytest.fixture(autouse=True)
def _fresh_torch_seed(rng):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A dense tiny Llama and three PEFT adapters trained (randomized) on its lora_ops-quantized base."""
    root = tmp_path_factory.mktemp("serving")
    dense = save_random_llama(root / "llama", seed=int(torch.randint(0, 10_000, ())))
    out = {"dense": dense}
    for name, kw in ADAPTERS.items():
        pm = get_peft_model(_quantized(dense), LoraConfig(lora_dropout=0.0, **kw))
        randomize_adapters(pm)
        pm.save_pretrained(root / name)
        out[name] = root / name
    return out


def _quantized(dense):
    model = LlamaForCausalLM.from_pretrained(dense, dtype=torch.float32)
    return lora_ops.quantize_model(model, progress=False).eval()


def _ids(batch, seq=9):
    return torch.randint(0, VOCAB, (batch, seq))


def _rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _single_adapter_logits(dirs, name, ids):
    """Each adapter alone, through PEFT's ordinary (single-adapter, fused) path; None: the base."""
    model = _quantized(dirs["dense"])
    if name is not None:
        model = PeftModel.from_pretrained(model, dirs[name]).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pool_rows_match_single_adapter_runs(dirs):
    server = AdapterServer(_quantized(dirs["dense"]), capacity=4, r_max=16)
    for name in ADAPTERS:
        server.load_adapter(str(dirs[name]))
    names = ["a", "b", None, "c", "b", "a", "d"]
    ids = _ids(len(names))
    with torch.no_grad(), server.batch(names):
        mixed = server.model(input_ids=ids).logits
    for b, name in enumerate(names):
        single = _single_adapter_logits(dirs, name, ids[b : b + 1])[0]
        assert _rel_err(mixed[b], single) <= 1e-5, (b, name)
    assert not torch.equal(mixed[0], mixed[2])  # the adapters matter


def test_hot_load_and_unload_keep_other_rows_bit_identical(dirs):
    server = AdapterServer(_quantized(dirs["dense"]), capacity=3, r_max=16)
    server.load_adapter(str(dirs["a"]))
    server.load_adapter(str(dirs["b"]))
    names = ["b", None, "b", "a"]
    ids = _ids(len(names))

    def run(names):
        with torch.no_grad(), server.batch(names):
            return server.model(input_ids=ids).logits

    before = run(names)
    server.load_adapter(str(dirs["c"]))  # into the free slot, beside the rows' adapters
    after_load = run(names)
    assert torch.equal(after_load, before)
    with_c = run(["b", None, "c", "a"])
    assert torch.equal(with_c[[0, 1, 3]], before[[0, 1, 3]]) and not torch.equal(with_c[2], before[2])
    server.unload("a")
    after_unload = run(["b", None, "b", None])
    assert torch.equal(after_unload[:3], before[:3])
    server.load_adapter(str(dirs["a"]), name="a2")  # the freed slot, reused
    assert torch.equal(run(names[:3] + ["a2"]), before)


def test_full_pool_and_unknown_names_are_clear_errors(dirs):
    server = AdapterServer(_quantized(dirs["dense"]), capacity=2, r_max=16)
    server.load_adapter(str(dirs["a"]))
    server.load_adapter(str(dirs["b"]))
    with pytest.raises(RuntimeError, match="pool is full .*unload one before loading 'c'"):
        server.load_adapter(str(dirs["c"]))
    with pytest.raises(KeyError, match="'c' is not loaded"):
        server.slot_ids(["a", "c"])
    with pytest.raises(ValueError, match="'a' is loaded already"):
        server.load_adapter(str(dirs["a"]))
    server.unload("b")
    assert server.load_adapter(str(dirs["c"])) == 1


def test_misfitting_adapters_are_refused_naming_adapter_and_module(dirs):
    server = AdapterServer(_quantized(dirs["dense"]), capacity=3, r_max=8)
    _, modules = read_peft_adapter(str(dirs["a"]))
    q = "model.layers.0.self_attn.q_proj"
    A, B, s = modules[q]
    bad_cases = [
        ({**modules, "model.layers.7.mlp.up_proj": (A, B, s)},
         "adapter 'x': module 'model.layers.7.mlp.up_proj' is not"),
        ({**modules, q: (A[:, :-1], B, s)}, f"adapter 'x', module '{q}': lora_A is \\(8, 63\\)"),
        ({**modules, q: (A, B[:-1], s)}, f"adapter 'x', module '{q}': lora_B is"),
    ]
    for bad, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            server.add_adapter("x", bad)
    too_big = "adapter 'c', module 'model.layers.*': rank 16 is above the pool's r_max = 8"
    with pytest.raises(ValueError, match=too_big):
        server.load_adapter(str(dirs["c"]), name="c")
    assert server.slots == {}
    assert all(int(layer.pool.ranks.abs().sum()) == 0 for layer in server.layers.values())  # nothing written


def _peft_mixed(dirs):
    model = PeftModel.from_pretrained(_quantized(dirs["dense"]), dirs["a"], adapter_name="a")
    model.load_adapter(dirs["b"], adapter_name="b")
    model.load_adapter(dirs["c"], adapter_name="c")
    return model.eval()


def _count(model, **kw) -> dict[str, int]:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**kw)
    names = [e.name for e in prof.events()]
    return {n: names.count(n) for n in ("lora_ops::multi_lora_linear", "lora_ops::qlora_linear")}


def test_peft_mixed_batch_runs_the_fused_op_and_matches_single_adapter_rows(dirs):
    model = _peft_mixed(dirs)
    names = ["a", "__base__", "b", "c", "a"]
    ids = _ids(len(names))
    counts = _count(model, input_ids=ids, adapter_names=names)
    assert counts == {"lora_ops::multi_lora_linear": N_LINEARS, "lora_ops::qlora_linear": 0}
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for b, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(input_ids=ids[b : b + 1]).logits[0]
            else:
                model.set_adapter(name)
                single = model(input_ids=ids[b : b + 1]).logits[0]
            assert _rel_err(mixed[b], single) <= 1e-5, (b, name)


def test_peft_generate_with_adapter_names(dirs):
    model = _peft_mixed(dirs)
    names = ["c", "a", "__base__", "b"]
    prompt = _ids(len(names), seq=5)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)  # no early EOS: no padding
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model.generate(input_ids=prompt, adapter_names=names, **kw)
    n_fused = sum(e.name == "lora_ops::multi_lora_linear" for e in prof.events())
    assert n_fused == N_LINEARS * kw["max_new_tokens"]  # every layer, every step
    with torch.no_grad():
        for b, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model.generate(input_ids=prompt[b : b + 1], **kw)
            else:
                model.set_adapter(name)
                single = model.generate(input_ids=prompt[b : b + 1], **kw)
            assert torch.equal(out[b], single[0]), (b, name)


def test_peft_pool_follows_changed_adapter_weights(dirs):
    model = _peft_mixed(dirs)
    names = ["a", "b"]
    ids = _ids(2)
    with torch.no_grad():
        y1 = model(input_ids=ids, adapter_names=names).logits
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        layer.lora_B["b"].weight.mul_(3.0)  # in place: the pooled copy must be refreshed
        y2 = model(input_ids=ids, adapter_names=names).logits
        model.set_adapter("b")
        single = model(input_ids=ids[1:]).logits[0]
    assert not torch.equal(y1[1], y2[1])
    assert _rel_err(y2[1], single) <= 1e-5


def test_serve_demo_runs_and_rows_agree():
    from lora_ops import serve_demo

    result = serve_demo.run(["--size", "ci", "--batch", "5", "--new-tokens", "3", "--repeats", "1"])
    assert result["rows_equal"] == 5
    counts = result["op_counts"]
    assert counts["lora_ops::multi_lora_linear"] == counts["LoRA layers"] > 0
    assert counts["lora_ops::qlora_linear"] == 0
