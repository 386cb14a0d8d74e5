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
