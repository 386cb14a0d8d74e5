"""The end-to-end QLoRA fine-tune: ``python -m lora_ops demo``.

Builds a small Llama-architecture model from a ``transformers.LlamaConfig`` with random weights (no
downloads), quantizes every projection of its decoder layers to NF4 with lora_ops, attaches LoRA
adapters (:class:`lora_ops.nn.QLoRALinear`) and fine-tunes only the adapters on a synthetic copy
task (``BOS x1..xn SEP x1..xn``; the loss is taken on the copy, which the model can only produce by
learning to attend n+1 positions back). Then it runs the same fine-tune with bitsandbytes + PEFT —
as is, and patched by :mod:`lora_ops.integrations.peft` — when those are installed, from the same
weights (the NF4 bytes are identical), the same adapter init and the same batches, and prints
tokens/s, peak memory and final loss side by side, and writes a loss-curve PNG and a JSON summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

# name: (hidden, layers, heads, kv_heads, intermediate, vocab, copy length n, batch, rank, steps, lr)
SIZES: dict[str, tuple] = {
    "ci": (64, 2, 2, 2, 160, 16, 8, 16, 16, 160, 3e-3),
    "small": (128, 3, 4, 2, 320, 24, 12, 16, 16, 250, 2e-3),
    "medium": (1024, 8, 16, 8, 2816, 256, 32, 32, 16, 400, 1e-3),
    "large": (2048, 16, 16, 8, 5632, 512, 64, 32, 16, 400, 5e-4),
}
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DemoConfig:
    size: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    copy_len: int
    batch: int
    rank: int
    steps: int
    lr: float
    alpha: float
    dropout: float
    device: str
    dtype: str
    seed: int

    @property
    def seq_len(self) -> int:
        return 2 * self.copy_len + 2

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_config(size: str, device: str, steps: int | None = None, seed: int = 0, dropout: float = 0.0,
                dtype: str | None = None) -> DemoConfig:
    h, L, nh, nkv, inter, vocab, n, batch, r, default_steps, lr = SIZES[size]
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return DemoConfig(size, h, L, nh, nkv, inter, vocab, n, batch, r, steps or default_steps, lr, float(2 * r),
                      dropout, device, dtype, seed)


# ---- task -------------------------------------------------------------------------------------------
def copy_batches(cfg: DemoConfig):
    """An endless stream of (input_ids [B, 2n+2], labels) for the copy task, fixed by cfg.seed."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    sep, bos = cfg.vocab, cfg.vocab + 1
    while True:
        x = torch.randint(0, cfg.vocab, (cfg.batch, cfg.copy_len), generator=gen)
        ids = torch.cat([torch.full((cfg.batch, 1), bos), x, torch.full((cfg.batch, 1), sep), x], dim=1)
        labels = ids.clone()
        labels[:, : cfg.copy_len + 2] = -100  # loss only on the copy (transformers shifts labels itself)
        yield ids.to(cfg.device), labels.to(cfg.device)


