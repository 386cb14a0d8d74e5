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
# The CPU kernels' SIMD tier chosen at load time: "avx512_bf16", "avx512", "avx2" or "portable" (capped by
# LORA_OPS_NO_AVX512_BF16 / LORA_OPS_NO_AVX512 / LORA_OPS_NO_AVX2), the highest tier this CPU could run, and
# each kernel family's choice at the tier in use ("family=tier ...").
CPU_SIMD: str = _C.CPU_SIMD
CPU_SIMD_SUPPORTED: str = _C.CPU_SIMD_SUPPORTED
CPU_KERNELS: dict[str, str] = dict(item.split("=", 1) for item in _C.CPU_KERNELS.split())
CPU_TIERS: tuple[str, ...] = ("portable", "avx2", "avx512", "avx512_bf16")  # lowest first


def cpu_matmul_path(m: int, n: int, k: int, dtype: str, transpose_w: bool = False, blocksize: int = 64) -> str:
    """The CPU kernel path a qlora_matmul call of these sizes takes (``row_dot``, ``row_dot_fused``, ``axpy``,
    ``gemm``, ``slab`` or ``float64``), from the crossover table in use; ``dtype``: x's dtype name
    (``"bfloat16"``...), ``transpose_w``: the dx form."""
    return _C.cpu_matmul_path(m, n, k, dtype, transpose_w, blocksize)
