"""fastapi_scope_shutdown.py in the test process (its lifespan claims an executor slot,
starts the pool, launches DBOS, registers the queue and the schedule; leaving the
``with`` undoes all of it): a fan-out answers 202 at once, its progress only grows, it
returns the Fibonacci numbers with one recorded output per step, at most the
queue's limit running at once; parameters out of range are a 422, a stop request
without the right token a 401, and with no token configured a 403."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

import fastapi_scope_shutdown as demo
from harness.clients import ShutdownClient
from harness.fanout import assert_queue_limit, children, fan_out_result
from harness.inprocess import in_process, run_to_exit, served, use_environment  # noqa: F401

pytestmark = pytest.mark.usefixtures("in_process")

TOKEN = "test-token-5b2e9a"  # must never show up in a log


def test_a_fan_out_returns_fibonacci_numbers_with_one_output_per_step(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps, max_n = 20, 15
    use_environment(monkeypatch, pg_url, FIB_PROCESSES="1", SHUTDOWN_TOKEN=TOKEN)
    with served(demo.app) as (client, output):
        api = ShutdownClient(client)
        health = api.healthz().json()
        assert (health["status"], health["executor_id"], health["database"]) == (
            "ok",
            "shutdown-0",
            "postgres",
        )
        workflow_id = api.trigger(steps, max_n)
        seen = []
        deadline = time.monotonic() + 60
        while (view := api.view(workflow_id))["status"] != "SUCCESS":
            assert view["status"] == "PENDING" and time.monotonic() < deadline, view
            seen.append(view["progress"]["done"])
            time.sleep(0.05)
        assert api.get_workflow("no-such-workflow").status_code == 404
        assert api.get_workflow(f"{workflow_id}-1").status_code == 404  # a step, not a fan-out
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            assert api.shutdown("crash", headers=headers).status_code == 401, headers
        assert api.healthz().status_code == 200
    assert view["result"] == fan_out_result(steps, max_n)
    assert view["progress"] == {"done": steps, "total": steps}
    assert seen == sorted(seen), seen
    steps_run = children(pg_url, workflow_id)
    assert sorted(steps_run) == list(range(steps))
    assert {(c["status"], c["outputs"]) for c in steps_run.values()} == {("SUCCESS", 1)}
    assert_queue_limit(steps_run, demo.QUEUE_CONCURRENCY)
    assert TOKEN not in output.stream.getvalue()


def test_bad_parameters_are_422_and_without_a_token_stopping_is_disabled(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, sqlite_url, FIB_PROCESSES="1")
    with served(demo.app) as (client, _):
        api = ShutdownClient(client)
        bad: list[tuple[dict[str, int], str]] = [
            ({"steps": 0}, "steps"),
            ({"steps": demo.MAX_STEPS + 1}, "steps"),
            ({"max_n": -1}, "max_n"),
            ({"max_n": demo.MAX_MAX_N + 1}, "max_n"),
        ]
        for params, field in bad:
            answer = client.post("/trigger_async", params=params)
            assert answer.status_code == 422, params
            assert [e["loc"] for e in answer.json()["detail"]] == [["query", field]]
        disabled = api.shutdown(token=TOKEN)
        assert disabled.status_code == 403 and "SHUTDOWN_TOKEN" in disabled.json()["detail"]
        spec = client.get("/openapi.json").json()
        documented = {p["name"]: p for p in spec["paths"]["/trigger_async"]["post"]["parameters"]}
        assert documented["steps"]["schema"]["maximum"] == demo.MAX_STEPS
        assert documented["max_n"]["schema"]["maximum"] == demo.MAX_MAX_N
        assert api.healthz().json()["database"] == "sqlite"


@pytest.mark.usefixtures("sqlite_supported")  # on SQLite: its check comes first
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("WORKERS", "0", "WORKERS"),
        ("WORKERS", "two", "WORKERS"),
        ("PORT", "70000", "PORT"),
        *[
            (
                "MAX_QUEUED_STEPS",
                value,
                "MAX_QUEUED_STEPS must be a whole number from 1 to "
                f"{demo.MAX_MAX_QUEUED_STEPS}, got {value!r}",
            )
            for value in ("0", "-5", "many", "1000001")
        ],
    ],
)
def test_a_bad_setting_ends_the_server_before_it_starts_with_one_line(
    variable: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    use_environment(monkeypatch, url, **{variable: value})
    assert expected in run_to_exit(demo.main).failure()
    assert list(tmp_path.iterdir()) == []


def test_too_old_sqlite_ends_the_server_before_dbos_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_environment(monkeypatch, f"sqlite:///{tmp_path / 'old.sqlite'}", WORKERS="1")
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")  # too old on every Python
    message = run_to_exit(demo.main).failure()
    assert message.startswith("SQLite 3.34.1 is too old: DBOS 3.4 on Python ")
    assert list(tmp_path.iterdir()) == []
