"""scope.py in the test process: a counter on an object made inside a class-based
workflow counts the steps this process ran, not the run's steps; ``self.counter += 1``
leaves the class attribute alone; a run left PENDING by a death after step 2 is
resumed by the next launch, which runs only steps 3..5, on a new instance."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbos import DBOS

from harness.db import step_outputs, workflow_rows
from harness.inprocess import (
    die,
    import_apart,
    in_process,  # noqa: F401
    picked,
    refused_flags,
    registry_in_use,
    run_main,
    run_to_exit,
    use_environment,
)
from harness.proc import ScriptResult, free_port

# fastapi_scope.py defines the same A.run, in DBOS's shared registry.
scope, SCOPE_REGISTRY = import_apart("scope")

ARGS = ("--steps", "5", "--step-seconds", "0")
STEPS = [(i, "A.step") for i in range(1, 6)]


@pytest.fixture(autouse=True)
def scope_registry(in_process: None) -> Iterator[None]:  # noqa: F811
    with registry_in_use(SCOPE_REGISTRY):
        yield


def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fresh ``python scope.py`` starts with."""
    monkeypatch.setattr(scope, "executed_here", 0)
    monkeypatch.setattr(scope, "crash_after", None)


def run(monkeypatch: pytest.MonkeyPatch, *argv: str) -> ScriptResult:
    new_process(monkeypatch)
    return run_main(scope.main, *argv)


def test_a_clean_run_counts_on_the_instance_and_the_class_stays_zero(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, db_url)
    result = run(monkeypatch, *ARGS)
    s = result.summary
    counted = ("steps", "executed_here", "instance_counter", "class_counter", "recovered")
    assert picked(s, *counted) == dict(zip(counted, (5, 5, 5, 0, False), strict=True))
    # Step bodies ran in order, in this run, each seeing the instance counter grow.
    fields = ("step", "step_number", "instance_counter", "class_counter", "workflow_id")
    assert [picked(r, *fields) for r in result.messages("step")] == [
        dict(zip(fields, (i, i, i, 0, s["workflow_id"]), strict=True)) for i in range(1, 6)
    ]
    assert workflow_rows(db_url, s["workflow_id"])["status"] == "SUCCESS"
    assert step_outputs(db_url, s["workflow_id"]) == STEPS


def test_every_line_is_json_with_the_stable_fields_dbos_s_own_included(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, sqlite_url)
    result = run(monkeypatch, *ARGS)
    assert len(result.records) == len(result.stdout.splitlines())
    for record in result.records:
        assert {"timestamp", "severity", "name", "message", "app_name"} <= record.keys()
    launched = result.messages("DBOS launched!")
    assert len(launched) == 1 and launched[0]["name"] == "dbos"


def test_after_a_death_after_step_2_the_next_launch_runs_only_steps_3_to_5(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, db_url)
    monkeypatch.setattr(scope, "crash", die)
    new_process(monkeypatch)
    with pytest.raises(BaseException, match="after_step") as death:
        run_main(scope.main, *ARGS, "--crash-after", "2")
    assert death.type.__name__ == "ProcessDeath"
    workflow_id = DBOS.list_workflows()[0].workflow_id
    DBOS.destroy()
    assert workflow_rows(db_url, workflow_id)["status"] == "PENDING"
    assert step_outputs(db_url, workflow_id) == STEPS[:2]

    resumed = run(monkeypatch)  # no arguments: resume what is pending
    counted = ("workflow_id", "recovered", "steps", "executed_here", "instance_counter")
    assert picked(resumed.summary, *counted) == dict(
        zip(counted, (workflow_id, True, 5, 3, 3), strict=True)
    )
    assert resumed.summary["class_counter"] == 0
    resumed_steps = resumed.messages("step")
    assert [r["step"] for r in resumed_steps] == [3, 4, 5]
    assert [r["instance_counter"] for r in resumed_steps] == [1, 2, 3]
    assert step_outputs(db_url, workflow_id) == STEPS
    assert workflow_rows(db_url, workflow_id)["status"] == "SUCCESS"


def test_with_nothing_pending_a_launch_starts_a_fresh_workflow(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, sqlite_url)
    first = run(monkeypatch, *ARGS).summary
    second = run(monkeypatch, "--steps", "2", "--step-seconds", "0").summary
    assert second["workflow_id"] != first["workflow_id"]
    assert (second["recovered"], second["steps"], second["executed_here"]) == (False, 2, 2)


@pytest.mark.usefixtures("sqlite_supported")  # runs on the default SQLite
def test_the_default_database_is_experiment6_sqlite_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, None)
    monkeypatch.chdir(tmp_path)
    s = run(monkeypatch, *ARGS).summary
    db = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    assert workflow_rows(db, s["workflow_id"])["status"] == "SUCCESS"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "not a database URL"),
        ("postgresql://postgres:pw-5e1c9a@127.0.0.1:{port}/nowhere", "cannot reach the system"),
    ],
    ids=["malformed", "unreachable"],
)
def test_a_bad_database_url_ends_the_run_with_one_line_and_no_password(
    url: str, expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    use_environment(monkeypatch, url.format(port=free_port()))
    result = run_to_exit(lambda: scope.main(list(ARGS)))
    assert expected in result.failure()
    assert "pw-5e1c9a" not in result.stdout  # the password is redacted
    assert list(tmp_path.iterdir()) == []


def test_bad_flags_or_too_old_sqlite_end_the_run_before_dbos_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert "--steps must be at least 1" in refused_flags(
        monkeypatch, tmp_path, scope.main, "--steps", "0"
    )
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")  # too old on every Python
    old = run_to_exit(lambda: scope.main(list(ARGS)))
    assert old.failure().startswith("SQLite 3.34.1 is too old: DBOS 3.4 on Python ")
    assert list(tmp_path.iterdir()) == []  # no database was opened
