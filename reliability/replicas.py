"""Replicas: one replica of the shutdown demo is lost, cut off or frozen; the other
finishes its work, and no executor id is ever served by two live processes.

What it measures
    Two replicas (``uvicorn fastapi_scope_shutdown:app``, each in its own PID namespace
    and behind its own ``harness.faults.FaultProxy`` to one Postgres database; see
    ``harness/replicas.py``). Replica A gets ``POST /trigger_async`` (a fan-out of
    ``STEPS`` steps, ``MAX_N``); both replicas dequeue its steps from the shared queue.
    Once A has steps in flight (PENDING under its executor id, a step done), the case's
    fault hits A:

    crash         A's process group gets SIGKILL; nothing restarts it (its kernel resets
                  its connections: Postgres sees them end).
    silent loss   A's proxy blackholes, then A gets SIGKILL behind it: Postgres never
                  sees a reset (a host that lost power).
    partition     A's proxy blackholes while A lives; once B has taken A's work over, the
                  proxy heals.
    freeze        A's process group gets SIGSTOP for ``FREEZE_SEC``, then SIGCONT (a long
                  GC pause, a paused container). Takeover is right: a frozen process is
                  indistinguishable from a dead one, and it fences itself on waking.
    cut from all  every replica's proxy blackholes for ``CUT_SEC``, then heals: nobody
                  could take over, every replica keeps or re-takes a slot.
    worker crash  each replica runs ``WORKERS`` uvicorn workers; the worker that runs the
                  fan-out gets SIGKILL (its supervisor starts a replacement).

    Then it waits (with deadlines) for the fan-out to end, and reads the database, the
    FIB_LEDGER (one line per step body run: step, pid) and the replicas' ``/healthz``,
    polled every 0.25 s throughout (``harness.replicas.HealthLog``).

Figures (``area = replicas``, per case)
    takeover time (median, max)   seconds from the fault to the moment every workflow
                                  that was PENDING under A at the fault has been handed to
                                  a new execution (re-enqueued, dequeued again, or
                                  finished by another), polled every 0.1 s. Targets: 10 s
                                  after a crash, 15 s after a silent loss; also shown for
                                  partition and freeze.
    workflows lost                promise 0: the fan-out or a step not SUCCESS at the end.
    step outputs recorded twice   promise 0: steps whose output is not recorded exactly
                                  once, plus duplicate (workflow, operation) rows.
    bodies run again beyond those in flight
                                  promise 0: step bodies that ran more than once (ledger)
                                  although not PENDING at the fault.
    two live processes on one executor id
                                  promise 0 s: overlap of spans in which two replicas both
                                  answered /healthz 200 as the same executor id.
    stale healthy answers         promise 0 (partition, freeze): /healthz 200 from A as the
                                  executor id it had, for a request sent after the fault
                                  and before A claimed a slot anew.
    fresh claim after the fault   promise all (partition, freeze): A serves again, on a
                                  lease it claimed after the fault (a new owner in
                                  ``experiment6.executor_slots``).
    outputs recorded by a stale owner
                                  promise 0 (partition, freeze): steps A had in flight
                                  and had not recorded by the fault, finished by another
                                  replica, whose recorded output's body started before
                                  that replica dequeued them. (A step recorded before the
                                  fault whose workflow had not yet ended is replayed by
                                  the new owner: A's record, made while A owned it.)
    cut from all: healthy while cut
                                  promise 0: /healthz 200 for a request sent while cut.
    cut from all: resume after heal (median, max)
                                  seconds from the heal to the last replica's first
                                  /healthz 200; target 5 s.
    cut from all: takeovers       promise 0: adoption lines ("adopted orphaned executor
                                  slot") of any replica.
    busy: false takeovers         promise 0: adoptions and self-fences while both replicas
                                  run a CPU-saturating fan-out (``BUSY``), once with
                                  ``executor=thread`` (the GIL) and once with the pool.

    A trial is one pair of replicas on a fresh database going through the cases in
    ``ORDER`` (a lost A is replaced by a new replica before the next case) and the busy
    fan-outs, plus a pair with ``WORKERS`` workers each for the worker crash.
    ``MIN_TRIALS`` trials in a full run; a quick run (``--quick``, the tests) does
    ``ctx.trials`` trials of ``QUICK_CASES``, no busy fan-outs.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness.db import query
from harness.fanout import children, fan_out_result, ledger_runs
from harness.proc import until, wait_for
from harness.replicas import (
    HealthLog,
    Replica,
    Replicas,
    duplicate_outputs,
    leases,
    logged_at,
    unfinished,
)
from reliability.core import Context, Figure, info, progress, promise

AREA = "replicas"

# 60 steps, the last 30 of them fib(30): a few seconds of CPU across the two replicas'
# pools, so A still has steps running when the fault comes.
STEPS, MAX_N = 60, 30
FREEZE_SEC = 20
CUT_SEC = 20
# What the figures are judged against (targets of the measurement, not test deadlines).
TAKEOVER_TARGET_SEC = {"crash": 10.0, "silent loss": 15.0}
RESUME_TARGET_SEC = 5.0
MIN_TRIALS = 5
# A CPU-saturating fan-out for the false-takeover check: fib(32) steps, ~0.5 s each.
BUSY = {"steps": 60, "max_n": 32}
# Safety deadlines.
TAKEOVER_DEADLINE = 120  # above DBOS's 60 s idle-in-transaction timeout: measure, do not cut off
FINISH_DEADLINE = 240
POLL_SEC = 0.1

CASES = ("crash", "silent loss", "partition", "freeze", "cut from all", "worker crash")
# The order one pair of replicas goes through them: A survives the first three.
ORDER = ("cut from all", "partition", "freeze", "crash", "silent loss", "worker crash")
# One pool process per replica: two replicas share the machine's two cores.
POOL = 1
# "worker crash": each replica runs WORKERS uvicorn workers; the one running A's fan-out
# gets SIGKILL (its supervisor starts a replacement).
WORKERS = 2


@dataclass
class CaseResult:
    case: str
    workflow_id: str = ""
    owner: str = ""  # A's executor id
    in_flight: set[int] = field(default_factory=set)  # steps PENDING at the fault
    # Steps whose output A had recorded by the fault (their workflow still PENDING: A
    # was between the step's record and the workflow's end): A's while it owned them.
    recorded_at_fault: set[int] = field(default_factory=set)
    takeover_sec: float | None = None
    finished: bool = False
    result_ok: bool = False
    outputs_not_one: list[int] = field(default_factory=list)
    outputs_twice: list[int] = field(default_factory=list)
    duplicate_rows: int = 0
    runs: Counter[int] = field(default_factory=Counter)
    lost: list[tuple[str, str]] = field(default_factory=list)
    double_served_sec: float = 0.0
    adoptions: int = 0
    fences: int = 0
    stale_healthy: int = 0
    fresh_claim: bool | None = None
    stale_outputs: list[int] = field(default_factory=list)
    healthy_while_cut: int = 0
    resume_sec: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # cut from all: heal -> each
    # partition: A's fence line to the first adoption line (both this machine's clock).
    fence_lead_sec: float | None = None
    error: str | None = None

    @property
    def reruns_not_in_flight(self) -> list[int]:
        return sorted(i for i, n in self.runs.items() if n > 1 and i not in self.in_flight)

    @property
    def recorded_twice(self) -> int:
        """Steps with more than one output, plus duplicate rows (a step with none is
        counted among the lost: its workflow did not finish)."""
        return len(self.outputs_twice) + self.duplicate_rows


# --- what the database says ---------------------------------------------------------


def pending_rows(db_url: str, executor_id: str) -> dict[str, Any]:
    """id -> started_at of the workflows PENDING under ``executor_id``."""
    rows = query(
        db_url,
        "SELECT workflow_uuid, started_at_epoch_ms FROM dbos.workflow_status "
        "WHERE status = 'PENDING' AND executor_id = %s",
        executor_id,
    )
    return {str(i): s for i, s in rows}


def handed_over(db_url: str, executor_id: str, snapshot: dict[str, Any]) -> bool:
    """Every workflow PENDING under ``executor_id`` at the fault is now another
    execution's: no longer PENDING there with the same dequeue stamp."""
    now = pending_rows(db_url, executor_id)
    return not any(wf in now and now[wf] == started for wf, started in snapshot.items())


