"""The crash matrix (reliability/crash_matrix.py) with two trials per workload: real
SIGKILLs of the shutdown demo's server and of scope.py at random moments, a restart on
the same Postgres database, then the recorded outputs, the ledger / step lines and the
results. Every assertion names the seed, so a failing trial's kill delays can be replayed
with ``python -m reliability --only crash --seed <seed>``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.db import query, step_outputs
from reliability import crash_matrix
from reliability.core import Context, Figure, broken, quick_context

# Servers, crashes or long runs: not in the fast tier (-m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture
def reliability_ctx(pg_server: str, tmp_path: Path) -> Iterator[Context]:
    with quick_context(pg_server, tmp_path) as ctx:
        yield ctx


def by_name(figures: list[Figure], name: str) -> Any:
    (found,) = [f for f in figures if f.name == name]
    return found.value


def test_fan_out_sigkilled_at_random_finishes_once_per_step_rerunning_only_steps_in_flight(
    reliability_ctx: Context,
) -> None:
    ctx = reliability_ctx
    seed = crash_matrix.seed_of(ctx)
    calibration = crash_matrix.calibrate_fan_out(ctx)
    # The control: without a kill every body runs once.
    assert calibration.correct and calibration.each_body_once, calibration
    trials = crash_matrix.fan_out_trials(ctx, ctx.trials, seed, calibration.seconds)
    assert len(trials) == 2

    for t in trials:
        where = f"seed {seed}, trial {t.index}, killed {t.delay:.2f}s in ({t.moment})"
        assert t.error is None, where
        assert t.finished and t.result_ok, where
        assert t.children_count == t.steps, where  # recovery enqueued no extra steps
        assert t.outputs_not_one == [] and t.duplicate_rows == 0, where
        # Every body ran, none more than twice; a body ran twice only if its step was
        # PENDING at the kill and had started before it.
        assert set(t.runs) == set(range(t.steps)) and max(t.runs.values()) <= 2, (where, t.runs)
        assert t.reexecuted <= t.in_flight, (where, t.reexecuted, t.in_flight)
        assert t.reexecuted <= set(t.ran_before_kill), where
        assert all(t.runs[i] == 1 for i in t.done_at_kill), where
        # The database, read here: the fan-out ended, each step has one fib_step output.
        status = query(
            t.db_url,
            "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s",
            t.workflow_id,
        )
        assert status == [("SUCCESS",)], where
        outputs = query(
            t.db_url,
            "SELECT count(*), count(DISTINCT workflow_uuid) FROM dbos.operation_outputs "
            "WHERE function_name = 'fib_step' AND workflow_uuid LIKE %s",
            t.workflow_id + "-%",
        )
        assert outputs == [(t.steps, t.steps)], where

    # The first trial was killed while big steps ran: the matrix really crashed mid
    # fan-out, and some of the running bodies ran again.
    first = trials[0]
    assert first.forced, seed
    assert first.moment in ("while enqueueing", "steps running"), (seed, first.moment)
    assert first.in_flight and first.reexecuted, (seed, first.in_flight, first.reexecuted)
    assert any(i >= first.max_n for i in first.reexecuted), (seed, first.reexecuted)

    figures = crash_matrix.fan_out_figures(calibration, trials, seed, calibration.seconds)
    assert broken(figures) == [], seed
    assert by_name(figures, "fan-out: results correct") == "2/2"
    reexecuted = sum(len(t.reexecuted) for t in trials)
    assert by_name(figures, "fan-out: step bodies re-executed (total)") == reexecuted > 0
    assert by_name(figures, "fan-out: re-executed bodies NOT in flight at the kill") == 0


def test_scope_py_sigkilled_at_random_resumes_its_workflow_rerunning_only_the_step_in_flight(
    reliability_ctx: Context,
) -> None:
    ctx = reliability_ctx
    seed = crash_matrix.seed_of(ctx)
    trials = crash_matrix.scope_trials(ctx, ctx.trials, seed)
    assert len(trials) == 2

    for t in trials:
        where = f"seed {seed}, trial {t.index}, kill after line {t.kill_after_line} ({t.moment})"
        steps = range(1, t.steps + 1)
        assert t.error is None, where
        assert t.finished and t.correct, (where, t.second_summary)
        # A sequential workflow has at most one step running; only that one runs twice.
        assert len(t.in_flight) <= 1, where
        assert t.reexecuted <= t.in_flight, (where, t.first_steps, t.second_steps)
        assert sorted(t.runs) == list(steps), where
        assert t.outputs_not_one == [] and t.duplicate_rows == 0, where
        assert step_outputs(t.db_url, t.workflow_id) == [(i, "A.step") for i in steps], where
        if t.moment != "after finish":
            s = t.second_summary
            assert s is not None and not t.first_summary, where
            assert (s["workflow_id"], s["recovered"]) == (t.workflow_id, True), where
            # The resumed run ran exactly the steps unrecorded at the kill, the one in
            # flight among them, on a new instance that counts only those.
            assert t.second_steps == [i for i in steps if i not in t.recorded_at_kill], where
            assert t.in_flight <= set(t.second_steps), where
            assert s["executed_here"] == s["instance_counter"] == len(t.second_steps), where

    # The first trial's kill landed mid-workflow: no summary, and the next run resumed it.
    first = trials[0]
    assert first.moment in ("in a step body", "between steps"), (seed, first.moment)
    assert not first.first_summary and first.resumed, seed
    assert first.kill_after_line - 1 <= len(first.recorded_at_kill) < first.steps, seed

    figures = crash_matrix.scope_figures(trials, seed)
    assert broken(figures) == [], seed
    assert by_name(figures, "scope.py: results correct") == "2/2"
    assert by_name(figures, "scope.py: re-executed bodies NOT in flight at the kill") == 0
