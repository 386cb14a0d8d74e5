#!/usr/bin/env python3
"""NF4 dequantize / quantize benchmark: lora_ops vs bitsandbytes, against a copy-bandwidth ceiling.

On a GPU: Llama-shaped weights (4096x4096, 4096x14336, 14336x4096, 8192x28672), bf16 output,
double quantization off and on, median time per call from CUDA events over input sets rotated so
they do not all sit in L2; achieved GB/s (bytes read + written); % of a device-to-device copy's
bandwidth measured in the same run; speedup over bitsandbytes' dequantize_4bit / quantize_4bit
when importable, and whether its dequantized bits equal ours.
Without a GPU the same table is produced for the CPU kernels (smaller shapes with --quick).

Usage: python bench/bench_nf4.py [--out DIR] [--quick] [--device cpu|cuda] [--reps N]
Writes DIR/bench_nf4.json and DIR/bench_nf4.md when --out is given; prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import bench_common as bc  # first: source tree on sys.path, poisoning off
import torch

import lora_ops

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
CPU_SHAPES = [(4096, 4096), (4096, 14336)]
QUICK_CPU_SHAPES = [(512, 1024), (1024, 2048)]
BLOCKSIZE = 64
OUT_DTYPE = torch.bfloat16
ROTATE_BYTES = 512 << 20  # input sets rotate over at least this many bytes: far beyond any L2


def try_import_bnb():
    try:
        import bitsandbytes.functional as F  # noqa: PLC0415

        return F
    except Exception:  # noqa: BLE001 - any import problem means "no baseline"
        return None


def try_import_torchao():
    """torchao's to_nf4 (its NF4Tensor: blocksize 64, int8 scalers per 256 blocks; not byte-compatible
    with the spec, a speed witness only), or None when torchao is not installed (bench extra)."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: PLC0415

        return to_nf4
    except Exception:  # noqa: BLE001 - any import problem means "no baseline"
        return None


class Timer:
    """Median seconds per call of fn(arg) over rotating args (bench_common.rotating_seconds)."""

    def __init__(self, device: str, reps: int, warmup: int = 3):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn, args: list) -> float:
        return bc.rotating_seconds(fn, args, self.device, self.reps, self.warmup)


def copy_bandwidth(device: str, timer: Timer) -> float:
    """Bytes read + written per second of a large same-device copy: the achievable ceiling."""
    n = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    t = timer(lambda _: dst.copy_(src), [None])
    return 2 * n / t


def make_sets(shape, device, n_sets, dtype=torch.bfloat16):
    return [torch.randn(shape, device=device, dtype=torch.float32).mul_(0.02).to(dtype) for _ in range(n_sets)]


