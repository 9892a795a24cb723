"""integration.py checked against the database: the table's
primary key (run, key) with ``ON CONFLICT DO NOTHING`` is the second line of defence.

A page's recording transaction that runs twice (here: the page workflow run twice for
the same run and the same objects, each run executing the transaction) inserts nothing
the second time, raises nothing, and leaves each key stored once, with the first run's
row. The page workflow, its instance and its datasource are integration.py's own,
driven in a separate process against a real database.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest

from harness import REPO
from harness.db import query
from harness.env import script_env
from harness.proc import parse_json_lines

pytestmark = pytest.mark.slow  # a DBOS process per database

# Builds integration.py's datasource, table and S3Inventory (no S3 client: recording a
# page does not list), launches DBOS, then runs the page workflow twice for one run.
DRIVER = """
import json, sys
from dbos import DBOS
import integration
from lab.config import dbos_config
from lab.logs import setup_logging

setup_logging("integration")
run_id = sys.argv[1]
objects = json.loads(sys.argv[2])
config = dbos_config("integration")
url = config["system_database_url"]
integration.ensure_database(url)
ds, table, kind = integration.create_datasource(url, config["name"])
inventory = integration.S3Inventory(None, ds, table, kind)
DBOS(config=config)
DBOS.launch()
runs = []
for _ in range(2):
    handle = DBOS.start_workflow(inventory.record_page, run_id, "bucket", 1, objects)
    runs.append({"workflow_id": handle.get_workflow_id(), "result": handle.get_result()})
integration.log.info("claims result", extra={"runs": runs})
DBOS.destroy()
"""


def stored_rows(url: str, run_id: str) -> list[tuple[Any, ...]]:
    """(key, size, etag, page_workflow_id) of every row of ``run_id`` in the table."""
    table = "integration.s3_objects" if url.startswith("postgres") else "integration_s3_objects"
    return query(
        url,
        f"SELECT key, size, etag, page_workflow_id FROM {table} WHERE run_id = %s ORDER BY key",
        run_id,
    )


def test_a_page_transaction_run_twice_inserts_nothing_the_second_time(db_url: str) -> None:
    run_id = f"claims-{uuid.uuid4().hex[:12]}"
    objects = [[f"demo/object-{i:05d}.txt", 10 + i, f"etag-{i}"] for i in range(5)]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, run_id, json.dumps(objects)],
        env=script_env(db_url),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Raises nothing: the second run ends like the first.
    raised = [line for line in proc.stderr.splitlines() if "Error" in line.split(":")[0]]
    assert proc.returncode == 0, raised[-1:] or proc.stderr[-3000:]
    records = parse_json_lines(proc.stdout)
    (result,) = [r for r in records if r.get("message") == "claims result"]
    first, second = result["runs"]
    assert first["result"] == {"objects": 5, "inserted": 5}
    assert second["result"] == {"objects": 5, "inserted": 0}  # inserts nothing
    # The transaction body really ran twice (not a replay of the first's checkpoint).
    assert [r["page"] for r in records if r.get("message") == "page transaction"] == [1, 1]

    # Each key stored once, as the first run wrote it.
    assert stored_rows(db_url, run_id) == [
        (key, size, etag, first["workflow_id"]) for key, size, etag in objects
    ]
    # Both page workflows succeeded, each with its own recorded transaction step.
    for run, inserted in ((first, 5), (second, 0)):
        status = query(
            db_url,
            "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s",
            run["workflow_id"],
        )
        assert status == [("SUCCESS",)], (run, status)
        steps = query(
            db_url,
            "SELECT function_name, error IS NULL FROM dbos.operation_outputs "
            "WHERE workflow_uuid = %s",
            run["workflow_id"],
        )
        assert ("record_rows", True) in steps, (run, steps)
        assert run["result"]["inserted"] == inserted
