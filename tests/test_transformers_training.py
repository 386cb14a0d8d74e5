"""from_pretrained(NF4Config) -> PEFT -> transformers.Trainer, and TRL's SFTTrainer (peft_config= and a
prebuilt PeftModel), with lora_ops.PagedAdamW: 5 steps each, loss falling, in an interpreter where
bitsandbytes cannot be imported. The programs are tests/hf_train_scripts.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_tiny import tiny_llama_config
from no_bnb import run_without_bnb

pytest.importorskip("peft")
SCRIPTS = Path(__file__).parent / "hf_train_scripts.py"


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("dense")
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    cfg = tiny_llama_config(vocab_size=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size="50KB")
    return path


def _train(what: str, path: Path) -> dict:
    out = run_without_bnb(f"""
        import runpy
        sys.argv = ["hf_train_scripts", {what!r}, {str(path)!r}]
        runpy.run_path({str(SCRIPTS)!r}, run_name="__main__")
    """)
    result = json.loads(out.strip().splitlines()[-1])
    losses = result["losses"]
    assert len(losses) == 5 and all(map(torch.isfinite, torch.tensor(losses))), losses
    # falling: the last two steps below the first two (the batches repeat a few short patterns)
    assert losses[-1] < losses[0] and sum(losses[-2:]) < sum(losses[:2]), losses
    assert result["fused_layers"] == 14  # every linear but lm_head: lora_ops' fused LoRA layer
    assert result["num_parameters"] > 0  # transformers' count, bitsandbytes absent
    return result


def test_peft_and_trainer(dense_ckpt):
    result = _train("trainer", dense_ckpt)
    assert result["gradient_checkpointing"]  # prepare_model_for_kbit_training saw a 4-bit model


def test_sft_trainer_with_peft_config(dense_ckpt):
    pytest.importorskip("trl")
    _train("sft", dense_ckpt)


def test_sft_trainer_with_a_prebuilt_peft_model(dense_ckpt):
    pytest.importorskip("trl")
    _train("sft-prebuilt", dense_ckpt)
