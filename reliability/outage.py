"""Outage: the system database restarts or goes away under a running service.

What it measures
    ``fastapi_scope_shutdown.py`` on a private Postgres cluster (``ctx.own_cluster()``,
    stopped and started with ``pg_ctl`` on the same port) while a fan-out runs and the
    5-second schedule fires. Does the app keep answering, does ``/healthz`` report the
    outage, and once the database is back does every workflow finish, the schedule
    resume, and nothing recorded get lost or run twice? Scenarios (one service runs them
    one after another; ``ctx.quick``, the tests, runs the first three):

    restart (fast)        ``pg_ctl stop -m fast`` then start, while steps run: the server
                          ends every session, checkpoints and comes back at once.
    restart (immediate)   ``-m immediate``: the server dies like a crash and replays its
                          WAL on start. The app's URL asks for ``synchronous_commit=on``
                          (the test cluster's default is off), so every commit DBOS was
                          told about is in the WAL.
    outage 8 s            stopped for OUTAGE_SECONDS, more than one schedule slot and
                          more than FENCE_SEC: the process fences and re-takes its slot.
    outage 30 s           longer: the fenced process waits for the database however long
                          (a claim attempt every REJOIN_RETRY_SEC), not DBOS's backoff.
    outage 8 s, 2 workers ``WORKERS=2 python fastapi_scope_shutdown.py``.

    Single-process scenarios use ``uvicorn fastapi_scope_shutdown:app`` (the Docker
    image's command).

How
    Before the stop: trigger a fan-out (STEPS steps of ``fib(min(i, MAX_N))``), wait
    until some steps have recorded their output and a big one is running, and snapshot
    every SUCCESS row of ``workflow_status`` and every ``operation_outputs`` row. While
    the database is down: probe ``/healthz`` and ``/openapi.json`` every half second
    (client timeout 10 s) and send one ``GET /workflows/{id}``. After the start: wait
    for ``/healthz`` to say 200, for the fan-out to finish and for a schedule slot later
    than the start to run, then compare with the snapshot. Step bodies append to a ledger
    file (FIB_LEDGER), so re-runs are counted outside DBOS. The database URL carries a
    password (trust authentication ignores it): it must show up in no answer and no log.

Figures (per scenario)
    Restarts are shorter than the app's FENCE_SEC, the outages longer: a process that
    cannot renew its executor-slot lease for FENCE_SEC fences itself (a replica cut
    off must stop before a peer may take over), so it cannot ride out a longer
    outage without a restart. One process re-executes in place (same pid) and
    waits for the database; a uvicorn worker exits and uvicorn starts a replacement.
    Either way the same executor id is taken again and DBOS recovers its PENDING work.

    health answered while down   restarts: every probe got an answer; outages: none hung
                                 (client timeout), probes refused (or dropped) from the
                                 fence on allowed; /healthz never 200: 503 with a reason
                                 (database unreachable, or fenced and waiting); the note
                                 has the slowest probe.
    probes refused while re-executing  info (outages): how many, the longest window.
    GET /workflows/{id} ...      info: how long a request that reads the database waited
                                 (a fence drops it with the process image).
    fan-out finished, result     the fan-out reached SUCCESS with the right numbers.
    workflows left unfinished    workflows created before the start still PENDING or
                                 ENQUEUED a minute later (children, schedule runs): 0.
    duplicate step outputs       extra ``fib_step`` outputs (the note: missing ones).
    bodies re-run, not in flight bodies that ran twice although they had not started, or
                                 had recorded their output, before the stop: 0 (nothing
                                 starts while the database is down, so the steps in
                                 flight at the stop are those at the fence).
    bodies re-run, in flight     info: re-runs among the steps running at the stop.
    schedule slots after recovery  slots later than the start that ran (>= 1: resumed);
                                 the note counts the slots inside the outage (run late).
    schedule slots skipped / run twice   info, over the server's whole log (a re-executed
                                 process starts the schedule afresh: DBOS's
                                 ``automatic_backfill`` is off, slots inside are skipped).
    recorded rows lost or changed  snapshot rows missing or different afterwards: 0.
    DB back -> health 200, DB back -> fan-out finished   info, seconds.
    executor slot lease held     the app's own promise: one live executor-slot lease per
                                 process once the database is back (shutdown/slots.py).
    DBOS warnings while down     info: log lines per second of outage.
    password in answers or log   0.
    executor ids after the outage  the live leases' executor ids are those before the
                                 stop; every id fenced is re-taken, and only those: one
                                 process by the same pid, several workers each by a
                                 replacement (never by the fenced worker's pid).
    process restarts             restarts: no fence, no process claimed a slot again, the
                                 server still runs (and, one process, has the same pid).
    fences                       info (outages): processes fenced, slots re-taken.
    Per service, after its scenarios: the executor id a second process started on the
    same database claims; it must be a free one, not one still in use.

What DBOS 3.4 does (``dbos/_sys_db.py`` ``db_retry``, ``_queue.py``, ``_scheduler.py``)
    Every system-database call of a workflow or step goes through ``db_retry``: on a
    connection error it logs a warning, sleeps (1 s doubling up to 60 s, times 0.5-1.5
    jitter) and tries again, with no deadline. So a running step finishes its body and
    records the output once the server is back (no re-run), the fan-out's result polling
    waits, and an HTTP request that reads the database waits as long as the outage lasts
    plus up to one backoff: recovery lags the database by up to about the outage's
    length again (at most 90 s). The queue and schedule pollers catch their errors, log
    and poll again; a schedule thread blocked at a slot fires it late, then catches up on
    the slots it missed, one by one, so no slot is lost. The pool pre-pings and replaces
    dead connections; the notification listener reconnects. (That backoff is what a
    restart shorter than FENCE_SEC still rides out; a longer outage ends in a fence.)

Why the executor slot is a lease row
    A session-level advisory lock on one psycopg2 connection ends with its session: a
    database restart would release it, and a process started afterwards would claim
    ``shutdown-0`` while the first process still ran as ``shutdown-0``
    (``test_a_database_restart_keeps_the_executor_slot_taken`` checks that it does not).
    A lease row renewed every second (shutdown/slots.py) outlives the session: a server
    restart shorter than the fence time leaves it held, and a longer outage fences the
    process, which takes its own slot back once the server answers.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

import fastapi_scope_shutdown
from harness import pgcluster
from harness.clients import ShutdownClient
from harness.db import admin, query
from harness.fanout import children, fan_out_result, ledger_runs, shutdown_server
from harness.proc import until as _until
from harness.server import AppServer
from lab.config import app_name
from reliability.core import Context, Figure, info, progress, promise
from shutdown import slots

AREA = "outage"
STEPS, MAX_N = 50, 30  # several seconds of CPU in one process: steps are in flight at the stop
BIG_N = 27  # the stop waits until a step of at least fib(BIG_N) runs
OUTAGE_SECONDS = 8  # longer than one 5-second schedule slot
LONG_OUTAGE_SECONDS = 30
PROBE_TIMEOUT = 10.0  # "answered, not hung"; /healthz itself gives up after 3 s
PROBE_INTERVAL = 0.5
RECOVERY_TIMEOUT = 180.0  # db_retry's backoff is capped at 60 s (90 s with jitter)
# What /healthz says while down: the database does not answer, or (after a fence) the
# process waits for it to claim its executor slot anew.
HEALTH_REASONS = ("database unreachable", "fenced: waiting for the database")
# The app's log lines (fastapi_scope_shutdown.py, shutdown/slots.py) for a slot taken and lost.
CLAIM_LINE = "executor slot claimed"
FENCE_LINE = "executor slot lost: fencing"
# fastapi_scope_shutdown's schedule (CRON "*/5 * * * * *"): the app names no seconds
# constant, so this one is the suite's own reading of its cron line.
SCHEDULE_SECONDS = 5


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str  # pg_ctl stop mode
    down_seconds: float  # how long the server stays down (0: restart at once)
    workers: int = 1  # 1: uvicorn fastapi_scope_shutdown:app; more: python ... with WORKERS

    @property
    def fences(self) -> bool:
        """Longer than FENCE_SEC: every process fences itself and re-takes its slot."""
        return self.down_seconds > fastapi_scope_shutdown.FENCE_SEC

    @property
    def label(self) -> str:
        what = f"outage {self.down_seconds:g} s" if self.down_seconds else f"restart ({self.mode})"
        return what if self.workers == 1 else f"{what}, {self.workers} workers"


SCENARIOS = {
    "restart-fast": Scenario("restart-fast", "fast", 0),
    "restart-immediate": Scenario("restart-immediate", "immediate", 0),
    "outage": Scenario("outage", "fast", OUTAGE_SECONDS),
    # The backoff grows with the outage: recovery lags the database by more.
    "outage-long": Scenario("outage-long", "fast", LONG_OUTAGE_SECONDS),
    "outage-workers": Scenario("outage-workers", "fast", OUTAGE_SECONDS, workers=2),
}
# The tests (ctx.quick): one process, the three kinds of going away.
QUICK = ("restart-fast", "restart-immediate", "outage")


@dataclass
class Probe:
    path: str
    at: float  # seconds after the database went down
    seconds: float
    status: int | None  # None: no answer (``failure`` says why)
    body: Any = None
    # No answer: "timeout" (hung past the client timeout), "refused" (nothing listened:
    # a re-executed process importing the app), "dropped" (the connection ended without
    # an answer: the image that held it ended).
    failure: str | None = None


@dataclass
class Service:
    cluster: pgcluster.Cluster
    db_url: str
    password: str
    server: AppServer
    workdir: Path
    workers: int = 1

    @property
    def ledger_path(self) -> Path:
        return self.workdir / "ledger.txt"

    @property
    def api(self) -> ShutdownClient:
        return ShutdownClient(self.server.client)


@dataclass
class ScenarioResult:
    scenario: Scenario
    workflow_id: str
    down_for: float = 0.0  # seconds the database was really unreachable
    down_wall: datetime | None = None  # when the stop began
    probes: list[Probe] = field(default_factory=list)  # while down
    status_probe: Probe | None = None  # GET /workflows/{id}, sent while down
    # When it answered, from the command that started the server again.
    status_probe_after_up: float | None = None
    health_back_after: float | None = None
    done_after: float | None = None  # DB back -> fan-out SUCCESS
    final: dict[str, Any] | None = None
    expected: list[int] = field(default_factory=list)
    outputs: dict[int, int] = field(default_factory=dict)  # step index -> fib_step outputs
    ledger: Counter[int] = field(default_factory=Counter)  # step index -> body runs
    in_flight: set[int] = field(default_factory=set)  # started, not recorded at the stop
    pid_before: int | None = None
    pid_after: int | None = None
    alive: bool = False  # the server (the supervisor with several workers) still runs
    # Live leases (executor id -> pid) before the stop and once recovered.
    holders_before: dict[str, int] = field(default_factory=dict)
    holders_after: dict[str, int] = field(default_factory=dict)
    # From the log since the scenario began: (executor id, pid, seconds after the stop).
    fenced: list[tuple[str, int, float]] = field(default_factory=list)
    retaken: list[tuple[str, int, float]] = field(default_factory=list)  # slot claims
    schedule_after: list[str] = field(default_factory=list)  # slots after the start, run
    schedule_during: list[str] = field(default_factory=list)  # slots inside the outage, run
    # Over the whole log so far: slots between the first and the last run that never ran,
    # and slots that ran more than once.
    slots_skipped: list[str] = field(default_factory=list)
    slots_twice: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)  # started before DB back, not done
    snapshot_rows: int = 0
    lost: list[str] = field(default_factory=list)
    slot_locks_expected: int = 1  # one per process
    slot_locks_before: int = 0
    slot_locks_after: int = 0
    warnings_while_down: int = 0
    leaks: list[str] = field(default_factory=list)  # where the password showed up

    @property
    def restarts(self) -> int:
        """Slot claims after the scenario began: re-takes after a fence."""
        return len(self.retaken)

    @property
    def health_probes(self) -> list[Probe]:
        return [p for p in self.probes if p.path == "/healthz"]

    @property
    def all_answered(self) -> bool:
        return bool(self.probes) and all(p.status is not None for p in self.probes)

    @property
    def first_fence(self) -> float | None:
        return min((at for _, _, at in self.fenced), default=None)

    @property
    def refused(self) -> list[Probe]:
        """Probes not answered because the process was being re-executed: refused or
        dropped connections from the first fence on. Allowed (and counted)."""
        fence = self.first_fence
        return [
            p
            for p in self.probes
            if p.failure in ("refused", "dropped") and fence is not None and p.at >= fence
        ]

    @property
    def none_hung(self) -> bool:
        """Every probe was answered, or refused inside the re-exec window: none hung,
        none failed otherwise."""
        allowed = {id(p) for p in self.refused}
        return bool(self.probes) and all(
            p.status is not None or id(p) in allowed for p in self.probes
        )

    @property
    def longest_refusal(self) -> float:
        """The longest run of refused probes, from the first one's start to the next
        answer's start (or to the last one's end): the re-exec window as seen."""
        allowed = {id(p) for p in self.refused}
        longest, start = 0.0, None
        for p in sorted(self.probes, key=lambda p: p.at):
            if id(p) in allowed:
                start = p.at if start is None else start
                longest = max(longest, p.at + p.seconds - start)
            elif start is not None and p.status is not None:
                longest, start = max(longest, p.at - start), None
        return longest

    @property
    def refused_at_end(self) -> bool:
        """The last probe while down was refused: the window went on past the start."""
        last = max(self.probes, key=lambda p: p.at, default=None)
        return last is not None and any(last is p for p in self.refused)

    @property
    def health_reported_outage(self) -> bool:
        """Every /healthz answer while down was 503 with a reason (never 200): the
        database is unreachable, or the fenced process waits to claim its slot anew."""
        answered = [p for p in self.health_probes if p.status is not None]
        return bool(answered) and all(
            p.status == 503
            and isinstance(p.body, dict)
            and str(p.body.get("reason", "")).startswith(HEALTH_REASONS)
            for p in answered
        )

    @property
    def same_executors(self) -> bool:
        """The executor ids after the outage are those before; every re-take is of a
        fenced id, every fenced id re-taken. One process: by the same pid (re-executed
        in place); several workers: each by a replacement, not the fenced worker."""
        fenced = {(e, pid) for e, pid, _ in self.fenced}
        retaken = {(e, pid) for e, pid, _ in self.retaken}
        if not (
            self.holders_before
            and self.holders_after.keys() == self.holders_before.keys()
            and {e for e, _ in retaken} == {e for e, _ in fenced}
        ):
            return False
        if self.scenario.workers == 1:
            return (
                self.pid_after == self.pid_before is not None
                and set(self.holders_after.values()) == {self.pid_before}
                and all(pid == self.pid_before for _, pid in fenced | retaken)
            )
        gone = {pid for _, pid in fenced}
        return all(pid not in gone for _, pid in retaken) and not (
            gone & set(self.holders_after.values())
        )

    @property
    def finished(self) -> bool:
        return self.final is not None and self.final.get("status") == "SUCCESS"

    @property
    def result_correct(self) -> bool:
        return self.finished and self.final is not None and self.final["result"] == self.expected

    @property
    def duplicate_outputs(self) -> int:
        return sum(max(0, n - 1) for n in self.outputs.values())

    @property
    def missing_outputs(self) -> int:
        return sum(1 for i in range(len(self.expected)) if self.outputs.get(i, 0) == 0)

    @property
    def reruns_not_in_flight(self) -> list[int]:
        return sorted(i for i, n in self.ledger.items() if n > 1 and i not in self.in_flight)

    @property
    def reruns_in_flight(self) -> list[int]:
        return sorted(i for i, n in self.ledger.items() if n > 1 and i in self.in_flight)


# --- reading the database, the log and the ledger --------------------------------------


expected_result = fan_out_result


def step_outputs(db_url: str, parent: str) -> dict[int, int]:
    """Step index -> how many ``fib_step`` outputs its child workflow recorded."""
    return {i: c["outputs"] for i, c in children(db_url, parent).items()}


def recorded_rows(db_url: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Everything DBOS has recorded as done: SUCCESS workflows and step outputs."""
    rows: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for wf, status, output in query(
        db_url,
        "SELECT workflow_uuid, status, output FROM dbos.workflow_status WHERE status = 'SUCCESS'",
    ):
        rows[("workflow", wf)] = (status, output)
    for wf, fid, name, output, error in query(
        db_url,
        "SELECT workflow_uuid, function_id, function_name, output, error "
        "FROM dbos.operation_outputs",
    ):
        rows[("step", wf, fid)] = (name, output, error)
    return rows


