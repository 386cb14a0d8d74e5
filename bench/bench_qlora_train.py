"""One QLoRA layer in training mode, forward + backward, side by side in one run (issue 11's CPU bar):

    ours       lora_ops.nn.QLoRALinear (NF4 base, fused op; CPU path chosen by the crossover table of the CPU's SIMD level)
    bnb_peft   bitsandbytes Linear4bit (nf4, double quant, compute dtype = x's) under PEFT LoRA
    dense      nn.Linear in x's dtype (frozen) under PEFT LoRA

Same weight (seeded), r, alpha = 2r, dropout 0, x [M, K] requiring grad (a middle layer), PEFT's
default fp32 adapters. Times: all three methods in one process, calls round-robin (each round starting
one method further), so that a load drift on a shared machine hits every method alike; medians.
Peak memory: each method again in its own fresh process, one call (lora_ops.demo.PeakMemory, the RSS
high-water mark above the RSS before the first forward, sampled every 2 ms plus the exact ru_maxrss --
torch's CPU allocations are invisible to tracemalloc).

    python bench/bench_qlora_train.py --ms 2048 --out bench/results/cpu_train_bf16_m2048

Writes <out>/bench_qlora_train.json and .md. Timings name the machine (lscpu model name, cores).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("ours", "bnb_peft", "dense")


class _Wrap(torch.nn.Module):  # PEFT targets a named child module
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def build(method: str, n: int, k: int, r: int, dtype) -> torch.nn.Module:
    from lora_ops.demo import init_adapters

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False).to(dtype).requires_grad_(False)
    if method == "ours":
        from lora_ops.nn import QLoRALinear

        m = QLoRALinear.from_linear(lin, r, 2 * r, 0.0)
        init_adapters([(m.lora_A.weight, m.lora_B.weight)], 0)
        return m.train()
    if method == "bnb_peft":
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64, module=q)
        base = q.to("cpu")  # bitsandbytes quantizes on the move to the device
    else:
        base = lin
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_Wrap(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    init_adapters([(layer.lora_A["default"].weight, layer.lora_B["default"].weight)], 0)
    return model.train()


def worker(args) -> dict:
    from lora_ops.demo import PeakMemory

    dtype = getattr(torch, args.dtype)
    model = build(args.worker, args.n, args.k, args.r, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.m, args.k, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(args.m, args.n, generator=g).to(dtype)
    # One 1-row call first: library / kernel initialization stays out of the times and the peak.
    model(torch.randn(1, args.k, dtype=dtype, requires_grad=True)).sum().backward()
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
    """Times every method in this process, round-robin, args.reps rounds after one warm-up round."""
    dtype = getattr(torch, args.dtype)
    models = {name: build(name, args.n, args.k, args.r, dtype) for name in METHODS}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.m, args.k, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(args.m, args.n, generator=g).to(dtype)

    def call(model):
        x.grad = None
        model.zero_grad(set_to_none=True)
        f0, s0 = bc.faults_and_system_time()
        t0 = time.perf_counter()
        model(x).backward(dy)
        t = (time.perf_counter() - t0) * 1e3
        f1, s1 = bc.faults_and_system_time()
        return t, f1 - f0, (s1 - s0) * 1e3

    for model in models.values():  # warm-up: library / kernel initialization stays out of the times
        call(model)
    times = {name: [] for name in METHODS}
    faults = {name: [] for name in METHODS}
    system_ms = {name: [] for name in METHODS}
    for rnd in range(args.reps):
        for i in range(len(METHODS)):
            name = METHODS[(rnd + i) % len(METHODS)]
            t, f, s = call(models[name])
            times[name].append(t)
            faults[name].append(f)
            system_ms[name].append(s)
    return {"method": "interleaved", "times_ms": times, "page_faults": faults, "system_ms": system_ms}


def run_worker(method: str, m: int, reps: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--m", str(m), "--reps", str(reps),
           "--n", str(args.n), "--k", str(args.k), "--r", str(args.r), "--dtype", args.dtype]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if method != "interleaved":
        # The peak is the RSS growth of one call: a caching allocator (an LD_PRELOADed tcmalloc, glibc told
        # not to trim) keeps freed memory resident and hides it, so the peak processes run plain glibc malloc.
        env = {k: v for k, v in env.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{method} M={m} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if method == "interleaved":
        print(f"M={m} " + ", ".join(f"{k}: {[round(t) for t in v]} ms" for k, v in out["times_ms"].items()), flush=True)
    else:
        print(f"M={m} {method}: {[round(t) for t in out['times_ms']]} ms, peak {out['peak_MiB']:.0f} MiB", flush=True)
    return out


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        name = "unknown cpu"
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "")
    isa = "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {os.cpu_count()} logical cores, {isa}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="2048", help="comma list of M")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds (one fwd+bwd per method each)")
    ap.add_argument("--out", default="bench/results/cpu_train_latest")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker_interleaved(args) if args.worker == "interleaved" else worker(args)))
        return
    import bitsandbytes
    import peft

    env = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__,
           "lora_ops_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                             text=True).stdout.strip(),
           "malloc": bc.malloc_library(), "load_avg_start": os.getloadavg()}
    rows = []
    result = {"environment": env, "args": vars(args), "rows": rows}
    for m in (int(v) for v in args.ms.split(",")):
        inter = run_worker("interleaved", m, args.rounds, args)
        runs = inter["times_ms"]
        row = {"M": m, "N": args.n, "K": args.k, "r": args.r, "dtype": args.dtype}
        for name in METHODS:
            out = run_worker(name, m, 1, args)
            row[f"{name}_fwdbwd_ms"] = statistics.median(runs[name])
            row[f"{name}_all_ms"] = runs[name]
            row[f"{name}_page_faults"] = statistics.median(inter["page_faults"][name])
            row[f"{name}_system_ms"] = statistics.median(inter["system_ms"][name])
            row[f"{name}_peak_MiB"] = out["peak_MiB"]
            row[f"{name}_fresh_process_ms"] = out["times_ms"]
        row["speedup_vs_bnb_peft"] = row["bnb_peft_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
        row["ours_over_dense"] = row["ours_fwdbwd_ms"] / row["dense_fwdbwd_ms"]
        rows.append(row)
        env["load_avg_end"] = os.getloadavg()
        save(result, args.out)
    print(markdown(result))


def save(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_qlora_train.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "bench_qlora_train.md"), "w") as f:
        f.write(markdown(result))


def _per_method(row, key, fmt) -> str:
    return " / ".join(format(row[f"{m}_{key}"], fmt) if f"{m}_{key}" in row else "-" for m in METHODS)


def markdown(result) -> str:
    env = result["environment"]
    lines = [
        "# QLoRA layer, training mode, forward + backward (bench/bench_qlora_train.py)",
        "",
        f"Machine: {env['machine']}; torch {env['torch']}, {env['threads']} threads; bitsandbytes "
        f"{env['bitsandbytes']}; peft {env['peft']}; allocator {env.get('malloc', '?')}; lora_ops commit "
        f"{env['lora_ops_commit'][:12]}; load average "
        f"at start / end {env['load_avg_start'][0]:.1f} / {env.get('load_avg_end', [float('nan')])[0]:.1f} "
        "(shared machine: only ratios within one run mean anything).",
        "",
        "Median ms of forward+backward, methods round-robin in one process (all calls listed in the JSON); "
        "peak = RSS high-water mark above the pre-run RSS, fresh process per method (after one 1-row warm-up "
        "call), under plain glibc malloc. Faults / system ms: median minor page faults and system CPU time per "
        "call in the timed process -- first touches of freshly mapped memory, which glibc's malloc causes for "
        "every new multi-MiB tensor and caching allocators (tcmalloc, jemalloc) mostly do not.",
        "",
        "| N×K | M | r | dtype | ours | bnb Linear4bit + PEFT | dense + PEFT | × vs bnb+PEFT | ours / dense | "
        "peak MiB ours / bnb / dense | faults ours / bnb / dense | system ms ours / bnb / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['N']}×{r['K']} | {r['M']} | {r['r']} | {r['dtype']} | {r['ours_fwdbwd_ms']:.0f} | "
            f"{r['bnb_peft_fwdbwd_ms']:.0f} | {r['dense_fwdbwd_ms']:.0f} | {r['speedup_vs_bnb_peft']:.2f} | "
            f"{r['ours_over_dense']:.3f} | {r['ours_peak_MiB']:.0f} / {r['bnb_peft_peak_MiB']:.0f} / "
            f"{r['dense_peak_MiB']:.0f} | {_per_method(r, 'page_faults', '.0f')} | {_per_method(r, 'system_ms', '.0f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
