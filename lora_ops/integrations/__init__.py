"""Bridges to other libraries: Hugging Face 4-bit checkpoints (``hf_checkpoint``) and PEFT
(``peft``). Import the submodule you need; neither is imported here so that ``import lora_ops``
never pulls in transformers or PEFT."""