def unfinished_workflows(db_url: str, before_ms: int) -> list[str]:
    """Workflows created before ``before_ms`` (epoch ms) that are still PENDING or ENQUEUED."""
    rows = query(
        db_url,
        "SELECT workflow_uuid FROM dbos.workflow_status "
        "WHERE status IN ('PENDING', 'ENQUEUED') AND created_at < %s ORDER BY created_at",
        before_ms,
    )
    return [wf for (wf,) in rows]


def slot_locks(db_url: str) -> int:
    """Executor slots held: the app's live leases (shutdown/slots.py), by the database's clock."""
    return len(slot_holders(db_url))


def slot_holders(db_url: str) -> dict[str, int]:
    """Executor id -> pid of every live lease of the app."""
    rows = query(
        db_url,
        f"SELECT slot, pid FROM {slots.TABLE} WHERE app = %s AND expires_at > clock_timestamp()",
        app_name(fastapi_scope_shutdown.APP),
    )
    return {fastapi_scope_shutdown.slots.executor_id(slot): int(pid) for slot, pid in rows}


def when(record: dict[str, Any], key: str = "timestamp") -> datetime:
    return datetime.fromisoformat(record[key])


def scheduled_slots(records: list[dict[str, Any]]) -> list[datetime]:
    return [when(r, "scheduled_time") for r in records if r.get("message") == "scheduled workflow"]