# ---- models -----------------------------------------------------------------------------------------
def build_dense_model(cfg: DemoConfig) -> nn.Module:
    """A random LlamaForCausalLM (frozen) in cfg.dtype on cfg.device, identical for every backend."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(
        vocab_size=cfg.vocab + 2, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(64, cfg.seq_len), tie_word_embeddings=True,
        # A wider init than the 0.02 default: with a frozen tied embedding of norm 0.02*sqrt(H) the
        # logits could never exceed ~0.02*H and the loss would plateau well above zero at small H.
        initializer_range=1.5 / math.sqrt(cfg.hidden),
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(lc).to(device=cfg.device, dtype=cfg.torch_dtype)
    model.config.use_cache = False
    model.requires_grad_(False)
    return model


def _linear_targets(model: nn.Module):
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in TARGET_MODULES and isinstance(child, nn.Linear):
                yield module, child_name, child


def build_lora_ops_model(cfg: DemoConfig) -> nn.Module:
    """The dense model with every target projection replaced by a lora_ops QLoRALinear (NF4 base)."""
    from lora_ops.nn import QLoRALinear

    model = build_dense_model(cfg)
    for parent, name, lin in list(_linear_targets(model)):
        setattr(parent, name, QLoRALinear.from_linear(lin, cfg.rank, cfg.alpha, cfg.dropout))
    init_adapters([(m.lora_A.weight, m.lora_B.weight) for m in model.modules() if isinstance(m, QLoRALinear)],
                  cfg.seed)
    return model


@torch.no_grad()
def init_adapters(pairs: list[tuple[torch.Tensor, torch.Tensor]], seed: int) -> None:
    """PEFT's adapter init (A ~ U(-1/sqrt(K), 1/sqrt(K)), i.e. Kaiming-uniform with a = sqrt(5); B = 0),
    drawn from one seeded generator in layer order, so every backend starts from the same adapters."""
    gen = torch.Generator().manual_seed(seed + 2)
    for A, B in pairs:
        bound = 1.0 / math.sqrt(A.shape[1])
        A.copy_(torch.empty(A.shape).uniform_(-bound, bound, generator=gen))
        B.zero_()


def build_peft_model(cfg: DemoConfig, patch: bool = False) -> nn.Module:
    """The dense model quantized by bitsandbytes (Linear4bit, nf4, double quant) with PEFT LoRA;
    ``patch``: then patched by lora_ops.integrations.peft (the same layers run lora_ops' fused op)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = build_dense_model(cfg)
    for parent, name, lin in list(_linear_targets(model)):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=cfg.torch_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64, module=q)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to(cfg.device)  # bitsandbytes quantizes on the move to the device
        setattr(parent, name, q)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(TARGET_MODULES), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    layers = [m for m in peft_model.modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]
    init_adapters([(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in layers], cfg.seed)
    if patch:
        from lora_ops.integrations.peft import patch_peft_model

        patch_peft_model(peft_model)
    return peft_model


# ---- measurement ------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a run: CUDA ``max_memory_allocated`` on a GPU; on the CPU the high-water mark of
    the process RSS above its value at the start (sampled every 2 ms from /proc/self/statm)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self._stop = threading.Event()
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: ru_maxrss is a lifetime peak, the best we have
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss() - self.base)

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base, self._max_rss() - self.base)

    @staticmethod
    def _max_rss() -> int:
        """Lifetime RSS high-water mark (exact, but includes the imports: meaningful in a fresh process)."""
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except ImportError:
            return 0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _optimizer(kind: str, params, lr: float):
    if kind == "paged":
        from lora_ops.optim import PagedAdamW

        return PagedAdamW(params, lr=lr, weight_decay=0.0)
    if kind == "bnb-paged":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


# variant -> (label, builder, optimizer on CPU, optimizer on CUDA)
VARIANTS = {
    "lora_ops": ("lora_ops (QLoRALinear)", build_lora_ops_model, "paged", "paged"),
    "patched": ("bnb + PEFT, lora_ops patch", lambda cfg: build_peft_model(cfg, patch=True), "adamw", "bnb-paged"),
    "peft": ("bnb + PEFT", build_peft_model, "adamw", "bnb-paged"),
}


def lr_schedule(opt, steps: int):
    """20-step warm-up, then cosine to 10% of the learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))


# Steps a lock-step worker runs per turn (train_lockstep): short enough that a load change on a shared
# machine reaches every variant within a second or so, long enough that the hand-over costs nothing.
LOCKSTEP_CHUNK = 10


class Turns:
    """A lock-step worker's side of the hand-over with the parent (train_lockstep): ``wait()`` blocks
    until the parent gives this worker the machine, ``release()`` hands it back. Two pipe fds."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read = os.fdopen(read_fd, "r")
        self.write = os.fdopen(write_fd, "w")

    def ready(self) -> None:  # built: the parent starts the turns once every worker is
        self.write.write("ready\n")
        self.write.flush()

    def wait(self) -> None:
        if self.read.readline().strip() != "go":
            raise SystemExit("demo worker: the parent closed the lock-step pipe")

    def release(self) -> None:
        self.write.write("done\n")
        self.write.flush()


