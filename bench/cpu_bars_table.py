"""The README's CPU table, generated from the committed results of bench/cpu_bars.py: one column per CPU kind
(bench/results/cpu_bars_<kind>/cpu_bars.json), one row per bar, each cell the measured value and whether it
met its goal. Prints markdown:

    python bench/cpu_bars_table.py [--results bench/results] [--issue 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(results: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(results.glob("cpu_bars_*/cpu_bars.json")):
        data = json.loads(f.read_text())
        if "commit" in data:  # written by the issue-32 version of cpu_bars.py (older folders lack the limits)
            out[f.parent.name.removeprefix("cpu_bars_")] = data
    return out


def table(runs: dict[str, dict], issue: str | None) -> str:
    names = []
    for data in runs.values():
        for b in data["bars"]:
            if b["bar"] not in names and (issue is None or b["bar"].startswith(f"{issue}:")):
                names.append(b["bar"])
    kinds = list(runs)
    lines = ["| bar | goal | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for name in names:
        goal, cells = "", []
        for kind in kinds:
            b = next((b for b in runs[kind]["bars"] if b["bar"] == name), None)
            if b is None:
                cells.append("–")
                continue
            goal = ("≥ " if b["higher_is_better"] else "≤ ") + f"{b['goal']}"
            cells.append("n/a" if b["value"] is None else f"{b['value']:.2f} {'✓' if b['met'] else '✗'}")
        lines.append(f"| {name.split(': ', 1)[-1]} | {goal} | " + " | ".join(cells) + " |")
    machines = [f"- `{k}`: {d['machine']['model']}, {d['machine']['cores']} logical cores, lora_ops tier "
                f"{d['environment'].get('lora_ops_cpu_isa')}, commit {d.get('commit')}" for k, d in runs.items()]
    return "\n".join(lines + [""] + machines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--issue", default=None, help="only this issue's bars (e.g. 32)")
    args = ap.parse_args(argv)
    print(table(load(args.results), args.issue), end="")


if __name__ == "__main__":
    main()
