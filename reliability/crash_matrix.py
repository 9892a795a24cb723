"""Crash matrix: SIGKILL at random moments, restart, and check what DBOS promised.

What it measures
    Two workloads on Postgres, each crashed ``ctx.trials`` times (a fresh database per
    trial) with a real SIGKILL at a random moment and then started again:

    fan-out   ``uvicorn fastapi_scope_shutdown:app`` (one process, as in the Docker
              image). ``POST /trigger_async?steps=60&max_n=28`` starts ``fan_out``, which
              enqueues 60 ``fib_step`` workflows on a 50-way queue. Each step body appends
              one line to a ledger file (``FIB_LEDGER``) outside DBOS, so we count how
              often each body really ran. After ``delay`` seconds the process group gets
              SIGKILL; we read from the database which steps were ``PENDING`` (in flight:
              dequeued, not finished) and ``SUCCESS`` at that moment, start a new server
              on the same database, wait for the fan-out to end and check its result, the
              recorded outputs and the ledger.
    scope.py  ``python scope.py --steps 10 --step-seconds 0.3``: one sequential workflow,
              each step body logs a ``"step"`` line and sleeps. It gets SIGKILL after the
              ``k``-th step line plus a random fraction of a step; then scope.py runs
              again (same flags, same database) and resumes the interrupted workflow
              (``lab.launch.launch_and_resume``; the flags only matter for a fresh run). The
              two runs' step lines say which bodies ran where; ``operation_outputs`` at
              the kill says which steps were recorded.

Kill moments
    fan-out: ``delay`` is uniform in ``[0, D]``, D being the duration of a clean run of
    the same fan-out measured first (trigger to SUCCESS). The first trial instead waits
    until 3 of the big step bodies (``fib(max_n)``) have started, then kills after a random
    extra 0-0.25 s: so every matrix has at least one kill with steps surely in flight.
    The fan-out runs in the demo's default mode (``executor=process``): step threads
    wait on the service's process pool, so the fan-out's enqueueing loop is not starved
    (with ``executor=thread``, 50 step threads sharing one GIL starved it for seconds).
    scope.py: ``k`` is uniform in ``1..steps`` (``1..steps-1`` for the first trial),
    the extra delay uniform within one step.
    Trial ``i`` draws from ``random.Random(seed + i)``, the seed being the run's
    (``python -m reliability --seed N``, ``ctx.seed``) and shown in the figures' notes.
    The same seed gives the same kill delays, not the same machine timing.

Figures (``area = crash``; the same set for both workloads, prefixed ``fan-out:`` and
``scope.py:``)
    trials                        info: how many, the workload, the seed, the kill window.
    kill moments                  info: fan-out: while enqueueing (not all steps enqueued) /
                                  steps running (all enqueued, some not finished) / steps
                                  done, fan-out not yet (every step finished, the fan-out
                                  had not collected them) /
                                  after finish; scope.py: in a step body (a step had logged,
                                  its output was not recorded) / between steps / after finish.
    trials with steps in flight at the kill
                                  info: fan-out: some step PENDING; scope.py: in a step body.
    finished after restart        promise "all": the workflow ended SUCCESS (a trial killed
                                  after it had finished counts as finished).
    results correct               promise "all": fan-out: the result equals the Fibonacci
                                  list, every step body ran at least once and there is
                                  exactly one child per step; scope.py: the resumed run
                                  has the same workflow id, ``recovered=true``, ran exactly
                                  the steps not recorded at the kill, and its
                                  ``instance_counter`` equals the bodies it ran (the new
                                  instance counts only those, see scope.py's docstring).
    step outputs recorded more than once
                                  promise "0": rows of ``operation_outputs`` sharing
                                  ``(workflow_uuid, function_id)``, plus steps whose output
                                  was recorded zero or several times.
    step bodies re-executed       info: bodies that ran more than once (ledger / step lines).
    re-executed bodies in flight at the kill
                                  promise "all": DBOS re-runs only a step that was running
                                  when the process died. The converse does not hold: a
                                  PENDING step whose thread had not reached the body yet
                                  (dequeued, not yet dispatched) runs once.
    re-executed bodies NOT in flight at the kill
                                  promise "0": a body that ran twice although its output
                                  was recorded (or it had not started) at the kill.
    fan-out clean run             promise "yes": the calibration run (no kill) ran each body
                                  once and returned the right result.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness import REPO
from harness.clients import ShutdownClient
from harness.db import duplicate_outputs, query, workflow_status
from harness.env import script_env
from harness.fanout import children, fan_out_result, ledger_runs, shutdown_server
from harness.proc import read_json_lines, wait_for
from harness.server import AppServer
from reliability.core import Context, Figure, info, progress, promise

AREA = "crash"

# fan-out: 60 steps, 32 of them fib(28) (~0.15 s of CPU each): about 5 s in one process
# on an idle machine, so most random moments fall while steps run (the queue's first
# dequeue comes about 1 s after the trigger).
FAN_STEPS, FAN_MAX_N = 60, 28
# The first trial is killed once this many fib(max_n) step bodies have started.
FORCED_RUNNING = 3
# scope.py: 10 steps of 0.3 s, ~3 s of steps per run.
SCOPE_STEPS, SCOPE_STEP_SECONDS = 10, 0.3
TOKEN = "crash-matrix-token-5f3a9b"  # the shutdown endpoint is armed but never used
FINISH_TIMEOUT = 180  # generous: the machine may be loaded

MOMENTS_FAN = ("while enqueueing", "steps running", "steps done, fan-out not yet", "after finish")
MOMENTS_SCOPE = ("in a step body", "between steps", "after finish")


class _BodyRuns(Protocol):
    @property
    def runs(self) -> Counter[int]: ...
    @property
    def in_flight(self) -> set[int]: ...


class _Reexecution:
    """What both workloads' trials derive from how often each step body ran (``runs``)
    and which bodies were in flight at the kill (``in_flight``)."""

    @property
    def reexecuted(self: _BodyRuns) -> set[int]:
        return {i for i, n in self.runs.items() if n > 1}

    @property
    def reexecuted_not_in_flight(self: _BodyRuns) -> set[int]:
        return {i for i, n in self.runs.items() if n > 1} - self.in_flight


# --- the fan-out ---------------------------------------------------------------


@dataclass
class FanOutTrial(_Reexecution):
    """One crashed fan-out: what was in the database at the kill, what came after."""

    index: int
    seed: int
    steps: int
    max_n: int
    db_url: str
    forced: bool  # killed once steps were surely running (the first trial)
    planned_delay: float = 0.0
    delay: float = 0.0  # seconds from the trigger's answer to the SIGKILL
    workflow_id: str = ""
    moment: str = ""
    parent_status_at_kill: str | None = None
    enqueued_at_kill: int = 0
    in_flight: set[int] = field(default_factory=set)  # PENDING children at the kill
    done_at_kill: set[int] = field(default_factory=set)  # SUCCESS children at the kill
    ran_before_kill: Counter[int] = field(default_factory=Counter)
    runs: Counter[int] = field(default_factory=Counter)  # ledger at the end
    finished: bool = False
    result_ok: bool = False
    children_count: int = 0
    outputs_not_one: list[int] = field(default_factory=list)  # steps without 1 output
    duplicate_rows: int = 0
    error: str | None = None

    @property
    def never_ran(self) -> set[int]:
        return set(range(self.steps)) - set(self.runs)

    @property
    def correct(self) -> bool:
        return (
            self.finished
            and self.result_ok
            and not self.never_ran
            and self.children_count == self.steps
        )


def _fan_server(db_url: str, scratch: Path, name: str) -> AppServer:
    log, ledger = scratch / f"{name}.log", scratch / "ledger.txt"
    return shutdown_server(db_url, log, token=TOKEN, ledger=ledger)


def _trigger(server: AppServer, steps: int, max_n: int) -> str:
    return ShutdownClient(server.client).trigger(steps, max_n)


def _wait_success(db_url: str, workflow_id: str, timeout: float) -> None:
    wait_for(
        lambda: workflow_status(db_url, workflow_id) == "SUCCESS",
        timeout,
        0.05,
        f"fan-out {workflow_id} to finish",
    )


def _result(server: AppServer, workflow_id: str) -> Any:
    return ShutdownClient(server.client).view(workflow_id).get("result")


@dataclass
class Calibration:
    seconds: float  # trigger answered -> SUCCESS seen in the database
    correct: bool
    each_body_once: bool


def calibrate_fan_out(ctx: Context, steps: int = FAN_STEPS, max_n: int = FAN_MAX_N) -> Calibration:
    """A clean run of the fan-out (no kill): how long it takes, and the control case."""
    db_url = ctx.fresh_db("crash_calibration")
    scratch = ctx.scratch("crash-calibration")
    with _fan_server(db_url, scratch, "server") as server:
        workflow_id = _trigger(server, steps, max_n)
        started = time.monotonic()
        _wait_success(db_url, workflow_id, FINISH_TIMEOUT)
        seconds = time.monotonic() - started
        result = _result(server, workflow_id)
    runs = ledger_runs(scratch / "ledger.txt", workflow_id)
    return Calibration(
        seconds=seconds,
        correct=result == fan_out_result(steps, max_n),
        each_body_once=runs == Counter(range(steps)),
    )


def _trial_start(
    ctx: Context, workload: str, index: int, seed: int
) -> tuple[random.Random, str, Path]:
    """A crash trial's random draws (``Random(seed)``), fresh database and scratch folder."""
    return (
        random.Random(seed),
        ctx.fresh_db(f"crash_{workload}_{index}"),
        ctx.scratch(f"crash-{workload}-{index}"),
    )


