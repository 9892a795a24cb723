"""Stopping a process: a graceful stop (SIGTERM), a server crash (SIGKILL), a
script's simulated crash (exit at once, no cleanup) and a fence (a process that lost
its executor slot ends its image at once)."""

from __future__ import annotations

import hmac
import logging
import multiprocessing
import os
import signal
import sys
import time
from typing import Any, NoReturn

from lab.logs import log


def crash(**context: Any) -> NoReturn:
    """Simulate a crash: exit at once (code 3), skipping every cleanup (no DBOS shutdown)."""
    log.warning("crashing", extra=context)
    logging.shutdown()
    os._exit(3)


def master_pid() -> int | None:
    """The uvicorn supervisor when this is one of its worker processes."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid != os.getppid():
        return None  # a single process (or the supervisor is already gone)
    return parent.pid


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces, split after ")".
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


# Exit status of a uvicorn worker that fenced itself: anything but 3 (STARTUP_FAILURE),
# on which uvicorn's supervisor stops the whole server instead of starting a new worker.
FENCED_EXIT = 75


def fence(rejoin_env: dict[str, str], *, stopping: bool = False) -> NoReturn:
    """End this process image at once, every thread with it, as a crash would: no
    cleanup, so nothing running here records anything afterwards. Pool processes
    follow by their orphan guard (the parent's end of their sentinel pipe is closed
    at exit and at exec).

    A uvicorn worker exits (its supervisor starts a new one); a single process
    re-executes itself in place (same pid: a supervisor such as dumb-init, Docker or
    ``dbos start`` keeps watching it), with ``rejoin_env`` added to its environment;
    during a graceful stop it just exits."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - nothing more to do on the way out
            pass
    if stopping or master_pid() is not None:
        os._exit(FENCED_EXIT)
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **rejoin_env})


def reap_children(timeout: float) -> list[int]:
    """Wait (up to ``timeout``) for the children this process has before it starts
    any, and reap them: after a re-exec, the previous image's pool processes, which
    exit by their orphan guard but would stay zombies, unknown to the new image."""
    left = children(os.getpid())
    deadline = time.monotonic() + timeout
    reaped = []
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                left.remove(pid)
                reaped.append(pid)
        time.sleep(0.02)
    return reaped


def stop_server() -> None:
    """SIGTERM: the supervisor forwards it to every worker; a lone server stops itself."""
    os.kill(master_pid() or os.getpid(), signal.SIGTERM)


def kill_server() -> None:
    """SIGKILL to the supervisor, every worker and this process: nothing runs on the way out."""
    master = master_pid()
    if master is not None:
        siblings = children(master)  # before the master dies and they are re-parented
        os.kill(master, signal.SIGKILL)  # first, so it cannot start replacements
        for pid in siblings:
            if pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    os.kill(os.getpid(), signal.SIGKILL)


def check_token(authorization: str | None, token: str) -> None:
    """Allow a stop request only with ``Authorization: Bearer <token>`` (constant-time
    compare): 403 while no token is configured, 401 for a missing or wrong one."""
    from fastapi import HTTPException

    if not token:
        raise HTTPException(403, "shutdown is disabled: SHUTDOWN_TOKEN is not set")
    expected = f"Bearer {token}".encode()
    if not authorization or not hmac.compare_digest(authorization.encode(), expected):
        raise HTTPException(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
