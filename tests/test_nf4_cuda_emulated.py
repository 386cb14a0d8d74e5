"""The CUDA NF4 kernels' SOURCE, run on the CPU: tests/cuda_emu/ emulates the CUDA execution model
(a std::thread per CUDA thread, barriers for __syncthreads / warp shuffles) and compares every byte
the quantize, double-quantize and dequantize kernels write with the CPU kernels, over all
blocksizes and dtypes, aligned and misaligned pointers, sizes around the kernels' tile/segment
boundaries and several grid-stride passes. This checks indexing, tails and reductions where no GPU
exists; it does not check device intrinsics, the real memory model or speed (the GPU suite does)."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cuda_include_dir():
    spec = importlib.util.spec_from_file_location("nvcc_check", ROOT / "scripts" / "nvcc_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("nvcc_check", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.cuda_include_dir("nvcc") if shutil.which("nvcc") else None


def test_cuda_kernels_emulated_match_cpu_kernels(tmp_path):
    cxx = shutil.which("g++")
    inc = _cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (nvcc)")
    # Kernel launches `k<<<grid, block, smem, stream>>>(args)` become emulated launches.
    (tmp_path / "cuda").mkdir()
    for f in (ROOT / "csrc" / "kernels" / "cuda").iterdir():
        src = re.sub(r"(\w+(?:<[^<>;]*>)?)<<<(.+?)>>>", r"::lora_emu::make_launch(\1, \2)", f.read_text())
        (tmp_path / "cuda" / f.name).write_text(src)
    exe = tmp_path / "emu_nf4_check"
    build = subprocess.run(
        [cxx, "-std=c++20", "-O2", "-pthread", "-w", f"-I{tmp_path}", f"-I{ROOT / 'tests' / 'cuda_emu'}",
         f"-I{ROOT / 'csrc' / 'kernels'}", "-isystem", str(inc), str(ROOT / "tests" / "cuda_emu" / "emu_nf4_check.cpp"),
         str(ROOT / "csrc" / "kernels" / "cpu" / "nf4_cpu.cpp"), "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(run.stdout[-3000:])
    assert run.returncode == 0 and re.search(r"\d+ checks, 0 failures", run.stdout), run.stdout[-3000:]
