"""Load area: bursts of concurrent ``POST /trigger_async`` against ``fastapi_scope.py``.

What it measures
    ``uvicorn fastapi_scope:app`` (one process) on a fresh Postgres database receives a
    burst of N requests at once (500) from an ``httpx.AsyncClient`` on loopback, each
    starting a small ``A.run`` workflow (3 steps, no sleep), then a second burst of the
    same size. Every request must answer 202 with a workflow id (or 503 with
    ``Retry-After``, had the app shed load by design) within 60 s; every accepted
    workflow must reach ``SUCCESS``, none may be lost or run twice; the server's memory
    must stay bounded: the second burst must not raise the peak much. A full run then
    fires 2000 at once, a capacity probe whose answers are reported, not promised.

    Load shedding: the app has none, and at 500 needs none. 500 concurrent requests were
    all answered 202, without a timeout or a 5xx, on a loaded 2-core machine; they wait
    in uvicorn's and anyio's queues (40 threads run the ``def`` endpoint), the server
    starts about 25-40 workflows a second, and memory stops growing after the first
    burst. A 503 with ``Retry-After`` would count as a correct answer, so the check stays
    valid if the app adds an admission limit.

    Answers leave as their workflows start because ``trigger_async`` declares
    ``response_model=None``. With a return annotation alone, FastAPI validates each
    response on the same thread pool the ``def`` endpoint runs on (``serialize_response``
    -> ``run_in_threadpool``), queued behind every request of the burst that had not
    started yet: the server starts the workflows steadily but sends most answers in the
    burst's last second (measured without it: 373 of 500; p50 = p99 = 17.5 s at 500, and
    at 2000 only 83 answers within the client's 60 s although every workflow started;
    with it, same machine: at 500 p50 10.9 s / p99 12.7 s, at 2000 all answered within
    42 s).

How
    Each burst fires all requests at once (connection limit = burst size, each request
    bounded by ``REQUEST_TIMEOUT``, the burst by ``BURST_TIMEOUT``), then waits (bounded)
    until the server has started a workflow for every request that reached it (the
    ``triggers`` counter of ``GET /counters``, a ``def`` endpoint served after the queued
    ones) and every ``A.run`` row is ``SUCCESS``. The server's ``/proc/<pid>/status`` is
    sampled every 50 ms: ``VmRSS`` now, ``VmHWM`` the peak since start. After the bursts:

    - ``dbos.workflow_status``: a ``SUCCESS`` row for every accepted id, and no ``A.run``
      row beyond the accepted ones except, at most, one per request that got no answer in
      time (its workflow may have started after the client gave up);
    - ``dbos.operation_outputs``: for every ``A.run`` exactly ``steps`` step outputs,
      function ids 1..steps (no step recorded twice);
    - every result has ``instance_counter == steps`` (each step body ran once in the run);
    - ``GET /counters``: ``step_bodies_run == rows * steps`` (no body ran twice in the
      process) and ``triggers == rows`` (one workflow per request that reached it).

Figures (per burst ``<N>``; ``#2`` is the second burst of the same size)
    - answers (promise "2xx or 503 + Retry-After"; info for the capacity probe): status
      codes; "no answer" counts requests without an answer within the deadline.
    - latency first / p50 / p99, throughput (info): per request from send to answer as the
      client measures it (its own event loop shares the 2 cores, so under load it notices
      answers and deadlines late), and answers per second over the burst.
    - server RSS peak (info): VmHWM after the burst, its growth over the previous peak,
      VmRSS once the burst's workflows have finished, and the most threads sampled
      (DBOS's executor pool has no bound: one thread per workflow running at once).
    - accepted workflows SUCCESS (promise all), lost (promise 0), run twice (promise 0).
    - server RSS peak growth from the second burst (promise ≤
      ``SECOND_BURST_GROWTH_LIMIT_MIB``): a repeated burst finds its memory already
      allocated (about +1 MiB measured, after +25 MiB for the first); a leak per request
      would raise the peak again.
"""

