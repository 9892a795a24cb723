"""scope.py: instance state in a class-based workflow is not durable."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.db import step_outputs, workflow_rows
from harness.env import script_env
from harness.proc import run_script

ARGS = ("--steps", "5", "--step-seconds", "0")


@pytest.mark.slow
def test_clean_run_counts_on_the_instance_not_the_class(db_url: str) -> None:
    result = run_script("scope.py", *ARGS, env=script_env(db_url))
    assert result.returncode == 0, result.stderr
    s = result.summary
    assert (s["steps"], s["executed_here"], s["instance_counter"], s["class_counter"]) == (
        5,
        5,
        5,
        0,
    )
    assert s["recovered"] is False
    # Step bodies ran in order, each seeing the instance counter grow.
    steps = result.messages("step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["instance_counter"] for r in steps] == [1, 2, 3, 4, 5]
    assert {r["class_counter"] for r in steps} == {0}
    assert {r["workflow_id"] for r in steps} == {s["workflow_id"]}
    assert workflow_rows(db_url, s["workflow_id"])["status"] == "SUCCESS"
    assert step_outputs(db_url, s["workflow_id"]) == [(i, "A.step") for i in range(1, 6)]


@pytest.mark.slow
def test_crash_then_resume_runs_only_the_missing_steps_on_a_new_instance(db_url: str) -> None:
    env = script_env(db_url)
    crashed = run_script("scope.py", *ARGS, "--crash-after", "2", env=env)
    assert crashed.returncode != 0
    crashed_steps = crashed.messages("step")
    assert [r["step"] for r in crashed_steps] == [1, 2]
    workflow_id = crashed_steps[0]["workflow_id"]
    assert workflow_rows(db_url, workflow_id)["status"] == "PENDING"
    assert len(step_outputs(db_url, workflow_id)) == 2

    resumed = run_script("scope.py", env=env)
    assert resumed.returncode == 0, resumed.stderr
    s = resumed.summary
    assert s["workflow_id"] == workflow_id
    assert s["recovered"] is True
    assert (s["steps"], s["executed_here"], s["instance_counter"], s["class_counter"]) == (
        5,
        3,
        3,
        0,
    )
    # Only steps 3..5 ran here, on a new instance (new time-based id).
    resumed_steps = resumed.messages("step")
    assert [r["step"] for r in resumed_steps] == [3, 4, 5]
    assert [r["instance_counter"] for r in resumed_steps] == [1, 2, 3]
    assert resumed_steps[0]["instance_id"] != crashed_steps[0]["instance_id"]
    # Each step's output is recorded exactly once; the workflow ends SUCCESS.
    assert step_outputs(db_url, workflow_id) == [(i, "A.step") for i in range(1, 6)]
    assert workflow_rows(db_url, workflow_id)["status"] == "SUCCESS"


@pytest.mark.slow
def test_nothing_to_resume_starts_a_fresh_workflow(sqlite_url: str) -> None:
    env = script_env(sqlite_url)
    first = run_script("scope.py", *ARGS, env=env).summary
    second = run_script("scope.py", "--steps", "2", "--step-seconds", "0", env=env).summary
    assert second["workflow_id"] != first["workflow_id"]
    assert (second["recovered"], second["steps"], second["executed_here"]) == (False, 2, 2)


@pytest.mark.slow
@pytest.mark.usefixtures("sqlite_supported")  # runs on the default SQLite
def test_default_database_is_experiment6_sqlite_in_the_working_directory(
    tmp_path: Path,
) -> None:
    result = run_script("scope.py", *ARGS, env=script_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "experiment6.sqlite").exists()
    db = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    assert workflow_rows(db, result.summary["workflow_id"])["status"] == "SUCCESS"


@pytest.mark.slow
def test_every_stdout_line_is_json_with_the_stable_fields(sqlite_url: str) -> None:
    result = run_script("scope.py", *ARGS, env=script_env(sqlite_url))
    assert result.returncode == 0
    assert len(result.records) == len(result.stdout.splitlines())
    for record in result.records:
        assert {"timestamp", "severity", "name", "message", "app_name"} <= record.keys()
    # DBOS's own records come through as JSON too, once each.
    launched = result.messages("DBOS launched!")
    assert len(launched) == 1 and launched[0]["name"] == "dbos"
    steps = result.messages("step")
    assert [r["step_number"] for r in steps] == [1, 2, 3, 4, 5]


@pytest.mark.slow  # the exit of a real process; in the test process: test_class_instance_state.py
def test_malformed_database_url_fails_fast_with_one_line(tmp_path: Path) -> None:
    result = run_script("scope.py", *ARGS, env=script_env("not a url"), cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert len(result.records) == 1
    assert result.records[0]["severity"] == "ERROR"
    assert "not a database URL" in result.records[0]["message"]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow  # the exit of a real process; in the test process: test_class_instance_state.py
def test_unreachable_database_fails_fast_with_one_line(tmp_path: Path) -> None:
    from harness.proc import free_port

    url = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/nowhere"
    result = run_script("scope.py", *ARGS, env=script_env(url), cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert len(result.records) == 1
    message = result.records[0]["message"]
    assert "cannot reach the system database" in message
    assert "secret" not in result.stdout  # the password is redacted
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow  # the exit of a real process; in the test process: test_class_instance_state.py
def test_bad_flags_are_rejected_before_anything_runs(tmp_path: Path) -> None:
    result = run_script("scope.py", "--steps", "0", env=script_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert "--steps must be at least 1" in result.stderr
    assert not (tmp_path / "experiment6.sqlite").exists()
