"""Runs a function on N gloo ranks (CPU processes) spawned from inside a test, with a deadline: a hang
fails the test instead of blocking CI. The ranks meet through a file in the test's tmp folder (no port
to pick); each rank's return value comes back through a file."""

from __future__ import annotations

import gc
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _entry(rank: int, world: int, folder: str, fn, args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share the machine's cores
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world, Path(folder), *args)
        torch.save(result, Path(folder) / f"result{rank}.pt")
    finally:
        # A DDP model kept alive by a reference cycle would hold gloo work objects (and their tensors) until
        # interpreter finalization, where freeing them can abort the process: free them while the group
        # lives. (A DDP rank aborted with "terminate called without an active exception" in 3 of ~110 runs
        # of test_distributed_2ranks.py on a 2-core machine; whether this was the cause is not established.)
        gc.collect()
        dist.destroy_process_group()


def run_ranks(fn, world: int, folder: Path, *args, timeout: float = 120.0) -> list:
    """``fn(rank, world, folder, *args)`` on ``world`` spawned ranks; returns their results in rank order.
    ``fn`` must be importable by the children (a module-level function)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rendezvous").unlink(missing_ok=True)  # a stale store would pair us with dead ranks
    ctx = mp.start_processes(_entry, args=(world, str(folder), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks of {fn.__name__} did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:  # our own children only
            if p.is_alive():
                p.kill()
    return [torch.load(folder / f"result{r}.pt", weights_only=False) for r in range(world)]
