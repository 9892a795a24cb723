"""The rows of the benchmark table: each measures two things side by side, in one run."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks import shutdown_runs
from benchmarks.core import Row, percentile, progress, run_probe
from harness import REPO
from harness.db import ScratchDatabases, query
from harness.env import script_env
from harness.measure import Sampler
from harness.server import AppServer


@dataclass(frozen=True)
class Sizes:
    """How much each row measures (``python -m benchmarks`` is ``full``)."""

    repeats: int  # row 1: in-process repeats
    step_calls: int  # row 1: durable steps (and INSERTs) per timing
    plain_calls: int  # row 1: plain calls per timing
    log_steps: int  # row 2: steps per workflow
    log_workflows: int  # row 2: workflows per timed batch
    log_batches: int  # row 2: timed batches per process (the process's figure is their median)
    log_processes: int  # row 2: processes per side, alternating
    fan_n: int  # row 3: trivial steps per fan-out
    fan_repeats: int
    threads_units: int  # row 4b: CPU-bound units
    threads_seconds: float  # row 4b: CPU seconds of all units together
    threads_repeats: int
    convoy_enqueues: int  # row 4d: enqueues timed per side (each one a sample)
    convoy_threads: int | None  # row 4d: busy threads (None: the demo's queue limit, 50)
    cpu_units: int  # rows 4a and 6: steps of the demo's fan-out
    cpu_seconds: float  # rows 4a and 6: its CPU work, in seconds of one core (sets max_n)
    server_repeats: int  # rows 4a and 6: fan-outs per configuration
    pool_repeats: int  # rows 8: default fan-outs per mode and layout
    pool_fan_out: tuple[int, int] | None  # rows 8: (steps, max_n); None: the demo's defaults
    health_idle: int  # rows 8e, 8f: /healthz requests on the idle server
    http_pairs: int  # row 5: (no-op, trigger) request pairs
    http_blocks: int  # row 5: the pairs are cut into blocks, one ratio each
    startup_repeats: int  # row 7


SIZES = {
    "full": Sizes(
        repeats=7,
        step_calls=1000,
        plain_calls=200_000,
        log_steps=20,
        log_workflows=20,
        log_batches=3,
        log_processes=5,
        fan_n=50,
        fan_repeats=7,
        threads_units=20,
        threads_seconds=6.0,
        threads_repeats=3,
        convoy_enqueues=3,
        convoy_threads=None,
        cpu_units=100,
        cpu_seconds=12.0,
        server_repeats=3,
        http_pairs=500,
        http_blocks=5,
        startup_repeats=7,
        pool_repeats=5,
        pool_fan_out=None,
        health_idle=60,
    ),
    "quick": Sizes(
        repeats=5,
        step_calls=200,
        plain_calls=100_000,
        log_steps=10,
        log_workflows=10,
        log_batches=3,
        log_processes=3,
        fan_n=50,
        fan_repeats=3,
        threads_units=20,
        threads_seconds=3.0,
        threads_repeats=2,
        convoy_enqueues=1,
        convoy_threads=None,
        cpu_units=100,
        cpu_seconds=6.0,
        server_repeats=1,
        http_pairs=200,
        http_blocks=4,
        startup_repeats=3,
        pool_repeats=3,
        pool_fan_out=None,
        health_idle=40,
    ),
    # For the test suite: every code path with tiny sizes; the figures mean nothing.
    "smoke": Sizes(
        repeats=2,
        step_calls=10,
        plain_calls=10_000,
        log_steps=2,
        log_workflows=2,
        log_batches=1,
        log_processes=1,
        fan_n=5,
        fan_repeats=1,
        threads_units=4,
        threads_seconds=0.2,
        threads_repeats=1,
        convoy_enqueues=2,
        convoy_threads=4,
        cpu_units=40,
        cpu_seconds=1.5,
        server_repeats=1,
        http_pairs=6,
        http_blocks=2,
        startup_repeats=1,
        pool_repeats=1,
        pool_fan_out=(20, 20),
        health_idle=5,
    ),
}


@dataclass
class Context:
    sizes: Sizes
    dbs: ScratchDatabases
    kinds: list[str]  # "sqlite", "postgres"

    def fresh_db(self, kind: str, label: str) -> str:
        return self.dbs.fresh(kind, label)


RowFn = Callable[[Context, str], list[Row]]
BOTH = ("sqlite", "postgres")


# --- 1. durable step ---------------------------------------------------------------------


def row_step_cost(ctx: Context, kind: str) -> list[Row]:
    s = ctx.sizes
    url = ctx.fresh_db(kind, "step")
    progress(f"{kind}: 1 durable step vs plain call vs INSERT commit ({s.step_calls} steps)")
    r = run_probe(
        "step_cost",
        url,
        {"steps": s.step_calls, "plain_calls": s.plain_calls, "repeats": s.repeats},
    )
    plain = Row("1a", "durable step vs plain call", kind, "step", "call")
    floor = Row(
        "1b",
        "durable step vs one single-row INSERT commit, same database",
        kind,
        "step",
        "INSERT",
    )
    for step, call, insert in zip(r["step"], r["plain"], r["insert"], strict=True):
        plain.add(step, call)
        floor.add(step, insert)
    for row in (plain, floor):
        row.details["statements_per_step"] = r["statements_per_step"]
        row.details["commits_per_step"] = r["commits_per_step"]
    plain.target_text = "— (the price of a checkpoint)"
    floor.target_text = "— (1 = the physical floor)"
    return [plain, floor]


# --- 2. repo logging and helpers vs bare DBOS ---------------------------------------------


def row_logging(ctx: Context, kind: str) -> list[Row]:
    s = ctx.sizes
    url = ctx.fresh_db(kind, "logging")
    row = Row("2", "repo JSON logging + helpers vs bare DBOS", kind, "repo", "bare")
    row.target_op, row.target, row.target_text = "<=", 1.10, "≤ 1.10"
    params = {"steps": s.log_steps, "workflows": s.log_workflows, "batches": s.log_batches}
    for i in range(s.log_processes):
        progress(f"{kind}: 2 logging: process pair {i + 1}/{s.log_processes}")
        # Alternate which side goes first, so a drift of the machine hits both.
        order = ("repo", "bare") if i % 2 == 0 else ("bare", "repo")
        got = {side: run_probe("logging", url, {**params, "side": side}) for side in order}
        # A process's figure is its fastest batch: interference only ever adds time.
        row.add(min(got["repo"]["per_workflow"]), min(got["bare"]["per_workflow"]))
        for side in order:
            row.details.setdefault(f"per_record_{side}_s", []).append(got[side]["per_record"])
    row.details["workflow"] = f"{s.log_steps} steps, each logging one line, + 2 workflow lines"
    return [row]


# --- 3. queued fan-out vs direct -----------------------------------------------------------


def row_fan_out(ctx: Context, kind: str) -> list[Row]:
    s = ctx.sizes
    shutdown_settings = shutdown_runs.settings()
    url = ctx.fresh_db(kind, "fanout")
    poll = shutdown_settings.polling_interval
    limit = shutdown_settings.queue_concurrency
    queues = [
        # The demo's queue settings, and how its fan_out waits (get_result every `poll` s).
        {"name": "bench-fanout-demo", "polling": poll, "concurrency": limit, "result_poll": poll},
        # DBOS's defaults: queue polling 1 s, get_result polling 1 s.
        {"name": "bench-fanout-default", "polling": 1.0, "concurrency": limit, "result_poll": 1.0},
    ]
    progress(f"{kind}: 3 fan-out of {s.fan_n} trivial steps (polling {poll} s and 1 s) vs direct")
    r = run_probe("fan_out", url, {"n": s.fan_n, "repeats": s.fan_repeats, "queues": queues})
    rows = []
    for q, rid, text in (
        (queues[0], "3a", f"queued fan-out (demo's polling, {poll} s) vs direct calls"),
        (queues[1], "3b", "queued fan-out (DBOS default polling, 1 s) vs direct calls"),
    ):
        row = Row(rid, f"{text}, {s.fan_n} trivial steps", kind, "queued", "direct")
        for (total, _, _), direct in zip(r[q["name"]], r["direct"], strict=True):
            row.add(total, direct)
        row.details["queue"] = q
        row.details["enqueue_median_s"] = statistics.median(x[1] for x in r[q["name"]])
        row.details["wait_median_s"] = statistics.median(x[2] for x in r[q["name"]])
        row.details["sql_per_step_direct"] = [v / s.fan_n for v in r["sql_direct"]]
        row.details["sql_per_step_queued"] = [v / s.fan_n for v in r["sql_queued"]]
        rows.append(row)
    rows[0].target_op, rows[0].target, rows[0].target_text = "<=", 2.0, "≤ 2.0"
    rows[1].target_text = "— (for comparison)"
    return rows


# --- 4. CPU-bound fan-out: processes and threads -------------------------------------------


def row_workers(ctx: Context, kind: str) -> list[Row]:
    """2 worker processes vs 1 on the demo itself (Postgres), and the machine's ceiling."""
    s = ctx.sizes
    units, max_n = shutdown_runs.size_fan_out(s.cpu_seconds, s.cpu_units)
    cpu = shutdown_runs.fan_out_cpu_seconds(units, max_n)
    row = Row(
        "4a",
        f"CPU-bound demo fan-out, executor=thread ({units} steps, max_n {max_n}, "
        f"~{cpu:.1f} CPU-s): 1 worker process vs 2",
        kind,
        "1 worker",
        "2 workers",
    )
    row.target_op, row.target, row.target_text = ">=", 1.8, "≥ 1.8 (speed-up)"
    ceiling = Row(
        "4c",
        "the same CPU work without DBOS: 1 plain process vs 2 (the machine's ceiling for 4a)",
        kind,
        "1 process",
        "2 processes",
    )
    ceiling.target_text = "≈ 2.0 on 2 idle cores"
    # Both servers stay up (separate databases) so the runs interleave: a busy phase of
    # the machine hits both layouts alike.
    dbs = {1: ctx.fresh_db(kind, "workers1"), 2: ctx.fresh_db(kind, "workers2")}
    one = shutdown_runs.server(dbs[1], workers=1, log_dir=ctx.dbs.directory)
    two = shutdown_runs.server(dbs[2], workers=2, log_dir=ctx.dbs.directory)
    with one, two:
        for i in range(s.server_repeats):
            runs = {}
            for workers, server in ((1, one), (2, two)) if i % 2 == 0 else ((2, two), (1, one)):
                progress(f"{kind}: 4a {workers} worker(s), run {i + 1}/{s.server_repeats}")
                runs[workers] = shutdown_runs.run_fan_out(
                    server, dbs[workers], units, max_n, executor="thread"
                )
            row.add(runs[1].span, runs[2].span)
            for workers, run in runs.items():
                row.details.setdefault(f"executors_{workers}", []).append(run.per_executor)
                row.details.setdefault(f"enqueue_span_{workers}", []).append(run.enqueue_span)
            progress(f"{kind}: 4c plain processes, run {i + 1}/{s.server_repeats}")
            ceiling.add(_plain_processes(units, max_n, 1), _plain_processes(units, max_n, 2))
    row.details["measure"] = "first step enqueued → last step completed (system database)"
    row.details["units"], row.details["max_n"] = units, max_n
    return [row, ceiling]


