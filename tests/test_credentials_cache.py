"""fastapi_scope_cache.py in the test process: the credentials are fetched once per
process (every later use is a cache hit), fetched again after a restart, and reach
neither the system database nor the logs (only their fingerprint does); get_users is
a tree of one child workflow per page with one step per user."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

import fastapi_scope_cache as app
from harness.clients import CacheClient
from harness.db import query, secrets_in_database, workflow_rows
from harness.inprocess import in_process, run_to_exit, served, use_environment  # noqa: F401

pytestmark = pytest.mark.usefixtures("in_process")

FAST = {"step_seconds": 0}
# get_credentials() calls per default run (5 pages of 3 users): get_users + 5 pages + 15 steps.
CALLS_PER_RUN = 1 + 5 + 15
ALL_USERS = sorted((page, f"user-{page}-{n}") for page in range(1, 6) for n in range(1, 4))


def test_one_fetch_per_process_and_the_secret_stays_out_of_rows_and_logs(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"cred-{uuid.uuid4().hex}"
    use_environment(monkeypatch, pg_url, CREDENTIALS_SECRET=secret)
    monkeypatch.setattr(app, "cache_stats", {"fetches": 0, "hits": 0})
    with served(app.app) as (client, output):
        api = CacheClient(client)
        assert api.cache() == {"fetches": 0, "hits": 0, "cached": False}
        wf1, view1 = api.run(timeout=30, **FAST)
        assert view1["result"] == {"pages": 5, "users_per_page": 3, "users_described": 15}
        assert api.cache() == {"fetches": 1, "hits": CALLS_PER_RUN - 1, "cached": True}
        _, view2 = api.run(timeout=30, **FAST)
        assert view2["result"]["users_described"] == 15
        assert api.cache() == {"fetches": 1, "hits": 2 * CALLS_PER_RUN - 1, "cached": True}
        assert secret not in client.get("/cache").text
    assert workflow_rows(pg_url, wf1)["name"] == "get_users"
    pages = "SELECT name, status FROM dbos.workflow_status WHERE parent_workflow_id = %s"
    assert query(pg_url, pages, wf1) == [("get_users_page", "SUCCESS")] * 5
    described = [(r["page"], r["user"]) for r in output.result().messages("describe_user")]
    assert sorted(described) == sorted(ALL_USERS * 2)  # each user once per run
    assert secrets_in_database(pg_url, {secret}) == {}
    log_text = output.stream.getvalue()
    assert secret not in log_text and app.fingerprint(secret) in log_text

    monkeypatch.setattr(app, "cache_stats", {"fetches": 0, "hits": 0})  # a new process
    with served(app.app) as (client, _):
        api = CacheClient(client)
        assert api.cache() == {"fetches": 0, "hits": 0, "cached": False}
        _, view3 = api.run(timeout=30, pages=1, users_per_page=2, **FAST)
        assert view3["result"]["users_described"] == 2
        assert api.cache() == {"fetches": 1, "hits": (1 + 1 + 2) - 1, "cached": True}


def test_parameters_outside_the_limits_are_a_422_and_start_nothing(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, sqlite_url)
    bad = [
        ({"pages": 0}, "pages"),
        ({"pages": app.MAX_PAGES + 1}, "pages"),
        ({"users_per_page": "three"}, "users_per_page"),
        ({"step_seconds": "nan"}, "step_seconds"),
    ]
    with served(app.app) as (client, _):
        for params, name in bad:
            answer = client.post("/trigger_async", params=params)
            assert answer.status_code == 422, (params, answer.text)
            assert [e["loc"] for e in answer.json()["detail"]] == [["query", name]]
        assert query(sqlite_url, "SELECT count(*) FROM dbos.workflow_status") == [(0,)]
        missing = client.get("/workflows/no-such-workflow")
        assert missing.status_code == 404 and "no-such-workflow" in missing.json()["detail"]


def test_a_malformed_database_url_ends_startup_with_one_error_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_environment(monkeypatch, "postgres//nowhere")

    def serve_once() -> None:
        with TestClient(app.app):  # the lifespan: launch DBOS, then stop it
            pass

    result = run_to_exit(serve_once)
    assert "not a database URL" in result.failure() and result.stderr == ""
