"""Bridges to other libraries: Hugging Face 4-bit checkpoints (``hf_checkpoint``), PEFT over lora_ops'
own NF4 layers (``peft_native``: what ``get_peft_model`` builds after ``lora_ops.quantize_model``) and
patching a bitsandbytes PEFT model (``peft``). Import the submodule you need; none is imported here so
that ``import lora_ops`` never pulls in transformers or PEFT."""
