"""Loads the compiled extension; importing it registers every torch.ops.lora_ops op."""

from __future__ import annotations

try:
    from lora_ops import _C  # noqa: F401  (import for its side effect: op registration)
except ImportError as e:  # pragma: no cover - only reached on a broken install
    raise ImportError(
        "lora_ops: the compiled extension lora_ops._C is missing. Build it with "
        "`pip install --no-build-isolation .` (or scripts/dev_build.sh for an in-tree build)."
    ) from e

WITH_CUDA: bool = bool(_C.WITH_CUDA)
CPU_SIMD: str = _C.CPU_SIMD  # "avx2" or "portable": the CPU kernels chosen at load time
