"""Benchmark of one fused QLoRA linear layer (lora_ops) against the unfused baselines.

Methods (all with the same LoRA adapter, dropout 0, scale alpha/r):
    ours        lora_ops.qlora_linear (fused NF4 dequant-GEMM + LoRA epilogue; custom backward)
    bnb_peft    (a) bitsandbytes matmul_4bit + PEFT's LoRA path: lora_B(lora_A(x.to(A.dtype))) * scale
    bnb_packed  (a') forward only, CPUs with avx512_bf16: the same after bitsandbytes' CPU repack (what its
                Linear4bit.forward does in eval mode under no_grad there; bf16 absmax, lossy)
    torchao     (t) forward only, when torchao is installed (bench extra): torchao's NF4Tensor (its own
                double-quantized NF4 layout, not byte-compatible) through its linear_nf4 + the same LoRA path
    dense       (b) dense matmul on the original-dtype weight + the same LoRA path
    deq_mm      (c) lora_ops nf4_dequantize to x's dtype + matmul + the same LoRA path

Each row: median time (methods timed round-robin) of forward and of forward+backward (x, A, B require grad), achieved GB/s (bytes
read: packed weight + absmax state + x + A + B, bytes written: y) and TFLOP/s (2·M·N·K + LoRA), the
share of the ceilings measured in the same run (a large copy, a large matmul), speedups over each
baseline, and (GPU) the peak memory of a forward+backward.

    python bench/bench_qlora.py --quick --out bench/results/cpu          # CPU: 4096², M 1/16/256, r 16
    python bench/bench_qlora.py --device cuda --out bench/results/h100   # full sweep on a GPU

Writes <out>/bench_qlora.json and <out>/bench_qlora.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import bench_common as bc  # first: source tree on sys.path, poisoning off
import torch

from lora_ops.nf4 import NF4Weight, quantize_nf4
from lora_ops.ops.qlora import qlora_linear

LLAMA_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]  # (N = out, K = in)
FWD_ONLY = ("bnb_packed", "torchao")  # timed for the forward only
# Timed in a round-robin of its own with ours (its own ours time kept apart): torchao's linear_nf4
# allocates and frees a dense W per call, which changed the other methods' times when it ran among them.
APART = ("torchao",)
FULL_MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]


def peak_memory(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    bc.sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    bc.sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def ceilings(device, dtype, min_time) -> dict:
    """Bandwidth of a large copy and throughput of a large matmul, measured now on this device."""
    n = (256 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = bc.median_ms(lambda: dst.copy_(src), min_time)
    size = 8192 if device.type == "cuda" else 1024
    mdt = dtype if device.type == "cuda" else torch.float32  # CPU bf16 GEMM is not the CPU's ceiling
    a = torch.randn(size, size, device=device).to(mdt)
    tm = bc.median_ms(lambda: a @ a, min_time)
    return {
        "copy_GBps": 2 * n * 4 / t / 1e6,
        "matmul_TFLOPs": 2 * size**3 / tm / 1e9,
        "matmul_dtype": str(mdt),
    }


# ---- the methods ------------------------------------------------------------------------------------
class Layer:
    """One layer's weights in every form the methods need."""

    def __init__(self, n, k, r, dtype, device, need_bnb):
        g = torch.Generator(device="cpu").manual_seed(0)
        w = (torch.randn(n, k, generator=g) * 0.02).to(dtype).to(device)
        self.n, self.k, self.r, self.dtype, self.device = n, k, r, dtype, device
        self.scale = 2.0
        self.A = (torch.randn(r, k, generator=g) / k**0.5).to(device)  # PEFT keeps adapters in fp32
        self.B = (torch.randn(n, r, generator=g) * 0.01).to(device)
        self.dense = w
        self.bnb = self.bnb_packed = None
        if need_bnb:
            import bitsandbytes.functional as F

            q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            self.bnb = (q, qs)
            self.nf4 = NF4Weight.from_bnb(q, qs)  # same bytes for every method
            if device.type == "cpu" and F.has_avx512bf16() and n % 32 == 0:  # its repack needs N % 32 == 0
                import copy

                self.bnb_packed = F._convert_weight_packed_for_cpu(q.clone(), copy.deepcopy(qs))
        else:
            self.nf4 = quantize_nf4(w, 64, True)
        self.torchao = torchao_nf4(w)
        del w

    def lora(self, x, A, B):  # PEFT's path: lora_B(lora_A(dropout(x))) * scaling, in the adapter dtype
        return ((x.to(A.dtype) @ A.t()) @ B.t()) * self.scale

    def methods(self):
        out = {"ours": lambda x, A, B: qlora_linear(x, self.nf4, A, B, self.scale)}
        if self.bnb is not None:
            import bitsandbytes as bnb

            q, qs = self.bnb
            out["bnb_peft"] = lambda x, A, B: (
                bnb.matmul_4bit(x, q.t(), quant_state=qs) + self.lora(x, A, B).to(x.dtype)
            )
        if self.bnb_packed is not None:
            import bitsandbytes as bnb

            pq, pqs = self.bnb_packed
            out["bnb_packed"] = lambda x, A, B: (
                bnb.matmul_4bit(x, pq, quant_state=pqs) + self.lora(x, A, B).to(x.dtype)
            )
        if self.torchao is not None:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

            out["torchao"] = lambda x, A, B: linear_nf4(x, self.torchao) + self.lora(x, A, B).to(x.dtype)
        out["dense"] = lambda x, A, B: x @ self.dense.t() + self.lora(x, A, B).to(x.dtype)
        out["deq_mm"] = lambda x, A, B: x @ self.nf4.dequantize(x.dtype).t() + self.lora(x, A, B).to(x.dtype)
        return out

    def bytes_moved(self, m):
        es = torch.tensor([], dtype=self.dtype).element_size()
        return self.nf4.nbytes + (m * self.k + m * self.n) * es + (self.A.numel() + self.B.numel()) * 4

    def flops(self, m):
        return 2 * m * self.n * self.k + 2 * m * self.r * (self.k + self.n)


