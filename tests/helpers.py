"""Helpers shared by the tests and the benchmarks: run a script, serve an app, read
the database. (Benchmarks import this module as ``tests.helpers``.)"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent

# Variables the scripts read; tests set them explicitly, never inherit them.
_SCRUBBED = (
    "DBOS_SYSTEM_DATABASE_URL",
    "DBOS__VMID",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "SHUTDOWN_TOKEN",
    "CREDENTIALS_SECRET",
    "PORT",
    "HOST",
    "WORKERS",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


def script_env(db_url: str | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for a script: the given database and variables only."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONUNBUFFERED"] = "1"
    if db_url is not None:
        env["DBOS_SYSTEM_DATABASE_URL"] = db_url
    env.update(extra)
    remember_secrets(env)
    return env


# --- secrets ----------------------------------------------------------------------
#
# Every secret a test hands a script is remembered here; conftest.py then checks, after
# every test, that none of them reached a log, a script's output or a system database.

SECRET_VARS = (
    "SHUTDOWN_TOKEN",
    "CREDENTIALS_SECRET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
known_secrets: set[str] = set()
# Logs and outputs of the current test, for that check.
outputs: list[str] = []
log_files: list[Path] = []


def remember_secrets(env: dict[str, str]) -> None:
    for name in SECRET_VARS:
        value = env.get(name, "")
        if len(value) >= 8:  # shorter values would match by accident
            known_secrets.add(value)


_BASE64 = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")


def secrets_in(data: str | bytes, secrets: set[str] | None = None) -> set[str]:
    """The secrets found in ``data``: as they are, or inside a base64 token (DBOS stores
    pickled inputs and outputs as base64, where a plain search would miss them)."""
    raw = data.encode() if isinstance(data, str) else data
    found = set()
    for secret in secrets if secrets is not None else known_secrets:
        needles = (secret.encode(), base64.b64encode(secret.encode()).rstrip(b"="))
        if any(n in raw for n in needles):
            found.add(secret)
    if len(found) < len(secrets if secrets is not None else known_secrets):
        for token in _BASE64.findall(raw):
            try:
                decoded = base64.b64decode(token + b"=" * (-len(token) % 4))
            except (binascii.Error, ValueError):
                continue
            found |= {
                s
                for s in (secrets if secrets is not None else known_secrets)
                if s.encode() in decoded
            }
    return found


def database_dump(url: str) -> Iterator[tuple[str, str]]:
    """(table, row as text) of every row of every table of the system database."""
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[1]
        if not Path(path).exists():
            return
        conn = sqlite3.connect(path, timeout=30)
        try:
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            for table in tables:
                for row in conn.execute(f'SELECT * FROM "{table}"'):
                    yield table, repr(row)
        finally:
            conn.close()
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


def assert_no_secret_in_databases(*urls: str) -> None:
    """No remembered secret in any table of these system databases."""
    for url in urls:
        leaks = secrets_in_database(url)
        # Which tables, never the secret itself.
        assert not leaks, f"a secret reached the system database, tables: {sorted(leaks)}"


def secrets_in_database(url: str, secrets: set[str] | None = None) -> dict[str, set[str]]:
    """table -> the secrets found in its rows (empty when the database holds none)."""
    found: dict[str, set[str]] = {}
    for table, row in database_dump(url):
        hits = secrets_in(row, secrets)
        if hits:
            found.setdefault(table, set()).update(hits)
    return found


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line must be one JSON object."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"stdout line {number} is not JSON: {line!r}") from exc
        assert isinstance(record, dict), f"stdout line {number} is not an object: {line!r}"
        records.append(record)
    return records


@dataclass
class ScriptResult:
    returncode: int
    stdout: str
    stderr: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        assert self.records, f"no output; stderr:\n{self.stderr}"
        last = self.records[-1]
        assert last.get("message") == "summary", f"last line is not the summary: {last}"
        return last

    def messages(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("message") == message]


def run_script(
    script: str,
    *args: str,
    env: dict[str, str],
    cwd: Path | None = None,
    timeout: float = 120,
) -> ScriptResult:
    """Run ``python <repo>/<script> args`` and parse its stdout as JSON lines."""
    remember_secrets(env)
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    outputs.extend((proc.stdout, proc.stderr))
    return ScriptResult(proc.returncode, proc.stdout, proc.stderr, parse_json_lines(proc.stdout))


def fan_out_result(steps: int, max_n: int) -> list[int]:
    """What the shutdown demo's fan-out returns: ``fib(min(i, max_n))`` for each step i."""
    fibs = [0, 1]
    while len(fibs) <= max_n:
        fibs.append(fibs[-1] + fibs[-2])
    return [fibs[min(i, max_n)] for i in range(steps)]


def ledger_runs(path: Path, parent: str) -> Counter[int]:
    """How often each step body of fan-out ``parent`` ran (index -> executions), from the
    FIB_LEDGER file (lines ``<index> <pid> <step workflow id>``)."""
    runs: Counter[int] = Counter()
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        parts = line.split()
        # A line cut by a SIGKILL (never seen: one short O_APPEND write) is skipped.
        if len(parts) == 3 and parts[2].startswith(parent + "-"):
            runs[int(parts[0])] += 1
    return runs


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ...": comm may hold spaces, split after ")".
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class AppServer:
    """A FastAPI app served by uvicorn in a subprocess, reached with httpx.

    Its stdout (JSON log lines) goes to a file so tests can read the logs after
    a crash or a restart.
    """

    def __init__(
        self,
        target: str,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        args: list[str] | None = None,
        command: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.target = target
        self.env = env
        remember_secrets(env)
        log_files.append(log_path)
        self.port = port or free_port()
        self.log_path = log_path
        self.extra_args = args or []
        self.command = command
        self.cwd = cwd or REPO
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.base_url, timeout=30)

    @classmethod
    def script(
        cls, script: str, env: dict[str, str], log_path: Path, port: int | None = None
    ) -> AppServer:
        """``python <script>``, serving on the port it reads from ``PORT``."""
        port = port or free_port()
        env["PORT"] = str(port)
        return cls(script, env, log_path, port=port, command=[sys.executable, str(REPO / script)])

    def start(self, ready_timeout: float = 60) -> AppServer:
        remember_secrets(self.env)
        cmd = self.command or [
            sys.executable,
            "-m",
            "uvicorn",
            self.target,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            try:
                self.client.get("/openapi.json", timeout=2)
                return True
            except httpx.TransportError:
                return False

        wait_for(up, timeout, 0.2, f"{self.target} to accept requests")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def records(self) -> list[dict[str, Any]]:
        """Log lines as JSON (all must parse)."""
        return parse_json_lines(self.log_text())

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, nothing runs on the way out."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        self.kill()
        self.client.close()

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        conn = sqlite3.connect(path, timeout=30)
        try:
            return conn.execute(sql.replace("dbos.", "").replace("%s", "?"), params).fetchall()
        finally:
            conn.close()
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


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


def iter_records(records: list[dict[str, Any]], message: str) -> Iterator[dict[str, Any]]:
    return (r for r in records if r.get("message") == message)
