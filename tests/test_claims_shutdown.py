"""Claims of fastapi_scope_shutdown.py checked against the database (issue 16, items 1, 3, 4).

- ``GET /workflows/{id}``'s ``progress.done`` counts the fan-out's children in SUCCESS:
  every read lies between two counts of SUCCESS children taken around it, and is below
  ``total`` while children exist that have not finished.
- The queue runs at most 50 steps at once, and does run 50: a fan-out of more than 50
  steps whose bodies overlap peaks at exactly 50 bodies running at once.
- ``/healthz`` asks the database: with the server's Postgres stopped it answers 503
  with the reason, and 200 again once the database is back.

Real uvicorn processes, a real Postgres (a private throwaway cluster for the outage).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pgcluster
import pytest
from helpers import AppServer, fan_out_result, query, script_env, wait_for

from fastapi_scope_shutdown import QUEUE_CONCURRENCY

TARGET = "fastapi_scope_shutdown:app"  # one process, as in the Docker image


def serve(db_url: str, tmp_path: Path, name: str = "server") -> AppServer:
    env = script_env(db_url, FIB_LEDGER=str(tmp_path / "ledger.txt"))
    return AppServer(TARGET, env, tmp_path / f"{name}.log")


def trigger(server: AppServer, steps: int, max_n: int) -> str:
    answer = server.client.post("/trigger_async", params={"steps": steps, "max_n": max_n})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["workflow_id"])


def view(server: AppServer, workflow_id: str) -> dict[str, Any]:
    answer = server.client.get(f"/workflows/{workflow_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


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


def body_intervals(db_url: str, parent: str) -> list[tuple[int, int]]:
    """(start, end) epoch ms of each step body of ``parent``'s fan-out, as recorded with its
    output in operation_outputs (taken after the dequeue committed, before the end did)."""
    rows = query(
        db_url,
        "SELECT o.started_at_epoch_ms, o.completed_at_epoch_ms "
        "FROM dbos.operation_outputs o JOIN dbos.workflow_status w "
        "ON o.workflow_uuid = w.workflow_uuid "
        "WHERE w.parent_workflow_id = %s AND o.function_name = 'fib_step'",
        parent,
    )
    return [(int(start), int(end)) for start, end in rows]


def peak(intervals: list[tuple[int, int]]) -> int:
    """Most intervals open at one instant (an end at t closes before a start at t)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


# --- item 1: progress is the count of SUCCESS children -------------------------------


@pytest.mark.slow
def test_progress_done_lies_between_success_counts_taken_around_each_read(
    pg_url: str, tmp_path: Path
) -> None:
    steps, max_n = 80, 26  # more than the limit: children wait ENQUEUED while others run
    reads = []  # (successes before, done, successes after, unfinished during the read)
    with serve(pg_url, tmp_path) as server:
        workflow_id = trigger(server, steps, max_n)
        deadline = time.monotonic() + 90
        while True:
            before = child_statuses(pg_url, workflow_id)
            answer = view(server, workflow_id)
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


@pytest.mark.slow
def test_a_fan_out_wider_than_the_limit_peaks_at_exactly_50_step_bodies(
    pg_url: str, tmp_path: Path
) -> None:
    """Steps i >= max_n all compute fib(max_n): about 30 ms of CPU alone, about a second
    when 50 bodies share the process's GIL, so the bodies that hold the 50 slots overlap
    while the queue refills each freed slot (polled every 0.2 s). Only a limit above 50
    lets more than 50 run; a limit below 50 never reaches 50."""
    steps, max_n = 80, 28
    assert QUEUE_CONCURRENCY == 50  # the documented limit
    with serve(pg_url, tmp_path) as server:
        workflow_id = trigger(server, steps, max_n)
        final = wait_for(
            lambda: (v := view(server, workflow_id))["status"] == "SUCCESS" and v,
            120,
            0.25,
            f"fan-out {workflow_id} to finish",
        )
    assert final["result"] == fan_out_result(steps, max_n)
    bodies = body_intervals(pg_url, workflow_id)
    assert len(bodies) == steps  # one recorded body per step
    ledger = (tmp_path / "ledger.txt").read_text().splitlines()
    assert len(ledger) == steps  # and each body ran once
    assert peak(bodies) == 50, sorted(bodies)


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
        healthy = server.client.get("/healthz")
        assert healthy.status_code == 200, healthy.text
        assert healthy.json()["status"] == "ok"

        cluster.stop("fast")
        try:
            down = server.client.get("/healthz", timeout=15)
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
            lambda: (a := server.client.get("/healthz", timeout=15)).status_code == 200 and a,
            30,
            0.5,
            "/healthz to answer 200 once the database is back",
        )
        assert back.json()["status"] == "ok"
