"""The per-row multi-adapter LoRA CUDA kernels' SOURCE (csrc/kernels/cuda/multi_lora.cu) run on the CPU under
the CUDA emulation (tests/cuda_emu/emu_fiber_runtime.h) against a float64 reference:
tests/cuda_emu/emu_multi_lora_check.cpp says what is checked. Two schedule policies (warps in lockstep;
the last warp running ahead). Not a GPU run: timing, the memory model and device intrinsics are the GPU
suite's."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cuda_emu"))
import build_emu  # noqa: E402


@pytest.fixture(scope="module")
def emu_binary(tmp_path_factory):
    if shutil.which("g++") is None or build_emu.cuda_include_dir() is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (nvcc) to build the CUDA emulation")
    return build_emu.build_multi_lora_check(tmp_path_factory.mktemp("emu_multi_lora"))


@pytest.mark.parametrize("policy", [0, 2])
def test_multi_lora_cuda_kernels_emulated_match_float64(emu_binary, policy, rng):
    seed = int(rng.initial_seed()) % (2**31 - 1) + 1
    run = subprocess.run([str(emu_binary), str(seed), str(policy)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = run.stdout[-4000:] + run.stderr[-2000:]
    m = re.search(r"(\d+) checks, 0 failures", run.stdout)
    assert run.returncode == 0 and m is not None and int(m.group(1)) > 0, f"seed {seed}:\n{out}"