def slot_gaps(slots: list[datetime]) -> tuple[list[datetime], list[datetime]]:
    """(slots from the first to the last that never ran, slots that ran more than once)."""
    if not slots:
        return [], []
    seen = Counter(slots)
    first, last = min(seen), max(seen)
    skipped = []
    slot = first
    while slot < last:
        slot += timedelta(seconds=SCHEDULE_SECONDS)
        if slot not in seen:
            skipped.append(slot)
    return skipped, sorted(s for s, n in seen.items() if n > 1)


# --- probing ---------------------------------------------------------------------------


def probe(client: httpx.Client, path: str, since: float, timeout: float = PROBE_TIMEOUT) -> Probe:
    started = time.monotonic()
    try:
        answer = client.get(path, timeout=timeout)
    except httpx.TimeoutException:
        return Probe(path, started - since, time.monotonic() - started, None, None, "timeout")
    except httpx.ConnectError:
        return Probe(path, started - since, time.monotonic() - started, None, None, "refused")
    except httpx.TransportError:
        return Probe(path, started - since, time.monotonic() - started, None, None, "dropped")
    try:
        body: Any = answer.json()
    except ValueError:
        body = answer.text
    if path == "/openapi.json":
        body = None  # large and uninteresting
    return Probe(path, started - since, time.monotonic() - started, answer.status_code, body)


