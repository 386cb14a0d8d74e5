"""Input checks shared by the op wrappers and the fake (meta) kernels: one place for the device rule
and for the message a non-dense tensor gets.

Why the fake kernels check devices: the dispatcher picks the Meta kernel as soon as ANY argument is on
``meta``, so a meta tensor among real CPU/CUDA arguments lands in the fake kernel, which would return
unwritten real memory. "Meta only when all are" is enforced here; the C++ kernels check real devices.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _named(tensors: dict[str, torch.Tensor | Iterable[torch.Tensor] | None]):
    for name, t in tensors.items():
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            yield name, t
        else:
            for i, ti in enumerate(t):
                yield f"{name}[{i}]", ti


def check_one_device(
    op: str,
    ref_name: str,
    ref: torch.Tensor,
    host: dict[str, torch.Tensor | None] | None = None,
    **tensors: torch.Tensor | Iterable[torch.Tensor] | None,
) -> None:
    """Every tensor in ``tensors`` must be on ``ref``'s device. ``host`` tensors (read on the host:
    rng, hparams, pieces) must be on the CPU, or on meta when ``ref`` is."""
    for name, t in _named(tensors):
        if t.device != ref.device:
            raise RuntimeError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "move all inputs to one device"
            )
    for name, t in _named(host or {}):
        if not (t.device.type == "cpu" or (t.device.type == "meta" and ref.device.type == "meta")):
            raise RuntimeError(f"{op}: {name} must be a CPU tensor (it is read on the host), got {t.device}")


# The tensors of an NF4 weight as the ops take it (NF4Weight.op_args), named as the C++ checks name them.
_WEIGHT_PARTS = ("packed weight", "absmax", "absmax2", "nested_code", "offset")


def weight_parts(w: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(_WEIGHT_PARTS, w))


def explain_dispatch_error(op: str, **tensors: torch.Tensor | Iterable[torch.Tensor] | None) -> None:
    """Called after the dispatcher raised NotImplementedError: if a tensor is not dense (sparse,
    mkldnn, ...), raise a TypeError naming it instead of the dispatcher's generic message."""
    for name, t in _named(tensors):
        if isinstance(t, torch.Tensor) and t.layout != torch.strided:
            raise TypeError(f"{op}: {name} is {t.layout}; only dense (strided) tensors are supported")