def fan_out_trial(
    ctx: Context,
    index: int,
    seed: int,
    window: float,
    forced: bool = False,
    steps: int = FAN_STEPS,
    max_n: int = FAN_MAX_N,
) -> FanOutTrial:
    """Trigger the fan-out, SIGKILL the server at a random moment, restart, check."""
    rng, db_url, scratch = _trial_start(ctx, "fan", index, seed)
    trial = FanOutTrial(index, seed, steps, max_n, db_url, forced)
    _kill_fan_out(trial, rng, window, scratch)
    _fan_out_at_kill(trial, scratch / "ledger.txt")
    _restart_fan_out(trial, scratch)
    return trial


def _kill_fan_out(trial: FanOutTrial, rng: random.Random, window: float, scratch: Path) -> None:
    """Start a server, trigger the fan-out and SIGKILL the server at the trial's moment."""
    ledger = scratch / "ledger.txt"
    first = _fan_server(trial.db_url, scratch, "first")
    try:
        first.start(ready_timeout=90)
        trial.workflow_id = workflow_id = _trigger(first, trial.steps, trial.max_n)
        triggered = time.monotonic()
        if trial.forced:
            # Some big step bodies started (the ledger: handed to the process pool), then a
            # short random extra delay: the pool computes them a few at a time, so they are
            # still running.
            # (A PENDING status alone is not enough: on a loaded machine a dequeued step's
            # thread can take seconds to reach the body.)
            max_n = trial.max_n
            wait_for(
                lambda: sum(i >= max_n for i in ledger_runs(ledger, workflow_id)) >= FORCED_RUNNING,
                90,
                0.02,
                "big fan-out step bodies to start",
            )
            trial.planned_delay = rng.uniform(0, 0.25)
            time.sleep(trial.planned_delay)
        else:
            trial.planned_delay = rng.uniform(0, window)
            time.sleep(max(0.0, trial.planned_delay - (time.monotonic() - triggered)))
        first.kill()
        trial.delay = time.monotonic() - triggered
    finally:
        first.close()