from __future__ import annotations

import asyncio
import base64
import pickle
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

import fastapi_scope
from harness.clients import ScopeClient
from harness.db import query
from harness.env import script_env
from harness.measure import Sampler
from harness.proc import wait_for
from harness.server import AppServer
from reliability import overload
from reliability.core import Context, Figure, info, progress, promise

AREA = "load"
STEPS = 3
STEP_SECONDS = 0.0
REQUEST_TIMEOUT = 60.0
BURST_TIMEOUT = 240.0
SETTLE_TIMEOUT = 300.0
SECOND_BURST_GROWTH_LIMIT_MIB = 16
RUN_NAME = fastapi_scope.A.run.__qualname__
NO_ANSWER = f"no answer in {REQUEST_TIMEOUT:.0f} s"


@dataclass
class Answer:
    status: int | None  # None: no answer (deadline, reset)
    workflow_id: str | None = None
    retry_after: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.status == 202 and bool(self.workflow_id)

    @property
    def shed(self) -> bool:
        return self.status == 503 and bool(self.retry_after)

    @property
    def correct(self) -> bool:
        return self.accepted or self.shed


@dataclass
class Burst:
    size: int
    promised: bool  # False: a capacity probe, its answers are informative
    answers: list[Answer]
    elapsed: float
    rss_before_kib: int
    rss_max_kib: int  # highest VmRSS sampled during the burst
    threads_max: int  # most threads sampled during the burst (DBOS's pool is unbounded)
    hwm_after_kib: int  # VmHWM right after the burst: the peak since the server started
    settled_seconds: float = 0.0  # from the last answer until its workflows were done
    started: int = 0  # workflows the server started for this burst (its triggers counter)
    rss_settled_kib: int = 0

    @property
    def accepted(self) -> list[str]:
        return [a.workflow_id for a in self.answers if a.accepted and a.workflow_id]

    @property
    def unanswered(self) -> int:
        return sum(1 for a in self.answers if a.status is None)

    @property
    def statuses(self) -> dict[str, int]:
        return dict(sorted(Counter(str(a.status or a.error) for a in self.answers).items()))

    @property
    def wrong(self) -> list[Answer]:
        return [a for a in self.answers if not a.correct]

    def latency(self, q: float) -> float:
        times = sorted(a.seconds for a in self.answers)
        return times[min(len(times) - 1, int(q * len(times)))]

    @property
    def throughput(self) -> float:
        answered = len(self.answers) - self.unanswered
        return answered / self.elapsed if self.elapsed else 0.0


@dataclass
class LoadRun:
    steps: int
    bursts: list[Burst]
    rss_start_kib: int
    # The database and the process, after every burst settled.
    rows: dict[str, str] = field(default_factory=dict)  # A.run id -> status
    bad_outputs: list[str] = field(default_factory=list)  # step outputs other than 1..steps
    bad_results: list[str] = field(default_factory=list)  # instance_counter != steps
    counters: dict[str, Any] = field(default_factory=dict)
    tracebacks: int = 0

    @property
    def accepted(self) -> list[str]:
        return [i for b in self.bursts for i in b.accepted]

    @property
    def unanswered(self) -> int:
        return sum(b.unanswered for b in self.bursts)

    @property
    def duplicate_ids(self) -> int:
        return len(self.accepted) - len(set(self.accepted))

    @property
    def lost(self) -> list[str]:
        """Accepted workflows without a SUCCESS row."""
        return [i for i in self.accepted if self.rows.get(i) != "SUCCESS"]

    @property
    def unacknowledged(self) -> list[str]:
        """A.run rows no answer named: started for a request the client gave up on."""
        accepted = set(self.accepted)
        return [i for i in self.rows if i not in accepted]

    @property
    def extra_bodies(self) -> int:
        return int(self.counters.get("step_bodies_run", 0)) - len(self.rows) * self.steps

    @property
    def run_twice(self) -> int:
        """Evidence of double execution: rows no request explains, duplicate step outputs,
        results counting extra bodies, step bodies beyond one per step of each row."""
        unexplained = max(0, len(self.unacknowledged) - self.unanswered)
        return (
            unexplained
            + self.duplicate_ids
            + len(self.bad_outputs)
            + len(self.bad_results)
            + max(0, self.extra_bodies)
        )


