"""benchmarks/: the benchmark command and the timeline still run end to end.

Figures are never asserted: speed targets live in the benchmark table, not in tests.
What is asserted is the shape of the output: every row, a positive ratio for each
measured row, the JSON file, the PNG, and no scratch databases left behind.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO
from harness.env import script_env

# Servers, crashes or long runs: not in the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

# Every row the table has; on SQLite all but 4a, 4c, 8c and 8d (two worker processes
# need Postgres).
ROW_IDS = ["1a", "1b", "2", "3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b", "5c", "6a", "6b"]
ROW_IDS += ["7"]
ROW_IDS += ["8a", "8b", "8c", "8d", "8e", "8f"]
POSTGRES_ONLY = {"4a", "4c", "8c", "8d"}


def run_module(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    # TMPDIR: the scratch databases go under tmp_path, so leftovers can be seen.
    env = script_env(None, TMPDIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_run_on_sqlite_prints_and_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = run_module(["benchmarks", "--smoke", "--out", str(out)], tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The table on stdout has one line per row; progress went to stderr.
    table_ids = [line.split("|")[1].strip() for line in proc.stdout.splitlines()[2:]]
    assert table_ids == ROW_IDS
    assert "sqlite: 6 recovery" in proc.stderr

    data = json.loads(out.read_text())
    assert data["mode"] == "smoke"
    assert data["databases"] == ["sqlite"]
    rows = {r["id"]: r for r in data["rows"]}
    assert list(rows) == ROW_IDS
    assert {r["db"] for r in rows.values()} == {"sqlite"}
    for rid, row in rows.items():
        if rid in POSTGRES_ONLY:
            assert "Postgres" in row["skipped"]
            assert row["ratios"] == []
            continue
        assert row["error"] is None and row["skipped"] is None, row
        assert row["ratios"], rid
        for value in row["ratios"] + row["a_values"] + row["b_values"]:
            assert isinstance(value, float) and value > 0 and math.isfinite(value), (rid, value)
        assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
        # A row with a target says whether it was met; one without does not.
        assert (row["met"] is None) == (row["target_op"] is None), rid
    # Recovery really recovered: half the fan-out was done at the kill, all of it after.
    (run,) = rows["6a"]["details"]["runs"]
    assert 0 < run["done_at_kill"] < run["units"]
    assert run["remaining"] == run["units"] - run["done_at_kill"]
    assert run["baseline_steps"] <= run["units"]

    # The scratch databases are gone.
    assert not list(tmp_path.glob("dbos-bench-*"))


def test_timeline_runs_a_fan_out_and_draws_a_png(tmp_path: Path) -> None:
    png = tmp_path / "timeline.png"
    db = f"sqlite:///{tmp_path / 'timeline.sqlite'}"
    proc = run_module(
        [
            "benchmarks.timeline",
            "--db",
            db,
            "--workers",
            "1",
            "--steps",
            "12",
            "--max-n",
            "20",
            "--out",
            str(png),
        ],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # a drawn chart, not an empty canvas
    assert "steps per executor: {'shutdown-0': 12}" in proc.stderr
