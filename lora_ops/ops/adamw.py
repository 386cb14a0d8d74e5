"""Fused AdamW ops: wrappers over torch.ops.lora_ops.adamw_step_ and the managed-memory helpers,
with their fake (meta) kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_ops import _native  # noqa: F401  (registers the ops)
from lora_ops.ops._checks import check_one_device

_ops = torch.ops.lora_ops

HPARAM_COLUMNS = ("lr", "beta1", "beta2", "weight_decay", "eps", "step", "maximize")
"""Columns of the float64 ``hparams`` table of :func:`adamw_step_`, one row per tensor."""


@torch.library.register_fake("lora_ops::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, hparams) -> None:
    # In place: a meta tensor among real ones would otherwise skip the whole update silently.
    ref = params[0] if params else hparams
    check_one_device(
        "adamw_step_", "params[0]", ref, host={"hparams": hparams}, params=params, grads=grads,
        exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
    )
    return None


@torch.library.register_fake("lora_ops::adamw_step_pages_")
def _adamw_step_pages_fake(params, grads, pages, pieces, hparams) -> None:
    check_one_device(
        "adamw_step_pages_", "pages", pages, host={"pieces": pieces, "hparams": hparams}, params=params,
        grads=grads,
    )
    return None


@torch.library.register_fake("lora_ops::managed_prefetch_")
def _managed_prefetch_fake(t, to_host) -> None:
    return None


def _raise_if_sparse(op: str, grads: list[torch.Tensor]) -> None:
    # A sparse gradient makes the dispatcher look for a Sparse kernel; say what is actually wrong.
    for i, g in enumerate(grads):
        if g.layout != torch.strided:
            raise TypeError(f"{op}: grads[{i}] is {g.layout}; sparse gradients are not supported")


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
    try:
        _ops.adamw_step_(list(params), grads, list(exp_avgs), list(exp_avg_sqs), hparams)
    except NotImplementedError:
        _raise_if_sparse("adamw_step_", grads)
        raise


def adamw_step_pages_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    pages: torch.Tensor,
    pieces: torch.Tensor,
    hparams: torch.Tensor,
) -> None:
    """The AdamW update of pieces of parameters whose float32 state lives in page slots.

    ``pages``: float32 ``[n_slots, 2, page_elems]`` on the params' device (row 0 exp_avg, row 1
    exp_avg_sq). ``pieces``: int64 CPU ``[m, 5]``, rows ``(i, begin, end, slot, offset)``: elements
    ``[begin, end)`` of ``params[i].view(-1)`` use ``pages[slot, :, offset : offset + end - begin]``.
    ``hparams``: float64 CPU ``[len(params), 7]`` as in :func:`adamw_step_`. Every piece is bounds-checked.
    """
    grads = list(grads)
    try:
        _ops.adamw_step_pages_(list(params), grads, pages, pieces, hparams)
    except NotImplementedError:
        _raise_if_sparse("adamw_step_pages_", grads)
        raise


def hparams_row(
    lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, step: float, maximize: bool
) -> list[float]:
    """One row of the ``hparams`` table (plain Python floats, in :data:`HPARAM_COLUMNS` order)."""
    return [
        float(lr),
        float(beta1),
        float(beta2),
        float(weight_decay),
        float(eps),
        float(step),
        float(maximize),
    ]


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
