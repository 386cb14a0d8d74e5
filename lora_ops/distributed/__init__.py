"""lora_ops on torch.distributed: NF4 bases that FSDP2 shards as they are (``fully_shard`` alone), and
``torch.distributed.checkpoint`` helpers for the model and PagedAdamW state (:mod:`.checkpoint`).
DDP: call ``ddp_ignore_nf4_bases(model)`` on the module you wrap, so that DDP's initial broadcast skips the
frozen 4-bit bases (every rank loads the same bytes); only adapter gradients are reduced."""

from lora_ops.distributed.ddp import ddp_ignore_nf4_bases
from lora_ops.distributed.fsdp import (
    ShardableQLoRALinear,
    check_shardable,
    make_nf4_shardable,
    nf4_storage_nbytes,
)
from lora_ops.nf4_tensor import NF4Tensor, shard_error

__all__ = [
    "NF4Tensor",
    "ShardableQLoRALinear",
    "check_shardable",
    "ddp_ignore_nf4_bases",
    "make_nf4_shardable",
    "nf4_storage_nbytes",
    "shard_error",
]
