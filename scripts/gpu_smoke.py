#!/usr/bin/env python3
"""Every lora_ops CUDA kernel once, each result against the float64 reference (lora_ops/reference.py),
for scripts/gpu_check.sh: run with CUDA_LAUNCH_BLOCKING=1 (a failing launch names itself) and, with
--tiny, under compute-sanitizer (small shapes, one call per kernel).

Hits: nf4_quantize (+ double quantize), nf4_dequantize (plain, nested), qlora_matmul forward and dx
on every forced path (LORA_OPS_QLORA_FORCE = tc_decode | decode | mma | slab | ffma, bench/dispatch_qlora.md) for bf16,
fp16 and fp32 (split-K included: small N, long K), qlora_linear forward + backward with dropout
(lora_down, lora_outer, dropout mask), adamw_step_, managed_empty/prefetch (tiny).
Usage: python scripts/gpu_smoke.py [--tiny] [--device cuda|cpu] [--json OUT.json]
--device cpu runs the same calls on the CPU kernels (no forced paths): a dry run of this script.
Exit status 1 if any result is off or any call raises.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

import lora_ops
from gpu_results import run_info, write_json
from lora_ops import reference as ref

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # ||out - ref|| / ||ref||
PATHS = ["tc_decode", "decode", "mma", "slab", "ffma"]


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    out, expect = out.detach().double().cpu(), expect.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - expect).norm() / expect.norm().clamp_min(1e-300))


def dense_ref(w) -> torch.Tensor:
    """The weight the kernels use, from the spec's reference (float32 values of the NF4 products)."""
    absmax = ref.nested_absmax(w.absmax, w.absmax2, w.offset) if w.nested else w.absmax
    return ref.nf4_dequantize(w.packed, absmax, w.blocksize, w.shape, torch.float32)


