"""The shutdown demo (``fastapi_scope_shutdown.py``) as the benchmarks drive it.

A real server in a subprocess (``harness.server.AppServer``): ``python
fastapi_scope_shutdown.py`` with PORT, HOST and WORKERS, reached over HTTP on
127.0.0.1 with the demo's client (``harness.clients.ShutdownClient``); what happened is
read back from the system database. The demo's constants come from the demo itself.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import fastapi_scope_shutdown
from benchmarks import http_app
from harness.clients import ShutdownClient
from harness.db import query, workflow_status
from harness.env import script_env
from harness.fanout import child_index, shutdown_server
from harness.server import AppServer
from shutdown.fib import fib

# Row 5's server: the demo's own app with one extra no-op route (benchmarks/http_app.py).
BENCH_APP = http_app.__name__
NOOP_ROUTE = f"GET {http_app.NOOP_PATH}"

_DONE = ("SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")


@dataclass(frozen=True)
class Settings:
    polling_interval: float  # the demo queue's polling interval (QUEUE_POLLING_SEC)
    queue_name: str
    queue_concurrency: int  # global, across all workers
    result_poll: float  # how often the demo's fan-out checks its children (same constant)
    max_steps: int
    max_max_n: int
    default_steps: int  # a fan-out's size when the request does not say
    default_max_n: int


@functools.cache
def settings() -> Settings:
    """The demo's constants, imported from the demo."""
    demo = fastapi_scope_shutdown
    return Settings(
        polling_interval=float(demo.QUEUE_POLLING_SEC),
        queue_name=demo.QUEUE,
        queue_concurrency=int(demo.QUEUE_CONCURRENCY),
        # fan_out waits with get_result(polling_interval_sec=QUEUE_POLLING_SEC)
        result_poll=float(demo.QUEUE_POLLING_SEC),
        max_steps=int(demo.MAX_STEPS),
        max_max_n=int(demo.MAX_MAX_N),
        default_steps=int(demo.DEFAULT_STEPS),
        default_max_n=int(demo.DEFAULT_MAX_N),
    )


# --- sizing the CPU-bound work ---------------------------------------------------------


@functools.cache
def fib_seconds(n: int) -> float:
    """Seconds the demo's own naive ``fib(n)`` takes here (best of 3, after a warm-up)."""
    fib(n)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fib(n)
        best = min(best, time.perf_counter() - t0)
    return best


def fib_for_seconds(seconds: float, low: int = 10, high: int = 40) -> int:
    """The largest ``n`` (≥ low) whose naive ``fib(n)`` takes at most ``seconds`` here."""
    n = low
    while n < high and fib_seconds(n + 1) <= seconds:
        n += 1
    return n


def fan_out_cpu_seconds(steps: int, max_n: int) -> float:
    """CPU work of one demo fan-out: step i computes fib(min(i, max_n))."""
    return sum(fib_seconds(min(i, max_n)) for i in range(steps))


def size_fan_out(cpu_seconds: float, steps: int) -> tuple[int, int]:
    """The largest ``max_n`` whose ``steps``-step demo fan-out stays within ``cpu_seconds``."""
    limit = settings().max_max_n
    max_n = 1
    while max_n < limit and fan_out_cpu_seconds(steps, max_n + 1) <= cpu_seconds:
        max_n += 1
    return steps, max_n


# --- the server -------------------------------------------------------------------------


@dataclass
class FanOut:
    workflow_id: str
    span: float  # first step enqueued → last step completed, from the database
    wall: float  # trigger sent → parent SUCCESS seen
    per_executor: dict[str, int] = field(default_factory=dict)
    enqueue_span: float = 0.0  # first step enqueued → last step enqueued


def server(
    db_url: str,
    workers: int,
    log_dir: Path,
    app: str | None = None,
    port: int | None = None,
) -> AppServer:
    """The demo (``python fastapi_scope_shutdown.py``, or the module ``app``, a
    benchmark-only wrapper of it served like WORKERS=1) on 127.0.0.1, in its own process
    group (so SIGKILL takes every worker); ready once ``/healthz`` answers 200.

    Used as a context manager it is killed on the way out: the benchmarks never measure
    a shutdown, and a graceful one waits for work.
    """
    token = secrets.token_urlsafe(16)
    log = log_dir / f"server-{time.monotonic_ns()}.log"
    options: dict[str, Any] = {"ready_path": "/healthz", "ready_interval": 0.05}
    options["ready_timeout"] = 120
    if app is None:
        host = {"HOST": "127.0.0.1"}
        return shutdown_server(
            db_url, log, workers=workers, token=token, port=port, env=host, **options
        )
    # A benchmark-only wrapper of the demo, served like WORKERS=1.
    env = script_env(db_url, HOST="127.0.0.1", WORKERS="1", SHUTDOWN_TOKEN=token)
    return AppServer.module(app, env, log, port, **options)


