"""QLoRALinear: an NF4 (double-quantized) frozen base weight plus a trainable LoRA adapter, running on
the fused lora_ops kernels. A drop-in replacement for ``nn.Linear``, bitsandbytes ``Linear4bit`` and
PEFT's 4-bit LoRA layer.

Stable API (other code depends on it; extend, do not change):

    QLoRALinear(in_features, out_features, r, alpha, dropout=0.0, bias=False, use_rslora=False,
                blocksize=64, double_quant=True, base_dtype=torch.bfloat16,
                adapter_dtype=torch.float32, device=None)
    QLoRALinear.from_linear(linear, r, alpha, dropout=0.0, use_rslora=False, blocksize=64,
                            double_quant=True, adapter_dtype=torch.float32)
    QLoRALinear.from_bnb(linear4bit, r, alpha, dropout=0.0, use_rslora=False,
                         adapter_dtype=torch.float32)          # zero-copy: shares the packed bytes
    QLoRALinear.from_peft(peft_lora_linear4bit, adapter_name="default")   # shares A, B and the base
    layer(x)                      x [..., in_features] fp16/bf16/fp32 -> [..., out_features] in x's dtype
    layer.weight                  NF4Weight view of the base (no copy)
    layer.lora_A.weight [r, in], layer.lora_B.weight [out, r]   (trainable nn.Parameters)
    layer.scaling                 alpha / r  (alpha / sqrt(r) with use_rslora)
    layer.merge() -> Tensor       dense float32 W + scaling·B·A (the module is not changed)
    layer.merge_to_nf4(inplace=False) -> (NF4Weight, report dict)   re-quantized merged base
    layer.unmerge() -> report     undo merge_to_nf4(inplace=True) (exact: restores the saved base)
    layer.adapter_state_dict()    {"lora_A.weight", "lora_B.weight"}: PEFT adapter-file names

state_dict keys: ``lora_A.weight``, ``lora_B.weight`` (PEFT's names without the adapter name),
``bias`` (if any) and the base buffers ``weight_packed``, ``weight_absmax``, ``weight_absmax2``,
``weight_nested_code``, ``weight_offset`` (the last three only when double-quantized), and
``lora_merged`` (a bool scalar) only while the adapter is folded into the base by
``merge_to_nf4(inplace=True)``: loading a dict restores ``merged`` from it, so the LoRA term is never
applied twice (a module loaded merged cannot ``unmerge()``: the original base is not in the dict).
``hf_base_state_dict(prefix)`` gives the base in Hugging Face 4-bit checkpoint keys instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lora_ops import format as fmt
from lora_ops.nf4 import NF4Weight, quantize_nf4
from lora_ops.ops import qlora as qlora_ops

_BASE_KEYS = ("packed", "absmax", "absmax2", "nested_code", "offset")


def _zero_nf4(n: int, k: int, blocksize: int, double_quant: bool, dtype: torch.dtype, device) -> NF4Weight:
    """An all-zero [n, k] NF4Weight built directly (every code the exact zero), without quantizing."""
    numel = n * k
    nb = -(-numel // blocksize)
    packed = torch.full(((numel + 1) // 2, 1), fmt.NF4_ZERO_CODE * 0x11, dtype=torch.uint8, device=device)
    if not double_quant:
        return NF4Weight(packed, torch.zeros(nb, device=device), blocksize, (n, k), dtype)
    qabsmax = torch.full((nb,), fmt.DYNAMIC_MAP_ZERO_CODE, dtype=torch.uint8, device=device)
    return NF4Weight(
        packed,
        qabsmax,
        blocksize,
        (n, k),
        dtype,
        torch.zeros(-(-nb // fmt.NESTED_BLOCKSIZE), device=device),
        fmt.dynamic_map(device),
        torch.zeros((), device=device),
    )


class QLoRALinear(nn.Module):
    """``y = x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ + bias`` with W frozen in NF4 and A, B trainable.

    Adapters start like PEFT's: A Kaiming-uniform (a = sqrt(5)), B zeros, so the layer starts as the
    base layer. The base weight and bias are buffers (frozen: they move with ``.to()`` and appear in
    ``state_dict`` but never receive gradients).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        use_rslora: bool = False,
        blocksize: int = 64,
        double_quant: bool = True,
        base_dtype: torch.dtype = torch.bfloat16,
        adapter_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not 1 <= r <= fmt.MAX_LORA_RANK:
            raise ValueError(f"QLoRALinear: r must be in 1..{fmt.MAX_LORA_RANK}, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"QLoRALinear: dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout_p = float(dropout)
        self.blocksize, self.base_dtype = blocksize, base_dtype
        self.merged = False
        self._unmerged_base: NF4Weight | None = None
        # A placeholder base (exact zeros) until from_* or load_state_dict fills it.
        self._set_base(_zero_nf4(out_features, in_features, blocksize, double_quant, base_dtype, device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=base_dtype, device=device) if bias else None
        )
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=adapter_dtype)
        self.reset_lora_parameters()

    # ---- construction ------------------------------------------------------------------------------
    def reset_lora_parameters(self) -> None:
        """PEFT's init: A ~ Kaiming-uniform(a=sqrt(5)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def _set_base(self, w: NF4Weight) -> None:
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"QLoRALinear: base weight shape {tuple(w.shape)} != "
                f"({self.out_features}, {self.in_features})"
            )
        self.blocksize, self.base_dtype = w.blocksize, w.dtype
        for name, t in w.tensors().items():
            self.register_buffer(f"weight_{name}", t)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        blocksize: int = 64,
        double_quant: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> QLoRALinear:
        """Quantizes ``linear.weight`` to NF4 (its dtype becomes the base dtype); bias is kept frozen."""
        w = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            r,
            alpha,
            dropout,
            linear.bias is not None,
            use_rslora,
            blocksize,
            double_quant,
            w.dtype,
            adapter_dtype,
            w.device,
        )
        layer._set_base(quantize_nf4(w, blocksize, double_quant))
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    @classmethod
    def from_bnb(
        cls,
        linear4bit: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> QLoRALinear:
        """From a bitsandbytes ``Linear4bit`` (nf4). Zero-copy: the packed bytes, absmax state and bias
        are shared with the original layer, not cloned."""
        weight = linear4bit.weight
        qs = getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError(
                "QLoRALinear.from_bnb: the Linear4bit weight is not quantized yet (move it to a "
                "device first, as bitsandbytes quantizes on .to()/.cuda())"
            )
        base = NF4Weight.from_bnb(weight.data, qs)
        out_f, in_f = base.shape
        bias = getattr(linear4bit, "bias", None)
        layer = cls(
            in_f,
            out_f,
            r,
            alpha,
            dropout,
            False,
            use_rslora,
            base.blocksize,
            base.nested,
            base.dtype,
            adapter_dtype,
            base.device,
        )
        layer._set_base(base)
        if bias is not None:
            layer.bias = bias.detach()
        return layer

    @classmethod
    def from_peft(cls, lora_layer: nn.Module, adapter_name: str = "default") -> QLoRALinear:
        """From PEFT's ``peft.tuners.lora.bnb.Linear4bit``: the base (zero-copy) and the adapter
        ``adapter_name`` (its A and B Parameters are shared, so an optimizer over them keeps working)."""
        a = lora_layer.lora_A[adapter_name].weight
        b = lora_layer.lora_B[adapter_name].weight
        drop = lora_layer.lora_dropout[adapter_name]
        p = float(getattr(drop, "p", 0.0))
        r = lora_layer.r[adapter_name]
        layer = cls.from_bnb(
            lora_layer.get_base_layer(), r, lora_layer.lora_alpha[adapter_name], p, adapter_dtype=a.dtype
        )
        layer.scaling = float(lora_layer.scaling[adapter_name])
        layer.lora_A.weight = a
        layer.lora_B.weight = b
        return layer

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not cast the quantization state (absmax & co. are float32 by
        # format): keep their dtype, follow only the device change.
        saved = {f"weight_{k}": self._buffers.get(f"weight_{k}") for k in _BASE_KEYS}
        super()._apply(fn, recurse)
        for name, orig in saved.items():
            new = self._buffers.get(name)
            if orig is not None and new is not None and new.dtype != orig.dtype:
                self._buffers[name] = orig.to(new.device)
        return self

    # ---- merged state in state_dict -----------------------------------------------------------------
    _MERGED_KEY = "lora_merged"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:  # the base already holds the adapter: a loader must not add it again
            destination[prefix + self._MERGED_KEY] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        flag = state_dict.pop(prefix + self._MERGED_KEY, None)
        has_base = prefix + "weight_packed" in state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if flag is not None or has_base:  # a dict without the base (adapter only) keeps the state
            self.merged = flag is not None and bool(flag)
            self._unmerged_base = None  # a kept original base belonged to the replaced weights

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def weight(self) -> NF4Weight:
        """The frozen base as an :class:`NF4Weight` (shares the buffers)."""
        return NF4Weight(
            self.weight_packed,
            self.weight_absmax,
            self.blocksize,
            (self.out_features, self.in_features),
            self.base_dtype,
            self.weight_absmax2,
            self.weight_nested_code,
            self.weight_offset,
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter under PEFT's adapter-file key names (``lora_A.weight``, ``lora_B.weight``)."""
        return {"lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}

    def hf_base_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The base weight (and bias) in Hugging Face 4-bit checkpoint keys: ``{prefix}weight``,
        ``{prefix}weight.absmax``, ``{prefix}weight.quant_state.bitsandbytes__nf4``, ..."""
        out = self.weight.hf_state_dict(f"{prefix}weight")
        if self.bias is not None:
            out[f"{prefix}bias"] = self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.lora_dropout_p}, "
            f"blocksize={self.blocksize}, double_quant={self.weight_absmax.dtype == torch.uint8}, "
            f"base_dtype={self.base_dtype}, bias={self.bias is not None}, merged={self.merged}"
        )

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in_features]`` (fp16/bf16/fp32) -> ``[..., out_features]`` in x's dtype."""
        bias = self.bias
        if self.merged:  # the adapter is folded into the base: base-only fused matmul
            if bias is not None and bias.dtype not in (x.dtype, torch.float32):
                bias = bias.to(x.dtype)
            return qlora_ops.qlora_matmul(x, self.weight, bias=bias)
        p = self.lora_dropout_p if self.training else 0.0
        return qlora_ops.qlora_linear(
            x, self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling, bias, p
        )

    # ---- merging -------------------------------------------------------------------------------------
    def _delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    @torch.no_grad()
    def merge(self) -> torch.Tensor:
        """Dense float32 ``[out, in]`` merged weight ``dequant(W) + scaling·B·A``. The module is unchanged."""
        base = self.weight.dequantize(torch.float32)
        return base if self.merged else base + self._delta()

    @torch.no_grad()
    def merge_to_nf4(self, inplace: bool = False) -> tuple[NF4Weight, dict[str, Any]]:
        """Re-quantizes the merged weight to NF4 (same blocksize / double quant / dtype).

        Returns (new NF4Weight, report) with the rounding error of the re-quantization measured against
        the float32 merged weight: ``max_abs_error``, ``mean_abs_error``, ``rel_fro_error`` (and
        ``delta_fro_norm``, the size of the folded-in update). With ``inplace=True`` the module's base
        is replaced, the adapter is then skipped in forward (``merged``), and ``unmerge()`` restores
        the original base exactly."""
        if self.merged:
            raise RuntimeError("QLoRALinear.merge_to_nf4: already merged; call unmerge() first")
        merged = self.merge()
        base = self.weight
        target = merged.to(self.base_dtype)
        new = quantize_nf4(target, self.blocksize, base.nested)
        err = new.dequantize(torch.float32) - merged
        report = {
            "max_abs_error": err.abs().max().item(),
            "mean_abs_error": err.abs().mean().item(),
            "rel_fro_error": (err.norm() / merged.norm().clamp_min(1e-30)).item(),
            "delta_fro_norm": self._delta().norm().item(),
        }
        if inplace:
            self._unmerged_base = base
            self._set_base(new)
            self.merged = True
        return new, report

    @torch.no_grad()
    def unmerge(self) -> dict[str, Any]:
        """Undoes ``merge_to_nf4(inplace=True)``: restores the saved original base bit for bit."""
        if not self.merged:
            raise RuntimeError("QLoRALinear.unmerge: not merged")
        if self._unmerged_base is None:
            raise RuntimeError("QLoRALinear.unmerge: the original base was not kept")
        self._set_base(self._unmerged_base)
        self._unmerged_base = None
        self.merged = False
        return {"restored": "exact"}
