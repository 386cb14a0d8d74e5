"""The end-to-end demo (python -m lora_ops demo) in its reduced CI size: it trains, the loss falls,
and bnb + PEFT patched by lora_ops follows the same loss curve from the same start."""

from __future__ import annotations

import json
import math

import pytest

from lora_ops import demo


def test_demo_ci_runs_and_loss_falls(tmp_path):
    have_peft = demo._available("peft", "bitsandbytes")
    compare = "patched" if have_peft else "none"
    summary = demo.run(["--ci", "--steps", "120", "--compare", compare, "--in-process", "--no-progress",
                        "--out", str(tmp_path)])
    runs = {r["variant"]: r for r in summary["runs"]}
    ours = runs["lora_ops"]
    assert len(ours["losses"]) == 120
    assert ours["final_loss"] < 0.5 * ours["initial_loss"], (ours["initial_loss"], ours["final_loss"])
    assert ours["tokens_per_s"] > 0 and ours["peak_memory_mib"] >= 0
    assert ours["op_calls"]["lora_ops"] > 0 and ours["op_calls"]["bitsandbytes"] == 0
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "demo.json").read_text())["config"]["size"] == "ci"
    if have_peft:
        # Same NF4 bytes, same adapter init, same batches: the curves agree (fp32 rounding only).
        # And the patched run really ran lora_ops' fused op (the PEFT patch is not a silent no-op).
        assert runs["patched"]["op_calls"]["lora_ops"] > 0 and runs["patched"]["op_calls"]["bitsandbytes"] == 0
        theirs = runs["patched"]["losses"]
        assert max(abs(a - b) for a, b in zip(ours["losses"][:60], theirs[:60])) < 1e-2 * ours["initial_loss"]


def test_demo_rejects_bad_options():
    with pytest.raises(SystemExit):
        demo.run(["--size", "huge"])


def test_lockstep_runs_every_variant_to_the_last_step():
    # The subprocess runs take turns (demo.train_lockstep); 23 steps: the last turn is a partial chunk.
    cfg = demo.make_config("ci", "cpu", steps=23)
    variants = ["lora_ops", "patched"] if demo._available("peft", "bitsandbytes") else ["lora_ops", "lora_ops"]
    runs = demo.train_lockstep(variants, cfg, progress=False)
    assert [r["variant"] for r in runs] == variants
    for r in runs:
        assert len(r["losses"]) == 23 and all(math.isfinite(v) for v in r["losses"])
        assert r["tokens_per_s"] > 0 and 0 < r["train_seconds"]
        assert r["op_calls"]["lora_ops"] > 0


def test_lockstep_reports_a_worker_that_dies():
    cfg = demo.make_config("ci", "cpu", steps=5)
    cfg.device = "no-such-device"  # the worker fails while building its model, before its first turn
    with pytest.raises(SystemExit, match="run failed"):
        demo.train_lockstep(["lora_ops", "lora_ops"], cfg, progress=False)
