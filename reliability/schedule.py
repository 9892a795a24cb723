"""Schedule area: with several worker processes, does every 5-second slot run exactly once?

What it measures
    ``python fastapi_scope_shutdown.py`` with ``WORKERS=2`` and ``WORKERS=3`` on a fresh
    Postgres database each. Every worker fires the schedule ``*/5 * * * * *``; DBOS
    derives the scheduled workflow's id from the slot (``sched-shutdown-every-5s-<time>``),
    so one row per slot is created and one executor dequeues it. The question is whether
    that holds in practice for a window of ``seconds`` (30 s in the tests, 60 s in a full
    run) while every worker stays up: no slot doubled, none missed.

How
    Start the server, wait until every worker has logged ``serving`` (its schedule is
    applied), then let it run for the window and stop it with SIGTERM once the last slot
    of the window has finished. Two sources of truth:

    - the database: ``dbos.workflow_status`` rows named ``every_five_seconds``, with id,
      status and ``executor_id`` (who dequeued the slot);
    - the log: each ``"scheduled workflow"`` line is one execution of the workflow body,
      so two lines for one ``scheduled_time`` are a doubled slot even though the row is
      unique.

    The window starts at the first slot at least ``STARTUP_MARGIN`` (2 s) after the last
    worker logged ``serving``: each worker's ``apply_schedules`` replaces the schedule row
    (a new schedule id), and every worker's scheduler restarts its thread at its next poll
    (once a second during the first minute), so a slot a restart skips just before that is a
    start-up effect, not a run with all workers up. The two worker counts run at the same
    time on two databases (``concurrent=True``) to halve the wall time; each one's schedule
    is independent of the other's, and the results stayed clean that way on a 2-core
    machine at a load average of 10-15 (only the lateness grows, up to about 1.6 s).

Figures (per worker count)
    - window: length in seconds from the first to the end of the last expected slot.
    - slots expected / slots run: expected = every 5-second slot of the window; run = those
      with a ``SUCCESS`` row and exactly one body execution.
    - doubled slots (promise 0): slots with more than one body execution (log lines) or
      more than one row, over everything the run logged, start-up included.
    - missed slots (promise 0): slots of the window without a ``SUCCESS`` row or without a
      body execution.
    - slots per executor (info): how the slots spread over the workers (``executor_id`` of
      the rows): the internal queue goes to whichever worker polls first.
    - lateness p50 / max (info): ``actual_time`` (logged by the body) minus
      ``scheduled_time``. DBOS adds up to 0.5 s of jitter, then the run waits for the
      internal queue's next poll (1 s).
"""

from __future__ import annotations

import statistics
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastapi_scope_shutdown
from harness.db import query
from harness.env import script_env
from harness.proc import alive, read_json_lines, wait_for
from harness.server import AppServer
from reliability.core import Context, Figure, info, progress, promise

AREA = "schedule"
SCRIPT = f"{fastapi_scope_shutdown.__name__}.py"
WORKFLOW_NAME = fastapi_scope_shutdown.every_five_seconds.__name__
# DBOS's id of a scheduled run: sched-<schedule name>-<slot time>.
ID_PREFIX = f"sched-{fastapi_scope_shutdown.SCHEDULE}-"
# The app's CRON ("*/5 * * * * *"): it names no seconds constant.
SLOT_SECONDS = 5
# Every worker's apply_schedules replaces the schedule; the other workers' schedulers
# restart their thread at their next poll (1 s at start-up). Slots from then on count.
STARTUP_MARGIN = 2.0
WORKER_COUNTS = (2, 3)


@dataclass
class SlotRun:
    """One slot as the database and the log saw it."""

    scheduled: datetime
    rows: int = 0
    status: str | None = None
    executor_id: str | None = None
    # (executor_id, pid, actual_time) of every body execution ("scheduled workflow" line).
    bodies: list[tuple[str, int, datetime]] = field(default_factory=list)

    @property
    def ran_once(self) -> bool:
        return self.rows == 1 and self.status == "SUCCESS" and len(self.bodies) == 1

    @property
    def doubled(self) -> bool:
        return self.rows > 1 or len(self.bodies) > 1


