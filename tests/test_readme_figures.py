"""Every benchmark table in the README comes from a recorded run that is committed:
each names its file (`<!-- bench-table: bench/results/….json -->`), and every
cell is that file's median, formatted as the bench's own markdown formats it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402  (bench/report.py, the formatting the recorded markdown uses)

MARKER = re.compile(r"<!-- bench-table: (bench/results/[\w.-]+\.json) -->\n((?:\|.*\|\n)+)")
COLUMNS = {f"{label} ({unit})": metric for metric, (label, unit, _) in report.METRICS.items()}


def tables() -> list[tuple[str, list[list[str]]]]:
    text = (ROOT / "README.md").read_text()
    found = []
    for name, block in MARKER.findall(text):
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block.splitlines()]
        found.append((name, [rows[0]] + rows[2:]))  # the header, then the rows after |---|
    return found


def test_the_readme_has_its_bench_tables_marked():
    names = [name for name, _ in tables()]
    assert len(names) >= 2, "the plaintext and the mTLS tables each name their recorded run"
    readme = (ROOT / "README.md").read_text()
    assert readme.count("| relay |") + readme.count("| pair |") == len(names), "a bench table without its file"


@pytest.mark.parametrize("name, rows", tables(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_cell_of_a_readme_table_is_its_recorded_runs_median(name, rows):
    path = ROOT / name
    assert path.is_file(), f"{name} is not committed"
    assert path.with_suffix(".md").is_file(), f"{name}'s markdown is not committed"
    doc = json.loads(path.read_text())
    assert not doc["commit"].endswith("-dirty")
    header, body = rows[0], rows[1:]
    metrics = [COLUMNS[label] for label in header[1:]]
    for row in body:
        relay = row[0].replace("*", "").split(" (")[0]
        assert relay in doc["values"], f"{relay} is not a row of {name}"
        for metric, cell in zip(metrics, row[1:]):
            expected = report.fmt(metric, doc["values"][relay].get(metric))
            if metric == "idle_rss" and relay in doc["idle_pss"]:
                expected += " (PSS)"
            assert cell.replace("*", "") == expected, (relay, metric)
