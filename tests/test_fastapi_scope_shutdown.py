"""fastapi_scope_shutdown.py in one server process: the fan-out and its limit, progress,
input checks, the shutdown endpoint's guard, a SIGTERM stop, the schedule next to another
experiment, SQLite. Several workers, crashes and recovery: test_..._workers.py.

Servers run as real uvicorn processes on a fresh Postgres database (SQLite where
the test says so). Step bodies append to a ledger file (FIB_LEDGER) outside DBOS,
so a test can count how often each body really ran.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import fastapi_scope_shutdown
from harness import REPO
from harness.clients import ShutdownClient
from harness.db import query
from harness.env import no_secret_leaks, script_env
from harness.fanout import (
    assert_clean_stop,
    assert_queue_limit,
    children,
    fan_out_result,
    ledger_runs,
    schedule_runs,
    shutdown_server,
)
from harness.proc import free_port, run_script, wait_for
from harness.server import AppServer
from lab.config import app_name

TOKEN = "test-token-7c1d0e"  # must never show up in a log
SCRIPT = REPO / "fastapi_scope_shutdown.py"


expected = fan_out_result  # what a fan-out of (steps, max_n) must return


def app_server(
    tmp_path: Path,
    db_url: str,
    name: str,
    *,
    workers: int | None = None,
    token: str | None = TOKEN,
    port: int | None = None,
) -> AppServer:
    """``uvicorn fastapi_scope_shutdown:app`` (one process, as in the Docker image), or
    ``python fastapi_scope_shutdown.py`` with WORKERS processes (as ``dbos start``)."""
    log, ledger = tmp_path / f"{name}.log", tmp_path / "ledger.txt"
    return shutdown_server(db_url, log, workers=workers, token=token, ledger=ledger, port=port)


def api(server: AppServer) -> ShutdownClient:
    return ShutdownClient(server.client)


def ledger(tmp_path: Path, parent: str) -> Counter[int]:
    """How often each step body of ``parent`` ran (index -> executions)."""
    return ledger_runs(tmp_path / "ledger.txt", parent)


# --- the fan-out ------------------------------------------------------------


@pytest.mark.slow
def test_fan_out_returns_fibonacci_numbers_with_at_most_50_steps_running_at_once(
    pg_url: str, tmp_path: Path
) -> None:
    steps, max_n = 120, 20  # more steps than the limit, each a few ms of CPU
    with app_server(tmp_path, pg_url, "server") as server:
        health = api(server).healthz().json()
        assert health == {
            "status": "ok",
            "executor_id": "shutdown-0",
            "database": "postgres",
            "pid": health["pid"],
        }
        workflow_id = api(server).trigger(steps, max_n)
        seen = []
        while (view := api(server).view(workflow_id))["status"] != "SUCCESS":
            assert view["status"] == "PENDING" and "result" not in view
            assert view["progress"]["total"] == steps
            seen.append(view["progress"]["done"])
            time.sleep(0.05)
        missing = api(server).get_workflow("no-such-workflow")
        # A step workflow exists, but it is not a fan-out.
        step_workflow = api(server).get_workflow(f"{workflow_id}-1")
    assert view["result"] == expected(steps, max_n)
    assert view["progress"] == {"done": steps, "total": steps}
    assert seen == sorted(seen), seen  # progress only grows
    assert any(0 < done < steps for done in seen), seen  # and was seen part way
    assert missing.status_code == 404 and "no-such-workflow" in missing.json()["detail"]
    assert step_workflow.status_code == 404

    steps_run = children(pg_url, workflow_id)
    assert sorted(steps_run) == list(range(steps))
    assert {c["status"] for c in steps_run.values()} == {"SUCCESS"}
    assert {c["outputs"] for c in steps_run.values()} == {1}  # one recorded output each
    assert ledger(tmp_path, workflow_id) == Counter(range(steps))  # each body ran once
    assert_queue_limit(steps_run, fastapi_scope_shutdown.QUEUE_CONCURRENCY)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": fastapi_scope_shutdown.MAX_STEPS + 1}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"max_n": -1}, "max_n"),
        ({"max_n": fastapi_scope_shutdown.MAX_MAX_N + 1}, "max_n"),
    ],
)
@pytest.mark.slow
def test_out_of_range_parameters_are_422_with_the_reason(
    sqlite_server: AppServer, params: dict[str, Any], field: str
) -> None:
    answer = sqlite_server.client.post("/trigger_async", params=params)
    assert answer.status_code == 422
    (error,) = answer.json()["detail"]
    assert error["loc"] == ["query", field]
    assert error["msg"]


@pytest.mark.slow
def test_openapi_documents_the_ranges(sqlite_server: AppServer) -> None:
    spec = sqlite_server.client.get("/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/trigger_async"]["post"]["parameters"]}
    steps, max_n = params["steps"]["schema"], params["max_n"]["schema"]
    assert (steps["minimum"], steps["maximum"]) == (1, fastapi_scope_shutdown.MAX_STEPS)
    assert (max_n["minimum"], max_n["maximum"]) == (0, fastapi_scope_shutdown.MAX_MAX_N)
    assert steps["default"] == fastapi_scope_shutdown.DEFAULT_STEPS
    assert max_n["default"] == fastapi_scope_shutdown.DEFAULT_MAX_N
    shutdown = spec["paths"]["/shutdown"]["post"]["responses"]
    assert {"202", "401", "403"} <= shutdown.keys()


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One process on SQLite, no SHUTDOWN_TOKEN: for the plain request checks."""
    tmp_path = tmp_path_factory.mktemp("sqlite_server")
    url = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    with no_secret_leaks(tmp_path), app_server(tmp_path, url, "server", token=None) as server:
        yield server


