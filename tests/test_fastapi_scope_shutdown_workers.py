"""fastapi_scope_shutdown.py with several worker processes on one Postgres, as
`python fastapi_scope_shutdown.py` (and so `dbos start`) runs it: executor slots,
a shared queue, one run per schedule slot, crash recovery for every worker."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

import fastapi_scope_shutdown
from harness.clients import ShutdownClient
from harness.db import query
from harness.fanout import (
    assert_clean_stop,
    assert_queue_limit,
    children,
    fan_out_result,
    ledger_runs,
    live_workers,
    schedule_runs,
    shutdown_server,
)
from harness.proc import alive, wait_for
from harness.server import AppServer

# Servers, crashes or long runs: not in the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

TOKEN = "test-token-workers-41b7"  # must never show up in a log
expected = fan_out_result  # what a fan-out of (steps, max_n) must return


def app_server(tmp_path: Path, db_url: str, name: str, *, workers: int | None = None) -> AppServer:
    """``python fastapi_scope_shutdown.py`` with WORKERS processes (as ``dbos start``), or
    ``uvicorn fastapi_scope_shutdown:app`` (one process) without."""
    log, ledger_file = tmp_path / f"{name}.log", tmp_path / "ledger.txt"
    return shutdown_server(db_url, log, workers=workers, token=TOKEN, ledger=ledger_file)


def api(server: AppServer) -> ShutdownClient:
    return ShutdownClient(server.client)


def ledger(tmp_path: Path, parent: str) -> Counter[int]:
    """How often each step body of ``parent`` ran (index -> executions)."""
    return ledger_runs(tmp_path / "ledger.txt", parent)


def crash_two_workers_mid_fan_out(
    tmp_path: Path, pg_url: str, steps: int, max_n: int
) -> tuple[AppServer, str]:
    """Two workers start a fan-out; once every step is enqueued and big steps run,
    ``/shutdown?mode=crash`` kills the supervisor and every worker. Returns the stopped
    server (its logs) and the fan-out's workflow id."""
    server = app_server(tmp_path, pg_url, "first", workers=2).start()
    try:
        workers = live_workers(server, 2)
        assert set(workers) == {"shutdown-0", "shutdown-1"}
        workflow_id = api(server).trigger(steps, max_n)

        def all_enqueued_and_big_steps_running() -> bool:
            kids = children(pg_url, workflow_id)
            running = sum(c["status"] == "PENDING" and i >= max_n for i, c in kids.items())
            return len(kids) == steps and running >= 3

        wait_for(all_enqueued_and_big_steps_running, 90, 0.05, "big steps running")
        answer = api(server).shutdown("crash", token=TOKEN)
        assert answer.status_code == 202
        # SIGKILL for the supervisor too (not restarted workers), and every worker.
        assert server.wait_exit(timeout=10) == -signal.SIGKILL
        wait_for(lambda: not any(alive(p) for p in workers.values()), 10, 0.05, "workers dead")
    finally:
        server.close()
    return server, workflow_id


def assert_each_schedule_slot_ran_once(
    server: AppServer, ready: float, workers: dict[str, int]
) -> None:
    """The schedule over at least 15 s of the live workers (from ``ready``, monotonic):
    each 5-second slot ran once, on one of ``workers``."""
    wait_for(
        lambda: time.monotonic() - ready >= 15 and len(schedule_runs(server.records())) >= 3,
        30,
        0.2,
        "15 s of scheduled runs",
    )
    runs = schedule_runs(server.records())
    slots = Counter(r["scheduled_time"] for r in runs)
    assert set(slots.values()) == {1}, slots
    times = sorted(datetime.fromisoformat(s) for s in slots)
    assert all((b - a).total_seconds() == 5 for a, b in zip(times, times[1:], strict=False))
    assert {r["pid"] for r in runs} <= set(workers.values())


