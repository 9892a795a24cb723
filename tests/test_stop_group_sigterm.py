"""A group SIGTERM does not fail a computation.

Ctrl-C in a terminal and ``docker stop`` (dumb-init signals the whole process group)
reach the pool's processes as well as the server. The pool processes must not die of
it and turn the steps in flight into recorded errors: the server stops gracefully,
nothing of the fan-out is recorded as ERROR, and the next start finishes the fan-out
with each step recorded once. Checked from the system database's rows, on a server
signalled with ``os.killpg`` and on the Docker image stopped with ``docker stop``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

import fastapi_scope_shutdown
import harness.docker as hd
from harness.clients import ShutdownClient
from harness.db import query
from harness.env import remember_secrets
from harness.fanout import (
    big_steps_in_flight,
    children,
    fan_out_result,
    ledger_runs,
    shutdown_server,
)
from harness.proc import free_port

pytestmark = pytest.mark.slow

PROCESSES = 2  # FIB_PROCESSES: the pool's processes
# 118 steps of fib(32), ~0.2 s of CPU each: tens of seconds on two processes, so the
# fan-out is still running when the grace period ends and the restart has work to do.
STEPS, MAX_N = 150, 32
# A restart answers /healthz once its pool answers, and the pool takes calls in order:
# the steps recovered and dequeued at launch (up to the queue's 50) come first.
RESTART_READY_SEC = 180
# The rest of the fan-out: tens of CPU-seconds, minutes on a machine shared with others.
RESTART_FINISH_SEC = 600
DOCKER_STOP_GRACE = 10  # docker stop's default: SIGTERM, then SIGKILL after this long


def done(steps: dict[int, dict[str, Any]]) -> set[int]:
    return {i for i, c in steps.items() if c["status"] == "SUCCESS"}


def assert_stopped_without_error(db_url: str, workflow_id: str) -> set[int]:
    """No ERROR row for the fan-out or any step (a pool process killed by the signal
    fails every step waiting on the pool while DBOS still records), and the fan-out is
    unfinished. Returns the steps done at the stop."""
    errors = query(
        db_url,
        "SELECT workflow_uuid FROM dbos.workflow_status "
        "WHERE (workflow_uuid = %s OR parent_workflow_id = %s) AND status = 'ERROR'",
        workflow_id,
        workflow_id,
    )
    assert errors == [], f"the stop recorded ERROR for {[e[0] for e in errors]}"
    parent = query(
        db_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", workflow_id
    )
    assert parent == [("PENDING",)], "the fan-out ended before the stop: nothing to recover"
    return done(children(db_url, workflow_id))


def assert_finished_once(db_url: str, workflow_id: str, view: dict[str, Any]) -> None:
    """The restart's result is right and every step recorded exactly one output."""
    assert (view["status"], view["result"]) == ("SUCCESS", fan_out_result(STEPS, MAX_N))
    after = children(db_url, workflow_id)
    assert sorted(after) == list(range(STEPS))
    assert {c["status"] for c in after.values()} == {"SUCCESS"}
    assert {c["outputs"] for c in after.values()} == {1}


def assert_reruns_only_in_flight(ledger: Path, workflow_id: str, done_at_stop: set[int]) -> None:
    """Every body ran; the ones recorded before the stop ran once."""
    runs = ledger_runs(ledger, workflow_id)
    assert set(runs) == set(range(STEPS))
    assert {i: runs[i] for i in done_at_stop} == dict.fromkeys(done_at_stop, 1)


# --- a server on this machine: Ctrl-C or kill -TERM -PGID -----------------------------


@pytest.mark.timeout(900)
def test_a_group_sigterm_mid_fan_out_records_no_error_and_a_restart_finishes_it(
    pg_url: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"

    def server(name: str) -> Any:
        return shutdown_server(
            pg_url,
            tmp_path / f"{name}.log",
            ledger=ledger,
            env={"FIB_PROCESSES": str(PROCESSES)},
            ready_path="/healthz",
        )

    first = server("first").start()
    try:
        assert first.proc is not None
        workflow_id = ShutdownClient(first.client).trigger(STEPS, MAX_N, executor="process")
        big_steps_in_flight(pg_url, workflow_id, MAX_N, PROCESSES + 2, 120)
        # The whole process group (AppServer starts the server as a group leader): the
        # server, its pool processes and multiprocessing's resource tracker.
        os.killpg(first.proc.pid, signal.SIGTERM)
        code = first.wait_exit(timeout=fastapi_scope_shutdown.GRACE_SECONDS + 30)
    finally:
        first.close()
    # uvicorn re-raises the SIGTERM after its graceful stop.
    assert code == -signal.SIGTERM, f"exit {code}:\n{first.log_tail(30)}"
    messages = [r["message"] for r in first.records()]
    assert messages.index("DBOS successfully shut down") > messages.index("stopping DBOS")
    done_at_stop = assert_stopped_without_error(pg_url, workflow_id)

    again = server("second")
    try:
        again.start(ready_timeout=RESTART_READY_SEC)
        view = ShutdownClient(again.client).wait_success(workflow_id, timeout=RESTART_FINISH_SEC)
    finally:
        again.close()
    assert_finished_once(pg_url, workflow_id, view)
    assert_reruns_only_in_flight(ledger, workflow_id, done_at_stop)


# --- the image: docker stop ------------------------------------------------------------


@pytest.mark.timeout(900)
def test_docker_stop_mid_fan_out_records_no_error_and_a_new_container_finishes_it(
    image: str, pg_url: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    ledger_env, options = hd.ledger_volume(ledger)
    env = {"DBOS_SYSTEM_DATABASE_URL": pg_url, "FIB_PROCESSES": str(PROCESSES), **ledger_env}
    remember_secrets(env)
    first = hd.Container(image, free_port(), env, options)
    second = hd.Container(image, free_port(), env, options)
    try:
        first.start()
        first.wait_serving()
        with httpx.Client(base_url=first.url, timeout=30) as http:
            workflow_id = ShutdownClient(http).trigger(STEPS, MAX_N, executor="process")
        big_steps_in_flight(pg_url, workflow_id, MAX_N, PROCESSES + 2, 120)
        code, took = first.stop(DOCKER_STOP_GRACE)
        # 143: uvicorn stopped on the SIGTERM and re-raised it (137: SIGKILL at the end of
        # docker's grace).
        assert code == 143, f"exit {code} after {took:.1f} s:\n{first.logs()[-3000:]}"
        done_at_stop = assert_stopped_without_error(pg_url, workflow_id)

        second.start()  # same database: the same slot, shutdown-0
        second.wait_serving(RESTART_READY_SEC)
        with httpx.Client(base_url=second.url, timeout=30) as http:
            view = ShutdownClient(http).wait_success(workflow_id, timeout=RESTART_FINISH_SEC)
    finally:
        for container in (first, second):
            (tmp_path / f"{container.name}.log").write_text(container.logs())
            container.remove()
    assert_finished_once(pg_url, workflow_id, view)
    assert_reruns_only_in_flight(ledger / "runs.txt", workflow_id, done_at_stop)
