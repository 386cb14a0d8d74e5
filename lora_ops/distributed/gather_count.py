"""Counts the bytes FSDP2's all-gathers move, whatever public collective the installed torch's FSDP2 calls."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

# FSDP2 all-gathers through torch.distributed.all_gather_single (torch 2.13) or all_gather_into_tensor
# (torch 2.11); where one calls the other, the nested call is not counted again.
ALL_GATHER_NAMES = ("all_gather_single", "all_gather_into_tensor")


@contextlib.contextmanager
def count_all_gather_bytes(counter: list[int]) -> Iterator[list[int]]:
    """While active, adds the output bytes of every all-gather to ``counter[-1]`` (the caller may append
    a new entry to start another tally). The patched functions are restored on exit."""
    originals = {name: getattr(dist, name) for name in ALL_GATHER_NAMES if hasattr(dist, name)}
    if not originals:
        raise RuntimeError(f"count_all_gather_bytes: this torch has none of torch.distributed."
                           f"{ALL_GATHER_NAMES}")
    depth = [0]

    def counting(orig):
        def call(output_tensor, input_tensor, *args, **kwargs):
            if depth[0] == 0:
                counter[-1] += output_tensor.numel() * output_tensor.element_size()
            depth[0] += 1
            try:
                return orig(output_tensor, input_tensor, *args, **kwargs)
            finally:
                depth[0] -= 1

        return call

    for name, orig in originals.items():
        setattr(dist, name, counting(orig))
    try:
        yield counter
    finally:
        for name, orig in originals.items():
            setattr(dist, name, orig)