def wait_takeover(
    db_url: str, executor_id: str, snapshot: dict[str, Any], t0: float, within: float = 0
) -> float:
    """Seconds from ``t0`` to the takeover; gives up ``TAKEOVER_DEADLINE`` after ``t0``,
    or returns inf after ``within`` seconds (when given) without it."""
    found = until(
        lambda: handed_over(db_url, executor_id, snapshot),
        (within or TAKEOVER_DEADLINE) - (time.monotonic() - t0),
        POLL_SEC,
    )
    if found:
        return time.monotonic() - t0
    if within:
        return float("inf")
    raise AssertionError(f"the work of {executor_id} was not taken over in {TAKEOVER_DEADLINE} s")


def wait_busy(db_url: str, workflow_id: str, executor_id: str) -> None:
    """A has steps in flight and some step is done: the fault lands mid fan-out."""

    def busy() -> bool:
        steps = children(db_url, workflow_id)
        mine = [
            c
            for c in steps.values()
            if c["status"] == "PENDING" and c["executor_id"] == executor_id
        ]
        return bool(mine) and any(c["status"] == "SUCCESS" for c in steps.values())

    wait_for(busy, FINISH_DEADLINE, POLL_SEC, "replica A to have steps in flight")


def lease_owner(db_url: str, executor_id: str) -> str | None:
    slot = int(executor_id.rsplit("-", 1)[1])
    row = leases(db_url).get(slot)
    return row[0] if row else None


