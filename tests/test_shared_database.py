"""Experiments share one system database without disturbing each other.

Each experiment is its own DBOS application (``experiment6-<name>``): recovery
only takes the pending workflows of its own application, so one script never
resumes (or trips over) another script's interrupted work. The ``dbos`` CLI,
reading ``dbos-config.yaml``, sees all of them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO
from harness.db import query
from harness.env import script_env
from harness.proc import run_script

# Servers, crashes or long runs: not in the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

ARGS = ("--steps", "4", "--step-seconds", "0")


def test_one_experiment_never_recovers_another_experiments_workflow(pg_url: str) -> None:
    env = script_env(pg_url)
    crashed = run_script("scope.py", *ARGS, "--crash-after", "1", env=env)
    assert crashed.returncode != 0
    scope_wf = crashed.messages("step")[0]["workflow_id"]

    # scope_funcs launches on the same database and executor id ("local") while
    # scope's workflow is PENDING: it must start its own, not recover scope's.
    other = run_script("scope_funcs.py", *ARGS, env=env)
    assert other.returncode == 0, other.stderr
    assert other.summary["recovered"] is False
    assert other.summary["workflow_id"] != scope_wf
    assert query(
        pg_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", scope_wf
    ) == [("PENDING",)]

    resumed = run_script("scope.py", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert (resumed.summary["workflow_id"], resumed.summary["recovered"]) == (scope_wf, True)
    apps = dict(
        query(
            pg_url,
            "SELECT workflow_uuid, application_name FROM dbos.workflow_status",
        )
    )
    assert apps == {
        scope_wf: "experiment6-scope",
        other.summary["workflow_id"]: "experiment6-scope-funcs",
    }


def _dbos_workflow_list(cwd: Path, env: dict[str, str]) -> set[str]:
    dbos_cli = Path(sys.executable).parent / "dbos"
    out = subprocess.run(
        [str(dbos_cli), "workflow", "list", "--limit", "100"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return {w["workflow_id"] for w in json.loads(out)}


def test_dbos_cli_lists_the_scripts_workflows_on_postgres(pg_url: str) -> None:
    env = script_env(pg_url)
    a = run_script("scope.py", *ARGS, env=env).summary["workflow_id"]
    b = run_script("scope_funcs.py", *ARGS, env=env).summary["workflow_id"]
    assert {a, b} <= _dbos_workflow_list(REPO, env)


def test_dbos_cli_lists_the_scripts_workflows_on_default_sqlite(tmp_path: Path) -> None:
    # No DBOS_SYSTEM_DATABASE_URL: scripts and CLI must agree on experiment6.sqlite.
    shutil.copy(REPO / "dbos-config.yaml", tmp_path)
    env = script_env()
    result = run_script("scope.py", *ARGS, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.summary["workflow_id"] in _dbos_workflow_list(tmp_path, env)
