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
    layer.weight                  the frozen base: an nn.Parameter (NF4Tensor) with NF4Weight's interface
    layer.lora_A.weight [r, in], layer.lora_B.weight [out, r]   (trainable nn.Parameters)
    layer.scaling                 alpha / r  (alpha / sqrt(r) with use_rslora)
    layer.merge() -> Tensor       dense float32 W + scaling·B·A (the module is not changed)
    layer.merge_to_nf4(inplace=False) -> (NF4Weight, report dict)   re-quantized merged base
    layer.unmerge() -> report     undo merge_to_nf4(inplace=True) (exact: restores the saved base)
    layer.adapter_state_dict()    {"lora_A.weight", "lora_B.weight"}: PEFT adapter-file names

state_dict keys: ``lora_A.weight``, ``lora_B.weight`` (PEFT's names without the adapter name),
``bias`` (if any) and the base as ``weight_packed``, ``weight_absmax``, ``weight_absmax2``,
``weight_nested_code``, ``weight_offset`` (the last three only when double-quantized), and
``lora_merged`` (a bool scalar) only while the adapter is folded into the base by
``merge_to_nf4(inplace=True)``: loading a dict restores ``merged`` from it, so the LoRA term is never
applied twice (a module loaded merged cannot ``unmerge()``: the original base is not in the dict).
``hf_base_state_dict(prefix)`` gives the base in Hugging Face 4-bit checkpoint keys instead.

NF4Linear: the frozen NF4 base alone (no adapter), what :func:`lora_ops.quantize_model` puts in place of
``nn.Linear`` and what PEFT wraps (:mod:`lora_ops.integrations.peft`). A subclass of ``nn.Linear`` as
bitsandbytes' ``Linear4bit`` is, so ``target_modules="all-linear"`` finds it; same base parameter and
``weight`` view as QLoRALinear, plus ``bias`` (a frozen Parameter) and ``compute_dtype``.

    NF4Linear(weight: NF4Weight, bias=None, compute_dtype=None)
    NF4Linear.from_linear(linear, blocksize=64, double_quant=True, compute_dtype=None)
    layer(x)   x [..., in_features] -> [..., out_features] in x's dtype, differentiable w.r.t. x
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from lora_ops import format as fmt
from lora_ops.nf4 import NF4Weight, quantize_nf4
from lora_ops.nf4_tensor import NF4Tensor
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


def check_input(who: str, x: torch.Tensor, in_features: int) -> None:
    """The module-level input rule: a floating tensor ``[..., in_features]`` (at least 1-D)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{who}: x must have at least one dimension [..., {in_features}], got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"{who}: x must be float32, float16 or bfloat16 (float64 on CPU), got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"{who}: x has {x.shape[-1]} features (last dim), the layer takes {in_features}")


class _NF4Base:
    """The frozen NF4 base as the parameter ``weight`` (an :class:`~lora_ops.nf4_tensor.NF4Tensor`, shaped
    like the dense weight, ``requires_grad=False``), shared by QLoRALinear and NF4Linear.

    One storage for every use: ``model.parameters()`` and accelerate see it, transformers' loader sets it
    (:mod:`lora_ops.integrations.transformers_quantizer`), FSDP2's ``fully_shard`` shards it by rows (a
    DTensor of NF4Tensor shards outside forward). ``state_dict`` keeps the layer's own keys ``weight_packed``,
    ``weight_absmax`` (and ``weight_absmax2``, ``weight_nested_code``, ``weight_offset`` when
    double-quantized), byte-identical to the bitsandbytes layout; the same names are attributes of the layer.
    Before transformers' loader fills it, ``weight`` may be a dense placeholder parameter (meta device)."""

    def _set_base(self, w: NF4Weight | NF4Tensor) -> None:
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{type(self).__name__}: base weight shape {tuple(w.shape)} != "
                f"({self.out_features}, {self.in_features})"
            )
        if isinstance(w, NF4Tensor):
            w = w.nf4_weight()
        w = _shared_dynamic_map(w)
        old = self._parameters.get("weight")
        if old is not None and not isinstance(old, NF4Tensor) and isinstance(_local_nf4(old), NF4Tensor):
            raise RuntimeError(f"{type(self).__name__}: the base is sharded (FSDP2); replace it before fully_shard")
        self.blocksize, self.base_dtype = w.blocksize, w.dtype
        self._parameters["weight"] = nn.Parameter(NF4Tensor.from_nf4(w), requires_grad=False)

    def _nf4_local(self) -> NF4Tensor:
        """The NF4Tensor of this process: the whole base, or this rank's rows under FSDP2 outside forward."""
        p = self._parameters.get("weight")
        local = p if isinstance(p, NF4Tensor) else _local_nf4(p)
        if isinstance(local, NF4Tensor):
            return local
        what = "no weight" if p is None else f"a dense {tuple(p.shape)} placeholder on {p.device}"
        raise RuntimeError(f"{type(self).__name__}: the NF4 base is not loaded yet ({what}); quantize or load it")

    @property
    def base_loaded(self) -> bool:
        """False while ``weight`` is still a dense placeholder (before transformers' loader quantizes it)."""
        p = self._parameters.get("weight")
        return isinstance(p if isinstance(p, NF4Tensor) else _local_nf4(p), NF4Tensor)

    def _weight_op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        """``self.weight.op_args()``: what forward passes to the ops, read from the parameter each call
        (nothing cached, so ``.to()``, ``load_state_dict``, in-place updates and a replaced base are seen)."""
        p = self._parameters.get("weight")
        return (p if isinstance(p, NF4Tensor) else self._nf4_local()).op_args()

    # The state_dict names of the base, as attributes (this rank's part when sharded): the layer's API, and
    # torch.distributed.checkpoint.state_dict resolves every state_dict key as an attribute path.
    def _get_part(name):
        def get(self):
            local = self._nf4_local()
            if name == "packed":
                return local.packed.view(-1, 1)
            return getattr(local, name)

        def set_(self, value):  # replaces one tensor of the base (e.g. to test an input check)
            local = self._nf4_local()
            if name in ("packed", "absmax"):
                setattr(local, name, value.reshape(-1) if name == "packed" else value)
                return
            nested = list(local.nested_state or (None, None, None))
            nested[("absmax2", "nested_code", "offset").index(name)] = value
            local._info["nested"] = tuple(nested)

        return property(get, set_)

    weight_packed = _get_part("packed")
    weight_absmax = _get_part("absmax")
    weight_absmax2 = _get_part("absmax2")
    weight_nested_code = _get_part("nested_code")
    weight_offset = _get_part("offset")
    del _get_part

    def hf_base_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The base weight (and bias) in Hugging Face 4-bit checkpoint keys: ``{prefix}weight``,
        ``{prefix}weight.absmax``, ``{prefix}weight.quant_state.bitsandbytes__nf4``, ..."""
        out = self._nf4_local().hf_state_dict(f"{prefix}weight")
        if self.bias is not None:
            out[f"{prefix}bias"] = self.bias
        return out

    # ---- state_dict: the base under its own keys -----------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.base_loaded:  # a dense placeholder keeps the key "weight" (what transformers' loader fills)
            return
        p = destination.pop(prefix + "weight")
        local = self._nf4_local()
        own = {"packed": local.packed.view(-1, 1), "absmax": local.absmax}
        if not isinstance(p, NF4Tensor):  # FSDP2: this rank's rows, as row shards of the bitsandbytes bytes
            from torch.distributed.tensor import DTensor, Shard

            n, k = local.full_rows, local.shape[1]
            full_shapes = {"packed": (-(-n * k // 2), 1), "absmax": (-(-n * k // local.blocksize),)}
            for name, t in own.items():
                own[name] = DTensor.from_local(t, p.device_mesh, [Shard(0)], run_check=False,
                                               shape=torch.Size(full_shapes[name]),
                                               stride=torch.empty(full_shapes[name], device="meta").stride())
        nested = dict(zip(("absmax2", "nested_code", "offset"), local.nested_state or ()))
        for name, t in {**own, **nested}.items():
            destination[prefix + f"weight_{name}"] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not self.base_loaded:  # a placeholder loads a dense "weight" as any parameter would
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        base = {k: state_dict.pop(prefix + f"weight_{k}") for k in _BASE_KEYS if prefix + f"weight_{k}" in state_dict}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            state_dict.update({prefix + f"weight_{k}": v for k, v in base.items()})
        if prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")
        if "packed" not in base:
            if strict:
                missing_keys.extend(prefix + f"weight_{k}" for k in ("packed", "absmax"))
            return
        try:
            self._load_base(base, unexpected_keys, prefix)
        except (ValueError, RuntimeError, KeyError) as e:
            error_msgs.append(f"{prefix}weight_*: {e}")

    @torch.no_grad()
    def _load_base(self, base: dict[str, torch.Tensor], unexpected_keys: list[str], prefix: str) -> None:
        """Copies the base bytes of a state dict into the parameter's storage (this rank's rows when
        sharded; a source sharded differently is gathered whole first)."""
        local = self._nf4_local()
        mine = self._parameters["weight"]
        k, bs = local.shape[1], local.blocksize
        rows = (local.row_start, local.row_start + local.shape[0])
        for name in ("packed", "absmax"):
            src = base[name]
            if _is_dtensor(src):
                if _is_dtensor(mine) and src.device_mesh == mine.device_mesh and src.placements == mine.placements:
                    getattr(local, name).copy_(src.to_local().reshape(-1))  # sharded as we are: our rows
                    continue
                src = src.full_tensor()
            src = src.reshape(-1)
            if name == "packed":
                part = src[rows[0] * k // 2 : -(-rows[1] * k // 2)]
            else:
                part = src[rows[0] * k // bs : -(-rows[1] * k // bs)]
            dst = getattr(local, name)
            if part.dtype != dst.dtype or part.numel() != dst.numel():
                raise ValueError(f"{name}: expected {dst.dtype} with {dst.numel()} elements for rows "
                                 f"{rows[0]}..{rows[1]}, got {part.dtype} with {part.numel()}")
            dst.copy_(part)
        if local.nested:
            new = []
            for name, dst in zip(("absmax2", "nested_code", "offset"), local.nested_state):
                src = base.get(name)
                if src is None:
                    raise KeyError(f"the double-quantized base needs weight_{name}")
                src = (src.full_tensor() if _is_dtensor(src) else src).reshape(dst.shape)
                if name == "nested_code":  # never written into: it may be the map other layers share
                    if src.dtype != dst.dtype:
                        raise ValueError(f"nested_code: expected {dst.dtype}, got {src.dtype}")
                    new.append(_shared_map_or(src.to(dst.device, copy=True)))
                else:
                    new.append(dst.copy_(src))
            local._info["nested"] = tuple(new)
        else:
            unexpected_keys.extend(prefix + f"weight_{n}" for n in ("absmax2", "nested_code", "offset") if n in base)


_DYNAMIC_MAPS: dict[torch.device, torch.Tensor] = {}


def _shared_map_or(code: torch.Tensor) -> torch.Tensor:
    """The one copy per device of the standard dynamic map when ``code`` equals it (1 KiB a layer otherwise,
    replicated on every FSDP2 rank), else ``code``. Nothing writes into a base's map in place."""
    if code.device.type == "meta" or code.shape != (256,) or code.dtype != torch.float32:
        return code
    std = _DYNAMIC_MAPS.get(code.device)
    if std is None:
        std = _DYNAMIC_MAPS.setdefault(code.device, fmt.dynamic_map(code.device))
    return std if std is code or torch.equal(std, code) else code