# --- one trial ------------------------------------------------------------------------


def replicas(db_url: str, workdir: Path, workers: int | None = None) -> Replicas:
    """The two replicas the cases run on (not started: use as a context manager)."""
    return Replicas(db_url, workdir, workers=workers, env={"FIB_PROCESSES": str(POOL)})


def run_case(case: str, group: Replicas) -> CaseResult:
    """One trial of ``case`` on running replicas (a dead member is replaced first: the
    cases run one after the other on the same database)."""
    r = CaseResult(case)
    try:
        group.ready()
    except AssertionError as exc:
        r.error = f"replicas not ready: {exc}"[:300]
        return r
    since = time.monotonic()
    health = HealthLog(group.members).start()
    try:
        _run(case, group, health, r)
    except (AssertionError, httpx.HTTPError) as exc:  # a finding, not a crash
        r.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        health.stop()
    r.double_served_sec = round(health.double_served_seconds(), 3)
    r.adoptions = len(group.adoptions(since))
    r.fences = len(group.fences(since))
    r.fence_lead_sec = _fence_lead(group, since)
    _collect(group.db_url, group.ledger, r)
    return r


def _fence_lead(group: Replicas, since: float) -> float | None:
    """Seconds from A's first fence to the first adoption of any replica (None when
    either did not happen)."""
    fences = group.members[0].messages("executor slot lost: fencing", since)
    adoptions = group.adoptions(since)
    if not fences or not adoptions:
        return None
    return round(min(logged_at(x) for x in adoptions) - logged_at(fences[0]), 3)


