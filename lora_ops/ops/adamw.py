"""Fused AdamW ops: wrappers over torch.ops.lora_ops.adamw_step_ and the managed-memory helpers,
with their fake (meta) kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_ops import _native  # noqa: F401  (registers the ops)

_ops = torch.ops.lora_ops

HPARAM_COLUMNS = ("lr", "beta1", "beta2", "weight_decay", "eps", "step", "maximize")
"""Columns of the float64 ``hparams`` table of :func:`adamw_step_`, one row per tensor."""


@torch.library.register_fake("lora_ops::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, hparams) -> None:
    return None


@torch.library.register_fake("lora_ops::managed_prefetch_")
def _managed_prefetch_fake(t, to_host) -> None:
    return None


def adamw_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    hparams: torch.Tensor,
) -> None:
    """One fused AdamW update of many tensors, in place, with torch.optim.AdamW's math.

    ``params[i]``: float32/float16/bfloat16, contiguous, any shape; ``grads[i]``: same dtype and numel;
    ``exp_avgs[i]``, ``exp_avg_sqs[i]``: float32, same numel. All on one device (CPU or CUDA).
    ``hparams``: float64 CPU ``[n, 7]``, row i = (lr, beta1, beta2, weight_decay, eps, step, maximize)
    for tensor i, where ``step`` already counts this update. State is always float32; 16-bit params
    are read, updated in float32 and rounded once (round-to-nearest-even).
    """
    grads = list(grads)
    for i, g in enumerate(grads):
        if g.layout != torch.strided:  # caught here: the dispatcher would report a missing Sparse kernel
            raise TypeError(f"adamw_step_: grads[{i}] is {g.layout}; sparse gradients are not supported")
    _ops.adamw_step_(list(params), grads, list(exp_avgs), list(exp_avg_sqs), hparams)


def hparams_row(
    lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, step: float, maximize: bool
) -> list[float]:
    """One row of the ``hparams`` table (plain Python floats, in :data:`HPARAM_COLUMNS` order)."""
    return [float(lr), float(beta1), float(beta2), float(weight_decay), float(eps), float(step), float(maximize)]


def managed_empty(numel: int, device: int) -> torch.Tensor:
    """An uninitialized float32 ``[numel]`` tensor in CUDA unified (managed) memory, reported as on
    ``cuda:device``. Needs a CUDA build (``lora_ops.WITH_CUDA``)."""
    return _ops.managed_empty(numel, device)


def managed_concurrent_access(device: int) -> bool:
    """Whether ``cuda:device`` supports concurrent managed access (prefetch and GPU/CPU coherence)."""
    return bool(_ops.managed_concurrent_access(device))


def managed_prefetch_(t: torch.Tensor, to_host: bool = False) -> None:
    """Asynchronously prefetches a managed tensor's pages to its GPU (or to the host) on the current
    stream (cudaMemPrefetchAsync)."""
    _ops.managed_prefetch_(t, to_host)
