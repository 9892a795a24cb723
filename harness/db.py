"""System databases: queries (Postgres or SQLite), scratch databases, secret scans."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.env import secrets_in


@contextmanager
def admin(url: str) -> Iterator[Any]:
    """An autocommit cursor on a Postgres server (CREATE / DROP DATABASE)."""
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run a read query on the system database (Postgres or SQLite).

    Write table names as ``dbos.<table>``; on SQLite the schema prefix is dropped.
    Use ``%s`` placeholders.
    """
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[1]
        lite = sqlite3.connect(path, timeout=30)
        try:
            return lite.execute(sql.replace("dbos.", "").replace("%s", "?"), params).fetchall()
        finally:
            lite.close()
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def with_database(server_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``server_url``."""
    from sqlalchemy.engine import make_url

    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+driver://``) as psycopg2 takes it."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --- workflows and steps ------------------------------------------------------------


def workflow_status(url: str, workflow_id: str) -> str | None:
    rows = query(
        url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", workflow_id
    )
    return str(rows[0][0]) if rows else None


def workflow_rows(url: str, workflow_id: str) -> dict[str, Any]:
    rows = query(
        url,
        "SELECT status, name, recovery_attempts FROM dbos.workflow_status WHERE workflow_uuid = %s",
        workflow_id,
    )
    assert len(rows) == 1, f"expected one workflow_status row for {workflow_id}, got {rows}"
    status, name, attempts = rows[0]
    return {"status": status, "name": name, "recovery_attempts": attempts}


def step_outputs(url: str, workflow_id: str) -> list[tuple[int, str]]:
    """(function_id, function_name) of every recorded step output, in order."""
    return [
        (int(fid), name)
        for fid, name in query(
            url,
            "SELECT function_id, function_name FROM dbos.operation_outputs "
            "WHERE workflow_uuid = %s ORDER BY function_id",
            workflow_id,
        )
    ]


# --- scratch databases ----------------------------------------------------------------


class ScratchDatabases:
    """Fresh, empty system databases, removed by ``close``.

    Postgres: databases created on the server of ``server_url`` (never written to
    itself), dropped with ``FORCE`` (sessions a killed server left behind end too).
    SQLite: files in ``directory`` (a new temporary one by default, removed by ``close``).
    """

    def __init__(
        self, server_url: str | None, prefix: str = "t", directory: Path | None = None
    ) -> None:
        self.server_url = server_url
        self.prefix = prefix
        self._own_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix=f"dbos-{prefix}-"))
        self._created: list[str] = []
        self.failures: list[str] = []  # drops that failed in ``close``

    def postgres(self, label: str = "") -> str:
        """A new database on the server."""
        assert self.server_url is not None, "no Postgres server for scratch databases"
        tag = f"_{label.replace('-', '_')}" if label else ""
        name = f"{self.prefix}{tag}_{uuid.uuid4().hex[:10]}"
        with admin(self.server_url) as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return with_database(self.server_url, name)

    def sqlite(self, label: str = "db") -> str:
        """A new SQLite file (created by whoever opens it first)."""
        return f"sqlite:///{self.directory / f'{label}-{uuid.uuid4().hex[:6]}.sqlite'}"

    def fresh(self, kind: str, label: str = "") -> str:
        """``kind``: "postgres" or "sqlite"."""
        return self.postgres(label) if kind == "postgres" else self.sqlite(label or "db")

    def urls(self) -> list[str]:
        """The Postgres databases made here that are still there."""
        assert self.server_url is not None or not self._created
        return [with_database(self.server_url or "", n) for n in self._created]

    def keep(self, url: str) -> None:
        """Leave this database in place (``close`` will not drop it)."""
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        if name in self._created:
            self._created.remove(name)

    def drop_all(self) -> list[str]:
        """Drop the Postgres databases; the ones that could not be dropped, with why."""
        failed = []
        for name in self._created:
            try:
                assert self.server_url is not None
                with admin(self.server_url) as cur:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the results
                failed.append(f"{name}: {exc}")
        self._created.clear()
        self.failures += failed
        return failed

    def close(self) -> list[str]:
        failed = self.drop_all()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
        return failed


# --- secrets in the system database ----------------------------------------------------


def database_dump(url: str) -> Iterator[tuple[str, str]]:
    """(table, row as text) of every row of every table of the system database."""
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[1]
        if not Path(path).exists():
            return
        lite = sqlite3.connect(path, timeout=30)
        try:
            tables = [
                r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            for table in tables:
                for row in lite.execute(f'SELECT * FROM "{table}"'):
                    yield table, repr(row)
        finally:
            lite.close()
        return
    tables = query(
        url,
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_type = 'BASE TABLE' "
        "AND table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    for schema, table in tables:
        for (row,) in query(url, f'SELECT t::text FROM "{schema}"."{table}" t'):
            yield f"{schema}.{table}", row


def secrets_in_database(url: str, secrets: set[str]) -> dict[str, set[str]]:
    """table -> the secrets found in its rows (empty when the database holds none)."""
    found: dict[str, set[str]] = {}
    for table, row in database_dump(url):
        hits = secrets_in(row, secrets)
        if hits:
            found.setdefault(table, set()).update(hits)
    return found


def assert_no_secret_in_databases(secrets: set[str], *urls: str) -> None:
    """None of ``secrets`` in any table of these system databases."""
    for url in urls:
        leaks = secrets_in_database(url, secrets)
        # Which tables, never the secret itself.
        assert not leaks, f"a secret reached the system database, tables: {sorted(leaks)}"


def duplicate_outputs(db_url: str) -> int:
    """(workflow, operation) pairs recorded more than once, across the database."""
    rows = query(
        db_url,
        "SELECT count(*) FROM (SELECT workflow_uuid, function_id FROM dbos.operation_outputs "
        "GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    return int(rows[0][0])