def _fault(case: str, group: Replicas, owner: str) -> None:
    a = group.members[0]
    if case == "crash":
        a.kill()
    elif case == "silent loss":
        a.proxy.blackhole()
        a.kill()
    elif case == "partition":
        a.proxy.blackhole()
    elif case == "freeze":
        a.freeze()
    elif case == "worker crash":
        a.kill_worker(owner)
    elif case == "cut from all":
        for m in group.members:
            m.proxy.blackhole()
    else:
        raise ValueError(f"unknown case {case!r}")


def _run(case: str, group: Replicas, health: HealthLog, r: CaseResult) -> None:
    a, b = group.members
    r.workflow_id = a.trigger(STEPS, MAX_N)
    # The process that runs the fan-out (one of A's workers, with WORKERS > 1).
    r.owner = str(
        query(
            group.db_url,
            "SELECT executor_id FROM dbos.workflow_status WHERE workflow_uuid = %s",
            r.workflow_id,
        )[0][0]
    )
    wait_busy(group.db_url, r.workflow_id, r.owner)
    old_owner = lease_owner(group.db_url, r.owner)
    before = children(group.db_url, r.workflow_id)
    t0 = time.monotonic()
    _fault(case, group, r.owner)
    snapshot = pending_rows(group.db_url, r.owner)
    after = children(group.db_url, r.workflow_id)
    r.in_flight = {i for c in (before, after) for i, s in c.items() if s["status"] == "PENDING"}
    r.recorded_at_fault = {i for i, s in after.items() if s["outputs"]}
    if case == "cut from all":
        _cut_from_all(group, health, r, t0)
    elif case == "freeze":
        # The freeze lasts FREEZE_SEC whether or not the takeover has come by then.
        try:
            takeover = wait_takeover(group.db_url, r.owner, snapshot, t0, FREEZE_SEC)
        finally:
            time.sleep(max(0.0, FREEZE_SEC - (time.monotonic() - t0)))  # the fault's length
            a.thaw()
        if takeover == float("inf"):  # not while frozen: wait on (a finding)
            takeover = wait_takeover(group.db_url, r.owner, snapshot, t0)
        r.takeover_sec = round(takeover, 3)
    else:
        r.takeover_sec = round(wait_takeover(group.db_url, r.owner, snapshot, t0), 3)
    if case == "partition":
        a.proxy.heal()
    if case in ("partition", "freeze"):
        _rejoin(a, group.db_url, health, r, t0, old_owner)
    wait_for(
        lambda: not unfinished(group.db_url, r.workflow_id),
        FINISH_DEADLINE,
        0.5,
        f"fan-out {r.workflow_id} to finish",
    )
    r.finished = True
    alive = b if case in ("crash", "silent loss") else a
    r.result_ok = alive.client.view(r.workflow_id).get("result") == fan_out_result(STEPS, MAX_N)


def _rejoin(
    a: Replica, db_url: str, health: HealthLog, r: CaseResult, t0: float, old_owner: str | None
) -> None:
    """After a partition or a freeze: A claims a slot anew (an "executor slot claimed"
    line after the fault), then serves; no 200 as its old id in between."""
    claims = wait_for(
        lambda: a.messages("executor slot claimed", since=t0),
        FINISH_DEADLINE,
        0.2,
        "replica A to claim anew",
    )
    claimed_at = logged_at(claims[0])
    body = a.wait_healthy(FINISH_DEADLINE)
    new_owner = lease_owner(db_url, str(body["executor_id"]))
    r.fresh_claim = new_owner is not None and new_owner != old_owner
    r.stale_healthy = sum(
        1 for x in health.healthy(a.name, since=t0, until=claimed_at) if x.executor_id == r.owner
    )


