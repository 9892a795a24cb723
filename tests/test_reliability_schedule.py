"""The schedule area (reliability/schedule.py): fastapi_scope_shutdown.py with 2 and 3
worker processes on Postgres for 30 s each (at the same time, two databases). Every
5-second slot of the window runs exactly once: one SUCCESS row in dbos.workflow_status,
one "scheduled workflow" log line (one body execution), on one of the live workers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from reliability import schedule
from reliability.core import broken, quick_context

# Servers, crashes or long runs: not in the fast tier (-m "not slow").
pytestmark = pytest.mark.slow

WINDOW_SECONDS = 30  # six 5-second slots per worker count


@pytest.fixture(scope="module")
def windows(
    pg_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[schedule.Window]]:
    with quick_context(pg_server, tmp_path_factory.mktemp("schedule")) as ctx:
        yield schedule.run_windows(ctx, WINDOW_SECONDS, concurrent=True)


@pytest.mark.parametrize("index", [0, 1], ids=["2-workers", "3-workers"])
def test_every_slot_of_30_seconds_ran_exactly_once_on_a_live_worker(
    windows: list[schedule.Window], index: int
) -> None:
    w = windows[index]
    assert w.workers == schedule.WORKER_COUNTS[index]
    assert sorted(w.executors) == [f"shutdown-{i}" for i in range(w.workers)]
    assert w.workers_alive_at_end
    # The window covers 30 s: six slots, 5 s apart, after every worker was up.
    assert w.window_seconds >= WINDOW_SECONDS
    assert len(w.expected) == WINDOW_SECONDS // 5
    assert w.first_slot >= w.up_at + timedelta(seconds=schedule.STARTUP_MARGIN)
    assert all(s.second % 5 == 0 and s.microsecond == 0 for s in w.expected)
    # None missed, none doubled (log lines are body executions, rows are workflows).
    assert w.missed == []
    assert w.doubled == []
    assert w.run == w.expected
    for slot in w.expected:
        run = w.slots[slot]
        assert (run.rows, run.status, len(run.bodies)) == (1, "SUCCESS", 1), run
        executor, pid, actual = run.bodies[0]
        # The body ran on the worker the row names, one of the live workers.
        assert executor == run.executor_id
        assert w.executors[executor] == pid
        assert actual >= slot
    assert w.mismatched_executor == [] and w.foreign_bodies == []
    assert w.unparsable_lines == 0 and w.tracebacks == 0
    # SIGTERM to the supervisor: a clean stop (uvicorn re-raises it: -15, or 0).
    assert w.exit_code in (0, -15)


@pytest.mark.parametrize("index", [0, 1], ids=["2-workers", "3-workers"])
def test_the_database_holds_one_row_per_slot_under_the_slot_derived_id(
    windows: list[schedule.Window], index: int
) -> None:
    w = windows[index]
    rows = [r for r in w.rows if r[3] == schedule.WORKFLOW_NAME]
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids))
    assert all(i.startswith(schedule.ID_PREFIX) for i in ids)
    by_slot = {schedule.slot_of(i): (status, executor) for i, status, executor, _ in rows}
    for slot in w.expected:
        assert by_slot[slot][0] == "SUCCESS"
        assert by_slot[slot][1] in w.executors
    # Nothing but the schedule ran on this server.
    assert {r[3] for r in w.rows} == {schedule.WORKFLOW_NAME}


def test_figures_report_each_worker_count_with_no_broken_promise(
    windows: list[schedule.Window],
) -> None:
    figures = schedule.figures(windows)
    assert broken(figures) == []
    names = {f.name: f for f in figures}
    for w in windows:
        tag = f"{w.workers} workers"
        assert names[f"{tag}: slots run / expected"].value == f"{len(w.expected)} / 6"
        assert names[f"{tag}: doubled slots"].value == 0
        assert names[f"{tag}: missed slots"].value == 0
        spread = names[f"{tag}: slots per executor"].value
        assert sum(spread.values()) == 6 and set(spread) <= set(w.executors)
