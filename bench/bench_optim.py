"""Benchmark: PagedAdamW step time on LoRA-like parameter sets, resident and paged, against
torch.optim.AdamW and bitsandbytes, with the host<->device bandwidth measured in the same run.

    python bench/bench_optim.py --out bench/results/optim_<device>      # GPU sizes (100M-1B params)
    python bench/bench_optim.py --quick --out /tmp/optim_quick          # a CPU-sized run

Rows: one per (parameter set, optimizer). Columns: median step time, achieved bandwidth of the update
(bytes the update must move: param r+w, grad r, both fp32 moments r+w) and its share of the
device-to-device copy bandwidth measured in the same run, bytes paged per step, and for paged rows the
step time divided by the copy-time floor (bytes in / H2D bandwidth + bytes out / D2H bandwidth: the
two directions serialized; the explicit pager overlaps them on separate streams, so below 1 is possible).
On CPU the "device" pool and the host store are both in RAM: paging there measures the pager's logic
and memcpy cost, not PCIe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import bench_common as bc  # first: source tree on sys.path, poisoning off
import torch

from lora_ops.optim import PagedAdamW

# LoRA adapters (A [r, K], B [N, r]) on every projection of a decoder layer: (K, N) per projection.
MODELS = {
    "llama2-7b": {"layers": 32, "proj": [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]},
    "llama2-70b": {
        "layers": 80,
        "proj": [
            (8192, 8192),
            (8192, 1024),
            (8192, 1024),
            (8192, 8192),
            (8192, 28672),
            (8192, 28672),
            (28672, 8192),
        ],
    },
}
GPU_SETS = [("llama2-7b", 64, None), ("llama2-70b", 64, None)]  # ~160M and ~830M adapter parameters
CPU_SETS = [("llama2-7b", 16, 4)]  # ~5M parameters (4 layers)


def lora_shapes(model: str, rank: int, layers: int | None) -> list[tuple[int, int]]:
    spec = MODELS[model]
    shapes = []
    for _ in range(layers or spec["layers"]):
        for k, n in spec["proj"]:
            shapes += [(rank, k), (n, rank)]
    return shapes


def time_steps(opt, device: torch.device, warmup: int, iters: int) -> list[float]:
    return bc.synced_seconds(opt.step, device, warmup, iters)


def measure_bandwidth(device: torch.device, nbytes: int, iters: int = 5) -> dict[str, float]:
    """GB/s of host->device, device->host (pinned host memory on CUDA) and device->device copies."""
    n = nbytes // 4
    cuda = device.type == "cuda"
    host = torch.empty(n, dtype=torch.float32, pin_memory=cuda).fill_(1.0)
    dev = torch.empty(n, dtype=torch.float32, device=device)
    dev2 = torch.empty(n, dtype=torch.float32, device=device)

    def best(fn) -> float:
        return nbytes / min(bc.synced_seconds(fn, device, 1, iters)) / 1e9

    h2d = best(lambda: dev.copy_(host, non_blocking=True))
    d2h = best(lambda: host.copy_(dev, non_blocking=True))
    d2d = best(lambda: dev2.copy_(dev)) * 2  # read + write
    return {"h2d_GBps": h2d, "d2h_GBps": d2h, "d2d_rw_GBps": d2d}


def make_params(shapes, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for s in shapes:
        p = (torch.randn(s, generator=g) * 0.02).to(dtype).to(device).requires_grad_()
        params.append(p)
        grads.append((torch.randn(s, generator=g) * 1e-3).to(dtype).to(device))
    return params, grads


def bench_set(args, device, model, rank, layers, bw) -> list[dict]:
    shapes = lora_shapes(model, rank, layers)
    dtype = getattr(torch, args.dtype)
    params, grads = make_params(shapes, device, dtype)
    n = sum(p.numel() for p in params)
    elem = torch.finfo(dtype).bits // 8
    update_bytes = n * (2 * elem + elem + 16)  # param r+w, grad r, exp_avg r+w, exp_avg_sq r+w
    state_bytes = 8 * n
    name = f"{model}-r{rank}" + (f"-{layers}L" if layers else "")
    rows = []

    def add(label, opt_fn, extra=None):
        for p, g in zip(params, grads):
            p.grad = g
        try:
            opt = opt_fn()
            times = time_steps(opt, device, args.warmup, args.iters)
        except Exception as e:  # noqa: BLE001  (a baseline that cannot run here is reported, not fatal)
            rows.append({"set": name, "optimizer": label, "error": f"{type(e).__name__}: {e}"[:200]})
            return None
        med = statistics.median(times)
        row = {
            "set": name,
            "params": n,
            "state_MB": state_bytes / 1e6,
            "optimizer": label,
            "step_ms": med * 1e3,
            "min_ms": min(times) * 1e3,
            "update_GBps": update_bytes / med / 1e9,
            "pct_of_copy_bw": 100 * update_bytes / med / 1e9 / bw["d2d_rw_GBps"],
        }
        stats = getattr(opt, "paging_stats", None)
        if stats is not None:
            moved = stats.bytes_in + stats.bytes_out
            row.update(backend=stats.backend, budget_MB=stats.budget_bytes / 1e6, paged_MB=moved / 1e6)
            if stats.backend == "explicit" and moved:
                floor = stats.bytes_in / (bw["h2d_GBps"] * 1e9) + stats.bytes_out / (bw["d2h_GBps"] * 1e9)
                row["copy_floor_ms"] = floor * 1e3
                row["step_over_copy_floor"] = med / floor
        row.update(extra or {})
        rows.append(row)
        del opt
        return row

    fused_kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    add(f"torch.AdamW({next(iter(fused_kw))}=True)", lambda: torch.optim.AdamW(params, lr=1e-4, **fused_kw))
    if device.type == "cpu":
        add("torch.AdamW(for-loop)", lambda: torch.optim.AdamW(params, lr=1e-4, foreach=False))
    try:
        import bitsandbytes as bnb

        if device.type == "cuda":
            add("bnb.PagedAdamW", lambda: bnb.optim.PagedAdamW(params, lr=1e-4))
        else:
            add("bnb.AdamW", lambda: bnb.optim.AdamW(params, lr=1e-4))
    except ImportError as e:
        rows.append({"set": name, "optimizer": "bitsandbytes", "error": f"not importable: {e}"[:200]})
    add("PagedAdamW(resident)", lambda: PagedAdamW(params, lr=1e-4, paging="none", page_size=args.page_size))
    for frac in (1.0, 0.5, 0.1):
        budget = int(state_bytes * frac)
        if frac == 1.0:
            budget += 8 * args.page_size  # covers the page padding: all resident
        add(
            f"PagedAdamW(explicit, {int(frac * 100)}%)",
            lambda budget=budget: PagedAdamW(
                params, lr=1e-4, paging="explicit", state_budget_bytes=budget, page_size=args.page_size
            ),
            {"budget_fraction": frac},
        )
    if device.type == "cuda":
        add(
            "PagedAdamW(managed)",
            lambda: PagedAdamW(params, lr=1e-4, paging="managed", page_size=args.page_size),
        )
    return rows


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": bc.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_1m": round(os.getloadavg()[0], 1),  # this CPU may be shared: timings scale with load
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["driver"] = bc.gpu_driver()
    if bc.git_commit() is not None:
        env["commit"] = bc.git_commit()
    if bc.bnb_version() is not None:
        env["bitsandbytes"] = bc.bnb_version()
    return env


def markdown(env: dict, bw: dict, rows: list[dict]) -> str:
    lines = [
        "# PagedAdamW benchmark",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in env.items()),
        "",
        "Bandwidth measured in this run: "
        + ", ".join(f"{k.replace('_GBps', '')} {v:.1f} GB/s" for k, v in bw.items()),
        "",
        (
            "| set | params | optimizer | step ms (median) | update GB/s | % of copy GB/s | paged MB/step "
            "| step / copy floor |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['set']} | | {r['optimizer']} | {r['error']} | | | | |")
            continue
        ratio = f"{r['step_over_copy_floor']:.2f}" if "step_over_copy_floor" in r else ""
        paged = f"{r['paged_MB']:.1f}" if "paged_MB" in r else ""
        lines.append(
            f"| {r['set']} | {r['params'] / 1e6:.1f}M | {r['optimizer']} | {r['step_ms']:.2f} | "
            f"{r['update_GBps']:.1f} | {r['pct_of_copy_bw']:.0f}% | {paged} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized parameter set, few iterations")
    ap.add_argument(
        "--device", default=None, help="cuda or cpu (default: cuda if available, cpu with --quick)"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=1 << 20, help="elements per state page")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    args = ap.parse_args()
    device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    sets = CPU_SETS if (args.quick or device.type == "cpu") else GPU_SETS
    if args.iters is None:
        args.iters = 10 if args.quick else 30
    if args.quick:
        args.page_size = min(args.page_size, 1 << 16)

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    bw = measure_bandwidth(device, (64 << 20) if args.quick else (1 << 30))
    print(json.dumps(env), json.dumps(bw), sep="\n", flush=True)
    rows = []
    for model, rank, layers in sets:
        for r in bench_set(args, device, model, rank, layers, bw):
            print(json.dumps(r), flush=True)
            rows.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    env["loadavg_1m_end"] = round(os.getloadavg()[0], 1)
    result = {
        "environment": env,
        "bandwidth": bw,
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(env, bw, rows))
    print(markdown(env, bw, rows))


if __name__ == "__main__":
    main()
