"""Secrets stay out of logs and the system database; /shutdown is guarded; the container
runs as non-root (reliability/secrets.py). After every test of the suite, conftest.py
also scans that test's logs and databases for every secret handed to a script."""

from __future__ import annotations

import base64
import contextvars
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.env import (
    SecretWatch,
    no_secret_leaks,
    record_output,
    remember_secret,
    remember_secrets,
    script_env,
    secrets_in,
)
from reliability import secrets
from reliability.core import Context, quick_context


@pytest.fixture
def reliability_ctx(pg_server: str, tmp_path: Path) -> Iterator[Context]:
    with quick_context(pg_server, tmp_path) as ctx:
        yield ctx


def test_the_scan_sees_a_secret_as_is_and_inside_base64_pickles() -> None:
    secret = "a-secret-5f0c2b9e"
    assert secrets_in(f'{{"token": "{secret}"}}', {secret}) == {secret}
    stored = base64.b64encode(pickle.dumps({"args": (secret,)})).decode()
    assert secret not in stored  # a plain search would miss it
    assert secrets_in(f"('wf-1', '{stored}')", {secret}) == {secret}
    assert secrets_in("nothing here, not even " + secret[:-1], {secret}) == set()


def test_a_watch_fails_on_a_secret_in_an_output_or_a_log_and_answers_for_the_outer_one(
    tmp_path: Path, secret_watch: SecretWatch
) -> None:
    outer_secret, inner_secret = "outer-secret-7d1e", "inner-secret-93ab"
    with pytest.raises(AssertionError, match="output 0"), no_secret_leaks() as outer:
        outer.remember(outer_secret)
        with pytest.raises(AssertionError, match="s.log"), no_secret_leaks(tmp_path) as inner:
            remember_secrets(script_env(None, SHUTDOWN_TOKEN=inner_secret))
            (tmp_path / "s.log").write_text(f'{{"token": "{outer_secret}"}}\n')
        assert inner.secrets == {outer_secret, inner_secret}
        (tmp_path / "s.log").unlink()
        record_output(f"leaked {inner_secret}")  # the inner one's secret, passed up
    assert outer.own_secrets == {outer_secret, inner_secret}
    assert {outer_secret, inner_secret} <= secret_watch.own_secrets  # the test's own watch
    contextvars.Context().run(remember_secret, "no-watch-is-open")  # nowhere to go: no error
    assert "no-watch-is-open" not in secret_watch.secrets


@pytest.mark.slow
def test_the_scan_finds_a_secret_a_workflow_took_as_its_argument(reliability_ctx) -> None:
    # The control: without it, "no secret found" could mean "the scan sees nothing".
    assert secrets.control(reliability_ctx)


@pytest.mark.slow
def test_shutdown_refuses_every_near_miss_token_and_only_the_right_one_stops_the_server(
    reliability_ctx,
) -> None:
    guard = secrets.exercise_shutdown_guard(reliability_ctx)
    assert guard["answers"] == [401] * len(secrets.near_misses("t"))
    assert all(guard["serving_after"])
    assert guard["right_status"] == 202
    assert guard["exit_code"] in (0, -15)  # uvicorn re-raises SIGTERM: a clean stop
    assert set(guard["disabled_answers"]) == {403} and guard["disabled_serving"]


@pytest.mark.slow
def test_apps_given_secrets_leave_none_in_logs_outputs_or_databases(reliability_ctx) -> None:
    ran = secrets.exercise_apps(reliability_ctx)
    assert ran["cache_stats"]["fetches"] == 1 and ran["cache_stats"]["hits"] > 1
    assert ran["integration_exit"] == 0 and ran["scope_exit"] == 0
    counts = secrets.scan(reliability_ctx)
    assert counts["secrets"] >= 4  # credentials, AWS key id and secret, DB password
    assert counts["files"] >= 2 and counts["rows"] > 100  # the scan had something to read
    assert counts["leaky_logs"] == 0
    assert counts["leaky_rows"] == 0


def test_the_container_image_runs_as_a_non_root_numeric_user() -> None:
    user = secrets.container_user()
    assert user.split(":")[0].isdigit() and not secrets.is_root(user)
