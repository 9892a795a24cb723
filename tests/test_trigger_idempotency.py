"""POST /trigger_async with an Idempotency-Key: one key, one fan-out.

The fan-out's workflow id is ``trigger-<key>``, started with DBOS's reuse policy
"reject": one insert decides, so the first request is answered 202 and every later one
200 with the same id, whichever process or restart it reaches, while the row exists.
Servers are real uvicorn processes; the database and the step ledger (FIB_LEDGER: one
line per step body run) count the fan-outs and their steps.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

import fastapi_scope_shutdown
from harness.clients import ShutdownClient
from harness.db import query
from harness.fanout import children, fan_out_result, ledger_runs, shutdown_server
from harness.proc import wait_for
from harness.server import AppServer

STEPS, MAX_N = 8, 12  # small: the point is how many fan-outs start, not their work
FAN_OUT = fastapi_scope_shutdown.fan_out.__qualname__


def server(db_url: str, tmp_path: Path, name: str) -> AppServer:
    return shutdown_server(
        db_url, tmp_path / f"{name}.log", ledger=tmp_path / "ledger.txt", ready_path="/healthz"
    )


def fan_outs(db_url: str) -> list[str]:
    """Every fan-out workflow in the database."""
    rows = query(db_url, "SELECT workflow_uuid FROM dbos.workflow_status WHERE name = %s", FAN_OUT)
    return sorted(r[0] for r in rows)


def assert_ran_once(db_url: str, tmp_path: Path, workflow_id: str, api: ShutdownClient) -> None:
    """The fan-out succeeded with its result, one child per step, each body run once."""
    view = api.wait_success(workflow_id, timeout=120)
    assert view["result"] == fan_out_result(STEPS, MAX_N)
    assert sorted(children(db_url, workflow_id)) == list(range(STEPS))
    runs = ledger_runs(tmp_path / "ledger.txt", workflow_id)
    assert runs == dict.fromkeys(range(STEPS), 1), runs


@pytest.mark.slow
def test_a_retry_after_a_client_timeout_gets_the_same_fan_out_and_starts_no_other(
    db_url: str, tmp_path: Path
) -> None:
    key, wanted = (
        "order-42:retry_1.a",
        fastapi_scope_shutdown.KEYED_ID_PREFIX + "order-42:retry_1.a",
    )
    with server(db_url, tmp_path, "server") as srv:
        api = ShutdownClient(srv.client)
        # The client gives up before the answer; the server has the request all the same.
        try:
            first: httpx.Response | None = srv.client.post(
                "/trigger_async",
                params={"steps": STEPS, "max_n": MAX_N},
                headers={"Idempotency-Key": key},
                timeout=httpx.Timeout(30, read=0.001),  # sent in full, then no wait
            )
        except httpx.ReadTimeout:
            first = None
        wait_for(lambda: wanted in fan_outs(db_url), 60, 0.05, "the first request's fan-out")
        retry = api.trigger_async(STEPS, MAX_N, key=key)
        assert retry.status_code == 200, retry.text
        assert retry.json()["workflow_id"] == wanted
        assert retry.json()["status"] in ("PENDING", "SUCCESS")
        if first is not None:  # it did answer in time: then it was the one that started
            assert (first.status_code, first.json()["workflow_id"]) == (202, wanted)
        assert_ran_once(db_url, tmp_path, wanted, api)
        again = api.trigger_async(STEPS, MAX_N, key=key)  # finished: still the same one
        assert again.status_code == 200, again.text
        assert again.json() == {"workflow_id": wanted, "status": "SUCCESS"}
        assert fan_outs(db_url) == [wanted]


@pytest.mark.slow
def test_bad_keys_are_400_and_a_key_reused_with_other_parameters_is_409(
    db_url: str, tmp_path: Path
) -> None:
    with server(db_url, tmp_path, "server") as srv:
        api = ShutdownClient(srv.client)
        for bad in ("", "a b", "k" * 65, "k/1", "clé", "k,l"):
            answer = srv.client.post(
                "/trigger_async",
                params={"steps": STEPS, "max_n": MAX_N},
                headers=[(b"Idempotency-Key", bad.encode())],  # UTF-8 on the wire
            )
            assert answer.status_code == 400, (bad, answer.text)
            assert "Idempotency-Key must be 1 to 64" in answer.json()["detail"]
        assert fan_outs(db_url) == []  # refused before anything started
        longest = "k" * 64
        workflow_id = api.trigger(STEPS, MAX_N, key=longest)
        assert workflow_id == fastapi_scope_shutdown.KEYED_ID_PREFIX + longest
        for other in ({"steps": STEPS + 1}, {"max_n": MAX_N - 1}, {"executor": "thread"}):
            params: dict[str, Any] = {"steps": STEPS, "max_n": MAX_N, **other}
            answer = srv.client.post(
                "/trigger_async", params=params, headers={"Idempotency-Key": longest}
            )
            assert answer.status_code == 409, answer.text
            body = answer.json()
            assert body["workflow_id"] == workflow_id
            assert "already used with other parameters" in body["detail"]
            assert f"'steps': {STEPS}, 'max_n': {MAX_N}, 'executor': 'process'" in body["detail"]
        assert_ran_once(db_url, tmp_path, workflow_id, api)
        assert fan_outs(db_url) == [workflow_id]


@pytest.mark.slow
def test_the_same_key_after_a_restart_returns_the_same_workflow(
    db_url: str, tmp_path: Path
) -> None:
    key = "across-restarts"
    with server(db_url, tmp_path, "first") as srv:
        api = ShutdownClient(srv.client)
        workflow_id = api.trigger(STEPS, MAX_N, key=key)
        assert_ran_once(db_url, tmp_path, workflow_id, api)
        srv.terminate()
    with server(db_url, tmp_path, "second") as srv:
        answer = ShutdownClient(srv.client).trigger_async(STEPS, MAX_N, key=key)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"workflow_id": workflow_id, "status": "SUCCESS"}
    assert fan_outs(db_url) == [workflow_id]
    assert ledger_runs(tmp_path / "ledger.txt", workflow_id) == dict.fromkeys(range(STEPS), 1)


def _at_once(servers: list[AppServer], key: str) -> list[httpx.Response]:
    """The same keyed trigger sent to every server at the same moment."""
    barrier = threading.Barrier(len(servers))
    answers: list[httpx.Response | None] = [None] * len(servers)

    def send(i: int) -> None:
        barrier.wait(timeout=30)
        answers[i] = ShutdownClient(servers[i].client).trigger_async(STEPS, MAX_N, key=key)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert all(a is not None for a in answers), "a request got no answer"
    return [a for a in answers if a is not None]


@pytest.mark.slow
def test_two_replicas_receiving_one_key_at_once_start_one_fan_out(
    pg_url: str, tmp_path: Path
) -> None:
    keys = [f"replicas-{i}" for i in range(6)]
    with server(pg_url, tmp_path, "a") as a, server(pg_url, tmp_path, "b") as b:
        for key in keys:
            answers = _at_once([a, b], key)
            assert sorted(r.status_code for r in answers) == [200, 202], [r.text for r in answers]
            assert {r.json()["workflow_id"] for r in answers} == {
                fastapi_scope_shutdown.KEYED_ID_PREFIX + key
            }
        api = ShutdownClient(a.client)
        for key in keys:
            assert_ran_once(pg_url, tmp_path, fastapi_scope_shutdown.KEYED_ID_PREFIX + key, api)
    assert fan_outs(pg_url) == sorted(fastapi_scope_shutdown.KEYED_ID_PREFIX + k for k in keys)


def test_in_process_one_key_one_fan_out_bad_keys_400_other_parameters_409(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same contract with DBOS in the test process (the fast tier): the app's own
    lifespan on SQLite, reached through Starlette's TestClient."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv("DBOS_SYSTEM_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("FIB_PROCESSES", "1")
    with TestClient(fastapi_scope_shutdown.app) as client:
        api = ShutdownClient(client)
        first = api.trigger_async(2, 1, key="in-process")
        assert first.status_code == 202, first.text
        again = api.trigger_async(2, 1, key="in-process")
        assert again.status_code == 200, again.text
        assert again.json()["workflow_id"] == first.json()["workflow_id"] == "trigger-in-process"
        other = api.trigger_async(3, 1, key="in-process")
        assert other.status_code == 409, other.text
        bad = api.trigger_async(2, 1, key="no spaces")
        assert bad.status_code == 400, bad.text
        api.wait_success("trigger-in-process", timeout=60)
    assert fan_outs(sqlite_url) == ["trigger-in-process"]
    assert sorted(children(sqlite_url, "trigger-in-process")) == [0, 1]