def _shared_dynamic_map(w: NF4Weight) -> NF4Weight:
    if not w.nested:
        return w
    code = _shared_map_or(w.nested_code)
    return w if code is w.nested_code else dataclasses.replace(w, nested_code=code)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def _local_nf4(p):
    """The local tensor of a DTensor parameter (FSDP2), else None."""
    return p._local_tensor if _is_dtensor(p) else None


class QLoRALinear(_NF4Base, nn.Module):
    """``y = x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ + bias`` with W frozen in NF4 and A, B trainable.

    Adapters start like PEFT's: A Kaiming-uniform (a = sqrt(5)), B zeros, so the layer starts as the
    base layer. The base weight is a frozen parameter and the bias a buffer (frozen: they move with
    ``.to()`` and appear in ``state_dict`` but never receive gradients).
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
        base = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls.from_nf4(base, r, alpha, dropout, use_rslora, bias, adapter_dtype)

    @classmethod
    def from_nf4(
        cls,
        base: NF4Weight,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: torch.Tensor | None = None,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> QLoRALinear:
        """A layer over an existing NF4 base ``[out, in]`` and an optional frozen bias, both shared (not
        copied); new adapters with PEFT's init."""
        out_f, in_f = base.shape
        layer = cls(in_f, out_f, r, alpha, dropout, False, use_rslora, base.blocksize, base.nested, base.dtype,
                    adapter_dtype, base.device)
        layer._set_base(base)
        if bias is not None:
            layer.bias = bias.detach()
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
        return cls.from_nf4(base, r, alpha, dropout, use_rslora, getattr(linear4bit, "bias", None), adapter_dtype)

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
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter under PEFT's adapter-file key names (``lora_A.weight``, ``lora_B.weight``)."""
        return {"lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.lora_dropout_p}, "
            f"blocksize={self.blocksize}, double_quant={self._nf4_local().nested}, "
            f"base_dtype={self.base_dtype}, bias={self.bias is not None}, merged={self.merged}"
        )

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in_features]`` (fp16/bf16/fp32) -> ``[..., out_features]`` in x's dtype.

        Dropout masks follow torch's default CPU generator (``torch.manual_seed``), identically in eager
        mode and under ``torch.compile`` (see :func:`lora_ops.ops.qlora.draw_dropout_rng`)."""
        check_input("QLoRALinear", x, self.in_features)
        bias = self.bias
        if self.merged:  # the adapter is folded into the base: base-only fused matmul
            if bias is not None and bias.dtype not in (x.dtype, torch.float32):
                bias = bias.to(x.dtype)
            return qlora_ops.qlora_matmul_args(x, *self._weight_op_args(), bias=bias)
        p = self.lora_dropout_p if self.training else 0.0
        w, w_meta = self._weight_op_args()
        return qlora_ops.qlora_linear_args(x, w, w_meta, self.lora_A.weight, self.lora_B.weight, self.scaling, bias, p)

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
        base = self._nf4_local().nf4_weight()
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


# ---- the base alone -------------------------------------------------------------------------------------
class _NF4MatmulFn(torch.autograd.Function):
    """``x·Wᵀ (+ frozen bias)`` with the gradient for x only (``dx = dy·W``, the fused transposed
    matmul): a frozen NF4 layer must pass gradients through to the adapters before it. The weight comes
    as the ops take it (``w_meta``, then the tensors of ``w``)."""

    @staticmethod
    def forward(ctx, x, bias, w_meta, *w):
        ctx.save_for_backward(*w)
        ctx.w_meta, ctx.x_dtype = w_meta, x.dtype
        return qlora_ops.qlora_matmul_args(x, list(w), w_meta, bias=bias)

    @staticmethod
    def backward(ctx, dy):
        w = list(ctx.saved_tensors)
        if not ctx.needs_input_grad[0]:
            return (None,) * (3 + len(w))
        dx = qlora_ops.qlora_matmul_args(dy.to(ctx.x_dtype), w, ctx.w_meta, transpose_w=True)
        return (dx,) + (None,) * (2 + len(w))


def compute_dtype_for(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """bitsandbytes' rule for a 4-bit layer: the autocast dtype under ``torch.autocast``, else the
    layer's ``compute_dtype``, else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return compute_dtype or x.dtype


