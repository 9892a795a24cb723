"""Experiment: how do child workflows form a tree, called directly or through a queue?

Question
    ``wf_root`` calls ``wf``, which calls ``wf_child``, which calls the step
    ``wf_step``. Each workflow logs its own ``workflow_id`` and the
    ``parent_workflow_id`` DBOS recorded for it, calls its child, then sleeps
    durably (``DBOS.sleep``). A ``queued`` flag chooses, at every level, between
    calling the child directly and enqueuing it on ``nested_queue`` and waiting
    for its handle. (The original tested ``if queue:`` instead of ``if queued:``
    at the middle level, so that level always enqueued, even in the "direct"
    tree; here every level tests ``queued``.) What ids do the children get,
    what do ``parent_workflow_id`` and ``queue_name`` show, and what does
    recovery do to a tree that crashed half-way?

Run
    python nested_wfs.py --sleep-seconds 0       # the direct tree, then the queued tree
    python nested_wfs.py --crash-in wf           # dies (exit 3) during wf's sleep
    python nested_wfs.py                         # resumes that run, then runs the queued tree
    python nested_wfs.py --crash-in child --crash-tree queued   # a crash in the queued tree

Observe
    Log lines "workflow running" (per execution, replays included), "step ran"
    (per step body actually executed), "slept". The last line, ``"message":
    "summary"``, holds both trees: for each workflow its level, name, id, parent
    id, whether it was queued, its ``queue_name`` and its children; and
    ``steps_run_here``, the step bodies this process executed per tree.

What it means
    - Child ids: a workflow started from inside another one gets the id
      ``<parent id>-<n>``, where ``n`` is the parent's operation counter at the
      call (its ``function_id`` in ``dbos.operation_outputs``). Here each
      workflow first reads its own status (``DBOS.getStatus``, operation 1),
      so the children are ``<run>-direct-2`` and ``<run>-direct-2-2``. The id
      depends on what the parent did before the call, which is why it is the
      same on every replay: that is how a resumed parent finds its child again.
      The parent records the call as an operation whose ``child_workflow_id``
      is the child (``wf_child`` at 2), and the wait for the result as
      ``DBOS.getResult`` (3).
    - ``parent_workflow_id`` is the id of the workflow that started the child,
      for direct calls and enqueued children alike; roots have none.
    - Queued children have ``queue_name = nested_queue`` and are run by the
      queue's worker (on its poll, with its limits), not in the parent's thread;
      the parent only waits on the handle. An enqueued *step* becomes a workflow
      of its own named ``<temp>.wf_step`` (a child with its own row); called
      directly a step has no row, only an ``operation_outputs`` entry of its
      workflow.
    - Recovery: at launch DBOS recovers every PENDING workflow of this executor
      and application version, not just the root: each is put back on a queue
      (directly started ones on ``_dbos_internal_queue``, which their
      ``queue_name`` shows from then on; queued ones on their own queue) and
      re-executed from the top, replaying recorded operations. A re-executed
      parent finds the child id it recorded and waits for that child instead of
      starting another; a child that had already finished is not run again (its
      ``recovery_attempts`` stays 1) and its result is returned from the
      database. ``DBOS.sleep`` records its wake-up time before waiting, so a
      sleep interrupted by the crash only waits for what is left, and finished
      sleeps are not repeated (one ``DBOS.sleep`` row per workflow).
    - The crash flag is a property of the process, never a workflow input, so
      the resumed run does not crash again.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
import uuid
from typing import Any

from dbos import DBOS, SetWorkflowID

import common

log = logging.getLogger("nested_wfs")

QUEUE = "nested_queue"
POLL = 0.1  # seconds between checks for a queue's result or new work
LEVELS = ("root", "wf", "child")
TREES = ("direct", "queued")

# Process-level facts (never workflow inputs): a resumed run must not crash again.
crash_in: str | None = None
crash_tree: str = "direct"
steps_run_here = {"direct": 0, "queued": 0}


def _sleep(level: str, queued: bool, seconds: float) -> None:
    """Sleep durably; with ``--crash-in`` this level, die in the middle of it."""
    tree = "queued" if queued else "direct"
    if crash_in == level and crash_tree == tree:
        _crash_once_sleeping(DBOS.workflow_id or "", level, tree)
    DBOS.sleep(seconds)
    log.info("slept", extra={"level": level, "seconds": seconds})


def _crash_once_sleeping(workflow_id: str, level: str, tree: str) -> None:
    """Kill the process as soon as this workflow's sleep is checkpointed.

    ``DBOS.sleep`` first records its wake-up time (a ``DBOS.sleep`` row in
    ``operation_outputs``), then waits. Watching for that row (every 20 ms)
    instead of using a timer puts the crash inside the sleep even when the
    recording itself is slow.
    """

    def watch() -> None:
        while not any(
            step["function_name"] == "DBOS.sleep"
            for step in DBOS.list_workflow_steps(workflow_id, load_output=False)
        ):
            time.sleep(0.02)
        log.warning("crashing", extra={"level": level, "tree": tree})
        logging.shutdown()
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _node(level: str, queued: bool, workflow_id: str) -> dict[str, Any]:
    """A summary node from the workflow's own row in ``dbos.workflow_status``.

    ``DBOS.get_workflow_status`` inside a workflow is a recorded step
    (``DBOS.getStatus``): a resumed run reads the answer of the first run.
    """
    status = DBOS.get_workflow_status(workflow_id)
    assert status is not None
    return {
        "level": level,
        "workflow_name": status.name,
        "workflow_id": workflow_id,
        "parent_workflow_id": status.parent_workflow_id,
        "queued": queued,
        "queue_name": status.queue_name,
        "children": [],
    }


def _enter(level: str, queued: bool) -> dict[str, Any]:
    """Log who we are, as DBOS recorded it."""
    node = _node(level, queued, DBOS.workflow_id or "")
    log.info("workflow running", extra={k: v for k, v in node.items() if k != "children"})
    return node


def _call(func: Any, queued: bool, *args: Any) -> tuple[Any, str | None]:
    """Run ``func`` as a child: directly, or enqueued and awaited through its handle.

    Returns its result and, when enqueued, the id of the workflow the queue ran.
    """
    if queued:
        handle = DBOS.enqueue_workflow(QUEUE, func, *args)
        return handle.get_result(polling_interval_sec=POLL), handle.get_workflow_id()
    return func(*args), None


@DBOS.step()
def wf_step(queued: bool) -> dict[str, Any]:
    steps_run_here["queued" if queued else "direct"] += 1
    ran = {"workflow_id": DBOS.workflow_id, "step_id": DBOS.step_id}
    log.info("step ran", extra={"level": "step", "queued": queued, **ran})
    return ran


@DBOS.workflow()
def wf_child(queued: bool, sleep_seconds: float) -> dict[str, Any]:
    node = _enter("child", queued)
    ran, step_workflow_id = _call(wf_step, queued, queued)
    if step_workflow_id is None:
        # Called directly, a step is part of this workflow: no row of its own.
        node["steps"] = [{"name": "wf_step", **ran}]
    else:
        # Enqueued, a step runs as a workflow of its own (`<temp>.wf_step`).
        step_node = _node("step", queued, step_workflow_id)
        step_node["steps"] = [{"name": "wf_step", **ran}]
        node["children"].append(step_node)
    _sleep("child", queued, sleep_seconds)
    return node


@DBOS.workflow()
def wf(queued: bool, sleep_seconds: float) -> dict[str, Any]:
    node = _enter("wf", queued)
    # The original tested `if queue:` here (a queue object, always truthy), so
    # this level enqueued even in the "direct" tree. `_call` tests `queued`.
    node["children"].append(_call(wf_child, queued, queued, sleep_seconds)[0])
    _sleep("wf", queued, sleep_seconds)
    return node


@DBOS.workflow()
def wf_root(queued: bool, sleep_seconds: float) -> dict[str, Any]:
    node = _enter("root", queued)
    node["children"].append(_call(wf, queued, queued, sleep_seconds)[0])
    _sleep("root", queued, sleep_seconds)
    return node


def _run_tree(workflow_id: str, queued: bool, sleep_seconds: float) -> dict[str, Any]:
    """Start a root (directly, or on the queue in the background) and wait for its
    tree; a root that exists already (finished, or being recovered) is only awaited."""
    if DBOS.get_workflow_status(workflow_id) is not None:
        handle = DBOS.retrieve_workflow(workflow_id)
    else:
        with SetWorkflowID(workflow_id):
            if queued:
                handle = DBOS.enqueue_workflow(QUEUE, wf_root, True, sleep_seconds)
            else:
                handle = DBOS.start_workflow(wf_root, False, sleep_seconds)
    return handle.get_result(polling_interval_sec=POLL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sleep-seconds",
        type=float,
        default=1.0,
        help="durable sleep in each workflow (default 1)",
    )
    parser.add_argument(
        "--crash-in",
        choices=LEVELS,
        default=None,
        help="exit abruptly (code 3) during this level's durable sleep",
    )
    parser.add_argument(
        "--crash-tree",
        choices=TREES,
        default="direct",
        help="which tree --crash-in applies to (default direct)",
    )
    args = parser.parse_args(argv)
    if args.sleep_seconds < 0:
        parser.error("--sleep-seconds must not be negative")
    if args.crash_in and args.sleep_seconds <= 0:
        parser.error("--crash-in needs --sleep-seconds > 0 (the crash happens during the sleep)")
    return args


def main(argv: list[str] | None = None) -> None:
    global crash_in, crash_tree
    args = parse_args(argv)
    common.setup_logging("nested")
    try:
        config = common.dbos_config("nested")
    except common.ConfigError as exc:
        common.fail(str(exc))
    crash_in, crash_tree = args.crash_in, args.crash_tree
    common.check_reachable(config["system_database_url"])
    pending = common.pending_before_launch(config, wf_root)
    common.launch(config)
    DBOS.register_queue(QUEUE, polling_interval_sec=POLL)
    # A run is two roots with ids derived from one run id, so a resumed run
    # finds both: the interrupted one (recovered) and the other (done or not yet started).
    run_id, sleep_seconds = None, args.sleep_seconds
    if pending:
        mine = DBOS.list_workflows(
            workflow_ids=pending, app_version=DBOS.application_version, load_output=False
        )
        if mine:
            latest = max(mine, key=lambda w: w.created_at or 0)
            run_id = latest.workflow_id.rsplit("-", 1)[0]
            sleep_seconds = latest.input["args"][1] if latest.input else sleep_seconds
            log.info("resuming interrupted run", extra={"workflow_id": latest.workflow_id})
    recovered = run_id is not None
    run_id = run_id or f"nested-{uuid.uuid4().hex[:12]}"
    direct_tree = _run_tree(f"{run_id}-direct", False, sleep_seconds)
    queued_tree = _run_tree(f"{run_id}-queued", True, sleep_seconds)
    DBOS.destroy()
    log.info(
        "summary",
        extra={
            "run_id": run_id,
            "recovered": recovered,
            "steps_run_here": steps_run_here,
            "direct": direct_tree,
            "queued": queued_tree,
        },
    )


if __name__ == "__main__":
    main()