def torchao_nf4(w):
    """torchao's NF4Tensor of w (blocksize 64, scaler blocks 256, as QLoRA), or None without torchao."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except Exception:  # noqa: BLE001 - not installed or not importable here: no such baseline
        return None
    return to_nf4(w, 64, 256)


def save(result, out_dir) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_qlora.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(out_dir, "bench_qlora.md"), "w") as f:
        f.write(markdown(result))


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    have_bnb = bc.bnb_version() is not None
    env = environment(device)
    env["ceilings"] = ceilings(device, dtype, args.min_time)
    print(json.dumps(env, indent=1), flush=True)
    rows = []
    result = {"environment": env, "rows": rows, "args": {k: v for k, v in vars(args).items()}}
    for n, k in args.shapes:
        for r in args.ranks:
            layer = Layer(n, k, r, dtype, device, have_bnb)
            for m in args.ms:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(device)
                row = {"N": n, "K": k, "M": m, "r": r, "dtype": args.dtype}
                methods = layer.methods()
                fwd = {
                    name: (lambda fn=fn, x=x, A=layer.A, B=layer.B: fn(x, A, B))
                    for name, fn in methods.items()
                }
                with torch.no_grad():
                    main = {name: f for name, f in fwd.items() if name not in APART}
                    for name, t in bc.interleaved_ms(main, device, args.min_time).items():
                        row[f"{name}_fwd_ms"] = t
                    for name in (n for n in APART if n in fwd):
                        pair = bc.interleaved_ms({"ours": fwd["ours"], name: fwd[name]}, device, args.min_time)
                        row[f"{name}_fwd_ms"] = pair[name]
                        row[f"ours_fwd_ms_beside_{name}"] = pair["ours"]
                if not args.no_backward:
                    xg = x.clone().requires_grad_()
                    A, B = layer.A.clone().requires_grad_(), layer.B.clone().requires_grad_()
                    dy = torch.randn(m, n, device=device).to(dtype)

                    def make_fwd_bwd(fn, xg=xg, A=A, B=B, dy=dy):
                        def fwd_bwd():
                            xg.grad = A.grad = B.grad = None
                            fn(xg, A, B).backward(dy)

                        return fwd_bwd

                    fb = {name: make_fwd_bwd(fn) for name, fn in methods.items() if name not in FWD_ONLY}
                    for name, t in bc.interleaved_ms(fb, device, args.min_time).items():
                        row[f"{name}_fwdbwd_ms"] = t
                    for name, f in fb.items():
                        mem = peak_memory(f, device)
                        if mem is not None:
                            row[f"{name}_fwdbwd_peak_MiB"] = mem / 2**20
                t = row["ours_fwd_ms"]
                row["ours_fwd_GBps"] = layer.bytes_moved(m) / t / 1e6
                row["ours_fwd_TFLOPs"] = layer.flops(m) / t / 1e9
                row["ours_fwd_pct_copy_bw"] = 100 * row["ours_fwd_GBps"] / env["ceilings"]["copy_GBps"]
                row["ours_fwd_pct_matmul"] = 100 * row["ours_fwd_TFLOPs"] / env["ceilings"]["matmul_TFLOPs"]
                for base in ("bnb_peft", "bnb_packed", "torchao", "dense", "deq_mm"):
                    for ph in ("fwd", "fwdbwd"):
                        ours_key = f"ours_{ph}_ms_beside_{base}" if base in APART else f"ours_{ph}_ms"
                        if f"{base}_{ph}_ms" in row and ours_key in row:
                            row[f"speedup_{ph}_vs_{base}"] = row[f"{base}_{ph}_ms"] / row[ours_key]
                rows.append(row)
                print(summary_line(row), flush=True)
                save(result, args.out)  # partial results survive an interrupted sweep
            del layer
    return result


def summary_line(row) -> str:
    parts = [f"N={row['N']} K={row['K']} M={row['M']} r={row['r']}"]
    for name in ("ours", "bnb_peft", "bnb_packed", "torchao", "dense", "deq_mm"):
        if f"{name}_fwd_ms" in row:
            s = f"{name} {row[f'{name}_fwd_ms']:.2f}"
            if f"{name}_fwdbwd_ms" in row:
                s += f"/{row[f'{name}_fwdbwd_ms']:.2f}"
            parts.append(s)
    return " | ".join(parts) + " ms (fwd/fwd+bwd)"


def environment(device) -> dict:
    cpu = f"{bc.cpu_model()} ({os.cpu_count()} logical cores)"
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lora_ops_commit": bc.git_commit() or "unknown",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cpu":
        from lora_ops import _native

        env["lora_ops_cpu_kernels"] = _native.CPU_SIMD
        env["malloc"] = bc.malloc_library()
    if bc.bnb_version() is not None:
        env["bitsandbytes"] = bc.bnb_version()
        if device.type == "cpu":
            import bitsandbytes.functional as F

            env["bnb_cpu_packed_path"] = bool(F.has_avx512bf16())
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except Exception:  # noqa: BLE001 - an optional baseline
        pass
    if device.type == "cuda":
        env["driver"] = bc.gpu_driver()
    return env


def markdown(result) -> str:
    env, rows = result["environment"], result["rows"]
    c = env["ceilings"]
    lines = [
        "# QLoRA linear benchmark",
        "",
        f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}); threads {env['threads']}; "
        f"bitsandbytes {env.get('bitsandbytes', 'n/a')}; torchao {env.get('torchao', 'n/a')}; "
        f"lora_ops commit {env['lora_ops_commit'][:12]}; "
        f"lora_ops CPU kernels {env.get('lora_ops_cpu_kernels', 'n/a')}; "
        f"bnb CPU packed path {env.get('bnb_cpu_packed_path', 'n/a')}.",
        f"Ceilings measured in this run: copy {c['copy_GBps']:.1f} GB/s, matmul {c['matmul_TFLOPs']:.3f} TFLOP/s "
        f"({c['matmul_dtype']}).",
        "",
        "Times are medians in ms (forward / forward+backward). Speedup = baseline time / ours. torchao (t) "
        "is timed in a round-robin of its own with ours (its speedup uses that ours time).",
        "",
    ]
    has_mem = any("ours_fwdbwd_peak_MiB" in r for r in rows)
    head = [
        "N×K",
        "M",
        "r",
        "ours",
        "bnb+PEFT (a)",
        "bnb packed (a')",
        "torchao (t)",
        "dense (b)",
        "deq+mm (c)",
        "ours GB/s",
        "ours TFLOP/s",
        "× vs (a) fwd",
        "× vs (a) f+b",
        "× vs (a') fwd",
        "× vs (t) fwd",
        "× vs (b) f+b",
        "× vs (c) fwd",
    ]
    if has_mem:
        head += ["peak MiB ours", "peak MiB (a)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ms(r, name):
        if f"{name}_fwd_ms" not in r:
            return "n/a"
        s = f"{r[f'{name}_fwd_ms']:.2f}"
        return s + (f" / {r[f'{name}_fwdbwd_ms']:.2f}" if f"{name}_fwdbwd_ms" in r else "")

    def sp(r, key):
        return f"{r[key]:.2f}" if key in r else "n/a"

    for r in rows:
        cells = [
            f"{r['N']}×{r['K']}",
            str(r["M"]),
            str(r["r"]),
            ms(r, "ours"),
            ms(r, "bnb_peft"),
            ms(r, "bnb_packed"),
            ms(r, "torchao"),
            ms(r, "dense"),
            ms(r, "deq_mm"),
            f"{r['ours_fwd_GBps']:.1f}",
            f"{r['ours_fwd_TFLOPs']:.4f}",
            sp(r, "speedup_fwd_vs_bnb_peft"),
            sp(r, "speedup_fwdbwd_vs_bnb_peft"),
            sp(r, "speedup_fwd_vs_bnb_packed"),
            sp(r, "speedup_fwd_vs_torchao"),
            sp(r, "speedup_fwdbwd_vs_dense"),
            sp(r, "speedup_fwd_vs_deq_mm"),
        ]
        if has_mem:
            cells += [
                f"{r.get('ours_fwdbwd_peak_MiB', float('nan')):.0f}",
                f"{r.get('bnb_peft_fwdbwd_peak_MiB', float('nan')):.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="CPU smoke sweep: 4096x4096, M in 1/16/256, r=16")
    ap.add_argument("--shapes", default=None, help="comma list of NxK (out x in), e.g. 4096x4096,14336x4096")
    ap.add_argument("--ms", default=None, help="comma list of M")
    ap.add_argument("--ranks", default=None, help="comma list of r")
    ap.add_argument(
        "--min-time", type=float, default=None, help="seconds per measurement (default 1 CPU, 0.3 GPU)"
    )
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--out", default="bench/results/latest")
    a = ap.parse_args(argv)
    if a.quick:
        a.shapes, a.ms, a.ranks = a.shapes or "4096x4096", a.ms or "1,16,256", a.ranks or "16"
    a.shapes = bc.parse_shapes(a.shapes) or LLAMA_SHAPES
    a.ms = bc.parse_ints(a.ms) or FULL_MS
    a.ranks = bc.parse_ints(a.ranks) or [16, 64]
    if a.min_time is None:
        a.min_time = 1.0 if a.device == "cpu" else 0.3
    return a


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    result = run(args)
    save(result, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
