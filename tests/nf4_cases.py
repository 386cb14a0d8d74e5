"""Shapes and settings shared by the NF4 test files."""

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# Odd on purpose: single element, odd numel, partial last blocks, several nested (256) groups.
SHAPES = [(1,), (3, 5), (7, 129), (64, 64), (33, 257), (300, 130), (2, 3, 101)]
