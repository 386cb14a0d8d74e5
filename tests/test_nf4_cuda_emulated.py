"""The CUDA NF4 kernels' SOURCE, run on the CPU: tests/cuda_emu/ emulates the CUDA execution model
(tests/cuda_emu/emu_fiber_runtime.h: a fiber per CUDA thread, barriers for __syncthreads / warp
shuffles; the runtime the QLoRA emulation uses too) and compares every byte
the quantize, double-quantize and dequantize kernels write with the CPU kernels, over all
blocksizes and dtypes, aligned and misaligned pointers, sizes around the kernels' tile/segment
boundaries and several grid-stride passes. This checks indexing, tails and reductions where no GPU
exists; it does not check device intrinsics, the real memory model or speed (the GPU suite does)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cuda_emu"))
import build_emu


def test_cuda_kernels_emulated_match_cpu_kernels(tmp_path, rng):
    if shutil.which("g++") is None or build_emu.cuda_include_dir() is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (nvcc)")
    exe = build_emu.build_nf4_check(tmp_path)
    seed = int(rng.initial_seed()) % (2**31 - 1) + 1  # fresh per run (conftest), printed on failure
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([str(exe), str(seed)], capture_output=True, text=True, timeout=600, env=env)
    out = run.stdout[-3000:] + run.stderr[-2000:]
    print(f"seed {seed}\n{out}")
    m = re.search(r"(\d+) checks, 0 failures", run.stdout)
    assert run.returncode == 0 and m is not None and int(m.group(1)) > 0, f"seed {seed}:\n{out}"
