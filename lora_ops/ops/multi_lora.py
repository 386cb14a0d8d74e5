"""Per-row multi-adapter LoRA over one NF4 base (serving): a wrapper over
torch.ops.lora_ops.multi_lora_linear and its fake kernel. Forward only.

Math (x viewed as [M, K], W = dequant(NF4) [N, K]; a pool of C slots, each with A [r_max, K], Bt [r_max, N]
(B transposed), a scale and a rank r_c <= r_max, 0 for an empty slot):

    y[m] = x[m]·Wᵀ + bias + scale[c]·(x[m]·A[c][:r_c]ᵀ)·Bt[c][:r_c]      c = adapter_ids[m]
    y[m] = x[m]·Wᵀ + bias                                              adapter_ids[m] = -1 or r_c = 0

The base term runs once per call for all rows (qlora_matmul, rounded to x's dtype); the LoRA term is added
in fp32 and rounded again (csrc/kernels/common/multi_lora_params.h). When every row names the same loaded
adapter, the call is qlora_linear with that adapter (bit for bit; one rounding). For a given batch of slot
ids, a row's output depends only on its own x and adapter: loading or unloading other slots never changes
it. :class:`lora_ops.serving.AdapterPool` keeps the pool tensors.
"""

from __future__ import annotations

import torch

from lora_ops import _native  # noqa: F401  (registers the ops)
from lora_ops.ops._checks import check_one_device, explain_dispatch_error, weight_parts

_ops = torch.ops.lora_ops


@torch.library.register_fake("lora_ops::multi_lora_linear")
def _multi_lora_linear_fake(x, w, w_meta, A, Bt, scales, ranks, adapter_ids, bias):
    check_one_device("multi_lora_linear", "x", x, **weight_parts(w), A=A, Bt=Bt, scales=scales, ranks=ranks,
                     adapter_ids=adapter_ids, bias=bias)
    return x.new_empty((*x.shape[:-1], w_meta[1]))


def multi_lora_linear_args(
    x: torch.Tensor,
    w: list[torch.Tensor],
    w_meta: list[int],
    A: torch.Tensor,
    Bt: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    adapter_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [..., N]`` in x's dtype; the weight as the ops take it, ``(w, w_meta) = NF4Weight.op_args()``.

    Args:
        x: ``[..., K]`` float32 / float16 / bfloat16.
        A: ``[C, r_max, K]``, Bt: ``[C, r_max, N]`` pools (contiguous, x's dtype or float32).
        scales: float32 ``[C]``; ranks: int32 ``[C]`` (0: empty slot, rows naming it get the base alone).
        adapter_ids: int64, one per row of x (``x.shape[:-1]`` or flat), -1 for the base alone.
        bias: ``[N]`` (x's dtype or float32; cast otherwise).
    """
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        bias = bias.to(x.dtype)
    try:
        return _ops.multi_lora_linear(x, w, w_meta, A, Bt, scales, ranks, adapter_ids, bias)
    except NotImplementedError:
        explain_dispatch_error("multi_lora_linear", x=x, A=A, Bt=Bt, bias=bias)
        raise


def multi_lora_linear(x, weight, A, Bt, scales, ranks, adapter_ids, bias=None) -> torch.Tensor:
    """:func:`multi_lora_linear_args` with an :class:`lora_ops.NF4Weight`."""
    w, w_meta = weight.op_args()
    return multi_lora_linear_args(x, w, w_meta, A, Bt, scales, ranks, adapter_ids, bias)