@pytest.mark.slow
def test_sqlite_runs_the_fan_out_in_one_process(sqlite_server: AppServer) -> None:
    health = api(sqlite_server).healthz().json()
    assert (health["executor_id"], health["database"]) == ("shutdown-0", "sqlite")
    workflow_id = api(sqlite_server).trigger(12, 10)
    assert api(sqlite_server).wait_success(workflow_id)["result"] == expected(12, 10)


@pytest.mark.slow
def test_sqlite_refuses_a_second_process_and_several_workers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    with app_server(tmp_path, url, "first", token=None) as first:
        second = run_script(
            "fastapi_scope_shutdown.py", env=script_env(url, PORT=str(free_port())), timeout=60
        )
        assert second.returncode == 2
        assert "another process already serves" in second.records[-1]["message"]
        assert api(first).healthz().status_code == 200
    several = run_script("fastapi_scope_shutdown.py", env=script_env(url, WORKERS="2"))
    assert several.returncode == 2
    assert len(several.records) == 1
    assert "needs Postgres" in several.records[0]["message"]


@pytest.mark.slow  # the exit of a real process; in the test process: test_fan_out_in_one_process.py
@pytest.mark.usefixtures("sqlite_supported")  # runs on the default SQLite
@pytest.mark.parametrize(
    ("variable", "value"), [("WORKERS", "0"), ("WORKERS", "two"), ("PORT", "70000")]
)
def test_bad_port_or_workers_fail_fast_with_one_line(
    tmp_path: Path, variable: str, value: str
) -> None:
    url = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    result = run_script("fastapi_scope_shutdown.py", env=script_env(url, **{variable: value}))
    assert result.returncode == 2
    assert len(result.records) == 1
    assert variable in result.records[0]["message"]
    assert not (tmp_path / "experiment6.sqlite").exists()


# --- the shutdown endpoint ---------------------------------------------------


