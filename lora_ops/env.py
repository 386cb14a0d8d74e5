"""``python -m lora_ops env``: what this machine is and which code paths run on it, so that any number
can be traced to its machine: the CPU model and its SIMD features, the CPU kernel path lora_ops chose
at load time, torch's own CPU capability (oneDNN/ATen kernels), and whether bitsandbytes (a test and
benchmark baseline only) takes its AVX-512 paths, including the inference path that repacks 4-bit
weights with bf16-rounded absmax (see :mod:`lora_ops.bnb_cpu_layout`)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

_SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
               "avx512_fp16", "amx_bf16")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo()[0]


def _command_output(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def git_commit(path: Path | str) -> str | None:
    """The commit checked out at ``path`` (``+dirty`` with uncommitted changes to tracked files), or None
    outside a git checkout."""
    commit = _command_output(["git", "rev-parse", "HEAD"], Path(path))
    if commit is None:
        return None
    dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"], Path(path))
    return commit + ("+dirty" if dirty else "")


def gpu_driver() -> str | None:
    """The NVIDIA driver version (``nvidia-smi``), or None."""
    out = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0] if out else None


# Preloadable malloc replacements (LD_PRELOAD) by the file names their libraries carry.
_MALLOC_LIBRARIES = ("tcmalloc", "jemalloc", "mimalloc", "hoard", "snmalloc")


def malloc_library() -> str:
    """The C allocator serving this process: a malloc replacement found mapped in it (``/proc/self/maps``:
    tcmalloc, jemalloc, ...), else ``glibc malloc`` plus any ``MALLOC_*`` tuning in the environment.

    CPU timings of large tensors depend on it: glibc maps every allocation over its mmap threshold fresh,
    so each new multi-MiB tensor is faulted in a page at a time on first touch, while caching allocators
    hand back memory already mapped (bench/notes_qlora_cpu.md measures what this does to the baselines)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1] if "/" in line else ""
        if any(lib in name for lib in _MALLOC_LIBRARIES):
            return name
    tuning = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    return "glibc malloc" + (f" ({', '.join(tuning)})" if tuning else "")


def _bitsandbytes() -> dict:
    try:
        import bitsandbytes
        from bitsandbytes.functional import has_avx512bf16
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return {"bitsandbytes": None, "why": f"{type(e).__name__}: {e}"}
    return {
        "bitsandbytes": bitsandbytes.__version__,
        # Linear4bit.forward in eval mode without grad repacks weights (bf16 absmax) when this is true.
        "bnb_cpu_repack_path": bool(has_avx512bf16()),
        # Its CPU dequantize/quantize kernels take their AVX-512 branches when torch reports AVX512.
        "bnb_cpu_avx512_kernels": torch.backends.cpu.get_cpu_capability() == "AVX512",
    }


def describe() -> dict:
    """The machine and code-path facts as a dict (also used as the benchmark report header)."""
    from lora_ops import _native

    model, flags = _cpuinfo()
    info = {
        "cpu": model,
        "cpu_simd_flags": [f for f in _SIMD_FLAGS if f in flags],
        "cpu_threads": torch.get_num_threads(),
        "malloc": malloc_library(),
        "lora_ops_cpu_kernels": _native.CPU_SIMD,
        "lora_ops_cpu_tier_supported": _native.CPU_SIMD_SUPPORTED,
        "lora_ops_cpu_kernel_families": [f"{k}={v}" for k, v in _native.CPU_KERNELS.items()],
        # the CPU path of a 4096x4096 bf16 layer's forward at a decode, a mid and a training-size M
        "lora_ops_cpu_paths_4096_bf16": {m: _native.cpu_matmul_path(m, 4096, 4096, "bfloat16") for m in (1, 64, 2048)},
        "lora_ops_with_cuda": bool(_native.WITH_CUDA),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    info.update(_bitsandbytes())
    return info


def run(argv: list[str] | None = None) -> dict:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m lora_ops env", description=(
        "Print this machine's CPU model and SIMD flags, the CPU kernel path lora_ops chose, torch's CPU "
        "capability and bitsandbytes' CPU paths, so any number can be traced to its machine."))
    p.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    args = p.parse_args(argv)
    info = describe()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {', '.join(v) if isinstance(v, list) else v}")
    return info