def until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Like ``wait_for``, but a timeout is an observation (None), not an error."""
    return _until(predicate, timeout, interval, tolerate=(httpx.HTTPError, OSError))


# --- the service and the scenarios ------------------------------------------------------


@contextmanager
def serve(ctx: Context, workers: int = 1) -> Iterator[Service]:
    """The app on a new database of a private cluster."""
    with ctx.own_cluster() as cluster, app_on(ctx, cluster, workers) as service:
        yield service


@contextmanager
def app_on(ctx: Context, cluster: pgcluster.Cluster, workers: int = 1) -> Iterator[Service]:
    from sqlalchemy.engine import make_url

    name = f"outage_{uuid.uuid4().hex[:8]}"
    with admin(cluster.url) as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    # Trust authentication ignores the password; it stands for a real one that must never
    # be shown. synchronous_commit=on: a commit DBOS saw survives an immediate stop.
    password = f"outage-pw-{uuid.uuid4().hex[:12]}"
    db_url = (
        make_url(cluster.url)
        .set(database=name, password=password, query={"options": "-csynchronous_commit=on"})
        .render_as_string(hide_password=False)
    )
    workdir = ctx.scratch("outage")
    server = shutdown_server(
        db_url,
        workdir / "server.log",
        workers=None if workers == 1 else workers,
        ledger=workdir / "ledger.txt",
    )
    try:
        server.start(ready_timeout=120)
        if until(lambda: len(claims(server.records())) >= workers, 120) is None:
            raise RuntimeError(f"{workers} workers did not all claim an executor slot")
        yield Service(cluster, db_url, password, server, workdir, workers)
    finally:
        server.close()


def claims(records: list[dict[str, Any]]) -> list[str]:
    """Executor ids of the "executor slot claimed" lines, in order."""
    return [r["executor_id"] for r in records if r.get("message") == CLAIM_LINE]


def reachable(cluster: pgcluster.Cluster) -> bool:
    try:
        with admin(cluster.url) as cur:
            cur.execute("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure: not reachable
        return False


def _pg_ctl_failure(cluster: pgcluster.Cluster, what: str, exc: Exception) -> str:
    stderr = getattr(exc, "stderr", None) or b""
    detail = stderr.decode(errors="replace").strip() if isinstance(stderr, bytes) else stderr
    log = cluster.datadir / "server.log"
    tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
    return f"{what} failed: {detail or exc}; server log: {' | '.join(tail)}"


def take_down(cluster: pgcluster.Cluster, mode: str) -> None:
    """``pg_ctl stop -m mode``; on a loaded machine pg_ctl itself can fail, so a failed
    stop counts if the server no longer answers, and is tried once more if it does."""
    for attempt in (1, 2):
        try:
            cluster.stop(mode)
            return
        except subprocess.CalledProcessError as exc:
            message = _pg_ctl_failure(cluster, f"pg_ctl stop -m {mode}", exc)
            progress(message)
            if not reachable(cluster):
                return
            if attempt == 2:
                raise RuntimeError(message) from exc
            time.sleep(1)


def bring_back(cluster: pgcluster.Cluster) -> None:
    """``pg_ctl start``, once more if it failed and the server does not answer."""
    for attempt in (1, 2):
        try:
            cluster.start()
            return
        except subprocess.CalledProcessError as exc:
            message = _pg_ctl_failure(cluster, "pg_ctl start", exc)
            progress(message)
            if until(lambda: reachable(cluster), 10, 0.5):
                return
            if attempt == 2:
                raise RuntimeError(message) from exc
            time.sleep(1)


def trigger(service: Service, steps: int, max_n: int) -> str:
    return service.api.trigger(steps, max_n, timeout=30)


def fan_out_view(service: Service, workflow_id: str) -> dict[str, Any] | None:
    return service.api.workflow(workflow_id, timeout=30)


@dataclass
class Window:
    """When the database went down and came back: wall clock and monotonic."""

    down_wall: datetime
    t_down: float
    t_start: float = 0.0  # the start command (pg_ctl start) was given
    t_up: float = 0.0  # it returned
    up_wall: datetime | None = None
    up_ms: int = 0  # epoch ms


def run_scenario(
    service: Service, scenario: Scenario, steps: int = STEPS, max_n: int = MAX_N
) -> ScenarioResult:
    """Take the database away mid fan-out, bring it back, and record what happened."""
    progress(f"outage: {scenario.label}")
    result, snapshot, recorded = fan_out_in_flight(service, scenario, steps, max_n)
    first_log_line = len(service.server.log_text().splitlines())

    window = Window(datetime.now(UTC), time.monotonic())
    result.down_wall = window.down_wall
    take_down(service.cluster, scenario.mode)
    # Nothing can start a body while the database is down: a step reads its recorded
    # output first. So these are the bodies that may legitimately run twice.
    result.in_flight = set(ledger_runs(service.ledger_path, result.workflow_id)) - recorded
    asked = StatusAsk()
    if scenario.down_seconds:  # a restart is too short to ask anything
        asked = ask_status(service.server.client, result.workflow_id, window.t_down)
    probe_while_down(service.server.client, result, window.t_down)
    # pg_ctl returns once the server accepts connections; DBOS may reconnect before that,
    # so "after the start" is measured from the start command.
    window.t_start = time.monotonic()
    bring_back(service.cluster)
    window.up_wall = datetime.now(UTC)
    window.up_ms = int(time.time() * 1000)
    window.t_up = time.monotonic()
    result.down_for = window.t_up - window.t_down

    observe_recovery(service, result, window, asked)
    read_schedule(result, service.server, window)
    read_records(service, result, snapshot, window)
    read_log(result, service.server.records()[first_log_line:], window)
    find_leaks(service, result)
    progress(
        f"outage: {scenario.label}: down {result.down_for:.1f} s, "
        f"done {result.done_after if result.done_after is None else round(result.done_after, 1)} "
        f"s after, schedule after {len(result.schedule_after)}"
    )
    return result


def fan_out_in_flight(
    service: Service, scenario: Scenario, steps: int, max_n: int
) -> tuple[ScenarioResult, dict[tuple[Any, ...], tuple[Any, ...]], set[int]]:
    """Trigger a fan-out and wait until a big step runs; then the result to fill in,
    a snapshot of everything recorded, and the steps of this fan-out recorded."""
    db_url = service.db_url
    pid_before = service.api.healthz(timeout=30).json()["pid"]
    workflow_id = trigger(service, steps, max_n)
    result = ScenarioResult(scenario, workflow_id, expected=expected_result(steps, max_n))
    result.pid_before = pid_before
    result.slot_locks_expected = service.workers
    result.holders_before = slot_holders(db_url)
    result.slot_locks_before = len(result.holders_before)

    def big_steps_running() -> bool:
        # Small steps start and finish within milliseconds; a big one (fib of BIG_N or
        # more, seconds of wall time next to its peers) is surely still running at the stop.
        done = {i for i, n in step_outputs(db_url, workflow_id).items() if n > 0}
        started = set(ledger_runs(service.ledger_path, workflow_id))
        return len(done) >= 3 and any(i >= BIG_N for i in started - done)

    if until(big_steps_running, 120, 0.05) is None:
        raise RuntimeError(f"fan-out {workflow_id} never had steps in flight")
    snapshot = recorded_rows(db_url)
    recorded = {
        int(key[1].rsplit("-", 1)[1]) - 1
        for key in snapshot
        if key[0] == "step" and key[1].startswith(workflow_id + "-")
    }
    return result, snapshot, recorded


@dataclass
class StatusAsk:
    """One ``GET /workflows/{id}`` sent while the database is down, on a thread."""

    thread: threading.Thread | None = None
    probes: list[Probe] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # monotonic; not if dropped


def ask_status(client: httpx.Client, workflow_id: str, t_down: float) -> StatusAsk:
    asked = StatusAsk()

    def ask() -> None:
        asked.probes.append(
            probe(client, f"/workflows/{workflow_id}", t_down, RECOVERY_TIMEOUT + 60)
        )
        if asked.probes[0].status is not None:  # not dropped with a fenced image
            asked.answered_at.append(time.monotonic())

    asked.thread = threading.Thread(target=ask, daemon=True)
    asked.thread.start()
    return asked


def probe_while_down(client: httpx.Client, result: ScenarioResult, t_down: float) -> None:
    """/healthz and /openapi.json every PROBE_INTERVAL for the scenario's time (once
    for a restart)."""
    while True:
        for path in ("/healthz", "/openapi.json"):
            result.probes.append(probe(client, path, t_down))
        if time.monotonic() - t_down >= result.scenario.down_seconds:
            break
        time.sleep(PROBE_INTERVAL)


def observe_recovery(
    service: Service, result: ScenarioResult, window: Window, asked: StatusAsk
) -> None:
    """Health back, the fan-out finished, the status request answered."""
    client = service.server.client
    healthy = until(lambda: probe(client, "/healthz", window.t_down).status == 200, 120)
    result.health_back_after = time.monotonic() - window.t_up if healthy else None
    final = until(
        lambda: (
            (view := fan_out_view(service, result.workflow_id))
            and view["status"] == "SUCCESS"
            and view
        ),
        RECOVERY_TIMEOUT,
        0.3,
    )
    result.done_after = time.monotonic() - window.t_up if final else None
    result.final = final or fan_out_view_or_none(service, result.workflow_id)
    if asked.thread is not None:
        asked.thread.join(timeout=RECOVERY_TIMEOUT + 90)
        result.status_probe = asked.probes[0] if asked.probes else None
        if asked.answered_at:
            result.status_probe_after_up = asked.answered_at[0] - window.t_start


def read_schedule(result: ScenarioResult, server: AppServer, window: Window) -> None:
    """A slot scheduled after the start ran: the schedule resumed (5 s slots, plus the
    backoff a schedule thread blocked during the outage may still sleep)."""
    up_wall = window.up_wall
    assert up_wall is not None

    def slots_after() -> list[datetime]:
        return [s for s in scheduled_slots(server.records()) if s >= up_wall]

    until(slots_after, 90, 0.3)
    slots = scheduled_slots(server.records())
    result.schedule_after = [s.isoformat() for s in slots if s >= up_wall]
    result.schedule_during = [s.isoformat() for s in slots if window.down_wall <= s < up_wall]
    skipped, twice = slot_gaps(slots)
    result.slots_skipped = [s.isoformat() for s in skipped]
    result.slots_twice = [s.isoformat() for s in twice]


def read_records(
    service: Service,
    result: ScenarioResult,
    snapshot: dict[tuple[Any, ...], tuple[Any, ...]],
    window: Window,
) -> None:
    """The database and the ledger afterwards; the live leases and who serves."""
    db_url, client = service.db_url, service.server.client
    # Every workflow that existed when the database came back finishes (the schedule's
    # late slots included); a short wait for the ones still running.
    until(lambda: not unfinished_workflows(db_url, window.up_ms), 60, 0.5)
    result.unfinished = unfinished_workflows(db_url, window.up_ms)
    result.outputs = step_outputs(db_url, result.workflow_id)
    result.ledger = ledger_runs(service.ledger_path, result.workflow_id)
    after = recorded_rows(db_url)
    result.snapshot_rows = len(snapshot)
    result.lost = [repr(k) for k, v in snapshot.items() if after.get(k) != v]
    result.holders_after = slot_holders(db_url)
    result.slot_locks_after = len(result.holders_after)
    health = until(lambda: (p := probe(client, "/healthz", window.t_down)).status == 200 and p, 30)
    result.pid_after = health.body["pid"] if health else None
    proc = service.server.proc
    result.alive = proc is not None and proc.poll() is None


def find_leaks(service: Service, result: ScenarioResult) -> None:
    answers = [repr(p.body) for p in result.probes]
    if result.status_probe is not None:
        answers.append(repr(result.status_probe.body))
    result.leaks = [f"answer {i}" for i, a in enumerate(answers) if service.password in a]
    if service.password in service.server.log_text():
        result.leaks.append("server log")


def read_log(result: ScenarioResult, records: list[dict[str, Any]], window: Window) -> None:
    """Fences, slot claims (re-takes) and warnings among the log lines of the scenario."""
    down_wall, up_wall = window.down_wall, window.up_wall
    assert up_wall is not None

    def line(r: dict[str, Any]) -> tuple[str, int, float]:
        return (r["executor_id"], int(r["pid"]), (when(r) - down_wall).total_seconds())

    result.fenced = [line(r) for r in records if r.get("message") == FENCE_LINE]
    result.retaken = [line(r) for r in records if r.get("message") == CLAIM_LINE]
    result.warnings_while_down = sum(
        r.get("severity") == "WARNING" and down_wall <= when(r) < up_wall
        for r in records
        if "timestamp" in r
    )


def fan_out_view_or_none(service: Service, workflow_id: str) -> dict[str, Any] | None:
    try:
        return fan_out_view(service, workflow_id)
    except httpx.HTTPError:
        return None


def second_process_executor(service: Service) -> str | None:
    """Start another process on the same database: which executor id does it claim?"""
    env = {k: v for k, v in service.server.env.items() if k not in ("WORKERS", "PORT")}
    server = AppServer("fastapi_scope_shutdown:app", env, service.workdir / "second.log")
    try:
        server.start(ready_timeout=120)
        return str(ShutdownClient(server.client).healthz(timeout=30).json()["executor_id"])
    finally:
        server.close()


# --- figures ----------------------------------------------------------------------------


def probe_figures(r: ScenarioResult) -> list[Figure]:
    """While down: nothing hung, /healthz never 200; a fenced process's re-exec window."""
    label = r.scenario.label
    health = [p for p in r.health_probes if p.status is not None]
    slowest = max((p.seconds for p in r.probes), default=0.0)
    answered = sum(p.status is not None for p in r.probes)
    refused = f" ({len(r.refused)} refused in the re-exec)" if r.refused else ""
    ok = r.health_reported_outage and (r.none_hung if r.scenario.fences else r.all_answered)
    figures = [
        promise(
            AREA,
            f"{label}: health answered while down",
            f"{answered}/{len(r.probes)} answered{refused}, "
            f"/healthz 503: {sum(p.status == 503 for p in health)}/{len(health)}",
            ok,
            "none hung, rest refused; /healthz 503"
            if r.scenario.fences
            else "every probe; /healthz 503",
            f"slowest {slowest:.2f} s; down {r.down_for:.1f} s",
        ),
    ]
    if r.scenario.fences:
        figures.append(
            info(
                AREA,
                f"{label}: probes refused while re-executing",
                len(r.refused),
                f"longest window {r.longest_refusal:.1f} s (the new image starting)"
                + (", still refused when the database was started" if r.refused_at_end else ""),
            )
        )
    if r.status_probe is not None:
        after = r.status_probe_after_up
        sp = r.status_probe
        figures.append(
            info(
                AREA,
                f"{label}: GET /workflows/{{id}} sent while down",
                f"{sp.status or sp.failure} after {sp.seconds:.1f} s",
                "DBOS retries until the database is back (a fence drops the request)"
                + (f"; answered {after:.1f} s after the start" if after is not None else ""),
            )
        )
    return figures


