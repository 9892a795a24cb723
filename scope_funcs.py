"""Experiment: what happens to a module-level global inside a DBOS workflow?

``scope.py`` with plain functions: a module-level ``counter = 0``, a step function
that does ``global counter; counter += 1``, and a workflow that calls it ``steps``
times. What does the global read at the end, and what is left of it when the
process crashes and DBOS resumes the workflow?

Run it, what to observe and what it means: docs/scope_funcs.md.
"""

from __future__ import annotations

import logging
import time

from dbos import DBOS

from lab.cli import run_scope, scope_args
from lab.signals import crash

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
            crash(after_step=number)
    return {"steps": steps, "module_counter": counter}


def main(argv: list[str] | None = None) -> None:
    global crash_after
    args = scope_args(__doc__.splitlines()[0], argv)
    # The crash is a property of this process, not a workflow input: the resumed
    # run must not crash again.
    crash_after = args.crash_after
    workflow_id, result, recovered = run_scope("scope-funcs", count_workflow, args)
    log.info(
        "summary",
        extra={
            "workflow_id": workflow_id,
            "steps": result["steps"],
            "executed_here": executed_here,
            "recovered": recovered,
            "module_counter": counter,
        },
    )


if __name__ == "__main__":
    main()
