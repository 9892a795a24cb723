"""fastapi_scope_cache.py's credentials cache and what DBOS stores, checked against the database.

- The credentials cache fetches once per process even when two runs need the token at
  the same moment: the lock covers check-then-fetch.
- What DBOS 3.4 writes to the system database: workflow inputs, step outputs (and
  errors) and workflow results, not step arguments. A value a step only takes as an
  argument is in no table; a value passed to a child workflow is stored (its input), and
  so is a value a step returns or raises, and a workflow's result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness import REPO
from harness.clients import CacheClient
from harness.db import query, secrets_in_database
from harness.env import script_env
from harness.proc import wait_for
from harness.server import cache_server

# get_credentials() calls per default run: get_users + 5 pages + 15 steps.
CALLS_PER_RUN = 1 + 5 + 15


# --- one fetch for two runs at once ------------------------------------------


@pytest.mark.slow
def test_two_runs_started_at_once_in_a_fresh_process_fetch_the_credentials_once(
    pg_url: str, tmp_path: Path
) -> None:
    secret = f"cred-{uuid.uuid4().hex}"
    with cache_server(pg_url, tmp_path / "s.log", secret) as server:
        assert CacheClient(server.client).cache() == {"fetches": 0, "hits": 0, "cached": False}

        def start(_: int) -> str:
            # One connection per thread: both requests in flight together.
            with httpx.Client(base_url=server.base_url, timeout=30) as http:
                return CacheClient(http).start()

        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(start, range(2)))

        def finished() -> bool:
            rows = query(
                pg_url,
                "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = ANY(%s)",
                runs,
            )
            return len(rows) == 2 and all(status == "SUCCESS" for (status,) in rows)

        wait_for(finished, 60, 0.2, "both get_users runs to succeed")
        cache = CacheClient(server.client).cache()
    fetched = [r for r in server.records() if r.get("message") == "credentials fetched"]

    # The runs overlapped where it matters: both had started before either had its token
    # (a run creates its first page workflow only after get_credentials() returned).
    started = query(
        pg_url,
        "SELECT max(created_at) FROM dbos.workflow_status WHERE workflow_uuid = ANY(%s)",
        runs,
    )[0][0]
    first_page = query(
        pg_url,
        "SELECT min(created_at) FROM dbos.workflow_status WHERE parent_workflow_id = ANY(%s)",
        runs,
    )[0][0]
    assert started < first_page, (started, first_page)
    assert cache == {"fetches": 1, "hits": 2 * CALLS_PER_RUN - 1, "cached": True}
    assert len(fetched) == 1, fetched  # one provider call in the log, too


# --- what DBOS stores: workflow inputs, step outputs, results; not step arguments

# A workflow that reads its values from process memory (as get_users reads its token)
# and hands each on one way: only as a step's argument, to a step that returns it, to a
# step whose exception carries it, as a child workflow's argument, as its own result.
# Nothing is an input of the parent itself.
PROGRAM = """
import json, sys
from dbos import DBOS

values = json.loads(sys.argv[1])

@DBOS.step()
def uses(value: str) -> int:
    return len(value)

@DBOS.step()
def echoes(value: str) -> str:
    return value

@DBOS.step()
def rejects(value: str) -> None:
    raise ValueError(f"rejected {value}")

@DBOS.workflow()
def child(value: str) -> int:
    return len(value)

@DBOS.workflow()
def parent() -> dict:
    try:
        rejects(values["raised"])
    except ValueError:
        pass
    return {
        "lengths": [uses(values["step-only"]), len(echoes(values["returned"])),
                    child(values["child"])],
        "result": values["result"],
    }

DBOS(config={"name": "experiment6-claims-step-args", "system_database_url": sys.argv[2]})
DBOS.launch()
handle = DBOS.start_workflow(parent)
print(json.dumps({"workflow_id": handle.get_workflow_id(), "output": handle.get_result()}))
DBOS.destroy()
"""


@pytest.mark.slow
def test_a_step_argument_is_stored_nowhere_but_workflow_inputs_and_step_outputs_are(
    db_url: str,
) -> None:
    names = ("step-only", "returned", "raised", "child", "result")
    values = {name: f"{name}-{uuid.uuid4().hex}" for name in names}
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, json.dumps(values), db_url],
        env=script_env(db_url),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.splitlines()[-1])
    lengths = [len(values[name]) for name in ("step-only", "returned", "child")]
    assert run["output"] == {"lengths": lengths, "result": values["result"]}

    # The parent recorded each call (the values: see below).
    calls = query(
        db_url,
        "SELECT function_name, error IS NOT NULL FROM dbos.operation_outputs "
        "WHERE workflow_uuid = %s",
        run["workflow_id"],
    )
    assert {("rejects", True), ("uses", False), ("echoes", False), ("child", False)} <= set(
        calls
    ), calls
    found = secrets_in_database(db_url, set(values.values()))
    # table name without the schema (Postgres: dbos.<table>, SQLite: <table>)
    where = {
        name: {table.rsplit(".", 1)[-1] for table, hits in found.items() if value in hits}
        for name, value in values.items()
    }
    assert where == {
        "step-only": set(),  # in no table, not even decoded from base64
        "returned": {"operation_outputs"},  # the step's output
        "raised": {"operation_outputs"},  # the step's error
        "child": {"workflow_input"},  # the child workflow's input
        "result": {"workflow_output"},  # the workflow's result
    }
