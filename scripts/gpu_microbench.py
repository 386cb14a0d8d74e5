#!/usr/bin/env python3
"""A short fused-QLoRA micro-benchmark for scripts/gpu_check.sh (<= --budget seconds, default 80).

qlora_matmul (no LoRA term, forward) on each forced path (LORA_OPS_QLORA_FORCE = tc_decode | decode | mma | ffma;
tc_decode only for M <= 64, decode only for M <= 16, ffma only for M <= 256 to keep the budget) against dense bf16 (x @ Wᵀ with
torch) and dequantize + matmul (and bitsandbytes' matmul_4bit when it imports), for layers 4096x4096
and 14336x4096 (N x K) and M in {1, 16, 64, 256, 4096}, bf16.
Timing: each measured call is one of R calls captured in a CUDA graph, R different weight copies in
turn so that the weights streamed per replay exceed 2 x the 60 MB L2 (no call finds its weight in the
cache; the L2 size is the device's own, 60 MB assumed only when torch does not say); replays are timed with
CUDA events after two warm-up replays, at least 5 replays (or 50 ms); each row keeps the min, median and max
of one replay, divided by R. Rows that do not fit the budget are skipped and listed.
Bandwidth bound: the same run first times a device-to-device copy_ of a 1 GiB buffer (graph, same
method): "copy_GBps" counts its bytes read + written; "pct_of_copy_bw" = a call's bytes moved (weight,
x and y) per second at the median / copy_GBps, the share of the streaming bound a call reaches.
The JSON (with the device's driver, clocks and L2 size, and LORA_OPS_COMMIT) is rewritten after each row.
Exit status 1 when a lora_ops or torch row fails (a bitsandbytes row's error is recorded, not fatal).
Usage: python scripts/gpu_microbench.py [--out DIR] [--budget 80] [--quick]   (--quick: one small row
per method, also runs on --device cpu without graphs as a dry run of the script)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import lora_ops
from gpu_results import run_info, write_json

L2_BYTES = 60 * 2**20  # assumed when the device does not report its L2
SHAPES = [(4096, 4096), (14336, 4096)]
MS = [1, 16, 64, 256, 4096]


def copies_for(nbytes: int, l2_bytes: int) -> int:
    return max(2, -(-2 * l2_bytes // nbytes))


def time_graph(fns, device, min_replays=5, min_ms=50.0) -> list[float]:
    """ms of each timed replay of all fns in sequence (CUDA graph); plain calls on the CPU."""
    if device.type != "cuda":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for f in fns:
                f()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph (allocator, lazy init)
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(2):
        g.replay()
    times = []
    while len(times) < min_replays or sum(times) < min_ms:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        if len(times) > 200:
            break
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget", type=float, default=80.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    t_start = time.perf_counter()
    shapes, ms = ([(512, 1024)], [1, 64]) if args.quick else (SHAPES, MS)
    dt = torch.bfloat16
    try:
        import bitsandbytes as bnb  # noqa: F401  (only when carried; never a dependency)
        has_bnb = dev.type == "cuda"
    except Exception:  # noqa: BLE001
        has_bnb = False
    rows, skipped = [], []
    info = run_info(dev)
    l2_bytes = info.get("l2_bytes") or L2_BYTES
    copy_gbps = None
    result = {**info, "dtype": "bfloat16", "bitsandbytes": has_bnb, "l2_bytes_used": l2_bytes,
              "copy_GBps": None, "rows": rows, "skipped_for_budget": skipped, "state": "running"}
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "microbench.json")
    if dev.type == "cuda":
        src = torch.empty(2**30, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_ms = statistics.median(time_graph([lambda: dst.copy_(src)], dev))
        copy_gbps = 2 * src.numel() / (copy_ms * 1e-3) / 1e9
        del src, dst
        result["copy_GBps"] = round(copy_gbps, 1)
        print(f"copy_ (1 GiB, device to device): {copy_gbps:.1f} GB/s read + written", flush=True)
    write_json(json_path, result)
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    for n, k in shapes:
        w_master = (torch.randn(n, k, generator=g) * 0.02).to(dev)
        wq0 = lora_ops.quantize_nf4(w_master.to(dt), blocksize=64, double_quant=True)
        r_q = 1 if args.quick else copies_for(wq0.nbytes, l2_bytes)
        r_d = 1 if args.quick else copies_for(n * k * 2, l2_bytes)
        wqs = [wq0] + [lora_ops.quantize_nf4((w_master * (1 + 0.01 * i)).to(dt), 64, True) for i in range(1, r_q)]
        dense = [w.dequantize(dt) for w in wqs[:r_d]] + [wqs[0].dequantize(dt) for _ in range(max(0, r_d - r_q))]
        bnb_ws = []
        if has_bnb:
            try:
                bnb_ws = [w.to_bnb() for w in wqs]
            except Exception as e:  # noqa: BLE001
                print(f"bitsandbytes conversion failed: {e}", file=sys.stderr)
        for m in ms:
            x = torch.randn(m, k, generator=g).to(dt).to(dev)
            methods = {}
            for path in ("tc_decode", "decode", "mma", "slab", "ffma"):  # slab: its bf16 GEMM kind
                if ((path == "decode" and m > 16) or (path == "tc_decode" and m > 64) or (path == "ffma" and m > 256)
                        or (path == "slab" and m < 64) or dev.type != "cuda"):
                    continue
                methods[f"fused-{path}"] = (path, [lambda w=w: lora_ops.qlora_matmul(x, w) for w in wqs], wq0.nbytes)
            if dev.type != "cuda":
                methods["fused"] = ("", [lambda w=w: lora_ops.qlora_matmul(x, w) for w in wqs], wq0.nbytes)
            methods["dense-bf16"] = ("", [lambda d=d: x @ d.t() for d in dense], n * k * 2)
            methods["dequant+matmul"] = ("", [lambda w=w: x @ w.dequantize(dt).t() for w in wqs], wq0.nbytes)
            if bnb_ws:
                import bitsandbytes as bnb
                methods["bnb-matmul_4bit"] = ("", [lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s)
                                                   for p, s in bnb_ws], wq0.nbytes)
            for name, (force, fns, wbytes) in methods.items():
                label = f"{n}x{k} M={m} {name}"
                if time.perf_counter() - t_start > args.budget:
                    skipped.append(label)
                    continue
                os.environ["LORA_OPS_QLORA_FORCE"] = force
                try:
                    replays = time_graph(fns, dev)
                except Exception as e:  # noqa: BLE001
                    rows.append({"shape": f"{n}x{k}", "m": m, "method": name,
                                 "error": f"{type(e).__name__}: {e}"})
                    write_json(json_path, result)
                    print(f"{label}: ERROR {e}", flush=True)
                    continue
                finally:
                    os.environ["LORA_OPS_QLORA_FORCE"] = ""
                t = statistics.median(replays) / len(fns)
                moved = wbytes + m * k * 2 + m * n * 2  # the weight (as stored), x and y
                row = {"shape": f"{n}x{k}", "m": m, "method": name, "ms": round(t, 5),
                       "ms_min": round(min(replays) / len(fns), 5),
                       "ms_max": round(max(replays) / len(fns), 5),
                       "replays": len(replays), "weight_GBps": round(wbytes / (t * 1e-3) / 1e9, 1),
                       "TFLOPs": round(2 * m * n * k / (t * 1e-3) / 1e12, 2), "rotated_copies": len(fns)}
                if copy_gbps:
                    row["pct_of_copy_bw"] = round(100 * moved / (t * 1e-3) / 1e9 / copy_gbps, 1)
                rows.append(row)
                write_json(json_path, result)
                print(f"{label:<40} {t * 1e3:9.1f} us  {row['weight_GBps']:7.1f} GB/s weights "
                      f"({row.get('pct_of_copy_bw', '-')} % of copy)  {row['TFLOPs']:7.2f} TFLOP/s", flush=True)
        del wqs, dense, bnb_ws
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    result.update(state="done", seconds=round(time.perf_counter() - t_start, 1))
    write_json(json_path, result)
    print(f"gpu_microbench: {len(rows)} rows, {len(skipped)} skipped for the budget, {result['seconds']} s")
    ours_failed = any("error" in r and not r["method"].startswith("bnb") for r in rows)
    return 0 if rows and not ours_failed else 1


if __name__ == "__main__":
    sys.exit(main())