class Checks:
    """The checks so far; with a JSON path, the file is rewritten after each (a killed run keeps them)."""

    def __init__(self, json_path: str | None = None, info: dict | None = None):
        self.rows: list[dict] = []
        self.json_path, self.info = json_path, info or {}

    def save(self, state: str) -> None:
        if self.json_path:
            write_json(self.json_path, {**self.info, "state": state, "checks": self.rows})

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            err, tol = fn()
            ok = err <= tol
            row = {"check": name, "ok": ok, "rel_err": err, "tol": tol}
        except Exception as e:  # noqa: BLE001 - every failure is reported, the next check still runs
            row = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.rows.append(row)
        self.save("running")
        detail = f"rel_err {row['rel_err']:.2e} (tol {row['tol']:.0e})" if "rel_err" in row else row["error"]
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {name}: {detail}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="smallest shapes: one call per kernel (sanitizer)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not lora_ops.WITH_CUDA:
        print("lora_ops was built without CUDA", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    randn = lambda *s, dt=torch.float32: torch.randn(*s, generator=g).to(dt).to(dev)  # noqa: E731
    c = Checks(args.json, run_info(dev))
    # (N, K): a square-ish layer, and small N with long K so the decode kernel splits K.
    shapes = [(64, 256)] if args.tiny else [(384, 1024), (64, 8192)]
    r = 8

    for n, k in shapes:
        w32 = torch.randn(n, k, generator=g)
        for nested in (False, True):
            wq = lora_ops.quantize_nf4(w32.to(dev), blocksize=64, double_quant=nested)
            def q_check(wq=wq, nested=nested):
                cpu = lora_ops.quantize_nf4(w32, blocksize=64, double_quant=nested)  # CPU kernels: spec-tested
                same = torch.equal(wq.packed.cpu(), cpu.packed) and torch.equal(wq.absmax.cpu(), cpu.absmax)
                return (0.0 if same else 1.0), 0.0
            c.run(f"nf4_quantize{'+double' if nested else ''} {n}x{k} (bytes equal to the CPU kernel)", q_check)
            dense = dense_ref(wq)
            for dt in (torch.bfloat16, torch.float32):
                c.run(f"nf4_dequantize{' nested' if nested else ''} {dt} {n}x{k}",
                      lambda wq=wq, dt=dt, dense=dense: (rel_err(wq.dequantize(dt), dense.to(dt)), 0.0))
        wq = lora_ops.quantize_nf4(w32.to(dev), blocksize=64, double_quant=True)
        dense = dense_ref(wq)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            for m in ([1, 4, 16] if args.tiny else [1, 4, 16, 80]):
                a = randn(m, k, dt=dt)
                s, lw = randn(m, r), randn(n, r, dt=dt)
                dy = randn(m, n, dt=dt)
                for path in (PATHS if dev.type == "cuda" else ["default"]):
                    os.environ["LORA_OPS_QLORA_FORCE"] = path if path != "default" else ""
                    def fwd(a=a, s=s, lw=lw, dt=dt):
                        y = lora_ops.qlora_matmul(a, wq, lora_s=s, lora_w=lw, scale=0.5)
                        e = a.double().cpu() @ dense.to(dt).double().t() + 0.5 * s.double().cpu() @ lw.double().cpu().t()
                        return rel_err(y, e), TOL[dt]
                    def dx(dy=dy, dt=dt):
                        y = lora_ops.qlora_matmul(dy, wq, transpose_w=True)
                        return rel_err(y, dy.double().cpu() @ dense.to(dt).double()), TOL[dt]
                    # The force applies only where the kernel supports the call: tc_decode up to 64
                    # rows (forward and dx), decode up to kDecodeMaxRows = 16 rows forward,
                    # kDecodeMaxRowsT = 4 for dx (qlora_cuda.h); elsewhere the dispatcher's choice runs.
                    if (path != "decode" or m <= 16) and (path != "tc_decode" or m <= 64):
                        c.run(f"qlora_matmul fwd {path} {str(dt)[6:]} M={m} {n}x{k}", fwd)
                    if path in ("mma", "slab", "ffma") or (path == "decode" and m <= 4) or (path == "tc_decode" and m <= 64):
                        c.run(f"qlora_matmul dx  {path} {str(dt)[6:]} M={m} {n}x{k}", dx)
        os.environ["LORA_OPS_QLORA_FORCE"] = ""

        def linear_fwd_bwd(dt=torch.bfloat16, p=0.1):
            m = 8
            x = randn(m, k, dt=dt).requires_grad_()
            A = (randn(r, k) * 0.05).requires_grad_()
            B = (randn(n, r) * 0.05).requires_grad_()
            rng = lora_ops.make_rng(1234)
            y = lora_ops.qlora_linear(x, wq, A, B, scale=2.0, dropout_p=p, rng=rng)
            dy = randn(m, n, dt=dt)
            y.backward(dy)
            seed, off = (int(v) for v in rng)
            xr, Ar, Br = (t.detach().cpu().double().requires_grad_() for t in (x, A, B))
            yr, _ = ref.qlora_linear(xr, dense.to(dt), Ar, Br, 2.0, None, p, seed, off)
            yr.backward(dy.cpu().double())
            return max(rel_err(y, yr), rel_err(x.grad, xr.grad), rel_err(A.grad, Ar.grad), rel_err(B.grad, Br.grad)), TOL[dt]
        c.run(f"qlora_linear fwd+bwd bf16 dropout 0.1 {n}x{k}", linear_fwd_bwd)

    def adamw():
        # One step from a known state (step 3, m = 0.01, v = 0.02) against torch.optim.AdamW's math in
        # float64; the float32 parameter must match closely, the bf16 one to its rounding.
        lr, b1, b2, wd, eps, step = 1e-3, 0.9, 0.999, 0.01, 1e-8, 3.0
        p32, g32 = randn(1000), randn(1000)
        params = [p32.clone(), p32.to(torch.bfloat16)]
        grads = [g32.clone(), g32.to(torch.bfloat16)]
        m = [torch.full((1000,), 0.01, device=dev) for _ in params]
        v = [torch.full((1000,), 0.02, device=dev) for _ in params]
        h = torch.tensor([[lr, b1, b2, wd, eps, step, 0.0]] * 2, dtype=torch.float64)
        base = [t.double().cpu() for t in params]
        lora_ops.adamw_step_(params, grads, m, v, h)
        errs = []
        for i in range(2):
            g_ = grads[i].double().cpu()
            mm, vv = b1 * 0.01 + (1 - b1) * g_, b2 * 0.02 + (1 - b2) * g_ * g_
            pe = base[i] * (1 - lr * wd) - lr * (mm / (1 - b1**step)) / ((vv / (1 - b2**step)).sqrt() + eps)
            errs.append(rel_err(params[i], pe) / (1e-6 if i == 0 else 1e-2))
        return max(errs), 1.0  # errors in units of each dtype's tolerance
    c.run("adamw_step_ f32 + bf16", adamw)

    if dev.type == "cuda":
        def managed():
            t = lora_ops.ops.adamw.managed_empty(4096, dev.index or 0)
            t.copy_(torch.arange(4096, dtype=torch.float32, device=dev))
            if lora_ops.ops.adamw.managed_concurrent_access(dev.index or 0):
                lora_ops.ops.adamw.managed_prefetch_(t, to_host=True)
                lora_ops.ops.adamw.managed_prefetch_(t, to_host=False)
            torch.cuda.synchronize()
            return rel_err(t, torch.arange(4096, dtype=torch.float64)), 0.0
        c.run("managed_empty + prefetch", managed)
        torch.cuda.synchronize()

    bad = [r_["check"] for r_ in c.rows if not r_["ok"]]
    c.save("done")
    print(f"gpu_smoke: {len(c.rows) - len(bad)}/{len(c.rows)} ok" + (f"; FAILED: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