def _fan_out_at_kill(trial: FanOutTrial, ledger: Path) -> None:
    """What the killed process had committed (all there is), and the moment it names."""
    db_url, workflow_id = trial.db_url, trial.workflow_id
    at_kill = children(db_url, workflow_id)
    trial.parent_status_at_kill = workflow_status(db_url, workflow_id)
    trial.enqueued_at_kill = len(at_kill)
    trial.in_flight = {i for i, c in at_kill.items() if c["status"] == "PENDING"}
    trial.done_at_kill = {i for i, c in at_kill.items() if c["status"] == "SUCCESS"}
    trial.ran_before_kill = ledger_runs(ledger, workflow_id)
    if trial.parent_status_at_kill == "SUCCESS":
        trial.moment = "after finish"
    elif trial.enqueued_at_kill < trial.steps:
        trial.moment = "while enqueueing"
    elif len(trial.done_at_kill) < trial.steps:
        trial.moment = "steps running"
    else:
        # Every step finished, the fan-out had not collected their results yet.
        trial.moment = "steps done, fan-out not yet"


def _restart_fan_out(trial: FanOutTrial, scratch: Path) -> None:
    """A new server on the same database: wait for the fan-out to end, then read its
    result, its children, the recorded outputs and the ledger."""
    db_url, workflow_id = trial.db_url, trial.workflow_id
    second = _fan_server(db_url, scratch, "second")
    try:
        second.start(ready_timeout=90)
        _wait_success(db_url, workflow_id, FINISH_TIMEOUT)
        trial.finished = True
        trial.result_ok = _result(second, workflow_id) == fan_out_result(trial.steps, trial.max_n)
    except Exception as exc:  # noqa: BLE001 - a failed restart is a finding, not a crash
        trial.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        second.close()

    after = children(db_url, workflow_id)
    trial.children_count = len(after)
    trial.outputs_not_one = sorted(i for i, c in after.items() if c["outputs"] != 1)
    trial.duplicate_rows = duplicate_outputs(db_url)
    trial.runs = ledger_runs(scratch / "ledger.txt", workflow_id)


