"""The CPU GEMM path (kGemm: decoded W panels through a register tile; csrc/kernels/cpu/qlora_cpu.cpp) has
a 6x16 AVX2 tile and a 12x16 AVX-512 one (gemm_ukernel_avx512.cpp) that do, per output element, the same
fused multiply-adds in the same order: forward and dx must be bit-identical between a process capped at
AVX2 (LORA_OPS_NO_AVX512=1, read at load) and one that is not. Without AVX-512 both runs are AVX2 (the test
then only checks that the cap changes nothing); their accuracy is checked in test_qlora_ops.py."""

import torch
from qlora_utils import make_problem, run_script_in_fresh_process

from lora_ops.ops import qlora as qlora_ops

# (M, N, K, dtype, rank): row counts that leave partial tiles of 6 and of 12, one and several output
# panels, K over one 256-column reduction block, the LoRA term folded into the reduction.
CASES = [(37, 70, 300, torch.float32, 8), (100, 200, 96, torch.float16, 16), (23, 40, 520, torch.bfloat16, 4)]

_SCRIPT = r"""
import sys, torch
sys.path.insert(0, 'tests')
import test_qlora_cpu_gemm_tiles as t
torch.save(t.outputs(int(sys.argv[2])), sys.argv[1])
"""


def outputs(seed: int) -> list[torch.Tensor]:
    out = []
    for i, (m, n, k, dtype, r) in enumerate(CASES):
        wq, x, A, B, _ = make_problem((m,), n, k, r, dtype, "cpu", seed=seed + i)
        s = torch.randn(m, r, generator=torch.Generator().manual_seed(seed + i))
        out.append(qlora_ops.qlora_matmul(x, wq, False, s, B, 0.75))  # forward, LoRA folded
        dy = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 7 * i)).to(dtype)
        out.append(qlora_ops.qlora_matmul(dy, wq, True, s, A.t(), 0.75))  # dx
    return out


def test_avx2_and_avx512_tiles_write_the_same_bits(tmp_path):
    seed = int(torch.randint(0, 2**30, (1,)).item())  # fresh inputs each run
    # Both sides in fresh processes with LORA_OPS_SLAB_MIN_M pinning every M to the tile path (the
    # AVX-512 table sends bf16 from M = 17 to the slab path), one of them capped at AVX2.
    pin = {"LORA_OPS_SLAB_MIN_M": str(2**62)}
    paths = [str(tmp_path / "avx2.pt"), str(tmp_path / "here.pt")]
    for path, env in zip(paths, (dict(pin, LORA_OPS_NO_AVX512="1"), pin)):
        run_script_in_fresh_process(_SCRIPT, [path, str(seed)], env, timeout=120)
    avx2, here = (torch.load(p) for p in paths)
    assert len(avx2) == len(here) == 2 * len(CASES)
    for i, (a, b) in enumerate(zip(avx2, here)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert not torch.isnan(b).any()
        assert torch.equal(a, b), f"case {CASES[i // 2]}, {'dx' if i % 2 else 'forward'}, seed {seed}"
