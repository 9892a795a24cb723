"""Experiment: how does a DBOS service live and die?

Question
    A FastAPI + DBOS service fans CPU-heavy Fibonacci steps out on a queue, runs a
    workflow every 5 seconds, and can be told to stop, gracefully or by crashing.
    What does each kind of stop leave behind, what does the next start recover,
    and what changes when several worker processes share one Postgres?

Run
    python fastapi_scope_shutdown.py     # uvicorn on HOST:PORT (127.0.0.1:8000) with
                                         # WORKERS processes (2 on Postgres, 1 on SQLite)
    uvicorn fastapi_scope_shutdown:app   # one process (the Docker image does this)
    dbos start                           # runs `python fastapi_scope_shutdown.py`

    curl -X POST 'localhost:8000/trigger_async'               # 202 {"workflow_id", ...}
    curl localhost:8000/workflows/<workflow_id>               # progress, then the result
    curl localhost:8000/healthz
    curl -X POST -H "Authorization: Bearer $SHUTDOWN_TOKEN" 'localhost:8000/shutdown?mode=crash'
                                                              # or mode=graceful
    (start it again: the interrupted fan-out resumes and finishes)

Observe
    - ``POST /trigger_async?steps=N&max_n=M`` (defaults 50 and 30) starts ``fan_out``:
      it enqueues N steps on the queue ``shutdown-fib``, at most 50 running at once
      across all workers; step i computes a naive, CPU-bound ``fib(min(i, M))``, and
      the workflow returns the N results in order. ``GET /workflows/{id}`` shows
      ``progress: {done, total}`` while it runs, then ``result``. The default
      request takes seconds: about 3.5 s with 2 workers, 8-10 s in one process, on
      an idle 2-core machine (see benchmarks/ for measurements).
    - While a process runs CPU-bound steps its HTTP answers slow down (up to
      seconds): threads of one process share one core (the GIL), so 50 step
      threads starve the event loop. More steps at once never finish sooner in
      one process; more processes do.
    - Every 5 s one JSON line ``"message": "scheduled workflow"`` with
      ``scheduled_time``, ``actual_time`` (typically 0.1-1.5 s later: DBOS adds up
      to 0.5 s of jitter, then dispatches through its internal queue, polled every
      second), ``workflow_id`` (``sched-shutdown-every-5s-<time>``), ``executor_id``
      and ``pid``. With several workers each slot still runs once: every process
      fires the schedule, but the workflow id is derived from the slot, so one row
      exists per slot and one executor dequeues it.
    - ``POST /shutdown`` needs ``Authorization: Bearer <SHUTDOWN_TOKEN>``: a missing
      or wrong token gets 401, and with SHUTDOWN_TOKEN unset the endpoint answers
      403; either way the server keeps serving. Otherwise it answers 202, then
        graceful: SIGTERM to the server (to the uvicorn supervisor when there are
                  several workers, which stops them all). uvicorn stops accepting
                  requests, then the lifespan runs ``DBOS.destroy`` with a bounded
                  wait (5 s) for running workflows; the log ends with "DBOS
                  successfully shut down". Mid fan-out this takes the full 5 s: the
                  queue stops dispatching first, so the fan-out can no longer
                  finish, while the steps already running do. uvicorn then
                  re-raises the SIGTERM, so one process exits -15 (143 in a shell,
                  the supervisor 0): both are clean.
        crash:    SIGKILL to the supervisor, every worker and itself. Nothing
                  runs on the way out; the workflows stay PENDING in the database.
      A SIGTERM from outside (Ctrl-C, ``docker stop``, ``kill``) is the same as
      ``graceful``.
    - Next start: DBOS recovers the PENDING workflows of its executor id. Steps
      whose output was recorded are not run again; only steps that were running
      at the stop run a second time.
    - ``GET /healthz`` asks the database (a query on a new connection, at most
      HEALTH_TIMEOUT_SEC seconds): 200 ``{"status": "ok", ...}`` when it answers,
      503 ``{"status": "unavailable", "reason": ...}`` (no credentials) when it does
      not, so a database outage shows as unhealthy instead of a hanging check. A check
      that only runs late (CPU-bound steps hold the GIL) is not an outage: then the
      answer the database gave the slot watchdog in the last 10 s decides. DBOS
      itself waits out an outage: its database calls retry until the server is back.

What it means
    - The seed stopped the server with ``sys.exit(0)`` inside an endpoint. That
      raises ``SystemExit`` in the request's task (or, in a ``def`` endpoint, in a
      thread-pool thread, and the exception is re-raised in that task). uvicorn
      catches every exception of a request, ``BaseException`` included, logs
      "Exception in ASGI application", answers 500 and keeps serving: the process
      never exits. A server stops on a signal to the process that owns it (here
      SIGTERM), and SIGKILL is the way to simulate a crash.
    - Executor ids. DBOS recovers, at launch, the PENDING workflows whose
      ``executor_id`` is its own (default ``"local"``). Processes sharing
      ``"local"`` would re-run each other's in-flight work whenever one starts.
      So every process claims a numbered slot, executor ``shutdown-<n>``: a
      Postgres session-level advisory lock held on a dedicated connection for the
      life of the process (so a pooler in transaction mode, such as PgBouncer, must
      not sit in between). The lowest free slot wins: a restarted process, or the
      worker uvicorn starts after one died, gets the id of the one that stopped
      and recovers exactly its work, and no two live processes ever share an id.
      When a process dies, Postgres drops its connection and the lock with it.
      A database restart drops it too, while the process lives on: a watchdog
      notices within a second and takes the lock again once the server is back
      (and stops the process should another have claimed the slot first).
      Slots nobody claims within 5 s of a process's start (fewer workers than
      last time, or the Docker image's single process after a multi-worker run)
      are orphans: that process recovers their pending work, holding the orphan's
      lock meanwhile so that no process claims it at the same moment.
      On SQLite there is one process, executor ``shutdown-0``, enforced with a lock
      file next to the database (WORKERS>1 is refused): SQLite has no advisory
      locks and takes one writer at a time.
    - Queues are global: the steps of one fan-out are dequeued by whichever
      worker polls first, so with several workers all of them run steps of the
      same fan-out, and the limit of 50 holds across all of them.

Design choices
    - ``max_n`` defaults to 30 and is capped at 32, ``steps`` defaults to 50 and is
      capped at 500 (anything else: 422, ranges in the OpenAPI schema at /docs). The
      original demo computed fib(0..49) naively: fib(49) alone is ~1.2e10 calls,
      about half an hour of CPU in CPython, and the 50 steps together well over an
      hour. fib(30) takes ~0.2 s, so the default request is 20 steps of fib(30)
      plus small ones, ~4-5 s of CPU; the cap bounds a request at ~4 min of CPU.
    - Enqueued units are the step ``fib_step`` itself: DBOS wraps an enqueued step
      in a one-step workflow (``<temp>.fib_step``, id ``<fan-out id>-<i + 1>``), so
      each unit is one ``workflow_status`` row (dequeued ``started_at_epoch_ms``,
      ended ``completed_at``, ``executor_id``) with one recorded step output.
    - The queue polls every 0.2 s instead of DBOS's 1 s: a step is dequeued on the
      next poll, so at 1 s every wave (the first one, each one after the limit
      frees room, the steps a recovery re-enqueues) waits up to a second. A poll
      is a few small indexed queries, five times a second per worker; on
      contention between workers DBOS backs off by itself.
    - Progress counts the fan-out's child workflows in SUCCESS
      (``DBOS.list_workflows(parent_workflow_id=...)``); total is the ``steps``
      input.

Environment
    DBOS_SYSTEM_DATABASE_URL  system database (default sqlite:///experiment6.sqlite)
    SHUTDOWN_TOKEN            enables POST /shutdown (never logged)
    HOST, PORT, WORKERS       read by ``python fastapi_scope_shutdown.py`` only
    FIB_LEDGER                tests only: a file each step body appends one line
                              to ("<index> <pid> <workflow_id>"), to count how often
                              bodies ran, outside DBOS
    (DBOS__VMID is ignored here: the slot decides the executor id.)
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from dbos import DBOS
from fastapi import BackgroundTasks, FastAPI, Header, HTTPException, Query
from fastapi.responses import JSONResponse

import common

APP = "shutdown"
log = logging.getLogger("fastapi_scope_shutdown")

# uvicorn logs its first lines before the lifespan runs: set up JSON logging now so
# that every line of the server is JSON (no DBOS, no database at import).
common.setup_logging(APP)

QUEUE = "shutdown-fib"
QUEUE_CONCURRENCY = 50
QUEUE_POLLING_SEC = 0.2
SCHEDULE = "shutdown-every-5s"
CRON = "*/5 * * * * *"  # 6 fields: seconds first

DEFAULT_STEPS, MAX_STEPS = 50, 500
DEFAULT_MAX_N, MAX_MAX_N = 30, 32
# How long DBOS.destroy waits for running workflows on a graceful stop. Below
# Docker's 10 s stop timeout, after which Docker sends SIGKILL.
GRACE_SECONDS = 5
MAX_SLOTS = 32
# A slot nobody has claimed this long after a process started is orphaned: its
# pending work is recovered by that process. Until then sibling workers that start
# at the same time get to claim (and recover) their own slots first.
ADOPT_AFTER_SEC = 5
# How often a process checks that its slot lock's database session is still alive.
SLOT_CHECK_SEC = 1.0


def executor_id(slot: int) -> str:
    return f"{APP}-{slot}"


# --- the work ---------------------------------------------------------------


def fib(n: int) -> int:
    """Naive on purpose: exponential CPU work, no I/O."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@DBOS.step()
