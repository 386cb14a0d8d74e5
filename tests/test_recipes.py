"""The README's recipes, run as they are written (extracted from README.md) on a tiny random Llama:
a README example that stops working fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="CI installs peft; the recipes use it")
pytest.importorskip("transformers", reason="CI installs transformers; the recipes use it")
from hf_tiny import save_random_llama  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def recipe(name: str) -> str:
    """The python block right after ``<!-- recipe: name -->`` in the README."""
    m = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README.md has no recipe {name!r}"
    return m.group(1)


def _copy_task(n: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Tokenized examples: 8 random tokens, then the same 8 again (learnable by a tiny model)."""
    out = []
    for _ in range(n):
        a = torch.randint(3, 96, (8,), generator=generator)
        ids = torch.cat([a, a])
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return out


def test_trainer_recipe_trains_every_adapter_saves_and_reloads(tmp_path, rng):
    from lora_ops.integrations.peft_native import LoraOpsLinear
    from lora_ops.optim import PagedAdamW

    model_id = save_random_llama(tmp_path / "tiny", seed=int(torch.randint(0, 10_000, (1,), generator=rng)))
    ns = {"model_id": str(model_id), "output_dir": str(tmp_path / "out"), "train_dataset": _copy_task(32, rng)}
    exec(compile(recipe("trainer"), "README.md:recipe:trainer", "exec"), ns)

    trainer, trained = ns["trainer"], ns["trainer"].model
    assert isinstance(trainer.optimizer, PagedAdamW) or isinstance(
        getattr(trainer.optimizer, "optimizer", None), PagedAdamW)
    assert trainer.state.global_step == 8  # 32 examples / batch 4
    assert trained.base_model.model.is_gradient_checkpointing
    layers = [m for m in trained.modules() if isinstance(m, LoraOpsLinear)]
    assert len(layers) == 14
    # every adapter trained: lora_B starts at zero, so a zero B means no gradient reached it
    assert all(m.lora_B["default"].weight.abs().max() > 0 for m in layers)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(0 < v < 10 for v in losses)
    # the reloaded adapter on a fresh base computes what the trained model computes
    reloaded = ns["model"]
    assert reloaded is not trained and sum(isinstance(m, LoraOpsLinear) for m in reloaded.modules()) == 14
    ids = torch.randint(0, 96, (2, 9), generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, trained.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)


def recipe_names() -> list[str]:
    return re.findall(r"<!-- recipe: (\w+) -->", README.read_text())


def test_every_readme_recipe_has_a_test():
    """A recipe added to (or renamed in) the README fails here until it has its test in this file."""
    names = ["bnb_patch", "from_pretrained", "layer", "serving", "trainer"]
    assert sorted(recipe_names()) == names, recipe_names()


def test_serving_recipe_runs_one_fused_op_per_layer_and_matches_each_row_alone(tmp_path, rng):
    from hf_tiny import randomize_adapters
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    import lora_ops

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    path = save_random_llama(tmp_path / "tiny", seed=int(torch.randint(0, 10_000, (1,), generator=rng)))
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    dirs = {}
    adapters = {"sql": dict(r=8, target_modules="all-linear"), "chat": dict(r=4, target_modules=["q_proj"])}
    for name, kw in adapters.items():
        pm = get_peft_model(lora_ops.quantize_model(load(), progress=False), LoraConfig(lora_alpha=16, **kw))
        randomize_adapters(pm)  # non-zero B: each adapter changes its rows
        pm.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    ids = torch.randint(0, 96, (3, 9), generator=rng)
    ns = {"base": load(), "sql_dir": dirs["sql"], "chat_dir": dirs["chat"], "input_ids": ids}
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        exec(compile(recipe("serving"), "README.md:recipe:serving", "exec"), ns)
    assert sum(e.name == "lora_ops::multi_lora_linear" for e in prof.events()) == 14  # every LoRA layer
    logits = ns["logits"]
    for row, name in enumerate(["sql", "chat", None]):
        alone = lora_ops.quantize_model(load(), progress=False)
        if name is not None:
            alone = PeftModel.from_pretrained(alone, dirs[name])
        with torch.no_grad():
            want = alone.eval()(input_ids=ids[row : row + 1]).logits[0]
        err = ((logits[row].double() - want.double()).abs().max() / want.double().abs().max()).item()
        assert err <= 1e-5, (row, name, err)
    assert not torch.allclose(logits[0], logits[2])  # the adapter changed its row


