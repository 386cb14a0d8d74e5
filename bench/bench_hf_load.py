"""Memory and time of loading a checkpoint 4-bit through transformers, three ways, each in a fresh process:

  nf4config  from_pretrained(path, quantization_config=lora_ops.NF4Config())   quantized while loading
  bnb        from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quant))
  dense+qm   from_pretrained(path) in bf16, then lora_ops.quantize_model(model)

The checkpoint: a random-weight Llama of at least 1 GB in bf16 (``--make``), saved as several safetensors
shards. Peak anonymous memory is sampled from outside (RssAnon of /proc/<pid>/status every 2 ms: the
mmapped checkpoint's file pages are not counted), less the process's RssAnon after its imports; load time
is the from_pretrained (+ quantize_model) call. Runs are interleaved (A B C A B C ...) and medians
reported, as other jobs may load the machine.

    python bench/bench_hf_load.py --make /tmp/llama1g
    python bench/bench_hf_load.py /tmp/llama1g --repeats 3 --out bench/results/hf_load_cpu_zen4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_common  # (first: source tree on sys.path, poisoning off)

WAYS = ("nf4config", "bnb", "dense+qm")
MiB = 2**20


def make_checkpoint(path: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.02)
    model.save_pretrained(path, max_shard_size="300MB")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"saved {total / 1e9:.3f} GB bf16 in {len(list(path.glob('*.safetensors')))} shards to {path}")


def _rss_anon(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def child(way: str, path: str) -> None:
    """One load in this (fresh) process; prints one JSON line."""
    import torch
    import transformers

    import lora_ops
    from lora_ops.nf4_tensor import NF4Tensor

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoModelForCausalLM

    if way == "bnb":
        import bitsandbytes  # noqa: F401  (imported before the baseline, as the others' libraries are)
    base = _rss_anon()
    t0 = time.perf_counter()
    if way == "nf4config":
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=lora_ops.NF4Config(),
                                                     dtype=torch.bfloat16, device_map="cpu")
    elif way == "bnb":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
        lora_ops.quantize_model(model, progress=False)
    seconds = time.perf_counter() - t0
    nf4 = sum(sum(p.storage_nbytes().values()) for p in model.parameters() if isinstance(p, NF4Tensor))
    if way == "bnb":
        nf4 = sum(m.weight.numel() + m.weight.quant_state.absmax.numel() for m in model.modules()
                  if type(m).__name__ == "Linear4bit")
    dense = sum(p.numel() * p.element_size() for p in model.parameters()
                if not isinstance(p, NF4Tensor) and type(p).__name__ != "Params4bit")
    print(json.dumps({"way": way, "seconds": seconds, "base_anon": base, "end_anon": _rss_anon(),
                      "nf4_bytes": nf4, "unquantized_bytes": dense}))


def run_one(way: str, path: Path) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", way, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, _rss_anon(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.002)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{way} failed:\n{err[-3000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    r["peak_anon"] = peak
    r["load_peak_anon"] = peak - r["base_anon"]
    return r


def largest_tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    best = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                s = h.get_slice(k)
                n = 1
                for d in s.get_shape():
                    n *= d
                best = max(best, n * 2 if s.get_dtype() in ("BF16", "F16") else n * 4)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?")
    ap.add_argument("--make", metavar="DIR", help="write the random bf16 Llama checkpoint there and exit")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--child", nargs=2, metavar=("WAY", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overhead-mib", type=float, default=64.0,
                    help="the fixed allowance of the memory target (allocator slack, loader bookkeeping)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    if args.make:
        return make_checkpoint(Path(args.make), args.layers)
    path = Path(args.path)
    runs: dict[str, list[dict]] = {w: [] for w in WAYS}
    for i in range(args.repeats):
        for way in WAYS:
            r = run_one(way, path)
            runs[way].append(r)
            print(f"round {i}: {way:10s} load {r['seconds']:6.2f} s  anon peak {r['load_peak_anon'] / MiB:7.1f} MiB "
                  f"(process {r['peak_anon'] / MiB:7.1f} MiB)", flush=True)
    largest = largest_tensor_bytes(path)
    first = runs["nf4config"][0]
    target = first["nf4_bytes"] + first["unquantized_bytes"] + 2 * largest + args.overhead_mib * MiB
    summary = {
        way: {"load_s_median": statistics.median(r["seconds"] for r in rs),
              "load_peak_anon_mib_median": statistics.median(r["load_peak_anon"] for r in rs) / MiB,
              "process_peak_anon_mib_median": statistics.median(r["peak_anon"] for r in rs) / MiB,
              "nf4_mib": rs[0]["nf4_bytes"] / MiB, "unquantized_mib": rs[0]["unquantized_bytes"] / MiB}
        for way, rs in runs.items()
    }
    ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    report = {
        "machine": bench_common.cpu_model(), "commit": bench_common.git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "bitsandbytes": bench_common.bnb_version(),
        "checkpoint_bytes": ckpt_bytes, "shards": len(list(path.glob("*.safetensors"))),
        "largest_tensor_mib": largest / MiB, "overhead_mib": args.overhead_mib, "target_mib": target / MiB,
        "summary": summary, "runs": runs,
        "checks": {
            "nf4config_within_target": summary["nf4config"]["load_peak_anon_mib_median"] <= target / MiB,
            "nf4config_anon_le_bnb": summary["nf4config"]["load_peak_anon_mib_median"]
            <= summary["bnb"]["load_peak_anon_mib_median"],
            "nf4config_anon_le_dense_qm": summary["nf4config"]["load_peak_anon_mib_median"]
            <= summary["dense+qm"]["load_peak_anon_mib_median"],
            "nf4config_time_le_bnb": summary["nf4config"]["load_s_median"] <= summary["bnb"]["load_s_median"],
        },
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
