"""fastapi_scope_cache.py over HTTP: a per-process credentials cache that never
reaches the system database, and get_users surviving a SIGKILL."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import pickle
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fastapi_scope_cache as app
from harness import REPO
from harness.clients import CacheClient
from harness.db import query, workflow_rows
from harness.env import script_env
from harness.proc import free_port, parse_json_lines, wait_for
from harness.server import AppServer, cache_server

TARGET = "fastapi_scope_cache:app"
ALL_USERS = {(page, f"user-{page}-{n}") for page in range(1, 6) for n in range(1, 4)}
# get_credentials() calls per default run: get_users + 5 pages + 15 steps.
CALLS_PER_RUN = 1 + 5 + 15


def finished(server: AppServer, workflow_id: str, timeout: float = 60) -> dict[str, Any]:
    return CacheClient(server.client).wait_finished(workflow_id, timeout)


def run_get_users(server: AppServer, **params: Any) -> tuple[str, dict[str, Any]]:
    return CacheClient(server.client).run(**params)


# --- reading what DBOS stored ---------------------------------------------------


def _tables(url: str) -> list[str]:
    if url.startswith("sqlite"):
        rows = query(url, "SELECT name FROM sqlite_master WHERE type = 'table'")
        return [f'"{name}"' for (name,) in rows]
    rows = query(
        url,
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    return [f'"{schema}"."{name}"' for schema, name in rows]


def _decoded(text: str) -> Iterator[str]:
    """What DBOS's serializers make of a stored value: base64 of a pickle
    (``py_pickle``, the default) or JSON (``portable_json``)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if raw:
        yield raw.decode("utf-8", errors="replace")
        try:
            yield repr(pickle.loads(raw))
        except Exception:  # noqa: BLE001 - not every base64-looking value is a pickle
            pass
    try:
        yield json.dumps(json.loads(text), ensure_ascii=False)
    except (ValueError, TypeError):
        pass


def stored_values(url: str) -> tuple[list[str], list[str]]:
    """Every non-NULL cell of every table in the system database: (raw, decoded)."""
    raw: list[str] = []
    decoded: list[str] = []
    for table in _tables(url):
        for row in query(url, f"SELECT * FROM {table}"):
            for cell in row:
                if cell is None:
                    continue
                text = cell.decode("utf-8", "replace") if isinstance(cell, bytes) else str(cell)
                raw.append(text)
                decoded.extend(_decoded(text))
    return raw, decoded


def described_users(url: str, workflow_id: str) -> list[tuple[int, str]]:
    """(page, user) of every recorded describe_user output under ``workflow_id``."""
    rows = query(
        url,
        "SELECT output FROM dbos.operation_outputs "
        "WHERE workflow_uuid LIKE %s AND function_name = 'describe_user'",
        f"{workflow_id}-%",
    )
    outputs = [pickle.loads(base64.b64decode(output)) for (output,) in rows]
    return sorted((o["page"], o["user"]) for o in outputs)


def assert_secret_absent(url: str, log_text: str, secret: str) -> None:
    raw, decoded = stored_values(url)
    # The decoding reaches inside what DBOS stores: user ids appear only in pickled
    # step outputs, never in the raw text.
    assert any("user-5-3" in text for text in decoded)
    assert not any("user-5-3" in text for text in raw)
    assert any("users_described" in text for text in decoded)
    assert not [t for t in raw + decoded if secret in t]
    assert secret not in log_text
    # What the logs may carry: the fingerprint.
    assert hashlib.sha256(secret.encode()).hexdigest()[:8] in log_text


def body_runs(records: list[dict[str, Any]], workflow_id: str) -> list[tuple[int, str]]:
    return [
        (r["page"], r["user"])
        for r in records
        if r.get("message") == "describe_user" and r["workflow_id"].startswith(workflow_id)
    ]


# --- tests -----------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_fetch_credentials_once_and_a_restart_fetches_again(
    pg_url: str, tmp_path: Path
) -> None:
    env = script_env(pg_url)
    with AppServer(TARGET, env, tmp_path / "first.log") as first:
        assert first.client.get("/cache").json() == {"fetches": 0, "hits": 0, "cached": False}
        wf1, view1 = run_get_users(first)
        assert view1["status"] == "SUCCESS"
        assert view1["result"] == {"pages": 5, "users_per_page": 3, "users_described": 15}
        assert first.client.get("/cache").json() == {
            "fetches": 1,
            "hits": CALLS_PER_RUN - 1,
            "cached": True,
        }
        wf2, view2 = run_get_users(first)
        assert view2["result"]["users_described"] == 15
        assert first.client.get("/cache").json() == {
            "fetches": 1,
            "hits": 2 * CALLS_PER_RUN - 1,
            "cached": True,
        }
        assert first.terminate() in (0, -signal.SIGTERM)
    # The workflow tree is in the database: 5 child workflows, 3 steps each.
    for workflow_id in (wf1, wf2):
        assert workflow_rows(pg_url, workflow_id)["name"] == "get_users"
        children = query(
            pg_url,
            "SELECT name, status FROM dbos.workflow_status WHERE parent_workflow_id = %s",
            workflow_id,
        )
        assert children == [("get_users_page", "SUCCESS")] * 5
        assert described_users(pg_url, workflow_id) == sorted(ALL_USERS)

    with AppServer(TARGET, env, tmp_path / "second.log") as second:
        assert second.client.get("/cache").json() == {"fetches": 0, "hits": 0, "cached": False}
        _, view3 = run_get_users(second, pages=1, users_per_page=2)
        assert view3["result"]["users_described"] == 2
        assert second.client.get("/cache").json() == {
            "fetches": 1,
            "hits": (1 + 1 + 2) - 1,
            "cached": True,
        }