def dequant_bytes(n: int, nested: bool) -> int:
    nb = -(-n // BLOCKSIZE)
    state = nb + 4 * -(-nb // 256) + 256 * 4 + 4 if nested else 4 * nb
    return (n + 1) // 2 + state + n * OUT_DTYPE.itemsize


def quant_bytes(n: int, nested: bool) -> int:
    nb = -(-n // BLOCKSIZE)
    extra = (4 * nb + nb + 4 * -(-nb // 256)) if nested else 0  # the double-quant pass reads absmax, writes codes
    return n * 2 + (n + 1) // 2 + 4 * nb + extra


def header(device: str) -> dict:
    h = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
         "git_commit": bc.git_commit() or "unknown"}
    if device == "cuda":
        h["device_name"] = torch.cuda.get_device_name()
        h["cuda"] = torch.version.cuda
        h["driver"] = bc.gpu_driver() or "unknown"
    else:
        h["device_name"] = bc.cpu_model()
        h["cpu_threads"] = torch.get_num_threads()
        h["malloc"] = bc.malloc_library()  # a fresh output's first-touch cost depends on it
    h["bitsandbytes"] = bc.bnb_version() if try_import_bnb() else None
    if try_import_torchao() is not None:
        import torchao  # noqa: PLC0415

        h["torchao"] = torchao.__version__
    return h


def run(device: str, shapes, reps: int) -> dict:
    timer = Timer(device, reps)
    F = try_import_bnb()
    to_nf4 = try_import_torchao()
    copy_bw = copy_bandwidth(device, timer)
    rows = []
    for shape in shapes:
        n = math.prod(shape)
        per_set = n * 2 + n // 2 + n * OUT_DTYPE.itemsize
        n_sets = max(2, min(8, -(-ROTATE_BYTES // per_set))) if device == "cuda" else 2
        ws = make_sets(shape, device, n_sets)
        # The ceiling of an op that returns a NEW tensor of this size: clone() allocates and first-touches
        # its output like dequantize does (on the CPU, fresh pages fault in on the first write: for large
        # outputs that, not the decode, is most of the time).
        like = torch.zeros(n, dtype=OUT_DTYPE, device=device)
        clone_bw = 2 * n * OUT_DTYPE.itemsize / timer(lambda _: like.clone(), [None])
        del like
        for nested in (False, True):
            qs = [lora_ops.quantize_nf4(w, BLOCKSIZE, double_quant=nested) for w in ws]
            row = {"shape": list(shape), "double_quant": nested, "out_dtype": str(OUT_DTYPE).replace("torch.", "")}

            def ours_deq(q):
                return lora_ops.nf4_dequantize(q.packed, q.absmax, q.blocksize, q.shape, OUT_DTYPE,
                                               q.absmax2, q.nested_code, q.offset)

            t = timer(ours_deq, qs)
            row["dequant_ms"] = t * 1e3
            row["dequant_GBps"] = dequant_bytes(n, nested) / t / 1e9
            row["dequant_pct_copy"] = 100 * dequant_bytes(n, nested) / t / copy_bw
            row["clone_GBps"] = clone_bw / 1e9
            row["dequant_pct_clone"] = 100 * dequant_bytes(n, nested) / t / clone_bw

            # Into an existing output (out=, as bnb's dequantize_4bit(out=...)): what copy_ is measured as.
            outs = [torch.empty(shape, dtype=OUT_DTYPE, device=device) for _ in qs]
            for o in outs:
                o.fill_(1.0)  # first touch outside the timing, as copy_'s destination
            pairs = list(zip(qs, outs))
            t = timer(lambda qo: qo[0].dequantize(out=qo[1]), pairs)
            row["dequant_into_ms"] = t * 1e3
            row["dequant_into_pct_copy"] = 100 * dequant_bytes(n, nested) / t / copy_bw
            del outs, pairs

            t = timer(lambda w: lora_ops.quantize_nf4(w, BLOCKSIZE, double_quant=nested), ws)
            row["quant_ms"] = t * 1e3
            row["quant_GBps"] = quant_bytes(n, nested) / t / 1e9

            if nested and to_nf4 is not None:  # torchao's NF4 is always double-quantized
                tq = [to_nf4(w.to(OUT_DTYPE), BLOCKSIZE, 256) for w in ws]
                tt = timer(lambda t4: t4.get_original_weight(), tq)
                row["torchao_dequant_ms"] = tt * 1e3
                row["dequant_speedup_vs_torchao"] = tt / (row["dequant_ms"] / 1e3)
                del tq
            if F is not None:
                try:
                    bq = [F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type="nf4")
                          for w in ws]
                    tb = timer(lambda pq: F.dequantize_4bit(pq[0], pq[1]), bq)
                    row["bnb_dequant_ms"] = tb * 1e3
                    row["dequant_speedup_vs_bnb"] = tb / (row["dequant_ms"] / 1e3)
                    # Same quantized state through both decoders: their bits must agree (spec section 4).
                    row["dequant_bits_equal_bnb"] = bool(torch.equal(
                        ours_deq(qs[0]).view(torch.int16), F.dequantize_4bit(*qs[0].to_bnb()).view(torch.int16)))
                    tbq = timer(lambda w: F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=nested,
                                                          quant_type="nf4"), ws)
                    row["bnb_quant_ms"] = tbq * 1e3
                    row["quant_speedup_vs_bnb"] = tbq / (row["quant_ms"] / 1e3)
                except Exception as e:  # noqa: BLE001 - a broken baseline must not hide our numbers
                    row["bnb_error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            del qs
        del ws
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"copy_GBps": copy_bw / 1e9, "blocksize": BLOCKSIZE, "reps": reps, "rows": rows}


def markdown(h: dict, res: dict) -> str:
    lines = [f"# NF4 benchmark ({h['device_name']}, {h['device']})", "",
             "| " + " | ".join(f"{k}: {v}" for k, v in h.items() if k not in ("device_name",)) + " |", "",
             f"Device copy bandwidth (read + write) measured in this run: {res['copy_GBps']:.3g} GB/s. "
             f"Blocksize {res['blocksize']}, median of {res['reps']} passes over rotating inputs. "
             "% copy: of that copy into an existing buffer; % clone: of clone() of a tensor the size of the "
             "output, measured per shape (allocation and first touch included, as for dequantize); into: "
             "dequantize(out=) into an existing output, and its % of the copy bandwidth; torchao: its NF4Tensor's "
             "get_original_weight() (double quant only).", "",
             "| shape | dq | dequant ms | GB/s | % copy | % clone | into ms | into % copy | bnb ms | speedup | bits = bnb | torchao ms | speedup | quant ms | bnb quant ms | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    for r in res["rows"]:
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {'on' if r['double_quant'] else 'off'} | {r['dequant_ms']:.3f} | "
            f"{r['dequant_GBps']:.3g} | {r['dequant_pct_copy']:.3g}% | {r['dequant_pct_clone']:.3g}% | "
            f"{f(r, 'dequant_into_ms', '.3f')} | {f(r, 'dequant_into_pct_copy', '.3g')}% | "
            f"{f(r, 'bnb_dequant_ms', '.3f')} | "
            f"{f(r, 'dequant_speedup_vs_bnb', '.2f')} | {r.get('dequant_bits_equal_bnb', '-')} | "
            f"{f(r, 'torchao_dequant_ms', '.3f')} | {f(r, 'dequant_speedup_vs_torchao', '.1f')} | {r['quant_ms']:.3f} | "
            f"{f(r, 'bnb_quant_ms', '.3f')} | {f(r, 'quant_speedup_vs_bnb', '.2f')} |")
        if "bnb_error" in r:
            lines.append(f"| | bnb failed: {r['bnb_error']} ||||||||||||||")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for bench_nf4.json and bench_nf4.md")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (CPU smoke run)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not (torch.cuda.is_available() and lora_ops.WITH_CUDA):
        print("bench_nf4: --device cuda needs a GPU and a CUDA build of lora_ops", file=sys.stderr)
        return 1
    if args.device == "cuda":
        shapes = GPU_SHAPES[:2] if args.quick else GPU_SHAPES
    else:
        shapes = QUICK_CPU_SHAPES if args.quick else CPU_SHAPES
    reps = args.reps or (3 if args.quick else (50 if args.device == "cuda" else 5))
    torch.manual_seed(0)
    h = header(args.device)
    res = run(args.device, shapes, reps)
    md = markdown(h, res)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_nf4.json").write_text(json.dumps({"header": h, **res}, indent=1))
        (args.out / "bench_nf4.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
