"""What every benchmark in bench/ shares (import it before lora_ops): the source tree on sys.path, output
poisoning off, timing, list arguments and the pieces of the environment header (CPU model, git commit,
driver, bitsandbytes version).

Timing of one callable uses ``torch.utils.benchmark`` (it synchronizes CUDA around its measurements);
``interleaved_ms`` times several methods round-robin, one call of each per round, so that a fluctuating
background load on a shared machine hits every method alike (torch.utils.benchmark has no such mode).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

os.environ.setdefault("LORA_OPS_POISON_OUTPUTS", "0")  # before lora_ops loads: never time debug poisoning
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lora_ops import env as _env

# The environment header's pieces, one place each (lora_ops.env; the report uses them too).
cpu_model = _env.cpu_model
gpu_driver = _env.gpu_driver
malloc_library = _env.malloc_library


def faults_and_system_time() -> tuple[int, float]:
    """This process's minor page faults and system CPU seconds so far (getrusage). Their growth over a CPU
    call is the cost of first touches of freshly mapped memory inside its time (see malloc_library)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), or None."""
    return _env.git_commit(ROOT)


def bnb_version() -> str | None:
    """bitsandbytes' version, or None when it does not import (it is an optional baseline)."""
    try:
        import bitsandbytes
    except Exception:  # noqa: BLE001 - any import problem means "no baseline"
        return None
    return bitsandbytes.__version__


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing -------------------------------------------------------------------------------------------
def median_ms(fn, min_time: float) -> float:
    """Median milliseconds per call of fn() over at least ``min_time`` seconds of blocked runs."""
    return tbench.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median * 1e3


def call_ms(fn, device: torch.device | str) -> float:
    """Milliseconds of one call of fn(): CUDA events around it on a GPU, perf_counter on the CPU."""
    if torch.device(device).type == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_ms(fns: dict, device, min_time: float, min_rounds: int = 3, max_rounds: int = 200) -> dict:
    """Median ms per function of ``fns``, measured round-robin (one call of each per round) for at least
    ``min_rounds`` rounds and ``min_time`` seconds per function."""
    for fn in fns.values():  # warm-up
        fn()
    sync(device)
    times: dict = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < min_time * len(fns) and rounds < max_rounds):
        for name, fn in fns.items():
            times[name].append(call_ms(fn, device))
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}


def rotating_seconds(fn, args: list, device, reps: int, warmup: int = 3) -> float:
    """Median seconds per call of fn(arg) over ``reps`` passes through ``args`` (input sets rotated so
    that they do not all sit in a cache), each pass timed whole by :func:`call_ms`."""
    for i in range(warmup):
        fn(args[i % len(args)])
    sync(device)

    def one_pass():
        for a in args:
            fn(a)

    return statistics.median(call_ms(one_pass, device) for _ in range(reps)) / 1e3 / len(args)


def synced_seconds(fn, device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of fn(), each followed by a device sync (after ``warmup`` calls):
    for work that is not a pure device kernel (host<->device copies, optimizer steps with paging)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


# ---- list arguments -----------------------------------------------------------------------------------
def parse_ints(text: str | None) -> list[int] | None:
    """``"1,16,256"`` -> ``[1, 16, 256]``; None or "" -> None (the caller's default)."""
    return [int(v) for v in text.split(",")] if text else None


def parse_shapes(text: str | None) -> list[tuple[int, ...]] | None:
    """``"4096x4096,14336x4096"`` -> ``[(4096, 4096), (14336, 4096)]``; None or "" -> None."""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")] if text else None