@pytest.mark.slow
def test_the_secret_reaches_neither_the_system_database_nor_the_logs(
    pg_url: str, tmp_path: Path
) -> None:
    secret = f"cred-{uuid.uuid4().hex}"
    with cache_server(pg_url, tmp_path / "s.log", secret) as server:
        _, view = run_get_users(server)
        assert view["status"] == "SUCCESS"
        cache = server.client.get("/cache")
        assert secret not in cache.text
        assert server.terminate() in (0, -signal.SIGTERM)
    assert_secret_absent(pg_url, server.log_text(), secret)


@pytest.mark.slow
def test_sigkill_mid_run_resumes_get_users_without_describing_users_again(
    pg_url: str, tmp_path: Path
) -> None:
    secret = f"cred-{uuid.uuid4().hex}"
    env = script_env(pg_url, CREDENTIALS_SECRET=secret)
    first = AppServer(TARGET, env, tmp_path / "first.log")
    with first:
        started = first.client.post("/trigger_async", params={"step_seconds": 0.3})
        assert started.status_code == 202
        workflow_id = started.json()["workflow_id"]
        wait_for(
            lambda: len(described_users(pg_url, workflow_id)) >= 4,
            30,
            0.05,
            "four users described",
        )
        first.kill()
    checkpointed = set(described_users(pg_url, workflow_id))
    assert 4 <= len(checkpointed) < 15
    assert workflow_rows(pg_url, workflow_id)["status"] == "PENDING"
    before = body_runs(first.records(), workflow_id)

    second = AppServer(TARGET, env, tmp_path / "second.log")
    with second:
        view = finished(second, workflow_id)
        assert view["status"] == "SUCCESS"
        assert view["result"]["users_described"] == 15
        # The resumed code fetched the token again in the new process.
        assert second.client.get("/cache").json()["fetches"] == 1
        assert second.terminate() in (0, -signal.SIGTERM)
    after = body_runs(second.records(), workflow_id)

    # Each user's output is recorded exactly once.
    assert described_users(pg_url, workflow_id) == sorted(ALL_USERS)
    # Checkpointed users ran before the kill and not after it; the rest ran after it.
    assert checkpointed <= set(before)
    assert not checkpointed & set(after)
    assert set(after) == ALL_USERS - checkpointed
    assert len(after) == len(set(after))
    # At most the one step that was in flight at the kill ran in both processes.
    assert len(set(before) - checkpointed) <= 1
    assert len(before) == len(set(before))
    assert_secret_absent(pg_url, first.log_text() + second.log_text(), secret)


@pytest.mark.slow
def test_python_script_on_sqlite_serves_rejects_bad_parameters_and_keeps_serving(
    sqlite_url: str, tmp_path: Path
) -> None:
    server = AppServer.script(
        "fastapi_scope_cache.py", script_env(sqlite_url), tmp_path / "server.log"
    )
    with server:
        bad: list[tuple[dict[str, Any], str]] = [
            ({"pages": 0}, "pages"),
            ({"pages": app.MAX_PAGES + 1}, "pages"),
            ({"users_per_page": "three"}, "users_per_page"),
            ({"users_per_page": app.MAX_USERS_PER_PAGE + 1}, "users_per_page"),
            ({"step_seconds": app.MAX_STEP_SECONDS + 0.1}, "step_seconds"),
            ({"step_seconds": "nan"}, "step_seconds"),
        ]
        for params, name in bad:
            answer = server.client.post("/trigger_async", params=params)
            assert answer.status_code == 422, (params, answer.text)
            assert [e["loc"] for e in answer.json()["detail"]] == [["query", name]]
        assert query(sqlite_url, "SELECT count(*) FROM dbos.workflow_status") == [(0,)]
        schema = server.client.get("/openapi.json").json()
        limits = {
            p["name"]: (p["schema"].get("minimum"), p["schema"].get("maximum"))
            for p in schema["paths"]["/trigger_async"]["post"]["parameters"]
        }
        assert limits == {"pages": (1, 10), "users_per_page": (1, 10), "step_seconds": (0, 0.5)}

        workflow_id, view = run_get_users(server)
        assert view["result"]["users_described"] == 15
        assert described_users(sqlite_url, workflow_id) == sorted(ALL_USERS)
        assert server.client.get("/cache").json()["fetches"] == 1
        missing = server.client.get("/workflows/no-such-workflow")
        assert missing.status_code == 404 and "no-such-workflow" in missing.json()["detail"]


@pytest.mark.slow  # the exit of a real process; in the test process: test_credentials_cache.py
def test_malformed_database_url_fails_startup_with_one_error_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "uvicorn", TARGET, "--port", str(free_port())],
        env=script_env("postgres//nowhere"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    errors = [r for r in parse_json_lines(proc.stdout) if r["severity"] == "ERROR"]
    assert len(errors) == 1 and "not a database URL" in errors[0]["message"]
    assert proc.stderr == "" and "Traceback" not in proc.stdout
