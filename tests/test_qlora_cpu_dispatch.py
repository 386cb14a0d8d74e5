"""The CPU crossover table (csrc/kernels/cpu/qlora_cpu_path.h) as qlora_matmul reads it, through
lora_ops._native.cpu_matmul_path (the same table object and choose_matmul_path the op calls): the
paths per SIMD level, the slab path's work threshold on the AVX-512 table (a slab call's fixed cost
loses to the kGemm tile on small layers), and the environment overrides (read at load: fresh processes)."""

import pytest
from cpu_tiers import TIER_ENV, lower_tiers, runnable
from qlora_utils import run_script_in_fresh_process

from lora_ops import _native

SIMD = _native.CPU_SIMD


def path(m, n, k, dtype="bfloat16", dx=False, blocksize=64):
    return _native.cpu_matmul_path(m, n, k, dtype, dx, blocksize)


@pytest.mark.parametrize("dx", [False, True])
def test_small_m_paths(dx):
    if SIMD == "portable":
        assert path(1, 4096, 4096, dx=dx) == ("axpy" if dx else "row_dot")
        return
    assert path(1, 4096, 4096, dx=dx) == ("axpy" if dx else "row_dot_fused")
    assert path(16, 4096, 4096, dx=dx) == ("axpy" if dx else "row_dot_fused")
    assert path(4, 4096, 4096, "float32", dx=dx) == ("axpy" if dx else "row_dot_fused")
    assert path(3, 4096, 4100, "float32", dx=dx) == ("axpy" if dx else "row_dot")  # K not whole blocks
    assert path(3, 8, 8, "float64", dx=dx) == "float64"


@pytest.mark.parametrize("dx", [False, True])
def test_slab_path_by_layer_size(dx):
    big, small = path(17, 1024, 1024, dx=dx), path(64, 128, 320, dx=dx)  # M·N·K = 17 Mi and 2.5 Mi
    if SIMD == "avx512_bf16":  # bf16 takes oneDNN's bf16 GEMM from M = 17 on layers of >= 2^24 multiply-adds
        assert (big, small) == ("slab", "gemm")
        assert path(2048, 4096, 4096, dx=dx) == "slab"
        assert path(16384, 32, 32, dx=dx) == "slab"  # 2^24 exactly
        assert path(16383, 32, 32, dx=dx) == "gemm"
    elif SIMD == "avx512":  # no native bf16 GEMM: every dtype takes the fp32 sgemm from M = 128
        assert (big, small) == ("gemm", "gemm")
        for dtype in ("bfloat16", "float32", "float16"):
            assert path(128, 4096, 4096, dtype, dx=dx) == "slab"
            assert path(127, 4096, 4096, dtype, dx=dx) == "gemm"
        return
    else:  # AVX2 / portable table: the slab path is off
        assert (big, small) == ("gemm", "gemm")
        assert path(2048, 4096, 4096, dx=dx) == "gemm"
    for dtype in ("float32", "float16"):  # the fp32 GEMM kind lost to the tile on the Zen 1 and Zen 4 tables
        assert path(2048, 4096, 4096, dtype, dx=dx) == "gemm"


_PATHS_AT_TIER = r"""
import sys
sys.path.insert(0, "tests")
import pytest, lora_ops._native as n, test_qlora_cpu_dispatch as t
t.SIMD = n.CPU_SIMD
for dx in (False, True):
    t.test_small_m_paths(dx)
    t.test_slab_path_by_layer_size(dx)
print(n.CPU_SIMD)
"""


@pytest.mark.parametrize("tier", lower_tiers())
def test_tables_of_the_lower_tiers(tier, tmp_path):
    # Each tier's crossover table, read in a process forced to that tier (tests/cpu_tiers.py).
    if not runnable(tier):
        pytest.skip(f"this CPU cannot run the {tier} tier")
    run_script_in_fresh_process(_PATHS_AT_TIER, [], TIER_ENV[tier], timeout=60)


_OVERRIDDEN = r"""
import sys
from lora_ops import _native
small = _native.cpu_matmul_path(64, 128, 320, "bfloat16", False, 64)
fp32_dx = _native.cpu_matmul_path(2048, 4096, 4096, "float32", True, 64)
open(sys.argv[1], "w").write(small + " " + fp32_dx)
"""


@pytest.mark.parametrize("value,expected", [("1", "slab slab"), (str(2**62), "gemm gemm")])
def test_slab_override_applies_at_every_size(value, expected, tmp_path):
    out = tmp_path / "paths.txt"
    run_script_in_fresh_process(_OVERRIDDEN, [str(out)], {"LORA_OPS_SLAB_MIN_M": value}, timeout=60)
    assert out.read_text() == expected