def kill_the_busiest_worker(
    pg_url: str, workflow_id: str, workers: dict[str, int]
) -> tuple[str, set[int]]:
    """SIGKILL the worker running the most of the fan-out's steps, once some run:
    (its executor id, the steps it was running). The worker is frozen (SIGSTOP) before
    its steps are read, so none of them can finish between the read and the kill; one
    whose steps all finished by then is thawed, and the next poll picks again."""

    def freeze_and_kill() -> tuple[str, set[int]] | None:
        running = Counter(
            c["executor_id"]
            for c in children(pg_url, workflow_id).values()
            if c["status"] == "PENDING"
        )
        if not running:
            return None
        victim: str = running.most_common(1)[0][0]
        os.kill(workers[victim], signal.SIGSTOP)
        in_flight = {
            i
            for i, c in children(pg_url, workflow_id).items()
            if c["status"] == "PENDING" and c["executor_id"] == victim
        }
        if not in_flight:
            os.kill(workers[victim], signal.SIGCONT)
            return None
        os.kill(workers[victim], signal.SIGKILL)
        return victim, in_flight

    return wait_for(freeze_and_kill, 60, 0.05, "a worker running steps")


def test_crash_kills_every_process_and_one_process_recovers_every_workers_steps(
    pg_url: str, tmp_path: Path
) -> None:
    # 39 steps of fib(32), ~0.55 s of CPU each, enqueued last: once the fan-out has
    # enqueued every step, seconds of work are left in the workers' process pools, so
    # steps are still running when the crash request gets through.
    steps, max_n = 71, 32
    server, workflow_id = crash_two_workers_mid_fan_out(tmp_path, pg_url, steps, max_n)
    at_kill = children(pg_url, workflow_id)
    in_flight = {i for i, c in at_kill.items() if c["status"] == "PENDING"}
    assert in_flight, (
        "nothing was running at the crash",
        Counter(c["status"] for c in at_kill.values()),
        sorted(at_kill),
    )
    messages = [r["message"] for r in server.records()]
    assert "stopping DBOS" not in messages  # nothing ran on the way out
    # Every executor id that PENDING workflows (steps, the fan-out, a scheduled run) wait for.
    pending_on = {
        row[0]
        for row in query(
            pg_url, "SELECT DISTINCT executor_id FROM dbos.workflow_status WHERE status = 'PENDING'"
        )
    }

    # One process now, as the Docker image runs it: it claims slot 0 at once (its lease
    # is still live, but its owner's pid is gone on this machine) and recovers that
    # executor's workflows at launch; it adopts slot 1 once that lease has expired
    # (LEASE_SEC after the dead worker's last renewal): nobody claimed it.
    with app_server(tmp_path, pg_url, "second") as again:
        view = api(again).wait_success(workflow_id, timeout=90)
    adopted = {
        r["orphan"] for r in again.records() if r["message"] == "adopted orphaned executor slot"
    }
    assert adopted == pending_on - {"shutdown-0"}
    assert view["result"] == expected(steps, max_n)
    recovered = [r for r in again.records() if r["message"].startswith("Recovering ")]
    assert recovered
    after = children(pg_url, workflow_id)
    assert sorted(after) == list(range(steps))
    assert {c["outputs"] for c in after.values()} == {1}  # one recorded output per step
    runs = ledger(tmp_path, workflow_id)
    assert set(runs) == set(range(steps)) and max(runs.values()) <= 2
    # Bodies that ran twice were running at the crash; completed steps ran once.
    assert {i for i, n in runs.items() if n == 2} <= in_flight
    assert all(runs[i] == 1 for i, c in at_kill.items() if c["status"] == "SUCCESS")


