"""A graceful stop gives running workflows their grace period (``GRACE_SECONDS``).

The promise: a fan-out whose steps are all running when SIGTERM arrives can still
finish, without a restart, when its work fits in the grace period; when it does not
fit, it is left PENDING (no ERROR) and the next start finishes it, each step recorded
once. In thread mode and in pool mode, from the system database's rows.

To have every step running at the signal, and none finished, the steps are held at
the start of their bodies: FIB_LEDGER is a named pipe here, and a step body opens it
(to append its ledger line) before it computes. Opening a pipe for writing waits for
a reader, so until the test opens the pipe every dequeued step waits in its body;
once open, the lines are copied to a ledger file as they come.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import fastapi_scope_shutdown
from harness.clients import ShutdownClient
from harness.db import query
from harness.fanout import children, fan_out_result, ledger_runs, shutdown_server
from harness.proc import wait_for
from harness.server import AppServer

pytestmark = pytest.mark.slow

PROCESSES = 2  # FIB_PROCESSES: the pool's processes
# Within one worker's share of the queue (one worker takes all of it): every step is
# dequeued at once. Few: with 50 steps, the database round trips of the steps and of
# the fan-out collecting their results took 5 s on a 2-core machine at load 25.
STEPS = 10
assert STEPS <= fastapi_scope_shutdown.worker_concurrency(1)
# fib(24) is a few ms of CPU: the whole fan-out fits the grace period with room to
# spare, also on a loaded machine and under the GIL (thread mode).
MAX_N = 24


class Gate:
    """FIB_LEDGER as a named pipe: closed, every step body waits at its start; open,
    the bodies run and their ledger lines are copied to ``ledger``."""

    def __init__(self, directory: Path) -> None:
        self.pipe = directory / "ledger.pipe"
        self.ledger = directory / "ledger.txt"
        os.mkfifo(self.pipe)
        self._fds: list[int] = []
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._copy, name="ledger-gate", daemon=True)

    def open(self) -> None:
        if self._fds:
            return
        reader = os.open(self.pipe, os.O_RDONLY | os.O_NONBLOCK)
        # A writer of our own: between step bodies the pipe must not read as ended.
        self._fds = [reader, os.open(self.pipe, os.O_WRONLY)]
        self._reader.start()

    def _copy(self) -> None:
        with open(self.ledger, "ab") as out:
            while not self._closing.is_set():
                if select.select([self._fds[0]], [], [], 0.1)[0]:
                    out.write(os.read(self._fds[0], 65536))
                    out.flush()

    def close(self) -> None:
        self._closing.set()
        if self._fds:
            self._reader.join(5)
        for fd in self._fds:
            os.close(fd)


@pytest.fixture
def gate(tmp_path: Path) -> Any:
    held = Gate(tmp_path)
    yield held
    held.close()


def server_for(db_url: str, tmp_path: Path, name: str, gate: Gate) -> AppServer:
    return shutdown_server(
        db_url,
        tmp_path / f"{name}.log",
        env={"FIB_PROCESSES": str(PROCESSES), "FIB_LEDGER": str(gate.pipe)},
        ready_path="/healthz",
    )


def start_held_fan_out(server: AppServer, db_url: str, executor: str) -> str:
    """A fan-out whose steps are all dequeued (PENDING) and held in their bodies."""
    workflow_id = ShutdownClient(server.client).trigger(STEPS, MAX_N, executor=executor)

    def all_running() -> bool:
        kids = children(db_url, workflow_id)
        return len(kids) == STEPS and {c["status"] for c in kids.values()} == {"PENDING"}

    wait_for(all_running, 120, 0.1, f"every step of {workflow_id} to be dequeued")
    return workflow_id


def sigterm(server: AppServer) -> None:
    """SIGTERM to the server (``kill PID``), once it logs that DBOS is being stopped."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    wait_for(
        lambda: "stopping DBOS" in server.log_text(), 60, 0.05, "the stop to reach DBOS.destroy"
    )


def grace_taken(server: AppServer) -> float:
    """Seconds from "stopping DBOS" to "DBOS successfully shut down" (log timestamps)."""
    stamps = {
        r["message"]: datetime.fromisoformat(r["timestamp"])
        for r in server.records()
        if r.get("message") in ("stopping DBOS", "DBOS successfully shut down")
    }
    assert len(stamps) == 2, f"no complete DBOS shutdown in the log:\n{server.log_tail(30)}"
    return (stamps["DBOS successfully shut down"] - stamps["stopping DBOS"]).total_seconds()


