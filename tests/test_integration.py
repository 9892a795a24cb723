"""integration.py: a paginated S3 listing fanned out on a rate-limited queue, each
object recorded exactly once through a datasource transaction.

S3 is a real S3-protocol server (moto's server mode) on loopback, started here
and seeded with known objects, so a run killed half-way lists the same bucket
when it resumes; one test uses the script's own local server.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

import integration
from harness import REPO
from harness.db import query
from harness.env import script_env
from harness.proc import free_port, parse_json_lines, run_script, wait_for

SECRET = "s3cr3t-" + uuid.uuid4().hex  # must never reach logs or the database
PAGE_WORKFLOW = "S3Inventory.record_page"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for this module."""
    server, endpoint = integration.start_local_s3()
    try:
        yield endpoint
    finally:
        server.stop()


def seed(endpoint: str, count: int) -> tuple[str, dict[str, tuple[int, str]]]:
    """A fresh bucket with ``count`` objects; returns it and key -> (size, etag)."""
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test-key-id",
        aws_secret_access_key=SECRET,
    )
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    objects = {}
    for i in range(count):
        key = f"data/{i:04d}-{uuid.uuid4().hex[:6]}.bin"
        etag = s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(i * 37 % 500 + 1))["ETag"]
        objects[key] = (i * 37 % 500 + 1, etag.strip('"'))
    return bucket, objects


def s3_env(db_url: str, endpoint: str) -> dict[str, str]:
    return script_env(
        db_url,
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="test-key-id",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )


def recorded_rows(url: str, run_id: str) -> list[tuple[str, int, str]]:
    return [
        (key, int(size), etag)
        for key, size, etag in query(
            url, "SELECT key, size, etag FROM integration.s3_objects WHERE run_id = %s", run_id
        )
    ]


def page_rows(url: str, run_id: str) -> list[tuple[Any, ...]]:
    """(id, status, queue, class, config, started ms, completed ms) of the run's pages."""
    return query(
        url,
        "SELECT workflow_uuid, status, queue_name, class_name, config_name, "
        "started_at_epoch_ms, completed_at FROM dbos.workflow_status "
        "WHERE parent_workflow_id = %s AND name = %s ORDER BY started_at_epoch_ms",
        run_id,
        PAGE_WORKFLOW,
    )


def transactions_per_page(records: list[dict[str, Any]]) -> Counter[int]:
    """How often each page's transaction body ran (it logs once per execution)."""
    return Counter(r["page"] for r in records if r.get("message") == "page transaction")


