"""Experiment: how do child workflows form a tree, called directly or through a queue?

``wf_root`` calls ``wf``, which calls ``wf_child``, which calls the step ``wf_step``;
a ``queued`` flag chooses, at every level, between calling the child directly and
enqueuing it on ``nested_queue``. What ids do the children get, what do
``parent_workflow_id`` and ``queue_name`` show, and what does recovery do to a tree
that crashed half-way?

Run it, what to observe and what it means: docs/nested_wfs.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
import uuid
from typing import Any

from dbos import DBOS, SetWorkflowID, WorkflowHandle

from lab.cli import flag_parser
from lab.config import dbos_config
from lab.launch import launch_recovering
from lab.logs import exit_on_config_error, setup_logging

log = logging.getLogger("nested_wfs")

QUEUE = "nested_queue"
POLL = 0.1  # seconds between checks for a queue's result or new work
LEVELS = ("root", "wf", "child")
TREES = ("direct", "queued")
DEFAULT_SLEEP_SECONDS = 1.0

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


def _parent(level: str, child: Any, queued: bool, sleep_seconds: float) -> dict[str, Any]:
    """A level above the child: run ``child`` (directly or through the queue, as
    ``queued`` says: the same at every level of a tree), then sleep durably."""
    node = _enter(level, queued)
    node["children"].append(_call(child, queued, queued, sleep_seconds)[0])
    _sleep(level, queued, sleep_seconds)
    return node


@DBOS.workflow()
def wf(queued: bool, sleep_seconds: float) -> dict[str, Any]:
    return _parent("wf", wf_child, queued, sleep_seconds)


@DBOS.workflow()
def wf_root(queued: bool, sleep_seconds: float) -> dict[str, Any]:
    return _parent("root", wf, queued, sleep_seconds)


def _run_tree(workflow_id: str, queued: bool, sleep_seconds: float) -> dict[str, Any]:
    """Start a root (directly, or on the queue in the background) and wait for its
    tree; a root that exists already (finished, or being recovered) is only awaited."""
    handle: WorkflowHandle[dict[str, Any]]
    if DBOS.get_workflow_status(workflow_id) is not None:
        handle = DBOS.retrieve_workflow(workflow_id)
    else:
        with SetWorkflowID(workflow_id):
            if queued:
                handle = DBOS.enqueue_workflow(QUEUE, wf_root, True, sleep_seconds)
            else:
                handle = DBOS.start_workflow(wf_root, False, sleep_seconds)
    return handle.get_result(polling_interval_sec=POLL)


FLAGS: dict[str, dict[str, Any]] = {
    "--sleep-seconds": {
        "type": float,
        "default": DEFAULT_SLEEP_SECONDS,
        "help": f"durable sleep in each workflow (default {DEFAULT_SLEEP_SECONDS:g})",
    },
    "--crash-in": {
        "choices": LEVELS,
        "help": "exit abruptly (code 3) during this level's durable sleep",
    },
    "--crash-tree": {
        "choices": TREES,
        "default": "direct",
        "help": "which tree --crash-in applies to (default direct)",
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flag_parser(__doc__.splitlines()[0], FLAGS)
    args = parser.parse_args(argv)
    if args.sleep_seconds < 0:
        parser.error("--sleep-seconds must not be negative")
    if args.crash_in and args.sleep_seconds <= 0:
        parser.error("--crash-in needs --sleep-seconds > 0 (the crash happens during the sleep)")
    return args


def register_queue() -> None:
    DBOS.register_queue(QUEUE, polling_interval_sec=POLL)


def main(argv: list[str] | None = None) -> None:
    global crash_in, crash_tree
    args = parse_args(argv)
    setup_logging("nested")
    crash_in, crash_tree = args.crash_in, args.crash_tree
    with exit_on_config_error():
        interrupted = launch_recovering(dbos_config("nested"), wf_root, register_queue)
    # A run is two roots with ids derived from one run id, so a resumed run
    # finds both: the interrupted one (recovered) and the other (done or not yet started).
    run_id, sleep_seconds = f"nested-{uuid.uuid4().hex[:12]}", args.sleep_seconds
    if interrupted is not None:
        run_id = interrupted.workflow_id.rsplit("-", 1)[0]
        sleep_seconds = interrupted.input["args"][1] if interrupted.input else sleep_seconds
        log.info("resuming interrupted run", extra={"workflow_id": interrupted.workflow_id})
    direct_tree = _run_tree(f"{run_id}-direct", False, sleep_seconds)
    queued_tree = _run_tree(f"{run_id}-queued", True, sleep_seconds)
    DBOS.destroy()
    log.info(
        "summary",
        extra={
            "run_id": run_id,
            "recovered": interrupted is not None,
            "steps_run_here": steps_run_here,
            "direct": direct_tree,
            "queued": queued_tree,
        },
    )


if __name__ == "__main__":
    main()