_PLAIN_WORK = """
import sys
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
units, max_n, share, shares = map(int, sys.argv[1:])
for i in range(share, units, shares):
    fib(min(i, max_n))
"""


def _plain_processes(units: int, max_n: int, processes: int) -> float:
    """Wall time of the demo's fan-out work split over ``processes`` plain Pythons."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PLAIN_WORK, str(units), str(max_n), str(k), str(processes)]
        )
        for k in range(processes)
    ]
    for proc in procs:
        if proc.wait(timeout=600) != 0:
            raise RuntimeError("a plain worker process failed")
    return time.perf_counter() - t0


def row_threads(ctx: Context, kind: str) -> list[Row]:
    """The same CPU-bound units on a 50-way queue in one process vs one after the other."""
    s = ctx.sizes
    shutdown_settings = shutdown_runs.settings()
    units = s.threads_units
    n = shutdown_runs.fib_for_seconds(s.threads_seconds / units)
    url = ctx.fresh_db(kind, "threads")
    limit = shutdown_settings.queue_concurrency
    progress(
        f"{kind}: 4b CPU-bound: {units} × fib({n}), one process: {limit}-way queue vs sequential"
    )
    poll = shutdown_settings.polling_interval
    busy = s.convoy_threads or shutdown_settings.queue_concurrency
    r = run_probe(
        "threads",
        url,
        {
            "units": units,
            "fib": n,
            "repeats": s.threads_repeats,
            "enqueues": s.convoy_enqueues,
            "busy_threads": busy,
            # Each busy thread's unit of work: a step of the demo's default fan-out
            # computes up to fib(30); a smaller unit keeps the threads turning over.
            "busy_fib": 24 if s.convoy_threads is None else 18,
            "queue": {
                "name": "bench-threads",
                "polling": poll,
                "concurrency": shutdown_settings.queue_concurrency,
                "result_poll": poll,
            },
        },
    )
    return _threads_rows(kind, r, units, n, limit, busy)


def _threads_rows(
    kind: str, r: dict[str, Any], units: int, n: int, limit: int, busy: int
) -> list[Row]:
    """Rows 4b, 4d and 4e from the ``threads`` probe's timings."""
    row = Row(
        "4b",
        f"CPU-bound fan-out in one process ({units} × fib({n})): sequential vs {limit}-way queue "
        "(threads)",
        kind,
        "sequential",
        "threads",
    )
    for seq, thr in zip(r["sequential"], r["threads"], strict=True):
        row.add(seq, thr)
    row.target_text = "≈ 1.0 expected (the GIL)"
    row.details["fib"] = n
    pooled = Row(
        "4d",
        f"one enqueue while {busy} step threads wait on the demo's process pool "
        f"({r['pool_processes']} processes, busy) vs idle",
        kind,
        "busy",
        "idle",
    )
    pooled.target_op, pooled.target, pooled.target_text = "<=", 10.0, "≤ 10"
    convoy = Row(
        "4e",
        f"one enqueue while {busy} CPU-bound threads run in the process vs idle (the GIL)",
        kind,
        "busy",
        "idle",
    )
    for b, p, i in zip(r["busy"], r["busy_pool"], r["idle"], strict=True):
        convoy.add(b, i)
        pooled.add(p, i)
    convoy.target_text = "— (explains 4a; the thread mode)"
    return [row, pooled, convoy]


