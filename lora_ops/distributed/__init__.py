"""lora_ops on torch.distributed: NF4 bases that FSDP2 shards (``make_nf4_shardable``), and
``torch.distributed.checkpoint`` helpers for the model and PagedAdamW state (:mod:`.checkpoint`).
DDP needs nothing from here: a QLoRALinear model wraps in ``DistributedDataParallel`` as it is."""

from lora_ops.distributed.fsdp import (
    ShardableQLoRALinear,
    check_shardable,
    make_nf4_shardable,
    nf4_storage_nbytes,
)
from lora_ops.distributed.nf4_tensor import NF4Tensor, shard_error

__all__ = ["NF4Tensor", "ShardableQLoRALinear", "check_shardable", "make_nf4_shardable",
           "nf4_storage_nbytes", "shard_error"]