def _cut_from_all(group: Replicas, health: HealthLog, r: CaseResult, t0: float) -> None:
    time.sleep(CUT_SEC)  # the fault's length, not a wait for a state
    healed = time.monotonic()
    for m in group.members:
        m.proxy.heal()
    wait_for(
        lambda: all(health.healthy(m.name, since=healed) for m in group.members),
        FINISH_DEADLINE,
        0.2,
        "every replica to answer /healthz 200 after the heal",
    )
    firsts = [min(x.sent for x in health.healthy(m.name, since=healed)) for m in group.members]
    r.resume_sec = round(max(firsts) - healed, 3)
    r.phases = _phases(group, healed)
    # A request sent after the cut goes through the blackhole: no 200 can come back.
    r.healthy_while_cut = sum(
        len(health.healthy(m.name, since=t0, until=healed)) for m in group.members
    )


# What a replica does between the heal and its first healthy answer, in order.
PHASES = {
    "slot claimed": "executor slot claimed",
    "DBOS launched": "DBOS launched!",
    "serving": "serving",
}


def _phases(group: Replicas, healed: float) -> dict[str, float]:
    """Seconds from the heal to each phase of the slowest replica (its log lines)."""
    found: dict[str, float] = {}
    for phase, message in PHASES.items():
        times = [
            min(logged_at(x) for x in lines) - healed
            for m in group.members
            if (lines := m.messages(message, since=healed))
        ]
        if len(times) == len(group.members):
            found[phase] = round(max(times), 3)
    return found


def _collect(db_url: str, ledger: Path, r: CaseResult) -> None:
    if not r.workflow_id:
        return
    steps = children(db_url, r.workflow_id)
    r.outputs_not_one = sorted(i for i in range(STEPS) if steps.get(i, {}).get("outputs") != 1)
    r.outputs_twice = sorted(i for i, c in steps.items() if c["outputs"] > 1)
    r.duplicate_rows = duplicate_outputs(db_url)
    r.runs = ledger_runs(ledger, r.workflow_id)
    r.lost = unfinished(db_url, r.workflow_id)
    # A's in-flight steps finished elsewhere: unless A had recorded the output before
    # the fault (then it was the owner's record, and the new owner replays it), the
    # recorded output's body must have started after that replica dequeued the step
    # (not A's stale body).
    r.stale_outputs = sorted(
        i
        for i, c in steps.items()
        if i in r.in_flight
        and i not in r.recorded_at_fault
        and c["executor_id"] != r.owner
        and None not in (c["body"][0], c["started"])
        and c["body"][0] < c["started"]
    )


# --- busy replicas: no false takeover ------------------------------------------------


@dataclass
class BusyResult:
    executor: str
    finished: bool = False
    adoptions: int = 0
    fences: int = 0
    seconds: float = 0.0


def run_busy(executor: str, group: Replicas) -> BusyResult:
    """Both replicas saturated by one fan-out (``BUSY``); nothing may be taken over."""
    r = BusyResult(executor)
    since = time.monotonic()
    try:
        group.ready()
        workflow_id = group.members[0].trigger(BUSY["steps"], BUSY["max_n"], executor=executor)
        wait_for(
            lambda: not unfinished(group.db_url, workflow_id),
            FINISH_DEADLINE,
            0.5,
            f"busy fan-out {workflow_id} to finish",
        )
        r.finished = True
    except (AssertionError, httpx.HTTPError):
        pass  # not finished: the figure says so
    r.seconds = round(time.monotonic() - since, 1)
    r.adoptions = len(group.adoptions(since))
    r.fences = len(group.fences(since))
    return r


# --- the area ----------------------------------------------------------------------

# Takeover targets per case: a crash (the kernel resets the connections) 10 s, a
# silent loss 15 s; a partition and a freeze look like a silent loss from the peers.
TARGETS = {
    "crash": TAKEOVER_TARGET_SEC["crash"],
    "worker crash": TAKEOVER_TARGET_SEC["crash"],
    "silent loss": TAKEOVER_TARGET_SEC["silent loss"],
    "partition": TAKEOVER_TARGET_SEC["silent loss"],
    "freeze": TAKEOVER_TARGET_SEC["silent loss"],
}
QUICK_CASES = ("cut from all", "partition", "crash")


