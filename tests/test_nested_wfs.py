"""nested_wfs.py: workflow trees, called directly or through a queue, and what
recovery does to a tree that crashed half-way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.db import query
from harness.env import script_env
from harness.proc import ScriptResult, run_script

LEVELS = ("root", "wf", "child")
NAMES = {"root": "wf_root", "wf": "wf", "child": "wf_child"}


def flatten(node: dict[str, Any]) -> list[dict[str, Any]]:
    """Every workflow node of a summary tree, parents first."""
    nodes = [node]
    for child in node["children"]:
        nodes.extend(flatten(child))
    return nodes


def tree_rows(url: str, root_id: str) -> dict[str, dict[str, Any]]:
    """The tree's rows in dbos.workflow_status, by workflow id."""
    rows = query(
        url,
        "SELECT workflow_uuid, name, parent_workflow_id, queue_name, status, recovery_attempts "
        "FROM dbos.workflow_status WHERE workflow_uuid = %s OR workflow_uuid LIKE %s",
        root_id,
        root_id + "-%",
    )
    return {
        r[0]: {
            "name": r[1],
            "parent": r[2],
            "queue_name": r[3],
            "status": r[4],
            "attempts": int(r[5]),
        }
        for r in rows
    }


def operations(url: str, workflow_id: str) -> list[tuple[Any, ...]]:
    """(function_id, function_name, child_workflow_id, started_at, output) in order."""
    return query(
        url,
        "SELECT function_id, function_name, child_workflow_id, started_at_epoch_ms, output "
        "FROM dbos.operation_outputs WHERE workflow_uuid = %s ORDER BY function_id",
        workflow_id,
    )


def level_ids(run_id: str, tree: str) -> dict[str, str]:
    root = f"{run_id}-{tree}"
    return {"root": root, "wf": f"{root}-2", "child": f"{root}-2-2"}


def running(result: ScriptResult, tree_root: str) -> list[str]:
    """Levels of the tree whose workflow function executed in this process."""
    return [
        r["level"]
        for r in result.messages("workflow running")
        if r["workflow_id"].startswith(tree_root)
    ]


@pytest.mark.slow
def test_both_trees_match_workflow_status_and_child_ids_derive_from_the_parent(
    pg_url: str,
) -> None:
    result = run_script("nested_wfs.py", "--sleep-seconds", "0", env=script_env(pg_url))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    s = result.summary
    run_id = s["run_id"]
    assert s["recovered"] is False
    assert s["steps_run_here"] == {"direct": 1, "queued": 1}

    for tree, queued in (("direct", False), ("queued", True)):
        nodes = flatten(s[tree])
        rows = tree_rows(pg_url, f"{run_id}-{tree}")
        # The summary, built from what each workflow read about itself, is what
        # the database holds: same ids, names, parents and queues.
        assert {
            n["workflow_id"]: (n["workflow_name"], n["parent_workflow_id"], n["queue_name"])
            for n in nodes
        } == {wid: (r["name"], r["parent"], r["queue_name"]) for wid, r in rows.items()}
        assert {r["status"] for r in rows.values()} == {"SUCCESS"}
        assert {n["queued"] for n in nodes} == {queued}
        assert {r["queue_name"] for r in rows.values()} == {"nested_queue" if queued else None}
        # Each child's id is its parent's id plus the operation number of the
        # call, which the parent recorded with the child's id.
        for node in nodes[1:]:
            parent = node["parent_workflow_id"]
            start, wait = [op for op in operations(pg_url, parent) if op[2] == node["workflow_id"]]
            assert node["workflow_id"] == f"{parent}-{start[0]}"
            assert (start[1], wait[1]) == (node["workflow_name"], "DBOS.getResult")

    ids = level_ids(run_id, "direct")
    assert [n["workflow_id"] for n in flatten(s["direct"])] == [ids[x] for x in LEVELS]
    # Called directly, the step has no row: it is an operation of wf_child.
    assert [op[1] for op in operations(pg_url, ids["child"])] == [
        "DBOS.getStatus",
        "wf_step",
    ]
    # Enqueued, the step is a workflow of its own, a child of wf_child.
    queued_nodes = flatten(s["queued"])
    assert [n["workflow_name"] for n in queued_nodes] == [
        "wf_root",
        "wf",
        "wf_child",
        "<temp>.wf_step",
    ]
    assert queued_nodes[-1]["workflow_id"] == f"{run_id}-queued-2-2-2"


