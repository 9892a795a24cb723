"""`dbos start` (dbos-config.yaml) runs the shutdown demo on Postgres, and SIGTERM to
`dbos start` stops every process it started: none is left running or listening."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import REPO
from harness.env import script_env
from harness.proc import alive, descendants, free_port, session, session_of, wait_for
from lab.signals import children

# Servers, crashes or long runs: not in the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

DBOS = Path(sys.executable).parent / "dbos"


def own_session_child(parent: int, timeout: float) -> int:
    """The child of ``parent`` once it leads a session of its own (its session id is its
    pid). The fork comes first and the child calls setsid() after it: a child still in
    its parent's session has not got there yet, so this waits for the state, and fails
    only if the child never gets there."""
    seen: dict[int, int] = {}

    def leader() -> int | None:
        kids = {p: session_of(p) for p in children(parent) if alive(p)}
        seen.update({p: s for p, s in kids.items() if s is not None})
        return next((p for p, s in kids.items() if s == p), None)

    try:
        child: int = wait_for(leader, timeout, 0.05, "the start command's own session")
    except AssertionError as exc:
        raise AssertionError(
            f"children of {parent} (pid: session) {seen}: none leads a session"
        ) from exc
    return child


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_dbos_start(pg_url: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``dbos start`` (dbos-config.yaml's start command) on ``pg_url``, serving on
    ``port``, in a session of its own; its output goes to ``log_path``."""
    env = script_env(pg_url, PORT=str(port))
    env.pop("WORKERS", None)  # the layout chosen for Postgres: 2 uvicorn workers
    env.pop("HOST", None)
    # `python` in the start command must be this virtualenv's.
    env["PATH"] = f"{DBOS.parent}{os.pathsep}{env.get('PATH', '')}"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(DBOS), "start"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return proc


def test_dbos_start_serves_healthz_on_postgres_and_sigterm_leaves_no_process(
    pg_url: str, tmp_path: Path
) -> None:
    port = free_port()
    proc = start_dbos_start(pg_url, port, tmp_path / "dbos-start.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    # dbos start runs the command in a new session (setsid): its id is the shell's pid,
    # and every process the command starts stays in it, even once re-parented.
    sid = 0
    try:
        sid = own_session_child(proc.pid, 30)

        def healthy() -> dict[str, Any] | None:
            if proc.poll() is not None:
                text = (tmp_path / "dbos-start.log").read_text(errors="replace")
                raise AssertionError(f"dbos start exited with {proc.returncode}:\n{text[-3000:]}")
            try:
                answer = client.get("/healthz")
            except httpx.TransportError:
                return None
            return answer.json() if answer.status_code == 200 else None

        health = wait_for(healthy, 90, 0.2, "dbos start to serve /healthz")
        assert (health["status"], health["database"]) == ("ok", "postgres")
        # Both workers answer (each claims its own executor slot): collect the
        # executor ids that connections spread over the shared socket reach.
        seen: set[str] = set()

        def both_workers() -> bool:
            # A new connection each time: a kept-alive one stays with one worker.
            seen.add(client.get("/healthz", headers={"Connection": "close"}).json()["executor_id"])
            return seen == {"shutdown-0", "shutdown-1"}

        wait_for(both_workers, 60, 0.05, "both uvicorn workers to answer")
        started = session(sid)
        assert started == set(descendants(proc.pid))
        # the shell's command (uvicorn's supervisor) and its 2 worker processes at least
        assert len(started) >= 3, started

        proc.send_signal(signal.SIGTERM)  # to `dbos start` alone; it forwards to its group
        proc.wait(timeout=30)
        wait_for(lambda: not session(sid), 30, 0.2, "every process of the start command to exit")
        assert not listening(port)
    finally:
        client.close()
        for pid in [proc.pid, *(session(sid) if sid else ())]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
