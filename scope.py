"""Experiment: what happens to object state inside a DBOS class-based workflow?

Question
    A ``@DBOS.dbos_class()`` class ``A`` has a class attribute ``counter = 0``.
    The workflow creates an instance of ``A`` (its id taken from the current
    time) and calls the instance's step ``steps`` times; each step does
    ``self.counter += 1``. What does the counter read at the end, and what is
    left of it when the process crashes and DBOS resumes the workflow?

Run
    python scope.py --steps 5 --step-seconds 0            # a clean run
    python scope.py --steps 5 --step-seconds 0 --crash-after 2   # dies (exit 3)
    python scope.py                                       # resumes that workflow

Observe (last stdout line, ``"message": "summary"``)
    clean run:        executed_here=5, instance_counter=5, class_counter=0
    crash + resume:   same workflow_id, recovered=true, executed_here=3,
                      instance_counter=3

What it means
    - Step *outputs* are durable; object state is not. On recovery DBOS re-runs
      the workflow function from the top: a *new* instance is created (with a
      new time-based id), the two completed steps are replayed from their
      recorded outputs without running their bodies, and only steps 3..5 run.
      So the new instance counts 3, not 5.
    - ``self.counter += 1`` reads the class attribute once and then writes an
      *instance* attribute that shadows it: ``A.counter`` stays 0.
    - Keep anything a workflow must remember in step return values (or
      workflow inputs), never in ``self``.
"""

from __future__ import annotations

import logging
import time

from dbos import DBOS

import common

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
                common.crash(after_step=number)
        return {"steps": steps, "instance_counter": a.counter, "instance_id": a.instance_id}


def main(argv: list[str] | None = None) -> None:
    global crash_after
    args = common.scope_args(__doc__.splitlines()[0], argv)
    common.setup_logging("scope")
    # The crash is a property of this process, not a workflow input: the resumed
    # run must not crash again.
    crash_after = args.crash_after
    handle, recovered = common.launch_and_resume("scope", A.run, args.steps, args.step_seconds)
    result = handle.get_result()
    DBOS.destroy()
    log.info(
        "summary",
        extra={
            "workflow_id": handle.get_workflow_id(),
            "steps": result["steps"],
            "executed_here": executed_here,
            "recovered": recovered,
            "instance_counter": result["instance_counter"],
            "class_counter": A.counter,
        },
    )


if __name__ == "__main__":
    main()
