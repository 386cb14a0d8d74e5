"""Shared helpers of the QLoRA linear tests: devices, random problems, the error rule."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lora_ops
from lora_ops import reference
from lora_ops.nf4 import quantize_nf4

HAS_CUDA = torch.cuda.is_available() and lora_ops.WITH_CUDA
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU build and a GPU")),
]

# Rounding atol relative to the output magnitude, and mean-relative-error bounds, per dtype.
ATOL = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float64: 1e-12}
MEAN_REL = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float64: 1e-12}


def make_problem(
    m_shape,
    n,
    k,
    r,
    dtype,
    device,
    adapter_dtype=torch.float32,
    blocksize=64,
    double_quant=True,
    bias=True,
    seed=0,
    generator=None,
):
    """Random layer: NF4 weight [n, k], x [*m_shape, k], A [r, k], B [n, r] (B non-zero), bias [n].
    Drawn from ``generator`` (tests pass the fresh per-test ``rng`` fixture) or from ``seed``."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    # Block scales that differ (log-normal per quantization block): a kernel that takes a neighbouring
    # block's absmax, or a neighbouring 256-block group's second-level scale, is then visibly wrong.
    block_scale = torch.exp(0.7 * torch.randn(n, -(-k // blocksize), generator=g))
    w = torch.randn(n, k, generator=g) * 0.5 * block_scale.repeat_interleave(blocksize, dim=1)[:, :k]
    wq = quantize_nf4(w, blocksize, double_quant).to(device)
    x = torch.randn(*m_shape, k, generator=g).to(dtype).to(device)
    A = (torch.randn(r, k, generator=g) / k**0.5).to(adapter_dtype).to(device)
    B = torch.randn(n, r, generator=g).to(adapter_dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return wq, x, A, B, b


def dense_weight(wq, dtype) -> torch.Tensor:
    """The weight values the kernels use: the spec's decode rounded once to the compute dtype (fp32
    products for the float64 path), via the pure-PyTorch reference dequantizer."""
    absmax = wq.absmax_float().cpu()
    d = torch.float32 if dtype == torch.float64 else dtype
    return reference.nf4_dequantize(wq.packed.cpu(), absmax, wq.blocksize, wq.shape, d)


def torch_same_dtype(x, w, A, B, scale, bias, p, seed, offset):
    """A plain PyTorch implementation in x's dtype (PEFT-like casting: the LoRA branch in the adapter
    dtype, cast back to x's dtype), for the error yardstick."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    base = x2 @ w.to(x.dtype).t()
    xd = reference.lora_dropout(x2.to(A.dtype), p, seed, offset)
    lora = ((xd @ A.t()) @ B.t()) * scale
    y = base + lora.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def assert_close_rule(ours: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor, dtype, what: str):
    """max|ours - ref| <= 2 * max|plain - ref| + atol * max(1, max|ref|), and a mean relative error bound."""
    ours, ref, plain = (
        ours.detach().double().cpu(),
        ref.detach().double().cpu(),
        plain.detach().double().cpu(),
    )
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    scale = max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    err_plain = (plain - ref).abs().max().item()
    bound = 2 * err_plain + ATOL[dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3g} > 2 * plain-PyTorch error {err_plain:.3g} + atol"
    mean_rel = ((ours - ref).abs().mean() / ref.abs().mean().clamp_min(1e-30)).item()
    assert mean_rel <= MEAN_REL[dtype], f"{what}: mean relative error {mean_rel:.3g} > {MEAN_REL[dtype]}"


def run_script_in_fresh_process(script: str, args: list[str], env_overrides: dict[str, str], timeout: int) -> None:
    """Runs ``python -c script *args`` from the repository root with ``env_overrides`` set (for settings
    the library reads once at load, e.g. LORA_OPS_NO_AVX2) and asserts it succeeded."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **env_overrides)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", script, *args], cwd=root, env=env, check=False,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)}\n" + res.stderr[-4000:]
