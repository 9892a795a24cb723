"""The plumbing of the benchmarks: results, statistics, progress, scratch databases, probes."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import REPO, script_env
from tests.helpers import admin as _admin

_started = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr, so a long run never looks hung (stdout carries the table)."""
    print(
        f"[benchmarks {time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True
    )


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
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.skipped or row.error or not row.ratios:
            reason = row.skipped or f"ERROR: {row.error}" or "no measurement"
            cells = (row.id, row.db, row.what, reason, "", "", "", row.target_text, "—")
        else:
            a = f"{row.a_label} {fmt_seconds(median(row.a_values))}"
            b = f"{row.b_label} {fmt_seconds(median(row.b_values))}"
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
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# --- databases -------------------------------------------------------------------


class Databases:
    """Fresh, empty system databases for the measurements, removed afterwards.

    SQLite: files in a temporary directory. Postgres: databases created on the
    server of ``DBOS_SYSTEM_DATABASE_URL`` (the configured database itself is
    never written to), dropped at the end.
    """

    def __init__(self, postgres_url: str | None) -> None:
        self.postgres_url = postgres_url
        self.tmp = Path(tempfile.mkdtemp(prefix="dbos-bench-"))
        self.run_id = uuid.uuid4().hex[:8]
        self._pg_created: list[str] = []

    def fresh(self, kind: str, label: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{self.tmp / f'{label}-{uuid.uuid4().hex[:6]}.sqlite'}"
        assert self.postgres_url is not None
        from sqlalchemy.engine import make_url

        name = f"bench_{self.run_id}_{label.replace('-', '_')}_{uuid.uuid4().hex[:4]}"
        with _admin(self.postgres_url) as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        self._pg_created.append(name)
        return make_url(self.postgres_url).set(database=name).render_as_string(hide_password=False)

    def keep(self, url: str) -> None:
        """Leave this scratch database in place (for drawing it again later)."""
        from sqlalchemy.engine import make_url

        self._pg_created.remove(make_url(url).database)

    def close(self) -> None:
        for name in self._pg_created:
            try:
                assert self.postgres_url is not None
                with _admin(self.postgres_url) as cur:
                    # FORCE (Postgres 13+) ends sessions a killed server left behind.
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the results
                progress(f"could not drop scratch database {name}: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)


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
