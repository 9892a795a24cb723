"""The shutdown demo (``fastapi_scope_shutdown.py``) as the benchmarks drive it.

A real server in a subprocess: ``python fastapi_scope_shutdown.py`` with PORT,
HOST and WORKERS, reached over HTTP on 127.0.0.1; what happened is read back
from the system database.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import REPO, free_port, query, script_env

DEMO_MODULE = "fastapi_scope_shutdown"
# Row 5's server: the demo's own app with one extra no-op route (benchmarks/http_app.py).
BENCH_APP = "benchmarks.http_app"
NOOP_ROUTE = "GET /_bench/noop"

_DONE = ("SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")


@dataclass(frozen=True)
class Settings:
    polling_interval: float  # the demo queue's polling interval (QUEUE_POLLING_SEC)
    queue_name: str
    queue_concurrency: int  # global, across all workers
    result_poll: float  # how often the demo's fan-out checks its children (same constant)
    max_steps: int
    max_max_n: int


@functools.cache
def settings() -> Settings:
    """The demo's constants, read from its source.

    Not imported: importing the demo turns this process's logging into JSON on stdout.
    """
    source = (REPO / f"{DEMO_MODULE}.py").read_text()
    constants: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets = (
                node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            )
            try:
                values = ast.literal_eval(node.value)
            except ValueError:
                continue
            if len(targets) == 1:
                values = (values,)
            for target, value in zip(targets, values, strict=False):
                if isinstance(target, ast.Name):
                    constants[target.id] = value
    poll = float(constants["QUEUE_POLLING_SEC"])
    return Settings(
        polling_interval=poll,
        queue_name=constants["QUEUE"],
        queue_concurrency=int(constants["QUEUE_CONCURRENCY"]),
        # fan_out waits with get_result(polling_interval_sec=QUEUE_POLLING_SEC)
        result_poll=poll,
        max_steps=int(constants["MAX_STEPS"]),
        max_max_n=int(constants["MAX_MAX_N"]),
    )


# --- sizing the CPU-bound work ---------------------------------------------------------


def _fib(n: int) -> int:
    """The demo's naive Fibonacci (same code), timed here to size the work."""
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


@functools.cache
def fib_seconds(n: int) -> float:
    _fib(n)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        _fib(n)
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


class Server:
    """The demo served on 127.0.0.1 in its own process group (so SIGKILL takes every worker)."""

    def __init__(
        self,
        db_url: str,
        workers: int,
        log_dir: Path,
        app: str | None = None,
        port: int | None = None,
    ) -> None:
        self.db_url = db_url
        self.workers = workers
        self.app = app
        self.port = port or free_port()
        self.token = secrets.token_urlsafe(16)
        self.log_path = log_dir / f"server-{self.port}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    # lifecycle

    def start(self, ready_timeout: float = 120) -> float:
        """Start and wait until /healthz answers; returns the seconds that took."""
        env = script_env(
            self.db_url,
            PORT=str(self.port),
            HOST="127.0.0.1",
            WORKERS=str(self.workers),
            SHUTDOWN_TOKEN=self.token,
        )
        if self.app is None:
            cmd = [sys.executable, f"{DEMO_MODULE}.py"]
        else:
            # A benchmark-only wrapper of the demo, served like WORKERS=1.
            cmd = [sys.executable, "-m", self.app]
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.client.get("/healthz", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout}s: {self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, nothing runs on the way out."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # The benchmarks never measure a shutdown, and a graceful one waits for work.
        self.kill()
        self.client.close()

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    # requests

    def trigger(self, steps: int, max_n: int) -> str:
        r = self.client.post("/trigger_async", params={"steps": steps, "max_n": max_n})
        if r.status_code != 202:
            raise RuntimeError(f"trigger answered {r.status_code}: {r.text}")
        return r.json()["workflow_id"]

    def run_fan_out(self, steps: int, max_n: int, timeout: float = 600) -> FanOut:
        t0 = time.perf_counter()
        wf = self.trigger(steps, max_n)
        wait_done(self.db_url, wf, timeout)
        wall = time.perf_counter() - t0
        return FanOut(
            wf,
            fan_out_span(self.db_url, wf),
            wall,
            executors(self.db_url, wf),
            enqueue_span(self.db_url, wf),
        )

    def latencies(self, pairs: int, warmup: int = 5) -> tuple[list[float], list[float]]:
        """Alternating (no-op, trigger) requests on one connection; seconds each."""
        params = {"steps": 1, "max_n": 0}

        def noop() -> float:
            t0 = time.perf_counter()
            r = self.client.get("/_bench/noop")
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"no-op answered {r.status_code}")
            return elapsed

        def trigger() -> float:
            t0 = time.perf_counter()
            r = self.client.post("/trigger_async", params=params)
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


