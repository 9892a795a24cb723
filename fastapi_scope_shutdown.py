"""Experiment: how does a DBOS service live and die?

A FastAPI + DBOS service fans CPU-heavy Fibonacci steps out on a queue, runs a
workflow every 5 seconds, and can be told to stop, gracefully or by crashing.
What does each kind of stop leave behind, what does the next start recover,
and what changes when several worker processes share one Postgres?

Run it, what to observe and what it means: docs/fastapi_scope_shutdown.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from dbos import DBOS, SetWorkflowAttributes, SetWorkflowID
from dbos._error import DBOSWorkflowIDInUseError
from fastapi import BackgroundTasks, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from lab import config, logs, signals
from lab.launch import check_reachable, launch
from lab.views import find_workflow
from shutdown import page, pool
from shutdown.admission import STEPS_ATTRIBUTE, Admission
from shutdown.fib import fib as fib  # its own module: a pool process imports it, and nothing else
from shutdown.health import HealthCheck
from shutdown.settings import DEFAULT_MAX_QUEUED_STEPS as DEFAULT_MAX_QUEUED_STEPS
from shutdown.settings import MAX_MAX_QUEUED_STEPS as MAX_MAX_QUEUED_STEPS
from shutdown.settings import MAX_SLOTS as MAX_SLOTS  # the app's own limit, for its tests
from shutdown.settings import ShutdownSettings
from shutdown.slots import ExecutorSlots

APP = "shutdown"
log = logging.getLogger("fastapi_scope_shutdown")

# uvicorn logs its first lines before the lifespan runs: JSON for those too (no DBOS,
# no database at import).
logs.uvicorn_logging(APP)

QUEUE = "shutdown-fib"
QUEUE_CONCURRENCY = 50  # steps running at once, across all workers


def worker_concurrency(workers: int) -> int:
    """Each worker's share of the queue's slots, the most steps one worker runs at
    once: the workers together fill the queue, none claims it all in one poll (DBOS
    claims min(its own room, limit - running)). One worker takes every slot, so a
    default fan-out is claimed as it is enqueued, not in waves one poll apart. DBOS
    keeps it in the queue's row, shared by all workers: every worker of one run
    registers the same value (each loads the same WORKERS, see shutdown/settings.py)."""
    return -(-QUEUE_CONCURRENCY // workers)


# A step is dequeued on the next poll: at DBOS's default 1 s every wave would wait up
# to a second. A poll is a few small indexed queries.
QUEUE_POLLING_SEC = 0.2
SCHEDULE = "shutdown-every-5s"
CRON = "*/5 * * * * *"  # 6 fields: seconds first

# fib(30) takes ~0.1 s of CPU, fib(32) ~0.2 s: the default request is ~2 CPU-s, the
# caps bound one at ~2 min of CPU.
DEFAULT_STEPS, MAX_STEPS = 50, 500
DEFAULT_MAX_N, MAX_MAX_N = 30, 32
# How long DBOS.destroy waits for running workflows on a graceful stop. Below
# Docker's 10 s stop timeout, after which Docker sends SIGKILL.
GRACE_SECONDS = 5
# uvicorn's wait for open connections on a graceful stop.
UVICORN_GRACEFUL_SEC = 5
# uvicorn's supervisor kills a worker that does not answer its ping within this long.
# A worker answers only once it has imported the app (seconds of CPU, many more on a
# loaded machine): at uvicorn's default, 5 s, workers on a busy 2-core machine were
# killed before they could answer, in a loop. A hung worker is replaced this much later.
WORKER_HEALTHCHECK_SEC = 30
# Executor-slot leases (shutdown/slots.py), timed on the database's clock. A process renews
# its lease every RENEW_EVERY_SEC; one that could not confirm it for FENCE_SEC stops
# all work at once (it fences itself); a peer may take an unrenewed slot over
# LEASE_SEC after its last renewal, so LEASE_SEC - FENCE_SEC (2 s) is the margin by
# which the owner has stopped before. A crash or silent loss is taken over within
# about LEASE_SEC + ADOPT_EVERY_SEC. Raising FENCE_SEC tolerates longer database
# blips and starved threads without a restart, and delays every takeover as much.
RENEW_EVERY_SEC = 1.0
FENCE_SEC = 4.0
LEASE_SEC = 6.0
# How often every process looks for expired slots with PENDING work to adopt.
ADOPT_EVERY_SEC = 1.0
# Postgres ends a session left idle inside an open transaction after this long
# (DBOS's idle_in_transaction_session_timeout; its default is 60 s). A replica cut off
# or frozen mid-transaction keeps that transaction's row locks, and the adopter's
# re-enqueue would wait for them: they must be gone before the lease expires, at most
# LEASE_SEC - RENEW_EVERY_SEC after the cut. DBOS's own transactions last milliseconds.
IDLE_TRANSACTION_SEC = 3.0


def fence(slot: int, stopping: bool) -> None:
    """A lost slot: end this process image now; a re-executed single process asks
    for its slot back (a uvicorn worker's replacement finds it by its dead pid)."""
    signals.fence(slots.rejoin_env(), stopping=stopping)


TRACKER_WARNINGS = "ignore::UserWarning:multiprocessing.resource_tracker"

# Executor ids: every process claims a numbered slot, executor "shutdown-<n>" (shutdown/slots.py).
slots = ExecutorSlots(
    APP,
    max_slots=MAX_SLOTS,
    lease_sec=LEASE_SEC,
    renew_every_sec=RENEW_EVERY_SEC,
    fence_sec=FENCE_SEC,
    adopt_every_sec=ADOPT_EVERY_SEC,
    on_fence=fence,
    logger=log,
)
settings: ShutdownSettings | None = None  # read once at start: main(), else the lifespan
health: HealthCheck | None = None  # made at startup, once the URL is known
serving = False  # DBOS runs as this process's executor (its slot claimed)
# How long a stop waits for a claim in progress to give up (one attempt's bound).
CLAIM_STOP_SEC = 5
# Answered while a re-executed process waits for a slot: its docs, and /healthz's 503.
OPEN_WHILE_REJOINING = ("/healthz", "/openapi.json", "/docs", "/redoc")


# --- the work ---------------------------------------------------------------

# "process": fib runs in the service's process pool, the step thread waits without the
# GIL; "thread": in the step thread, sharing one core (the GIL) with the whole process.
Executor = Literal["process", "thread"]


@DBOS.step()
def fib_step(index: int, n: int, executor: Executor = "process") -> int:
    ledger = settings.fib_ledger if settings is not None else ""
    if ledger:
        # The tests' witness of body executions, written before the body runs: one
        # short O_APPEND write, atomic across worker and pool processes, that a
        # SIGKILL cannot lose (why not a log line: docs/fastapi_scope_shutdown.md).
        with open(ledger, "a") as f:
            f.write(f"{index} {os.getpid()} {DBOS.workflow_id} {executor}\n")
    return pool.run(fib, n) if executor == "process" else fib(n)


@DBOS.workflow()
def fan_out(steps: int, max_n: int, executor: Executor = "process") -> list[int]:
    # Heaviest first (the last steps): they start while the rest are still being
    # enqueued, a few ms each, and the short ones fill the gaps at the end. Step i is
    # child <parent>-<i + 1> whatever the order. Each enqueue is recorded in this
    # workflow: a recovered run re-attaches to the same children instead of enqueueing
    # new ones; with their executor, an input.
    handles = {}
    for i in reversed(range(steps)):
        with SetWorkflowID(f"{DBOS.workflow_id}-{i + 1}"):
            handles[i] = DBOS.enqueue_workflow(QUEUE, fib_step, i, min(i, max_n), executor)
    return [handles[i].get_result(polling_interval_sec=QUEUE_POLLING_SEC) for i in range(steps)]


@DBOS.workflow()
def every_five_seconds(scheduled_time: datetime, context: Any) -> None:
    log.info(
        "scheduled workflow",
        extra={
            "scheduled_time": scheduled_time.isoformat(),
            "actual_time": datetime.now(UTC).isoformat(),
            "workflow_id": DBOS.workflow_id,
            "executor_id": DBOS.executor_id,
            "pid": os.getpid(),
        },
    )


# --- the service --------------------------------------------------------------


def queue_sharers(workers: int) -> int:
    """The processes that share the queue: the server's WORKERS when this is one of
    uvicorn's worker processes, else this process alone (``uvicorn ...:app``, as in the
    Docker image, or WORKERS=1: the whole queue is its share)."""
    return workers if signals.master_pid() is not None else 1


async def start_serving(cfg: dict[str, Any], settings: ShutdownSettings) -> None:
    """Claim a slot, start the pool and DBOS, register the queue and the schedule. A
    launch that fails ends the process with one line, also when this runs as a task."""
    global serving, admission
    url = settings.database.url
    # A process fenced and re-executed, or a uvicorn worker (perhaps the replacement
    # of a fenced one), waits for the database and a free slot; a first start of a
    # lone process fails at once with one line instead.
    waiting = settings.rejoin is not None or signals.master_pid() is not None
    # The sync DBOS APIs refuse to run on the event loop: these run on threads.
    if not waiting:
        with logs.exit_on_config_error():
            await asyncio.to_thread(check_reachable, url)
    slot = await asyncio.to_thread(slots.claim, url, wait=waiting, rejoin=settings.rejoin)
    cfg["executor_id"] = slots.executor_id(slot)
    cfg["sys_db_idle_transaction_timeout_sec"] = IDLE_TRANSACTION_SEC
    log.info(
        "executor slot claimed",
        extra={
            "executor_id": slots.executor_id(slot),
            "slot": slot,
            "pid": os.getpid(),
            "rejoin": settings.rejoin is not None,
        },
    )
    # After a fence, the pool's resource tracker outlives the image and frees the pool's
    # semaphores, warning on stderr (a line that is not JSON): expected then, silenced.
    # The tracker is started with this interpreter's -W options (sys.warnoptions).
    if TRACKER_WARNINGS not in sys.warnoptions:
        sys.warnoptions.append(TRACKER_WARNINGS)
    # Up before DBOS launches: recovery and the queue may hand steps to the pool at once,
    # and ready()'s own calls would then wait behind them. Light processes: ~0.5 s.
    pool.start(settings.fib_processes, preload=fib.__module__)
    await asyncio.to_thread(pool.ready)
    with logs.exit_on_config_error():
        await asyncio.to_thread(launch, cfg)
    await DBOS.register_queue_async(
        QUEUE,
        global_concurrency=QUEUE_CONCURRENCY,
        worker_concurrency=worker_concurrency(queue_sharers(settings.workers)),
        polling_interval_sec=QUEUE_POLLING_SEC,
    )
    await DBOS.apply_schedules_async(
        [{"schedule_name": SCHEDULE, "workflow_fn": every_five_seconds, "schedule": CRON}]
    )
    admission = Admission(
        url, APP, fan_out.__qualname__, settings.max_queued_steps, DRAIN_STEPS_PER_SEC
    )
    slots.start_adopting()
    serving = True
    log.info(
        "serving", extra={"database": settings.database.redacted, "executor_id": DBOS.executor_id}
    )


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global health, settings, serving
    logs.setup_logging(APP)
    with logs.exit_on_config_error():
        loaded = settings or ShutdownSettings.load()
    settings = loaded
    cfg = config.dbos_config(APP, loaded.database)
    health = HealthCheck(loaded.database.url, APP)
    if loaded.rejoin is not None:
        signals.reap_children(timeout=5)  # the fenced image's pool, ending
    # Re-executed after a fence, or a uvicorn worker (the replacement of a fenced one,
    # say) while the database does not answer: listen at once (/healthz answers 503,
    # the rest too) while waiting, however long, for the database and a slot. A worker
    # waiting inside the lifespan would leave the connections uvicorn's supervisor
    # accepts for it unanswered.
    waiting = loaded.rejoin is not None or (
        signals.master_pid() is not None
        and await asyncio.to_thread(health.check_database) is not None
    )
    starting = asyncio.ensure_future(start_serving(cfg, loaded)) if waiting else None
    if starting is None:
        await start_serving(cfg, loaded)
    yield
    try:
        await stop_serving(starting)
    finally:
        # What a start read and made belongs to it: a lifespan run again in this
        # process (the in-process tests do) reads the environment anew.
        settings, serving = None, False


async def stop_serving(starting: asyncio.Future[None] | None) -> None:
    """Stop claiming a slot, or stop DBOS (its grace period), the pool and the slot."""
    if starting is not None:
        slots.stop_claiming()
        await asyncio.wait([starting], timeout=CLAIM_STOP_SEC)
        if starting.done() and not starting.cancelled() and starting.exception():
            log.warning("stopped before serving again", extra={"reason": str(starting.exception())})
    if not serving:
        return  # stopped while rejoining: nothing of DBOS runs yet
    slots.stop_adopting()
    log.info("stopping DBOS", extra={"grace_seconds": GRACE_SECONDS})
    # Synchronous on purpose: the server has stopped serving, and DBOS.destroy shuts
    # down the thread pool asyncio.to_thread would use.
    DBOS.destroy(workflow_completion_timeout_sec=GRACE_SECONDS)
    pool.stop()  # only now: what it cuts off cannot be recorded, so it re-runs on recovery
    slots.release()


app = FastAPI(
    title="fastapi_scope_shutdown",
    summary="Fibonacci fan-out on a 50-way queue, a 5-second schedule, graceful or "
    "crash shutdown, recovery, several workers.",
    lifespan=lifespan,
)


REJOINING = "fenced: waiting for the database to claim an executor slot anew"


@app.middleware("http")
async def rejoining(request: Request, call_next: Any) -> Any:
    """While a fenced process waits to claim a slot anew, DBOS does not run here."""
    if serving or request.url.path in OPEN_WHILE_REJOINING:
        return await call_next(request)
    return JSONResponse(
        {"detail": REJOINING},
        status_code=503,
    )


# GET /: a live page of the fan-outs and the schedule (and the JSON it reads).
app.include_router(page.router(fan_out=fan_out, schedule=SCHEDULE, max_steps=MAX_STEPS))


# --- the trigger: idempotency keys and admission control -------------------

# Idempotency-Key: the client's name for one request. The fan-out's workflow id is
# derived from it, so DBOS's unique workflow ids make a retry find the first start,
# on any replica and after restarts, for as long as the workflow's row exists.
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
KEYED_ID_PREFIX = "trigger-"
# The drain rate of admitted steps, for Retry-After (the excess over MAX_QUEUED_STEPS
# divided by it): 7.6 steps/s is what this 2-core machine, shared by other jobs,
# finished of default fan-outs (50 steps, max_n 30, process pool) admitted at once
# (reliability load area, "overload": 300 steps in 39.5 s).
DRAIN_STEPS_PER_SEC = 7.6
admission: Admission | None = None  # made at startup, once the URL is known


def _start(workflow_id: str | None, steps: int, max_n: int, executor: Executor) -> str:
    """Start the fan-out (on a thread: the sync DBOS API); with an id, only if no
    workflow has it yet (DBOSWorkflowIDInUseError otherwise: one insert decides)."""
    ids = (
        SetWorkflowID(workflow_id, workflow_id_reuse_policy="reject")
        if workflow_id
        else nullcontext()
    )
    with ids, SetWorkflowAttributes({STEPS_ATTRIBUTE: steps}):
        return DBOS.start_workflow(fan_out, steps, max_n, executor).workflow_id


async def _existing(workflow_id: str, args: tuple[Any, ...]) -> JSONResponse | None:
    """The answer to a key already used: 200 with the same id, or 409 when its
    recorded inputs differ; None when no workflow has the id."""
    found = await DBOS.list_workflows_async(workflow_ids=[workflow_id], load_input=True)
    if not found:
        return None
    wf = found[0]
    recorded = tuple(wf.input["args"]) if wf.input else ()
    if wf.name != fan_out.__qualname__ or recorded != args:
        theirs = dict(zip(("steps", "max_n", "executor"), recorded, strict=False))
        return JSONResponse(
            {
                "detail": "Idempotency-Key already used with other parameters: "
                f"{theirs}; send a new key for a new fan-out",
                "workflow_id": workflow_id,
            },
            status_code=409,
        )
    return JSONResponse({"workflow_id": workflow_id, "status": wf.status}, status_code=200)


@app.post(
    "/trigger_async",
    status_code=202,
    responses={
        200: {"description": "Idempotency-Key already used with these parameters: that fan-out"},
        400: {"description": "malformed Idempotency-Key; the reason"},
        409: {"description": "Idempotency-Key already used with other parameters"},
        422: {"description": "a parameter out of range, or more steps than MAX_QUEUED_STEPS"},
        429: {"description": "backlog over MAX_QUEUED_STEPS; Retry-After says when to retry"},
    },
)
async def trigger_async(
    steps: Annotated[
        int, Query(ge=1, le=MAX_STEPS, description=f"number of steps, 1..{MAX_STEPS}")
    ] = DEFAULT_STEPS,
    max_n: Annotated[
        int, Query(ge=0, le=MAX_MAX_N, description=f"step i: fib(min(i, max_n)), 0..{MAX_MAX_N}")
    ] = DEFAULT_MAX_N,
    executor: Annotated[
        Executor,
        Query(description="where fib runs: the service's process pool, or the step thread"),
    ] = "process",
    idempotency_key: Annotated[
        str | None,
        Header(description="1..64 of A-Z a-z 0-9 _ . : -; a retry with it gets the same fan-out"),
    ] = None,
) -> Any:
    """Start the fan-out in the background; follow it with ``GET /workflows/{id}``."""
    assert admission is not None  # uvicorn serves only after the lifespan's startup
    if idempotency_key is not None and not IDEMPOTENCY_KEY_PATTERN.fullmatch(idempotency_key):
        raise HTTPException(400, "Idempotency-Key must be 1 to 64 of A-Z a-z 0-9 _ . : -")
    if steps > admission.bound:
        raise HTTPException(
            422, f"steps={steps} exceeds MAX_QUEUED_STEPS={admission.bound}: never admitted"
        )
    workflow_id = KEYED_ID_PREFIX + idempotency_key if idempotency_key else None
    args = (steps, max_n, executor)
    async with admission.decide(steps) as refusal:
        if refusal is None:
            try:
                started = await asyncio.to_thread(_start, workflow_id, *args)
            except DBOSWorkflowIDInUseError:
                started = None
    if refusal is not None:
        # A retry of an admitted request is answered even when the service is full.
        known = await _existing(workflow_id, args) if workflow_id else None
        if known is not None:
            return known
        headers = {"Retry-After": str(refusal["retry_after"])}
        return JSONResponse(refusal, status_code=429, headers=headers)
    if started is None:  # the key's workflow exists: this start inserted nothing
        assert workflow_id is not None
        known = await _existing(workflow_id, args)
        assert known is not None  # the service deletes no rows
        return known
    # The status the start just wrote: no second round trip to read it back.
    return {"workflow_id": started, "status": "PENDING"}


@app.get("/workflows/{workflow_id}", responses={404: {"description": "no such fan-out"}})
async def get_workflow(workflow_id: str) -> dict[str, Any]:
    """Status, progress (finished steps of all steps) and, once done, the result."""
    wf = await find_workflow(workflow_id, name=fan_out.__qualname__, what="fan-out workflow")
    done = await DBOS.list_workflows_async(
        parent_workflow_id=workflow_id, status="SUCCESS", load_input=False, load_output=False
    )
    args = wf.input["args"] if wf.input else ()
    view: dict[str, Any] = {
        "workflow_id": workflow_id,
        "status": wf.status,
        "executor": args[2] if len(args) > 2 else "process",  # as recorded
        "progress": {"done": len(done), "total": args[0] if args else None},
    }
    if wf.status == "SUCCESS":
        view["result"] = wf.output
    elif wf.error is not None:
        view["error"] = str(wf.error)
    return view


@app.get(
    "/healthz",
    responses={503: {"description": "the system database does not answer; the reason"}},
)
async def healthz() -> Any:
    """200 when the system database answers (DBOS has launched: the lifespan finished),
    503 with the reason when it does not answer within shutdown.health.TIMEOUT_SEC."""
    assert health is not None  # uvicorn serves only after the lifespan's startup
    acting = serving  # read once: a rejoin may finish while the check awaits
    code, body = await health.answer(executor_id=DBOS.executor_id if acting else None)
    if not acting:  # the database's own reason first: it is what the process waits for
        body = {**body, "status": "unavailable", "reason": body.get("reason", REJOINING)}
        return JSONResponse(body, status_code=503)
    # A process that just woke from a freeze answers as its executor only once its
    # lease is confirmed again (or its fence timer ends it, within FENCE_CHECK_SEC).
    if code == 200 and slots.unconfirmed_sec() > FENCE_SEC:
        code, body = 503, {**body, "status": "unavailable", "reason": "lease not confirmed"}
    return body if code == 200 else JSONResponse(body, status_code=code)


@app.post(
    "/shutdown",
    status_code=202,
    responses={
        401: {"description": "missing or wrong bearer token"},
        403: {"description": "SHUTDOWN_TOKEN is not set: the endpoint is disabled"},
    },
)
async def shutdown(
    background: BackgroundTasks,
    mode: Annotated[
        Literal["graceful", "crash"],
        Query(description="graceful: SIGTERM, lifespan runs DBOS.destroy; crash: SIGKILL"),
    ] = "graceful",
    authorization: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Stop the server after answering 202 (needs ``Authorization: Bearer <SHUTDOWN_TOKEN>``)."""
    assert settings is not None  # uvicorn serves only after the lifespan's startup
    signals.check_token(authorization, settings.shutdown_token)
    log.warning("shutdown requested", extra={"mode": mode, "pid": os.getpid()})
    # Background tasks run after the response has been sent. A server stops on a signal
    # to the process that owns it (sys.exit in an endpoint only makes a 500).
    background.add_task(signals.stop_server if mode == "graceful" else signals.kill_server)
    return {"status": "shutting down", "mode": mode, "executor_id": DBOS.executor_id}


# --- python fastapi_scope_shutdown.py ---------------------------------------


def main() -> None:
    global settings
    logs.setup_logging(APP)
    with logs.exit_on_config_error():
        loaded = ShutdownSettings.load()
        if loaded.rejoin is None:  # a fenced process, re-executed, waits instead
            check_reachable(loaded.database.url)
            if loaded.database.kind == "postgres":
                # Once, before the workers start, so they do not race to create the database.
                DBOS.migrate(loaded.database.url)
    settings = loaded  # a single process serves in this interpreter: the lifespan's too
    import uvicorn

    # Each worker is a fresh interpreter (spawn) that re-runs this file as
    # `__mp_main__` before uvicorn imports the app: pointing uvicorn at that module
    # avoids importing this file a second time (and registering its workflows twice).
    single = loaded.workers == 1
    uvicorn.run(
        app if single else "__mp_main__:app",
        host=loaded.host,
        port=loaded.port,
        workers=None if single else loaded.workers,
        log_config=None,
        timeout_graceful_shutdown=UVICORN_GRACEFUL_SEC,
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_SEC,
    )


if __name__ == "__main__":
    main()