@pytest.mark.slow
def test_every_object_is_recorded_exactly_once_by_page_workflows(
    pg_url: str, s3_endpoint: str
) -> None:
    bucket, objects = seed(s3_endpoint, 45)
    result = run_script(
        "integration.py",
        "--bucket",
        bucket,
        "--page-size",
        "10",
        env=s3_env(pg_url, s3_endpoint),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    s = result.summary
    assert (s["pages"], s["objects"], s["recorded"], s["inserted"]) == (5, 45, 45, 45)
    assert s["local_s3"] is False and s["recovered"] is False
    # The table holds exactly the seeded objects, with their sizes and etags.
    rows = recorded_rows(pg_url, s["workflow_id"])
    assert sorted(rows) == sorted((k, size, etag) for k, (size, etag) in objects.items())
    # Five page workflows, children of the listing workflow, on the queue, each
    # run on the configured instance, each transaction body run once.
    pages = page_rows(pg_url, s["workflow_id"])
    assert len(pages) == 5
    assert {(p[1], p[2], p[3], p[4]) for p in pages} == {
        ("SUCCESS", "integration_queue", "S3Inventory", "s3-inventory")
    }
    assert transactions_per_page(result.records) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    # Each page's transaction is a step of its page workflow.
    steps = query(
        pg_url,
        "SELECT o.function_name FROM dbos.operation_outputs o JOIN dbos.workflow_status w "
        "ON o.workflow_uuid = w.workflow_uuid WHERE w.parent_workflow_id = %s",
        s["workflow_id"],
    )
    assert Counter(name for (name,) in steps) == {"record_rows": 5}
    # Completed page workflows leave no datasource checkpoints behind.
    assert query(pg_url, "SELECT count(*) FROM integration.datasource_outputs") == [(0,)]


@pytest.mark.slow
def test_workflow_state_holds_the_instance_name_but_no_client_and_no_credential(
    pg_url: str, s3_endpoint: str
) -> None:
    from dbos import DBOSClient

    bucket, _ = seed(s3_endpoint, 12)
    result = run_script(
        "integration.py", "--bucket", bucket, "--page-size", "5", env=s3_env(pg_url, s3_endpoint)
    )
    assert result.returncode == 0, result.stderr
    run_id = result.summary["workflow_id"]
    client = DBOSClient(system_database_url=pg_url)
    try:
        pages = client.list_workflows(parent_workflow_id=run_id, name=PAGE_WORKFLOW)
        listing = client.list_workflows(workflow_ids=[run_id])[0]
    finally:
        client.destroy()
    # `self` is not serialized: DBOS records the class and the instance's name.
    assert len(pages) == 3
    for page in pages:
        assert (page.class_name, page.config_name) == ("S3Inventory", "s3-inventory")
        # (run_id, bucket, page number, objects): no instance, no client.
        assert page.input is not None
        assert [type(a).__name__ for a in page.input["args"]] == ["str", "str", "int", "list"]
    assert listing.input is not None and listing.input["args"] == (bucket, 5)

    # The secret key is nowhere: not in the output, not in any text column.
    assert SECRET not in result.stdout + result.stderr
    columns = query(
        pg_url,
        "SELECT table_schema, table_name, column_name FROM information_schema.columns "
        "WHERE table_schema IN ('dbos', 'integration') AND data_type = 'text'",
    )
    assert len(columns) > 20
    scanned = 0
    for schema, table, column in columns:
        for (value,) in query(pg_url, f'SELECT "{column}" FROM {schema}.{table}'):
            if value is None:
                continue
            scanned += 1
            assert SECRET not in value, f"{schema}.{table}.{column}"
            try:  # pickled values are stored base64-encoded
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                continue
            assert SECRET.encode() not in decoded, f"{schema}.{table}.{column}"
    assert scanned > 50


@pytest.mark.slow
def test_crash_right_after_a_page_commit_resumes_without_running_it_again(
    pg_url: str, s3_endpoint: str
) -> None:
    bucket, objects = seed(s3_endpoint, 40)
    env = s3_env(pg_url, s3_endpoint)
    args = ("--bucket", bucket, "--page-size", "10", "--concurrency", "1")
    crashed = run_script("integration.py", *args, "--crash-after-pages", "2", env=env)
    assert crashed.returncode == 3, crashed.stdout[-3000:] + crashed.stderr
    crash = crashed.messages("crashing")[0]
    crashed_page = crash["workflow_id"]
    run_id = crashed.messages("listed page")[0]["workflow_id"]
    # Two pages committed; the second one's checkpoint is in the datasource's
    # table, committed with its rows, but DBOS had not recorded the step yet.
    assert len(recorded_rows(pg_url, run_id)) == 20
    assert query(pg_url, "SELECT workflow_id FROM integration.datasource_outputs") == [
        (crashed_page,)
    ]
    assert query(
        pg_url,
        "SELECT count(*) FROM dbos.operation_outputs WHERE workflow_uuid = %s",
        crashed_page,
    ) == [(0,)]
    assert query(
        pg_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", crashed_page
    ) == [("PENDING",)]

    resumed = run_script("integration.py", *args, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    s = resumed.summary
    assert s["workflow_id"] == run_id and s["recovered"] is True
    assert (s["pages"], s["objects"], s["recorded"], s["inserted"]) == (4, 40, 40, 40)
    rows = recorded_rows(pg_url, run_id)
    assert sorted(rows) == sorted((k, size, etag) for k, (size, etag) in objects.items())
    # Every page's transaction ran exactly once over both processes: the crashed
    # page's result came back from its checkpoint (10 rows), not from a re-run.
    both = transactions_per_page(crashed.records) + transactions_per_page(resumed.records)
    assert both == {1: 1, 2: 1, 3: 1, 4: 1}
    replayed = [r for r in resumed.messages("page recorded") if r["workflow_id"] == crashed_page]
    assert [r["inserted"] for r in replayed] == [10]
    # Pages listed before the crash were not listed again.
    assert len(crashed.messages("listed page")) + len(resumed.messages("listed page")) == 4
    assert {r[1] for r in page_rows(pg_url, run_id)} == {"SUCCESS"}


@pytest.mark.slow
def test_sigkill_midway_then_rerun_ends_with_every_object_once(
    pg_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    bucket, objects = seed(s3_endpoint, 40)
    env = s3_env(pg_url, s3_endpoint)
    args = ["--bucket", bucket, "--page-size", "5", "--concurrency", "2", "--page-seconds", "0.3"]
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "integration.py"), *args],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def some_pages_recorded() -> bool:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                (count,) = query(pg_url, "SELECT count(*) FROM integration.s3_objects")[0]
            except Exception:  # noqa: BLE001 - the table does not exist yet
                return False
            return count >= 10

        wait_for(some_pages_recorded, 60, 0.05, "two pages to be recorded")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    (before,) = query(pg_url, "SELECT count(*) FROM integration.s3_objects")[0]
    assert 10 <= before < 40, "the kill must land in the middle of the run"
    assert before % 5 == 0, "a page is recorded whole or not at all"

    resumed = run_script("integration.py", *args, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    s = resumed.summary
    assert s["recovered"] is True
    assert (s["pages"], s["objects"], s["recorded"], s["inserted"]) == (8, 40, 40, 40)
    rows = recorded_rows(pg_url, s["workflow_id"])
    assert sorted(rows) == sorted((k, size, etag) for k, (size, etag) in objects.items())
    assert query(pg_url, "SELECT count(*) FROM integration.s3_objects") == [(40,)]
    killed = parse_json_lines(log_path.read_text())
    assert {r.get("workflow_id") for r in killed if r.get("message") == "listed page"} == {
        s["workflow_id"]
    }


@pytest.mark.slow
def test_rate_and_concurrency_limits_hold_in_workflow_status(pg_url: str, s3_endpoint: str) -> None:
    bucket, _ = seed(s3_endpoint, 30)
    result = run_script(
        "integration.py",
        "--bucket",
        bucket,
        "--page-size",
        "5",
        "--concurrency",
        "2",
        "--rate-limit",
        "3",
        "--rate-period",
        "2",
        "--page-seconds",
        "0.5",
        env=s3_env(pg_url, s3_endpoint),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    s = result.summary
    pages = page_rows(pg_url, s["workflow_id"])
    assert len(pages) == 6
    starts = sorted(int(p[5]) for p in pages)
    # Most starts in any 2 s window: at most 3, and the limit did bind.
    per_window = max(bisect.bisect_left(starts, t + 2000) - i for i, t in enumerate(starts))
    assert per_window == 3
    # Most page workflows running at once: at most 2, and the limit did bind.
    running = best = 0
    for _, delta in sorted([(int(p[5]), 1) for p in pages] + [(int(p[6]), -1) for p in pages]):
        running += delta
        best = max(best, running)
    assert best == 2
    assert (s["max_started_per_window"], s["max_concurrent"]) == (3, 2)
    # 6 pages at 3 per 2 s: the last ones cannot start before 2 s after the first.
    assert starts[-1] - starts[0] >= 2000


@pytest.mark.slow
def test_static_methods_holding_the_client_fail_with_a_pickling_error(
    pg_url: str, s3_endpoint: str
) -> None:
    bucket, _ = seed(s3_endpoint, 3)
    result = run_script(
        "integration.py",
        "--bucket",
        bucket,
        "--client-holder",
        "static",
        env=s3_env(pg_url, s3_endpoint),
    )
    assert result.returncode == 1
    error = result.records[-1]
    assert error["severity"] == "ERROR"
    assert error["message"] == (
        "static-method pattern cannot start: PicklingError: Can't pickle "
        "<class 'botocore.client.S3'>: attribute lookup S3 on botocore.client failed"
    )
    # DBOS failed while serializing the workflow's arguments, the client among them.
    serializing = [r for r in result.records if r["message"].startswith("Error serializing object")]
    assert len(serializing) == 1
    assert "<botocore.client.S3 object at" in serializing[0]["message"]
    assert "_pickle.PicklingError" in serializing[0]["exc_info"]
    # Nothing was started.
    assert query(pg_url, "SELECT count(*) FROM dbos.workflow_status") == [(0,)]


def test_missing_bucket_fails_with_one_line_and_records_nothing(
    pg_url: str, s3_endpoint: str
) -> None:
    result = run_script(
        "integration.py", "--bucket", "no-such-bucket-here", env=s3_env(pg_url, s3_endpoint)
    )
    assert result.returncode == 2
    assert len(result.records) == 1, result.stdout
    assert result.records[0]["severity"] == "ERROR"
    assert result.records[0]["message"] == (
        f"bucket 'no-such-bucket-here' does not exist at {s3_endpoint}"
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert query(
        pg_url,
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_schema IN ('dbos', 'integration')",
    ) == [(0,)]


@pytest.mark.slow
def test_unreachable_endpoint_fails_with_one_line(sqlite_url: str, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_script("integration.py", env=s3_env(sqlite_url, endpoint), cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.records) == 1, result.stdout
    message = result.records[0]["message"]
    assert message.startswith(f"cannot reach the S3 endpoint {endpoint}: Could not connect")
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "experiment6.sqlite").exists()


@pytest.mark.slow
def test_without_an_endpoint_a_local_s3_server_is_seeded_and_listed(tmp_path: Path) -> None:
    result = run_script(
        "integration.py", "--objects", "30", "--page-size", "10", env=script_env(), cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    started = result.messages("started a local S3 server (moto) and seeded a demo bucket")
    assert len(started) == 1 and started[0]["endpoint"].startswith("http://127.0.0.1:")
    s = result.summary
    assert (s["local_s3"], s["pages"], s["objects"], s["recorded"], s["inserted"]) == (
        True,
        3,
        30,
        30,
        30,
    )
    db = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    assert query(
        db,
        "SELECT count(*), count(DISTINCT key) FROM integration_s3_objects WHERE run_id = %s",
        s["workflow_id"],
    ) == [(30, 30)]


@pytest.mark.slow  # the exit of a real process; in the test process: test_paginated_inventory.py
def test_bad_flags_are_rejected_before_anything_runs(tmp_path: Path) -> None:
    result = run_script("integration.py", "--page-size", "0", env=script_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert "--page-size must be between 1 and 1000" in result.stderr
    assert not (tmp_path / "experiment6.sqlite").exists()
