"""scripts/gpu_check.sh --dry-run: its deadline, its $OUT contract (at most 8 files, partial results after a
kill) and its test selection. Needs the GPU machine's stack and the prebuilt CUDA module, named by
LORA_OPS_GPU_CHECK_PYTHON (scripts/gpu_stack_venv.sh) and LORA_OPS_GPU_CHECK_PREBUILT
(scripts/build_cuda_prebuilt.sh); .ci/run sets both for this file."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("LORA_OPS_GPU_CHECK_PYTHON")
PREBUILT = os.environ.get("LORA_OPS_GPU_CHECK_PREBUILT")
pytestmark = pytest.mark.skipif(
    not (PYTHON and PREBUILT),
    reason="needs LORA_OPS_GPU_CHECK_PYTHON and LORA_OPS_GPU_CHECK_PREBUILT (the GPU stack's venv and the "
    "prebuilt module; .ci/run)")
MAX_FILES = 8  # what the device tool brings back


def _start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OUT": str(out), "PYTHON": PYTHON, "LORA_OPS_COMMIT": "0" * 40}
    return subprocess.Popen(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", *args, PREBUILT],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_dry_run_passes_and_selects_the_cuda_tests(tmp_path):
    p = _start(tmp_path)
    log, _ = p.communicate(timeout=900)
    assert p.returncode == 0, log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["state"] == "done" and summary["dry_run"] and summary["all_ok"], summary
    steps = [s["step"] for s in summary["steps"]]
    assert steps == ["env", "load", "smoke", "memcheck", "racecheck", "synccheck", "initcheck", "tests",
                     "bench"]
    assert summary["commit"] == "0" * 40 and summary["module_commit"], summary
    text = (tmp_path / "gpu_check.log").read_text()
    assert "ops registered with CUDA kernels" in text
    assert "dry run: compute-sanitizer --tool initcheck --report-api-errors no" in text
    n = int(text.split("CUDA test cases selected")[0].rsplit("dry run: ", 1)[1])
    assert n >= 100, text[-2000:]
    assert "(first: tests/test_qlora_cuda_paths.py)" in text
    assert len(_files(tmp_path)) <= MAX_FILES, _files(tmp_path)
    for name in ("smoke.json", "microbench.json"):
        data = json.loads((tmp_path / name).read_text())
        assert data["state"] == "done" and data["commit"] == "0" * 40


def test_deadline_skips_what_no_longer_fits(tmp_path):
    # 18 s less the 8 s kept for the summary: the env step (a torch import, >= 1 s) runs under a 10 s cap,
    # then fewer than 10 s are left, so every later step is skipped, whatever this machine's speed.
    t0 = time.monotonic()
    p = _start(tmp_path, "--budget", "18")
    log, _ = p.communicate(timeout=600)
    elapsed = time.monotonic() - t0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert p.returncode == 1, log  # skipped steps are not a pass
    steps = {s["step"]: s for s in summary["steps"]}
    assert not steps["env"]["skipped"] and steps["load"]["skipped"], summary
    assert summary["state"] == "done" and not summary["all_ok"], summary
    assert elapsed < 18 + 30, (elapsed, log)  # the budget, plus the staging and the closing summary
    assert len(_files(tmp_path)) <= MAX_FILES, _files(tmp_path)


def test_killed_run_leaves_partial_results_within_the_file_limit(tmp_path):
    p = _start(tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it once a few steps are recorded
        try:
            done = json.loads((tmp_path / "summary.json").read_text())["steps"]
        except (OSError, ValueError, KeyError):
            done = []
        if len(done) >= 3:
            break
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    files = _files(tmp_path)
    assert len(files) <= MAX_FILES, files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["state"] == "running" and len(summary["steps"]) >= 3, summary
    assert "== env" in (tmp_path / "gpu_check.log").read_text()
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    assert smoke["checks"], smoke