def fan_out_trials(
    ctx: Context, trials: int, seed: int, window: float, force_first: bool = True
) -> list[FanOutTrial]:
    done = []
    for i in range(trials):
        trial = fan_out_trial(ctx, i, seed + i, window, forced=force_first and i == 0)
        progress(
            f"crash fan-out trial {i + 1}/{trials}: killed {trial.delay:.2f}s after the trigger "
            f"({trial.moment}, {len(trial.in_flight)} in flight), re-executed "
            f"{sorted(trial.reexecuted)}, finished={trial.finished} correct={trial.correct}"
        )
        done.append(trial)
    return done


# --- scope.py ----------------------------------------------------------------


def _records(path: Path) -> list[dict[str, Any]]:
    """JSON lines of a script's stdout; a line cut by the SIGKILL is skipped."""
    return read_json_lines(path.read_text(errors="replace") if path.exists() else "")[0]


def _step_lines(records: list[dict[str, Any]]) -> list[int]:
    return [int(r["step"]) for r in records if r.get("message") == "step"]


def _summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in records if r.get("message") == "summary"), None)


def scope_outputs(db_url: str, workflow_id: str) -> Counter[int]:
    """Recorded ``A.step`` outputs by function id (= step number)."""
    rows = query(
        db_url,
        "SELECT function_id FROM dbos.operation_outputs "
        "WHERE workflow_uuid = %s AND function_name = 'A.step'",
        workflow_id,
    )
    return Counter(int(r[0]) for r in rows)


@dataclass
class ScopeTrial(_Reexecution):
    """One crashed scope.py run and the run that resumed it."""

    index: int
    seed: int
    steps: int
    step_seconds: float
    db_url: str
    kill_after_line: int = 0
    extra_delay: float = 0.0
    workflow_id: str = ""
    moment: str = ""
    first_summary: bool = False  # the killed run printed its summary (it had finished)
    first_steps: list[int] = field(default_factory=list)  # step lines of the killed run
    recorded_at_kill: set[int] = field(default_factory=set)
    status_at_kill: str | None = None
    second_returncode: int | None = None
    second_summary: dict[str, Any] | None = None
    second_steps: list[int] = field(default_factory=list)
    final_status: str | None = None
    outputs: Counter[int] = field(default_factory=Counter)  # after the second run
    duplicate_rows: int = 0
    error: str | None = None

    @property
    def in_flight(self) -> set[int]:
        """Step bodies that had started (logged) but whose output was not recorded."""
        return set(self.first_steps) - self.recorded_at_kill

    @property
    def runs(self) -> Counter[int]:
        return Counter(self.first_steps) + Counter(self.second_steps)

    @property
    def outputs_not_one(self) -> list[int]:
        return [i for i in range(1, self.steps + 1) if self.outputs[i] != 1]

    @property
    def finished(self) -> bool:
        return self.final_status == "SUCCESS"

    @property
    def resumed(self) -> bool:
        """The second run picked up the killed workflow (``recovered=true``, same id)."""
        s = self.second_summary
        return bool(s and s["recovered"] is True and s["workflow_id"] == self.workflow_id)

    @property
    def correct(self) -> bool:
        if self.moment == "after finish":
            # Nothing to resume: the killed run had run every body once (its summary may
            # be missing: it is printed after DBOS.destroy).
            return self.finished and self.first_steps == list(range(1, self.steps + 1))
        s = self.second_summary
        missing = [i for i in range(1, self.steps + 1) if i not in self.recorded_at_kill]
        return bool(
            self.finished
            and self.resumed
            and s is not None
            and self.second_steps == missing
            and s["steps"] == self.steps
            and s["executed_here"] == len(missing)
            # A new instance of A counts only the bodies this process ran.
            and s["instance_counter"] == len(missing)
            and s["class_counter"] == 0
        )


def _scope_command(trial: ScopeTrial) -> list[str]:
    """scope.py with the trial's flags (both runs of a trial use the same)."""
    flags = ["--steps", str(trial.steps), "--step-seconds", str(trial.step_seconds)]
    return [sys.executable, str(REPO / "scope.py"), *flags]


