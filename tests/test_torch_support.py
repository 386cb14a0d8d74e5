"""The supported torch range: stated once (lora_ops/torch_support.py), enforced at import and by the build."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_ops
from lora_ops import torch_support as ts

ROOT = Path(__file__).resolve().parents[1]


def test_running_torch_is_inside_the_range():
    assert ts.is_supported(torch.__version__), (torch.__version__, lora_ops.SUPPORTED_TORCH)


@pytest.mark.parametrize("version,ok", [
    ("2.11.0+cu130", True), ("2.13.0+cpu", True), ("2.12.1", True), ("2.13.0.dev20261201", True),
    ("2.10.0", False), ("2.14.1", False), ("3.0.0", False), ("1.13.1+cu117", False),
])
def test_range_edges(version, ok):
    assert ts.is_supported(version) is ok
    if ok:
        ts.check_torch(version)
    else:
        expected = r"supports torch >=2\.11,<2\.14; this is torch " + version.replace("+", r"\+")
        with pytest.raises(ImportError, match=expected):
            ts.check_torch(version)


def _import_under(version: str, allow: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ts.ALLOW_ENV}
    if allow:
        env[ts.ALLOW_ENV] = "1"
    code = f"import torch; torch.__version__ = {version!r}; import lora_ops; print('imported')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_refuses_an_unsupported_torch_clearly():
    run = _import_under("2.10.2", allow=False)
    assert run.returncode != 0
    assert "ImportError: lora_ops supports torch >=2.11,<2.14; this is torch 2.10.2" in run.stderr


def test_import_warns_when_allowed():
    run = _import_under("2.15.0", allow=True)
    assert run.returncode == 0 and "imported" in run.stdout, run.stderr
    assert "RuntimeWarning: lora_ops supports torch" in run.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_build_reads_the_range_from_the_python_file(tmp_path):
    cmd = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DLORA_OPS_WITH_CUDA=OFF",
           f"-DPython_EXECUTABLE={sys.executable}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "supports torch" not in run.stdout + run.stderr, run.stdout + run.stderr
    # the status line comes before torch's own CMake config (which may want a CUDA toolkit for a CUDA torch)
    assert f"lora_ops: torch {torch.__version__} (supported >=2.11,<2.14)" in run.stdout