def fib_step(index: int, n: int) -> int:
    ledger = os.environ.get("FIB_LEDGER")
    if ledger:
        # One short O_APPEND write per body execution: atomic across processes.
        with open(ledger, "a") as f:
            f.write(f"{index} {os.getpid()} {DBOS.workflow_id}\n")
    return fib(n)


@DBOS.workflow()
def fan_out(steps: int, max_n: int) -> list[int]:
    # Each enqueue is recorded in this workflow: a recovered run re-attaches to the
    # same children instead of enqueueing new ones.
    handles = [DBOS.enqueue_workflow(QUEUE, fib_step, i, min(i, max_n)) for i in range(steps)]
    return [h.get_result(polling_interval_sec=QUEUE_POLLING_SEC) for h in handles]


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


# --- executor slots ---------------------------------------------------------

# The lock holder (a Postgres connection or an open lock file) must live as long as
# the process: closing it releases the slot.
_slot_holder: Any = None


def _slot_key(slot: int) -> int:
    """A 64-bit advisory lock key for (application, slot)."""
    digest = hashlib.sha256(f"experiment6.executor-slot.{common.app_name(APP)}.{slot}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def _pg_connect(url: str) -> Any:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = psycopg2.connect(
        host=u.host or "localhost",
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        dbname=u.database,
        connect_timeout=5,
        application_name=f"{common.app_name(APP)}-slot",
        **{k: v for k, v in u.query.items() if isinstance(v, str)},
    )
    conn.autocommit = True  # session-level locks, no idle transaction
    return conn