def run_fan_out(
    server: AppServer,
    db_url: str,
    steps: int,
    max_n: int,
    timeout: float = 600,
    executor: str | None = None,
) -> FanOut:
    """Trigger one fan-out (``executor``: process, the demo's default, or thread) and
    wait for it (in the database)."""
    t0 = time.perf_counter()
    wf = ShutdownClient(server.client).trigger(steps, max_n, executor=executor)
    wait_done(db_url, wf, timeout)
    wall = time.perf_counter() - t0
    return FanOut(
        wf,
        fan_out_span(db_url, wf),
        wall,
        executors(db_url, wf),
        enqueue_span(db_url, wf),
    )


def latencies(server: AppServer, pairs: int, warmup: int = 5) -> tuple[list[float], list[float]]:
    """Alternating (no-op, trigger) requests on one connection; seconds each."""
    api = ShutdownClient(server.client)
    noop_path = http_app.NOOP_PATH

    def noop() -> float:
        t0 = time.perf_counter()
        r = server.client.get(noop_path)
        elapsed = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"no-op answered {r.status_code}")
        return elapsed

    def trigger() -> float:
        t0 = time.perf_counter()
        r = api.trigger_async(1, 0)
        elapsed = time.perf_counter() - t0
        if r.status_code != 202:
            raise RuntimeError(f"trigger answered {r.status_code}: {r.text}")
        return elapsed

    for _ in range(warmup):
        noop()
        trigger()
    a: list[float] = []
    b: list[float] = []
    for i in range(pairs):
        if i % 2 == 0:
            a.append(noop())
            b.append(trigger())
        else:
            b.append(trigger())
            a.append(noop())
    return a, b


# --- reading the system database ----------------------------------------------------------


status = workflow_status


def wait_done(db_url: str, workflow_id: str, timeout: float, interval: float = 0.05) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = status(db_url, workflow_id)
        except Exception:  # noqa: BLE001 - the database may be busy for a moment
            st = None
        if st in _DONE:
            if st != "SUCCESS":
                raise RuntimeError(f"workflow {workflow_id} ended {st}")
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"workflow {workflow_id} not done after {timeout}s (status {st})")
        time.sleep(interval)


def children_done(db_url: str, workflow_id: str) -> int:
    return int(
        query(
            db_url,
            "SELECT COUNT(*) FROM dbos.workflow_status WHERE parent_workflow_id = %s "
            "AND status = 'SUCCESS'",
            workflow_id,
        )[0][0]
    )


def _children_span(db_url: str, workflow_id: str, end: str) -> float:
    """Seconds from the first step's ``created_at`` to the latest ``end`` stamp of a
    fan-out's steps (``end`` is a column name, never user input)."""
    (first, last) = query(
        db_url,
        f"SELECT MIN(created_at), MAX({end}) FROM dbos.workflow_status "
        "WHERE parent_workflow_id = %s",
        workflow_id,
    )[0]
    return (int(last) - int(first)) / 1000


def fan_out_span(db_url: str, workflow_id: str) -> float:
    """First step enqueued → last step completed."""
    return _children_span(db_url, workflow_id, "completed_at")


def child_statuses(db_url: str, workflow_id: str) -> list[tuple[int, str]]:
    """(step index, status) of each step of a fan-out."""
    rows = query(
        db_url,
        "SELECT workflow_uuid, status FROM dbos.workflow_status WHERE parent_workflow_id = %s",
        workflow_id,
    )
    found = [(child_index(wid), st) for wid, st in rows]
    if any(i is None for i, _ in found):
        raise RuntimeError(f"unexpected child workflow ids under {workflow_id}")
    return sorted((i, st) for i, st in found if i is not None)


def enqueue_span(db_url: str, workflow_id: str) -> float:
    """First step enqueued → last step enqueued."""
    return _children_span(db_url, workflow_id, "created_at")


def executors(db_url: str, workflow_id: str) -> dict[str, int]:
    rows = query(
        db_url,
        "SELECT executor_id FROM dbos.workflow_status WHERE parent_workflow_id = %s",
        workflow_id,
    )
    return dict(Counter(r[0] for r in rows))


# --- row 6: recovery ------------------------------------------------------------------------


