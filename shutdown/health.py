"""The ``/healthz`` check: does the system database answer a query, now?

The configuration (URL, connection arguments, kind) is read once, when the check is
made at startup; each probe opens a new connection and runs one query, bounded in time.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from lab.config import app_name, database_kind, pg_connect_args

# Below the Docker HEALTHCHECK's 4 s client timeout: the check answers before it gives up.
TIMEOUT_SEC = 3
# A probe's connection attempt (and its query, by statement_timeout) gives up within
# this, under TIMEOUT_SEC: a probe of an unreachable database then ends with the
# database's own reason ("connection refused", "timeout expired") instead of the bare
# "no answer". A start waits longer (lab.config.CONNECT_TIMEOUT_SEC): no client waits on it.
PROBE_TIMEOUT_SEC = 2


class HealthCheck:
    def __init__(
        self,
        url: str,
        app: str,
    ) -> None:
        self.kind = database_kind(url)
        self._password: str | None = None
        self._sqlite_uri = ""
        self._pg_args: dict[str, Any] = {}
        if self.kind == "sqlite":
            from sqlalchemy.engine import make_url

            # mode=rw: a missing file is an error, not a new empty database.
            path = Path(make_url(url).database or "").resolve()
            self._sqlite_uri = f"{path.as_uri()}?mode=rw"
        else:
            self._pg_args = pg_connect_args(
                url,
                connect_timeout=PROBE_TIMEOUT_SEC,
                application_name=f"{app_name(app)}-health",
                statement_timeout_ms=PROBE_TIMEOUT_SEC * 1000,
            )
            self._password = self._pg_args.get("password")
        # The one database check in flight: probes that arrive meanwhile share it, so a
        # server that accepts connections but never answers cannot pile up a thread per probe.
        self._in_flight: asyncio.Future[str | None] | None = None

    def check_database(self) -> str | None:
        """None when the database answers a query, else why not (never the password)."""
        try:
            if self.kind == "sqlite":
                import sqlite3

                conn: Any = sqlite3.connect(self._sqlite_uri, uri=True, timeout=PROBE_TIMEOUT_SEC)
                sql = "SELECT count(*) FROM sqlite_master"  # reads the file (SELECT 1 would not)
            else:
                import psycopg2

                conn = psycopg2.connect(**self._pg_args)
                sql = "SELECT 1"
            try:
                conn.cursor().execute(sql)
            finally:
                conn.close()
            return None
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if self._password:
                text = text.replace(self._password, "***")
            return f"database unreachable: {text}"

    async def problem(self) -> str | None:
        """None when healthy, else the reason; answers within TIMEOUT_SEC."""
        if self._in_flight is None or self._in_flight.done():
            self._in_flight = asyncio.ensure_future(asyncio.to_thread(self.check_database))
        try:
            return await asyncio.wait_for(asyncio.shield(self._in_flight), TIMEOUT_SEC)
        except TimeoutError:
            # Also when the check itself could not run in time: a process whose threads
            # compute (the shutdown demo's executor=thread) can starve it of the GIL.
            return f"database unreachable: no answer within {TIMEOUT_SEC} s"

    async def answer(self, **facts: Any) -> tuple[int, dict[str, Any]]:
        """(200, ``{"status": "ok", "database", "pid", **facts}``) or
        (503, the same with ``"status": "unavailable"`` and ``"reason"``)."""
        body: dict[str, Any] = {
            "status": "ok",
            **facts,
            "database": self.kind,
            "pid": os.getpid(),
        }
        problem = await self.problem()
        if problem is None:
            return 200, body
        return 503, {**body, "status": "unavailable", "reason": problem}
