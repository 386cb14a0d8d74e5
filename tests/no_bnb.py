"""Running test code in a fresh interpreter in which ``import bitsandbytes`` fails (as on a machine without
it): what the transformers / PEFT / TRL paths of lora_ops must work in."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCK = """
import sys
sys.modules["bitsandbytes"] = None  # any import of it now raises ImportError; find_spec says absent
"""
CHECK = """
_loaded = [m for m, v in sys.modules.items() if m.split(".")[0] == "bitsandbytes" and v is not None]
assert not _loaded, _loaded
"""


def run_without_bnb(code: str, timeout: int = 600, cwd: Path | None = None) -> str:
    """Runs ``code`` (dedented) after blocking bitsandbytes, then checks that none of it got imported;
    returns stdout. The tests directory is on the path (hf_tiny, ...)."""
    script = BLOCK + textwrap.dedent(code) + CHECK
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=False,
                       env=env, cwd=cwd)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-6000:]}"
    return r.stdout
