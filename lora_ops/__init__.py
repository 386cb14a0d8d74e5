"""lora_ops: NF4 double-quantized storage, fused QLoRA linear kernels and paged AdamW as torch ops.

Public API (see README.md):
    NF4Weight, quantize_nf4                 NF4 storage (lora_ops.nf4)
    nf4_quantize, nf4_dequantize, ...       the raw ops (lora_ops.ops)
    PagedAdamW, PagingStats                 AdamW with paged float32 state (lora_ops.optim)
    QLoRALinear, qlora_linear               fused QLoRA linear (lora_ops.nn, lora_ops.ops.qlora)
    dora_linear                             fused DoRA linear over NF4 (lora_ops.ops.dora)
    NF4Linear, quantize_model               a dense model's linears to frozen NF4, ready for PEFT
                                            (lora_ops.nn, lora_ops.quantize, lora_ops.integrations.peft_native)
    NF4Config, bnb_checkpoint_config        from_pretrained(..., quantization_config=NF4Config()): quantized
                                            while loading (needs transformers; see docs/transformers.md)
"""

import torch as _torch

from lora_ops.torch_support import SUPPORTED_TORCH, check_torch

check_torch(_torch.__version__)  # before loading the compiled module: a clear error, not an undefined symbol

from lora_ops import ops  # noqa: E402, F401  (registers torch.ops.lora_ops and fake kernels)
from lora_ops._native import WITH_CUDA
from lora_ops.nf4 import NF4Weight, quantize_nf4
from lora_ops.ops.nf4 import nf4_dequantize, nf4_double_quantize, nf4_quantize
from lora_ops.ops.adamw import adamw_step_
from lora_ops.optim import PagedAdamW, PagingStats

from lora_ops.nn import NF4Linear, QLoRALinear
from lora_ops.quantize import quantize_model
from lora_ops.ops.qlora import lora_dropout_mask, make_rng, qlora_linear, qlora_matmul
from lora_ops.ops.dora import dora_linear

__all__ = [
    "SUPPORTED_TORCH",
    "WITH_CUDA",
    "NF4Weight",
    "quantize_nf4",
    "nf4_quantize",
    "nf4_double_quantize",
    "nf4_dequantize",
    "adamw_step_",
    "PagedAdamW",
    "PagingStats",
    "QLoRALinear",
    "NF4Linear",
    "quantize_model",
    "qlora_linear",
    "qlora_matmul",
    "lora_dropout_mask",
    "make_rng",
    "dora_linear",
]
__version__ = "0.1.0"

# NF4Weight holds only tensors, a torch.Size, a dtype and an int, and unpickling it runs no code:
# allow it in torch.load(..., weights_only=True) (torch's default loader since 2.6).
_torch.serialization.add_safe_globals([NF4Weight])

# quant_method "lora_ops" for transformers' from_pretrained (when transformers is installed; idempotent).
from lora_ops import _transformers_hook  # noqa: E402

_transformers_hook.install()


def __getattr__(name: str):
    if name in ("NF4Config", "bnb_checkpoint_config"):  # need transformers: imported on first use
        from lora_ops.integrations import transformers_quantizer

        return getattr(transformers_quantizer, name)
    raise AttributeError(f"module 'lora_ops' has no attribute {name!r}")
