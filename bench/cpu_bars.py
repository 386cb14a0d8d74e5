"""The CPU "done when" bars of issues 11, 16 and 32 on this machine, in one command (any x86 CPU):

    python bench/cpu_bars.py            # results in bench/results/cpu_bars_<cpu kind>/ (cpu_kind())

runs the four benchmarks the bars name, each with its own result folder under --out, and writes
<out>/cpu_bars.json and cpu_bars.md: per bar the measured value, the bar and whether it was met, with
the CPU (lscpu model name, SIMD flags), the kernels lora_ops chose and bitsandbytes' CPU path.

    issue 16  dequantize (4096², 4096×14336; bf16; double quant off / on) >= 1.5x bitsandbytes   bench_nf4.py
    issue 16  forward M = 1, 4096², r 16, bf16: >= 1.2x dense bf16 + LoRA and >= 1.0x
              bitsandbytes' fastest CPU path + LoRA (its packed path where it has one)             bench_qlora.py
    issue 16  demo tokens/s >= 1.1x bnb + PEFT (the three runs in lock-step)                      python -m lora_ops demo
    issue 11  training layer 4096², r 16, bf16, M = 2048, fwd+bwd: >= 1.25x bnb + PEFT,
              ours / dense + PEFT <= 1.3, peak RSS below bnb + PEFT's                               bench_qlora_train.py
    issue 32  against this machine's own limits, measured in the same run (bench/cpu_limits.py):
              fwd+bwd M = 2048 <= 1.15x the engine limit (dequantize + the two GEMMs on the faster
              ATen engine, bf16 or fp32), >= 1.0x bnb + PEFT under both allocators; forward M = 1
              reads the NF4 weight at >= 75 % of copy_'s bandwidth, no M in 1..16 slower than dense
              bf16 + LoRA or bitsandbytes' fastest CPU path + LoRA; dequantize(out=) >= 85 % of
              copy_ (4096², 4096×14336, double quant off / on); demo >= 1.2x bnb + PEFT        cpu_limits.py

The dequantize and training benchmarks run a second time with glibc's malloc told to reuse freed memory
(MALLOC_REUSE_ENV; the training one only where it is fast, see --train-reuse): the default maps each new
multi-MiB tensor fresh, and the first touch of its 4 KiB pages is then part of every method's time --
bitsandbytes' and dense torch's far more than ours (outputs on huge pages, scratch reused). Both rows are
tabulated. On the Zen 4 EPYC, tcmalloc (LD_PRELOAD) measured like the reuse rows; jemalloc with its
default settings still faulted in the baselines like the default.

The bars are issue 11's and 16's wording; both issues ask for them on an AVX2 EPYC and on an AVX-512
BF16 Xeon. Times are ratios within one run of each benchmark (methods round-robin or in lock-step), so
a shared machine's load hits both sides alike. The run takes ~5 minutes on a 2-core Zen 4 EPYC; without
AVX512_BF16, torch's bf16 GEMM (which bnb + PEFT and dense run at M = 2048) took ~10 minutes per call on
a 2-core Zen 1 EPYC, so the training benchmark then runs one round (--train-rounds) and takes ~1 hour.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# glibc malloc told to reuse freed memory: no allocation from fresh mmap()s (each a new mapping whose first
# touch faults 4 KiB at a time), no returning the heap's top to the system. Caching allocators (tcmalloc,
# jemalloc) do much the same; on the Zen 4 EPYC this and LD_PRELOADed tcmalloc gave the same fwd+bwd times
# within a few % (bench/notes_qlora_cpu.md).
MALLOC_REUSE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def run(cmd: list[str], log: Path, extra_env: dict | None = None) -> None:
    """Runs one benchmark with the source tree importable; its output goes to log (and stops us on failure)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}); output in {log}")


def cpu_kind(info: dict) -> str:
    """The results folder's name for this CPU: vendor, family and model numbers, and the lora_ops tier,
    e.g. ``amd-f25m17-avx512_bf16`` (lscpu's model name alone says "AMD EPYC" for several generations)."""
    from lora_ops import _native

    vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(info.get("vendor", ""), "x86")
    return f"{vendor}-f{info.get('family', '?')}m{info.get('model_number', '?')}-{_native.CPU_SIMD_SUPPORTED}"


def machine() -> dict:
    info = {"model": "unknown", "flags": []}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["model"] = value.strip()
            elif key.strip() == "Vendor ID":
                info["vendor"] = value.strip()
            elif key.strip() == "CPU family":
                info["family"] = value.strip()
            elif key.strip() == "Model":
                info["model_number"] = value.strip()
            elif key.strip() == "Flags":
                wanted = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_bf16",
                          "amx_tile")
                info["flags"] = [f for f in value.split() if f in wanted]
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    return info


