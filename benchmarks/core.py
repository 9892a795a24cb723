"""The plumbing of the benchmarks: results, statistics, the table, probes.

Scratch databases (``harness.db.ScratchDatabases``), servers (``harness.server``) and
progress lines (``harness.report``) come from the shared harness.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import REPO
from harness.env import script_env
from harness.report import Progress, markdown_table

progress = Progress("benchmarks")


# --- statistics ---------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with 100 samples, p99 is the 99th."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def fmt_seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    if value >= 1e-6:
        return f"{value * 1e6:.2f} µs"
    return f"{value * 1e9:.0f} ns"


# --- results ------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: ``ratio = a / b`` over repeats, against a target."""

    id: str
    what: str
    db: str
    a_label: str = ""
    b_label: str = ""
    a_values: list[float] = field(default_factory=list)
    b_values: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    target_op: str | None = None  # "<=", ">=" or None (informational)
    target: float | None = None
    target_text: str = "—"
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    unit: str = "s"  # of a_values and b_values: "s" (seconds) or "" (counts)

    def add(self, a: float, b: float) -> None:
        if a <= 0 or b <= 0:
            raise ValueError(f"row {self.id}: non-positive measurement a={a} b={b}")
        self.a_values.append(a)
        self.b_values.append(b)
        self.ratios.append(a / b)

    @property
    def ratio(self) -> float | None:
        return median(self.ratios) if self.ratios else None

    @property
    def met(self) -> bool | None:
        if self.ratio is None or self.target_op is None or self.target is None:
            return None
        return self.ratio <= self.target if self.target_op == "<=" else self.ratio >= self.target

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio_median"] = self.ratio
        data["ratio_min"] = min(self.ratios) if self.ratios else None
        data["ratio_max"] = max(self.ratios) if self.ratios else None
        data["a_median"] = median(self.a_values) if self.a_values else None
        data["b_median"] = median(self.b_values) if self.b_values else None
        data["repeats"] = len(self.ratios)
        data["met"] = self.met
        return data


def _fmt_ratio(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    """The human-readable table (Markdown, so it pastes into the README as is)."""
    head = ("#", "db", "what", "A", "B", "A/B median", "min–max", "target", "met?")
    lines: list[tuple[object, ...]] = []
    for row in rows:
        if row.skipped or row.error or not row.ratios:
            reason = row.skipped or f"ERROR: {row.error}" or "no measurement"
            cells = (row.id, row.db, row.what, reason, "", "", "", row.target_text, "—")
        else:
            fmt = fmt_seconds if row.unit == "s" else (lambda v: f"{v:g}")
            a = f"{row.a_label} {fmt(median(row.a_values))}"
            b = f"{row.b_label} {fmt(median(row.b_values))}"
            spread = f"{_fmt_ratio(min(row.ratios))}–{_fmt_ratio(max(row.ratios))}"
            met = {True: "yes", False: "**no**", None: "—"}[row.met]
            cells = (
                row.id,
                row.db,
                row.what,
                a,
                b,
                _fmt_ratio(row.ratio or 0),
                spread,
                row.target_text,
                met,
            )
        lines.append(cells)
    return markdown_table(head, lines)


# --- processes --------------------------------------------------------------------


class ProbeError(RuntimeError):
    pass


def run_probe(name: str, db_url: str, params: dict[str, Any], timeout: float = 300) -> Any:
    """Run ``benchmarks.probes.<name>`` in a fresh Python process and return its result.

    DBOS is a process-wide singleton, so each configuration gets its own process;
    its stdout (log lines of the measured code) goes to /dev/null, so both sides
    of a comparison pay the same for writing their logs.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as out:
        result_path = out.name
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.probes", name, json.dumps(params), result_path],
            cwd=REPO,
            env=script_env(db_url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise ProbeError(f"probe {name} exited with {proc.returncode}:\n{tail}")
        return json.loads(Path(result_path).read_text())
    finally:
        Path(result_path).unlink(missing_ok=True)