def crash_and_resume(url: str, level: str, tree: str) -> tuple[ScriptResult, ScriptResult, dict]:
    env = script_env(url)
    crashed = run_script(
        "nested_wfs.py",
        "--sleep-seconds",
        "0.4",
        "--crash-in",
        level,
        "--crash-tree",
        tree,
        env=env,
    )
    assert crashed.returncode == 3, crashed.stdout[-3000:] + crashed.stderr
    (crash,) = crashed.messages("crashing")
    assert (crash["level"], crash["tree"]) == (level, tree)
    root_id = next(
        r["workflow_id"]
        for r in crashed.messages("workflow running")
        if r["level"] == "root" and r["queued"] == (tree == "queued")
    )
    before = {wid: operations(url, wid) for wid in tree_rows(url, root_id)}
    resumed = run_script("nested_wfs.py", env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    assert resumed.summary["recovered"] is True
    assert f"{resumed.summary['run_id']}-{tree}" == root_id
    return crashed, resumed, before


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.slow
def test_a_crash_in_the_direct_tree_resumes_without_repeating_finished_work(
    pg_url: str, level: str
) -> None:
    crashed, resumed, before = crash_and_resume(pg_url, level, "direct")
    run_id = resumed.summary["run_id"]
    ids = level_ids(run_id, "direct")
    above = LEVELS[: LEVELS.index(level) + 1]  # the crashed level and its ancestors
    below = LEVELS[LEVELS.index(level) + 1 :]  # finished before the crash

    # Before the resume: the crashed level and its ancestors were PENDING, and
    # the crashed level's sleep was checkpointed (its wake-up time).
    assert [op[1] for op in before[ids[level]]][-1] == "DBOS.sleep"
    # The step ran once, before the crash, and not again.
    assert [r["queued"] for r in crashed.messages("step ran")] == [False]
    assert resumed.summary["steps_run_here"] == {"direct": 0, "queued": 1}

    rows = tree_rows(pg_url, ids["root"])
    assert {r["status"] for r in rows.values()} == {"SUCCESS"}
    # Recovery re-executed the pending workflows (all of them, not only the
    # root), through the internal queue; finished children were left alone.
    for name in above:
        assert (rows[ids[name]]["attempts"], rows[ids[name]]["queue_name"]) == (
            2,
            "_dbos_internal_queue",
        )
    for name in below:
        assert (rows[ids[name]]["attempts"], rows[ids[name]]["queue_name"]) == (1, None)
    assert sorted(running(resumed, ids["root"])) == sorted(above)
    # Every operation recorded before the crash is unchanged (same start time,
    # same recorded wake-up time), and each workflow slept exactly once.
    for workflow_id, ops in before.items():
        after = operations(pg_url, workflow_id)
        assert after[: len(ops)] == ops
        assert [op[1] for op in after].count("DBOS.sleep") == 1
    # The resumed summary still reports the tree as first recorded.
    nodes = flatten(resumed.summary["direct"])
    assert [(n["workflow_id"], n["queue_name"]) for n in nodes] == [(ids[x], None) for x in LEVELS]


@pytest.mark.slow
def test_a_crash_in_the_queued_tree_puts_its_workflows_back_on_their_queue(
    pg_url: str,
) -> None:
    crashed, resumed, before = crash_and_resume(pg_url, "child", "queued")
    run_id = resumed.summary["run_id"]
    ids = level_ids(run_id, "queued")
    step_id = f"{ids['child']}-2"
    # The direct tree had finished; the queued step (a workflow) had finished too.
    assert sorted(r["queued"] for r in crashed.messages("step ran")) == [False, True]
    assert resumed.summary["steps_run_here"] == {"direct": 0, "queued": 0}
    assert running(resumed, f"{run_id}-direct") == []

    rows = tree_rows(pg_url, ids["root"])
    assert {r["status"] for r in rows.values()} == {"SUCCESS"}
    for name in LEVELS:
        assert (rows[ids[name]]["attempts"], rows[ids[name]]["queue_name"]) == (2, "nested_queue")
    assert (rows[step_id]["attempts"], rows[step_id]["queue_name"]) == (1, "nested_queue")
    assert sorted(running(resumed, ids["root"])) == sorted(LEVELS)
    for workflow_id, ops in before.items():
        after = operations(pg_url, workflow_id)
        assert after[: len(ops)] == ops
    assert [op[1] for op in operations(pg_url, step_id)] == ["wf_step"]


@pytest.mark.slow
def test_default_run_uses_sqlite_in_the_working_directory(tmp_path: Path) -> None:
    result = run_script("nested_wfs.py", "--sleep-seconds", "0", env=script_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    s = result.summary
    db = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    assert len(tree_rows(db, f"{s['run_id']}-direct")) == 3
    assert len(tree_rows(db, f"{s['run_id']}-queued")) == 4


@pytest.mark.slow  # the exit of a real process; in the test process: test_child_workflow_ids.py
def test_bad_flags_are_rejected_before_anything_runs(tmp_path: Path) -> None:
    result = run_script(
        "nested_wfs.py", "--crash-in", "wf", "--sleep-seconds", "0", env=script_env(), cwd=tmp_path
    )
    assert result.returncode == 2
    assert "--crash-in needs --sleep-seconds > 0" in result.stderr
    assert not (tmp_path / "experiment6.sqlite").exists()
