"""Experiment: what happens to objects and counters inside a long-lived web process?

``scope.py`` showed that an object created inside a workflow does not survive a
crash. In a FastAPI server the process lives on between requests: which state grows
from request to request, which starts again at zero after a restart, and what can
still be read from the database afterwards?

Run it, what to observe and what it means: docs/fastapi_scope.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from dbos import DBOS, DBOSConfiguredInstance, SetWorkflowID
from fastapi import FastAPI, Query

from lab.config import ServeSettings
from lab.launch import SettingsAtStart, dbos_lifespan, serve
from lab.logs import uvicorn_logging
from lab.views import workflow_view

APP = "fastapi-scope"
log = logging.getLogger("fastapi_scope")

# uvicorn logs its first lines before the lifespan runs: JSON for those too (no DBOS,
# no database at import; an importer's own logging is left alone).
uvicorn_logging(APP)

DEFAULT_STEPS = 5
DEFAULT_STEP_SECONDS = 0.1
SYNC_MAX_STEPS = 20
SYNC_MAX_STEP_SECONDS = 0.5
ASYNC_MAX_STEPS = 50
ASYNC_MAX_STEP_SECONDS = 1.0

# Process-level counters: plain module state, shared by all requests, gone on restart.
_lock = threading.Lock()
process_counters = {"triggers": 0, "step_bodies_run": 0}


def _count(name: str) -> None:
    with _lock:  # requests and workflows run on several threads
        process_counters[name] += 1


@DBOS.dbos_class()
class A:
    counter = 0

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    @DBOS.step()
    def step(self, number: int, step_seconds: float) -> int:
        _count("step_bodies_run")
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
    def run(steps: int, step_seconds: float) -> dict[str, Any]:
        # A new object per run (a recovered run gets another one).
        a = A(instance_id=str(time.time()))
        for number in range(1, steps + 1):
            a.step(number, step_seconds)
        return {
            "steps": steps,
            "instance_id": a.instance_id,
            "instance_counter": a.counter,
            "class_counter": A.counter,
        }


@DBOS.dbos_class()
class Tally(DBOSConfiguredInstance):
    """A long-lived object with workflow methods: one per process, named for DBOS."""

    counter = 0

    def __init__(self, config_name: str) -> None:
        self._lock = threading.Lock()
        super().__init__(config_name)

    @DBOS.step()
    def step(self, number: int, step_seconds: float) -> int:
        _count("step_bodies_run")
        with self._lock:  # concurrent requests share this object
            self.counter += 1
            seen = self.counter
        log.info("tally step", extra={"step": number, "tally_counter": seen})
        time.sleep(step_seconds)
        return seen

    @DBOS.workflow()
    def run(self, steps: int, step_seconds: float) -> dict[str, Any]:
        before = self.counter
        for number in range(1, steps + 1):
            self.step(number, step_seconds)
        return {
            "steps": steps,
            "config_name": self.config_name,
            "counter_before": before,
            "counter_after": self.counter,
        }


# DBOS finds configured instances by name, so they must exist before DBOS.launch()
# (recovery looks this one up): created at import, like a decorator registration.
tally = Tally("tally")
settings = SettingsAtStart(ServeSettings.load)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    async with dbos_lifespan(APP, settings):
        yield


app = FastAPI(
    title="fastapi_scope",
    summary="Which state is durable, which is per process, which is per workflow run.",
    lifespan=lifespan,
)


def _steps(maximum: int) -> Any:
    return Query(ge=1, le=maximum, description=f"number of steps, 1..{maximum}")


def _step_seconds(maximum: float) -> Any:
    return Query(ge=0, le=maximum, description=f"sleep in each step, 0..{maximum} s")


def _run_to_end(
    workflow: Callable[[int, float], dict[str, Any]], steps: int, step_seconds: float
) -> dict[str, Any]:
    """Run ``workflow`` to completion inside the request, under an id chosen here."""
    _count("triggers")
    workflow_id = str(uuid.uuid4())
    with SetWorkflowID(workflow_id):
        result = workflow(steps, step_seconds)
    return {"workflow_id": workflow_id, "status": "SUCCESS", "result": result}


# `def` endpoints run on a worker thread, where the workflow may block until it ends.
@app.post("/trigger_sync")
def trigger_sync(
    steps: Annotated[int, _steps(SYNC_MAX_STEPS)] = DEFAULT_STEPS,
    step_seconds: Annotated[float, _step_seconds(SYNC_MAX_STEP_SECONDS)] = DEFAULT_STEP_SECONDS,
) -> dict[str, Any]:
    """Run ``A.run`` to completion inside the request (at most 10 s)."""
    return _run_to_end(A.run, steps, step_seconds)


# `DBOS.start_workflow_async` only takes `async def` workflows; `A.run` is sync, so
# this is a `def` endpoint too (it returns as soon as the workflow has started).
# response_model=None: FastAPI would validate a `def` endpoint's answer on the same
# thread pool, queued behind every request not yet started, so in a burst every answer
# would leave at its end (the reliability suite's load area measured it).
@app.post("/trigger_async", status_code=202, response_model=None)
def trigger_async(
    steps: Annotated[int, _steps(ASYNC_MAX_STEPS)] = DEFAULT_STEPS,
    step_seconds: Annotated[float, _step_seconds(ASYNC_MAX_STEP_SECONDS)] = DEFAULT_STEP_SECONDS,
) -> dict[str, Any]:
    """Start ``A.run`` in the background; poll ``GET /workflows/{workflow_id}``."""
    _count("triggers")
    handle = DBOS.start_workflow(A.run, steps, step_seconds)
    return {"workflow_id": handle.workflow_id, "status": handle.get_status().status}


@app.post("/instance/trigger_sync")
def instance_trigger_sync(
    steps: Annotated[int, _steps(SYNC_MAX_STEPS)] = DEFAULT_STEPS,
    step_seconds: Annotated[float, _step_seconds(SYNC_MAX_STEP_SECONDS)] = DEFAULT_STEP_SECONDS,
) -> dict[str, Any]:
    """Run the workflow method of the long-lived ``tally`` to completion (at most 10 s)."""
    return _run_to_end(tally.run, steps, step_seconds)


@app.get("/counters")
def counters() -> dict[str, Any]:
    """Process-level state: grows across requests, zero again after a restart."""
    with _lock:
        snapshot = dict(process_counters)
    return {
        "process_id": os.getpid(),
        **snapshot,
        "class_counter": A.counter,
        "tally_counter": tally.counter,
    }


@app.get("/workflows/{workflow_id}", responses={404: {"description": "no workflow with this id"}})
async def get_workflow(workflow_id: str) -> dict[str, Any]:
    """Status of any workflow, from the database (also runs from before a restart)."""
    return await workflow_view(workflow_id)


def main() -> None:
    serve(app, APP, settings)


if __name__ == "__main__":
    main()
