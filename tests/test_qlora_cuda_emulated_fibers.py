"""The fused QLoRA CUDA kernels' SOURCE, run on the CPU and compared with the CPU kernels.

tests/cuda_emu/emu_fiber_runtime.h emulates the CUDA execution model on one OS thread (a fiber per
CUDA thread; __syncthreads, warp shuffles, and the kernels' inline PTX: mma.sync m16n8k16 f16/bf16,
ldmatrix(.trans), cp.async with deferred completion). tests/cuda_emu/emu_qlora_fiber_check.cpp runs the
decode kernel (M <= 16, split-K), the transposed decode kernel (dx), the FFMA fallback with its split-K
finish, the tensor-core kernel (fast and scalar paths, both orientations), lora_down, lora_outer and
the dropout mask over odd shapes (and fp32 with 4096-long reductions: group "long"), dtypes, nested / plain absmax, adapters in fp32 / x's dtype, bias,
dropout, strided and misaligned operands, and checks:
  - error vs a float64 reference <= 2 x the CPU kernel's error + output rounding (architecture.md s4),
  - exact dequantized weight values (one-hot activations) and exact dropout-mask bytes,
  - no write outside the outputs, the decode path's support predicate,
  - the slab path's window decode bit for bit (fp32 and 16-bit windows: group "window") and the CUDA
    dispatcher's table (which path each M / dtype / form takes: group "dispatch").
Each group runs under two schedule policies (warps in lockstep; one warp running ahead between
barriers), so a missing __syncthreads or a shared-memory race changes the output.
It checks indexing, tails, fragment layouts, barriers and reductions where no GPU exists; it does not
check timing, the real memory model or device intrinsics (host versions run): the GPU suite does.
"""

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

GROUPS = ["mask", "edge", "lora", "decode", "decode_t", "ffma", "long", "mma", "tc_decode", "window", "dispatch"]
# 0: round-robin (warps in lockstep); 2: priority, the LAST warp runs ahead to its next barrier.
POLICIES = [0, 2]


@pytest.fixture(scope="module")
def emu_binary(tmp_path_factory):
    if shutil.which("g++") is None or build_emu.cuda_include_dir() is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (nvcc) to build the CUDA emulation")
    return build_emu.build_qlora_check(tmp_path_factory.mktemp("emu_qlora"))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("group", GROUPS)
def test_qlora_cuda_kernels_emulated_match_cpu(emu_binary, group, policy, rng):
    seed = int(rng.initial_seed()) % (2**31 - 1) + 1  # fresh per run (conftest), printed on failure
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([str(emu_binary), group, str(seed), str(policy)], capture_output=True, text=True,
                         timeout=300, env=env)
    out = run.stdout[-4000:] + run.stderr[-2000:]
    print(f"seed {seed}\n{out}")
    m = re.search(r"(\d+) checks, 0 failures", run.stdout)
    assert run.returncode == 0 and m is not None and int(m.group(1)) > 0, f"seed {seed}:\n{out}"


def test_asm_rewrite_keeps_operand_order():
    """The inline-asm rewrite: outputs first (written back), then inputs, template text kept."""
    src = ('asm volatile("mma {%0, %1}, {%2}, {%3};\\n" : "+f"(d[0]), "=r"(x) : "r"(a ? 1 : 0), "l"(p));')
    got = build_emu.rewrite_cuda_source(src)
    assert got == ('::lora_emu::ptx("mma {%0, %1}, {%2}, {%3};\\n", {::lora_emu::Out(d[0]), ::lora_emu::Out(x), '
                   '::lora_emu::In(a ? 1 : 0), ::lora_emu::In(p)});')
    launch = build_emu.rewrite_cuda_source("k<A, B<C>, D>\n      <<<grid, 256, 0, s>>>(x, y);")
    assert launch == "::lora_emu::make_launch(k<A, B<C>, D>, grid, 256, 0, s)(x, y);"


@pytest.mark.skipif(os.environ.get("LORA_OPS_EMU_ASAN") != "1",
                    reason="AddressSanitizer run of the emulation is opt-in (LORA_OPS_EMU_ASAN=1; ~2 min here)")
def test_qlora_cuda_kernels_emulated_under_asan(tmp_path):
    """Every group once under AddressSanitizer: operands are poisoned around their bytes, so a kernel
    reading or writing past any input, weight, workspace or output aborts with a report."""
    if shutil.which("g++") is None or build_emu.cuda_include_dir() is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (nvcc) to build the CUDA emulation")
    exe = build_emu.build_qlora_check(tmp_path, extra_flags=("-fsanitize=address", "-fno-omit-frame-pointer"))
    env = dict(os.environ, OMP_NUM_THREADS="1", ASAN_OPTIONS="detect_leaks=0")
    run = subprocess.run([str(exe), "all", "4321", "0"], capture_output=True, text=True, timeout=900, env=env)
    out = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0 and re.search(r"\d+ checks, 0 failures", run.stdout), out
