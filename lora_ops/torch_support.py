"""The torch releases lora_ops supports: the one place for that fact (CMakeLists.txt reads the two tuples
below as text, the import checks them). Tested: torch 2.13 (CPU build, CI) and 2.11 (CUDA 13.0 build, the
GPU machine's; CI runs the suite under it on the CPU with the prebuilt CUDA module)."""

from __future__ import annotations

import os
import re
import warnings

MIN_TORCH = (2, 11)  # oldest supported minor release
BELOW_TORCH = (2, 14)  # first unsupported minor release
SUPPORTED_TORCH = f">={MIN_TORCH[0]}.{MIN_TORCH[1]},<{BELOW_TORCH[0]}.{BELOW_TORCH[1]}"
# Set to 1 to import under another torch anyway (a warning instead of an error; untested territory).
ALLOW_ENV = "LORA_OPS_ALLOW_UNSUPPORTED_TORCH"


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``2.11.0+cu130`` or ``2.13.0.dev20260101``."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"lora_ops: cannot read a torch version from {version!r}")
    return int(m.group(1)), int(m.group(2))


def is_supported(version: str) -> bool:
    return MIN_TORCH <= torch_release(version) < BELOW_TORCH


def check_torch(version: str) -> None:
    """Raises ImportError naming the supported range when ``version`` is outside it (a warning instead
    when LORA_OPS_ALLOW_UNSUPPORTED_TORCH=1)."""
    if is_supported(version):
        return
    msg = (f"lora_ops supports torch {SUPPORTED_TORCH}; this is torch {version}. Install a supported torch "
           f"(e.g. pip install torch==2.13.0) and rebuild lora_ops against it, or set {ALLOW_ENV}=1 to try "
           "this one anyway")
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return
    raise ImportError(msg)
