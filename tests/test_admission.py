"""Admission control of POST /trigger_async: MAX_QUEUED_STEPS bounds the admitted,
unfinished steps of the whole service (shutdown/admission.py counts them in the system
database). Beyond it: 429 with Retry-After and the reason, nothing started; a retry of an
admitted key is still answered; once the backlog drains, triggers are admitted again.
The bound is the service's: a second replica sees the first one's backlog. The load area
(reliability/overload.py) measures a burst of ten times the bound."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import fastapi_scope_shutdown
from harness.clients import ShutdownClient
from harness.db import query
from harness.env import script_env
from harness.fanout import shutdown_server
from harness.proc import run_script
from harness.server import AppServer

BOUND = 40
# The filler: exactly the bound, its last ten steps fib(30) each in the step threads,
# sharing the GIL: seconds of work, so some step is still unfinished when the next
# request (of the bound's size: refused while the backlog is not 0) comes a few ms
# after the 202.
FILLER_MAX_N = 30


def server(db_url: str, tmp_path: Path, name: str) -> AppServer:
    return shutdown_server(
        db_url,
        tmp_path / f"{name}.log",
        env={"MAX_QUEUED_STEPS": str(BOUND)},
        ready_path="/healthz",
    )


def fan_out_count(db_url: str) -> int:
    sql = "SELECT count(*) FROM dbos.workflow_status WHERE name = %s"
    return int(query(db_url, sql, fastapi_scope_shutdown.fan_out.__qualname__)[0][0])


def assert_refused(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    retry_after = answer.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    body = answer.json()
    assert f"MAX_QUEUED_STEPS={BOUND}" in body["detail"]
    assert body["max_queued_steps"] == BOUND
    assert 1 <= body["backlog"] <= BOUND
    assert body["retry_after"] == int(retry_after)


@pytest.mark.slow
def test_over_the_bound_is_429_with_retry_after_and_admitted_again_once_drained(
    db_url: str, tmp_path: Path
) -> None:
    with server(db_url, tmp_path, "server") as srv:
        api = ShutdownClient(srv.client)
        filler = api.trigger(BOUND, FILLER_MAX_N, executor="thread", key="filler")
        # Full: while any step of it is unfinished, a full-size request is refused,
        # keyed or not, and starts nothing.
        assert_refused(api.trigger_async(BOUND, 0))
        assert_refused(api.trigger_async(BOUND, 0, key="newcomer"))
        assert fan_out_count(db_url) == 1
        # A retry of the admitted request is answered, full or not.
        retry = api.trigger_async(BOUND, FILLER_MAX_N, executor="thread", key="filler")
        assert (retry.status_code, retry.json()["workflow_id"]) == (200, filler)
        # More steps than the bound could never be admitted: 422, not 429.
        too_big = api.trigger_async(BOUND + 1, 0)
        assert too_big.status_code == 422, too_big.text
        assert f"exceeds MAX_QUEUED_STEPS={BOUND}" in too_big.json()["detail"]
        api.wait_success(filler, timeout=180)
        # Drained: the refused key is admitted now, and a full-size request too.
        assert (
            api.trigger(BOUND, 0, key="newcomer")
            == fastapi_scope_shutdown.KEYED_ID_PREFIX + "newcomer"
        )
        api.wait_success(fastapi_scope_shutdown.KEYED_ID_PREFIX + "newcomer", timeout=60)
        api.wait_success(api.trigger(BOUND, 0), timeout=120)
        assert fan_out_count(db_url) == 3


@pytest.mark.slow
def test_the_bound_is_the_services_a_second_replica_sees_the_first_ones_backlog(
    pg_url: str, tmp_path: Path
) -> None:
    with server(pg_url, tmp_path, "a") as a, server(pg_url, tmp_path, "b") as b:
        filler = ShutdownClient(a.client).trigger(BOUND, FILLER_MAX_N, executor="thread")
        assert_refused(ShutdownClient(b.client).trigger_async(BOUND, 0))
        ShutdownClient(b.client).wait_success(filler, timeout=180)
        ShutdownClient(b.client).trigger(BOUND, 0)


@pytest.mark.slow  # the exit of a real process; in the test process: test_fan_out_in_one_process.py
@pytest.mark.usefixtures("sqlite_supported")  # runs on the default SQLite
@pytest.mark.parametrize("value", ["0", "-5", "many", "1000001"])
def test_a_bad_max_queued_steps_fails_fast_with_one_line(tmp_path: Path, value: str) -> None:
    url = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    result = run_script("fastapi_scope_shutdown.py", env=script_env(url, MAX_QUEUED_STEPS=value))
    assert result.returncode == 2
    assert len(result.records) == 1
    assert result.records[0]["message"] == (
        "MAX_QUEUED_STEPS must be a whole number from 1 to "
        f"{fastapi_scope_shutdown.MAX_MAX_QUEUED_STEPS}, got {value!r}"
    )
    assert not (tmp_path / "experiment6.sqlite").exists()