def process_figures(r: ScenarioResult) -> list[Figure]:
    """The processes: the same executor ids afterwards; a restart, no re-take at all."""
    label = r.scenario.label
    ids = ", ".join(sorted(r.holders_after)) or "none"
    before = ", ".join(sorted(r.holders_before)) or "none"
    pids = f"pid {r.pid_before} -> {r.pid_after}" if r.scenario.workers == 1 else ""
    figures = [
        promise(
            AREA,
            f"{label}: executor ids after the outage",
            ids if r.alive else f"{ids}, server exited",
            r.alive and r.same_executors,
            f"== before ({before}), each re-taken by its own process",
            pids,
        )
    ]
    if r.scenario.fences:
        retakes = ", ".join(f"{e} by pid {pid}" for e, pid, _ in r.retaken)
        figures.append(
            info(
                AREA,
                f"{label}: fences (no renewal for FENCE_SEC)",
                f"{len(r.fenced)} fenced, {r.restarts} re-took",
                f"FENCE_SEC = {fastapi_scope_shutdown.FENCE_SEC:g} s; {retakes}",
            )
        )
    else:
        figures.append(
            promise(
                AREA,
                f"{label}: process restarts",
                r.restarts if r.alive else f"{r.restarts}, server exited",
                r.alive and r.restarts == 0 and not r.fenced,
                f"0 (shorter than FENCE_SEC = {fastapi_scope_shutdown.FENCE_SEC:g} s)",
                pids,
            )
        )
    return figures


