"""The shutdown demo's fan-out as its database, ledger and logs record it.

``fan_out(steps, max_n)`` enqueues one ``fib_step`` workflow per step; step i is the
parent's operation i + 1 (child id ``<parent>-<i + 1>``) and computes
``fib(min(i, max_n))``. With ``FIB_LEDGER`` set, every step body appends a line
``<index> <pid> <step workflow id> <executor>`` to that file, outside DBOS.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness.db import query
from harness.env import script_env
from harness.proc import alive, wait_for
from harness.server import AppServer


def fan_out_result(steps: int, max_n: int) -> list[int]:
    """What the fan-out returns: ``fib(min(i, max_n))`` for each step i (computed
    iteratively: the demo's ``fib`` is naive on purpose)."""
    fibs = [0, 1]
    while len(fibs) <= max_n:
        fibs.append(fibs[-1] + fibs[-2])
    return [fibs[min(i, max_n)] for i in range(steps)]


def ledger_runs(path: Path, parent: str) -> Counter[int]:
    """How often each step body of fan-out ``parent`` ran (index -> executions), from the
    FIB_LEDGER file."""
    runs: Counter[int] = Counter()
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        parts = line.split()
        # A line cut by a SIGKILL (never seen: one short O_APPEND write) is skipped.
        if len(parts) >= 3 and parts[2].startswith(parent + "-"):
            runs[int(parts[0])] += 1
    return runs


def child_index(workflow_id: str) -> int | None:
    """Step i of a fan-out is its parent's operation i + 1: child id ``<parent>-<i + 1>``."""
    suffix = workflow_id.rsplit("-", 1)[-1]
    return int(suffix) - 1 if suffix.isdigit() else None


def children(db_url: str, parent: str) -> dict[int, dict[str, Any]]:
    """The fan-out's step workflows by step index: ``id``, ``status``, ``executor_id``,
    dequeue and end times (``started``, ``completed``: workflow_status), how many
    ``fib_step`` outputs it recorded (``outputs``) and when its body ran (``body``:
    operation_outputs' start and end)."""
    rows = query(
        db_url,
        "SELECT w.workflow_uuid, w.status, w.executor_id, w.started_at_epoch_ms, "
        "w.completed_at, count(o.function_id), min(o.started_at_epoch_ms), "
        "min(o.completed_at_epoch_ms) "
        "FROM dbos.workflow_status w LEFT JOIN dbos.operation_outputs o "
        "ON o.workflow_uuid = w.workflow_uuid AND o.function_name = 'fib_step' "
        "WHERE w.parent_workflow_id = %s GROUP BY 1, 2, 3, 4, 5",
        parent,
    )
    found = {}
    for wf_id, status, executor, started, completed, outputs, body_start, body_end in rows:
        index = int(wf_id.rsplit("-", 1)[1]) - 1
        found[index] = {
            "id": wf_id,
            "status": status,
            "executor_id": executor,
            "started": started,
            "completed": completed,
            "outputs": int(outputs),
            "body": (body_start, body_end),
        }
    return found


def big_steps_in_flight(
    db_url: str, workflow_id: str, max_n: int, at_least: int, timeout: float
) -> dict[int, dict[str, Any]]:
    """The fan-out's steps (``children``) once ``at_least`` of its fib(``max_n``) steps
    are dequeued and unfinished: the small first steps end within milliseconds, so a
    crash or a signal sent then must not land in a gap between them."""
    found: dict[int, dict[str, Any]] = wait_for(
        lambda: (
            (kids := children(db_url, workflow_id))
            and sum(c["status"] == "PENDING" for i, c in kids.items() if i >= max_n) >= at_least
            and kids
        ),
        timeout,
        0.05,
        f"{at_least} big steps of {workflow_id} in flight",
    )
    return found


def max_running(intervals: list[tuple[int, int]]) -> int:
    """Most intervals open at one instant (an end at t closes before a start at t)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def schedule_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log lines of the scheduled workflow's body, one per execution."""
    return [r for r in records if r.get("message") == "scheduled workflow"]


def slot_claims(records: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(executor_id, pid) of every "executor slot claimed" line, in order."""
    return [
        (r["executor_id"], r["pid"]) for r in records if r.get("message") == "executor slot claimed"
    ]


def live_workers(server: AppServer, count: int, timeout: float = 60) -> dict[str, int]:
    """executor id -> pid of the server's live workers, once ``count`` of them serve (a
    restarted worker's claim comes last, so it wins over the dead one's)."""

    def ready() -> dict[str, int] | None:
        live = {e: p for e, p in dict(slot_claims(server.records())).items() if alive(p)}
        return live if len(live) == count else None

    found: dict[str, int] = wait_for(ready, timeout, 0.1, f"{count} workers to claim their slots")
    return found


# --- the demo served, and what a run of it must show ------------------------------------

MODULE = "fastapi_scope_shutdown"


def shutdown_server(
    db_url: str,
    log_path: Path,
    *,
    workers: int | None = None,
    token: str | None = None,
    ledger: Path | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
    **options: Any,
) -> AppServer:
    """The demo, not started: ``uvicorn fastapi_scope_shutdown:app`` (one process, as in
    the Docker image) when ``workers`` is None, else ``python fastapi_scope_shutdown.py``
    with WORKERS processes (as ``dbos start``). ``token``: SHUTDOWN_TOKEN; ``ledger``:
    FIB_LEDGER; ``env``: more variables; ``options``: ``AppServer``'s."""
    extra = dict(env or {})
    if token:
        extra["SHUTDOWN_TOKEN"] = token
    if ledger is not None:
        extra["FIB_LEDGER"] = str(ledger)
    server_env = script_env(db_url, **extra)
    if workers is None:
        server_env.pop("WORKERS", None)  # one process: the whole queue is its share
        return AppServer(f"{MODULE}:app", server_env, log_path, port=port, **options)
    server_env["WORKERS"] = str(workers)
    return AppServer.script(f"{MODULE}.py", server_env, log_path, port=port, **options)


def assert_queue_limit(steps_run: dict[int, dict[str, Any]], limit: int) -> None:
    """At most ``limit`` steps ran at once, and more than one did.

    workflow_status stamps dequeue and end with the database's now(), the start of
    each transaction: a dequeue that began before a peer's completion committed, and
    then saw the freed room, carries a start earlier than that completion, so the
    stamps can show limit + 1 overlapping for a moment that never had them. Each step's
    body times (operation_outputs, taken by the worker after its dequeue committed and
    before its end commits) lie strictly inside the time its queue slot was held.
    """
    status_peak = max_running([(c["started"], c["completed"]) for c in steps_run.values()])
    body_peak = max_running([c["body"] for c in steps_run.values()])
    assert status_peak > 1, status_peak
    assert 1 < body_peak <= limit, body_peak


def assert_clean_stop(server: AppServer, started: float, bound: float, secret: str) -> None:
    """The server stopped gracefully within ``bound`` seconds of ``started`` (monotonic):
    a clean exit, DBOS shut down after "stopping DBOS", no traceback, no ``secret``."""
    code = server.wait_exit(timeout=bound + 20)
    elapsed = time.monotonic() - started
    text = server.log_text()
    # uvicorn re-raises the SIGTERM after its graceful shutdown: -15 is clean.
    assert code in (0, -signal.SIGTERM), f"exit {code}:\n{text[-3000:]}"
    assert elapsed < bound, f"stop took {elapsed:.1f}s"
    assert "Traceback" not in text
    messages = [r["message"] for r in server.records()]
    assert "stopping DBOS" in messages
    assert messages.index("DBOS successfully shut down") > messages.index("stopping DBOS")
    assert "Application shutdown complete." in messages
    assert secret not in text