def _try_lock(conn: Any, slot: int) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (_slot_key(slot),))
        return bool(cur.fetchone()[0])


def _unlock(conn: Any, slot: int) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s)", (_slot_key(slot),))


def claim_slot(url: str) -> int:
    """Claim the lowest free executor slot for this process, or exit with one line."""
    global _slot_holder
    if common.database_kind(url) == "sqlite":
        from sqlalchemy.engine import make_url

        path = f"{make_url(url).database}-{APP}.lock"
        holder = open(path, "a")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            common.fail(
                f"another process already serves {common.app_name(APP)} on this SQLite "
                "database; SQLite takes one process (use Postgres for several workers)"
            )
        _slot_holder = holder
        return 0
    import psycopg2

    try:
        conn = _pg_connect(url)
    except psycopg2.OperationalError as exc:
        if "does not exist" not in str(exc):
            common.fail(f"cannot reach the system database: {str(exc).strip().splitlines()[0]}")
        DBOS.migrate(url)  # creates the database, as DBOS.launch() would
        conn = _pg_connect(url)
    for slot in range(MAX_SLOTS):
        if _try_lock(conn, slot):
            _slot_holder = conn
            return slot
    conn.close()
    common.fail(f"all {MAX_SLOTS} executor slots of {common.app_name(APP)} are taken")


def release_slot() -> None:
    global _slot_holder
    if _slot_holder is not None:
        _slot_holder.close()
        _slot_holder = None


