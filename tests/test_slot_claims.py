"""What the executor-slot protocol promises, each checked where it could break:

- DBOS's ownership token (``owner_xid``): once a workflow is handed to a new
  execution, a stale execution's step output and outcome are refused (in this
  process: the token is DBOS's, so it is proven here rather than trusted).
- Adoption never takes work from a live process: two workers, a fan-out running on
  both, many adopter periods: nothing adopted, no step body run twice.
- A process that lost its slot stops: another connection takes its lease row; the
  process fences within seconds, and nothing is recorded under its executor id
  afterwards; it serves again only under a slot claimed anew.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import fastapi_scope_shutdown
from harness.clients import ShutdownClient
from harness.db import admin, query
from harness.fanout import (
    children,
    fan_out_result,
    ledger_runs,
    live_workers,
    shutdown_server,
)
from harness.proc import alive, until, wait_for
from harness.server import AppServer
from lab import signals
from lab.config import app_name
from shutdown.slots import TABLE, pid_space, start_ticks

TOKEN = "test-token-slot-claims-5e21"  # must never show up in a log


# --- DBOS's ownership token ---------------------------------------------------------

_entered = threading.Event()  # the first execution's step body is running
_release = [threading.Event(), threading.Event()]  # lets execution n's step body finish
_bodies: list[int] = []  # one entry per step body execution


class _Refused(logging.Handler):
    """Set once DBOS reports that an execution of ``workflow_id`` lost its ownership
    (its write was refused; it now waits for the owner's outcome)."""

    def __init__(self) -> None:
        super().__init__()
        self.workflow_id = ""
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if self.workflow_id and self.workflow_id in text and "no longer owned" in text:
            self.seen.set()


@pytest.fixture
def token_dbos(pg_url: str) -> Iterator[_Refused]:
    from dbos import DBOS

    _entered.clear()
    for event in _release:
        event.clear()
    _bodies.clear()
    refused = _Refused()
    logging.getLogger("dbos").addHandler(refused)
    DBOS(
        config={
            "name": app_name("slot-token"),
            "system_database_url": pg_url,
            "executor_id": "token-0",
        }
    )
    DBOS.launch()
    try:
        yield refused
    finally:
        for event in _release:
            event.set()
        DBOS.destroy(workflow_completion_timeout_sec=5)
        logging.getLogger("dbos").removeHandler(refused)


def _token_step_body() -> str:
    execution = len(_bodies)
    _bodies.append(execution)
    if execution == 0:
        _entered.set()
    _release[execution].wait(60)
    return "stale" if execution == 0 else "current"


def _register() -> Any:
    from dbos import DBOS

    step = DBOS.step(name="token_step")(_token_step_body)

    @DBOS.workflow(name="token_workflow")
    def token_workflow() -> str:
        return f"outcome of {step()}"

    return token_workflow


token_workflow = _register()


def workflow_row(db_url: str, workflow_id: str) -> tuple[Any, ...]:
    [row] = query(
        db_url,
        "SELECT status, owner_xid, updated_at FROM dbos.workflow_status WHERE workflow_uuid = %s",
        workflow_id,
    )
    return tuple(row)


def test_a_stale_execution_s_step_output_and_outcome_are_refused(
    pg_url: str, token_dbos: _Refused
) -> None:
    """The stale execution tries to record first, while the new one's step still runs:
    without the token its output would be recorded, the new execution's step output
    would then conflict with it, and the stale outcome would land."""
    from dbos import DBOS

    handle = DBOS.start_workflow(token_workflow)
    wf = token_dbos.workflow_id = handle.workflow_id
    assert _entered.wait(30), "the first execution's step never started"
    status, first_owner, _ = workflow_row(pg_url, wf)
    assert status == "PENDING" and first_owner
    # What an adopter does: hand the PENDING workflow to a new execution.
    assert [h.workflow_id for h in DBOS._recover_pending_workflows(["token-0"])] == [wf]
    wait_for(lambda: len(_bodies) == 2, 60, 0.02, "the new execution's step to start")
    status, second_owner, _ = workflow_row(pg_url, wf)
    assert status == "PENDING" and second_owner and second_owner != first_owner
    # The stale execution's step returns first: its output must be refused.
    _release[0].set()
    assert token_dbos.seen.wait(60), "the stale execution was never refused"
    no_output = query(
        pg_url, "SELECT count(*) FROM dbos.operation_outputs WHERE workflow_uuid = %s", wf
    )
    assert no_output == [(0,)]
    assert workflow_row(pg_url, wf)[:2] == ("PENDING", second_owner)
    # Now the new execution's step returns, and the workflow ends with its output.
    _release[1].set()
    wait_for(lambda: workflow_row(pg_url, wf)[0] == "SUCCESS", 60, 0.05, "the workflow to end")
    finished = threading.Thread(target=handle.get_result, daemon=True)
    finished.start()
    finished.join(60)
    assert not finished.is_alive(), "the stale execution never finished"
    assert _bodies == [0, 1]  # the step body ran in both executions
    outputs = query(
        pg_url,
        "SELECT function_id, function_name FROM dbos.operation_outputs WHERE workflow_uuid = %s",
        wf,
    )
    assert outputs == [(1, "token_step")]  # exactly one output for the step
    [step] = DBOS.list_workflow_steps(wf)
    assert step["output"] == "current"  # the new execution's, not the stale one's
    assert DBOS.retrieve_workflow(wf).get_result() == "outcome of current"
    assert handle.get_result() == "outcome of current"  # the stale one adopted it


# --- the demo's processes -------------------------------------------------------------


def api(server: AppServer) -> ShutdownClient:
    return ShutdownClient(server.client)


def records(server: AppServer, message: str) -> list[dict[str, Any]]:
    return [r for r in server.records() if r.get("message") == message]


def running_on(db_url: str, parent: str) -> Counter[str]:
    """Executor id -> steps of ``parent`` running there now (dequeued, not finished)."""
    return Counter(
        c["executor_id"] for c in children(db_url, parent).values() if c["status"] == "PENDING"
    )


@pytest.mark.slow
def test_adoption_never_takes_work_from_a_live_worker(pg_url: str, tmp_path: Path) -> None:
    # 150 steps, 120 of them fib(31) (about 0.25 CPU-s each: some 15 s on two cores):
    # the fan-out runs for many adopter periods with steps in flight on both workers.
    steps, max_n = 150, 31
    ledger = tmp_path / "ledger.txt"
    server = shutdown_server(pg_url, tmp_path / "server.log", workers=2, token=TOKEN, ledger=ledger)
    server.start(ready_timeout=120)
    try:
        workers = live_workers(server, 2, 90)
        assert set(workers) == {"shutdown-0", "shutdown-1"}
        workflow_id = api(server).trigger(steps, max_n)
        wait_for(
            lambda: set(running_on(pg_url, workflow_id)) == set(workers),
            60,
            0.05,
            "steps running on both workers",
        )
        # Five adopter periods at least in which both workers run steps (sampled one
        # period apart). Between two of its steps a worker may hold none for up to a
        # queue poll: such samples do not count, they do not fail the test.
        periods, last = 0, float("-inf")
        deadline = time.monotonic() + 120
        while periods < 5:
            assert time.monotonic() < deadline, "five adopter periods with steps on both"
            assert records(server, "adopted orphaned executor slot") == []
            running = set(running_on(pg_url, workflow_id))
            now = time.monotonic()
            if running == set(workers) and now - last >= fastapi_scope_shutdown.ADOPT_EVERY_SEC:
                periods, last = periods + 1, now
            assert workflow_row(pg_url, workflow_id)[0] == "PENDING", (
                "the fan-out ended inside the window: make it longer"
            )
            time.sleep(0.1)
        view = api(server).wait_success(workflow_id, timeout=600)
        assert view["result"] == fan_out_result(steps, max_n)
    finally:
        server.close()
    assert records(server, "adopted orphaned executor slot") == []
    assert records(server, "executor slot lost: fencing") == []
    after = children(pg_url, workflow_id)
    assert {c["outputs"] for c in after.values()} == {1}
    assert set(Counter(c["executor_id"] for c in after.values())) == set(workers)
    # No step body ran twice: the ledger has one line per step.
    assert ledger_runs(ledger, workflow_id) == Counter(range(steps))


def take_lease(db_url: str, slot: int, seconds: float) -> str:
    """What a takeover does to the row: another owner (here: this test process, alive,
    on this machine) holds the lease, for ``seconds`` by the database's clock."""
    owner = str(uuid.uuid4())
    with admin(db_url) as cur:
        cur.execute(
            f"UPDATE {TABLE} SET owner = %s, pid = %s, host = 'test', pid_space = %s, "
            "pid_start = %s, expires_at = clock_timestamp() + %s * interval '1 second' "
            "WHERE app = %s AND slot = %s RETURNING 1",
            (
                owner,
                os.getpid(),
                pid_space(),
                start_ticks(os.getpid()),
                seconds,
                app_name(fastapi_scope_shutdown.APP),
                slot,
            ),
        )
        assert cur.fetchall() == [(1,)]
    return owner


def release_lease(db_url: str, owner: str) -> None:
    with admin(db_url) as cur:
        cur.execute(f"UPDATE {TABLE} SET expires_at = clock_timestamp() WHERE owner = %s", (owner,))


def recorded_under(db_url: str, executor_id: str) -> dict[str, tuple[Any, ...]]:
    """Everything the database attributes to ``executor_id``: per workflow, its row and
    its step outputs. ENQUEUED rows are left out: any live process may dequeue them."""
    rows = query(
        db_url,
        "SELECT w.workflow_uuid, w.status, w.updated_at, w.owner_xid, w.recovery_attempts, "
        "array_agg(o.function_id || ':' || o.completed_at_epoch_ms ORDER BY o.function_id) "
        "FROM dbos.workflow_status w LEFT JOIN dbos.operation_outputs o USING (workflow_uuid) "
        "WHERE w.executor_id = %s AND w.status <> 'ENQUEUED' GROUP BY 1, 2, 3, 4, 5",
        executor_id,
    )
    return {row[0]: row[1:] for row in rows}


def take_the_slot_and_see_a_fence(
    server: AppServer, pg_url: str, pid: int
) -> tuple[str, float, dict[str, tuple[Any, ...]]]:
    """Another connection takes slot 0's lease from the running server; the server
    fences and rejoins under slot 1. Returns the thief's lease (to release), how long
    the server took to notice, and what was recorded under shutdown-0 then."""
    pool_before = [p for p in signals.children(pid) if alive(p)]
    taken_at = time.monotonic()
    thief = take_lease(pg_url, 0, seconds=600)
    # The process notices at its next renewal and fences.
    [fence] = wait_for(
        lambda: records(server, "executor slot lost: fencing"), 30, 0.05, "the fence"
    )
    noticed = time.monotonic() - taken_at
    assert fence["executor_id"] == "shutdown-0"
    assert fence["reason"] == "another process took the slot"
    # Re-executed in place (same pid); it serves again only under a slot claimed
    # anew: slot 0 is taken, so slot 1.
    rejoined = wait_for(
        lambda: [r for r in records(server, "executor slot claimed") if r["rejoin"]],
        60,
        0.1,
        "the re-executed process to claim a slot",
    )
    assert [(r["executor_id"], r["pid"]) for r in rejoined] == [("shutdown-1", pid)]
    # The previous image is gone, its pool processes too.
    assert not any(alive(p) for p in pool_before), pool_before
    snapshot = recorded_under(pg_url, "shutdown-0")
    assert snapshot, "nothing was left under shutdown-0"
    return thief, noticed, snapshot


@pytest.mark.slow
def test_a_process_whose_slot_is_taken_stops_and_records_nothing_afterwards(
    pg_url: str, tmp_path: Path
) -> None:
    steps, max_n = 40, 31
    ledger = tmp_path / "ledger.txt"
    server = shutdown_server(pg_url, tmp_path / "server.log", token=TOKEN, ledger=ledger)
    server.start(ready_timeout=120)
    try:
        assert server.proc is not None
        pid = server.proc.pid
        assert api(server).healthz().json()["executor_id"] == "shutdown-0"
        workflow_id = api(server).trigger(steps, max_n)
        wait_for(
            lambda: running_on(pg_url, workflow_id)["shutdown-0"] >= 2,
            60,
            0.05,
            "steps running",
        )
        thief, noticed, snapshot = take_the_slot_and_see_a_fence(server, pg_url, pid)
        # Not listening while it rejoins; then healthy again.
        assert until(
            lambda: api(server).healthz().status_code == 200, 60, tolerate=(httpx.TransportError,)
        ), "not serving again"
        assert api(server).healthz().json()["executor_id"] == "shutdown-1"
        # Longer than a lease and several adopter periods: the new image must not adopt
        # a slot whose lease is live, and nothing may change under shutdown-0.
        time.sleep(fastapi_scope_shutdown.LEASE_SEC + 3 * fastapi_scope_shutdown.ADOPT_EVERY_SEC)
        assert recorded_under(pg_url, "shutdown-0") == snapshot
        assert records(server, "adopted orphaned executor slot") == []
        # The holder lets go: now the slot is an orphan, adopted, and the fan-out finishes.
        release_lease(pg_url, thief)
        view = api(server).wait_success(workflow_id, timeout=600)
        assert view["result"] == fan_out_result(steps, max_n)
        adopted = records(server, "adopted orphaned executor slot")
        assert [a["orphan"] for a in adopted] == ["shutdown-0"]
    finally:
        server.close()
    after = children(pg_url, workflow_id)
    assert {c["outputs"] for c in after.values()} == {1}
    runs = ledger_runs(ledger, workflow_id)
    assert set(runs) == set(range(steps)) and max(runs.values()) <= 2
    print(f"fenced {noticed:.2f} s after the takeover")


def lease_expiry(db_url: str, slot: int) -> Any:
    rows = query(
        db_url,
        f"SELECT expires_at FROM {TABLE} WHERE app = %s AND slot = %s",
        app_name(fastapi_scope_shutdown.APP),
        slot,
    )
    return rows[0][0] if rows else None


@pytest.mark.slow
def test_a_cpu_saturating_thread_fan_out_does_not_fence_a_healthy_process(
    pg_url: str, tmp_path: Path
) -> None:
    """executor=thread: 50 fib(32) steps on DBOS's threads, all holding for the GIL at
    once. The keeper and the fence timer are threads of the same process; a starved
    keeper would fence a process that is only busy. Renewals are watched from here, in
    the database: the longest gap between two must stay under FENCE_SEC."""
    steps, max_n = 50, 32
    server = shutdown_server(pg_url, tmp_path / "server.log", token=TOKEN)
    server.start(ready_timeout=120)
    expiries: list[Any] = []
    try:
        workflow_id = api(server).trigger(steps, max_n, executor="thread")
        deadline = time.monotonic() + 600
        # Each renewal sets expires_at = the database's clock + LEASE_SEC: the gaps
        # between successive values are the gaps between renewals, on one clock.
        while query(
            pg_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", workflow_id
        ) != [("SUCCESS",)]:
            assert time.monotonic() < deadline, "the fan-out did not finish in 10 minutes"
            expiry = lease_expiry(pg_url, 0)
            if not expiries or expiry != expiries[-1]:
                expiries.append(expiry)
            time.sleep(0.05)
    finally:
        server.close()
    gaps = [(b - a).total_seconds() for a, b in zip(expiries, expiries[1:], strict=False)]
    assert records(server, "executor slot lost: fencing") == []
    assert len(gaps) >= 3, gaps  # it ran for several renewals
    assert max(gaps) < fastapi_scope_shutdown.FENCE_SEC, gaps
    print(f"renewal gaps: max {max(gaps):.2f} s over {len(gaps)} renewals")


@pytest.mark.slow
def test_a_worker_whose_slot_is_taken_exits_and_uvicorn_replaces_it(
    pg_url: str, tmp_path: Path
) -> None:
    """The same claim with WORKERS=2: the fenced worker exits (not with 3, on which
    uvicorn's supervisor would stop the whole server); the supervisor starts another,
    which claims a slot anew while the sibling serves on."""
    server = shutdown_server(pg_url, tmp_path / "server.log", workers=2, token=TOKEN)
    server.start(ready_timeout=120)
    try:
        workers = live_workers(server, 2, 90)
        take_lease(pg_url, 1, seconds=600)
        [fence] = wait_for(
            lambda: records(server, "executor slot lost: fencing"), 30, 0.05, "the fence"
        )
        assert (fence["executor_id"], fence["pid"]) == ("shutdown-1", workers["shutdown-1"])
        wait_for(lambda: not alive(workers["shutdown-1"]), 10, 0.05, "the fenced worker to exit")
        now = live_workers(server, 2, 90)
        assert now["shutdown-0"] == workers["shutdown-0"]  # the sibling served on
        assert "shutdown-1" not in now and set(now) == {"shutdown-0", "shutdown-2"}
        assert server.running
        died = [r for r in server.records() if r["message"].startswith("Child process [")]
        assert died and all("failed to start" not in r["message"] for r in died)
    finally:
        server.close()
