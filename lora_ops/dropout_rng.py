"""The dropout ``rng`` argument of the fused ops, drawn from torch's default CPU generator by a step
that ``torch.compile`` keeps opaque: eager and compiled runs consume the generator the same way, so
one ``torch.manual_seed`` gives the same masks in both.

Why not draw it inline (``make_rng()`` inside a compiled forward): Inductor lowers ``torch.randint``
to its own Philox stream, so a compiled run would draw a different seed from the same generator
state than the eager run does. As a custom op tagged ``nondeterministic_seeded`` the draw runs as
is at run time, is never merged with another draw (CSE) and never recomputed in the backward.
"""

from __future__ import annotations

import torch

from lora_ops.ops.qlora import make_rng


@torch.library.custom_op("lora_ops_py::draw_dropout_rng", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def draw_dropout_rng() -> torch.Tensor:
    """A fresh ``(seed, offset)`` int64 CPU tensor, the seed drawn from torch's default CPU generator
    (exactly what ``qlora_linear(..., rng=None)`` draws in eager mode)."""
    return make_rng()


@draw_dropout_rng.register_fake
def _draw_dropout_rng_fake() -> torch.Tensor:
    return torch.empty(2, dtype=torch.int64, device="cpu")