@dataclass
class Window:
    """What one server with ``workers`` processes did during the measured window."""

    workers: int
    executors: dict[str, int]  # executor id -> pid of the live workers
    up_at: datetime  # the last worker's "serving" line
    first_slot: datetime
    last_slot: datetime
    stopped_at: datetime
    slots: dict[datetime, SlotRun]  # every slot seen (log or database), window or not
    workers_alive_at_end: bool
    exit_code: int | None
    unparsable_lines: int
    tracebacks: int
    # (workflow_uuid, status, executor_id, name) of every workflow_status row.
    rows: list[tuple[str, str, str | None, str]] = field(default_factory=list)

    @property
    def expected(self) -> list[datetime]:
        count = int((self.last_slot - self.first_slot).total_seconds()) // SLOT_SECONDS + 1
        return [self.first_slot + timedelta(seconds=SLOT_SECONDS * i) for i in range(count)]

    @property
    def window_seconds(self) -> float:
        return (self.last_slot - self.first_slot).total_seconds() + SLOT_SECONDS

    @property
    def run(self) -> list[datetime]:
        return [s for s in self.expected if s in self.slots and self.slots[s].ran_once]

    @property
    def missed(self) -> list[datetime]:
        return [
            s
            for s in self.expected
            if s not in self.slots or self.slots[s].status != "SUCCESS" or not self.slots[s].bodies
        ]

    @property
    def doubled(self) -> list[datetime]:
        return sorted(s for s, run in self.slots.items() if run.doubled)

    @property
    def per_executor(self) -> dict[str, int]:
        counts = Counter(self.slots[s].executor_id for s in self.expected if s in self.slots)
        return dict(sorted((str(e), n) for e, n in counts.items()))

    @property
    def mismatched_executor(self) -> list[datetime]:
        """Slots whose one body ran on another executor than the row names."""
        return [
            s
            for s in self.expected
            if s in self.slots
            and len(self.slots[s].bodies) == 1
            and self.slots[s].bodies[0][0] != self.slots[s].executor_id
        ]

    @property
    def foreign_bodies(self) -> list[datetime]:
        """Window slots with a body execution on a process that is not one of the workers."""
        workers = set(self.executors.items())
        return [
            s
            for s in self.expected
            if s in self.slots and any((e, p) not in workers for e, p, _ in self.slots[s].bodies)
        ]

    @property
    def lateness(self) -> list[float]:
        """Seconds from scheduled to actual time of every body execution in the window."""
        return [
            (actual - s).total_seconds()
            for s in self.expected
            if s in self.slots
            for _, _, actual in self.slots[s].bodies
        ]


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """JSON records of a server log, and how many lines did not parse (interleaved writes
    of several processes would show up here)."""
    return read_json_lines(path.read_text(errors="replace") if path.exists() else "")


def serving_workers(records: list[dict[str, Any]]) -> dict[str, tuple[int, datetime]]:
    """executor id -> (pid, time of its "serving" line) of the live workers."""
    pids = {
        r["executor_id"]: r["pid"] for r in records if r.get("message") == "executor slot claimed"
    }
    serving = {
        r["executor_id"]: datetime.fromisoformat(r["timestamp"])
        for r in records
        if r.get("message") == "serving" and r.get("executor_id") in pids
    }
    return {e: (pids[e], t) for e, t in serving.items() if alive(pids[e])}


def next_slot(after: datetime) -> datetime:
    """The first 5-second boundary at or after ``after``."""
    base = after.replace(microsecond=0)
    if base < after:
        base += timedelta(seconds=1)
    return base + timedelta(seconds=(-base.second) % SLOT_SECONDS)


def slot_of(workflow_id: str) -> datetime:
    return datetime.fromisoformat(workflow_id.removeprefix(ID_PREFIX))


def collect_slots(db_url: str, records: list[dict[str, Any]]) -> dict[datetime, SlotRun]:
    slots: dict[datetime, SlotRun] = {}
    for wf_id, status, executor in query(
        db_url,
        "SELECT workflow_uuid, status, executor_id FROM dbos.workflow_status WHERE name = %s",
        WORKFLOW_NAME,
    ):
        slot = slots.setdefault(slot_of(wf_id), SlotRun(slot_of(wf_id)))
        slot.rows += 1
        slot.status, slot.executor_id = status, executor
    for r in records:
        if r.get("message") != "scheduled workflow":
            continue
        scheduled = datetime.fromisoformat(r["scheduled_time"])
        slot = slots.setdefault(scheduled, SlotRun(scheduled))
        slot.bodies.append(
            (r["executor_id"], int(r["pid"]), datetime.fromisoformat(r["actual_time"]))
        )
    return slots


def slot_status(db_url: str, slot: datetime) -> str | None:
    rows = query(
        db_url,
        "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s",
        ID_PREFIX + slot.isoformat(),
    )
    return rows[0][0] if rows else None


