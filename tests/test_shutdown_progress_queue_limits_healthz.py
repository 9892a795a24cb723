"""fastapi_scope_shutdown.py's progress count, queue limits and health check, checked
against the database.

- ``GET /workflows/{id}``'s ``progress.done`` counts the fan-out's children in SUCCESS:
  every read lies between two counts of SUCCESS children taken around it, and is below
  ``total`` while children exist that have not finished.
- The queue's two limits, both reached: with workers whose shares add up to more than
  50 (3 workers, 17 each) and more than 50 of the demo's steps waiting, the most steps
  holding a queue slot at once (dequeued, not yet ended) is exactly QUEUE_CONCURRENCY
  (50) across all workers, and at most a worker's share (``worker_concurrency(3)``, 17)
  per executor, which one executor reaches.
- ``/healthz`` asks the database: with the server's Postgres stopped it answers 503
  with the reason, and 200 again once the database is back.

Real uvicorn processes, a real Postgres (a private throwaway cluster for the outage).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import fastapi_scope_shutdown
from harness import pgcluster
from harness.clients import ShutdownClient
from harness.db import query
from harness.fanout import fan_out_result, ledger_runs, max_running, shutdown_server
from harness.proc import wait_for
from harness.server import AppServer
from lab.config import app_name


def serve(db_url: str, tmp_path: Path, name: str = "server") -> AppServer:
    """The demo in one process (as in the Docker image), step bodies on a ledger."""
    return shutdown_server(db_url, tmp_path / f"{name}.log", ledger=tmp_path / "ledger.txt")


def child_statuses(db_url: str, parent: str) -> dict[str, str]:
    """workflow id -> status of every child workflow (one per enqueued step) of ``parent``."""
    rows = query(
        db_url,
        "SELECT workflow_uuid, status FROM dbos.workflow_status WHERE parent_workflow_id = %s",
        parent,
    )
    return {wf: status for wf, status in rows}


def successes(children: dict[str, str]) -> int:
    return sum(status == "SUCCESS" for status in children.values())


# --- progress is the count of SUCCESS children -------------------------------


@pytest.mark.slow
def test_progress_done_lies_between_success_counts_taken_around_each_read(
    pg_url: str, tmp_path: Path
) -> None:
    steps, max_n = 80, 26  # more than the limit: children wait ENQUEUED while others run
    reads = []  # (successes before, done, successes after, unfinished during the read)
    with serve(pg_url, tmp_path) as server:
        client = ShutdownClient(server.client)
        workflow_id = client.trigger(steps, max_n)
        deadline = time.monotonic() + 90
        while True:
            before = child_statuses(pg_url, workflow_id)
            answer = client.view(workflow_id)
            after = child_statuses(pg_url, workflow_id)
            # A child that existed before the read and had not finished after it had not
            # finished during it.
            unfinished = [wf for wf, status in before.items() if after.get(wf, status) != "SUCCESS"]
            done, total = answer["progress"]["done"], answer["progress"]["total"]
            assert total == steps, answer
            assert successes(before) <= done <= successes(after), (
                f"progress.done={done} outside the SUCCESS children counted around the read "
                f"({successes(before)}..{successes(after)}; children: {len(after)})"
            )
            if unfinished:
                assert done < total, (answer, len(unfinished))
            reads.append((successes(before), done, successes(after), len(unfinished)))
            if answer["status"] == "SUCCESS":
                break
            assert answer["status"] == "PENDING", answer
            assert time.monotonic() < deadline, f"fan-out not done after 90 s: {reads[-5:]}"
            time.sleep(0.05)
    assert answer["result"] == fan_out_result(steps, max_n)
    assert answer["progress"] == {"done": steps, "total": steps}
    assert successes(child_statuses(pg_url, workflow_id)) == steps
    # The reads this test is about happened: several while children had not finished,
    # some of them after steps had finished (0 < done), so a count of every child (or
    # of none) could not have passed.
    during = [r for r in reads if r[3] > 0]
    assert len(during) >= 3, reads
    assert any(r[1] > 0 for r in during), reads


# --- the 50-way limit and the per-worker limit, reached ---------------------

# The fewest workers whose shares (rounded up) add up to more than the queue's limit:
# only the queue-wide limit can then stop the last step.
WORKERS = next(
    n
    for n in range(2, fastapi_scope_shutdown.MAX_SLOTS)
    if n * fastapi_scope_shutdown.worker_concurrency(n) > fastapi_scope_shutdown.QUEUE_CONCURRENCY
)
SHARE = fastapi_scope_shutdown.worker_concurrency(WORKERS)
# More steps than all workers could hold together (51), so that a freed slot always has
# a step waiting, each long enough that every worker's first claim lands before any
# first step ends (fib(32): ~0.2 s of CPU, 60 of them ~15 s; with fib(31) a worker whose
# first claim came late on a loaded machine sometimes saw the peak at 49).
UNITS, N = 60, 32
# Seconds from the first enqueue to the batch's release: room for the enqueues.
RELEASE_AFTER_SEC = 4.0


def enqueue_batch(db_url: str, batch: str, units: int, n: int, release_at: float) -> None:
    """``units`` units of the demo's own step on its queue, as ``fan_out`` enqueues them
    (``<temp>.fib_step``, id ``<batch>-<i + 1>``), each computing fib(n), all DELAYED
    until ``release_at`` (epoch seconds): DBOS then turns them ENQUEUED in one UPDATE."""
    from dbos import DBOSClient

    client = DBOSClient(system_database_url=db_url)
    try:
        for i in range(units):
            client.enqueue(
                {
                    "queue_name": fastapi_scope_shutdown.QUEUE,
                    "workflow_name": f"<temp>.{fastapi_scope_shutdown.fib_step.__qualname__}",
                    "workflow_id": f"{batch}-{i + 1}",
                    "application_name": app_name(fastapi_scope_shutdown.APP),
                    "delay_seconds": release_at - time.time(),
                },
                i,
                n,
            )
    finally:
        client.destroy()


def batch_units(db_url: str, batch: str) -> list[dict[str, Any]]:
    """Every unit of ``batch``: status, ``executor_id``, ``claim`` (workflow_status'
    started_at_epoch_ms: the start of the transaction that dequeued it, the same for
    every unit it dequeued), ``completed`` (workflow_status' completed_at: the start of
    the transaction that recorded its end) and ``body`` (start and end of the step, the
    worker's clock, from its recorded output in operation_outputs; None until it has
    one)."""
    rows = query(
        db_url,
        "SELECT w.status, w.executor_id, w.started_at_epoch_ms, w.completed_at, "
        "o.started_at_epoch_ms, o.completed_at_epoch_ms "
        "FROM dbos.workflow_status w LEFT JOIN dbos.operation_outputs o "
        "ON o.workflow_uuid = w.workflow_uuid AND o.function_name = 'fib_step' "
        "WHERE w.workflow_uuid LIKE %s",
        f"{batch}-%",
    )
    return [
        {
            "status": status,
            "executor_id": executor,
            "claim": claim,
            "completed": completed,
            "body": (start, end),
        }
        for status, executor, claim, completed, start, end in rows
    ]


def held(units: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """For each unit, a time it surely held its queue slot: from the first body start
    of the units dequeued with it (their dequeue had committed by then) to the start of
    the transaction that recorded its end (completed_at, the database's now(), after the
    body ended and before that end committed; less 1 ms: the stamp is rounded).

    The span lies inside the time the slot was really held, so the most spans open at
    once is never above the slots held at once: exact from below. It includes units
    dequeued but not yet started, which the bodies alone miss.

    A dequeue's units share its started_at, the key of the group; it is no bound on its
    own: the start of the dequeue's transaction, which may see room freed after it
    began, so spans from it can show 51 for an instant that never had them."""
    first_start: dict[tuple[str, int], int] = {}
    for u in units:
        key = (u["executor_id"], u["claim"])
        first_start[key] = min(u["body"][0], first_start.get(key, u["body"][0]))
    return [
        (first_start[(u["executor_id"], u["claim"])], max(u["body"][1], u["completed"] - 1))
        for u in units
    ]


def serving_executors(server: AppServer) -> set[str]:
    """The executor ids of the server's processes that have launched DBOS and registered
    the queue."""
    return {r["executor_id"] for r in server.records(strict=False) if r.get("message") == "serving"}


def run_released_batch(pg_url: str, tmp_path: Path, batch: str) -> set[str]:
    """WORKERS workers serve while UNITS units of ``batch`` are enqueued to be released
    at one instant, and run until every unit has finished. Returns the executor ids
    that served."""
    server = shutdown_server(
        pg_url,
        tmp_path / "server.log",
        workers=WORKERS,
        ledger=tmp_path / "ledger.txt",
        env={"FIB_PROCESSES": "1"},
    )
    with server:
        # Every worker has launched DBOS and registered the queue: one executor id each.
        wait_for(
            lambda: len(serving_executors(server)) == WORKERS,
            45,
            0.25,
            f"{WORKERS} workers to serve",
        )
        release_at = time.time() + RELEASE_AFTER_SEC
        enqueue_batch(pg_url, batch, UNITS, N, release_at)
        # The premise: all of them still wait for the release, none has been claimed.
        assert [u["status"] for u in batch_units(pg_url, batch)] == ["DELAYED"] * UNITS
        assert time.time() < release_at, "the enqueues took longer than RELEASE_AFTER_SEC"
        wait_for(
            lambda: all(u["status"] == "SUCCESS" for u in batch_units(pg_url, batch)),
            45,
            0.5,
            f"the {UNITS} units to finish",
        )
        assert server.running
        executors = serving_executors(server)
    return executors


@pytest.mark.slow
def test_enough_workers_run_exactly_50_steps_at_once_and_each_at_most_its_share(
    pg_url: str, tmp_path: Path
) -> None:
    """WORKERS processes (3: 3 x 17 = 51 > 50, so only the queue-wide limit can stop the
    51st) serve the demo; UNITS (60) units of its step become ENQUEUED at one instant.
    The most units holding a queue slot at once is exactly QUEUE_CONCURRENCY (50); per
    executor it is at most its share SHARE (17), and one executor reaches it.

    Measured with ``held``: spans that lie inside the time each slot was really held,
    so their peak is never above the real one (a correct queue never fails this) and
    shows 50 only if 50 were held at once. Each worker's pool has one process
    (FIB_PROCESSES=1): the units a worker holds wait there in turn, so the ones claimed
    together stay held for seconds. Checked against planted faults: with
    global_concurrency=500 the peak read 51; without worker_concurrency one executor
    held 50.

    Why a batch released at once rather than a fan-out through POST /trigger_async: the
    fan-out enqueues its steps one by one while the queue polls (measured on 2 shared
    cores: 90 steps over 8 s, never more than 26 bodies at once with fib(30)), so its
    steps pile up to 50 only if each lasts many seconds."""
    assert fastapi_scope_shutdown.MAX_SLOTS >= WORKERS  # the app allows this many workers
    assert UNITS > WORKERS * SHARE > fastapi_scope_shutdown.QUEUE_CONCURRENCY
    batch = f"claims-{uuid.uuid4().hex[:8]}"
    executors = run_released_batch(pg_url, tmp_path, batch)
    found = batch_units(pg_url, batch)
    assert ledger_runs(tmp_path / "ledger.txt", batch) == Counter(range(UNITS))  # once each
    assert {u["executor_id"] for u in found} <= executors

    # The queue-wide limit: never more held at once, and once exactly that many.
    spans = held(found)
    assert max_running(spans) == fastapi_scope_shutdown.QUEUE_CONCURRENCY, sorted(spans)
    # The per-worker limit: no executor above it, one at least at it.
    per_executor: dict[str, list[tuple[int, int]]] = {}
    for unit, span in zip(found, spans, strict=True):
        per_executor.setdefault(unit["executor_id"], []).append(span)
    peaks = {executor: max_running(s) for executor, s in per_executor.items()}
    assert max(peaks.values()) == SHARE, peaks


# --- /healthz asks the database ---------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[pgcluster.Cluster]:
    """A private Postgres cluster this test may stop (never the shared server)."""
    if pgcluster.find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (pg_ctl) for a private cluster")
    with pgcluster.private_cluster(keep_log=tmp_path / "postgres-server.txt") as cluster:
        yield cluster


@pytest.mark.slow
def test_healthz_is_503_with_the_reason_while_the_database_is_stopped(
    cluster: pgcluster.Cluster, tmp_path: Path
) -> None:
    db_url = cluster.url.rsplit("/", 1)[0] + "/claims"  # created by the app at start
    with serve(db_url, tmp_path) as server:
        client = ShutdownClient(server.client)
        healthy = client.healthz()
        assert healthy.status_code == 200, healthy.text
        assert healthy.json()["status"] == "ok"

        cluster.stop("fast")
        try:
            down = client.healthz(timeout=15)
        except httpx.TransportError as exc:
            raise AssertionError(
                f"/healthz gave no answer while the database was down: {exc}"
            ) from exc
        body = down.json()
        assert down.status_code == 503, body
        assert body["status"] == "unavailable"
        assert body["database"] == "postgres"
        assert body["reason"].startswith("database unreachable: "), body
        assert len(body["reason"]) > len("database unreachable: "), body  # and why

        cluster.start()
        back = wait_for(
            lambda: (a := client.healthz(timeout=15)).status_code == 200 and a,
            30,
            0.5,
            "/healthz to answer 200 once the database is back",
        )
        assert back.json()["status"] == "ok"
