"""python -m lora_ops report: header, a missing benchmark is reported (not fatal), and the plots and
markdown are produced from benchmark results (here a fake fused-linear result written by a stand-in
benchmark script, so no real benchmark runs in the test)."""

from __future__ import annotations

import json

from lora_ops import report


def test_report_tolerates_missing_and_plots_results(tmp_path, monkeypatch):
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    rows = [{"N": 64, "K": 32, "M": m, "r": 4, "speedup_fwd_vs_bnb_peft": 1.0 + m / 10,
             "speedup_fwdbwd_vs_bnb_peft": 1.0 + m / 20, "ours_fwd_pct_copy_bw": 10.0 * m,
             "ours_fwd_pct_matmul": 5.0} for m in (1, 2, 4)]
    (bench_dir / "fake_linear.py").write_text(
        "import argparse, json, pathlib\n"
        "ap = argparse.ArgumentParser(); ap.add_argument('--out'); ap.add_argument('--device');"
        " ap.add_argument('--quick', action='store_true'); a = ap.parse_args()\n"
        "print('fake benchmark running')\n"
        f"pathlib.Path(a.out, 'bench_qlora.json').write_text(json.dumps({{'rows': {rows!r}}}))\n"
        "pathlib.Path(a.out, 'bench_qlora.md').write_text('# fake table\\n')\n")
    monkeypatch.setattr(report, "REPO", tmp_path)
    monkeypatch.setattr(report, "BENCHES", {
        "linear": ("Fused QLoRA linear", "bench/fake_linear.py", "bench_qlora.json"),
        "optimizer": ("Paged AdamW", "bench/absent.py", "results.json"),
    })
    out = tmp_path / "out"
    res = report.run(["--out", str(out), "--device", "cpu", "--quick"])
    assert res["benchmarks"]["linear"]["status"] == "ok"
    assert res["benchmarks"]["optimizer"]["status"] == "missing"
    md = (out / "report.md").read_text()
    for field in ("torch", "cuda", "git_commit", "driver", "device_name"):
        assert field in md
    assert "median 1.20x" in md and "not in this checkout" in md and "### fake table" in md
    for png in ("speedup_vs_bnb.png", "roofline.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmarks"]["linear"]["data"]["rows"] == rows
    assert (out / "raw" / "linear" / "log.txt").read_text().strip() == "fake benchmark running"


def test_report_without_bench_sources_fails_clearly(tmp_path):
    """As from an installed wheel: the package alone (copied away from the checkout, so no bench/ next to
    it). The entry point must say why and exit non-zero, not write an empty report."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import site as site_module

    import lora_ops
    import lora_ops._C as compiled

    site = tmp_path / "site"
    shutil.copytree(Path(lora_ops.__file__).parent, site / "lora_ops",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if not (site / "lora_ops" / Path(compiled.__file__).name).exists():  # an editable install keeps it apart
        shutil.copy2(compiled.__file__, site / "lora_ops")
    out = tmp_path / "out"
    # -S: no .pth files, so an editable install's import hook cannot send `lora_ops` back to the checkout;
    # site-packages stays importable through PYTHONPATH (torch).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *site_module.getsitepackages()]))
    where = subprocess.run([sys.executable, "-S", "-c", "import lora_ops; print(lora_ops.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert where.stdout.strip() == str(site / "lora_ops" / "__init__.py"), where.stdout + where.stderr
    run = subprocess.run([sys.executable, "-S", "-m", "lora_ops", "report", "--quick", "--device", "cpu", "--out",
                          str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no benchmark sources" in run.stderr and "source checkout" in run.stderr, run.stderr
    assert not (out / "report.md").exists()