def status(db_url: str, workflow_id: str) -> str | None:
    rows = query(
        db_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", workflow_id
    )
    return rows[0][0] if rows else None


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
    return query(
        db_url,
        "SELECT COUNT(*) FROM dbos.workflow_status WHERE parent_workflow_id = %s "
        "AND status = 'SUCCESS'",
        workflow_id,
    )[0][0]


def fan_out_span(db_url: str, workflow_id: str) -> float:
    (first, last) = query(
        db_url,
        "SELECT MIN(created_at), MAX(completed_at) FROM dbos.workflow_status "
        "WHERE parent_workflow_id = %s",
        workflow_id,
    )[0]
    return (int(last) - int(first)) / 1000


def child_index(workflow_id: str) -> int | None:
    """Step i of a fan-out is its parent's operation i + 1: child id ``<parent>-<i + 1>``."""
    suffix = workflow_id.rsplit("-", 1)[-1]
    return int(suffix) - 1 if suffix.isdigit() else None


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
    (first, last) = query(
        db_url,
        "SELECT MIN(created_at), MAX(created_at) FROM dbos.workflow_status "
        "WHERE parent_workflow_id = %s",
        workflow_id,
    )[0]
    return (int(last) - int(first)) / 1000


def executors(db_url: str, workflow_id: str) -> dict[str, int]:
    rows = query(
        db_url,
        "SELECT executor_id FROM dbos.workflow_status WHERE parent_workflow_id = %s",
        workflow_id,
    )
    return dict(Counter(r[0] for r in rows))


# --- row 6: recovery ------------------------------------------------------------------------


def recovery_run(db_url: str, units: int, max_n: int, log_dir: Path) -> dict[str, Any]:
    """SIGKILL the demo when about half the fan-out is done, restart it, time the rest.

    Returns ``recover`` (restart → parent SUCCESS), ``recover_after_launch`` (DBOS
    initialised in the new process → SUCCESS), and ``baseline``: the remaining work,
    triggered fresh on the warm server and run uninterrupted. Step i computes
    fib(min(i, max_n)), so the light steps (i < max_n) finish first and the ones left
    at the kill are heavy; the baseline is a fan-out of ``max_n + heavy_remaining``
    steps: every light step again (together about 1.6 heavy ones) plus exactly as many
    heavy steps as were left.
    """
    first = Server(db_url, workers=1, log_dir=log_dir)
    first.start()
    try:
        wf = first.trigger(units, max_n)
        deadline = time.monotonic() + 600
        while children_done(db_url, wf) < units // 2:
            if time.monotonic() > deadline:
                raise RuntimeError("fan-out did not reach half-way in 600 s")
            time.sleep(0.02)
    finally:
        first.kill()
        first.client.close()
    if status(db_url, wf) in _DONE:
        raise RuntimeError("the fan-out finished before the kill; use more work per unit")
    left = [i for i, st in child_statuses(db_url, wf) if st != "SUCCESS"]
    done_at_kill = units - len(left)
    heavy_left = sum(1 for i in left if i >= max_n)

    second = Server(db_url, workers=1, log_dir=log_dir, port=first.port)
    t_spawn = time.time()
    ready = second.start()
    try:
        wait_done(db_url, wf, 600)
        t_done = time.time()
        launched = _dbos_initialised_at(second)
        assert children_done(db_url, wf) == units, "not every unit completed after recovery"
        baseline = second.run_fan_out(max_n + heavy_left, max_n).wall
    finally:
        second.kill()
        second.client.close()
    return {
        "workflow_id": wf,
        "units": units,
        "done_at_kill": done_at_kill,
        "remaining": len(left),
        "light_remaining": len(left) - heavy_left,
        "baseline_steps": max_n + heavy_left,
        "startup_until_healthz": ready,
        "recover": t_done - t_spawn,
        "recover_after_launch": t_done - launched if launched else None,
        "baseline": baseline,
    }


def _dbos_initialised_at(server: Server) -> float | None:
    """Wall-clock time of the restarted server's "Initializing DBOS" log line."""
    for record in server.log_records():
        if str(record.get("message", "")).startswith("Initializing DBOS"):
            stamp = record.get("timestamp")
            if stamp:
                return datetime.fromisoformat(str(stamp)).timestamp()
    return None
