"""Float64 oracle of the fused DoRA linear (lora_ops.ops.dora), written from the DoRA paper's definition
with the dense weight: it never calls the compiled kernels, the identity the fused op uses for the norm,
or PEFT. Autograd through it gives the float64 reference gradients (the norm detached, DoRA §4.3).

    n = ‖W + scale·B·A‖ per row (dense), g = m / n
    no dropout:  y = g ⊙ (x·Wᵀ + scale·(x·Aᵀ)·Bᵀ) + bias
    dropout p:   y = x·Wᵀ + bias + (g - 1) ⊙ (x̃·Wᵀ) + g ⊙ scale·(x̃·Aᵀ)·Bᵀ,  x̃ = drop(x)  (PEFT 0.21's)
"""

from __future__ import annotations

import torch

from lora_ops.reference import lora_dropout


def dora_weight_norm(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W + scale·B·A‖ per row, float64 [N], from the dense matrices."""
    d = torch.float64
    return torch.linalg.vector_norm(w.to(d) + scale * (B.to(d) @ A.to(d)), dim=1)


def dora_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    w_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] float64. ``w``: the dense weight the matmuls use; ``w_norm``: the one the norm uses
    (default ``w``; the fused op takes the norm from the format's float32 decode, its matmuls from the
    decode rounded to x's dtype). Every operand is widened to float64 differentiably."""
    d = torch.float64
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(d)
    W, Ad, Bd, m = w.to(d), A.to(d), B.to(d), magnitude.to(d)
    norm = dora_weight_norm(w if w_norm is None else w_norm, Ad.detach(), Bd.detach(), scale).detach()
    g = m / norm
    if dropout_p > 0:
        xd = lora_dropout(x2, dropout_p, seed, offset)
        y = x2 @ W.t() + (g - 1) * (xd @ W.t()) + g * (scale * ((xd @ Ad.t()) @ Bd.t()))
    else:
        y = g * (x2 @ W.t() + scale * ((x2 @ Ad.t()) @ Bd.t()))
    if bias is not None:
        y = y + bias.to(d)
    return y.reshape(*x.shape[:-1], w.shape[0])
