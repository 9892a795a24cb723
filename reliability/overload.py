"""Load area, overload: a burst of 10x ``MAX_QUEUED_STEPS`` against the shutdown demo.

What it measures
    ``uvicorn fastapi_scope_shutdown:app`` (one process, its process pool) on a fresh
    Postgres database, with ``MAX_QUEUED_STEPS`` = the bound, receives at once enough
    default fan-outs (``DEFAULT_STEPS`` steps, ``max_n`` ``DEFAULT_MAX_N``) to ask for
    ``FACTOR`` times the bound, each request with its own ``Idempotency-Key``. The
    service must admit work up to its bound and refuse the rest with 429 and
    ``Retry-After`` (never a 5xx, never a hang); everything it admitted must finish; the
    backlog (shutdown/admission.py's query, sampled while the service drains) must never pass
    the bound; ``/healthz`` must stay responsive; and once drained it must admit again.

How
    ``/healthz`` is probed every ``PROBE_INTERVAL`` seconds from a thread: first idle
    (``IDLE_PROBES``), then from the burst's first request until the last admitted
    fan-out has finished. The burst itself is ``httpx.AsyncClient`` requests, all in
    flight at once. Afterwards the database says which fan-outs exist (``fan_out`` rows,
    ids ``trigger-<key>``) and how many of their steps succeeded.

Figures
    - answers (promise "202 or 429 + Retry-After"), admitted steps (info).
    - backlog peak (promise ≤ the bound), accepted fan-outs finished with every step
      (promise all), lost (promise 0), fan-outs started for a refused request (promise 0).
    - ``/healthz`` p95 during the burst vs idle (promise ≤ ``HEALTH_RATIO_LIMIT`` x).
    - time to drain and the steps per second it implies (info: the default bound's basis),
      admitted again once drained (promise).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx

import fastapi_scope_shutdown
from harness.clients import ShutdownClient
from harness.db import query
from harness.fanout import shutdown_server
from harness.proc import wait_for
from reliability.core import Context, Figure, info, progress, promise
from shutdown.admission import backlog_sql

AREA = "load"
FACTOR = 10
STEPS, MAX_N = fastapi_scope_shutdown.DEFAULT_STEPS, fastapi_scope_shutdown.DEFAULT_MAX_N
QUICK_BOUND = 300  # the tests' bound: 60 requests, a few seconds of work
PROBE_INTERVAL = 0.1
IDLE_PROBES = 40
HEALTH_RATIO_LIMIT = 5
REQUEST_TIMEOUT = 60.0
DRAIN_TIMEOUT = 900.0
FAN_OUT = fastapi_scope_shutdown.fan_out.__qualname__
AFTER_DRAIN_KEY = "after-drain"  # the one trigger sent once the burst has drained
AFTER_DRAIN_ID = fastapi_scope_shutdown.KEYED_ID_PREFIX + AFTER_DRAIN_KEY


@dataclass
class Reply:
    key: str
    status: int | None  # None: no answer in time
    workflow_id: str | None = None
    retry_after: str | None = None
    text: str = ""

    @property
    def correct(self) -> bool:
        accepted = (
            self.status == 202
            and self.workflow_id == fastapi_scope_shutdown.KEYED_ID_PREFIX + self.key
        )
        return accepted or (self.status == 429 and bool(self.retry_after))


@dataclass
class OverloadRun:
    bound: int
    replies: list[Reply] = field(default_factory=list)
    idle_health: list[float] = field(default_factory=list)
    burst_health: list[float] = field(default_factory=list)
    health_errors: int = 0
    backlog_peak: int = 0
    drain_seconds: float | None = None
    rows: dict[str, str] = field(default_factory=dict)  # fan_out id -> status
    steps_ok: dict[str, int] = field(default_factory=dict)  # fan_out id -> SUCCESS children
    reaccepted: int | None = None  # the status of one trigger after the drain

    def ids(self, status: int) -> list[str]:
        return [r.workflow_id for r in self.replies if r.status == status and r.workflow_id]

    @property
    def accepted(self) -> list[str]:
        return self.ids(202)

    @property
    def finished(self) -> list[str]:
        return [i for i in self.accepted if self.rows.get(i) == "SUCCESS"]

    @property
    def complete(self) -> list[str]:
        """Accepted fan-outs that finished with every step succeeded."""
        return [i for i in self.finished if self.steps_ok.get(i) == STEPS]

    @property
    def lost(self) -> list[str]:
        return [i for i in self.accepted if i not in self.rows]

    @property
    def unrequested(self) -> list[str]:
        """Fan-outs in the database that no 202 named (the re-accept check's excepted)."""
        known = {*self.accepted, AFTER_DRAIN_ID}
        return [i for i in self.rows if i not in known]


class Prober:
    """``GET /healthz`` every ``PROBE_INTERVAL`` s on a thread: latencies of 200s."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=REQUEST_TIMEOUT) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    ok = client.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.latencies.append(time.monotonic() - start)
                else:
                    self.errors += 1
                self._stop.wait(PROBE_INTERVAL)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT + 5)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan")


async def _burst(base_url: str, keys: list[str]) -> list[Reply]:
    limits = httpx.Limits(max_connections=len(keys), max_keepalive_connections=len(keys))
    params = {"steps": STEPS, "max_n": MAX_N}
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT
    ) as client:

        async def one(key: str) -> Reply:
            try:
                r = await asyncio.wait_for(
                    client.post("/trigger_async", params=params, headers={"Idempotency-Key": key}),
                    REQUEST_TIMEOUT,
                )
            except (TimeoutError, httpx.HTTPError) as exc:
                return Reply(key, None, text=type(exc).__name__)
            body = r.json() if r.headers.get("content-type") == "application/json" else {}
            return Reply(
                key, r.status_code, body.get("workflow_id"), r.headers.get("retry-after"), r.text
            )

        return list(await asyncio.gather(*(one(k) for k in keys)))


def backlog(db_url: str) -> int:
    sql = backlog_sql("postgres").replace(":name", "%s")
    return int(query(db_url, sql, FAN_OUT)[0][0])


def drain(db_url: str, run: OverloadRun, started: float) -> None:
    """Until every admitted fan-out has left PENDING (bounded): the backlog's peak and
    the time from the burst's first request."""

    def done() -> bool:
        run.backlog_peak = max(run.backlog_peak, backlog(db_url))
        rows = dict(
            query(
                db_url,
                "SELECT workflow_uuid, status FROM dbos.workflow_status WHERE name = %s",
                FAN_OUT,
            )
        )
        return all(rows.get(i) not in (None, "PENDING", "ENQUEUED") for i in run.accepted)

    try:
        wait_for(done, DRAIN_TIMEOUT, 0.25, "the admitted fan-outs to finish")
        run.drain_seconds = time.monotonic() - started
    except AssertionError as exc:
        progress(f"load: overload did not drain: {exc}")


def verify(db_url: str, run: OverloadRun) -> None:
    run.rows = dict(
        query(
            db_url,
            "SELECT workflow_uuid, status FROM dbos.workflow_status WHERE name = %s",
            FAN_OUT,
        )
    )
    run.steps_ok = {
        parent: int(n)
        for parent, n in query(
            db_url,
            "SELECT parent_workflow_id, count(*) FROM dbos.workflow_status "
            "WHERE parent_workflow_id = ANY(%s) AND status = 'SUCCESS' GROUP BY 1",
            list(run.rows),
        )
    }


def run_overload(ctx: Context, bound: int) -> OverloadRun:
    """One server with MAX_QUEUED_STEPS=bound; idle probes, the burst, the drain, one
    trigger after it, then the database's account."""
    db_url = ctx.fresh_db("overload")
    log = ctx.scratch("overload") / "server.log"
    server = shutdown_server(
        db_url, log, env={"MAX_QUEUED_STEPS": str(bound)}, ready_path="/healthz"
    )
    run = OverloadRun(bound=bound)
    keys = [f"burst-{i}" for i in range(FACTOR * bound // STEPS)]
    try:
        server.start(ready_timeout=120)
        with Prober(server.base_url) as idle:
            wait_for(lambda: len(idle.latencies) >= IDLE_PROBES, 60, 0.1, "idle probes")
        run.idle_health = idle.latencies
        progress(f"load: burst of {len(keys)} fan-outs of {STEPS} steps, bound {bound}")
        with Prober(server.base_url) as busy:
            started = time.monotonic()
            run.replies = asyncio.run(_burst(server.base_url, keys))
            drain(db_url, run, started)
        run.burst_health, run.health_errors = busy.latencies, busy.errors
        api = ShutdownClient(server.client)
        after = api.trigger_async(STEPS, MAX_N, timeout=REQUEST_TIMEOUT, key=AFTER_DRAIN_KEY)
        run.reaccepted = after.status_code
        if after.status_code == 202:
            api.wait_success(after.json()["workflow_id"], timeout=DRAIN_TIMEOUT)
        verify(db_url, run)
    finally:
        server.close()
    return run


def _answers(run: OverloadRun, tag: str) -> Figure:
    statuses: dict[str, int] = {}
    for r in run.replies:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    wrong = [r for r in run.replies if not r.correct]
    return promise(
        AREA,
        f"{tag}: answers",
        dict(sorted(statuses.items())),
        not wrong and bool(run.accepted),
        "202 or 429 + Retry-After",
        f"{len(run.replies)} fan-outs of {STEPS} steps at once; "
        f"{len(run.accepted) * STEPS} steps admitted"
        + (f"; wrong: {wrong[0].text[:80]}" if wrong else ""),
    )


def figures(run: OverloadRun) -> list[Figure]:
    idle, busy = p95(run.idle_health), p95(run.burst_health)
    admitted = len(run.accepted) * STEPS
    rate = admitted / run.drain_seconds if run.drain_seconds else 0.0
    tag = f"overload {FACTOR}x MAX_QUEUED_STEPS={run.bound}"
    return [
        _answers(run, tag),
        promise(
            AREA,
            f"{tag}: backlog peak",
            run.backlog_peak,
            run.backlog_peak <= run.bound,
            f"≤ {run.bound}",
            "admitted, unfinished steps, sampled every 0.25 s",
        ),
        promise(
            AREA,
            f"{tag}: accepted fan-outs finished, every step",
            f"{len(run.complete)} / {len(run.accepted)}",
            len(run.complete) == len(run.accepted) > 0,
            "all",
        ),
        promise(AREA, f"{tag}: accepted fan-outs lost", len(run.lost), not run.lost, "0"),
        promise(
            AREA,
            f"{tag}: fan-outs started for a refused request",
            len(run.unrequested),
            not run.unrequested,
            "0",
        ),
        promise(
            AREA,
            f"{tag}: /healthz p95 during the burst",
            f"{busy * 1000:.0f} ms vs {idle * 1000:.0f} ms idle",
            busy <= HEALTH_RATIO_LIMIT * idle and run.health_errors == 0,
            f"≤ {HEALTH_RATIO_LIMIT}x idle, no failure",
            f"{len(run.burst_health)} probes, {run.health_errors} failed; median "
            f"{statistics.median(run.burst_health or [0]) * 1000:.0f} ms",
        ),
        info(
            AREA,
            f"{tag}: time to drain",
            f"{run.drain_seconds:.1f} s" if run.drain_seconds else "did not drain",
            f"from the first request until the last admitted fan-out finished: {rate:.1f} steps/s",
        ),
        promise(
            AREA,
            f"{tag}: admitted again once drained",
            run.reaccepted,
            run.reaccepted == 202,
            "202",
        ),
    ]


def run(ctx: Context) -> list[Figure]:
    return figures(
        run_overload(
            ctx, QUICK_BOUND if ctx.quick else fastapi_scope_shutdown.DEFAULT_MAX_QUEUED_STEPS
        )
    )


__all__ = ["OverloadRun", "Reply", "figures", "run", "run_overload"]
