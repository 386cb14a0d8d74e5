"""Kept for imports written before NF4Tensor moved to :mod:`lora_ops.nf4_tensor` (it is now the storage of
every NF4 layer, not only of sharded ones)."""

from lora_ops.nf4_tensor import NF4Tensor, shard_error

__all__ = ["NF4Tensor", "shard_error"]