class NF4Linear(_NF4Base, nn.Linear):
    """A frozen NF4 linear layer ``y = x·Wᵀ + bias`` (see the module docstring).

    ``compute_dtype`` (bitsandbytes' ``bnb_4bit_compute_dtype``): x is cast to it for the matmul and
    the output cast back to x's dtype; None computes in x's dtype. ``bias`` is a Parameter that starts
    frozen (``requires_grad=False``); made trainable, it gets its gradient (added outside the op)."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no dense weight to allocate
        if not isinstance(weight, (NF4Weight, NF4Tensor)):
            raise TypeError(f"NF4Linear: weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self._set_base(weight)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"NF4Linear: bias must be [{self.out_features}], got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantizes ``linear.weight`` (its dtype becomes the base dtype); the bias is kept as is."""
        w = linear.weight.detach()
        return cls(quantize_nf4(w, blocksize, double_quant), linear.bias, compute_dtype)

    @classmethod
    def unloaded(cls, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 compute_dtype: torch.dtype | None = None, device: torch.device | str = "meta") -> NF4Linear:
        """A layer whose ``weight`` (and ``bias``) are dense placeholders on ``device`` (no memory on
        "meta") until the NF4 base is set (:meth:`set_weight`, or transformers' loader through
        :mod:`lora_ops.integrations.transformers_quantizer`); forward refuses to run until then."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = out_features, in_features
        self.compute_dtype = compute_dtype
        self.blocksize, self.base_dtype = None, dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        return self

    def reset_parameters(self) -> None:  # nn.Linear's would re-draw a dense weight; the base is data
        pass

    def set_weight(self, weight: NF4Weight) -> None:
        """Replaces the base (same shape), e.g. with a merged and re-quantized weight."""
        self._set_base(weight)

    def extra_repr(self) -> str:
        base = (f"blocksize={self.blocksize}, double_quant={self._nf4_local().nested}" if self.base_loaded
                else "base=not loaded")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{base}, base_dtype={self.base_dtype}, compute_dtype={self.compute_dtype}"
        )

    def _call_inputs(self, x: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """x checked and cast to the compute dtype, the bias the op fuses (None when absent or trainable:
        a trainable bias is added outside the op to get its gradient), and whether it is trainable. Also
        used by PEFT's LoraOpsLinear over this layer."""
        check_input(who, x, self.in_features)
        xc = x.to(compute_dtype_for(x, self.compute_dtype))
        bias = self.bias
        trainable_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        return xc, None if bias is None or trainable_bias else bias_for(bias, xc), trainable_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in_features]`` -> ``[..., out_features]`` in x's dtype."""
        xc, fused_bias, trainable_bias = self._call_inputs(x, "NF4Linear")
        bias = self.bias
        w, w_meta = self._weight_op_args()
        y = _NF4MatmulFn.apply(xc, fused_bias, w_meta, *w)
        if trainable_bias:
            y = y + bias.to(y.dtype)
        return y.to(x.dtype)


def bias_for(bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fused ops take a bias in x's dtype or float32: anything else is cast to x's dtype."""
    return bias if bias.dtype in (x.dtype, torch.float32) else bias.to(x.dtype)
