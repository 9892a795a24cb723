"""scope_funcs.py in the test process: a module-level global counts the step bodies
this process ran; after a death after step 2 the next launch resumes the run and the
global, back at zero in a new process, counts only steps 3..5."""

from __future__ import annotations

import pytest
from dbos import DBOS

import scope_funcs
from harness.db import step_outputs, workflow_rows
from harness.inprocess import die, in_process, picked, run_main, use_environment  # noqa: F401
from harness.proc import ScriptResult

pytestmark = pytest.mark.usefixtures("in_process")

ARGS = ("--steps", "5", "--step-seconds", "0")
STEPS = [(i, "count_step") for i in range(1, 6)]


def run(monkeypatch: pytest.MonkeyPatch, db_url: str, *argv: str) -> ScriptResult:
    """``python scope_funcs.py argv`` on ``db_url`` as a fresh process would run it: its
    globals at 0."""
    use_environment(monkeypatch, db_url)
    for name, value in (("counter", 0), ("executed_here", 0), ("crash_after", None)):
        monkeypatch.setattr(scope_funcs, name, value)
    return run_main(scope_funcs.main, *argv)


def test_a_clean_run_counts_every_step_in_the_global(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(monkeypatch, pg_url, *ARGS)
    counted = ("steps", "executed_here", "module_counter", "recovered")
    assert picked(s := result.summary, *counted) == dict(
        zip(counted, (5, 5, 5, False), strict=True)
    )
    assert [r["module_counter"] for r in result.messages("step")] == [1, 2, 3, 4, 5]
    assert workflow_rows(pg_url, s["workflow_id"])["status"] == "SUCCESS"
    assert step_outputs(pg_url, s["workflow_id"]) == STEPS


def test_after_a_death_the_global_restarts_from_zero_and_counts_the_rest(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scope_funcs, "crash", die)
    with pytest.raises(BaseException, match="after_step"):
        run(monkeypatch, sqlite_url, *ARGS, "--crash-after", "2")
    (pending,) = DBOS.list_workflows(status="PENDING")
    DBOS.destroy()
    assert step_outputs(sqlite_url, pending.workflow_id) == STEPS[:2]

    s = run(monkeypatch, sqlite_url).summary
    counted = ("workflow_id", "recovered", "executed_here", "module_counter")
    assert picked(s, *counted) == dict(zip(counted, (pending.workflow_id, True, 3, 3), strict=True))
    assert step_outputs(sqlite_url, pending.workflow_id) == STEPS
    assert workflow_rows(sqlite_url, pending.workflow_id)["status"] == "SUCCESS"