def keep_slot(url: str, slot: int, stop: threading.Event) -> None:
    """Take the slot's lock again when a database restart ended its session.

    The lock lives as long as its Postgres session, and a restart (or an outage) of the
    server ends every session: without this, the slot would be free while this process
    still runs as its executor, and a process starting next would claim it and recover
    this one's in-flight workflows. Checked every SLOT_CHECK_SEC; once the server is
    back the lock is taken again on a new connection. Should another process have
    claimed the slot first, this one stops (SIGTERM): two live processes must never
    share an executor id.
    """
    global _slot_holder, _db_answered_at
    while not stop.wait(SLOT_CHECK_SEC):
        try:
            with _slot_holder.cursor() as cur:
                cur.execute("SELECT 1")
            _db_answered_at = time.monotonic()
            continue
        except Exception:  # noqa: BLE001 - the session is gone, and the lock with it
            pass
        try:
            conn = _pg_connect(url)
        except Exception:  # noqa: BLE001 - still down: try again at the next check
            continue
        if not _try_lock(conn, slot):
            conn.close()
            log.error(
                "executor slot taken by another process after a database restart: stopping",
                extra={"executor_id": executor_id(slot), "pid": os.getpid()},
            )
            stop_gracefully()
            return
        old, _slot_holder = _slot_holder, conn
        try:
            old.close()
        except Exception:  # noqa: BLE001 - already broken
            pass
        log.warning(
            "executor slot lock taken again after a database restart",
            extra={"executor_id": executor_id(slot), "pid": os.getpid()},
        )


def adopt_orphaned_slots(my_slot: int, stop: threading.Event) -> None:
    """After ADOPT_AFTER_SEC, recover the pending work of slots no live process holds.

    Holding the orphan's lock while re-enqueueing keeps a process that starts
    meanwhile from claiming that slot (it takes another), so no workflow is
    recovered twice. DBOS's recovery re-enqueues a PENDING workflow only while its
    executor id is still the dead one, so running this twice is harmless too.
    """
    if stop.wait(ADOPT_AFTER_SEC):
        return
    conn = _slot_holder
    others = [executor_id(s) for s in range(MAX_SLOTS) if s != my_slot]
    try:
        pending = DBOS.list_workflows(
            status="PENDING",
            executor_id=others,
            app_version=DBOS.application_version,
            load_input=False,
            load_output=False,
        )
        for orphan in sorted({w.executor_id for w in pending if w.executor_id}):
            slot = int(orphan.rsplit("-", 1)[1])
            if stop.is_set() or not _try_lock(conn, slot):
                continue  # a live process holds it and recovered its own work
            try:
                # DBOS 3.4 has no public call to recover another executor's
                # workflows; this one re-enqueues the PENDING ones of the given ids.
                handles = DBOS._recover_pending_workflows([orphan])
                log.info(
                    "adopted orphaned executor slot",
                    extra={"orphan": orphan, "workflows": len(handles)},
                )
            finally:
                _unlock(conn, slot)
    except Exception as exc:  # noqa: BLE001 - a later start tries again
        if not stop.is_set():
            log.warning("could not adopt orphaned executor slots", extra={"error": str(exc)})


# --- the service --------------------------------------------------------------


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    config = common.config_or_exit(APP)
    url = config["system_database_url"]
    # The sync DBOS APIs refuse to run on the event loop: these run on threads.
    await asyncio.to_thread(common.check_reachable, url)
    slot = await asyncio.to_thread(claim_slot, url)
    config["executor_id"] = executor_id(slot)
    log.info(
        "executor slot claimed",
        extra={"executor_id": executor_id(slot), "slot": slot, "pid": os.getpid()},
    )
    await asyncio.to_thread(common.launch, config)
    await DBOS.register_queue_async(
        QUEUE, global_concurrency=QUEUE_CONCURRENCY, polling_interval_sec=QUEUE_POLLING_SEC
    )
    await DBOS.apply_schedules_async(
        [{"schedule_name": SCHEDULE, "workflow_fn": every_five_seconds, "schedule": CRON}]
    )
    stop_adopting = threading.Event()
    adopter = None
    if common.database_kind(url) == "postgres":
        adopter = threading.Thread(
            target=adopt_orphaned_slots, args=(slot, stop_adopting), daemon=True
        )
        adopter.start()
        threading.Thread(target=keep_slot, args=(url, slot, stop_adopting), daemon=True).start()
    log.info(
        "serving",
        extra={"database": common.redacted(url), "executor_id": DBOS.executor_id},
    )
    yield
    stop_adopting.set()
    if adopter is not None:
        adopter.join(timeout=5)
    log.info("stopping DBOS", extra={"grace_seconds": GRACE_SECONDS})
    # Synchronous on purpose: the server has stopped serving, and DBOS.destroy shuts
    # down the thread pool asyncio.to_thread would use.
    DBOS.destroy(workflow_completion_timeout_sec=GRACE_SECONDS)
    release_slot()


