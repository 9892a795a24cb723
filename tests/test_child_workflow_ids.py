"""nested_wfs.py in the test process: a child's id is its parent's id plus the
operation number of the call, ``parent_workflow_id`` names the parent, a queued tree
carries ``nested_queue`` at every level, and an enqueued step becomes a workflow of its
own (``<temp>.wf_step``) while a step called directly has no row."""

from __future__ import annotations

from pathlib import Path

import pytest

import nested_wfs
from harness.db import query
from harness.inprocess import in_process, refused_flags, run_main, use_environment  # noqa: F401

pytestmark = pytest.mark.usefixtures("in_process")


def test_both_trees_get_derived_ids_parents_and_queues_as_recorded(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_environment(monkeypatch, db_url)
    monkeypatch.setattr(nested_wfs, "steps_run_here", {"direct": 0, "queued": 0})
    monkeypatch.setattr(nested_wfs, "crash_in", None)
    s = run_main(nested_wfs.main, "--sleep-seconds", "0").summary
    assert (s["recovered"], s["steps_run_here"]) == (False, {"direct": 1, "queued": 1})
    rows = {
        wid: (name, parent, queue, status)
        for wid, name, parent, queue, status in query(
            db_url,
            "SELECT workflow_uuid, name, parent_workflow_id, queue_name, status "
            "FROM dbos.workflow_status",
        )
    }
    direct, queued = f"{s['run_id']}-direct", f"{s['run_id']}-queued"
    q = nested_wfs.QUEUE
    assert rows == {
        direct: ("wf_root", None, None, "SUCCESS"),
        f"{direct}-2": ("wf", direct, None, "SUCCESS"),
        f"{direct}-2-2": ("wf_child", f"{direct}-2", None, "SUCCESS"),
        queued: ("wf_root", None, q, "SUCCESS"),
        f"{queued}-2": ("wf", queued, q, "SUCCESS"),
        f"{queued}-2-2": ("wf_child", f"{queued}-2", q, "SUCCESS"),
        f"{queued}-2-2-2": ("<temp>.wf_step", f"{queued}-2-2", q, "SUCCESS"),
    }
    # Operation 1 of each workflow reads its own status; the call is operation 2, and the
    # parent records the child's id there, then waits for its result.
    calls = query(
        db_url,
        "SELECT workflow_uuid, function_id, function_name, child_workflow_id "
        "FROM dbos.operation_outputs WHERE child_workflow_id IS NOT NULL "
        "AND function_name <> 'DBOS.getResult'",
    )
    assert {child: f"{parent}-{op}" for parent, op, _, child in calls} == {
        child: child for child in rows if child not in (direct, queued)
    }
    child_ops = query(
        db_url,
        "SELECT function_name FROM dbos.operation_outputs WHERE workflow_uuid = %s "
        "ORDER BY function_id",
        f"{direct}-2-2",
    )
    assert [name for (name,) in child_ops][:2] == ["DBOS.getStatus", "wf_step"]


def test_bad_flags_end_the_run_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    flags = ("--crash-in", "wf", "--sleep-seconds", "0")
    error = refused_flags(monkeypatch, tmp_path, nested_wfs.main, *flags)
    assert "--crash-in needs --sleep-seconds > 0" in error