def statuses(db_url: str, workflow_id: str) -> tuple[str, dict[str, int]]:
    """The fan-out's status, and how many of its steps are in each status."""
    (parent,) = query(
        db_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", workflow_id
    )
    counts: dict[str, int] = {}
    for step in children(db_url, workflow_id).values():
        counts[step["status"]] = counts.get(step["status"], 0) + 1
    return str(parent[0]), counts


def recorded_result(db_url: str, workflow_id: str) -> Any:
    """The fan-out's output as DBOS recorded it (read with DBOS's own client: the
    server is gone)."""
    from dbos import DBOSClient

    client = DBOSClient(system_database_url=db_url)
    try:
        (found,) = client.list_workflows(workflow_ids=[workflow_id], load_output=True)
        return found.output
    finally:
        client.destroy()


def assert_each_step_once(db_url: str, workflow_id: str, ledger: Path) -> None:
    """Every step SUCCESS with one recorded output, and its body ran once."""
    steps = children(db_url, workflow_id)
    assert sorted(steps) == list(range(STEPS))
    assert {(c["status"], c["outputs"]) for c in steps.values()} == {("SUCCESS", 1)}
    assert ledger_runs(ledger, workflow_id) == dict.fromkeys(range(STEPS), 1)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_fan_out_running_at_sigterm_that_fits_finishes_within_the_grace_period(
    pg_url: str, tmp_path: Path, gate: Gate, executor: str
) -> None:
    server = server_for(pg_url, tmp_path, "server", gate).start()
    try:
        workflow_id = start_held_fan_out(server, pg_url, executor)
        sigterm(server)
        gate.open()  # the steps run only once the grace period has begun
        code = server.wait_exit(timeout=fastapi_scope_shutdown.GRACE_SECONDS + 30)
    finally:
        server.close()
    assert code == -signal.SIGTERM, f"exit {code}:\n{server.log_tail(30)}"
    assert statuses(pg_url, workflow_id) == ("SUCCESS", {"SUCCESS": STEPS}), (
        f"not finished in the grace period ({grace_taken(server):.1f} s "
        f"of {fastapi_scope_shutdown.GRACE_SECONDS} s)"
    )
    assert_each_step_once(pg_url, workflow_id, gate.ledger)
    # All from this one run: no restart finished anything.
    executors = query(
        pg_url,
        "SELECT DISTINCT executor_id FROM dbos.workflow_status "
        "WHERE workflow_uuid = %s OR parent_workflow_id = %s",
        workflow_id,
        workflow_id,
    )
    assert executors == [("shutdown-0",)]
    assert recorded_result(pg_url, workflow_id) == fan_out_result(STEPS, MAX_N)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_fan_out_that_does_not_fit_waits_out_the_grace_period_and_is_recovered(
    pg_url: str, tmp_path: Path, gate: Gate, executor: str
) -> None:
    first = server_for(pg_url, tmp_path, "first", gate).start()
    try:
        workflow_id = start_held_fan_out(server=first, db_url=pg_url, executor=executor)
        sigterm(first)  # the gate stays closed: the steps outlast the grace period
        code = first.wait_exit(timeout=fastapi_scope_shutdown.GRACE_SECONDS + 30)
    finally:
        first.close()
    assert code == -signal.SIGTERM, f"exit {code}:\n{first.log_tail(30)}"
    # DBOS.destroy waited the whole grace period for the running steps, in vain.
    assert grace_taken(first) >= fastapi_scope_shutdown.GRACE_SECONDS
    assert statuses(pg_url, workflow_id) == ("PENDING", {"PENDING": STEPS})

    gate.open()
    again = server_for(pg_url, tmp_path, "second", gate)
    try:
        again.start(ready_timeout=120)
        view = ShutdownClient(again.client).wait_success(workflow_id, timeout=180)
    finally:
        again.close()
    assert view["result"] == fan_out_result(STEPS, MAX_N)
    assert_each_step_once(pg_url, workflow_id, gate.ledger)
