"""scope_funcs.py: a module-level global in a workflow is not durable either."""

from __future__ import annotations

import pytest

from harness.db import step_outputs, workflow_rows
from harness.env import script_env
from harness.proc import run_script

# Servers, crashes or long runs: not in the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

ARGS = ("--steps", "5", "--step-seconds", "0")


def test_clean_run_counts_every_step_in_the_global(db_url: str) -> None:
    result = run_script("scope_funcs.py", *ARGS, env=script_env(db_url))
    assert result.returncode == 0, result.stderr
    s = result.summary
    assert (s["steps"], s["executed_here"], s["module_counter"], s["recovered"]) == (
        5,
        5,
        5,
        False,
    )
    assert [r["module_counter"] for r in result.messages("step")] == [1, 2, 3, 4, 5]
    assert workflow_rows(db_url, s["workflow_id"])["status"] == "SUCCESS"
    assert step_outputs(db_url, s["workflow_id"]) == [(i, "count_step") for i in range(1, 6)]


def test_crash_then_resume_restarts_the_global_from_zero(db_url: str) -> None:
    env = script_env(db_url)
    crashed = run_script("scope_funcs.py", *ARGS, "--crash-after", "2", env=env)
    assert crashed.returncode != 0
    assert [r["step"] for r in crashed.messages("step")] == [1, 2]
    workflow_id = crashed.messages("step")[0]["workflow_id"]
    assert workflow_rows(db_url, workflow_id)["status"] == "PENDING"

    resumed = run_script("scope_funcs.py", env=env)
    assert resumed.returncode == 0, resumed.stderr
    s = resumed.summary
    assert (s["workflow_id"], s["recovered"], s["executed_here"], s["module_counter"]) == (
        workflow_id,
        True,
        3,
        3,
    )
    assert [r["step"] for r in resumed.messages("step")] == [3, 4, 5]
    assert step_outputs(db_url, workflow_id) == [(i, "count_step") for i in range(1, 6)]
    assert workflow_rows(db_url, workflow_id)["status"] == "SUCCESS"
