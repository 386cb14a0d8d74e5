"""python -m lora_ops env: names the machine and the code paths it runs, so numbers can be traced."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _env(extra: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, **(extra or {}))
    out = subprocess.run([sys.executable, "-m", "lora_ops", "env", "--json"], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out)


def test_env_reports_cpu_and_kernel_paths():
    info = _env()
    assert info["cpu"] and isinstance(info["cpu_simd_flags"], list)
    # The highest level whose extensions the CPU has (/proc/cpuinfo's names) is chosen.
    flags = set(info["cpu_simd_flags"])
    expect = "portable"
    if {"avx2", "fma", "f16c"} <= flags:
        expect = "avx2"
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            expect = "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    assert info["lora_ops_cpu_kernels"] == info["lora_ops_cpu_tier_supported"] == expect
    families = dict(f.split("=", 1) for f in info["lora_ops_cpu_kernel_families"])
    assert {"dequantize", "row_dot_bf16", "row_dot_fp32", "gemm_tile"} <= set(families)
    assert families["row_dot_bf16"] == ("avx512_bf16" if expect == "avx512_bf16" else
                                        "avx512(vpermps)" if expect == "avx512" else expect)
    assert families["dequantize"] == ("avx512" if expect.startswith("avx512") else expect)
    assert info["torch_cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "NO AVX", "ZVECTOR", "SVE256", "VSX")
    if info["bitsandbytes"] is not None:
        assert info["bnb_cpu_repack_path"] in (True, False)
        if "avx512_bf16" not in info["cpu_simd_flags"]:
            assert info["bnb_cpu_repack_path"] is False


def test_env_names_the_forced_portable_path():
    assert _env({"LORA_OPS_NO_AVX2": "1"})["lora_ops_cpu_kernels"] == "portable"


def test_env_names_the_avx512_cap():
    info = _env({"LORA_OPS_NO_AVX512": "1"})
    expect = "avx2" if {"avx2", "fma", "f16c"} <= set(info["cpu_simd_flags"]) else "portable"
    assert info["lora_ops_cpu_kernels"] == expect


def test_env_names_the_avx512_bf16_cap():
    # Without AVX512_BF16 the AVX-512 tier keeps every AVX-512 kernel but the vdpbf16ps row-dot.
    info = _env({"LORA_OPS_NO_AVX512_BF16": "1"})
    flags = set(info["cpu_simd_flags"])
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert info["lora_ops_cpu_kernels"] == "avx512"
        families = dict(f.split("=", 1) for f in info["lora_ops_cpu_kernel_families"])
        assert families["row_dot_bf16"] == "avx512(vpermps)" and families["gemm_tile"] == "avx512"
    else:
        assert info["lora_ops_cpu_kernels"] in ("avx2", "portable")


def test_env_names_the_allocator_and_its_tuning(monkeypatch):
    # CPU timings of large tensors depend on the C allocator (fresh mappings fault in on first touch).
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    base = _env({"LD_PRELOAD": ""})["malloc"]
    assert base.startswith("glibc malloc") or any(lib in base for lib in ("tcmalloc", "jemalloc", "mimalloc"))
    if base.startswith("glibc malloc"):
        assert base == "glibc malloc"
        tuned = _env({"LD_PRELOAD": "", "MALLOC_MMAP_MAX_": "0", "MALLOC_ARENA_MAX": "2"})["malloc"]
        assert tuned == "glibc malloc (MALLOC_ARENA_MAX=2, MALLOC_MMAP_MAX_=0)"