def scenario_figures(r: ScenarioResult) -> list[Figure]:
    return (
        probe_figures(r)
        + work_figures(r)
        + schedule_figures(r)
        + process_figures(r)
        + service_state_figures(r)
    )


def work_figures(r: ScenarioResult) -> list[Figure]:
    """The fan-out, the schedule and what was recorded: nothing lost, nothing twice."""
    label = r.scenario.label
    return [
        promise(
            AREA,
            f"{label}: fan-out finished after DB back",
            "yes" if r.finished else f"no ({(r.final or {}).get('status')})",
            r.finished,
            "yes",
        ),
        promise(AREA, f"{label}: result correct", r.result_correct, r.result_correct, "True"),
        promise(
            AREA,
            f"{label}: workflows left unfinished",
            len(r.unfinished),
            not r.unfinished,
            "0",
            ", ".join(r.unfinished[:3]),
        ),
        promise(
            AREA,
            f"{label}: duplicate step outputs",
            r.duplicate_outputs,
            r.duplicate_outputs == 0 and r.missing_outputs == 0,
            "0",
            f"steps without output: {r.missing_outputs}",
        ),
        promise(
            AREA,
            f"{label}: bodies re-run, not in flight",
            len(r.reruns_not_in_flight),
            not r.reruns_not_in_flight,
            "0",
            f"steps {r.reruns_not_in_flight}" if r.reruns_not_in_flight else "",
        ),
        info(
            AREA,
            f"{label}: bodies re-run, in flight",
            f"{len(r.reruns_in_flight)} of {len(r.in_flight)}",
        ),
        promise(
            AREA,
            f"{label}: recorded rows lost or changed",
            f"{len(r.lost)} of {r.snapshot_rows}",
            not r.lost,
            "0",
        ),
    ]


