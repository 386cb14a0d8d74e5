"""This machine's own limits next to lora_ops' figures, measured in one process, round-robin (one call of each
method per round, so a shared machine's load hits all alike), medians with min..max:

    python bench/cpu_limits.py --out DIR [--rounds 7]

- copy: ``dst.copy_(src)`` of a bf16 tensor of the measured output's size, bytes read + written per second;
- dequantize(out=) of NF4 4096x4096 and 4096x14336 (bf16, blocksize 64, double quant off / on) into an
  existing output: bytes read + written per second as a fraction of that copy's;
- forward M = 1 (4096², r 16, bf16): the NF4 weight's bytes (codes + scales) per second over the copy
  bandwidth of a 4096² bf16 tensor, the weight being evicted between calls by the other methods' traffic;
- the engine limit of a training step, M = 2048, 4096², r 16, bf16: dequantize W + ``x @ Wᵀ`` + ``dy @ W``
  on each ATen GEMM engine (bf16 operands, or fp32 operands: the activations converted and the result
  rounded back to bf16 included), the faster one being the limit; lora_ops' fwd+bwd (x, A, B requiring
  grad) as a multiple of it.

Writes DIR/cpu_limits.json and prints a table."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

import lora_ops  # noqa: E402
from lora_ops import env as lenv  # noqa: E402

BF16 = torch.bfloat16


def round_robin(fns: dict, rounds: int) -> dict:
    """ms per call of each function: median, min, max over ``rounds`` rounds (one warm-up call each)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}


def nf4_bytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in w.op_args()[0])


def dequant_limits(rounds: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, k in ((4096, 4096), (4096, 14336)):
        for dq in (False, True):
            w = lora_ops.quantize_nf4(torch.randn(n, k, generator=g), 64, dq)
            out = torch.empty(n, k, dtype=BF16)
            out.fill_(1.0)
            src, dst = torch.randn(n, k).to(BF16), torch.empty(n, k, dtype=BF16)
            dst.fill_(1.0)
            t = round_robin({"copy": lambda: dst.copy_(src), "dequant_into": lambda: w.dequantize(out=out)}, rounds)
            copy_gbps = 2 * out.numel() * 2 / t["copy"]["median"] / 1e6
            deq_gbps = (nf4_bytes(w) + out.numel() * 2) / t["dequant_into"]["median"] / 1e6
            rows.append({"shape": f"{n}x{k}", "double_quant": dq, "copy_ms": t["copy"], "dequant_into_ms":
                         t["dequant_into"], "copy_GBps": copy_gbps, "dequant_into_GBps": deq_gbps,
                         "fraction_of_copy": deq_gbps / copy_gbps})
    return rows


def forward_m1_limit(rounds: int) -> dict:
    g = torch.Generator().manual_seed(1)
    n = k = 4096
    w = lora_ops.quantize_nf4(torch.randn(n, k, generator=g), 64, True)
    x = torch.randn(1, k, generator=g).to(BF16)
    A, B = torch.randn(16, k, generator=g) / 64, torch.randn(n, 16, generator=g)
    src, dst = torch.randn(n, k).to(BF16), torch.empty(n, k, dtype=BF16)
    dst.fill_(1.0)
    with torch.no_grad():
        t = round_robin({"copy": lambda: dst.copy_(src), "forward_m1": lambda: lora_ops.qlora_linear(x, w, A, B, 2.0)},
                        max(rounds, 30))
    copy_gbps = 2 * n * k * 2 / t["copy"]["median"] / 1e6
    read_gbps = nf4_bytes(w) / t["forward_m1"]["median"] / 1e6
    return {"copy_ms": t["copy"], "forward_m1_ms": t["forward_m1"], "copy_GBps": copy_gbps,
            "weight_read_GBps": read_gbps, "fraction_of_copy": read_gbps / copy_gbps}


def training_limit(rounds: int, m: int = 2048) -> dict:
    g = torch.Generator().manual_seed(2)
    n = k = 4096
    w = lora_ops.quantize_nf4(torch.randn(n, k, generator=g), 64, True)
    x = torch.randn(m, k, generator=g).to(BF16)
    dy = torch.randn(m, n, generator=g).to(BF16)
    A = (torch.randn(16, k, generator=g) / 64).requires_grad_()
    B = (torch.randn(n, 16, generator=g) * 0.01).requires_grad_()
    xg = x.clone().requires_grad_()
    w16, w32 = torch.empty(n, k, dtype=BF16), torch.empty(n, k)

    def engine_bf16():
        w.dequantize(out=w16)
        y = x @ w16.t()
        dx = dy @ w16
        return y, dx

    def engine_fp32():  # the slab path's fp32 engine: fp32 operands, one rounding of each result to bf16
        w.dequantize(out=w32)
        y = (x.float() @ w32.t()).to(BF16)
        dx = (dy.float() @ w32).to(BF16)
        return y, dx

    def ours():
        xg.grad = A.grad = B.grad = None
        y = lora_ops.qlora_linear(xg, w, A, B, 2.0)
        y.backward(dy)

    t = round_robin({"engine_bf16": engine_bf16, "engine_fp32": engine_fp32, "lora_ops_fwd_bwd": ours}, rounds)
    fastest = min(("bf16", "fp32"), key=lambda e: t[f"engine_{e}"]["median"])
    limit = t[f"engine_{fastest}"]["median"]
    flops = 2 * 2 * m * n * k
    return {"M": m, "shape": f"{n}x{k}", "rank": 16, "engine_bf16_ms": t["engine_bf16"],
            "engine_fp32_ms": t["engine_fp32"], "lora_ops_fwd_bwd_ms": t["lora_ops_fwd_bwd"],
            "fastest_engine": fastest, "engine_limit_ms": limit,
            "engine_GFLOPs": {e: flops / t[f"engine_{e}"]["median"] / 1e6 for e in ("bf16", "fp32")},
            "lora_ops_over_limit": t["lora_ops_fwd_bwd"]["median"] / limit}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"environment": dict(lenv.describe(), commit=bc.git_commit()), "dequantize": dequant_limits(args.rounds),
           "forward_m1": forward_m1_limit(args.rounds), "training": training_limit(args.rounds)}
    (args.out / "cpu_limits.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    for r in res["dequantize"]:
        print(f"dequantize(out=) {r['shape']} dq={r['double_quant']}: {r['dequant_into_GBps']:.1f} GB/s vs copy_ "
              f"{r['copy_GBps']:.1f} GB/s = {100 * r['fraction_of_copy']:.0f} %")
    f = res["forward_m1"]
    print(f"forward M=1: weight read {f['weight_read_GBps']:.1f} GB/s vs copy_ {f['copy_GBps']:.1f} GB/s = "
          f"{100 * f['fraction_of_copy']:.0f} %")
    t = res["training"]
    print(f"training M=2048: engine bf16 {t['engine_bf16_ms']['median']:.0f} ms, fp32 {t['engine_fp32_ms']['median']:.0f} "
          f"ms (fastest {t['fastest_engine']}); lora_ops fwd+bwd {t['lora_ops_fwd_bwd_ms']['median']:.0f} ms = "
          f"{t['lora_ops_over_limit']:.2f}x the limit")
    return res


if __name__ == "__main__":
    main()
