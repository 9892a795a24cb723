"""Experiment: what happens to a module-level global inside a DBOS workflow?

Question
    ``scope.py`` with plain functions: a module-level ``counter = 0``, a step
    function that does ``global counter; counter += 1``, and a workflow that
    calls it ``steps`` times. What does the global read at the end, and what is
    left of it when the process crashes and DBOS resumes the workflow?

Run
    python scope_funcs.py --steps 5 --step-seconds 0                # a clean run
    python scope_funcs.py --steps 5 --step-seconds 0 --crash-after 2  # dies (exit 3)
    python scope_funcs.py                                           # resumes it

Observe (last stdout line, ``"message": "summary"``)
    clean run:        executed_here=5, module_counter=5
    crash + resume:   same workflow_id, recovered=true, executed_here=3,
                      module_counter=3

What it means
    A global lives in the process, not in the workflow. The new process starts
    at 0, DBOS replays steps 1 and 2 from their recorded outputs without running
    their bodies, and only steps 3..5 increment the global. Unlike the class
    version there is no shadowing here (``global`` writes the module attribute),
    but the lesson is the same: only step outputs are durable.
"""

from __future__ import annotations

import logging
import time

from dbos import DBOS

import common

log = logging.getLogger("scope_funcs")

counter = 0
# Process-level facts, for the summary (not workflow state).
executed_here = 0
crash_after: int | None = None


@DBOS.step()
def count_step(number: int, step_seconds: float) -> int:
    global counter, executed_here
    executed_here += 1
    counter += 1
    log.info("step", extra={"step": number, "module_counter": counter})
    time.sleep(step_seconds)
    return counter


@DBOS.workflow()
def count_workflow(steps: int, step_seconds: float) -> dict[str, object]:
    for number in range(1, steps + 1):
        count_step(number, step_seconds)
        if crash_after == number:
            # Step `number` is checkpointed; nothing after it runs.
            common.crash(after_step=number)
    return {"steps": steps, "module_counter": counter}


def main(argv: list[str] | None = None) -> None:
    global crash_after
    args = common.scope_args(__doc__.splitlines()[0], argv)
    common.setup_logging("scope-funcs")
    # A property of this process, not a workflow input: the resumed run must not crash again.
    crash_after = args.crash_after
    handle, recovered = common.launch_and_resume(
        "scope-funcs", count_workflow, args.steps, args.step_seconds
    )
    result = handle.get_result()
    DBOS.destroy()
    log.info(
        "summary",
        extra={
            "workflow_id": handle.get_workflow_id(),
            "steps": result["steps"],
            "executed_here": executed_here,
            "recovered": recovered,
            "module_counter": counter,
        },
    )


if __name__ == "__main__":
    main()