app = FastAPI(
    title="fastapi_scope_shutdown",
    summary="Fibonacci fan-out on a 50-way queue, a 5-second schedule, graceful or "
    "crash shutdown, recovery, several workers.",
    lifespan=lifespan,
)


@app.post("/trigger_async", status_code=202)
async def trigger_async(
    steps: Annotated[
        int, Query(ge=1, le=MAX_STEPS, description=f"number of steps, 1..{MAX_STEPS}")
    ] = DEFAULT_STEPS,
    max_n: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_MAX_N,
            description=f"step i computes fib(min(i, max_n)); 0..{MAX_MAX_N} "
            "(fib(32) is about half a second of CPU)",
        ),
    ] = DEFAULT_MAX_N,
) -> dict[str, Any]:
    """Start the fan-out in the background; follow it with ``GET /workflows/{id}``."""
    handle = await asyncio.to_thread(DBOS.start_workflow, fan_out, steps, max_n)
    status = await DBOS.get_workflow_status_async(handle.workflow_id)
    return {"workflow_id": handle.workflow_id, "status": status.status if status else "PENDING"}


@app.get("/workflows/{workflow_id}", responses={404: {"description": "no such fan-out"}})
async def get_workflow(workflow_id: str) -> dict[str, Any]:
    """Status, progress (finished steps of all steps) and, once done, the result."""
    # Postgres text cannot hold NUL: no workflow has such an id, and the query would fail (500).
    found = (
        []
        if "\x00" in workflow_id
        else await DBOS.list_workflows_async(workflow_ids=[workflow_id], load_output=True)
    )
    if not found or found[0].name != fan_out.__qualname__:
        raise HTTPException(404, f"no fan-out workflow with id {workflow_id!r}")
    wf = found[0]
    done = await DBOS.list_workflows_async(
        parent_workflow_id=workflow_id, status="SUCCESS", load_input=False, load_output=False
    )
    total = wf.input["args"][0] if wf.input and wf.input["args"] else None
    view: dict[str, Any] = {
        "workflow_id": workflow_id,
        "status": wf.status,
        "progress": {"done": len(done), "total": total},
    }
    if wf.status == "SUCCESS":
        view["result"] = wf.output
    elif wf.error is not None:
        view["error"] = str(wf.error)
    return view


# Below the Docker HEALTHCHECK's 4 s client timeout: the check answers before it gives up.
HEALTH_TIMEOUT_SEC = 3
HEALTH_CONNECT_TIMEOUT_SEC = 2
# The one database check in flight: probes that arrive meanwhile share it, so a server
# that accepts connections but never answers cannot pile up a thread per probe.
_db_check: asyncio.Future[str | None] | None = None
# A check that merely runs late is not an outage: 50 CPU-bound step threads can keep
# it from the GIL for seconds. Then the slot watchdog's last answer from the database
# (every SLOT_CHECK_SEC on its own connection) decides, if it is this recent.
HEALTH_RECENT_ANSWER_SEC = 10
_db_answered_at: float | None = None  # time.monotonic() of the watchdog's last answer


