"""Helpers shared by the tests and the benchmarks: run a script, serve an app, read
the database. (Benchmarks import this module as ``tests.helpers``.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
    return env


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
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return ScriptResult(proc.returncode, proc.stdout, proc.stderr, parse_json_lines(proc.stdout))


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