def recovery_run(db_url: str, units: int, max_n: int, log_dir: Path) -> dict[str, Any]:
    """SIGKILL the demo when half the fan-out's CPU work is done (its steps in SUCCESS,
    each weighed by ``fib_seconds``), restart it, time the rest.

    Returns ``recover`` (restart → parent SUCCESS), ``recover_after_launch`` (DBOS
    initialised in the new process → SUCCESS), where the restart's time went before
    (``spawn_to_dbos_init``, ``serving_after_launch``), and ``baseline``: the remaining work,
    triggered fresh on the warm server and run uninterrupted. Step i computes
    fib(min(i, max_n)): the baseline is a fan-out of ``max_n + heavy_remaining`` steps,
    every light step (i < max_n, together about 1.6 heavy ones) plus exactly as many
    heavy steps as were left. The fan-out enqueues its heaviest steps first, so the
    light ones are mostly still left at the kill; any done then make the baseline a
    little more than the work left.
    """
    first = server(db_url, workers=1, log_dir=log_dir)
    first.start()
    try:
        wf = ShutdownClient(first.client).trigger(units, max_n)
        work = [fib_seconds(min(i, max_n)) for i in range(units)]
        deadline, half = time.monotonic() + 600, sum(work) / 2
        while sum(work[i] for i, st in child_statuses(db_url, wf) if st == "SUCCESS") < half:
            if time.monotonic() > deadline:
                raise RuntimeError("fan-out did not reach half its work in 600 s")
            time.sleep(0.02)
    finally:
        first.close()
    if status(db_url, wf) in _DONE:
        raise RuntimeError("the fan-out finished before the kill; use more work per unit")
    left = [i for i, st in child_statuses(db_url, wf) if st != "SUCCESS"]
    done_at_kill = units - len(left)
    work_left = sum(work[i] for i in left) / sum(work)
    heavy_left = sum(1 for i in left if i >= max_n)

    second = server(db_url, workers=1, log_dir=log_dir, port=first.port)
    t_spawn = time.time()
    ready = second.start().ready_seconds
    try:
        wait_done(db_url, wf, 600)
        t_done = time.time()
        launched = _dbos_initialised_at(second)
        after_launch = serving_after_launch(second)
        assert children_done(db_url, wf) == units, "not every unit completed after recovery"
        baseline = run_fan_out(second, db_url, max_n + heavy_left, max_n).wall
    finally:
        second.close()
    return {
        "workflow_id": wf,
        "units": units,
        "done_at_kill": done_at_kill,
        "remaining": len(left),
        "work_left": round(work_left, 3),
        "light_remaining": len(left) - heavy_left,
        "baseline_steps": max_n + heavy_left,
        "startup_until_healthz": ready,
        "spawn_to_dbos_init": launched - t_spawn if launched else None,
        "serving_after_launch": after_launch,
        "recover": t_done - t_spawn,
        "recover_after_launch": t_done - launched if launched else None,
        "baseline": baseline,
    }


def _logged_at(server: AppServer, message: str) -> float | None:
    """Wall-clock time of the server's first log line starting with ``message``."""
    for record in server.records(strict=False):
        if str(record.get("message", "")).startswith(message):
            stamp = record.get("timestamp")
            if stamp:
                return datetime.fromisoformat(str(stamp)).timestamp()
    return None


def _dbos_initialised_at(restarted: AppServer) -> float | None:
    """Wall-clock time of the restarted server's "Initializing DBOS" log line."""
    return _logged_at(restarted, "Initializing DBOS")


def serving_after_launch(server: AppServer) -> float | None:
    """Seconds from the server's "Initializing DBOS" line to its "serving" line: DBOS's
    launch, then the wait until every pool process is up (``pool.ready``)."""
    launched, serving = _logged_at(server, "Initializing DBOS"), _logged_at(server, "serving")
    return serving - launched if launched and serving else None


# --- the process pool's start ---------------------------------------------------------------


def pool_processes(server_pid: int) -> list[int]:
    """The pool's processes: the server's children that multiprocessing spawned (the
    resource tracker, also a child, runs another program)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server_pid and b"multiprocessing.spawn" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pool_start(db_url: str, log_dir: Path) -> dict[str, Any]:
    """Start the demo on a fresh database (nothing to recover: no step reaches the pool)
    and measure its pool's start: the CPU each pool process spent until then (all of it
    start-up) and the time from DBOS's launch to serving (``serving_after_launch``)."""
    with server(db_url, workers=1, log_dir=log_dir) as idle:
        assert idle.proc is not None
        pids = pool_processes(idle.proc.pid)
        cpu = [round(cpu_seconds(pid), 3) for pid in pids]
        after_launch = serving_after_launch(idle)
    return {"processes": len(pids), "cpu_s": cpu, "serving_after_launch_s": after_launch}