def schedule_figures(r: ScenarioResult) -> list[Figure]:
    label = r.scenario.label
    return [
        promise(
            AREA,
            f"{label}: schedule slots after recovery",
            len(r.schedule_after),
            len(r.schedule_after) >= 1,
            ">= 1 (resumed)",
            f"slots inside the outage run late: {len(r.schedule_during)}",
        ),
        info(
            AREA,
            f"{label}: schedule slots skipped / run twice",
            f"{len(r.slots_skipped)} / {len(r.slots_twice)}",
            "since the server started; "
            + (
                "a re-executed process starts the schedule afresh (no backfill)"
                if r.fenced
                else "missed slots are caught up one by one"
            ),
        ),
    ]


def service_state_figures(r: ScenarioResult) -> list[Figure]:
    label = r.scenario.label
    return [
        info(AREA, f"{label}: DB back -> health 200", _seconds(r.health_back_after)),
        info(AREA, f"{label}: DB back -> fan-out finished", _seconds(r.done_after)),
        promise(
            AREA,
            f"{label}: executor slot lease held after DB back",
            f"{r.slot_locks_after} (before the stop: {r.slot_locks_before})",
            r.slot_locks_after == r.slot_locks_expected,
            f"{r.slot_locks_expected}: one live lease per process",
            "renewed on a connection of its own, which reconnects once the server is back",
        ),
        info(
            AREA,
            f"{label}: DBOS warnings while down",
            f"{r.warnings_while_down / max(r.down_for, 0.1):.0f}/s",
            f"{r.warnings_while_down} lines in {r.down_for:.1f} s",
        ),
        promise(AREA, f"{label}: password in answers or log", len(r.leaks), not r.leaks, "0"),
    ]


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


