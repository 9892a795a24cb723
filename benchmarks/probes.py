"""Measurements that run inside DBOS, one configuration per process.

    python -m benchmarks.probes NAME PARAMS_JSON RESULT_PATH

Run by ``benchmarks.core.run_probe`` with ``DBOS_SYSTEM_DATABASE_URL`` set to a
scratch database; the result is written as JSON to RESULT_PATH. Each probe
measures *inside* the process (start-up excluded) and interleaves the two sides
it compares, so a slow phase of the machine hits both alike.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dbos import DBOS

# The demo's own: deliberately slow (exponential) pure-Python CPU work that holds the
# GIL, in a module the process pool's processes can import (this one runs as __main__).
from shutdown.fib import fib

log = logging.getLogger("bench")

APP = "experiment6-bench"


# --- the measured code ---------------------------------------------------------------


def plain(i: int) -> int:
    return i


@DBOS.step()
def noop_step(i: int) -> int:
    return i


@DBOS.workflow()
def timed_steps(k: int) -> float:
    # Timed inside the workflow: the per-step cost without the workflow's own start/end.
    t0 = time.perf_counter()
    for i in range(k):
        noop_step(i)
    return time.perf_counter() - t0


@DBOS.workflow()
def log_burst(n: int) -> float:
    """Seconds per log record, emitted inside a workflow (where the repo's filter works)."""
    t0 = time.perf_counter()
    for i in range(n):
        log.info("burst", extra={"i": i})
    return (time.perf_counter() - t0) / n


@DBOS.step()
def logged_step(i: int) -> int:
    log.info("step done", extra={"step": i})
    return i


@DBOS.workflow()
def logged_workflow(k: int) -> int:
    log.info("workflow started", extra={"steps": k})
    total = sum(logged_step(i) for i in range(k))
    log.info("workflow finished", extra={"total": total})
    return total


@DBOS.workflow()
def fan_out(queue_name: str, n: int, result_poll: float) -> list[float]:
    """Enqueue ``n`` trivial steps, wait for all; returns [enqueue seconds, wait seconds]."""
    t0 = time.perf_counter()
    handles = [DBOS.enqueue_workflow(queue_name, noop_step, i) for i in range(n)]
    t1 = time.perf_counter()
    for h in handles:
        h.get_result(polling_interval_sec=result_poll)
    return [t1 - t0, time.perf_counter() - t1]


@DBOS.workflow()
def direct(n: int) -> int:
    return sum(noop_step(i) for i in range(n))


@DBOS.step()
def cpu_step(n: int) -> int:
    return fib(n)


@DBOS.workflow()
def cpu_fan_out(queue_name: str, units: int, n: int, result_poll: float) -> int:
    handles = [DBOS.enqueue_workflow(queue_name, cpu_step, n) for _ in range(units)]
    return sum(h.get_result(polling_interval_sec=result_poll) for h in handles)


@DBOS.workflow()
def cpu_direct(units: int, n: int) -> int:
    return sum(cpu_step(n) for _ in range(units))


# --- set-up -----------------------------------------------------------------------------


def _url() -> str:
    return os.environ["DBOS_SYSTEM_DATABASE_URL"]


def launch_bare(app: str) -> None:
    """DBOS as its docs show it: a config dict, DBOS's own logging, nothing of ours."""
    DBOS(config={"name": app, "system_database_url": _url()})
    DBOS.launch()


def launch_repo(app_suffix: str) -> None:
    """DBOS through the repo's helpers: JSON logs for every logger, shared config."""
    from lab import config, launch, logs

    logs.setup_logging(app_suffix)
    launch.launch(config.dbos_config(app_suffix))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- probes --------------------------------------------------------------------------


def probe_step_cost(p: dict[str, Any]) -> dict[str, Any]:
    """Row 1: a durable step vs a plain call vs one single-row INSERT commit."""
    launch_bare(f"{APP}-step")
    k, plain_calls, repeats = p["steps"], p["plain_calls"], p["repeats"]
    insert = _insert_floor(_url())
    timed_steps(10)  # warm caches, connections, prepared statements
    insert(10)
    statements, transactions = _count_sql(lambda: timed_steps(k), _engine())
    out: dict[str, list[float]] = {"step": [], "plain": [], "insert": []}
    for _ in range(repeats):
        out["step"].append(timed_steps(k) / k)
        out["plain"].append(_timed(lambda: [plain(i) for i in range(plain_calls)]) / plain_calls)
        out["insert"].append(insert(k) / k)
    DBOS.destroy()
    return {**out, "statements_per_step": statements / k, "commits_per_step": transactions / k}


def _engine() -> Any:
    from dbos._dbos import _get_dbos_instance

    return _get_dbos_instance()._sys_db.engine


def _count_sql(fn: Callable[[], Any], engine: Any) -> tuple[int, int]:
    """(SQL statements, commits) DBOS sends to its system database while ``fn`` runs."""
    from sqlalchemy import event

    counts = {"statements": 0, "commits": 0}

    def on_execute(*_: Any) -> None:
        counts["statements"] += 1

    def on_commit(*_: Any) -> None:
        counts["commits"] += 1

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    try:
        fn()
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)
    return counts["statements"], counts["commits"]


