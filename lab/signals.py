"""Stopping a process: a graceful stop (SIGTERM), a server crash (SIGKILL) and a
script's simulated crash (exit at once, no cleanup)."""

from __future__ import annotations

import hmac
import logging
import multiprocessing
import os
import signal
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
    """The processes whose parent is ``pid`` (none once ``pid`` is gone)."""
    import psutil  # here: only a crash of a multi-worker server needs it

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


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