# --- 5. HTTP trigger vs no-op ----------------------------------------------------------------


def row_http(ctx: Context, kind: str) -> list[Row]:
    s = ctx.sizes
    url = ctx.fresh_db(kind, "http")
    progress(f"{kind}: 5 HTTP: {s.http_pairs} × (no-op, POST /trigger_async) on one server")
    with shutdown_runs.server(
        url, workers=1, log_dir=ctx.dbs.directory, app=shutdown_runs.BENCH_APP
    ) as server:
        noop, trigger = shutdown_runs.latencies(server, s.http_pairs)
    med = Row("5a", "POST /trigger_async vs no-op route: median latency", kind, "trigger", "no-op")
    p99 = Row("5b", "POST /trigger_async vs no-op route: p99 latency", kind, "trigger", "no-op")
    floor = Row(
        "5c",
        "5a's floor: no-op route + bare `DBOS.start_workflow` (a bare DBOS process) vs "
        "no-op route: median",
        kind,
        "no-op + start",
        "no-op",
    )
    med.target_op, med.target, med.target_text = "<=", 3.0, "≤ 3.0"
    p99.target_text = "— (reported)"
    floor.target_text = "— (what DBOS's own start costs)"
    # What the trigger cannot do without, timed in a bare DBOS process on the same kind
    # of database: start the workflow (its status row); and the status read it once did.
    samples = max(2 * s.http_blocks, s.http_pairs // 4)
    parts = run_probe("start_cost", ctx.fresh_db(kind, "start"), {"samples": samples})
    block = max(1, len(noop) // s.http_blocks)
    starts = max(1, len(parts["start_workflow"]) // s.http_blocks)
    for k, first in enumerate(range(0, block * s.http_blocks, block)):
        a, b = trigger[first : first + block], noop[first : first + block]
        med.add(statistics.median(a), statistics.median(b))
        p99.add(percentile(a, 99), percentile(b, 99))
        start = statistics.median(parts["start_workflow"][k * starts : (k + 1) * starts])
        floor.add(statistics.median(b) + start, statistics.median(b))
    med.details["in_process_start_workflow_s"] = statistics.median(parts["start_workflow"])
    med.details["in_process_get_workflow_status_s"] = statistics.median(
        parts["get_workflow_status"]
    )
    floor.details["start_workflow_samples"] = len(parts["start_workflow"])
    for row in (med, p99, floor):
        row.details["requests_per_side"] = len(noop)
        row.details["blocks"] = s.http_blocks
        row.details["no_op_route"] = shutdown_runs.NOOP_ROUTE
    return [med, p99, floor]


# --- 6. recovery -------------------------------------------------------------------------


def row_recovery(ctx: Context, kind: str) -> list[Row]:
    s = ctx.sizes
    poll = shutdown_runs.settings().polling_interval
    units, max_n = shutdown_runs.size_fan_out(s.cpu_seconds, s.cpu_units)
    what = f"recovery after SIGKILL mid-fan-out ({units} steps, max_n {max_n})"
    spawn = Row("6a", f"{what}: process restart → done vs remaining, uninterrupted", kind)
    launch = Row("6b", f"{what}: DBOS initialised → done vs remaining, uninterrupted", kind)
    for row in (spawn, launch):
        row.a_label, row.b_label = "recovery", "uninterrupted"
    bases: list[float] = []
    for i in range(s.server_repeats):
        progress(f"{kind}: 6 recovery, run {i + 1}/{s.server_repeats}")
        url = ctx.fresh_db(kind, "recovery")
        r = shutdown_runs.recovery_run(url, units, max_n, log_dir=ctx.dbs.directory)
        spawn.add(r["recover"], r["baseline"])
        if r["recover_after_launch"]:
            launch.add(r["recover_after_launch"], r["baseline"])
        bases.append(r["baseline"])
        spawn.details.setdefault("runs", []).append(r)
    _recovery_details(spawn, launch)
    for i in range(s.server_repeats):
        progress(f"{kind}: 6 the process pool's start, on an idle server, {i + 1}")
        start = shutdown_runs.pool_start(ctx.fresh_db(kind, "poolstart"), ctx.dbs.directory)
        spawn.details.setdefault("pool_starts", []).append(start)
    starts = spawn.details.get("pool_starts", [])
    if starts:
        spawn.details["pool_process_start_cpu_s"] = statistics.median(
            cpu for start in starts for cpu in start["cpu_s"]
        )
        after = [x["serving_after_launch_s"] for x in starts if x["serving_after_launch_s"]]
        if after:
            spawn.details["idle_serving_after_launch_s"] = statistics.median(after)
    target = 1.2 + poll / statistics.median(bases)
    for row in (spawn, launch):
        row.target_op, row.target = "<=", target
        row.target_text = f"≤ 1.2 + 1 poll ({poll} s) = {target:.2f}"
    return [spawn, launch]


def _recovery_details(spawn: Row, launch: Row) -> None:
    """Medians over row 6's runs: the work left at the kill, and where the restart's
    time went before the recovered steps could run."""
    runs = spawn.details.get("runs", [])
    if not runs:
        return
    spawn.details["work_left_at_kill"] = statistics.median(r["work_left"] for r in runs)
    spawn.details["startup_until_healthz_s"] = statistics.median(
        r["startup_until_healthz"] for r in runs
    )
    # Process start → DBOS initialised: interpreter, imports, the lifespan's first steps.
    # No recovered step can run before; with no other delay, 6a would be
    # (that + uninterrupted) / uninterrupted.
    before = [r for r in runs if r["spawn_to_dbos_init"] is not None]
    if before:
        spawn.details["spawn_to_dbos_init_s"] = statistics.median(
            r["spawn_to_dbos_init"] for r in before
        )
        spawn.details["floor_from_start_up"] = statistics.median(
            (r["spawn_to_dbos_init"] + r["baseline"]) / r["baseline"] for r in before
        )
    after = [r["serving_after_launch"] for r in runs if r["serving_after_launch"] is not None]
    if after:
        launch.details["serving_after_launch_s"] = statistics.median(after)


# --- 7. start-up -------------------------------------------------------------------------------


def row_startup(ctx: Context, kind: str) -> list[Row]:
    s = ctx.sizes
    url = ctx.fresh_db(kind, "startup")
    env = script_env(url)
    scope = [sys.executable, "scope.py", "--steps", "1", "--step-seconds", "0"]
    bare = [sys.executable, "-c", "import dbos"]

    def timed(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[1:])} exited {proc.returncode}: {proc.stderr}")
        return elapsed

    progress(f"{kind}: 7 start-up: warming the database")
    timed(scope)  # creates the schema: the database is warm from here on
    row = Row(
        "7",
        "start-up: `python scope.py --steps 1 --step-seconds 0` vs `python -c 'import dbos'`",
        kind,
        "scope.py",
        "import dbos",
    )
    for i in range(s.startup_repeats):
        progress(f"{kind}: 7 start-up {i + 1}/{s.startup_repeats}")
        # Alternate which goes first, so a drift of the machine hits both.
        if i % 2 == 0:
            a = timed(scope)
            b = timed(bare)
        else:
            b = timed(bare)
            a = timed(scope)
        row.add(a, b)
    row.target_text = "— (informational)"
    return [row]


# --- 8. the process pool ------------------------------------------------------------------


_PLAIN_POOL = """
import multiprocessing, sys, time
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
if __name__ == "__main__":
    steps, max_n, size = map(int, sys.argv[1:])
    # fork: this process has no other thread, and a -c program cannot be re-imported.
    with multiprocessing.get_context("fork").Pool(size) as pool:
        pool.map(abs, range(size))  # every process up
        t0 = time.perf_counter()
        pool.map(fib, [min(i, max_n) for i in range(steps)], chunksize=1)
        print(time.perf_counter() - t0)
"""


def _plain_pool(steps: int, max_n: int, size: int) -> float:
    """The machine's ceiling for the demo's fan-out: the same fib calls, in order, on a
    plain multiprocessing pool of ``size`` processes (no DBOS, no HTTP, no database)."""
    out = subprocess.run(
        [sys.executable, "-c", _PLAIN_POOL, str(steps), str(max_n), str(size)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


class _HealthProbe(Sampler):
    """``GET /healthz`` every ``every`` seconds at most (one at a time, on a connection of
    its own, in a thread) until stopped: the latency of each answer, whatever its status,
    while something else runs. Paced like a health checker, not a load test."""

    def __init__(self, base_url: str, every: float = 0.05) -> None:
        import httpx

        super().__init__(every, join_timeout=60)
        self.samples: list[float] = []
        self.statuses: Counter[int] = Counter()
        self._client = httpx.Client(base_url=base_url, timeout=30)

    def sample(self) -> None:
        t0 = time.perf_counter()
        status = self._client.get("/healthz").status_code
        self.samples.append(time.perf_counter() - t0)
        self.statuses[status] += 1

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._client.close()


def _healthz_idle(base_url: str, count: int) -> list[float]:
    """``count`` answers of the idle server, paced as ``_HealthProbe`` paces them."""
    with _HealthProbe(base_url) as probe:
        deadline = time.monotonic() + 120
        while len(probe.samples) < count and time.monotonic() < deadline:
            time.sleep(0.01)
    return probe.samples[:count]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far (0 once it is gone)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    import os

    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


class _CpuMeter:
    """CPU seconds a fan-out costs the service (the server process and, with WORKERS > 1,
    its uvicorn workers), the process pools (the children of the processes that serve)
    and, on Postgres, the server backends of its database (pids from pg_stat_activity)."""

    def __init__(self, server_pid: int, db_url: str, kind: str, workers: int = 1) -> None:
        serving = [server_pid] if workers == 1 else _children(server_pid)
        self.groups = {
            "server": sorted({server_pid, *serving}),
            "pool": [child for pid in serving for child in _children(pid)],
            "postgres": [],
        }
        if kind == "postgres":
            rows = query(
                db_url, "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            )
            self.groups["postgres"] = [int(r[0]) for r in rows]

    def read(self) -> dict[str, float]:
        return {g: sum(_cpu_seconds(p) for p in pids) for g, pids in self.groups.items()}


def _cpu_bound(row: Row, used: dict[str, float], plain: float, cores: int) -> None:
    """On ``cores`` cores a fan-out cannot end before all its CPU work is done: fib in the
    pools plus the service's own (server processes, database backends). ``cpu_floor_s``
    is that time; ``plain_vs_cpu_floor`` the best ratio to the plain pool any scheduling
    could reach (``bound``: its median), a ceiling for the row's ratio."""
    floor = sum(used.values()) / cores
    row.details.setdefault("cpu_floor_s", []).append(round(floor, 3))
    row.details.setdefault("plain_vs_cpu_floor", []).append(round(plain / floor, 3))


def _pool_rows(kind: str, steps: int, max_n: int, cores: int) -> dict[str, Row]:
    """Rows 8a-8f with their targets, before anything is measured."""
    cpu = shutdown_runs.fan_out_cpu_seconds(steps, max_n)
    what = f"{steps} steps, max_n {max_n}, ~{cpu:.1f} CPU-s"
    titles = {
        "8a": (
            f"default fan-out ({what}) in one server process: threads vs process pool "
            f"({cores} processes)",
            "threads",
            "pool",
        ),
        "8b": (
            f"the same fib calls on a plain multiprocessing pool ({cores} processes, no DBOS) "
            "vs the demo's pool, one server process",
            "plain",
            "demo",
        ),
        "8c": (
            "the same fib calls on a plain multiprocessing pool vs the demo's pool, WORKERS=2",
            "plain",
            "demo",
        ),
        "8d": (
            "WORKERS=2 with the pool: the smaller worker's steps vs all steps (step rows' "
            "executor_id)",
            "fewer",
            "all",
        ),
        "8e": ("GET /healthz p95 while the fan-out runs vs idle: process pool", "busy", "idle"),
        "8f": ("GET /healthz p95 while the fan-out runs vs idle: threads", "busy", "idle"),
    }
    rows = {rid: Row(rid, text, kind, a, b) for rid, (text, a, b) in titles.items()}
    for rid, (op, target, text) in {
        "8a": (">=", 1.6, "≥ 1.6"),
        "8b": (">=", 0.75, "≥ 0.75"),
        "8c": (">=", 0.75, "≥ 0.75"),
        "8d": (">=", 0.30, "≥ 0.30"),
        "8e": ("<=", 5.0, "≤ 5"),
    }.items():
        rows[rid].target_op, rows[rid].target, rows[rid].target_text = op, target, text
    rows["8f"].target_text = "— (the thread mode, for contrast)"
    rows["8d"].unit = ""  # steps
    for row in rows.values():
        row.details["measure"] = (
            "fan-outs: first step enqueued → last step completed (system database; "
            "on SQLite, whose created_at has whole seconds: trigger sent → fan-out done); "
            "plain pool: the map call, processes already up"
        )
    return rows


@dataclass
class _PoolRun:
    """Row 8's servers and what one repetition needs: the one-process server (``one``),
    on Postgres also a WORKERS=2 server (``two``), each on a database of its own."""

    kind: str
    steps: int
    max_n: int
    cores: int
    rows: dict[str, Row]
    one: AppServer
    one_db: str
    two: AppServer | None = None
    two_db: str = ""
    idle: list[float] = field(default_factory=list)

    def metered_fan_out(
        self, server: AppServer, db_url: str, mode: str, workers: int = 1
    ) -> tuple[shutdown_runs.FanOut, dict[str, float]]:
        """One fan-out and the CPU seconds it cost each group of processes."""
        assert server.proc is not None
        meter = _CpuMeter(server.proc.pid, db_url, self.kind, workers=workers)
        before = meter.read()
        run = shutdown_runs.run_fan_out(server, db_url, self.steps, self.max_n, executor=mode)
        after = meter.read()
        return run, {g: round(after[g] - before[g], 3) for g in after}

    def one_process(self, i: int, modes: tuple[str, str]) -> dict[str, float]:
        """Each mode's fan-out span on the one-process server."""
        spans: dict[str, float] = {}
        for mode in modes:
            progress(f"{self.kind}: 8 one server process, executor={mode}, run {i + 1}")
            run, used = self.metered_fan_out(self.one, self.one_db, mode)
            self.rows["8a"].details.setdefault(f"cpu_seconds_{mode}", []).append(used)
            # SQLite stamps created_at in whole seconds: there, trigger → done.
            spans[mode] = run.span if self.kind == "postgres" else run.wall
        return spans

    def health_during(self, i: int, modes: tuple[str, str]) -> dict[str, list[float]]:
        """/healthz latencies while each mode's fan-out runs."""
        health: dict[str, list[float]] = {}
        for mode in modes:
            # A fan-out of its own: the probe's requests are not in the spans above.
            progress(f"{self.kind}: 8 /healthz during a fan-out, executor={mode}, run {i + 1}")
            with _HealthProbe(self.one.base_url) as probe:
                shutdown_runs.run_fan_out(
                    self.one, self.one_db, self.steps, self.max_n, executor=mode
                )
            health[mode] = probe.samples
            self.rows["8e" if mode == "process" else "8f"].details.setdefault(
                "statuses", []
            ).append(dict(probe.statuses))
        return health

    def two_workers(self, i: int, plain: float) -> None:
        """Rows 8c and 8d: the pool's fan-out on the WORKERS=2 server."""
        assert self.two is not None
        progress(f"{self.kind}: 8 WORKERS=2, executor=process, run {i + 1}")
        run2, used2 = self.metered_fan_out(self.two, self.two_db, "process", workers=2)
        self.rows["8c"].add(plain, run2.span)  # Postgres only
        self.rows["8c"].details.setdefault("cpu_seconds", []).append(used2)
        _cpu_bound(self.rows["8c"], used2, plain, self.cores)
        counts = sorted(run2.per_executor.values())
        fewer = counts[0] if len(counts) == 2 else 0
        self.rows["8d"].add(float(max(fewer, 1e-9)), float(self.steps))
        self.rows["8d"].details.setdefault("steps_per_executor", []).append(run2.per_executor)

    def repetition(self, i: int) -> None:
        """One of row 8's repetitions; the modes alternate which goes first."""
        rows = self.rows
        modes = ("process", "thread") if i % 2 == 0 else ("thread", "process")
        spans = self.one_process(i, modes)
        health = self.health_during(i, modes)
        progress(f"{self.kind}: 8 plain multiprocessing pool, run {i + 1}")
        plain = _plain_pool(self.steps, self.max_n, self.cores)
        rows["8a"].add(spans["thread"], spans["process"])
        rows["8b"].add(plain, spans["process"])
        _cpu_bound(rows["8b"], rows["8a"].details["cpu_seconds_process"][-1], plain, self.cores)
        p95_idle = percentile(self.idle, 95)
        rows["8e"].add(percentile(health["process"], 95), p95_idle)
        rows["8f"].add(percentile(health["thread"], 95), p95_idle)
        for rid, mode in (("8e", "process"), ("8f", "thread")):
            rows[rid].details.setdefault("samples_busy", []).append(len(health[mode]))
        if self.two is not None:
            self.two_workers(i, plain)


def _pool_summary(run: _PoolRun) -> list[Row]:
    """Row 8's medians; 8c and 8d shown as skipped where WORKERS=2 did not run."""
    rows = run.rows
    rows["8e"].details["idle_samples"] = len(run.idle)
    for rid in ("8b", "8c"):
        bounds = rows[rid].details.get("plain_vs_cpu_floor")
        if bounds:
            rows[rid].details["bound"] = round(statistics.median(bounds), 2)
    if run.two is None:
        for rid in ("8c", "8d"):
            rows[rid] = Row(rid, rows[rid].what, run.kind, skipped="needs Postgres (WORKERS=2)")
    return list(rows.values())


def row_pool(ctx: Context, kind: str) -> list[Row]:
    """The demo's default fan-out with the process pool against threads, against the
    machine's ceiling, across two workers, and what it leaves of the service's answers."""
    from shutdown.pool import usable_cores

    s = ctx.sizes
    demo = shutdown_runs.settings()
    steps, max_n = s.pool_fan_out or (demo.default_steps, demo.default_max_n)
    cores = usable_cores()
    rows = _pool_rows(kind, steps, max_n, cores)
    one_db = ctx.fresh_db(kind, "pool1")
    one = shutdown_runs.server(one_db, workers=1, log_dir=ctx.dbs.directory)
    run = _PoolRun(kind, steps, max_n, cores, rows, one, one_db)
    if kind == "postgres":
        run.two_db = ctx.fresh_db(kind, "pool2")
        run.two = shutdown_runs.server(run.two_db, workers=2, log_dir=ctx.dbs.directory)
    servers = [one] if run.two is None else [one, run.two]
    try:
        for server in servers:
            server.start()
        time.sleep(1)  # every worker's queue poller is up
        shutdown_runs.run_fan_out(one, one_db, 10, 10)  # warm: connections, the pool's first tasks
        run.idle = _healthz_idle(one.base_url, s.health_idle)
        for i in range(s.pool_repeats):
            run.repetition(i)
    finally:
        for server in servers:
            server.close()
    return _pool_summary(run)


# Row groups: id, databases it runs on, function, and its rows (id, title) for when a
# group is skipped or fails, so the table still shows every row.
ROWS: list[tuple[str, tuple[str, ...], RowFn]] = [
    ("1", BOTH, row_step_cost),
    ("2", BOTH, row_logging),
    ("3", BOTH, row_fan_out),
    ("4a", ("postgres",), row_workers),
    ("4b", BOTH, row_threads),
    ("5", BOTH, row_http),
    ("6", BOTH, row_recovery),
    ("7", BOTH, row_startup),
    ("8", BOTH, row_pool),
]

ROW_TITLES: dict[str, tuple[tuple[str, str], ...]] = {
    "1": (("1a", "durable step vs plain call"), ("1b", "durable step vs INSERT commit")),
    "2": (("2", "repo JSON logging + helpers vs bare DBOS"),),
    "3": (
        ("3a", "queued fan-out (demo's polling) vs direct calls"),
        ("3b", "queued fan-out (DBOS default polling) vs direct calls"),
    ),
    "4a": (
        ("4a", "CPU-bound demo fan-out: 1 worker process vs 2"),
        ("4c", "the same CPU work without DBOS: 1 plain process vs 2"),
    ),
    "4b": (
        ("4b", "CPU-bound fan-out in one process: sequential vs threads"),
        ("4d", "one enqueue while step threads wait on the process pool vs idle"),
        ("4e", "one enqueue while CPU-bound threads run vs idle"),
    ),
    "5": (
        ("5a", "POST /trigger_async vs no-op route: median latency"),
        ("5b", "POST /trigger_async vs no-op route: p99 latency"),
        ("5c", "5a's floor: no-op route + bare DBOS.start_workflow vs no-op route"),
    ),
    "6": (
        ("6a", "recovery: process restart → done vs remaining, uninterrupted"),
        ("6b", "recovery: DBOS initialised → done vs remaining, uninterrupted"),
    ),
    "7": (("7", "start-up: scope.py vs import dbos"),),
    "8": (
        ("8a", "default fan-out, one server process: threads vs process pool"),
        ("8b", "plain multiprocessing pool vs the demo's pool, one server process"),
        ("8c", "plain multiprocessing pool vs the demo's pool, WORKERS=2"),
        ("8d", "WORKERS=2, pool: the smaller worker's steps vs all steps"),
        ("8e", "GET /healthz p95 during a fan-out vs idle: process pool"),
        ("8f", "GET /healthz p95 during a fan-out vs idle: threads"),
    ),
}