def _insert_floor(url: str) -> Callable[[int], float]:
    """A function timing ``k`` single-row INSERTs, each its own commit, on the same database.

    Postgres: psycopg2 in autocommit. SQLite: the same file, with the settings DBOS
    uses (IMMEDIATE transactions, a busy timeout).
    """
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url.split("sqlite:///", 1)[1], timeout=30)
        conn.isolation_level = "IMMEDIATE"
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("CREATE TABLE IF NOT EXISTS bench_floor (id INTEGER PRIMARY KEY, v TEXT)")
        conn.commit()

        def run_sqlite(k: int) -> float:
            t0 = time.perf_counter()
            for i in range(k):
                conn.execute("INSERT INTO bench_floor (v) VALUES (?)", (str(i),))
                conn.commit()
            return time.perf_counter() - t0

        return run_sqlite

    import psycopg2

    pg = psycopg2.connect(url)
    pg.autocommit = True
    cur = pg.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS bench_floor (id BIGSERIAL PRIMARY KEY, v TEXT)")

    def run_pg(k: int) -> float:
        t0 = time.perf_counter()
        for i in range(k):
            cur.execute("INSERT INTO bench_floor (v) VALUES (%s)", (str(i),))
        return time.perf_counter() - t0

    return run_pg


def probe_logging(p: dict[str, Any]) -> dict[str, Any]:
    """Row 2, one side: time per workflow of ``steps`` logged steps."""
    if p["side"] == "repo":
        launch_repo("bench-logging")
    else:
        # A bare user's usual set-up: plain-text lines on stdout at INFO.
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stdout,
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
        launch_bare("experiment6-bench-logging")
    k, per_batch = p["steps"], p["workflows"]
    for _ in range(2):
        logged_workflow(k)
    batches = [
        _timed(lambda: [logged_workflow(k) for _ in range(per_batch)]) / per_batch
        for _ in range(p["batches"])
    ]
    per_record = log_burst(200)
    DBOS.destroy()
    return {"per_workflow": batches, "per_record": per_record}


def _register(q: dict[str, Any]) -> None:
    DBOS.register_queue(
        q["name"], global_concurrency=q["concurrency"], polling_interval_sec=q["polling"]
    )


def probe_fan_out(p: dict[str, Any]) -> dict[str, Any]:
    """Row 3: ``n`` trivial steps through a queue vs called directly in one workflow."""
    launch_bare(f"{APP}-fanout")
    queues = p["queues"]  # [{"name", "polling", "concurrency", "result_poll"}]
    for q in queues:
        _register(q)
    n = p["n"]
    time.sleep(max(q["polling"] for q in queues) * 1.1)  # every poller is up
    for q in queues:
        fan_out(q["name"], 2, q["result_poll"])  # warm-up
    out: dict[str, Any] = {"direct": [], **{q["name"]: [] for q in queues}}
    # SQL per step on each path (the queued one counts this process's pollers too).
    engine = _engine()
    out["sql_direct"] = _count_sql(lambda: direct(n), engine)
    out["sql_queued"] = _count_sql(
        lambda: fan_out(queues[0]["name"], n, queues[0]["result_poll"]), engine
    )
    for _ in range(p["repeats"]):
        out["direct"].append(_timed(lambda: direct(n)))
        for q in queues:
            t0 = time.perf_counter()
            enqueue, wait = fan_out(q["name"], n, q["result_poll"])
            out[q["name"]].append([time.perf_counter() - t0, enqueue, wait])
    DBOS.destroy()
    return out


