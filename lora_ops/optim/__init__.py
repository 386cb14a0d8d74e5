"""Optimizers with paged float32 state: :class:`PagedAdamW` and its per-step :class:`PagingStats`."""

from lora_ops.optim.paged_adamw import PagedAdamW
from lora_ops.optim.pager import PagingStats

__all__ = ["PagedAdamW", "PagingStats"]