def test_two_workers_share_the_queue_run_each_schedule_slot_once_and_recover_a_killed_worker(
    pg_url: str, tmp_path: Path
) -> None:
    server = app_server(tmp_path, pg_url, "server", workers=2).start()
    try:
        ready = time.monotonic()
        workers = live_workers(server, 2)
        assert set(workers) == {"shutdown-0", "shutdown-1"}

        # One fan-out, triggered through one socket: both workers run its steps. The steps
        # carry a few seconds of CPU in all, so the fan-out spans many queue polls: with
        # trivial steps one worker's poll can take the whole fan-out before the other's.
        steps, max_n = 120, 25
        first = api(server).trigger(steps, max_n)
        assert api(server).wait_success(first)["result"] == expected(steps, max_n)
        kids = children(pg_url, first)
        assert set(Counter(c["executor_id"] for c in kids.values())) == set(workers)
        assert_queue_limit(kids, fastapi_scope_shutdown.QUEUE_CONCURRENCY)
        # With every worker alive, no step body ran twice.
        assert ledger(tmp_path, first) == Counter(range(steps))

        assert_each_schedule_slot_ran_once(server, ready, workers)

        # Kill the worker with the most running steps; uvicorn starts a new one, which
        # claims the dead worker's slot (same executor id: its owner's pid is gone) and
        # so recovers exactly that work.
        steps, max_n = 120, 26
        second = api(server).trigger(steps, max_n)
        victim, in_flight = kill_the_busiest_worker(pg_url, second, workers)
        wait_for(lambda: not alive(workers[victim]), 10, 0.02, "the killed worker to die")
        # uvicorn's supervisor sees the death at once, unless its health ping to the
        # worker was unanswered at the kill: it then waits out the ping's timeout first.
        replaced = live_workers(server, 2, fastapi_scope_shutdown.WORKER_HEALTHCHECK_SEC + 60)
        assert set(replaced) == set(workers)
        assert replaced[victim] != workers[victim]
        view = api(server).wait_success(second)
        assert view["result"] == expected(steps, max_n)
        after = children(pg_url, second)
        assert {c["outputs"] for c in after.values()} == {1}
        runs2 = ledger(tmp_path, second)
        assert set(runs2) == set(range(steps)) and max(runs2.values()) <= 2
        assert {i for i, n in runs2.items() if n == 2} <= in_flight
    finally:
        server.close()
    assert "Traceback" not in server.log_text()


def test_graceful_shutdown_of_two_workers_mid_fan_out_stops_all_and_a_restart_finishes_it(
    pg_url: str, tmp_path: Path
) -> None:
    # More steps than the limit lets run: the queue still holds some when it stops.
    steps, max_n = 120, 26
    server = app_server(tmp_path, pg_url, "first", workers=2).start()
    try:
        workers = live_workers(server, 2)
        workflow_id = api(server).trigger(steps, max_n)
        wait_for(lambda: children(pg_url, workflow_id), 30, 0.05, "steps to start")
        answer = api(server).shutdown("graceful", token=TOKEN)
        started = time.monotonic()
        assert answer.status_code == 202
        assert answer.json()["mode"] == "graceful"
        # The worker that answered signals the supervisor, which stops every worker;
        # each runs its lifespan (DBOS.destroy with its bounded wait).
        assert_clean_stop(
            server, started, bound=fastapi_scope_shutdown.GRACE_SECONDS + 10, secret=TOKEN
        )
        assert not any(alive(p) for p in workers.values())
    finally:
        server.close()
    messages = [r["message"] for r in server.records()]
    assert messages.count("DBOS successfully shut down") == 2
    at_stop = children(pg_url, workflow_id)
    parent = query(
        pg_url,
        "SELECT status, executor_id FROM dbos.workflow_status WHERE workflow_uuid = %s",
        workflow_id,
    )
    assert parent[0][0] == "PENDING", "the fan-out finished before the stop"
    unfinished = {i for i, c in at_stop.items() if c["status"] != "SUCCESS"}
    assert unfinished | (set(range(steps)) - set(at_stop))

    # Two workers again: the stopped ones released their slots, so the same executor
    # ids come back and each recovers its own PENDING workflows at launch.
    again = app_server(tmp_path, pg_url, "second", workers=2).start()
    try:
        assert set(live_workers(again, 2)) == {"shutdown-0", "shutdown-1"}
        view = api(again).wait_success(workflow_id)
    finally:
        again.close()
    assert view["result"] == expected(steps, max_n)
    assert not [r for r in again.records() if r["message"] == "adopted orphaned executor slot"]
    # Only a step still running when the bounded wait ended runs again.
    after = children(pg_url, workflow_id)
    assert sorted(after) == list(range(steps))
    assert {c["outputs"] for c in after.values()} == {1}
    runs = ledger(tmp_path, workflow_id)
    assert set(runs) == set(range(steps)) and max(runs.values()) <= 2
    in_flight = {i for i, c in at_stop.items() if c["status"] == "PENDING"}
    assert {i for i, n in runs.items() if n == 2} <= in_flight
    assert all(runs[i] == 1 for i, c in at_stop.items() if c["status"] == "SUCCESS")