def probe_threads(p: dict[str, Any]) -> dict[str, Any]:
    """Row 4b: CPU-bound units on a 50-way queue in one process vs one after the other."""
    launch_bare(f"{APP}-threads")
    q = p["queue"]
    _register(q)
    units, n = p["units"], p["fib"]
    time.sleep(q["polling"] * 1.1)
    out: dict[str, Any] = {"sequential": [], "threads": [], "idle": [], "busy": []}
    for _ in range(p["repeats"]):
        out["sequential"].append(_timed(lambda: cpu_direct(units, n)))
        out["threads"].append(_timed(lambda: cpu_fan_out(q["name"], units, n, q["result_poll"])))
    # Rows 4d and 4e: what a busy fan-out does to the one thread that talks to the
    # database: step threads waiting on the demo's process pool (4d), or computing
    # themselves (4e). A queue nobody polls during the measurement: only the enqueue is timed.
    DBOS.register_queue("bench-convoy", polling_interval_sec=3600)
    from shutdown import pool

    pool.start(pool.usable_cores())
    out["pool_processes"] = len(pool.ready())
    out["idle"] = enqueue_only(p["enqueues"], 0, False, 0)
    out["busy_pool"] = enqueue_only(p["enqueues"], p["busy_threads"], True, p["busy_fib"])
    out["busy"] = enqueue_only(p["enqueues"], p["busy_threads"], False, p["busy_fib"])
    pool.stop()
    DBOS.destroy()
    return out


@DBOS.workflow()
def enqueue_only(n: int, busy_threads: int, in_pool: bool, fib_n: int) -> list[float]:
    """Seconds each of ``n`` enqueues takes while ``busy_threads`` threads compute
    ``fib(fib_n)`` over and over, themselves or (``in_pool``) in the process pool."""
    times = []
    # Started inside the workflow: its own start and end are not part of the figure.
    with _busy_threads(busy_threads, in_pool, fib_n):
        for i in range(n):
            t0 = time.perf_counter()
            DBOS.enqueue_workflow("bench-convoy", noop_step, i)
            times.append(time.perf_counter() - t0)
    return times


@contextmanager
def _busy_threads(count: int, in_pool: bool = False, fib_n: int = 18) -> Iterator[None]:
    """``count`` plain threads computing Fibonacci numbers, as running CPU steps do: in
    the thread, or handed to the process pool (shutdown/pool.py) and waited for."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def spin() -> None:
        from shutdown import pool

        try:
            while not stop.is_set():
                if in_pool:
                    pool.run(fib, fib_n)
                else:
                    fib(fib_n)
        except BaseException as exc:  # a thread that stops computing voids the figure
            failures.append(exc)
            raise

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} busy threads failed: {failures[0]!r}")


@DBOS.workflow()
def tiny_workflow(i: int) -> int:
    return noop_step(i)


def probe_start_cost(p: dict[str, Any]) -> dict[str, Any]:
    """Row 5's explanation: the database part of ``POST /trigger_async``, in-process."""
    launch_bare(f"{APP}-start")
    start, read = [], []
    for i in range(p["samples"] + 3):
        t0 = time.perf_counter()
        handle = DBOS.start_workflow(tiny_workflow, i)
        t1 = time.perf_counter()
        DBOS.get_workflow_status(handle.workflow_id)
        t2 = time.perf_counter()
        handle.get_result()
        if i >= 3:  # the first ones warm up connections
            start.append(t1 - t0)
            read.append(t2 - t1)
    DBOS.destroy()
    return {"start_workflow": start, "get_workflow_status": read}


PROBES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "step_cost": probe_step_cost,
    "logging": probe_logging,
    "fan_out": probe_fan_out,
    "threads": probe_threads,
    "start_cost": probe_start_cost,
}


def main(argv: list[str]) -> None:
    name, params, result_path = argv
    result = PROBES[name](json.loads(params))
    Path(result_path).write_text(json.dumps(result))
    logging.shutdown()
    # DBOS leaves daemon threads polling; the result is written, so leave now.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
