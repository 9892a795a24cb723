"""integration.py in the test process, against its own local S3 server (moto, in this
process too): every listed object is recorded exactly once, by one transaction per
page run as a child workflow on ``integration_queue`` under its limits; a class whose
static methods take the S3 client cannot start a workflow, since DBOS must pickle the
client as an input."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import pytest
from dbos import DBOS

import integration
from harness.db import query
from harness.inprocess import in_process, refused_flags, run_main, use_environment  # noqa: F401

pytestmark = pytest.mark.usefixtures("in_process")


def test_every_listed_object_is_recorded_once_by_one_transaction_per_page(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, pg_url)
    monkeypatch.setattr(integration, "crash_after_pages", None)
    result = run_main(integration.main, "--objects", "30", "--page-size", "10")
    s = result.summary
    assert (s["local_s3"], s["recovered"], s["pages"], s["objects"]) == (True, False, 3, 30)
    assert (s["recorded"], s["inserted"]) == (30, 30)
    assert s["max_started_per_window"] <= s["rate_limit"]["limit"]
    assert s["max_concurrent"] <= s["concurrency"]
    transactions = Counter(r["page"] for r in result.messages("page transaction"))
    assert sorted(transactions.values()) == [1, 1, 1]
    assert query(
        pg_url,
        "SELECT count(*), count(DISTINCT key) FROM integration.s3_objects WHERE run_id = %s",
        s["workflow_id"],
    ) == [(30, 30)]
    pages = query(
        pg_url,
        "SELECT status, queue_name, class_name, config_name FROM dbos.workflow_status "
        "WHERE parent_workflow_id = %s",
        s["workflow_id"],
    )
    assert pages == [("SUCCESS", integration.QUEUE, "S3Inventory", integration.INSTANCE_NAME)] * 3


def test_static_methods_holding_the_client_cannot_start_a_workflow(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, sqlite_url)
    server, endpoint = integration.start_local_s3()
    try:
        s3 = integration.s3_client(
            endpoint, integration.IntegrationSettings.load().s3_region, local=True
        )
        integration.seed_demo_bucket(s3, "static-demo", 3)
        DBOS(config={"name": "experiment6-integration", "system_database_url": sqlite_url})
        DBOS.launch()
        with pytest.raises(
            pickle.PicklingError, match=r"Can't pickle <class 'botocore.client.S3'>"
        ):
            DBOS.start_workflow(integration.StaticInventory.inventory, s3, "static-demo", 10)
    finally:
        server.stop()
    assert query(sqlite_url, "SELECT count(*) FROM dbos.workflow_status") == [(0,)]


def test_bad_flags_end_the_run_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    error = refused_flags(monkeypatch, tmp_path, integration.main, "--page-size", "0")
    assert "--page-size must be between 1 and 1000" in error
