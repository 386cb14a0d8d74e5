"""Multi-adapter serving forward: rows of one batch spread over D distinct LoRA adapters on one NF4 base.

Methods, per (N×K, M, D, ranks), timed round-robin (bench_common.interleaved_ms), forward only, no grad:
    multi       lora_ops.multi_lora_linear: the base once, the per-row LoRA term grouped by adapter
    single      lora_ops qlora_linear with ONE adapter (r = 16) for all M rows: the bar's yardstick
    peft_ours   PEFT's mixed batch (PeftLoraLinear._mixed_batch_forward: base once, then per distinct
                adapter a gather, lora_B(lora_A(x)) and a scatter) over the lora_ops NF4 base
    peft_bnb    the same over bitsandbytes' Linear4bit (its eval/no-grad CPU forward, the packed path on
                avx512_bf16 CPUs)
    dense_rows  a dense bf16 base (torch mm) + the per-row LoRA in torch, gathered per row (A[ids], Bt[ids])
Rows are spread round-robin over the adapters (row m -> adapter m mod D); D is capped at M. Mixed ranks
cycle 8, 16, 32, 64 over the adapters (r_max 64); "r16" gives every adapter r = 16.

    python bench/bench_multi_lora.py --out bench/results/multi_lora_cpu_zen4
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import bench_common as bc
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

import lora_ops
from lora_ops.integrations.peft_native import LoraOpsLinear
from lora_ops.nn import NF4Linear
from lora_ops.ops.multi_lora import multi_lora_linear_args
from lora_ops.ops.qlora import qlora_linear_args

MIXED = (8, 16, 32, 64)


def make_bnb_peft(w: torch.Tensor, cfgs):
    """PEFT's LoRA over bitsandbytes' Linear4bit with the adapters of ``cfgs`` (name, r, A, B, scale); None
    when bitsandbytes is missing."""
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except ImportError:
        return None
    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                   compress_statistics=True)
    lin = lin.to("cpu")
    lin.weight._quantize("cpu") if not lin.weight.bnb_quantized else None
    return add_adapters(PeftLinear4bit, lin, cfgs)


def add_adapters(cls, base, cfgs):
    layer = None
    for name, r, A, B, scale in cfgs:
        cfg = LoraConfig(r=r, lora_alpha=r * scale, lora_dropout=0.0, init_lora_weights=False)
        if layer is None:
            layer = cls(base, name, config=cfg, r=r, lora_alpha=r * scale)
        else:
            layer.update_layer(name, r, lora_alpha=r * scale, config=cfg)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)
    return layer.eval()


class Case:
    def __init__(self, n, k, n_adapters, ranks, need_bnb):
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        self.dense = w
        self.base = NF4Linear(lora_ops.quantize_nf4(w, 64, True))
        self.w, self.meta = self.base._weight_op_args()
        self.ranks = [ranks[i % len(ranks)] for i in range(n_adapters)]
        r_max = max(self.ranks)
        self.A = torch.zeros(n_adapters, r_max, k)
        self.Bt = torch.zeros(n_adapters, r_max, n)
        self.scales = torch.full((n_adapters,), 2.0)
        cfgs = []
        for c, r in enumerate(self.ranks):
            self.A[c, :r] = torch.randn(r, k, generator=g) / k**0.5
            self.Bt[c, :r] = torch.randn(r, n, generator=g) * 0.01
            cfgs.append((f"a{c}", r, self.A[c, :r], self.Bt[c, :r].t(), 2.0))
        self.rank_t = torch.tensor(self.ranks, dtype=torch.int32)
        self.A16, self.B16 = torch.randn(16, k, generator=g) / k**0.5, torch.randn(n, 16, generator=g) * 0.01
        self.peft_ours = add_adapters(LoraOpsLinear, self.base, cfgs)
        self.peft_bnb = make_bnb_peft(w, cfgs) if need_bnb else None
        self.cfg_names = [c[0] for c in cfgs]

    def methods(self, m):
        k = self.dense.shape[1]
        x = torch.randn(m, k).to(torch.bfloat16)
        n_ad = len(self.ranks)
        ids = torch.arange(m) % n_ad
        names = [self.cfg_names[i] for i in ids.tolist()]
        x3 = x.view(m, 1, k)  # PEFT's mixed batch: one adapter per batch row (decode: one token each)
        A_rows, Bt_rows = self.A[ids], self.Bt[ids]
        scale_rows = self.scales[ids].view(m, 1)
        out = {
            "multi": lambda: multi_lora_linear_args(x, self.w, self.meta, self.A, self.Bt, self.scales,
                                                    self.rank_t, ids),
            "single": lambda: qlora_linear_args(x, self.w, self.meta, self.A16, self.B16, 2.0),
            "peft_ours": lambda: PeftLoraLinear._mixed_batch_forward(self.peft_ours, x3, adapter_names=names),
            "dense_rows": lambda: (
                x @ self.dense.t()
                + (torch.einsum("mk,mrk->mr", x.float(), A_rows) * scale_rows).unsqueeze(1).bmm(Bt_rows)
                .squeeze(1).to(x.dtype)
            ),
        }
        if self.peft_bnb is not None:
            out["peft_bnb"] = lambda: self.peft_bnb(x3, adapter_names=names)
        return out


def timed(fns: dict, min_time: float, clock: str) -> dict:
    """Median ms per method, round-robin; ``clock`` as --clock says."""
    if clock == "wall":
        return bc.interleaved_ms(fns, "cpu", min_time)
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    spent = 0.0
    rounds = 0
    while rounds < 5 or (spent < min_time * len(fns) and rounds < 200):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            dt = time.process_time() - t0
            times[name].append(dt * 1e3)
            spent += dt
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x1024,4096x4096,14336x4096", help="NxK list")
    p.add_argument("--m", default="1,8,32,64")
    p.add_argument("--adapters", default="1,4,16,64")
    p.add_argument("--ranks", default="r16,mixed")
    p.add_argument("--min-time", type=float, default=0.4, help="seconds per method per point")
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: this process's CPU time (all its threads), the measure "
                   "that other jobs on a shared machine disturb least (with --threads 1 it equals the wall "
                   "time of an idle machine, up to cache effects)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    have_bnb = bc.bnb_version() is not None
    env = {
        "cpu": bc.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "bitsandbytes": bc.bnb_version(), "commit": bc.git_commit(), "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "min_time_s": args.min_time, "clock": args.clock,
        "load": "other jobs shared this 2-core machine during the run (load average 6-13)",
    }
    rows = []
    for n, k in bc.parse_shapes(args.shapes):
        for rank_kind in args.ranks.split(","):
            ranks = (16,) if rank_kind == "r16" else MIXED
            for d in bc.parse_ints(args.adapters):
                case = Case(n, k, d, ranks, have_bnb)
                for m in bc.parse_ints(args.m):
                    if d > m:
                        continue  # D distinct adapters need at least D rows
                    with torch.no_grad():
                        t = timed(case.methods(m), args.min_time, args.clock)
                    row = {"n": n, "k": k, "m": m, "adapters": d, "ranks": rank_kind, **t}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_multi_lora.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (args.out / "bench_multi_lora.md").write_text(markdown(env, rows))
    return rows


def markdown(env, rows) -> str:
    cols = ["multi", "single", "peft_ours", "peft_bnb", "dense_rows"]
    lines = [
        "# Multi-adapter serving forward (bf16, CPU)",
        "",
        f"CPU {env['cpu']}, {env['threads']} threads; torch {env['torch']}; "
        f"bitsandbytes {env['bitsandbytes']}; "
        f"lora_ops commit {env['commit']}; {env['date_utc']} UTC. Medians in ms ({env['clock']} clock), "
        f"methods round-robin "
        f"({env['min_time_s']} s each per point). Rows spread round-robin over the adapters. "
        f"Note: {env['load']}.",
        "",
        "| N×K | ranks | M | adapters | " + " | ".join(cols) + " | multi / single | peft_ours / multi "
        "| peft_bnb / multi |",
        "|---|---|---|---|" + "---|" * (len(cols) + 3),
    ]
    for r in rows:
        vals = [f"{r[c]:.3f}" if c in r else "n/a" for c in cols]
        bnb = f"{r['peft_bnb'] / r['multi']:.2f}" if "peft_bnb" in r else "n/a"
        lines.append(f"| {r['n']}×{r['k']} | {r['ranks']} | {r['m']} | {r['adapters']} | " + " | ".join(vals)
                     + f" | {r['multi'] / r['single']:.3f} | {r['peft_ours'] / r['multi']:.2f} | {bnb} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
