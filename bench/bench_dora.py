"""One DoRA layer in training mode, forward + backward, side by side in one run (issue 34's bars):

    ours_dora   PEFT LoraConfig(use_dora=True) over lora_ops' NF4Linear: the fused DoRA op (no dense W)
    bnb_dora    PEFT DoRA over a bitsandbytes Linear4bit (nf4, double quant, compute dtype = x's): QDoRA as
                PEFT runs it (it dequantizes the weight and builds B·A densely every call)
    dense_dora  PEFT DoRA over a dense nn.Linear in x's dtype (frozen)
    ours_lora   PEFT LoRA (use_dora=False) over lora_ops' NF4Linear: the price of DoRA over LoRA

Same weight (seeded), r, alpha = 2r, dropout 0, x [M, K] requiring grad (a middle layer), PEFT's default
fp32 adapters (and magnitude). Times: every method in one process, calls round-robin (each round starting
one method further), medians. Peak memory: each method again in its own fresh process, the RSS high-water
mark above the RSS before the timed calls (lora_ops.demo.PeakMemory, plain glibc malloc), as in
bench/bench_qlora_train.py.

    python bench/bench_dora.py --ms 16,256,2048 --out bench/results/dora_cpu_zen4

Writes <out>/bench_dora.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import bench_common as bc  # first: source tree on sys.path, poisoning off
import torch
from bench_qlora_train import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ours_dora", "bnb_dora", "dense_dora", "ours_lora")


class _Wrap(torch.nn.Module):  # PEFT targets a named child module
    def __init__(self, proj):
        super().__init__()
        self.proj = proj
        # PEFT reads the model's device from its first parameter; an NF4Linear without bias has none
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x):
        return self.proj(x)


def build(method: str, n: int, k: int, r: int, dtype) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    from lora_ops.demo import init_adapters

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False).to(dtype).requires_grad_(False)
    if method in ("ours_dora", "ours_lora"):
        from lora_ops.integrations import peft_native
        from lora_ops.nn import NF4Linear

        peft_native.enable()
        base = NF4Linear.from_linear(lin)
    elif method == "bnb_dora":
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64, module=q)
        base = q.to("cpu")  # bitsandbytes quantizes on the move to the device
    else:
        base = lin
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"],
                     use_dora=method != "ours_lora")
    model = get_peft_model(_Wrap(base), cfg)
    layer = model.base_model.model.proj
    init_adapters([(layer.lora_A["default"].weight, layer.lora_B["default"].weight)], 0)
    return model.train()


def _data(args, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.m, args.k, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(args.m, args.n, generator=g).to(dtype)
    return x, dy


def worker(args) -> dict:
    from lora_ops.demo import PeakMemory

    dtype = getattr(torch, args.dtype)
    model = build(args.worker, args.n, args.k, args.r, dtype)
    x, dy = _data(args, dtype)
    model(torch.randn(1, args.k, dtype=dtype, requires_grad=True)).sum().backward()  # initialization
    times = []
    with PeakMemory("cpu") as mem:
        for _ in range(args.reps):
            x.grad = None
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model(x).backward(dy)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"method": args.worker, "times_ms": times, "peak_MiB": mem.peak / 2**20}


def worker_interleaved(args) -> dict:
    dtype = getattr(torch, args.dtype)
    models = {name: build(name, args.n, args.k, args.r, dtype) for name in METHODS}
    x, dy = _data(args, dtype)

    def call(model):
        x.grad = None
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(x).backward(dy)
        return (time.perf_counter() - t0) * 1e3

    for model in models.values():
        call(model)
    times = {name: [] for name in METHODS}
    for rnd in range(args.reps):
        for i in range(len(METHODS)):
            name = METHODS[(rnd + i) % len(METHODS)]
            times[name].append(call(models[name]))
    return {"method": "interleaved", "times_ms": times}


def run_worker(method: str, m: int, reps: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--m", str(m), "--reps", str(reps),
           "--n", str(args.n), "--k", str(args.k), "--r", str(args.r), "--dtype", args.dtype]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if method != "interleaved":  # peaks under plain glibc malloc (a caching allocator hides freed memory)
        env = {k: v for k, v in env.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{method} M={m} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if method == "interleaved":
        calls = ", ".join(f"{k}: {[round(t) for t in v]} ms" for k, v in out["times_ms"].items())
        print(f"M={m} {calls}", flush=True)
    else:
        times = [round(t) for t in out["times_ms"]]
        print(f"M={m} {method}: {times} ms, peak {out['peak_MiB']:.0f} MiB", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="16,256,2048", help="comma list of M")
    ap.add_argument("--shapes", default="4096x4096", help="comma list of NxK")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rounds", type=int, default=5,
                    help="timed round-robin rounds (one fwd+bwd per method each)")
    ap.add_argument("--out", default="bench/results/dora_latest")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker_interleaved(args) if args.worker == "interleaved" else worker(args)))
        return
    import bitsandbytes
    import peft

    env = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__,
           "lora_ops_commit": bc.git_commit(),
           "malloc": bc.malloc_library(), "load_avg_start": os.getloadavg(),
           "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = []
    result = {"environment": env, "args": vars(args), "rows": rows}
    for n, k in bc.parse_shapes(args.shapes):
        args.n, args.k = n, k
        for m in bc.parse_ints(args.ms):
            inter = run_worker("interleaved", m, args.rounds, args)
            row = {"M": m, "N": n, "K": k, "r": args.r, "dtype": args.dtype}
            for name in METHODS:
                out = run_worker(name, m, 1, args)
                row[f"{name}_fwdbwd_ms"] = statistics.median(inter["times_ms"][name])
                row[f"{name}_all_ms"] = inter["times_ms"][name]
                row[f"{name}_peak_MiB"] = out["peak_MiB"]
            row["speedup_vs_bnb_dora"] = row["bnb_dora_fwdbwd_ms"] / row["ours_dora_fwdbwd_ms"]
            row["ours_dora_over_ours_lora"] = row["ours_dora_fwdbwd_ms"] / row["ours_lora_fwdbwd_ms"]
            rows.append(row)
            env["load_avg_end"] = os.getloadavg()
            save(result, args.out)
    print(markdown(result))


def save(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_dora.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "bench_dora.md"), "w") as f:
        f.write(markdown(result))


def markdown(result) -> str:
    env = result["environment"]
    lines = [
        "# DoRA layer, training mode, forward + backward (bench/bench_dora.py)",
        "",
        f"Machine: {env['machine']}; torch {env['torch']}, {env['threads']} threads; bitsandbytes "
        f"{env['bitsandbytes']}; peft {env['peft']}; allocator {env.get('malloc', '?')}; lora_ops commit "
        f"{(env['lora_ops_commit'] or '?')[:12]}; {env.get('date_utc', '')}; load average at start / end "
        f"{env['load_avg_start'][0]:.1f} / {env.get('load_avg_end', [float('nan')])[0]:.1f} (the machine was "
        "shared with other jobs: only ratios within one run mean anything).",
        "",
        "Median ms of forward+backward, methods round-robin in one process (all calls in the JSON); "
        "peak = RSS high-water mark above the pre-call RSS, fresh process per method, one call, "
        "plain glibc malloc.",
        "",
        "| N×K | M | r | dtype | ours DoRA | bnb + PEFT DoRA | dense + PEFT DoRA | ours LoRA | "
        "× vs bnb DoRA | ours DoRA / ours LoRA | peak MiB ours DoRA / bnb DoRA / dense DoRA / ours LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['N']}×{r['K']} | {r['M']} | {r['r']} | {r['dtype']} | {r['ours_dora_fwdbwd_ms']:.0f} | "
            f"{r['bnb_dora_fwdbwd_ms']:.0f} | {r['dense_dora_fwdbwd_ms']:.0f} | "
            f"{r['ours_lora_fwdbwd_ms']:.0f} | "
            f"{r['speedup_vs_bnb_dora']:.2f} | {r['ours_dora_over_ours_lora']:.2f} | "
            + " / ".join(f"{r[f'{m}_peak_MiB']:.0f}" for m in METHODS) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
