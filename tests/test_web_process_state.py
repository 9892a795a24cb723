"""fastapi_scope.py in the test process: per run, an ``A`` counts its own steps;
per process, the configured instance ``tally`` and the counters grow across requests
and start again at zero after a restart (the lifespan run again), while the results
stay readable from the database; parameters outside the limits are a 422."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

import fastapi_scope as app
from harness.clients import ScopeClient
from harness.db import query, step_outputs, workflow_rows
from harness.inprocess import (  # noqa: F401
    in_process,
    picked,
    run_to_exit,
    served,
    use_environment,
)
from harness.proc import free_port

pytestmark = pytest.mark.usefixtures("in_process")

FAST = {"steps": 3, "step_seconds": 0}
LIMITS = [
    ("/trigger_sync", 20, 0.5),
    ("/instance/trigger_sync", 20, 0.5),
    ("/trigger_async", 50, 1.0),
]
BAD_PARAMS: list[tuple[str, dict[str, Any], str]] = [
    ("/trigger_sync", {"steps": 0}, "steps"),
    ("/trigger_sync", {"steps": app.SYNC_MAX_STEPS + 1}, "steps"),
    ("/trigger_sync", {"step_seconds": "nan"}, "step_seconds"),
    ("/trigger_async", {"steps": app.ASYNC_MAX_STEPS + 1}, "steps"),
    ("/instance/trigger_sync", {"step_seconds": "soon"}, "step_seconds"),
]


def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a freshly started server holds in memory."""
    monkeypatch.setattr(app, "process_counters", {"triggers": 0, "step_bodies_run": 0})
    monkeypatch.setattr(app.tally, "counter", 0)


@contextlib.contextmanager
def new_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScopeClient]:
    """The app served as a freshly started process would serve it."""
    new_process(monkeypatch)
    with served(app.app) as (client, _):
        yield ScopeClient(client)


def test_sync_async_and_instance_triggers_record_their_steps(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, db_url)
    with new_server(monkeypatch) as api:
        sync = api.trigger_sync(**FAST)
        assert sync.status_code == 200, sync.text
        body = sync.json()
        assert body["status"] == "SUCCESS"
        assert (body["result"]["instance_counter"], body["result"]["class_counter"]) == (3, 0)
        assert workflow_rows(db_url, body["workflow_id"])["status"] == "SUCCESS"
        assert step_outputs(db_url, body["workflow_id"]) == [(i, "A.step") for i in (1, 2, 3)]

        async_id = api.start(steps=3, step_seconds=0)
        assert api.wait_finished(async_id, timeout=30)["result"]["instance_counter"] == 3
        assert step_outputs(db_url, async_id) == [(i, "A.step") for i in (1, 2, 3)]

        # The configured instance's workflow: DBOS records its class and name.
        inst = api.instance_trigger_sync(**FAST).json()
        tallied = ("steps", "config_name", "counter_before", "counter_after")
        assert picked(inst["result"], *tallied) == dict(
            zip(tallied, (3, "tally", 0, 3), strict=True)
        )
        recorded = (
            "SELECT class_name, config_name, status FROM dbos.workflow_status "
            "WHERE workflow_uuid = %s"
        )
        assert query(db_url, recorded, inst["workflow_id"]) == [("Tally", "tally", "SUCCESS")]
        missing = api.get_workflow("no-such-workflow")
        assert missing.status_code == 404
        assert "no workflow with id 'no-such-workflow'" in missing.json()["detail"]


def test_process_state_grows_and_resets_on_restart_while_results_stay(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, pg_url)
    with new_server(monkeypatch) as api:
        a1 = api.trigger_sync(**FAST).json()
        a2 = api.trigger_sync(steps=2, step_seconds=0).json()
        t1 = api.instance_trigger_sync(**FAST).json()
        t2 = api.instance_trigger_sync(steps=2, step_seconds=0).json()
        assert [a1["result"]["instance_counter"], a2["result"]["instance_counter"]] == [3, 2]
        assert (t2["result"]["counter_before"], t2["result"]["counter_after"]) == (3, 5)
        grown = api.counters()
        assert (grown["triggers"], grown["step_bodies_run"]) == (4, 3 + 2 + 3 + 2)
        assert (grown["tally_counter"], grown["class_counter"]) == (5, 0)

    with new_server(monkeypatch) as api:
        fresh = api.counters()
        assert (fresh["triggers"], fresh["step_bodies_run"], fresh["tally_counter"]) == (0, 0, 0)
        for old in (a1, a2, t1, t2):
            assert api.view(old["workflow_id"]) == old
        t3 = api.instance_trigger_sync(**FAST).json()
        assert (t3["result"]["counter_before"], t3["result"]["counter_after"]) == (0, 3)


def test_parameters_outside_the_limits_are_a_422_and_start_nothing(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, sqlite_url)
    with served(app.app) as (client, _):
        for path, params, name in BAD_PARAMS:
            answer = client.post(path, params=params)
            assert answer.status_code == 422, (path, params, answer.text)
            assert [e["loc"] for e in answer.json()["detail"]] == [["query", name]]
        assert query(sqlite_url, "SELECT count(*) FROM dbos.workflow_status") == [(0,)]
        schema = client.get("/openapi.json").json()
        for path, steps_max, seconds_max in LIMITS:
            params = {p["name"]: p for p in schema["paths"][path]["post"]["parameters"]}
            steps, seconds = params["steps"]["schema"], params["step_seconds"]["schema"]
            assert (steps["minimum"], steps["maximum"]) == (1, steps_max)
            assert (seconds["minimum"], seconds["maximum"]) == (0, seconds_max)


def serve_once() -> None:
    with TestClient(app.app):  # the lifespan: launch DBOS, then stop it
        pass


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "not a database URL"),
        ("postgresql://postgres:hunter2@127.0.0.1:{port}/nowhere", "cannot reach the system"),
    ],
    ids=["malformed", "unreachable"],
)
def test_a_bad_database_ends_startup_with_one_error_line(
    url: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, url.format(port=free_port()))
    result = run_to_exit(serve_once)
    assert expected in result.failure() and result.stderr == ""
    assert "hunter2" not in result.stdout