def scope_trial(
    ctx: Context,
    index: int,
    seed: int,
    forced: bool = False,
    steps: int = SCOPE_STEPS,
    step_seconds: float = SCOPE_STEP_SECONDS,
) -> ScopeTrial:
    """Run scope.py, SIGKILL it after a random step line, run it again, check."""
    rng, db_url, scratch = _trial_start(ctx, "scope", index, seed)
    trial = ScopeTrial(index, seed, steps, step_seconds, db_url)
    # The first trial never waits for the last step line: its kill lands mid-workflow.
    trial.kill_after_line = rng.randint(1, steps - 1 if forced else steps)
    trial.extra_delay = rng.uniform(0, step_seconds)
    env = script_env(db_url)
    _kill_scope(trial, env, scratch)
    _scope_at_kill(trial, scratch / "first.out")
    if trial.moment != "after finish":
        _resume_scope(trial, env, scratch)
    trial.final_status = workflow_status(db_url, trial.workflow_id)
    trial.outputs = scope_outputs(db_url, trial.workflow_id)
    trial.duplicate_rows = duplicate_outputs(db_url)
    return trial


def _kill_scope(trial: ScopeTrial, env: dict[str, str], scratch: Path) -> None:
    """Run scope.py until its ``kill_after_line``-th step line, wait the extra delay,
    SIGKILL its process group."""
    out1 = scratch / "first.out"
    with open(out1, "wb") as stdout, open(scratch / "first.err", "wb") as stderr:
        proc = subprocess.Popen(
            _scope_command(trial),
            env=env,
            cwd=REPO,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:

        def reached() -> bool:
            if len(_step_lines(_records(out1))) >= trial.kill_after_line:
                return True
            if proc.poll() is not None:
                raise AssertionError(
                    f"scope.py exited {proc.returncode} before step line "
                    f"{trial.kill_after_line}:\n{(scratch / 'first.err').read_text()[-2000:]}"
                )
            return False

        wait_for(reached, 90, 0.01, f"step line {trial.kill_after_line} of scope.py")
        time.sleep(trial.extra_delay)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _scope_at_kill(trial: ScopeTrial, out1: Path) -> None:
    """The killed run's step lines and what the database had recorded at the kill."""
    records = _records(out1)
    trial.first_steps = _step_lines(records)
    trial.first_summary = _summary(records) is not None
    trial.workflow_id = next(r["workflow_id"] for r in records if r.get("message") == "step")
    trial.status_at_kill = workflow_status(trial.db_url, trial.workflow_id)
    trial.recorded_at_kill = set(scope_outputs(trial.db_url, trial.workflow_id))
    if trial.status_at_kill == "SUCCESS":
        trial.moment = "after finish"
    elif trial.in_flight:
        trial.moment = "in a step body"
    else:
        trial.moment = "between steps"


def _resume_scope(trial: ScopeTrial, env: dict[str, str], scratch: Path) -> None:
    """Run scope.py again with the same flags: ignored when it resumes, a fresh run only
    if there is nothing to resume (which would be a finding)."""
    try:
        command = _scope_command(trial)
        second = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        (scratch / "second.out").write_text(second.stdout)
        trial.second_returncode = second.returncode
        records2 = read_json_lines(second.stdout)[0]
        trial.second_summary = _summary(records2)
        trial.second_steps = _step_lines(records2)
        if second.returncode != 0:
            trial.error = f"second run exited {second.returncode}: {second.stderr[-300:]}"
    except subprocess.TimeoutExpired as exc:
        trial.error = f"second run timed out: {exc}"


def scope_trials(
    ctx: Context, trials: int, seed: int, force_first: bool = True
) -> list[ScopeTrial]:
    done = []
    for i in range(trials):
        trial = scope_trial(ctx, i, seed + i, forced=force_first and i == 0)
        progress(
            f"crash scope.py trial {i + 1}/{trials}: killed after step line "
            f"{trial.kill_after_line} + {trial.extra_delay:.2f}s ({trial.moment}, in flight "
            f"{sorted(trial.in_flight)}), re-executed {sorted(trial.reexecuted)}, "
            f"finished={trial.finished} correct={trial.correct}"
        )
        done.append(trial)
    return done


# --- figures -------------------------------------------------------------------


def _common_figures(prefix: str, trials: list[Any], moments: tuple[str, ...]) -> list[Figure]:
    """The figures both workloads share (trials have ``moment``, ``finished``,
    ``correct``, ``duplicate_rows``, ``outputs_not_one``, ``in_flight``, ``runs``)."""
    n = len(trials)
    counts = Counter(t.moment for t in trials)
    finished = sum(t.finished for t in trials)
    correct = sum(t.correct for t in trials)
    duplicates = sum(t.duplicate_rows + len(t.outputs_not_one) for t in trials)
    reexecuted = sum(len(t.reexecuted) for t in trials)
    in_flight_hits = sum(len(t.reexecuted & t.in_flight) for t in trials)
    # (trial, step) of each body that ran again although it was not in flight.
    broken = sorted((t.index, i) for t in trials for i in t.reexecuted_not_in_flight)
    errors = [f"trial {t.index}: {t.error}" for t in trials if t.error]
    return [
        info(
            AREA,
            f"{prefix}: kill moments ({' / '.join(moments)})",
            " / ".join(str(counts[m]) for m in moments),
        ),
        info(
            AREA,
            f"{prefix}: trials with steps in flight at the kill",
            sum(bool(t.in_flight) for t in trials),
        ),
        promise(
            AREA,
            f"{prefix}: workflows finished after restart",
            f"{finished}/{n}",
            finished == n,
            "all",
            "; ".join(errors)[:300],
        ),
        promise(AREA, f"{prefix}: results correct", f"{correct}/{n}", correct == n, "all"),
        promise(
            AREA,
            f"{prefix}: step outputs recorded more than once (or never)",
            duplicates,
            duplicates == 0,
            "0",
            "operation_outputs has PRIMARY KEY (workflow_uuid, function_id)",
        ),
        info(AREA, f"{prefix}: step bodies re-executed (total)", reexecuted),
        promise(
            AREA,
            f"{prefix}: re-executed bodies in flight at the kill",
            f"{in_flight_hits}/{reexecuted}",
            in_flight_hits == reexecuted,
            "all",
        ),
        promise(
            AREA,
            f"{prefix}: re-executed bodies NOT in flight at the kill",
            len(broken),
            not broken,
            "0",
            f"(trial, step): {broken}" if broken else "",
        ),
    ]


def fan_out_figures(
    calibration: Calibration, trials: list[FanOutTrial], seed: int, window: float
) -> list[Figure]:
    delays = sorted(round(t.delay, 2) for t in trials)
    return [
        promise(
            AREA,
            "fan-out: clean run (no kill) each body once, result correct",
            "yes" if calibration.each_body_once and calibration.correct else "no",
            calibration.each_body_once and calibration.correct,
            "yes",
            f"{calibration.seconds:.1f} s trigger to SUCCESS (the kill window)",
        ),
        info(
            AREA,
            f"fan-out: trials (steps={FAN_STEPS}, max_n={FAN_MAX_N})",
            len(trials),
            f"seed {seed} (trial i: Random(seed+i)); kill delay uniform in [0, {window:.1f}] s, "
            f"trial 0 once big steps run; delays {delays}",
        ),
        *_common_figures("fan-out", trials, MOMENTS_FAN),
    ]


def scope_figures(trials: list[ScopeTrial], seed: int) -> list[Figure]:
    killed_mid = [t for t in trials if t.moment != "after finish"]
    resumed = sum(t.resumed for t in killed_mid)
    return [
        info(
            AREA,
            f"scope.py: trials (--steps {SCOPE_STEPS} --step-seconds {SCOPE_STEP_SECONDS})",
            len(trials),
            f"seed {seed} (trial i: Random(seed+i)); kills after step lines "
            f"{[t.kill_after_line for t in trials]}",
        ),
        promise(
            AREA,
            "scope.py: killed runs resumed (same workflow_id, recovered=true)",
            f"{resumed}/{len(killed_mid)}",
            resumed == len(killed_mid),
            "all",
        ),
        *_common_figures("scope.py", trials, MOMENTS_SCOPE),
    ]


def seed_of(ctx: Context) -> int:
    """The run's seed, or a fresh one when the context has none (the tests)."""
    return ctx.seed if ctx.seed is not None else random.SystemRandom().randrange(2**31)


def run(ctx: Context) -> list[Figure]:
    seed = seed_of(ctx)
    progress(f"crash: calibrating the fan-out (seed {seed})")
    calibration = calibrate_fan_out(ctx)
    window = calibration.seconds
    fan = fan_out_trials(ctx, ctx.trials, seed, window)
    ctx.close()  # drop the fan-out databases before the next batch
    scope = scope_trials(ctx, ctx.trials, seed)
    return fan_out_figures(calibration, fan, seed, window) + scope_figures(scope, seed)
