"""Measures the CPU crossover of qlora_matmul between the kGemm kernel (hand-written 6x16 AVX2 GEMM)
and the kSlabGemm path (dequantized W slabs + ATen's GEMM: fp32, or bf16 for bf16 activations where the
table's slab_bf16_gemm is set), per form (forward y / backward dx), activation dtype, M and weight shape:
the numbers behind the slab_min_m_* fields of the CPU crossover tables (kCpuCrossoverAvx2 /
kCpuCrossoverAvx512 in csrc/kernels/cpu/qlora_cpu_path.h).

The path is picked from the table read once at library load, so each path runs in its own process
(LORA_OPS_SLAB_MIN_M=1: always the slab path; =2^62: never); both stay alive and the calls alternate
between them, one at a time, so a load change on a shared machine hits both paths alike. Prints the table, the smallest M from
which the slab path wins every measured larger M (per form and dtype), and the machine.

    python bench/bench_cpu_crossover.py --out bench/results/cpu_crossover
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

PATH_ENV = {"gemm": "4611686018427387904", "slab": "1"}  # LORA_OPS_SLAB_MIN_M per path


def points(args):
    for n, k in args.shapes:
        for dtype in args.dtypes:
            for form in ("fwd", "dx"):
                for m in args.ms:
                    yield {"N": n, "K": k, "dtype": dtype, "form": form, "M": m}


def worker(args) -> None:
    """Serves timing requests: reads a point index per stdin line, answers the ms of one call."""
    from lora_ops.nf4 import quantize_nf4
    from lora_ops.ops.qlora import qlora_matmul

    weights, calls = {}, {}
    for i, pt in enumerate(points(args)):
        n, k, dt, m = pt["N"], pt["K"], getattr(torch, pt["dtype"]), pt["M"]
        if (n, k) not in weights:
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
            weights[(n, k)] = quantize_nf4(w, 64, True)
        g = torch.Generator().manual_seed(m)
        n_in, n_out = (n, k) if pt["form"] == "dx" else (k, n)
        a = torch.randn(m, n_in, generator=g).to(dt)
        s = torch.randn(m, args.r, generator=g)
        lw = torch.randn(n_out, args.r, generator=g) * 0.01
        tw = pt["form"] == "dx"
        calls[i] = lambda a=a, wq=weights[(n, k)], tw=tw, s=s, lw=lw: qlora_matmul(a, wq, tw, s, lw, 2.0)
    print("ready", flush=True)
    for line in sys.stdin:
        i = int(line)
        t0 = time.perf_counter()
        calls[i]()
        print((time.perf_counter() - t0) * 1e3, flush=True)


def start_path(path: str, args) -> subprocess.Popen:
    env = dict(os.environ, LORA_OPS_SLAB_MIN_M=PATH_ENV[path])
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--shapes", args.shapes_str, "--ms", args.ms_str,
           "--dtypes", ",".join(args.dtypes), "--r", str(args.r)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", f"{path} worker failed to start"
    return proc


def call(proc: subprocess.Popen, i: int) -> float:
    proc.stdin.write(f"{i}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def measure(args) -> list:
    """Per point: a warm-up call on each path, then calls alternating gemm / slab (a load change on the
    shared machine hits both alike) until min_time per path has passed (at least 3, at most 15 pairs)."""
    procs = {p: start_path(p, args) for p in ("gemm", "slab")}
    rows = []
    try:
        for i, pt in enumerate(points(args)):
            times = {p: [] for p in procs}
            for p in procs:
                call(procs[p], i)
            while len(times["slab"]) < 3 or (sum(times["slab"]) < 1e3 * args.min_time and len(times["slab"]) < 15):
                for p in procs:
                    times[p].append(call(procs[p], i))
            rows.append(dict(pt, gemm_ms=statistics.median(times["gemm"]), slab_ms=statistics.median(times["slab"])))
            print(rows[-1], flush=True)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096", help="comma list of NxK")
    ap.add_argument("--ms", default="16,32,64,128,256")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per point and path")
    ap.add_argument("--out", default="bench/results/cpu_crossover_latest")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.shapes_str, args.ms_str = args.shapes, args.ms
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.ms = [int(v) for v in args.ms.split(",")]
    args.dtypes = args.dtypes.split(",")
    if args.worker:
        worker(args)
        return
    from bench_qlora_train import machine

    env = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "lora_ops_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                             text=True).stdout.strip(), "load_avg_start": os.getloadavg()}
    rows = measure(args)
    env["load_avg_end"] = os.getloadavg()
    crossover = {}
    for key in {(r["N"], r["K"], r["dtype"], r["form"]) for r in rows}:
        pts = sorted((r for r in rows if (r["N"], r["K"], r["dtype"], r["form"]) == key), key=lambda r: r["M"])
        wins_from = None  # smallest M from which the slab path wins at every measured larger M
        for r in reversed(pts):
            if r["slab_ms"] < r["gemm_ms"]:
                wins_from = r["M"]
            else:
                break
        crossover["{}x{} {} {}".format(*key)] = wins_from
    result = {"environment": env, "rows": rows, "slab_wins_from_m": crossover}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_cpu_crossover.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# CPU qlora_matmul: kGemm vs kSlabGemm (bench/bench_cpu_crossover.py)", "",
             f"Machine: {env['machine']}; torch {env['torch']}, {env['threads']} threads; lora_ops commit "
             f"{env['lora_ops_commit'][:12]}; load average start / end {env['load_avg_start'][0]:.1f} / "
             f"{env['load_avg_end'][0]:.1f}; r = {args.r}. Median ms per call.", "",
             "| N×K | dtype | form | M | kGemm | kSlabGemm | slab speedup |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']}×{r['K']} | {r['dtype']} | {r['form']} | {r['M']} | {r['gemm_ms']:.1f} | "
                     f"{r['slab_ms']:.1f} | {r['gemm_ms'] / r['slab_ms']:.2f} |")
    lines += ["", "Smallest M from which the slab path wins every larger measured M (None: it does not):", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(crossover.items())]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "bench_cpu_crossover.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
