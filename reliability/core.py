"""The plumbing of the reliability suite: figures, the table, its context.

Every area module (``crash_matrix``, ``outage``, ...) exposes ``run(ctx) -> list[Figure]``.
The runner (``python -m reliability``) and the tests call the same code; the tests run it
with fewer trials (``ctx.trials``) and assert on what it measured. Servers, scratch
databases, clusters and progress lines come from the shared harness (``harness/``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import pgcluster
from harness.db import ScratchDatabases, assert_no_secret_in_databases
from harness.env import SecretWatch, no_secret_leaks
from harness.report import Progress, markdown_table

progress = Progress("reliability")


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
    kept = {True: "yes", False: "**NO**", None: "—"}
    return markdown_table(
        ("area", "figure", "value", "promise", "kept?", "note"),
        ((f.area, f.name, f.value, f.promise or "—", kept[f.ok], f.note) for f in figures),
    )


@dataclass
class Context:
    """What an area needs: a Postgres server to make databases on, a scratch directory,
    how many trials, whether this is a short run (the tests, CI), a seed that makes a
    run's random choices repeatable, and the run's secret watch."""

    server_url: str
    workdir: Path
    # The secrets handed to scripts during the run: the watch open while it lasts
    # (harness.env), never one of its own that nothing records into.
    watch: SecretWatch
    trials: int = 10
    quick: bool = False
    seed: int | None = None  # random choices (kill moments, fuzzing): None = fresh
    _scratch: ScratchDatabases | None = field(default=None, repr=False)

    @property
    def scratch_dbs(self) -> ScratchDatabases:
        if self._scratch is None:
            self._scratch = ScratchDatabases(self.server_url, "rel", self.workdir)
        return self._scratch

    def fresh_db(self, label: str) -> str:
        """A new, empty Postgres database on the server; dropped by ``close``."""
        return self.scratch_dbs.postgres(label)

    def databases(self) -> list[str]:
        """The URLs of the databases ``fresh_db`` made that are still there."""
        return self.scratch_dbs.urls()

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
        for failure in self.scratch_dbs.drop_all():
            progress(f"could not drop scratch database {failure}")


@contextmanager
def quick_context(server_url: str, workdir: Path) -> Iterator[Context]:
    """A short run's context (the tests): two trials, a secret watch of its own;
    afterwards its outputs, logs and databases are checked for secrets, then the
    databases are dropped."""
    with no_secret_leaks(workdir) as watch:
        ctx = Context(server_url, workdir, watch, trials=2, quick=True)
        try:
            yield ctx
            assert_no_secret_in_databases(watch.secrets, *ctx.databases())
        finally:
            ctx.close()


__all__ = ["Context", "Figure", "broken", "info", "progress", "promise", "quick_context", "table"]