@dataclass
class ServiceRun:
    """The scenarios run on one service, and who claims a slot after them."""

    workers: int
    results: list[ScenarioResult]
    in_use: list[str]  # executor ids the service's processes claimed
    second: str | None  # the executor id a process started afterwards claimed


def run_service(ctx: Context, scenarios: list[Scenario]) -> ServiceRun:
    """The scenarios one after another on one service; then a second process."""
    workers = scenarios[0].workers
    results = []
    with serve(ctx, workers) as service:
        for scenario in scenarios:
            results.append(run_scenario(service, scenario))
        in_use = sorted(set(claims(service.server.records())))
        second = second_process_executor(service)
    return ServiceRun(workers, results, in_use, second)


def run_all(ctx: Context, names: tuple[str, ...]) -> list[ServiceRun]:
    chosen = [SCENARIOS[n] for n in names]
    return [
        run_service(ctx, [s for s in chosen if s.workers == workers])
        for workers in sorted({s.workers for s in chosen})
    ]


def service_figures(run: ServiceRun) -> list[Figure]:
    figures: list[Figure] = []
    for r in run.results:
        figures += scenario_figures(r)
    where = "one process" if run.workers == 1 else f"{run.workers} workers"
    figures.append(
        promise(
            AREA,
            f"{where}: executor id of a process started after the outages",
            run.second,
            run.second is not None and run.second not in run.in_use,
            "a free one",
            f"in use: {', '.join(run.in_use)}",
        )
    )
    return figures


def run(ctx: Context) -> list[Figure]:
    names = QUICK if ctx.quick else tuple(SCENARIOS)
    figures: list[Figure] = []
    for service_run in run_all(ctx, names):
        figures += service_figures(service_run)
    return figures
