"""fastapi_scope.py over HTTP: sync/async triggers, process state vs durable state."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fastapi_scope as app
from harness import REPO
from harness.clients import ScopeClient
from harness.db import query, step_outputs, workflow_rows
from harness.env import script_env
from harness.proc import free_port, parse_json_lines, wait_for
from harness.server import AppServer

TARGET = "fastapi_scope:app"
FAST = {"steps": 3, "step_seconds": 0}


def finished(server: AppServer, workflow_id: str, timeout: float = 30) -> dict[str, Any]:
    """Poll GET /workflows/{id} until the workflow has left PENDING/ENQUEUED."""
    return ScopeClient(server.client).wait_finished(workflow_id, timeout)


@pytest.mark.slow
def test_sync_and_async_triggers_finish_and_unknown_ids_are_404(
    pg_url: str, tmp_path: Path
) -> None:
    with AppServer(TARGET, script_env(pg_url), tmp_path / "server.log") as server:
        sync = server.client.post("/trigger_sync", params=FAST)
        assert sync.status_code == 200, sync.text
        body = sync.json()
        assert body["status"] == "SUCCESS"
        # A fresh A per run counts the run's steps; self.counter shadows A.counter.
        assert body["result"]["steps"] == 3
        assert body["result"]["instance_counter"] == 3
        assert body["result"]["class_counter"] == 0
        sync_id = body["workflow_id"]
        assert workflow_rows(pg_url, sync_id)["status"] == "SUCCESS"
        assert step_outputs(pg_url, sync_id) == [(i, "A.step") for i in (1, 2, 3)]

        started = server.client.post("/trigger_async", params={"steps": 3, "step_seconds": 0.2})
        assert started.status_code == 202, started.text
        async_id = started.json()["workflow_id"]
        # It answers before the workflow can have finished (3 steps of 0.2 s).
        assert started.json()["status"] in ("PENDING", "ENQUEUED")
        assert async_id != sync_id
        view = finished(server, async_id)
        assert view["status"] == "SUCCESS"
        assert view["result"]["instance_counter"] == 3
        assert step_outputs(pg_url, async_id) == [(i, "A.step") for i in (1, 2, 3)]

        # The configured instance's workflow: DBOS records its class and name.
        inst = server.client.post("/instance/trigger_sync", params=FAST)
        assert inst.status_code == 200, inst.text
        assert inst.json()["result"] == {
            "steps": 3,
            "config_name": "tally",
            "counter_before": 0,
            "counter_after": 3,
        }
        inst_id = inst.json()["workflow_id"]
        assert query(
            pg_url,
            "SELECT class_name, config_name, status FROM dbos.workflow_status "
            "WHERE workflow_uuid = %s",
            inst_id,
        ) == [("Tally", "tally", "SUCCESS")]
        assert step_outputs(pg_url, inst_id) == [(i, "Tally.step") for i in (1, 2, 3)]

        missing = server.client.get("/workflows/no-such-workflow")
        assert missing.status_code == 404
        assert "no workflow with id 'no-such-workflow'" in missing.json()["detail"]


@pytest.mark.slow
def test_counters_grow_across_requests_and_reset_on_restart_but_results_stay_in_the_db(
    pg_url: str, tmp_path: Path
) -> None:
    env = script_env(pg_url)
    with AppServer(TARGET, env, tmp_path / "first.log") as first:
        zero = first.client.get("/counters").json()
        assert {k: zero[k] for k in ("triggers", "step_bodies_run", "tally_counter")} == {
            "triggers": 0,
            "step_bodies_run": 0,
            "tally_counter": 0,
        }
        a1 = first.client.post("/trigger_sync", params=FAST).json()
        a2 = first.client.post("/trigger_sync", params={"steps": 2, "step_seconds": 0}).json()
        t1 = first.client.post("/instance/trigger_sync", params=FAST).json()
        t2 = first.client.post("/instance/trigger_sync", params={"steps": 2, "step_seconds": 0})
        t2 = t2.json()
        # Per run: each A starts at zero. Per process: the tally keeps counting.
        assert [a1["result"]["instance_counter"], a2["result"]["instance_counter"]] == [3, 2]
        assert (t1["result"]["counter_before"], t1["result"]["counter_after"]) == (0, 3)
        assert (t2["result"]["counter_before"], t2["result"]["counter_after"]) == (3, 5)
        grown = first.client.get("/counters").json()
        assert grown["triggers"] == 4
        assert grown["step_bodies_run"] == 3 + 2 + 3 + 2
        assert grown["tally_counter"] == 5
        assert grown["class_counter"] == 0
        assert first.terminate() in (0, -signal.SIGTERM)

    with AppServer(TARGET, env, tmp_path / "second.log") as second:
        fresh = second.client.get("/counters").json()
        assert fresh["process_id"] != grown["process_id"]
        assert (fresh["triggers"], fresh["step_bodies_run"], fresh["tally_counter"]) == (0, 0, 0)
        # The old results come from the database, unchanged.
        for old in (a1, a2, t1, t2):
            view = second.client.get(f"/workflows/{old['workflow_id']}").json()
            assert view == old
        # The new process's tally starts from zero again.
        t3 = second.client.post("/instance/trigger_sync", params=FAST).json()
        assert (t3["result"]["counter_before"], t3["result"]["counter_after"]) == (0, 3)


@pytest.mark.slow
def test_a_run_recovered_after_sigkill_counts_only_the_steps_the_new_process_ran(
    pg_url: str, tmp_path: Path
) -> None:
    env = script_env(pg_url)
    first = AppServer(TARGET, env, tmp_path / "first.log")
    with first:
        started = first.client.post("/trigger_async", params={"steps": 6, "step_seconds": 0.3})
        workflow_id = started.json()["workflow_id"]
        wait_for(lambda: len(step_outputs(pg_url, workflow_id)) >= 2, 30, 0.05, "two steps")
        first.kill()
    done_before = len(step_outputs(pg_url, workflow_id))
    assert 2 <= done_before < 6
    assert workflow_rows(pg_url, workflow_id)["status"] == "PENDING"

    with AppServer(TARGET, env, tmp_path / "second.log") as second:
        view = finished(second, workflow_id)
        assert view["status"] == "SUCCESS"
        # DBOS resumed it at launch, without any request: a new A counted only the
        # steps whose outputs were not yet recorded.
        assert view["result"]["instance_counter"] == 6 - done_before
        counters = second.client.get("/counters").json()
        assert (counters["triggers"], counters["step_bodies_run"]) == (0, 6 - done_before)
    assert step_outputs(pg_url, workflow_id) == [(i, "A.step") for i in range(1, 7)]
    resumed = [r["step"] for r in second.records() if r.get("message") == "step"]
    assert resumed == list(range(done_before + 1, 7))


BAD_PARAMS: list[tuple[str, dict[str, Any], str]] = [
    ("/trigger_sync", {"steps": 0}, "steps"),
    ("/trigger_sync", {"steps": app.SYNC_MAX_STEPS + 1}, "steps"),
    ("/trigger_sync", {"steps": "abc"}, "steps"),
    ("/trigger_sync", {"step_seconds": -1}, "step_seconds"),
    ("/trigger_sync", {"step_seconds": app.SYNC_MAX_STEP_SECONDS + 0.1}, "step_seconds"),
    ("/trigger_sync", {"step_seconds": "nan"}, "step_seconds"),
    ("/trigger_sync", {"step_seconds": "inf"}, "step_seconds"),
    ("/trigger_async", {"steps": app.ASYNC_MAX_STEPS + 1}, "steps"),
    ("/trigger_async", {"step_seconds": app.ASYNC_MAX_STEP_SECONDS + 0.5}, "step_seconds"),
    ("/instance/trigger_sync", {"steps": app.SYNC_MAX_STEPS + 1}, "steps"),
    ("/instance/trigger_sync", {"step_seconds": "soon"}, "step_seconds"),
]


@pytest.mark.slow
def test_python_script_on_sqlite_rejects_bad_parameters_with_422_and_keeps_serving(
    sqlite_url: str, tmp_path: Path
) -> None:
    server = AppServer.script("fastapi_scope.py", script_env(sqlite_url), tmp_path / "server.log")
    with server:
        for path, params, name in BAD_PARAMS:
            answer = server.client.post(path, params=params)
            assert answer.status_code == 422, (path, params, answer.text)
            errors = answer.json()["detail"]
            assert [e["loc"] for e in errors] == [["query", name]], (path, params)
            assert errors[0]["msg"]
        # Nothing was started by a rejected request.
        assert query(sqlite_url, "SELECT count(*) FROM dbos.workflow_status") == [(0,)]
        # The limits are documented in the OpenAPI schema.
        schema = server.client.get("/openapi.json").json()
        for path, steps_max, seconds_max in [
            ("/trigger_sync", 20, 0.5),
            ("/instance/trigger_sync", 20, 0.5),
            ("/trigger_async", 50, 1.0),
        ]:
            params = {p["name"]: p for p in schema["paths"][path]["post"]["parameters"]}
            steps, seconds = params["steps"], params["step_seconds"]
            assert (steps["schema"]["minimum"], steps["schema"]["maximum"]) == (1, steps_max)
            assert (seconds["schema"]["minimum"], seconds["schema"]["maximum"]) == (0, seconds_max)
            assert f"1..{steps_max}" in steps["description"]
        # The server still serves, on SQLite, run as `python fastapi_scope.py`.
        ok = server.client.post("/trigger_sync", params=FAST)
        assert ok.status_code == 200
        view = server.client.get(f"/workflows/{ok.json()['workflow_id']}").json()
        assert view["status"] == "SUCCESS" and view["result"]["instance_counter"] == 3
        assert server.client.get("/workflows/unknown").status_code == 404
        assert server.terminate() in (0, -signal.SIGTERM)
    # Every log line is JSON, uvicorn's included.
    assert any(r["name"].startswith("uvicorn") for r in server.records())


@pytest.mark.slow  # the exit of a real process; in the test process: test_web_process_state.py
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "not a database URL"),
        (
            "postgresql://postgres:hunter2@127.0.0.1:{port}/nowhere",
            "cannot reach the system database",
        ),
    ],
    ids=["malformed", "unreachable"],
)
def test_bad_database_fails_startup_with_one_error_line(url: str, expected: str) -> None:
    url = url.format(port=free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "uvicorn", TARGET, "--port", str(free_port())],
        env=script_env(url),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == ""
    records = parse_json_lines(proc.stdout)
    errors = [r for r in records if r["severity"] == "ERROR"]
    assert len(errors) == 1 and expected in errors[0]["message"]
    assert "hunter2" not in proc.stdout
    assert "Traceback" not in proc.stdout