class RssSampler(Sampler):
    """Samples VmRSS of a process every ``interval`` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(interval, join_timeout=5)
        self.pid = pid
        self.max_kib = 0
        self.max_threads = 0

    def sample(self) -> None:
        now = memory(self.pid)
        self.max_kib = max(self.max_kib, now.get("VmRSS", 0))
        self.max_threads = max(self.max_threads, now.get("Threads", 0))


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, and its number of threads."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "Threads:")):
                    key, value = line.split(":", 1)
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def raise_fd_limit(needed: int) -> None:
    """A burst holds one socket per request in the client and in the server (which
    inherits the limit): raise the soft limit up to the hard one if it is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed * 2 + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        cap = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))


async def _burst(base_url: str, size: int, steps: int, step_seconds: float) -> list[Answer]:
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    params = {"steps": steps, "step_seconds": step_seconds}
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT
    ) as client:

        async def one() -> Answer:
            start = time.monotonic()
            try:
                # httpx bounds each phase (connect, read...); this bounds the whole request.
                r = await asyncio.wait_for(
                    client.post("/trigger_async", params=params), REQUEST_TIMEOUT
                )
            except TimeoutError:
                return Answer(None, error=NO_ANSWER, seconds=time.monotonic() - start)
            except httpx.HTTPError as exc:
                return Answer(None, error=type(exc).__name__, seconds=time.monotonic() - start)
            seconds = time.monotonic() - start
            try:
                body = r.json()
            except ValueError:
                body = None
            return Answer(
                r.status_code,
                body.get("workflow_id") if isinstance(body, dict) else None,
                r.headers.get("retry-after"),
                None if r.status_code in (202, 503) else r.text[:200],
                seconds,
            )

        return await asyncio.wait_for(
            asyncio.gather(*(one() for _ in range(size))), timeout=BURST_TIMEOUT
        )


def fire(
    server: AppServer,
    size: int,
    steps: int = STEPS,
    step_seconds: float = STEP_SECONDS,
    promised: bool = True,
) -> Burst:
    """One burst of ``size`` concurrent requests; memory sampled while it runs."""
    assert server.proc is not None
    pid = server.proc.pid
    before = memory(pid).get("VmRSS", 0)
    with RssSampler(pid) as sampler:
        start = time.monotonic()
        answers = asyncio.run(_burst(server.base_url, size, steps, step_seconds))
        elapsed = time.monotonic() - start
    return Burst(
        size=size,
        promised=promised,
        answers=answers,
        elapsed=elapsed,
        rss_before_kib=before,
        rss_max_kib=sampler.max_kib,
        threads_max=sampler.max_threads,
        hwm_after_kib=memory(pid).get("VmHWM", 0),
    )


def run_rows(db_url: str) -> dict[str, str]:
    """A.run id -> status, every row in the database."""
    return dict(
        query(
            db_url,
            "SELECT workflow_uuid, status FROM dbos.workflow_status WHERE name = %s",
            RUN_NAME,
        )
    )