def trials_for(ctx: Context) -> int:
    """``MIN_TRIALS`` in a full run; a quick run (the tests) does ``ctx.trials``."""
    return min(ctx.trials, MIN_TRIALS) if ctx.quick else MIN_TRIALS


def run_trial(ctx: Context, i: int, cases: tuple[str, ...], busy: tuple[str, ...]) -> Any:
    """One pair of replicas on a fresh database through every case in order (those that
    leave A alive first; a lost A is replaced by a new replica before the next case),
    the busy fan-outs, then a pair with ``WORKERS`` workers each for the worker crash."""
    results: list[CaseResult] = []
    busy_results: list[BusyResult] = []
    single = [c for c in cases if c != "worker crash"]
    with replicas(ctx.fresh_db(f"replicas_{i}"), ctx.scratch(f"replicas-{i}")) as group:
        for case in single:
            results.append(_report(i, run_case(case, group)))
        for executor in busy:
            busy_results.append(run_busy(executor, group))
            progress(f"replicas trial {i + 1}: {busy_results[-1]}")
    if "worker crash" in cases:
        url, scratch = ctx.fresh_db(f"replicas_w_{i}"), ctx.scratch(f"replicas-w-{i}")
        try:
            with replicas(url, scratch, workers=WORKERS) as group:
                results.append(_report(i, run_case("worker crash", group)))
        except AssertionError as exc:  # the replicas did not start: a finding
            results.append(_report(i, CaseResult("worker crash", error=str(exc)[:300])))
    return results, busy_results


def _report(i: int, r: CaseResult) -> CaseResult:
    progress(
        f"replicas trial {i + 1}, {r.case}: takeover {r.takeover_sec}s, resume "
        f"{r.resume_sec}s {r.phases}, lost {len(r.lost)}, twice {r.recorded_twice}, "
        f"reruns not in flight {r.reruns_not_in_flight}, adoptions {r.adoptions}, "
        f"error {r.error}"
    )
    return r


def run(ctx: Context) -> list[Figure]:
    cases = QUICK_CASES if ctx.quick else ORDER
    busy = () if ctx.quick else ("thread", "process")
    results: list[CaseResult] = []
    busy_results: list[BusyResult] = []
    for i in range(trials_for(ctx)):
        rs, bs = run_trial(ctx, i, cases, busy)
        results += rs
        busy_results += bs
    return case_figures(results) + busy_figures(busy_results)