def bar(name: str, value: float | None, goal: float, higher_is_better: bool = True) -> dict:
    met = value is not None and (value >= goal if higher_is_better else value <= goal)
    return {"bar": name, "value": value, "goal": goal, "higher_is_better": higher_is_better, "met": met}


def dequant_bars(folder: Path, label: str = "") -> list[dict]:
    rows = json.loads((folder / "bench_nf4.json").read_text())["rows"]
    speedups = [r.get("dequant_speedup_vs_bnb") for r in rows]
    worst = min((s for s in speedups if s is not None), default=None)
    return [bar(f"16: dequantize vs bitsandbytes (worst of the shapes){label}", worst, 1.5)]


def _vs_bnb(row: dict) -> float | None:
    bnb = [row[k] for k in ("bnb_peft_fwd_ms", "bnb_packed_fwd_ms") if row.get(k) is not None]
    return min(bnb) / row["ours_fwd_ms"] if bnb else None


def forward_bars(folder: Path) -> tuple[list[dict], dict]:
    data = json.loads((folder / "bench_qlora.json").read_text())
    row = next(r for r in data["rows"] if r["M"] == 1)
    bars = [bar("16: forward M=1 vs dense bf16 + LoRA", row.get("speedup_fwd_vs_dense"), 1.2),
            bar("16: forward M=1 vs bitsandbytes' fastest CPU path + LoRA", _vs_bnb(row), 1.0)]
    for r in sorted(data["rows"], key=lambda r: r["M"]):  # issue 32: no M in 1..16 slower than either
        bars.append(bar(f"32: forward M={r['M']} vs dense bf16 + LoRA", r.get("speedup_fwd_vs_dense"), 1.0))
        bars.append(bar(f"32: forward M={r['M']} vs bitsandbytes' fastest CPU path + LoRA", _vs_bnb(r), 1.0))
    return bars, data.get("environment", {})


def limit_bars(folder: Path) -> list[dict]:
    res = json.loads((folder / "cpu_limits.json").read_text())
    worst = min(r["fraction_of_copy"] for r in res["dequantize"])
    t = res["training"]
    return [bar("32: fwd+bwd M=2048 / engine limit (dequantize + 2 GEMMs, "
                f"fastest engine here: {t['fastest_engine']})", t["lora_ops_over_limit"], 1.15, higher_is_better=False),
            bar("32: forward M=1 NF4 weight read / copy_ bandwidth", res["forward_m1"]["fraction_of_copy"], 0.75),
            bar("32: dequantize(out=) / copy_ bandwidth (worst of 4096², 4096×14336, dq off/on)", worst, 0.85)]


def demo_bars(folder: Path, goal: float = 1.1, issue: str = "16") -> list[dict]:
    runs = {r["variant"]: r for r in json.loads((folder / "demo.json").read_text())["runs"]}
    ratio = None
    if "lora_ops" in runs and "peft" in runs:
        ratio = runs["lora_ops"]["tokens_per_s"] / runs["peft"]["tokens_per_s"]
    return [bar(f"{issue}: demo tokens/s vs bnb + PEFT", ratio, goal)]