def settle(db_url: str, server: AppServer, burst: Burst, before: int) -> None:
    """Wait (bounded) until every request that reached the server has its workflow row
    and every row is SUCCESS. ``before``: the triggers counter before the burst."""
    assert server.proc is not None
    start = time.monotonic()

    def done() -> bool:
        # /counters is a `def` endpoint too: it answers after the queued triggers started.
        triggers = ScopeClient(server.client).counters(timeout=REQUEST_TIMEOUT)["triggers"]
        rows = run_rows(db_url)
        burst.started = triggers - before
        return len(rows) == triggers and all(s == "SUCCESS" for s in rows.values())

    try:
        wait_for(done, SETTLE_TIMEOUT, 0.5, "the burst's workflows to finish")
    except (AssertionError, httpx.HTTPError) as exc:
        progress(f"load: the burst did not settle: {exc}")
    burst.settled_seconds = time.monotonic() - start
    burst.rss_settled_kib = memory(server.proc.pid).get("VmRSS", 0)


def _decode(output: str | None) -> Any:
    # The app's own results in a scratch database: DBOS stores them as base64 pickles.
    return pickle.loads(base64.b64decode(output)) if output else None  # noqa: S301


def verify(db_url: str, run: LoadRun) -> None:
    """Fill in what the database says about every A.run workflow."""
    run.rows = run_rows(db_url)
    ids = sorted(run.rows)
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    for wf_id, function_id in query(
        db_url,
        "SELECT workflow_uuid, function_id FROM dbos.operation_outputs "
        "WHERE workflow_uuid = ANY(%s) ORDER BY workflow_uuid, function_id",
        ids,
    ):
        outputs[wf_id].append(int(function_id))
    want = list(range(1, run.steps + 1))
    run.bad_outputs = [i for i, fids in outputs.items() if fids != want]
    # DBOS 3.4 keeps workflow results in workflow_output, beside workflow_status.
    results = dict(
        query(
            db_url,
            "SELECT workflow_uuid, output FROM dbos.workflow_output WHERE workflow_uuid = ANY(%s)",
            ids,
        )
    )
    run.bad_results = [
        i
        for i, status in run.rows.items()
        if status == "SUCCESS"
        and (_decode(results.get(i)) or {}).get("instance_counter") != run.steps
    ]


def run_load(
    ctx: Context,
    sizes: list[int],
    probe: int | None = None,
    steps: int = STEPS,
    step_seconds: float = STEP_SECONDS,
) -> LoadRun:
    """One server; the bursts in turn (each settled before the next), then a capacity
    probe of ``probe`` requests if given, then the checks."""
    raise_fd_limit(max([*sizes, probe or 0]))
    db_url = ctx.fresh_db("load")
    workdir = ctx.scratch("load")
    server = AppServer("fastapi_scope:app", script_env(db_url), workdir / "server.log")
    plan = [(n, True) for n in sizes] + ([(probe, False)] if probe else [])
    try:
        server.start(ready_timeout=120)
        assert server.proc is not None
        run = LoadRun(steps=steps, bursts=[], rss_start_kib=memory(server.proc.pid)["VmRSS"])
        for size, promised in plan:
            progress(f"load: burst of {size} concurrent POST /trigger_async")
            burst = fire(server, size, steps, step_seconds, promised)
            run.bursts.append(burst)
            progress(
                f"load: {burst.statuses} in {burst.elapsed:.1f} s, "
                f"peak RSS {burst.hwm_after_kib / 1024:.0f} MiB"
            )
            settle(db_url, server, burst, sum(b.started for b in run.bursts[:-1]))
        run.counters = ScopeClient(server.client).counters(timeout=REQUEST_TIMEOUT)
        verify(db_url, run)
        try:
            server.terminate(timeout=30)
        except Exception:  # noqa: BLE001 - killed by close(); the figures stand
            pass
    finally:
        server.close()
    run.tracebacks = server.log_text().count("Traceback")
    return run


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def second_burst_growth_kib(run: LoadRun) -> int | None:
    """How much the peak rose during the second burst of the first burst's size."""
    first = run.bursts[0]
    for later in run.bursts[1:]:
        if later.size == first.size and later.promised:
            return later.hwm_after_kib - first.hwm_after_kib
    return None