def test_from_pretrained_recipe_quantizes_while_loading_as_quantize_model_does(tmp_path, rng):
    from transformers import AutoModelForCausalLM

    import lora_ops
    from lora_ops.nn import NF4Linear

    model_id = save_random_llama(tmp_path / "tiny", seed=int(torch.randint(0, 10_000, (1,), generator=rng)))
    ns = {"model_id": str(model_id)}
    exec(compile(recipe("from_pretrained"), "README.md:recipe:from_pretrained", "exec"), ns)
    model = ns["model"]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 14 and "lm_head" not in layers
    params = list(model.parameters())
    assert all(not m.weight.requires_grad and any(p is m.weight for p in params) for m in layers.values())
    # the same bytes as quantizing the dense model after loading it: identical logits
    dense = lora_ops.quantize_model(AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.bfloat16))
    ids = torch.randint(0, 96, (2, 9), generator=rng)
    with torch.no_grad():
        got, want = model.eval()(input_ids=ids).logits, dense.eval()(input_ids=ids).logits
    assert torch.isfinite(got).all() and got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_layer_recipe_computes_the_fused_layer_and_its_gradients():
    ns: dict = {}
    exec(compile(recipe("layer"), "README.md:recipe:layer", "exec"), ns)
    layer, x, y = ns["layer"], ns["x"], ns["y"]
    assert y.shape == (8, 256) and y.dtype == torch.bfloat16
    # float64 reference from the layer's own NF4 bytes decoded by the spec oracle (not by the kernels)
    from lora_ops import reference

    w = layer.weight
    absmax = reference.nested_absmax(w.absmax, w.absmax2, w.offset) if w.nested else w.absmax
    w64 = reference.nf4_dequantize(w.packed, absmax, w.blocksize, w.shape, torch.float64)
    x64 = x.detach().double()

    def check(y):
        A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        ref = x64 @ w64.T + layer.bias.double() + layer.scaling * (x64 @ A.double().T) @ B.double().T
        # plain PyTorch in bf16 sets the tolerance: our error <= 2x its error + one bf16 rounding
        xb = x.detach()
        plain = (xb @ w64.to(torch.bfloat16).T + layer.bias.to(torch.bfloat16)
                 + layer.scaling * (xb @ A.to(torch.bfloat16).T) @ B.to(torch.bfloat16).T).double()
        tol = 2 * (plain - ref).abs().max() + ref.abs().max() * 2**-8
        assert (y.double() - ref).abs().max() <= tol

    check(y)
    with torch.no_grad():  # B starts at zero; a non-zero B checks the LoRA term too
        layer.lora_B.weight.normal_(0, 0.05)
        check(layer(x.detach()))
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().max() > 0
    assert layer.lora_A.weight.grad is not None  # zero here: B starts at zero, so dA = 0 on the first step
    assert x.grad is not None and x.grad.abs().max() > 0
    assert not any(p.requires_grad for n, p in layer.named_parameters() if "lora_" not in n)


def test_bnb_patch_recipe_patches_every_lora_layer_and_trains(tmp_path, rng, capsys):
    pytest.importorskip("bitsandbytes", reason="CI installs bitsandbytes; the recipe patches a bnb model")
    from bnb_required import no_bnb_cpu_repack

    model_id = save_random_llama(tmp_path / "tiny", seed=int(torch.randint(0, 10_000, (1,), generator=rng)))
    ns = {"model_id": str(model_id)}
    exec(compile(recipe("bnb_patch"), "README.md:recipe:bnb_patch", "exec"), ns)
    model, report = ns["model"], ns["report"]
    assert report == 14 and not report.skipped
    assert "patched=14" in capsys.readouterr().out
    no_bnb_cpu_repack(model)
    # the patched layers run lora_ops' op: a training step reaches every adapter through it
    from lora_ops.integrations.peft import unpatch_peft_model

    ids = torch.randint(0, 96, (2, 9), generator=rng)
    for m in model.modules():
        if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [m.lora_A["default"].weight.grad for m in model.modules() if hasattr(m, "lora_A")
             and "default" in getattr(m, "lora_A", {})]
    assert len(grads) == 14 and all(g is not None and g.abs().max() > 0 for g in grads)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
        unpatch_peft_model(model)
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(patched, plain, rtol=0.05, atol=0.05)
