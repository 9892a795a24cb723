"""Claims of fastapi_scope_shutdown.py checked against the database (issue 16, items 1, 3, 4).

- ``GET /workflows/{id}``'s ``progress.done`` counts the fan-out's children in SUCCESS:
  every read lies between two counts of SUCCESS children taken around it, and is below
  ``total`` while children exist that have not finished.
- The queue runs at most 50 steps at once, and does run 50: with more than 50 of the
  demo's steps waiting, exactly 50 hold a queue slot at once (dequeued, not yet ended),
  and no more than 50 step bodies ever run at once.
- ``/healthz`` asks the database: with the server's Postgres stopped it answers 503
  with the reason, and 200 again once the database is back.

Real uvicorn processes, a real Postgres (a private throwaway cluster for the outage).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import pgcluster
from harness.apps import shutdown_app as demo
from harness.clients import ShutdownClient
from harness.db import query
from harness.fanout import demo_server, fan_out_result, ledger_runs, max_running
from harness.proc import wait_for
from harness.server import AppServer
from lab.config import app_name


def serve(db_url: str, tmp_path: Path, name: str = "server") -> AppServer:
    """The demo in one process (as in the Docker image), step bodies on a ledger."""
    return demo_server(db_url, tmp_path / f"{name}.log", ledger=tmp_path / "ledger.txt")


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


# --- item 1: progress is the count of SUCCESS children -------------------------------


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


# --- item 3: the 50-way limit, reached ---------------------------------------------


def enqueue_steps(db_url: str, batch: str, steps: int, n: int) -> None:
    """``steps`` units of the demo's own step on its queue, as ``fan_out`` enqueues them
    (``<temp>.fib_step``, id ``<batch>-<i + 1>``), each computing fib(n); with no server
    running, so that none starts before the queue's first poll."""
    from dbos import DBOS, DBOSClient

    DBOS.migrate(db_url)
    client = DBOSClient(system_database_url=db_url)
    try:
        for i in range(steps):
            client.enqueue(
                {
                    "queue_name": demo.QUEUE,
                    "workflow_name": f"<temp>.{demo.fib_step.__qualname__}",
                    "workflow_id": f"{batch}-{i + 1}",
                    "application_name": app_name(demo.APP),
                },
                i,
                n,
            )
    finally:
        client.destroy()


def batch_units(db_url: str, batch: str) -> list[dict[str, Any]]:
    """Every unit of ``batch``: status, queue slot (``slot``: dequeued and ended, from
    workflow_status) and body (``body``: start and end of the step, from its recorded
    output in operation_outputs; None until it has one)."""
    rows = query(
        db_url,
        "SELECT w.status, w.started_at_epoch_ms, w.completed_at, "
        "o.started_at_epoch_ms, o.completed_at_epoch_ms "
        "FROM dbos.workflow_status w LEFT JOIN dbos.operation_outputs o "
        "ON o.workflow_uuid = w.workflow_uuid AND o.function_name = 'fib_step' "
        "WHERE w.workflow_uuid LIKE %s",
        f"{batch}-%",
    )
    return [
        {"status": status, "slot": (dequeued, ended), "body": (start, end)}
        for status, dequeued, ended, start, end in rows
    ]


@pytest.mark.slow
def test_more_than_50_steps_waiting_on_the_queue_start_exactly_50_at_once(
    pg_url: str, tmp_path: Path
) -> None:
    """60 units of the demo's step wait on its queue before the server starts. Its first
    poll claims as many as the limit allows, in one transaction: exactly 50 hold a slot
    at once, each from its dequeue until its end (workflow_status); the other 10 start
    as slots free up. A higher limit claims more at once, a lower one fewer.

    Measured on the slots, not on the step bodies: 50 CPU-bound bodies never overlap in
    one process. They share its GIL, a thread only reaches its body after a few database
    calls, and each of those waits for the GIL behind the bodies already running: the
    last of 50 dequeued together starts its body up to a second after the first, when
    others have ended (measured: 19 to 43 bodies at once for 50 dequeued together with
    fib(28) bodies, 36 with fib(32)). The bodies still never exceed the limit.

    Why not a fan-out through POST /trigger_async: its steps are enqueued while the queue
    already polls, so a first poll may claim only some of them (the progress test above
    shows what such runs do)."""
    assert demo.QUEUE_CONCURRENCY == 50  # the documented limit
    units, n = 60, 26
    batch = f"claims-{uuid.uuid4().hex[:8]}"
    enqueue_steps(pg_url, batch, units, n)
    assert [u["status"] for u in batch_units(pg_url, batch)] == ["ENQUEUED"] * units
    with serve(pg_url, tmp_path) as server:
        wait_for(
            lambda: all(u["status"] == "SUCCESS" for u in batch_units(pg_url, batch)),
            90,
            0.25,
            f"the {units} units to finish",
        )
        assert server.running
    found = batch_units(pg_url, batch)
    assert ledger_runs(tmp_path / "ledger.txt", batch) == Counter(range(units))  # once each
    slots = [u["slot"] for u in found]
    first_poll = min(dequeued for dequeued, _ in slots)
    held = [(d, e) for d, e in slots if d <= first_poll < e]
    later = [d for d, _ in slots if d > first_poll]
    assert len(held) == 50, sorted(slots)  # exactly the limit, at once
    assert len(later) == units - 50, sorted(slots)  # the rest after the first poll
    bodies = [u["body"] for u in found]
    assert 1 < max_running(bodies) <= 50, sorted(bodies)


# --- item 4: /healthz asks the database ---------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[pgcluster.Cluster]:
    """A private Postgres cluster this test may stop (never the shared server).

    Its files live outside pytest's temporary directory, which a second pytest session
    makes private (mode 700) while the server runs as the postgres user.
    """
    if pgcluster.find_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (pg_ctl) for a private cluster")
    workdir = Path(tempfile.mkdtemp(prefix="experiment6-claims-"))
    cluster = pgcluster.Cluster(workdir / "pg")
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.copy(workdir / "pg" / "server.log", tmp_path / "postgres-server.txt")
        shutil.rmtree(workdir, ignore_errors=True)


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
