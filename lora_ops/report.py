"""One benchmark report: ``python -m lora_ops report [--quick] [--out DIR]``.

Runs the three benchmarks of a source checkout — storage (``bench/bench_nf4.py``), fused linear
(``bench/bench_qlora.py``) and optimizer (``bench/bench_optim.py``) — each in its own process on the
device that is present (a missing or failing one is reported, not fatal), then writes into DIR:

    report.md      header (device, driver, torch, CUDA, lora_ops, git commit) + every table + plots
    results.json   the same header and each benchmark's raw JSON
    speedup_vs_bnb.png   fused linear: speedup over bitsandbytes + PEFT against M, one panel per shape
    roofline.png         fraction of the roofline (max of % copy bandwidth and % matmul peak measured
                         in the same run) for the fused linear over M, NF4 dequantize, optimizer step
    raw/<bench>/         each benchmark's own JSON + markdown + log

A source-checkout tool: where none of the requested ``bench/`` scripts exists (an installed wheel
ships none) it prints why and exits with status 2 instead of reporting nothing.

DIR defaults to ``bench/results/<device>`` (e.g. ``bench/results/nvidia-h100-80gb-hbm3``), where GPU
reports are committed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# name -> (title, script, JSON file it writes into its --out folder)
BENCHES: dict[str, tuple[str, str, str]] = {
    "storage": ("NF4 storage (quantize / dequantize)", "bench/bench_nf4.py", "bench_nf4.json"),
    "linear": ("Fused QLoRA linear", "bench/bench_qlora.py", "bench_qlora.json"),
    "optimizer": ("Paged AdamW", "bench/bench_optim.py", "results.json"),
}


# ---- header -------------------------------------------------------------------------------------------
def header(device: str) -> dict:
    """Everything needed to know what a number was measured on."""
    import lora_ops
    from lora_ops import env

    h = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else env.cpu_model(),
        "driver": env.gpu_driver() if device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lora_ops": lora_ops.__version__,
        "lora_ops_with_cuda": bool(lora_ops.WITH_CUDA),
        "git_commit": env.git_commit(REPO),
        "cpu": env.cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    # CPU SIMD, the kernel paths chosen, and bitsandbytes' version and CPU paths (repack or not).
    facts = env.describe()
    h.update({k: facts.get(k) for k in ("cpu_simd_flags", "lora_ops_cpu_kernels", "torch_cpu_capability",
                                        "bitsandbytes", "bnb_cpu_repack_path", "bnb_cpu_avx512_kernels")})
    return h


def device_slug(h: dict) -> str:
    name = h["device_name"] if h["device"] == "cuda" else f"cpu-{h['device_name']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


# ---- running the benchmarks -----------------------------------------------------------------------------
def run_bench(name: str, out: Path, quick: bool, device: str, timeout: float, index: int, total: int) -> dict:
    title, script, json_name = BENCHES[name]
    path = REPO / script
    result: dict = {"title": title, "script": script}
    if not path.exists():
        print(f"[{index}/{total}] {title}: {script} not found, skipped", flush=True)
        return {**result, "status": "missing"}
    raw = out / "raw" / name
    raw.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(path), "--out", str(raw), "--device", device] + (["--quick"] if quick else [])
    print(f"[{index}/{total}] {title}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    log_lines: list[str] = []
    try:
        with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # progress: stream the benchmark's own output, indented
                log_lines.append(line)
                print(f"    {line.rstrip()}"[:200], flush=True)
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    break
            rc = proc.wait()
    except OSError as e:
        rc, log_lines = -1, [f"{type(e).__name__}: {e}\n"]
    seconds = time.perf_counter() - t0
    (raw / "log.txt").write_text("".join(log_lines))
    result.update(seconds=round(seconds, 1), exit_code=rc)
    data_path = raw / json_name
    if rc != 0 or not data_path.exists():
        why = "timed out" if seconds > timeout else f"exit code {rc}"
        print(f"[{index}/{total}] {title}: FAILED ({why}); log in {raw / 'log.txt'}", flush=True)
        return {**result, "status": "failed", "error": why, "log_tail": "".join(log_lines[-15:])}
    result["data"] = json.loads(data_path.read_text())
    md = sorted(raw.glob("*.md"))
    result["markdown"] = md[0].read_text() if md else None
    print(f"[{index}/{total}] {title}: done in {seconds:.0f} s", flush=True)
    return {**result, "status": "ok"}


# ---- plots -----------------------------------------------------------------------------------------------
def _linear_rows(results: dict) -> list[dict]:
    b = results.get("linear", {})
    return b.get("data", {}).get("rows", []) if b.get("status") == "ok" else []


def _shape_key(row: dict) -> str:
    return f"{row['N']}x{row['K']} r={row['r']}"


def plot_speedup(results: dict, path: Path, h: dict) -> bool:
    rows = [r for r in _linear_rows(results) if "speedup_fwd_vs_bnb_peft" in r]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({_shape_key(r) for r in rows})
    cols = min(3, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        sel = sorted((r for r in rows if _shape_key(r) == shape), key=lambda r: r["M"])
        ms = [r["M"] for r in sel]
        for key, label in (("speedup_fwd_vs_bnb_peft", "forward"), ("speedup_fwdbwd_vs_bnb_peft", "fwd+bwd")):
            if all(key in r for r in sel):
                ax.plot(ms, [r[key] for r in sel], marker="o", label=label)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"W {shape}", fontsize=9)
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("speedup vs bnb + PEFT")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    fig.suptitle(f"lora_ops fused QLoRA linear vs bitsandbytes matmul_4bit + PEFT LoRA — {h['device_name']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_roofline(results: dict, path: Path, h: dict) -> bool:
    """Fraction of the roofline = max(achieved GB/s / copy GB/s, achieved FLOP/s / matmul FLOP/s), both
    ceilings measured in the same run by each benchmark."""
    panels = []
    lin = [r for r in _linear_rows(results) if "ours_fwd_pct_copy_bw" in r]
    if lin:
        panels.append("linear")
    st = results.get("storage", {})
    st_rows = st.get("data", {}).get("rows", []) if st.get("status") == "ok" else []
    if st_rows:
        panels.append("storage")
    op = results.get("optimizer", {})
    op_rows = [r for r in (op.get("data", {}).get("rows", []) if op.get("status") == "ok" else [])
               if "pct_of_copy_bw" in r]
    if op_rows:
        panels.append("optimizer")
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if panel == "linear":
            for shape in sorted({_shape_key(r) for r in lin}):
                sel = sorted((r for r in lin if _shape_key(r) == shape), key=lambda r: r["M"])
                frac = [max(r["ours_fwd_pct_copy_bw"], r.get("ours_fwd_pct_matmul", 0.0)) / 100 for r in sel]
                ax.plot([r["M"] for r in sel], frac, marker="o", label=shape)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (rows of x)")
            ax.set_title("fused QLoRA linear, forward", fontsize=9)
        elif panel == "storage":
            labels = [f"{r['shape'][0]}x{r['shape'][1]}\ndq {'on' if r['double_quant'] else 'off'}" for r in st_rows]
            ax.bar(range(len(st_rows)), [r["dequant_pct_copy"] / 100 for r in st_rows])
            ax.set_xticks(range(len(st_rows)), labels, fontsize=7)
            ax.set_title("NF4 dequantize (of copy bandwidth)", fontsize=9)
        else:
            labels = [f"{r.get('set', '')}\n{r.get('optimizer', '')}"[:40] for r in op_rows]
            ax.bar(range(len(op_rows)), [r["pct_of_copy_bw"] / 100 for r in op_rows])
            ax.set_xticks(range(len(op_rows)), labels, fontsize=6, rotation=30, ha="right")
            ax.set_title("AdamW step (of copy bandwidth)", fontsize=9)
        ax.set_ylabel("fraction of roofline")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if panel == "linear":
            ax.legend(fontsize=7)
    fig.suptitle(f"Fraction of the measured roofline — {h['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- markdown ----------------------------------------------------------------------------------------------
def _summary(name: str, b: dict) -> str | None:
    rows = b.get("data", {}).get("rows", [])
    if name == "linear":
        sp = sorted(r["speedup_fwd_vs_bnb_peft"] for r in rows if "speedup_fwd_vs_bnb_peft" in r)
        if sp:
            return (f"forward speedup over bitsandbytes + PEFT: median {sp[len(sp) // 2]:.2f}x "
                    f"(min {sp[0]:.2f}x, max {sp[-1]:.2f}x) over {len(sp)} rows")
    if name == "storage":
        sp = sorted(r["dequant_speedup_vs_bnb"] for r in rows if "dequant_speedup_vs_bnb" in r)
        eq = [r["dequant_bits_equal_bnb"] for r in rows if "dequant_bits_equal_bnb" in r]
        if sp:
            return (f"dequantize speedup over bitsandbytes: median {sp[len(sp) // 2]:.2f}x; "
                    f"bits equal to bitsandbytes in {sum(eq)}/{len(eq)} rows")
    return None


def markdown(h: dict, results: dict, plots: list[str], quick: bool) -> str:
    lines = [f"# lora_ops benchmark report — {h['device_name']}", ""]
    lines += ["| " + " | ".join(str(k) for k in h) + " |", "|" + "---|" * len(h),
              "| " + " | ".join("-" if v is None else str(v) for v in h.values()) + " |", ""]
    if quick:
        lines += ["Quick mode: small shapes and few repetitions (a smoke run, not a measurement to quote).", ""]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    for name, b in results.items():
        lines += [f"## {b['title']}", ""]
        if b["status"] == "missing":
            lines += [f"`{b['script']}` is not in this checkout: not run.", ""]
            continue
        if b["status"] == "failed":
            lines += [f"FAILED ({b['error']}) after {b.get('seconds', 0)} s. Last lines of the log:", "", "```",
                      b.get("log_tail", "").rstrip(), "```", ""]
            continue
        s = _summary(name, b)
        lines += [f"`python {b['script']}` — {b['seconds']} s." + (f" {s}." if s else ""), ""]
        md = b.get("markdown") or ""
        # demote the benchmark's own headings below this section's
        lines += [re.sub(r"^(#+)", r"##\1", md, flags=re.MULTILINE).rstrip(), ""]
    return "\n".join(lines) + "\n"


# ---- entry point -------------------------------------------------------------------------------------------
class BenchSourcesMissing(SystemExit):
    """The benchmark scripts are not next to this package (an installed wheel ships none)."""


def require_bench_sources(names: list[str]) -> None:
    """Exits with status 2 and says why when none of the benchmarks ``names`` has its script here: the
    report is a source-checkout tool (bench/*.py import bitsandbytes, PEFT and matplotlib, which the
    package does not depend on), so from an installed package it must not silently report nothing."""
    if any((REPO / BENCHES[n][1]).exists() for n in names):
        return
    scripts = ", ".join(BENCHES[n][1] for n in names)
    msg = (f"python -m lora_ops report: no benchmark sources ({scripts}) under {REPO}. The report runs the "
           "benchmarks of a lora_ops source checkout; an installed package does not include them. Run it "
           "from a clone of the repository (with that checkout first on PYTHONPATH, or installed with "
           "`pip install -e`).")
    print(msg, file=sys.stderr, flush=True)
    raise BenchSourcesMissing(2)


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m lora_ops report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<device>)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="each benchmark's quick mode (CPU smoke run)")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma list out of {','.join(BENCHES)}")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per benchmark")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHES)}")
    require_bench_sources(names)
    h = header(args.device)
    out = args.out or REPO / "bench" / "results" / device_slug(h)
    out.mkdir(parents=True, exist_ok=True)
    print(f"lora_ops report -> {out}\n" + json.dumps(h), flush=True)
    results = {n: run_bench(n, out, args.quick, args.device, args.timeout, i + 1, len(names))
               for i, n in enumerate(names)}
    plots = []
    if plot_speedup(results, out / "speedup_vs_bnb.png", h):
        plots.append("speedup_vs_bnb.png")
    if plot_roofline(results, out / "roofline.png", h):
        plots.append("roofline.png")
    (out / "report.md").write_text(markdown(h, results, plots, args.quick))
    slim = {n: {k: v for k, v in b.items() if k != "markdown"} for n, b in results.items()}
    (out / "results.json").write_text(json.dumps({"header": h, "quick": args.quick, "benchmarks": slim}, indent=1))
    status = ", ".join(f"{n}: {b['status']}" for n, b in results.items())
    print(f"report: {out / 'report.md'} ({status}); plots: {', '.join(plots) or 'none'}", flush=True)
    return {"header": h, "benchmarks": results, "out": str(out)}


if __name__ == "__main__":  # pragma: no cover
    run()
