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
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
    """Admit a fan-out of ``steps`` while the service's backlog stays within ``bound``.

    Deciding and starting must not interleave with another trigger's: requests counted
    at the same moment would all see the same room. ``decide`` holds a lock from the
    count until the caller has started its fan-out: an asyncio lock within a process,
    and on Postgres a session advisory lock, so replicas take turns too (a dead
    process's lock goes with its connection).
    """

    def __init__(
        self, url: str, app: str, workflow_name: str, bound: int, drain_steps_per_sec: float
    ) -> None:
        self.bound = bound
        self.drain_steps_per_sec = drain_steps_per_sec
        self._name = workflow_name
        self._postgres = database_kind(url) == "postgres"
        self._sql = sa.text(backlog_sql(database_kind(url)))
        self._lock_key = zlib.crc32(f"{app_name(app)}-admission".encode())
        self._local = asyncio.Lock()
        connect_args: dict[str, Any] = {}
        if self._postgres:
            connect_args = {
                "connect_timeout": CONNECT_TIMEOUT_SEC,
                "application_name": f"{app_name(app)}-admission",
            }
        # A small pool of its own: no connection set-up per trigger.
        self._engine = sa.create_engine(
            url, pool_size=2, max_overflow=2, pool_pre_ping=True, connect_args=connect_args
        )

    def backlog(self, conn: sa.Connection | None = None) -> int:
        """Steps admitted and not finished, across every process of the service."""
        if conn is None:
            with self._engine.connect() as own:
                return self.backlog(own)
        found = int(conn.execute(self._sql, {"name": self._name}).scalar_one())
        conn.commit()  # end the read: the next count sees what committed since
        return found

    def _enter(self) -> tuple[sa.Connection, int]:
        conn = self._engine.connect()
        try:
            if self._postgres:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": self._lock_key})
                conn.commit()
            return conn, self.backlog(conn)
        except BaseException:
            conn.close()
            raise

    def _leave(self, conn: sa.Connection) -> None:
        try:
            if self._postgres:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self._lock_key})
                conn.commit()
        finally:
            conn.close()

    @asynccontextmanager
    async def decide(self, steps: int) -> AsyncIterator[dict[str, Any] | None]:
        """Yields None when a fan-out of ``steps`` fits under the bound (start it inside
        the block), else why not, with ``retry_after`` (seconds until the excess should
        have drained)."""
        async with self._local:
            conn, backlog = await asyncio.to_thread(self._enter)
            try:
                yield self._refusal(backlog, steps)
            finally:
                await asyncio.to_thread(self._leave, conn)

    def _refusal(self, backlog: int, steps: int) -> dict[str, Any] | None:
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
