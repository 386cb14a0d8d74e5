"""python -m lora_ops: real help, clear errors (unknown command, missing extras), one-line reprs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lora_ops
from lora_ops import demo


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ops", *args], capture_output=True, text=True, check=False)


def test_help_lists_every_command():
    res = _cli("--help")
    assert res.returncode == 0
    for cmd in ("demo", "env", "report"):
        assert f"    {cmd} " in res.stdout
    assert "``" not in res.stdout  # no raw RST


@pytest.mark.parametrize("args", [("bogus",), ()])
def test_unknown_or_missing_command_is_an_error(args):
    res = _cli(*args)
    assert res.returncode == 2 and "error:" in res.stderr


def test_demo_without_its_extra_says_what_to_install(monkeypatch):
    monkeypatch.setattr(demo, "_available", lambda *m: "tqdm" not in m)
    with pytest.raises(SystemExit, match=r"needs tqdm: install the demo extra"):
        demo.run(["--ci"])


def test_nf4_weight_repr_is_one_line(rng):
    q = lora_ops.quantize_nf4(torch.randn(8, 8, generator=rng))
    text = repr(q)
    assert "\n" not in text and text.startswith("NF4Weight(shape=(8, 8)") and "double_quant=True" in text
