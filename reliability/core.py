"""The plumbing of the reliability suite: figures, the table, scratch databases, progress.

Every area module (``crash_matrix``, ``outage``, ...) exposes ``run(ctx) -> list[Figure]``.
The runner (``python -m reliability``) and the tests call the same code; the tests run it
with fewer trials (``ctx.trials``) and assert on what it measured.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests import pgcluster
from tests.helpers import REPO, admin

_started = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr, so a long run never looks hung (stdout carries the table)."""
    print(
        f"[reliability {time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True
    )


@dataclass
class Figure:
    """One line of the table.

    ``promise`` is what DBOS or the app promises for this figure ("0", "all", "none",
    "2xx or 503"); ``ok`` says whether the run kept it. Informative figures (a peak
    RSS, a count of trials) have no promise and ``ok=None``.
    """

    area: str
    name: str
    value: Any
    promise: str = ""
    ok: bool | None = None
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def promise(area: str, name: str, value: Any, ok: bool, promised: str, note: str = "") -> Figure:
    return Figure(area, name, value, promised, bool(ok), note)


def info(area: str, name: str, value: Any, note: str = "") -> Figure:
    return Figure(area, name, value, "", None, note)


def broken(figures: list[Figure]) -> list[Figure]:
    return [f for f in figures if f.ok is False]


def table(figures: list[Figure]) -> str:
    """Markdown, so it pastes into the README as is."""
    head = ("area", "figure", "value", "promise", "kept?", "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in figures:
        kept = {True: "yes", False: "**NO**", None: "—"}[f.ok]
        cells = (f.area, f.name, f.value, f.promise or "—", kept, f.note)
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


@dataclass
class Context:
    """What an area needs: a Postgres server to make databases on, a scratch directory,
    how many trials, whether this is a short run (the tests, CI), and a seed that
    makes a run's random choices repeatable."""

    server_url: str
    workdir: Path
    trials: int = 10
    quick: bool = False
    seed: int | None = None  # random choices (kill moments, fuzzing): None = fresh
    _created: list[str] = field(default_factory=list)

    def fresh_db(self, label: str) -> str:
        """A new, empty Postgres database on the server; dropped by ``close``."""
        from sqlalchemy.engine import make_url

        name = f"rel_{label.replace('-', '_')}_{uuid.uuid4().hex[:10]}"
        with admin(self.server_url) as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    def databases(self) -> list[str]:
        """The URLs of the databases ``fresh_db`` made that are still there."""
        from sqlalchemy.engine import make_url

        base = make_url(self.server_url)
        return [base.set(database=n).render_as_string(hide_password=False) for n in self._created]

    def sqlite_db(self, label: str) -> str:
        return f"sqlite:///{self.workdir / f'{label}-{uuid.uuid4().hex[:6]}.sqlite'}"

    def scratch(self, label: str) -> Path:
        """A new directory for one trial's logs and ledger."""
        path = self.workdir / f"{label}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    @contextmanager
    def own_cluster(self) -> Iterator[pgcluster.Cluster]:
        """A private Postgres cluster (for taking the database away); removed afterwards."""
        cluster = pgcluster.Cluster(self.scratch("cluster"))
        try:
            yield cluster
        finally:
            cluster.close()

    def close(self) -> None:
        for name in self._created:
            try:
                with admin(self.server_url) as cur:
                    # FORCE ends sessions a killed server left behind.
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the results
                progress(f"could not drop scratch database {name}: {exc}")
        self._created.clear()


__all__ = ["REPO", "Context", "Figure", "admin", "broken", "info", "progress", "promise", "table"]
