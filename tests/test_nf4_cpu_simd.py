"""The CPU dequantize kernels chosen at load (AVX-512: vpermw / vpermps lookups of indices built in output
order; AVX2: pshufb / vpermps lookups in per-block tables; portable: scalar tables) write the same bits.
LORA_OPS_NO_AVX512_BF16=1 caps a process at AVX-512 without BF16, LORA_OPS_NO_AVX512=1 at AVX2,
LORA_OPS_NO_AVX2=1 forces the portable kernels (tests/cpu_tiers.py); those runs
happen in fresh processes because the choice is made once at library load. A machine without a level
runs the next lower one (the comparison is then between equal levels); the bits of this process's run
against the spec's decode are checked in test_nf4_ops.py."""

import pytest
import torch
from cpu_tiers import lower_tiers, tier_params
from qlora_utils import run_script_in_fresh_process

import lora_ops

# (numel, blocksize, double quant, value scale): partial last blocks, 16-byte loop tails, fp16 subnormal
# (1e-6) and overflowing (1e5) products, fp32 / bf16 subnormal ones (1e-39), every output dtype below.
CASES = [(4096 + 48, 64, True, 1.0), (3000 + 6, 32, False, 1e-6), (8192 + 130, 128, True, 1e5),
         (2 * 4096 + 2, 4096, False, 0.05), (1000, 2048, True, 3.0), (2048 + 34, 64, False, 1e-39)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SCRIPT = r"""
import sys, torch
sys.path.insert(0, 'tests')
import test_nf4_cpu_simd as t
torch.save(t.dequantized(int(sys.argv[2])), sys.argv[1])
"""


def dequantized(seed: int) -> list[torch.Tensor]:
    out = []
    for i, (n, bs, dq, scale) in enumerate(CASES):
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * scale
        # A rounding tie: block 0's largest value decodes (code 1.0, plain absmax) to exactly 1 + 3·2^-8,
        # halfway between two bf16 values; nearest-even rounds it up.
        x[:bs] = x[:bs].clamp(-1.0, 1.0)
        x[0] = 1.0 + 3 * 2.0**-8
        w = lora_ops.quantize_nf4(x, blocksize=bs, double_quant=dq)
        out += [w.dequantize(dt) for dt in DTYPES]
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("level_env", tier_params(lower_tiers()))
def test_lower_simd_levels_and_this_one_dequantize_bit_identically(level_env, tmp_path):
    seed = int(torch.randint(0, 2**30, (1,)).item())  # fresh inputs each run
    path = str(tmp_path / "lower.pt")
    run_script_in_fresh_process(_SCRIPT, [path, str(seed)], level_env, timeout=120)
    lower = torch.load(path)
    here = dequantized(seed)
    assert len(lower) == len(here) == len(CASES) * len(DTYPES)
    for i, (a, b) in enumerate(zip(lower, here)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b)), f"case {CASES[i // len(DTYPES)]}, {b.dtype}, seed {seed}"
    assert any(bool(torch.isinf(t).any()) for t in here if t.dtype == torch.float16)  # overflow exercised
    tiny = torch.finfo(torch.float32).tiny
    assert any(bool(((t != 0) & (t.abs() < tiny)).any()) for t in here if t.dtype == torch.bfloat16)  # subnormals