def train(variant: str, cfg: DemoConfig, progress: bool = True, turns: Turns | None = None) -> dict:
    """Builds the ``variant`` model inside the memory measurement, fine-tunes its trainable parameters
    for cfg.steps steps and returns losses, tokens/s (after a few warm-up steps), peak memory, time.
    With ``turns`` the steps run LOCKSTEP_CHUNK at a time, each chunk when the parent says so, and only
    the time inside the chunks counts."""
    from tqdm.auto import tqdm

    label, build, opt_cpu, opt_cuda = VARIANTS[variant]
    warmup = min(5, cfg.steps // 10)
    with PeakMemory(cfg.device) as mem:
        model = build(cfg)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _optimizer(opt_cuda if cfg.device.startswith("cuda") else opt_cpu, params, cfg.lr)
        sched = lr_schedule(opt, cfg.steps)
        batches = copy_batches(cfg)
        losses: list[float] = []
        bar = tqdm(range(cfg.steps), desc=f"{label:<27}", disable=not progress,
                   mininterval=0.5 if sys.stderr.isatty() else 10, leave=True,
                   bar_format="{desc}{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
        if turns is not None:
            turns.ready()
        elapsed = 0.0
        t0 = time.perf_counter()
        for step in bar:
            if turns is not None and step % LOCKSTEP_CHUNK == 0:
                if step > 0:
                    _sync(cfg.device)
                    elapsed += time.perf_counter() - t0 if step > warmup else 0.0
                    turns.release()
                turns.wait()
                t0 = time.perf_counter()
            if step == warmup:
                _sync(cfg.device)
                t0 = time.perf_counter()
            ids, labels = next(batches)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(loss.item())
            if step % 10 == 0 or step == cfg.steps - 1:
                bar.set_postfix_str(f"loss {losses[-1]:.3f}", refresh=False)
        _sync(cfg.device)
        elapsed += time.perf_counter() - t0
        bar.close()
        trainable = sum(p.numel() for p in params)
        op_calls = count_op_calls(model, next(batches))
        if turns is not None:
            turns.release()
    tail = losses[-10:]
    return {
        "variant": variant,
        "name": label,
        "losses": losses,
        "initial_loss": sum(losses[:5]) / len(losses[:5]),
        "final_loss": sum(tail) / len(tail),
        "tokens_per_s": (cfg.steps - warmup) * cfg.batch * cfg.seq_len / elapsed,
        "peak_memory_mib": mem.peak / 2**20,
        "train_seconds": elapsed,
        "trainable_params": trainable,
        "optimizer": type(opt).__name__,
        "op_calls": op_calls,
    }


def count_op_calls(model: nn.Module, batch) -> dict[str, int]:
    """Which kernels a training step really runs: the number of ``lora_ops::*`` and ``bitsandbytes::*``
    torch ops called in one forward + backward (profiled after the timed steps, gradients discarded)."""
    ids, labels = batch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)
    names = [e.name for e in prof.events()]
    return {ns: sum(n.startswith(ns + "::") for n in names) for ns in ("lora_ops", "bitsandbytes")}


def check_code_paths(runs: list[dict]) -> None:
    """The three rows must be three different code paths: lora_ops' own model and the patched PEFT model
    run lora_ops ops and no bitsandbytes op; plain bnb + PEFT runs bitsandbytes ops and no lora_ops op."""
    for r in runs:
        calls = r["op_calls"]
        uses_lora_ops = r["variant"] in ("lora_ops", "patched")
        if (calls["lora_ops"] > 0) != uses_lora_ops or (calls["bitsandbytes"] > 0) == uses_lora_ops:
            raise SystemExit(f"demo: the {r['name']!r} run called {calls} ops per step; expected "
                             f"{'lora_ops and no bitsandbytes' if uses_lora_ops else 'bitsandbytes and no lora_ops'} ops")


def train_in_subprocess(variant: str, cfg: DemoConfig, progress: bool) -> dict:
    """Runs :func:`train` in a fresh interpreter, so that each run's peak memory is its own."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "lora_ops.demo", "--worker", variant, "--config", json.dumps(asdict(cfg)),
               "--result", str(result)] + ([] if progress else ["--no-progress"])
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"demo: the {variant!r} run failed (exit code {proc.returncode})")
        return json.loads(result.read_text())


def train_lockstep(variants: list[str], cfg: DemoConfig, progress: bool) -> list[dict]:
    """Runs :func:`train` for every variant in its own interpreter (each peak memory its own), all alive
    at once but one at a time: each worker runs LOCKSTEP_CHUNK steps when handed the machine, the
    parent going round the workers (starting one further each round). The variants' tokens/s then come
    from interleaved stretches of time, so a load change on a shared machine hits them alike instead of
    favouring whichever ran while the machine was quiet."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        workers = []
        try:
            for v in variants:
                go_r, go_w = os.pipe()
                done_r, done_w = os.pipe()
                result = Path(tmp) / f"{v}.json"
                cmd = [sys.executable, "-m", "lora_ops.demo", "--worker", v, "--config", json.dumps(asdict(cfg)),
                       "--result", str(result), "--no-progress", "--lockstep-fds", f"{go_r},{done_w}"]
                proc = subprocess.Popen(cmd, pass_fds=(go_r, done_w))
                os.close(go_r)
                os.close(done_w)
                workers.append((v, proc, os.fdopen(go_w, "w"), os.fdopen(done_r, "r"), result))
            for v, proc, _, done, _ in workers:  # every model built before any step is timed
                if done.readline().strip() != "ready":
                    raise SystemExit(f"demo: the {v!r} run failed (exit code {proc.wait()})")
            n_turns = -(-cfg.steps // LOCKSTEP_CHUNK)  # the last one also counts the ops (train's tail)
            for turn in range(n_turns):
                for i in range(len(workers)):
                    v, proc, go, done, _ = workers[(turn + i) % len(workers)]
                    go.write("go\n")
                    go.flush()
                    if done.readline().strip() != "done":
                        raise SystemExit(f"demo: the {v!r} run failed (exit code {proc.wait()})")
                if progress:
                    step = min(cfg.steps, (turn + 1) * LOCKSTEP_CHUNK)
                    print(f"\rsteps {step}/{cfg.steps}, variants taking turns", end="", flush=True)
            if progress:
                print()
            runs = []
            for v, proc, go, done, result in workers:
                go.close()
                if proc.wait() != 0:
                    raise SystemExit(f"demo: the {v!r} run failed (exit code {proc.returncode})")
                runs.append(json.loads(result.read_text()))
            return runs
        finally:
            for _, proc, go, done, _ in workers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                for f in (go, done):
                    if not f.closed:
                        f.close()


# ---- output -----------------------------------------------------------------------------------------
def _available(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def plot_losses(runs: list[dict], cfg: DemoConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    # Distinct line styles and markers: runs from the same bytes and batches overlap almost exactly.
    styles = [("-", "o", 2.2), ("--", "s", 1.6), (":", "^", 1.4)]
    for i, r in enumerate(runs):
        ls, marker, lw = styles[i % len(styles)]
        steps = range(1, len(r["losses"]) + 1)
        ax.plot(steps, r["losses"], label=r["name"], linestyle=ls, marker=marker, linewidth=lw,
                markevery=max(1, len(r["losses"]) // 12), markersize=4, alpha=0.85)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss per step (copy task)")
    ax.set_title(f"QLoRA fine-tune, Llama {cfg.hidden}x{cfg.layers}, r={cfg.rank}, {cfg.device}, {cfg.dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def format_table(runs: list[dict]) -> str:
    head = (f"{'run':<26}{'tokens/s':>12}{'peak mem (MiB)':>16}{'initial loss':>14}{'final loss':>12}"
            f"{'time (s)':>10}{'lora_ops ops/step':>19}{'bnb ops/step':>14}")
    rows = [head, "-" * len(head)]
    for r in runs:
        rows.append(f"{r['name']:<26}{r['tokens_per_s']:>12,.0f}{r['peak_memory_mib']:>16,.1f}"
                    f"{r['initial_loss']:>14.3f}{r['final_loss']:>12.4f}{r['train_seconds']:>10.1f}"
                    f"{r['op_calls']['lora_ops']:>19,}{r['op_calls']['bitsandbytes']:>14,}")
    rows.append("tokens/s and time: the timed steps after warm-up; peak mem: see demo.json's peak_memory_note; "
                "initial / final loss: mean over the first 5 / last 10 steps; ops/step: lora_ops:: and "
                "bitsandbytes:: torch ops called in one profiled forward + backward")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_ops demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["auto", *SIZES], default="auto",
                   help="model/task size (auto: small on CPU, medium on a GPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: per size)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for loss_curve.png and demo.json")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="base/activation dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", default="auto", choices=["auto", "none", "peft", "patched", "all"],
                   help="also run bitsandbytes+PEFT (peft), the same patched by lora_ops (patched), or both "
                        "(all; auto = all when peft and bitsandbytes are installed)")
    p.add_argument("--ci", action="store_true",
                   help="reduced size for CI (< 60 s on 2 CPU cores); exits non-zero unless the loss fell")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--in-process", action="store_true",
                   help="run every variant in this process, one after another (faster start; peak memory "
                        "less exact; tokens/s not interleaved)")
    p.add_argument("--distributed", choices=["fsdp", "ddp"], default=None,
                   help="under torchrun: fine-tune the lora_ops model on all ranks with FSDP2 (NF4 base sharded) "
                        "or DDP (see lora_ops/demo_distributed.py); no comparison runs")
    p.add_argument("--checkpoint", default=None,
                   help="with --distributed: save model and optimizer there with torch.distributed.checkpoint")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--lockstep-fds", help=argparse.SUPPRESS)
    return p


def run(argv: list[str] | None = None) -> dict:
    """``python -m lora_ops demo [options]``; returns the summary that is also written to demo.json."""
    args = _parser().parse_args(argv)
    missing = [m for m in ("transformers", "tqdm", "matplotlib") if not _available(m)]
    if missing:
        raise SystemExit(f"python -m lora_ops demo needs {', '.join(missing)}: install the demo extra, "
                         "e.g. pip install --no-build-isolation -e \".[demo]\" (or pip install transformers tqdm "
                         "matplotlib)")
    if args.worker:  # one run inside a fresh interpreter, started by train_in_subprocess
        cfg = DemoConfig(**json.loads(args.config))
        turns = Turns(*map(int, args.lockstep_fds.split(","))) if args.lockstep_fds else None
        args.result.write_text(json.dumps(train(args.worker, cfg, not args.no_progress, turns)))
        return {}

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = "ci" if args.ci else (args.size if args.size != "auto" else ("medium" if device.startswith("cuda") else "small"))
    cfg = make_config(size, device, args.steps, args.seed, args.dropout, args.dtype)
    if args.distributed:
        from lora_ops.demo_distributed import run_distributed

        return run_distributed(args.distributed, cfg, args.checkpoint)
    have_peft = _available("peft", "bitsandbytes")
    compare = args.compare
    if compare == "auto":
        compare = "all" if have_peft else "none"
    if compare != "none" and not have_peft:
        raise SystemExit("--compare needs peft and bitsandbytes installed (pip install peft bitsandbytes)")
    variants = ["lora_ops"] + {"none": [], "peft": ["peft"], "patched": ["patched"], "all": ["patched", "peft"]}[compare]

    import lora_ops

    t_start = time.perf_counter()
    print(f"lora_ops {lora_ops.__version__} demo | torch {torch.__version__} | {device_name(device)}")
    print(f"Llama {cfg.hidden} hidden x {cfg.layers} layers (random weights), NF4 base, LoRA r={cfg.rank} on "
          f"{len(TARGET_MODULES)} projections | copy task n={cfg.copy_len} | batch {cfg.batch} x {cfg.seq_len} "
          f"tokens | {cfg.steps} steps | {cfg.dtype}", flush=True)
    progress = not args.no_progress
    if args.in_process:
        runs = [train(v, cfg, progress) for v in variants]
    elif len(variants) > 1:
        runs = train_lockstep(variants, cfg, progress)
    else:
        runs = [train_in_subprocess(variants[0], cfg, progress)]

    print()
    print(format_table(runs))
    check_code_paths(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "loss_curve.png"
    plot_losses(runs, cfg, png)
    summary = {"config": asdict(cfg), "device_name": device_name(device), "torch": torch.__version__,
               "lora_ops": lora_ops.__version__, "runs": runs,
               "peak_memory_note": ("torch.cuda.max_memory_allocated" if device.startswith("cuda") else
                                    "CPU: process RSS high-water mark above its value before the model was built")}
    (args.out / "demo.json").write_text(json.dumps(summary, indent=1))
    if "peft" in variants:
        base = next(r for r in runs if r["variant"] == "peft")
        for r in runs:
            if r is not base:
                print(f"{r['name']} vs bnb + PEFT: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
                      f"{r['peak_memory_mib'] / max(base['peak_memory_mib'], 1e-9):.2f}x peak memory")
    first = runs[0]
    fell = first["final_loss"] < 0.5 * first["initial_loss"]
    print(f"lora_ops loss {first['initial_loss']:.3f} -> {first['final_loss']:.4f} "
          f"({'fell' if fell else 'DID NOT FALL BY HALF'}); total {time.perf_counter() - t_start:.0f} s")
    print(f"loss curve: {png}   summary: {args.out / 'demo.json'}")
    if args.ci and not fell:
        raise SystemExit(f"demo --ci: the loss did not fall by half ({first['initial_loss']:.3f} -> "
                         f"{first['final_loss']:.4f})")
    return summary


if __name__ == "__main__":  # pragma: no cover  (worker processes start here)
    run()
