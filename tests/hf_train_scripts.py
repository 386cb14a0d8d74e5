"""The training programs of tests/test_transformers_training.py, run in a fresh interpreter without
bitsandbytes (tests/no_bnb.py): from_pretrained(NF4Config) -> prepare_model_for_kbit_training ->
get_peft_model -> transformers.Trainer, and TRL's SFTTrainer with peft_config= or a prebuilt PeftModel,
each with lora_ops.PagedAdamW. Each prints one JSON line with what the test checks."""

from __future__ import annotations

import json
import sys
import tempfile

import torch

STEPS = 5
WORDS = [f"w{i}" for i in range(60)]


def word_tokenizer():
    """A word-level tokenizer over a fixed local vocabulary (no hub): special tokens + WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def texts(n: int = 16) -> list[str]:
    """Short repeating word patterns: learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        start = int(torch.randint(0, 40, (), generator=g))
        out.append(" ".join(WORDS[start + (j % 6)] for j in range(12)))
    return out


def load(path: str):
    from transformers import AutoModelForCausalLM

    import lora_ops

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=lora_ops.NF4Config(compute_dtype="bfloat16"),
                                                dtype=torch.bfloat16, device_map="cpu")


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _report(trainer, model, extra: dict | None = None) -> None:
    from lora_ops.integrations.peft_native import LoraOpsLinear

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    n_fused = sum(isinstance(m, LoraOpsLinear) for m in model.modules())
    print(json.dumps({"losses": losses, "fused_layers": n_fused, "num_parameters": model.num_parameters(),
                      **(extra or {})}))


def _optimizer():
    import lora_ops

    return (lora_ops.PagedAdamW, {"lr": 3e-2, "weight_decay": 0.0})


def peft_trainer(path: str) -> None:
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    model = load(path)
    model = prepare_model_for_kbit_training(model)
    checkpointing = bool(model.is_gradient_checkpointing)
    model = get_peft_model(model, lora_config())
    tok = word_tokenizer()
    rows = [tok(t)["input_ids"] for t in texts()]
    data = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1,
                                 report_to=[], save_strategy="no", use_cpu=True, dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=_optimizer())
        trainer.train()
    _report(trainer, model, {"gradient_checkpointing": checkpointing})


def sft(path: str, prebuilt: bool) -> None:
    from datasets import Dataset
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    model = load(path)
    peft_config = lora_config()
    if prebuilt:
        model, peft_config = get_peft_model(model, peft_config), None
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1,
                         report_to=[], save_strategy="no", use_cpu=True, max_length=32,
                         dataloader_pin_memory=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts()}),
                             processing_class=word_tokenizer(), peft_config=peft_config,
                             optimizer_cls_and_kwargs=_optimizer())
        trainer.train()
    _report(trainer, trainer.model)


if __name__ == "__main__":
    what, path = sys.argv[1], sys.argv[2]
    if what == "trainer":
        peft_trainer(path)
    else:
        sft(path, prebuilt=what == "sft-prebuilt")