def train_bars(folder: Path, label: str = "", peak: bool = True) -> list[dict]:
    row = json.loads((folder / "bench_qlora_train.json").read_text())["rows"][0]
    bars = [bar(f"11: fwd+bwd M=2048 vs bnb + PEFT{label}", row["speedup_vs_bnb_peft"], 1.25),
            bar(f"32: fwd+bwd M=2048 vs bnb + PEFT{label}", row["speedup_vs_bnb_peft"], 1.0),
            bar(f"11: fwd+bwd M=2048, ours / dense + PEFT (time){label}", row["ours_fwdbwd_ms"] / row["dense_fwdbwd_ms"],
                1.3, higher_is_better=False)]
    if peak:
        bars.append(bar("11: peak RSS, ours / bnb + PEFT", row["ours_peak_MiB"] / row["bnb_peft_peak_MiB"], 1.0,
                        higher_is_better=False))
    return bars


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# CPU bars of issues 11, 16 and 32 (bench/cpu_bars.py)", "",
             f"CPU: {m['model']}, {m['cores']} logical cores, flags {' '.join(m['flags']) or 'none of avx2/avx512'}; "
             f"lora_ops kernels: {result['environment'].get('lora_ops_cpu_isa', '?')}; "
             f"bitsandbytes packed CPU path: {result['environment'].get('bnb_packed', '?')}; "
             f"allocator: {result['environment'].get('malloc', '?')}; commit {result.get('commit')}.", "",
             "Rows marked *(malloc reuse)* ran again with glibc told to reuse freed memory ("
             + " ".join(f"{k}={v}" for k, v in MALLOC_REUSE_ENV.items())
             + "): under the default, every new multi-MiB tensor is freshly mapped and faulted in 4 KiB at a time, "
             "a cost each method pays for its own allocations (see the benchmarks' fault columns).", "",
             "| bar | measured | goal | met |", "|---|---|---|---|"]
    for b in result["bars"]:
        value = "n/a" if b["value"] is None else f"{b['value']:.3f}"
        goal = ("≥ " if b["higher_is_better"] else "≤ ") + f"{b['goal']}"
        lines.append(f"| {b['bar']} | {value} | {goal} | {'yes' if b['met'] else 'no'} |")
    if result.get("skipped_steps"):
        lines += ["", f"Steps not run (their bars are missing): {', '.join(result['skipped_steps'])}."]
    lines += ["", "Each benchmark's own tables are in the subfolders (nf4/, nf4_reuse/, forward/, demo/, train/, "
              "train_reuse/, limits/: the machine's limits and lora_ops' fractions of them, medians with min..max)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default: bench/results/cpu_bars_<cpu kind>, see cpu_kind)")
    ap.add_argument("--train-rounds", type=int, default=None,
                    help="round-robin rounds of the training benchmark (default 8; 1 without AVX512_BF16)")
    ap.add_argument("--train-reuse", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the training benchmark with malloc reuse (default: with AVX512_BF16 only; "
                         "without it, torch's bf16 GEMM makes each baseline call take minutes)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the steps whose results are already in --out (an interrupted run goes on)")
    ap.add_argument("--skip", nargs="*", default=[], metavar="STEP",
                    help="steps not to run (nf4, nf4_reuse, limits, forward, demo, train, train_reuse): "
                         "their bars are left out and the result says so")
    args = ap.parse_args(argv)
    info = machine()
    fast_bf16 = "avx512_bf16" in info["flags"]
    train_rounds = args.train_rounds or (8 if fast_bf16 else 1)
    train_reuse = fast_bf16 if args.train_reuse is None else args.train_reuse
    out = (args.out or ROOT / "bench" / "results" / f"cpu_bars_{cpu_kind(info)}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    reuse = " *(malloc reuse)*"
    train_args = ["bench/bench_qlora_train.py", "--ms", "2048", "--rounds", str(train_rounds)]
    # (step = its subfolder, command, extra environment, result file)
    steps = [("nf4", ["bench/bench_nf4.py"], None, "bench_nf4.json"),
             ("nf4_reuse", ["bench/bench_nf4.py"], MALLOC_REUSE_ENV, "bench_nf4.json"),
             ("limits", ["bench/cpu_limits.py"], None, "cpu_limits.json"),
             ("forward", ["bench/bench_qlora.py", "--shapes", "4096x4096", "--ms", "1,2,4,8,16", "--ranks", "16",
                          "--no-backward", "--dtype", "bfloat16"], None, "bench_qlora.json"),
             ("demo", ["-m", "lora_ops", "demo", "--no-progress"], None, "demo.json"),
             ("train", train_args, None, "bench_qlora_train.json")]
    if train_reuse:
        steps.append(("train_reuse", train_args, MALLOC_REUSE_ENV, "bench_qlora_train.json"))
    for name, cmd, extra, result_file in steps:
        if name in args.skip or (args.resume and (out / name / result_file).exists()):
            continue
        run([py, *cmd, "--out", str(out / name)], out / f"{name}.log", extra)

    def have(name: str, bars_fn, *a, **kw) -> list[dict]:  # a skipped step's bars read n/a
        return bars_fn(out / name, *a, **kw) if (out / name).exists() and name not in args.skip else []

    fwd_bars, fwd_env = forward_bars(out / "forward") if "forward" not in args.skip else ([], {})
    bars = (have("limits", limit_bars) + have("nf4", dequant_bars) + have("nf4_reuse", dequant_bars, reuse) + fwd_bars
            + have("demo", demo_bars) + have("demo", demo_bars, 1.2, "32") + have("train", train_bars))
    if train_reuse:
        bars += have("train_reuse", train_bars, reuse, peak=False)
    skipped = [name for name, *_ in steps if name in args.skip]
    env = {"lora_ops_cpu_isa": fwd_env.get("lora_ops_cpu_kernels"), "bnb_packed": fwd_env.get("bnb_cpu_packed_path"),
           "malloc": fwd_env.get("malloc")}
    from lora_ops.env import git_commit

    info["kind"] = cpu_kind(info)
    # Commit and UTC date name every figure taken from this file (scripts/readme_results.py).
    env["lora_ops_commit"] = fwd_env.get("lora_ops_commit") or git_commit(ROOT)
    env["date_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    result = {"machine": info, "environment": env, "commit": git_commit(ROOT), "skipped_steps": skipped, "bars": bars}
    (out / "cpu_bars.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cpu_bars.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
