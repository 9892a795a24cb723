"""Experiment: what happens to object state inside a DBOS class-based workflow?

A ``@DBOS.dbos_class()`` class ``A`` has a class attribute ``counter = 0``. The
workflow creates an instance of ``A`` and calls the instance's step ``steps`` times;
each step does ``self.counter += 1``. What does the counter read at the end, and
what is left of it when the process crashes and DBOS resumes the workflow?

Run it, what to observe and what it means: docs/scope.md.
"""

from __future__ import annotations

import logging
import time

from dbos import DBOS

from lab.cli import run_scope, scope_args
from lab.signals import crash

log = logging.getLogger("scope")

# Process-level facts, for the summary (not workflow state).
executed_here = 0
crash_after: int | None = None


@DBOS.dbos_class()
class A:
    counter = 0

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    @DBOS.step()
    def step(self, number: int, step_seconds: float) -> int:
        global executed_here
        executed_here += 1
        self.counter += 1  # reads A.counter once, then shadows it on self
        log.info(
            "step",
            extra={
                "step": number,
                "instance_id": self.instance_id,
                "instance_counter": self.counter,
                "class_counter": A.counter,
            },
        )
        time.sleep(step_seconds)
        return self.counter

    @staticmethod
    @DBOS.workflow()
    def run(steps: int, step_seconds: float) -> dict[str, object]:
        # Not deterministic on purpose: a recovered run gets a new instance.
        a = A(instance_id=str(time.time()))
        log.info("instance created", extra={"instance_id": a.instance_id})
        for number in range(1, steps + 1):
            a.step(number, step_seconds)
            if crash_after == number:
                # Step `number` is checkpointed; nothing after it runs.
                crash(after_step=number)
        return {"steps": steps, "instance_counter": a.counter, "instance_id": a.instance_id}


def main(argv: list[str] | None = None) -> None:
    global crash_after
    args = scope_args(__doc__.splitlines()[0], argv)
    # The crash is a property of this process, not a workflow input: the resumed
    # run must not crash again.
    crash_after = args.crash_after
    workflow_id, result, recovered = run_scope("scope", A.run, args)
    log.info(
        "summary",
        extra={
            "workflow_id": workflow_id,
            "steps": result["steps"],
            "executed_here": executed_here,
            "recovered": recovered,
            "instance_counter": result["instance_counter"],
            "class_counter": A.counter,
        },
    )


if __name__ == "__main__":
    main()