def _seconds(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "none"
    return f"{statistics.median(got):.1f} s, {max(got):.1f} s"


def case_figures(results: list[CaseResult]) -> list[Figure]:
    figures: list[Figure] = []
    for case in dict.fromkeys(r.case for r in results):
        rs = [r for r in results if r.case == case]
        figures += _common_figures(case, rs)
        if case in TARGETS:
            target = TARGETS[case]
            times = [r.takeover_sec for r in rs]
            ok = all(t is not None and t <= target for t in times)
            figures.append(
                promise(AREA, f"{case}: takeover time (median, max)", _seconds(times), ok,
                        f"<= {target:.0f} s", "fault -> every PENDING workflow of A re-owned")
            )  # fmt: skip
        if case in ("partition", "freeze"):
            figures += _rejoin_figures(case, rs)
        if case == "cut from all":
            figures += _cut_figures(rs)
    return figures


def _common_figures(case: str, rs: list[CaseResult]) -> list[Figure]:
    reruns = sum(sum(1 for n in r.runs.values() if n > 1) for r in rs)
    return [
        info(AREA, f"{case}: trials", len(rs), f"{STEPS} steps, max_n {MAX_N}"),
        promise(AREA, f"{case}: trials that missed a deadline",
                sum(r.error is not None for r in rs), not any(r.error for r in rs), "0",
                next((r.error for r in rs if r.error), "")),
        promise(AREA, f"{case}: workflows lost", sum(len(r.lost) for r in rs),
                all(r.finished and r.result_ok and not r.lost for r in rs), "0",
                "fan-out or step not SUCCESS, or a wrong result"),
        promise(AREA, f"{case}: step outputs recorded twice", sum(r.recorded_twice for r in rs),
                all(r.recorded_twice == 0 for r in rs), "0"),
        info(AREA, f"{case}: bodies run again (in flight at the fault)", reruns),
        promise(AREA, f"{case}: bodies run again beyond those in flight",
                sum(len(r.reruns_not_in_flight) for r in rs),
                all(not r.reruns_not_in_flight for r in rs), "0"),
        promise(AREA, f"{case}: two live processes on one executor id",
                f"{sum(r.double_served_sec for r in rs):.1f} s",
                all(r.double_served_sec == 0 for r in rs), "0 s", "overlapping /healthz 200"),
    ]  # fmt: skip


def _rejoin_figures(case: str, rs: list[CaseResult]) -> list[Figure]:
    figures = []
    if case == "partition":
        leads = [r.fence_lead_sec for r in rs]
        figures.append(
            promise(AREA, f"{case}: A fenced before B took over (min lead)",
                    "none" if None in leads else f"{min(x for x in leads if x is not None):.1f} s",
                    all(x is not None and x > 0 for x in leads), "> 0 s",
                    "A's fence line -> the first adoption line")
        )  # fmt: skip
    return figures + [
        promise(AREA, f"{case}: A healthy as its lost id before claiming anew",
                sum(r.stale_healthy for r in rs), all(r.stale_healthy == 0 for r in rs), "0"),
        promise(AREA, f"{case}: A back on a fresh claim", sum(bool(r.fresh_claim) for r in rs),
                all(r.fresh_claim for r in rs), "all", "a new lease owner after the fault"),
        promise(AREA, f"{case}: outputs recorded by the stale owner",
                sum(len(r.stale_outputs) for r in rs), all(not r.stale_outputs for r in rs), "0"),
    ]  # fmt: skip


def _cut_figures(rs: list[CaseResult]) -> list[Figure]:
    case = "cut from all"
    phases = {p: _seconds([r.phases.get(p) for r in rs]) for p in PHASES}
    return [
        promise(AREA, f"{case}: /healthz 200 while cut", sum(r.healthy_while_cut for r in rs),
                all(r.healthy_while_cut == 0 for r in rs), "0", f"{CUT_SEC} s cut"),
        promise(AREA, f"{case}: takeovers", sum(r.adoptions for r in rs),
                all(r.adoptions == 0 for r in rs), "0", "nobody could take over"),
        promise(AREA, f"{case}: resume after the heal (median, max)",
                _seconds([r.resume_sec for r in rs]),
                all(r.resume_sec is not None and r.resume_sec <= RESUME_TARGET_SEC for r in rs),
                f"<= {RESUME_TARGET_SEC:.0f} s", "heal -> every replica's first /healthz 200"),
        info(AREA, f"{case}: heal -> phase of the slowest replica (median, max)",
             "; ".join(f"{p} {v}" for p, v in phases.items()),
             "each replica fenced itself during the cut and re-executed"),
    ]  # fmt: skip


def busy_figures(rs: list[BusyResult]) -> list[Figure]:
    figures = []
    for executor in dict.fromkeys(b.executor for b in rs):
        bs = [b for b in rs if b.executor == executor]
        figures += [
            promise(AREA, f"busy (executor={executor}): false takeovers and self-fences",
                    sum(b.adoptions + b.fences for b in bs),
                    all(b.finished and b.adoptions == 0 and b.fences == 0 for b in bs), "0",
                    f"{len(bs)} CPU-saturating fan-outs ({BUSY['steps']} steps, max_n "
                    f"{BUSY['max_n']}), {_seconds([b.seconds for b in bs])} each"),
        ]  # fmt: skip
    return figures
