"""The README's results tables are scripts/readme_results.py's output from bench/results/ (never typed by
hand), and every row names its machine, commit and date."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
readme_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_results)


def test_readme_tables_are_the_generated_ones():
    generated = readme_results.markdown()
    in_readme = readme_results.readme_block((ROOT / "README.md").read_text())
    assert in_readme == generated, "README results differ: python scripts/readme_results.py --write"


def test_every_row_names_machine_commit_and_date():
    rows = [ln for ln in readme_results.markdown().splitlines() if ln.startswith("| ") and "---" not in ln]
    data_rows = [r for r in rows if not r.startswith("| measurement")]
    assert data_rows
    for row in data_rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        machine, commit, date = cells[-3:]
        assert "cores" in machine, row
        assert re.fullmatch(r"[0-9a-f]{7}(\+dirty)?", commit), row
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), row


def test_a_run_without_commit_or_date_is_refused(tmp_path):
    folder = tmp_path / "cpu_bars_x"
    folder.mkdir()
    data = json.loads((ROOT / "bench/results/cpu_bars_zen4/cpu_bars.json").read_text())
    del data["environment"]["date_utc"]
    (folder / "cpu_bars.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="date_utc"):
        readme_results.provenance(data, folder)