@pytest.mark.slow
def test_shutdown_without_the_right_token_is_refused_and_the_server_keeps_serving(
    pg_url: str, tmp_path: Path, sqlite_server: AppServer
) -> None:
    with app_server(tmp_path, pg_url, "server") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = api(server).shutdown("crash", headers=headers)
            assert answer.status_code == 401, (headers, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"
        bad_mode = api(server).shutdown("reboot", token=TOKEN)
        assert bad_mode.status_code == 422
        time.sleep(0.5)  # a shutdown would have started by now
        assert server.proc is not None and server.proc.poll() is None
        assert api(server).healthz().status_code == 200
        assert TOKEN not in server.log_text()
    # No SHUTDOWN_TOKEN configured: the endpoint is disabled, whatever is sent.
    disabled = api(sqlite_server).shutdown(token=TOKEN)
    assert disabled.status_code == 403
    assert "SHUTDOWN_TOKEN" in disabled.json()["detail"]
    assert api(sqlite_server).healthz().status_code == 200


@pytest.mark.slow
def test_sigterm_from_outside_is_a_graceful_stop_and_frees_the_executor_slot(
    pg_url: str, tmp_path: Path
) -> None:
    server = app_server(tmp_path, pg_url, "first").start()
    try:
        assert api(server).healthz().json()["executor_id"] == "shutdown-0"
        started = time.monotonic()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert_clean_stop(
            server, started, bound=fastapi_scope_shutdown.GRACE_SECONDS + 10, secret=TOKEN
        )
    finally:
        server.close()
    # The slot was released: the next process gets the same executor id.
    with app_server(tmp_path, pg_url, "second") as again:
        assert api(again).healthz().json()["executor_id"] == "shutdown-0"


# --- the schedule, next to another experiment ----------------------------------


@pytest.mark.slow
def test_schedule_fires_every_5_seconds_even_while_scope_py_uses_the_same_database(
    pg_url: str, tmp_path: Path
) -> None:
    """One database, many experiments: scope.py (application experiment6-scope, executor
    "local") runs against the shutdown demo's database while it serves. The demo's queue
    keeps its configuration, its schedule keeps firing, and each ran only its own work."""
    queue_sql = (
        "SELECT name, concurrency, worker_concurrency, polling_interval_sec, application_name "
        "FROM dbos.queues ORDER BY name"
    )
    with app_server(tmp_path, pg_url, "server") as server:
        # Two runs 5 s apart within about 12 s of serving.
        wait_for(lambda: len(schedule_runs(server.records())) >= 2, 12, 0.2, "two runs")
        queues_before = query(pg_url, queue_sql)
        queue = (
            fastapi_scope_shutdown.QUEUE,
            fastapi_scope_shutdown.QUEUE_CONCURRENCY,
            fastapi_scope_shutdown.worker_concurrency(1),  # one process (uvicorn): every slot
            fastapi_scope_shutdown.QUEUE_POLLING_SEC,
        )
        assert queues_before == [(*queue, app_name(fastapi_scope_shutdown.APP))]

        scope = run_script(
            "scope.py", "--steps", "2", "--step-seconds", "0", env=script_env(pg_url)
        )
        assert scope.returncode == 0, scope.stderr
        assert scope.summary["recovered"] is False
        scope_done = datetime.now().astimezone()

        def runs_after_scope() -> bool:
            runs = schedule_runs(server.records())
            return any(datetime.fromisoformat(r["actual_time"]) > scope_done for r in runs)

        wait_for(runs_after_scope, 10, 0.2, "a scheduled run after scope.py")
        runs = schedule_runs(server.records())
        queues_after = query(pg_url, queue_sql)
        schedules = query(
            pg_url, "SELECT schedule_name, application_name FROM dbos.workflow_schedules"
        )
        server_pid = server.proc.pid if server.proc else None

    slots = [datetime.fromisoformat(r["scheduled_time"]) for r in runs]
    # Every 5-second slot from the first to the last, each once, none skipped.
    assert all((b - a).total_seconds() == 5 for a, b in zip(slots, slots[1:], strict=False))
    assert all(s.second % 5 == 0 and s.microsecond == 0 for s in slots)
    for run, slot in zip(runs, slots, strict=True):
        assert 0 <= (datetime.fromisoformat(run["actual_time"]) - slot).total_seconds() < 5
        assert run["workflow_id"] == f"sched-shutdown-every-5s-{run['scheduled_time']}"
        assert (run["executor_id"], run["pid"]) == ("shutdown-0", server_pid)
    assert queues_after == queues_before
    assert schedules == [("shutdown-every-5s", "experiment6-shutdown")]
    # Each application ran its own workflows, on its own executor id.
    owners = query(
        pg_url,
        "SELECT DISTINCT application_name, executor_id FROM dbos.workflow_status ORDER BY 1",
    )
    assert owners == [("experiment6-scope", "local"), ("experiment6-shutdown", "shutdown-0")]
