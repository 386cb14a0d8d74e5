"""Per-call cost of one QLoRA layer at sizes where the kernels are cheap (issue 16, item 4): forward and
forward + backward of each way to run a LoRA layer over an NF4 (or dense) base, medians of many calls,
measured round-robin in one process so that a shared machine's load hits every method alike.

    nn.Linear              a frozen dense nn.Linear (no adapter): the floor of a torch layer call
    QLoRALinear            lora_ops.nn.QLoRALinear (eager fast path: lora_ops.ops.qlora.EAGER_FAST_PATH)
    QLoRALinear, registered autograd
                           the same with EAGER_FAST_PATH off: every call through the autograd registered
                           with torch.library (what torch.compile traces)
    PEFT over NF4Linear    PEFT LoRA over lora_ops' NF4Linear (lora_ops.integrations.peft_native)
    bnb + PEFT             PEFT LoRA over a bitsandbytes Linear4bit (nf4, double quant)
    bnb + PEFT, patched    the same, patched by lora_ops.integrations.peft

x [M, K] requires grad (a middle layer), float32, r and alpha = 2r, dropout 0, B random (non-zero); the
backward is ``y.backward(dy)`` with a fixed dy. The default shapes: 64x64 r=8 M=4 (all overhead) and the
demo's largest projection, 128->320 r=16 M=416 (``python -m lora_ops demo`` on a CPU: batch 16 x 26).

    python bench/bench_call_overhead.py --out bench/results/cpu_call_overhead

Prints a table (microseconds per call, and each method's time over nn.Linear's and over bnb + PEFT's)
and writes <out>/bench_call_overhead.json and .md when --out is given. Timings name the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import bench_common as bc  # first: source tree on sys.path, poisoning off
import torch
from torch import nn

from lora_ops.nn import QLoRALinear
from lora_ops.ops import qlora as qlora_ops

DEFAULT_SHAPES = "64x64x8x4,128x320x16x416"  # K x N x r x M


class _Wrap(nn.Module):  # PEFT targets a named child module
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # PEFT reads the device of one

    def forward(self, x):
        return self.proj(x)


def _peft_layer(base: nn.Module, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_Wrap(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def _bnb_base(lin: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                          compress_statistics=True, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # bitsandbytes quantizes on the move to a device
    q.support_avx512bf16_for_cpu = False  # training mode never repacks; keep it off in any case
    return q


def build_layers(k: int, n: int, r: int) -> dict[str, nn.Module]:
    """One layer per method, all over the same seeded dense weight."""
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False).requires_grad_(False)
    ours = QLoRALinear.from_linear(lin, r, 2 * r)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
    layers: dict[str, nn.Module] = {"nn.Linear": lin, "QLoRALinear": ours,
                                    "QLoRALinear, registered autograd": ours}
    try:
        import peft  # noqa: F401
    except ImportError:
        return layers
    from lora_ops import quantize_model

    native = quantize_model(_Wrap(nn.Linear(k, n, bias=False)))
    native.proj.set_weight(ours.weight)
    layers["PEFT over NF4Linear"] = _peft_layer(native.proj, r)
    if bc.bnb_version() is not None:
        layers["bnb + PEFT"] = _peft_layer(_bnb_base(lin), r)
        patched = _peft_layer(_bnb_base(lin), r)
        from lora_ops.integrations.peft import patch_peft_model

        patch_peft_model(patched)
        layers["bnb + PEFT, patched"] = patched
    return layers


def _timers(name: str, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    fast = name != "QLoRALinear, registered autograd"

    def fwd():
        qlora_ops.EAGER_FAST_PATH = fast
        layer(x)

    def fwd_bwd():
        qlora_ops.EAGER_FAST_PATH = fast
        layer(x).backward(dy)

    return fwd, fwd_bwd


def median_us(fns: dict, calls: int, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` rounds of the mean of ``calls`` back-to-back calls, methods round-robin."""
    for fn in fns.values():
        for _ in range(max(10, calls // 4)):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def run(shapes: list[tuple[int, ...]], calls: int, rounds: int) -> list[dict]:
    rows = []
    for k, n, r, m in shapes:
        layers = build_layers(k, n, r)
        x = torch.randn(m, k, requires_grad=True)
        dy = torch.randn(m, n)
        fns = {}
        for name, layer in layers.items():
            fwd, fwd_bwd = _timers(name, layer, x, dy)
            fns[(name, "fwd")], fns[(name, "fwd+bwd")] = fwd, fwd_bwd
        work = k * n * m  # fewer calls per round where one call is longer
        us = median_us(fns, max(2, calls * 64 * 64 * 4 // max(work, 64 * 64 * 4)), rounds)
        qlora_ops.EAGER_FAST_PATH = True
        for name in layers:
            rows.append({"K": k, "N": n, "r": r, "M": m, "method": name,
                         "fwd_us": us[(name, "fwd")], "fwd_bwd_us": us[(name, "fwd+bwd")]})
    return rows


def table(rows: list[dict]) -> str:
    base = {(r["K"], r["N"], r["M"]): r for r in rows if r["method"] == "nn.Linear"}
    bnb = {(r["K"], r["N"], r["M"]): r for r in rows if r["method"] == "bnb + PEFT"}
    out = [("| K x N, r, M | method | fwd (µs) | fwd+bwd (µs) | fwd / nn.Linear | fwd+bwd / nn.Linear "
            "| fwd / bnb+PEFT | fwd+bwd / bnb+PEFT |"), "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        key = (r["K"], r["N"], r["M"])
        lin, b = base[key], bnb.get(key)
        vs_b = (f"{r['fwd_us'] / b['fwd_us']:.2f}x | {r['fwd_bwd_us'] / b['fwd_bwd_us']:.2f}x" if b else "- | -")
        out.append(f"| {r['K']}x{r['N']}, r={r['r']}, M={r['M']} | {r['method']} | {r['fwd_us']:,.1f} | "
                   f"{r['fwd_bwd_us']:,.1f} | {r['fwd_us'] / lin['fwd_us']:.2f}x | "
                   f"{r['fwd_bwd_us'] / lin['fwd_bwd_us']:.2f}x | {vs_b} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="K x N x r x M, comma-separated")
    p.add_argument("--calls", type=int, default=200, help="calls per timed round at the smallest shape")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    env = {"cpu": bc.cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "bitsandbytes": bc.bnb_version(),
           "commit": bc.git_commit()}
    rows = run(shapes, args.calls, args.rounds)
    head = (f"per-call time, CPU float32, medians of {args.rounds} rounds | {env['cpu']}, {env['cores']} cores, "
            f"{env['threads']} threads | torch {env['torch']} | bitsandbytes {env['bitsandbytes']} | "
            f"commit {env['commit']}")
    md = head + "\n\n" + table(rows)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_call_overhead.md").write_text(md + "\n")
        (args.out / "bench_call_overhead.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
