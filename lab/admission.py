"""Admission control for a fan-out service: how much admitted work is not finished yet.

The backlog lives in the system database, so every replica counts the same work: the
bound is the service's, not each process's. A fan-out records its step count as a
workflow attribute when it starts (one row, written with the start itself); its
backlog is that count minus its children that have finished. Counting queued step
rows instead would miss the steps a fan-out has not enqueued yet (a few ms each), and
a burst of triggers would all be admitted against the same near-empty queue.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import sqlalchemy as sa

from lab.config import CONNECT_TIMEOUT_SEC, app_name, database_kind

# The attribute a fan-out carries: how many steps it will run.
STEPS_ATTRIBUTE = "fanout_steps"
UNFINISHED = ("ENQUEUED", "PENDING")  # a step's row in these states is still backlog

# One statement: the running fan-outs (few rows, the partial index on PENDING; a
# recovered one waits ENQUEUED) and, per fan-out, its finished children (the
# parent_workflow_id index).
_BACKLOG_SQL = """
SELECT COALESCE(SUM(CAST({steps} AS INTEGER) - (
    SELECT count(*) FROM {table} AS c
    WHERE c.parent_workflow_id = p.workflow_uuid AND c.status NOT IN ('ENQUEUED', 'PENDING')
)), 0)
FROM {table} AS p
WHERE p.status IN ('ENQUEUED', 'PENDING') AND p.name = :name AND {steps} IS NOT NULL
"""


def backlog_sql(kind: str) -> str:
    """The backlog query for a ``postgres`` or ``sqlite`` system database."""
    if kind == "postgres":
        table, steps = "dbos.workflow_status", f"p.attributes->>'{STEPS_ATTRIBUTE}'"
    else:
        table, steps = "workflow_status", f"json_extract(p.attributes, '$.{STEPS_ATTRIBUTE}')"
    return _BACKLOG_SQL.format(table=table, steps=steps)


class Admission:
    """Admit a fan-out of ``steps`` while the service's backlog stays within ``bound``."""

    def __init__(
        self, url: str, app: str, workflow_name: str, bound: int, drain_steps_per_sec: float
    ) -> None:
        self.bound = bound
        self.drain_steps_per_sec = drain_steps_per_sec
        self._name = workflow_name
        self._sql = sa.text(backlog_sql(database_kind(url)))
        # A small pool of its own: one query per trigger, no connection set-up each time.
        connect_args: dict[str, Any] = {}
        if database_kind(url) == "postgres":
            connect_args = {
                "connect_timeout": CONNECT_TIMEOUT_SEC,
                "application_name": f"{app_name(app)}-admission",
            }
        self._engine = sa.create_engine(
            url, pool_size=2, max_overflow=4, pool_pre_ping=True, connect_args=connect_args
        )

    def backlog(self) -> int:
        """Steps admitted and not finished, across every process of the service."""
        with self._engine.connect() as conn:
            return int(conn.execute(self._sql, {"name": self._name}).scalar_one())

    async def refusal(self, steps: int) -> dict[str, Any] | None:
        """None when a fan-out of ``steps`` fits under the bound, else why not, with
        ``retry_after`` (seconds until the excess should have drained)."""
        backlog = await asyncio.to_thread(self.backlog)
        excess = backlog + steps - self.bound
        if excess <= 0:
            return None
        return {
            "detail": f"overloaded: {backlog} steps queued, {steps} more would exceed "
            f"MAX_QUEUED_STEPS={self.bound}; retry later",
            "backlog": backlog,
            "max_queued_steps": self.bound,
            "retry_after": max(1, math.ceil(excess / self.drain_steps_per_sec)),
        }

    def close(self) -> None:
        self._engine.dispose()
