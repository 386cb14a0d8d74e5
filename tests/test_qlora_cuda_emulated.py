"""The CUDA QLoRA kernels' SOURCE, run on the CPU under tests/cuda_emu/ (a std::thread per CUDA thread,
barriers for __syncthreads / warp shuffles) and compared with the CPU kernels:
  - emu_qlora_check.cpp: the decode kernels (forward and transposed, split-K), the FFMA fallback, the
    split-K finishing kernel, lora_down / lora_outer (split reductions) and the dropout mask;
  - emu_qlora_mma_check.cpp: the tensor-core kernel, its PTX (cp.async, ldmatrix, mma.m16n8k16)
    replaced by host models of the PTX ISA's fragment layouts (emu_mma_ptx.h).
This checks indexing, swizzles, fragment bookkeeping, tails, pipelining slots and reductions where no
GPU exists; it cannot check the hardware's reading of the PTX, device intrinsics, the real memory
model or speed."""

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


@pytest.mark.parametrize("harness", ["emu_qlora_check", "emu_qlora_mma_check"])
def test_qlora_cuda_kernels_emulated_match_cpu_kernels(tmp_path, harness):
    cxx = shutil.which("g++")
    inc = _cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (nvcc)")
    # Kernel launches `k<<<grid, block, smem, stream>>>(args)` become emulated launches.
    (tmp_path / "cuda").mkdir()
    for f in (ROOT / "csrc" / "kernels" / "cuda").iterdir():
        src = re.sub(r"(\w+(?:<[^<>;]*>)?)<<<(.+?)>>>", r"::lora_emu::make_launch(\1, \2)", f.read_text())
        (tmp_path / "cuda" / f.name).write_text(src)
    exe = tmp_path / harness
    build = subprocess.run(
        [cxx, "-std=c++20", "-O2", "-pthread", "-fopenmp", "-ffp-contract=off", "-w", f"-I{tmp_path}",
         f"-I{ROOT / 'tests' / 'cuda_emu'}", f"-I{ROOT / 'csrc' / 'kernels'}", "-isystem", str(inc),
         str(ROOT / "tests" / "cuda_emu" / f"{harness}.cpp"), str(ROOT / "csrc" / "kernels" / "cpu" / "qlora_cpu.cpp"),
         str(ROOT / "csrc" / "kernels" / "cpu" / "nf4_cpu.cpp"), "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900, env={"OMP_NUM_THREADS": "1"})
    print(run.stdout[-3000:])
    assert run.returncode == 0 and re.search(r"\d+ checks, 0 failures", run.stdout), run.stdout[-3000:]
