"""The shutdown demo's live page: ``GET /`` and the JSON it polls.

``router(...)`` returns an APIRouter for an app that runs a fan-out workflow (its
steps enqueued as child workflows ``<fan-out id>-<i + 1>``) and a DBOS schedule:

    GET /                              the page (shutdown/static: HTML, JS, CSS; no CDN)
    GET /fanouts?limit=N               recent fan-outs, newest first
    GET /workflows/{id}/steps          one fan-out's steps: status, executor, times,
                                       attempts (dispatches: 2+ = ran again after a
                                       recovery)
    GET /schedule/slots?limit=N        the schedule's recent slots and who ran each

Everything it shows comes from DBOS's system database (``DBOS.list_workflows``): no
state of its own, so a restarted server shows what the crashed one left. Answers hold
ids, statuses, executor ids and times only (no inputs beyond steps, max_n and the
executor mode, no outputs, no secrets) and are bounded (``max_steps`` steps, ``MAX_LIMIT`` rows).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from dbos import DBOS, WorkflowStatus
from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel

from lab.views import find_workflow

STATIC = Path(__file__).resolve().parent / "static"
MAX_LIMIT = 50
MAX_ID_LENGTH = 200
# The page may load its own files and talk to its own origin, nothing else.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Step(BaseModel):
    index: int
    workflow_id: str | None
    # WAITING (not enqueued yet), ENQUEUED, PENDING (running), SUCCESS, ERROR, ...
    status: str
    executor_id: str | None
    enqueued_at: int | None  # epoch ms
    started_at: int | None  # epoch ms of the latest dispatch
    completed_at: int | None
    attempts: int  # dispatches: 1 = ran once, 2+ = dispatched again after a recovery


class FanOutSteps(BaseModel):
    workflow_id: str
    status: str
    executor_id: str | None
    created_at: int | None
    completed_at: int | None
    attempts: int
    total: int
    max_n: int | None
    mode: str | None  # where the steps compute (process|thread), if the fan-out says
    done: int
    rerun: int  # steps dispatched more than once
    steps: list[Step]


class FanOut(BaseModel):
    workflow_id: str
    status: str
    executor_id: str | None
    created_at: int | None
    completed_at: int | None
    steps: int | None
    max_n: int | None
    mode: str | None


class Slot(BaseModel):
    workflow_id: str
    scheduled_time: str
    status: str
    executor_id: str | None
    created_at: int | None
    started_at: int | None
    completed_at: int | None


def _arg(wf: Any, position: int) -> Any:
    """A positional input of a workflow (None when it has fewer)."""
    args = list((wf.input or {}).get("args") or [])
    return args[position] if len(args) > position else None


def _int_arg(wf: Any, position: int) -> int | None:
    value = _arg(wf, position)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _mode(wf: Any) -> str | None:
    """The fan-out's third input, when it has one: where its steps compute
    (``executor=process|thread``)."""
    value = _arg(wf, 2)
    return value if isinstance(value, str) and len(value) <= 20 else None


def _static(name: str, media_type: str) -> Callable[[], Awaitable[Response]]:
    body = (STATIC / name).read_bytes()  # read once: a missing file fails at startup

    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve


def _ran_by(wf: WorkflowStatus) -> str | None:
    """The executor that ran ``wf``: until dequeued the row names the process that
    enqueued it, not a runner."""
    return wf.executor_id if wf.dequeued_at or wf.completed_at else None


def _fan_out_fields(wf: WorkflowStatus) -> dict[str, Any]:
    """What both fan-out answers (the list and one fan-out's steps) say of the fan-out."""
    return {
        "workflow_id": wf.workflow_id,
        "status": wf.status,
        "executor_id": wf.executor_id,
        "created_at": wf.created_at,
        "completed_at": wf.completed_at,
        "max_n": _int_arg(wf, 1),
        "mode": _mode(wf),
    }


def _children_by_index(
    workflow_id: str, children: list[WorkflowStatus], total: int
) -> dict[int, WorkflowStatus]:
    """The fan-out's child workflows by step index (``<fan-out id>-<i + 1>`` is step
    ``i``); children named otherwise or beyond ``total`` are left out."""
    by_index: dict[int, WorkflowStatus] = {}
    for child in children:
        suffix = child.workflow_id[len(workflow_id) + 1 :]
        if child.workflow_id.startswith(workflow_id + "-") and suffix.isdigit():
            index = int(suffix) - 1
            if 0 <= index < total:
                by_index[index] = child
    return by_index


def _step_row(index: int, child: WorkflowStatus | None) -> Step:
    """Step ``index`` as its child workflow shows it; WAITING before it is enqueued."""
    if child is None:
        return Step(
            index=index,
            workflow_id=None,
            status="WAITING",
            executor_id=None,
            enqueued_at=None,
            started_at=None,
            completed_at=None,
            attempts=0,
        )
    return Step(
        index=index,
        workflow_id=child.workflow_id,
        status=child.status,
        executor_id=_ran_by(child),
        enqueued_at=child.created_at,
        started_at=child.dequeued_at,
        completed_at=child.completed_at,
        attempts=child.recovery_attempts or 0,
    )


async def _fan_out_steps(wf: WorkflowStatus, max_steps: int) -> FanOutSteps:
    """The fan-out ``wf`` with a row per step (at most ``max_steps``)."""
    children = await DBOS.list_workflows_async(
        parent_workflow_id=wf.workflow_id, load_input=False, load_output=False
    )
    total = min(_int_arg(wf, 0) or len(children), max_steps)
    by_index = _children_by_index(wf.workflow_id, children, total)
    rows = [_step_row(index, by_index.get(index)) for index in range(total)]
    return FanOutSteps(
        **_fan_out_fields(wf),
        attempts=wf.recovery_attempts or 0,
        total=total,
        done=sum(r.status == "SUCCESS" for r in rows),
        rerun=sum(r.attempts > 1 for r in rows),
        steps=rows,
    )


def _slot_row(wf: WorkflowStatus, prefix: str) -> Slot:
    return Slot(
        workflow_id=wf.workflow_id,
        scheduled_time=wf.workflow_id[len(prefix) :],
        status=wf.status,
        executor_id=_ran_by(wf),
        created_at=wf.created_at,
        started_at=wf.dequeued_at,
        completed_at=wf.completed_at,
    )


def _add_static_routes(api: APIRouter) -> None:
    """The page and its own files (kept out of the OpenAPI schema)."""
    for path, name, media_type in (
        ("/", "page.html", "text/html; charset=utf-8"),
        ("/page/page.js", "page.js", "text/javascript; charset=utf-8"),
        ("/page/page.css", "page.css", "text/css; charset=utf-8"),
    ):
        api.add_api_route(path, _static(name, media_type), methods=["GET"], include_in_schema=False)

    @api.get("/favicon.ico", include_in_schema=False, status_code=204)
    async def favicon() -> Response:
        return Response(status_code=204, headers=HEADERS)  # no icon; no 404 in the console


def _add_fan_out_routes(api: APIRouter, name: str, max_steps: int) -> None:
    """``/fanouts`` and ``/workflows/{id}/steps`` for the fan-out workflow ``name``."""

    @api.get("/fanouts", response_model=list[FanOut])
    async def fanouts(
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="rows, newest first")] = 10,
    ) -> list[FanOut]:
        """Recent fan-outs, newest first: status, steps, max_n and executor mode."""
        found = await DBOS.list_workflows_async(
            name=name, sort_desc=True, limit=limit, load_input=True, load_output=False
        )
        return [FanOut(**_fan_out_fields(wf), steps=_int_arg(wf, 0)) for wf in found]

    @api.get(
        "/workflows/{workflow_id}/steps",
        response_model=FanOutSteps,
        responses={404: {"description": "no such fan-out"}},
    )
    async def steps(
        workflow_id: Annotated[str, PathParam(min_length=1, max_length=MAX_ID_LENGTH)],
    ) -> FanOutSteps:
        """Each step of a fan-out: status, executor id, enqueue/start/end times (epoch
        ms) and attempts (how often it was dispatched: 2+ means it ran again after a
        recovery)."""
        wf = await find_workflow(workflow_id, name=name, what="fan-out workflow", load_output=False)
        return await _fan_out_steps(wf, max_steps)


def _add_slot_routes(api: APIRouter, prefix: str) -> None:
    """``/schedule/slots`` for the schedule whose workflow ids start with ``prefix``."""

    @api.get("/schedule/slots", response_model=list[Slot])
    async def slots(
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="rows, newest first")] = 12,
    ) -> list[Slot]:
        """The schedule's recent slots (one workflow per slot, ``sched-<name>-<time>``),
        newest first, with the executor that ran each."""
        found = await DBOS.list_workflows_async(
            workflow_id_prefix=prefix,
            sort_desc=True,
            limit=limit,
            load_input=False,
            load_output=False,
        )
        return [_slot_row(wf, prefix) for wf in found]


def router(*, fan_out: Callable[..., Any], schedule: str, max_steps: int) -> APIRouter:
    """The page's routes for the app whose fan-out workflow is ``fan_out`` (first two
    inputs: steps, max_n; at most ``max_steps`` steps) and whose schedule is named
    ``schedule``."""
    api = APIRouter()
    _add_static_routes(api)
    _add_fan_out_routes(api, fan_out.__qualname__, max_steps)
    _add_slot_routes(api, f"sched-{schedule}-")
    return api