def figures(run: LoadRun) -> list[Figure]:
    out: list[Figure] = []
    seen: Counter[int] = Counter()
    previous_hwm = run.rss_start_kib
    for burst in run.bursts:
        seen[burst.size] += 1
        tag = f"{burst.size}" + (f" #{seen[burst.size]}" if seen[burst.size] > 1 else "")
        out += _burst_figures(burst, tag, previous_hwm)
        previous_hwm = burst.hwm_after_kib
    return out + _run_figures(run)


def _burst_figures(burst: Burst, tag: str, previous_hwm: int) -> list[Figure]:
    """One burst's answers, latency, throughput and memory."""
    note = (
        f"{len(burst.accepted)} accepted in {burst.elapsed:.1f} s; the server started "
        f"{burst.started} workflows"
    )
    if burst.promised:
        answers = promise(
            AREA,
            f"burst {tag}: answers",
            burst.statuses,
            not burst.wrong,
            "2xx or 503 + Retry-After",
            note,
        )
    else:
        answers = info(
            AREA,
            f"burst {tag} (capacity probe): answers",
            burst.statuses,
            note + "; no admission limit: the excess waits instead of a 503",
        )
    return [
        answers,
        info(
            AREA,
            f"burst {tag}: latency first / p50 / p99",
            f"{burst.latency(0):.1f} s / {burst.latency(0.5):.1f} s / {burst.latency(0.99):.1f} s",
            "send to answer; client and server share 2 cores",
        ),
        info(AREA, f"burst {tag}: throughput", f"{burst.throughput:.0f} answers/s"),
        info(
            AREA,
            f"burst {tag}: server RSS peak",
            _mib(burst.hwm_after_kib),
            f"{(burst.hwm_after_kib - previous_hwm) / 1024:+.1f} MiB over the previous "
            f"peak; {_mib(burst.rss_settled_kib)} once its workflows finished; "
            f"up to {burst.threads_max} threads",
        ),
    ]


def _run_figures(run: LoadRun) -> list[Figure]:
    """What became of every accepted workflow over all bursts, and the memory's growth."""
    accepted = len(run.accepted)
    success = accepted - len(run.lost)
    out = [
        info(AREA, "server RSS before the first burst", _mib(run.rss_start_kib)),
        promise(
            AREA,
            "accepted workflows SUCCESS",
            f"{success} / {accepted}",
            success == accepted and accepted > 0,
            "all",
            f"{len(run.unacknowledged)} more for requests that got no answer in time",
        ),
        promise(AREA, "accepted workflows lost", len(run.lost), not run.lost, "0"),
        promise(
            AREA,
            "workflows or steps run twice",
            run.run_twice,
            run.run_twice == 0,
            "0",
            f"{len(run.rows)} A.run rows for {accepted} answers + {run.unanswered} unanswered; "
            f"step_bodies_run {run.counters.get('step_bodies_run')} = {len(run.rows)} x "
            f"{run.steps}; {len(run.bad_outputs)} with step outputs other than 1..{run.steps}",
        ),
    ]
    growth = second_burst_growth_kib(run)
    if growth is not None:
        out.append(
            promise(
                AREA,
                f"server RSS peak growth from burst {run.bursts[0].size} #2",
                f"{growth / 1024:+.1f} MiB",
                growth <= SECOND_BURST_GROWTH_LIMIT_MIB * 1024,
                f"≤ {SECOND_BURST_GROWTH_LIMIT_MIB} MiB (bounded)",
                f"first burst: {(run.bursts[0].hwm_after_kib - run.rss_start_kib) / 1024:+.1f} "
                "MiB over the idle server",
            )
        )
    return out


def run(ctx: Context) -> list[Figure]:
    bursts = figures(run_load(ctx, [500, 500], probe=None if ctx.quick else 2000))
    return bursts + overload.run(ctx)


__all__ = ["Answer", "Burst", "LoadRun", "figures", "fire", "run", "run_load", "verify"]