def run_window(ctx: Context, workers: int, seconds: float) -> Window:
    """Serve with ``workers`` processes for a window of ``seconds`` once all are up."""
    db_url = ctx.fresh_db(f"schedule_{workers}w")
    workdir = ctx.scratch(f"schedule-{workers}w")
    log_path = workdir / "server.log"
    server = AppServer.script(SCRIPT, script_env(db_url, WORKERS=str(workers)), log_path)
    try:
        server.start(ready_timeout=120)
        live = wait_for(
            lambda: (w := serving_workers(read_log(log_path)[0])) and len(w) == workers and w,
            120,
            0.2,
            f"{workers} workers to serve",
        )
        up_at = max(t for _, t in live.values())
        first = next_slot(up_at + timedelta(seconds=STARTUP_MARGIN))
        last = first + timedelta(seconds=SLOT_SECONDS * max(0, int(seconds) // SLOT_SECONDS - 1))
        progress(
            f"schedule: {workers} workers up ({', '.join(sorted(live))}); "
            f"window {first:%H:%M:%S}..{last:%H:%M:%S}"
        )
        # Until the last slot of the window has run (or clearly never will).
        deadline = (last - datetime.now(UTC)).total_seconds() + 30
        try:
            wait_for(
                lambda: slot_status(db_url, last) == "SUCCESS",
                max(deadline, 30),
                0.5,
                f"slot {last.isoformat()} to finish",
            )
        except AssertionError:
            progress(f"schedule: slot {last.isoformat()} did not finish in time")
        all_alive = all(alive(pid) for pid, _ in live.values())
        stopped_at = datetime.now(UTC)
        try:
            code: int | None = server.terminate(timeout=30)
        except Exception:  # noqa: BLE001 - a stop that hangs is killed below; the slots count
            code = None
    finally:
        server.close()
    records, bad = read_log(log_path)
    return Window(
        workers=workers,
        executors={e: pid for e, (pid, _) in live.items()},
        up_at=up_at,
        first_slot=first,
        last_slot=last,
        stopped_at=stopped_at,
        slots=collect_slots(db_url, records),
        workers_alive_at_end=all_alive,
        exit_code=code,
        unparsable_lines=bad,
        tracebacks=server.log_text().count("Traceback"),
        rows=[
            (str(i), str(st), e, str(n))
            for i, st, e, n in query(
                db_url, "SELECT workflow_uuid, status, executor_id, name FROM dbos.workflow_status"
            )
        ],
    )


def run_windows(
    ctx: Context, seconds: float, counts: tuple[int, ...] = WORKER_COUNTS, concurrent: bool = True
) -> list[Window]:
    """One window per worker count; at the same time on separate databases, or in turn."""
    if not concurrent:
        return [run_window(ctx, n, seconds) for n in counts]
    results: dict[int, Window] = {}
    errors: list[BaseException] = []

    def one(n: int) -> None:
        try:
            results[n] = run_window(ctx, n, seconds)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in counts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[n] for n in counts]


def _fmt_slots(slots: list[datetime]) -> str:
    return ", ".join(s.strftime("%H:%M:%S") for s in slots[:5]) + (" ..." if len(slots) > 5 else "")


def figures(windows: list[Window]) -> list[Figure]:
    out: list[Figure] = []
    for w in windows:
        tag = f"{w.workers} workers"
        late = w.lateness
        out += [
            info(
                AREA,
                f"{tag}: window",
                f"{w.window_seconds:.0f} s",
                f"slots {w.first_slot:%H:%M:%S}..{w.last_slot:%H:%M:%S}, all "
                f"{w.workers} workers alive to the end: {w.workers_alive_at_end}",
            ),
            promise(
                AREA,
                f"{tag}: slots run / expected",
                f"{len(w.run)} / {len(w.expected)}",
                len(w.run) == len(w.expected) and w.workers_alive_at_end,
                "all",
                "run = one SUCCESS row and one body execution",
            ),
            promise(
                AREA,
                f"{tag}: doubled slots",
                len(w.doubled),
                not w.doubled
                and not w.mismatched_executor
                and not w.foreign_bodies
                and not w.unparsable_lines,
                "0",
                (_fmt_slots(w.doubled) if w.doubled else "body lines per slot ≤ 1, rows ≤ 1")
                + (f"; {w.unparsable_lines} unparsable log lines" if w.unparsable_lines else ""),
            ),
            promise(
                AREA, f"{tag}: missed slots", len(w.missed), not w.missed, "0", _fmt_slots(w.missed)
            ),
            info(AREA, f"{tag}: slots per executor", w.per_executor),
            info(
                AREA,
                f"{tag}: lateness p50 / max",
                f"{statistics.median(late):.2f} s / {max(late):.2f} s" if late else "—",
                "actual_time - scheduled_time, from the body's log line",
            ),
        ]
    return out


def run(ctx: Context) -> list[Figure]:
    seconds = 30 if ctx.quick else 60
    progress(f"schedule: {', '.join(map(str, WORKER_COUNTS))} workers, {seconds} s each, at once")
    return figures(run_windows(ctx, seconds))


__all__ = ["Window", "figures", "run", "run_window", "run_windows"]
