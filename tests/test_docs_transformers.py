"""docs/transformers.md's recipes, run as they are written (extracted from the file) on a tiny random Llama,
in an interpreter where bitsandbytes cannot be imported: a recipe that stops working fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hf_tiny import tiny_llama_config
from no_bnb import run_without_bnb

pytest.importorskip("peft")
DOC = Path(__file__).resolve().parent.parent / "docs" / "transformers.md"
TOKENIZED = """
import torch
from hf_train_scripts import texts, word_tokenizer
tokenizer = word_tokenizer()
rows = [tokenizer(t)["input_ids"] for t in texts(4)]  # one batch, repeated each step
train_dataset = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]
"""
TEXTS = """
from datasets import Dataset
from hf_train_scripts import texts, word_tokenizer
tokenizer = word_tokenizer()
train_dataset = Dataset.from_dict({"text": texts(4)})
"""
REPORT = """
import json
from lora_ops.integrations.peft_native import LoraOpsLinear
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(json.dumps({"losses": losses, "fused": sum(isinstance(m, LoraOpsLinear) for m in trainer.model.modules())}))
"""


def recipe(name: str) -> str:
    m = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert m, f"docs/transformers.md has no recipe {name!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def model_id(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    cfg = tiny_llama_config(vocab_size=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size="50KB")
    return path


def _run(name: str, prelude: str, model_id: Path, out: Path) -> dict:
    code = f"model_id, output_dir = {str(model_id)!r}, {str(out)!r}\n" + prelude + recipe(name) + REPORT
    result = json.loads(run_without_bnb(code).strip().splitlines()[-1])
    losses = result["losses"]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    assert result["fused"] == 14
    return result


def test_trainer_recipe(model_id, tmp_path):
    _run("hf-trainer", TOKENIZED, model_id, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_sft_trainer_recipe(model_id, tmp_path):
    pytest.importorskip("trl")
    _run("sft-trainer", TEXTS, model_id, tmp_path / "out")


def test_save_and_bnb_recipe(model_id, tmp_path):
    pytest.importorskip("bitsandbytes", reason="CI installs bitsandbytes; it writes the bnb checkpoint read here")
    from hf_tiny import load_bnb_4bit

    load_bnb_4bit(model_id, compute_dtype=torch.bfloat16, dtype=torch.bfloat16).save_pretrained(tmp_path / "bnb")
    code = f"""
import torch
import lora_ops
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(model_id)!r}, quantization_config=lora_ops.NF4Config(),
                                             dtype=torch.bfloat16, device_map="cpu")
quantized_dir, bnb_dir = {str(tmp_path / "nf4")!r}, {str(tmp_path / "bnb")!r}
""" + recipe("save-and-bnb") + """
a, b = model.state_dict(), again.state_dict()
assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
n = sum(type(m).__name__ == "NF4Linear" for m in bnb_model.modules())
print(json.dumps({"bnb_nf4_layers": n}))
"""
    out = run_without_bnb("import json\n" + code)
    assert json.loads(out.strip().splitlines()[-1]) == {"bnb_nf4_layers": 14}