def _check_database(url: str) -> str | None:
    """None when the database answers a query, else why not (never the password)."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    u = make_url(url)
    try:
        if common.database_kind(url) == "sqlite":
            import sqlite3

            # mode=rw: a missing file is an error, not a new empty database; reading
            # sqlite_master reads the file (SELECT 1 would not).
            uri = f"{Path(u.database or '').resolve().as_uri()}?mode=rw"
            conn: Any = sqlite3.connect(uri, uri=True, timeout=HEALTH_CONNECT_TIMEOUT_SEC)
            sql = "SELECT count(*) FROM sqlite_master"
        else:
            import psycopg2

            params: dict[str, Any] = {k: v for k, v in u.query.items() if isinstance(v, str)}
            # Keep the URL's own server options (e.g. -c synchronous_commit=on), add ours.
            options = f"{params.get('options', '')} -c statement_timeout=".lstrip()
            params.update(
                host=u.host or "localhost",
                port=u.port or 5432,
                user=u.username,
                password=u.password,
                dbname=u.database,
                connect_timeout=HEALTH_CONNECT_TIMEOUT_SEC,
                application_name=f"{common.app_name(APP)}-health",
                options=f"{options}{HEALTH_CONNECT_TIMEOUT_SEC * 1000}",
            )
            conn = psycopg2.connect(**params)
            sql = "SELECT 1"
        try:
            conn.cursor().execute(sql)
        finally:
            conn.close()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if u.password:
            text = text.replace(u.password, "***")
        return f"database unreachable: {text}"


@app.get(
    "/healthz",
    responses={503: {"description": "the system database does not answer; the reason"}},
)
async def healthz() -> Any:
    """200 when the system database answers (DBOS has launched: the lifespan finished),
    503 with the reason when it does not answer within HEALTH_TIMEOUT_SEC."""
    global _db_check
    url = common.database_url()
    body: dict[str, Any] = {
        "status": "ok",
        "executor_id": DBOS.executor_id,
        "database": common.database_kind(url),
        "pid": os.getpid(),
    }
    if _db_check is None or _db_check.done():
        _db_check = asyncio.ensure_future(asyncio.to_thread(_check_database, url))
    try:
        problem = await asyncio.wait_for(asyncio.shield(_db_check), HEALTH_TIMEOUT_SEC)
    except TimeoutError:
        answered = _db_answered_at
        if answered is not None and time.monotonic() - answered <= HEALTH_RECENT_ANSWER_SEC:
            problem = None  # busy, not down: the database answered the watchdog just now
        else:
            problem = f"database unreachable: no answer within {HEALTH_TIMEOUT_SEC} s"
    if problem is None:
        return body
    return JSONResponse({**body, "status": "unavailable", "reason": problem}, status_code=503)


def _master_pid() -> int | None:
    """The uvicorn supervisor when this is one of its worker processes."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid != os.getppid():
        return None  # a single process (or the supervisor is already gone)
    return parent.pid


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces, split after ")".
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


def stop_gracefully() -> None:
    # The master forwards SIGTERM to every worker; a lone server stops itself.
    os.kill(_master_pid() or os.getpid(), signal.SIGTERM)


def crash() -> None:
    master = _master_pid()
    if master is not None:
        siblings = _children(master)  # before the master dies and they are re-parented
        os.kill(master, signal.SIGKILL)  # first, so it cannot start replacements
        for pid in siblings:
            if pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    os.kill(os.getpid(), signal.SIGKILL)


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
    token = os.environ.get("SHUTDOWN_TOKEN", "")
    if not token:
        raise HTTPException(403, "shutdown is disabled: SHUTDOWN_TOKEN is not set")
    expected = f"Bearer {token}".encode()
    if not authorization or not hmac.compare_digest(authorization.encode(), expected):
        raise HTTPException(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    log.warning("shutdown requested", extra={"mode": mode, "pid": os.getpid()})
    # Background tasks run after the response has been sent.
    background.add_task(stop_gracefully if mode == "graceful" else crash)
    return {"status": "shutting down", "mode": mode, "executor_id": DBOS.executor_id}


# --- python fastapi_scope_shutdown.py ---------------------------------------


def main() -> None:
    host = os.environ.get("HOST", "").strip() or "127.0.0.1"
    port = common.int_env("PORT", 8000, 1, 65535)
    try:
        url = common.database_url()
    except common.ConfigError as exc:
        common.fail(str(exc))
    postgres = common.database_kind(url) == "postgres"
    workers = common.int_env("WORKERS", 2 if postgres else 1, 1, MAX_SLOTS)
    if workers > 1 and not postgres:
        common.fail(
            f"WORKERS={workers} needs Postgres (DBOS_SYSTEM_DATABASE_URL=postgresql://...): "
            "SQLite takes one process"
        )
    common.check_reachable(url)
    if postgres:
        # Once, before the workers start, so they do not race to create the database.
        DBOS.migrate(url)
    import uvicorn

    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)
        return
    # Each worker is a fresh interpreter (spawn) that re-runs this file as
    # `__mp_main__` before uvicorn imports the app: pointing uvicorn at that module
    # avoids importing this file a second time (and registering its workflows twice).
    uvicorn.run(
        "__mp_main__:app",
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
