"""Two containers of the image on one Postgres: ``docker kill`` one
mid fan-out and the other finishes it; ``docker pause`` one past its lease (SIGSTOP to
its processes on an engine without a cgroup freezer), and the other takes its work
over while it fences itself on ``unpause``.

The project's image, built unmodified on the engine ``docker`` reaches (as in
tests/test_container_engine.py), two containers on host networking with different
PORTs, each in its own PID namespace (so a peer learns of a loss from the leases
alone). Asserted from the database, the shared FIB_LEDGER (a volume) and the
containers' JSON logs; the takeover time is printed (its figure lives in
``python -m reliability --only replicas``). Without an engine these tests skip with
the reason; under CI=true they fail instead.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

import fastapi_scope_shutdown
import harness.docker as hd
from harness.fanout import children, fan_out_result, ledger_runs
from harness.proc import free_port, parse_json_lines, wait_for
from harness.replicas import logged_at
from reliability.replicas import handed_over, pending_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# 60 steps, the last 30 fib(30): the fan-out still runs when the fault comes.
STEPS, MAX_N = 60, 30
T = TypeVar("T")
DEADLINE = 180  # safety bound of every wait; the figures are measured, not asserted


@pytest.fixture
def pair(image: str, pg_url: str, tmp_path: Path) -> Iterator[tuple[hd.Container, ...]]:
    """Two containers on ``pg_url`` sharing a ledger volume; started one after the other
    (the first claims slot 0); their logs land in ``<name>.log`` afterwards."""
    ledger_env, options = hd.ledger_volume(tmp_path / "ledger")
    env = {"DBOS_SYSTEM_DATABASE_URL": pg_url, "FIB_PROCESSES": "1", **ledger_env}
    started = []
    try:
        for _ in range(2):
            c = hd.Container(image, free_port(), env, options)
            started.append(c.start())
            c.wait_serving(DEADLINE, interval=0.3)
        yield tuple(started)
    finally:
        for c in started:
            hd.docker("unpause", c.name, check=False)
            for p in c.processes() if c.running() else []:
                os.kill(int(p["pid"]), signal.SIGCONT)
            (tmp_path / f"{c.name}.log").write_text(c.logs())
            c.remove()


def start_mid_fan_out(c: hd.Container, pg_url: str) -> tuple[str, str, set[int]]:
    """Start the fan-out on ``c``; once ``c`` has steps in flight and one is done:
    (workflow id, its executor id, steps PENDING then)."""
    answer = httpx.post(
        f"{c.url}/trigger_async", params={"steps": STEPS, "max_n": MAX_N}, timeout=60
    )
    assert answer.status_code == 202, answer.text
    workflow_id = str(answer.json()["workflow_id"])
    owner = str(c.wait_serving(DEADLINE, interval=0.3)["executor_id"])

    def busy() -> set[int] | None:
        steps = children(pg_url, workflow_id)
        mine = {
            i for i, s in steps.items() if s["status"] == "PENDING" and s["executor_id"] == owner
        }
        done = any(s["status"] == "SUCCESS" for s in steps.values())
        return mine if mine and done else None

    wait_for(busy, DEADLINE, 0.1, "the first container to have steps in flight")
    pending = {i for i, s in children(pg_url, workflow_id).items() if s["status"] == "PENDING"}
    return workflow_id, owner, pending


def assert_finished_once(
    pg_url: str, ledger: Path, workflow_id: str, in_flight: set[int], via: hd.Container
) -> None:
    """SUCCESS with the right result; every step output once; only in-flight bodies re-ran."""

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{via.url}/workflows/{workflow_id}", timeout=30).json()
        return body if body["status"] in ("SUCCESS", "ERROR") else None

    done = wait_for(finished, DEADLINE, 0.5, f"fan-out {workflow_id} to finish")
    assert (done["status"], done["result"]) == ("SUCCESS", fan_out_result(STEPS, MAX_N))
    steps = children(pg_url, workflow_id)
    assert {i: s["outputs"] for i, s in steps.items()} == dict.fromkeys(range(STEPS), 1)
    runs = ledger_runs(ledger, workflow_id)
    assert set(runs) == set(range(STEPS))
    assert {i for i, n in runs.items() if n > 1} <= in_flight, (runs, in_flight)


def pause(c: hd.Container) -> str:
    """``docker pause``; on an engine without a cgroup freezer ("unable to freeze": this
    project's engine has none), SIGSTOP to every process of the container
    instead, which is what the freezer does to them. Returns the way used."""
    if hd.docker("pause", c.name, check=False).returncode == 0:
        return "docker pause"
    for p in c.processes():
        os.kill(int(p["pid"]), signal.SIGSTOP)
    return "SIGSTOP to every process of the container"


def unpause(c: hd.Container, way: str) -> None:
    if way == "docker pause":
        hd.docker("unpause", c.name)
        return
    for p in c.processes():
        os.kill(int(p["pid"]), signal.SIGCONT)


def log_lines(c: hd.Container, message: str) -> list[dict[str, Any]]:
    return [r for r in parse_json_lines(c.logs()) if r.get("message") == message]


def lost_mid_fan_out(
    a: hd.Container, pg_url: str, lose: Callable[[hd.Container], T]
) -> tuple[str, str, set[int], float, T]:
    """Start the fan-out on ``a``, ``lose`` it mid-way, and wait for the other container
    to take over ``a``'s steps: (workflow id, ``a``'s executor id, the steps PENDING
    when ``a`` was lost, seconds from the loss to the takeover, what ``lose`` returned)."""
    workflow_id, owner, _ = start_mid_fan_out(a, pg_url)
    snapshot = pending_rows(pg_url, owner)
    lost = lose(a)
    at = time.monotonic()
    in_flight = {i for i, s in children(pg_url, workflow_id).items() if s["status"] == "PENDING"}
    wait_for(lambda: handed_over(pg_url, owner, snapshot), DEADLINE, 0.1, "the takeover")
    return workflow_id, owner, in_flight, time.monotonic() - at, lost


def test_docker_kill_of_one_container_and_the_other_finishes_its_fan_out(
    pair: tuple[hd.Container, ...], pg_url: str, tmp_path: Path
) -> None:
    a, b = pair
    workflow_id, owner, in_flight, takeover, _ = lost_mid_fan_out(
        a, pg_url, lambda c: hd.docker("kill", c.name)
    )
    assert_finished_once(pg_url, tmp_path / "ledger" / "runs.txt", workflow_id, in_flight, b)
    print(f"docker kill -> takeover {takeover:.1f} s (target 10 s)")
    adopted = [r["orphan"] for r in log_lines(b, "adopted orphaned executor slot")]
    assert adopted == [owner]
    # Another PID namespace: B could not know A dead before its lease expired.
    assert takeover > fastapi_scope_shutdown.FENCE_SEC


def test_docker_pause_past_the_lease_is_taken_over_and_fences_on_unpause(
    pair: tuple[hd.Container, ...], pg_url: str, tmp_path: Path
) -> None:
    a, b = pair
    workflow_id, owner, in_flight, takeover, way = lost_mid_fan_out(a, pg_url, pause)
    assert [r["orphan"] for r in log_lines(b, "adopted orphaned executor slot")] == [owner]
    unpaused = time.monotonic()
    unpause(a, way)
    # On waking, A finds its lease long expired: it fences itself (the process image
    # ends and starts again in place), claims a slot anew and serves again.
    body = a.wait_serving(DEADLINE, interval=0.3)
    fences = log_lines(a, "executor slot lost: fencing")
    assert fences and logged_at(fences[0]) >= unpaused - 1, fences
    claims = log_lines(a, "executor slot claimed")
    assert len(claims) == 2 and claims[1]["rejoin"] is True, claims
    assert body["status"] == "ok"
    assert_finished_once(pg_url, tmp_path / "ledger" / "runs.txt", workflow_id, in_flight, b)
    print(f"{way} -> takeover {takeover:.1f} s; A fenced and rejoined after it resumed")
