"""The load area (reliability/load.py): two bursts of 500 concurrent POST /trigger_async
against uvicorn fastapi_scope:app on Postgres. Every request is answered 202 (the app
does not shed load), every accepted workflow ends SUCCESS exactly once (rows, step
outputs, results and the process's step counter agree), and the second burst does not
raise the server's memory peak much.

Overload (reliability/overload.py): the shutdown demo with MAX_QUEUED_STEPS receives ten
times that in fan-outs at once: it admits up to the bound, refuses the rest with 429 and
Retry-After, finishes what it admitted, keeps /healthz responsive and admits again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import fastapi_scope_shutdown
from reliability import load, overload
from reliability.core import broken, quick_context

BURST = 500  # a burst far above the queue limit (50)


@pytest.fixture(scope="module")
def loaded(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[load.LoadRun]:
    with quick_context(pg_server, tmp_path_factory.mktemp("load")) as ctx:
        yield load.run_load(ctx, [BURST, BURST])


@pytest.mark.slow
def test_every_request_of_both_bursts_is_answered_202_with_a_distinct_workflow_id(
    loaded: load.LoadRun,
) -> None:
    for burst in loaded.bursts:
        assert burst.statuses == {"202": BURST}
        assert burst.wrong == [] and burst.unanswered == 0
        assert burst.started == BURST  # the server's own count of triggers
    assert len(loaded.accepted) == 2 * BURST
    assert loaded.duplicate_ids == 0


@pytest.mark.slow
def test_every_accepted_workflow_is_success_and_none_ran_twice(loaded: load.LoadRun) -> None:
    # Exactly one A.run row per accepted id, no other (nothing started without an answer).
    assert sorted(loaded.rows) == sorted(loaded.accepted)
    assert set(loaded.rows.values()) == {"SUCCESS"}
    assert loaded.lost == [] and loaded.unacknowledged == []
    # Each workflow recorded step outputs 1..3 once and counted 3 step bodies.
    assert loaded.bad_outputs == [] and loaded.bad_results == []
    # The process ran one body per recorded step, one workflow per request.
    assert loaded.counters["triggers"] == 2 * BURST
    assert loaded.counters["step_bodies_run"] == 2 * BURST * load.STEPS
    assert loaded.run_twice == 0
    assert loaded.tracebacks == 0


@pytest.mark.slow
def test_a_second_burst_of_the_same_size_barely_raises_the_memory_peak(
    loaded: load.LoadRun,
) -> None:
    first, second = loaded.bursts
    assert 0 < loaded.rss_start_kib <= first.rss_max_kib <= first.hwm_after_kib
    assert second.hwm_after_kib >= first.hwm_after_kib  # VmHWM never falls
    growth = load.second_burst_growth_kib(loaded)
    assert growth is not None and growth <= load.SECOND_BURST_GROWTH_LIMIT_MIB * 1024


@pytest.mark.slow
def test_figures_keep_every_promise(loaded: load.LoadRun) -> None:
    figures = load.figures(loaded)
    assert broken(figures) == []
    names = {f.name for f in figures}
    assert {
        "burst 500: answers",
        "burst 500 #2: answers",
        "accepted workflows SUCCESS",
        "workflows or steps run twice",
        "server RSS peak growth from burst 500 #2",
    } <= names


def test_the_checks_catch_a_wrong_answer_and_a_body_run_twice() -> None:
    """The detectors themselves: a 503 without Retry-After, a 500 and a missing answer are
    wrong answers; one step body more than the rows explain is a run twice."""
    assert load.Answer(503, retry_after="1").correct
    assert not load.Answer(503).correct
    assert not load.Answer(500).correct
    assert not load.Answer(None, error=load.NO_ANSWER).correct
    burst = load.Burst(
        size=2,
        promised=True,
        answers=[load.Answer(202, "a"), load.Answer(202, "b")],
        elapsed=1.0,
        rss_before_kib=1,
        rss_max_kib=1,
        threads_max=1,
        hwm_after_kib=1,
    )
    run = load.LoadRun(steps=3, bursts=[burst], rss_start_kib=1)
    run.rows = {"a": "SUCCESS", "b": "SUCCESS"}
    run.counters = {"step_bodies_run": 6, "triggers": 2}
    assert run.run_twice == 0 and run.lost == []
    run.counters["step_bodies_run"] = 7
    assert run.run_twice == 1
    run.counters["step_bodies_run"] = 6
    run.rows["c"] = "SUCCESS"  # a row no answer and no unanswered request explains
    assert run.run_twice == 1
    run.rows = {"a": "SUCCESS", "b": "PENDING"}
    assert run.lost == ["b"]


# --- overload: the shutdown demo's admission control ---------------------------------


@pytest.fixture(scope="module")
def overloaded(
    pg_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[overload.OverloadRun]:
    with quick_context(pg_server, tmp_path_factory.mktemp("overload")) as ctx:
        yield overload.run_overload(ctx, overload.QUICK_BOUND)


@pytest.mark.slow
def test_a_burst_of_ten_times_the_bound_is_admitted_up_to_it_and_refused_beyond(
    overloaded: overload.OverloadRun,
) -> None:
    requests = overload.FACTOR * overload.QUICK_BOUND // overload.STEPS
    assert len(overloaded.replies) == requests
    assert [r for r in overloaded.replies if not r.correct] == []
    accepted, refused = len(overloaded.ids(202)), requests - len(overloaded.ids(202))
    # All at once against an empty service: the bound's worth, give or take the steps
    # that finished while the burst was still arriving; most are refused.
    assert overloaded.bound // overload.STEPS <= accepted < requests // 2
    assert refused == sum(1 for r in overloaded.replies if r.status == 429)
    assert 0 < overloaded.backlog_peak <= overloaded.bound


@pytest.mark.slow
def test_everything_admitted_finishes_nothing_refused_starts_and_it_admits_again(
    overloaded: overload.OverloadRun,
) -> None:
    assert overloaded.lost == [] and overloaded.unrequested == []
    assert sorted(overloaded.complete) == sorted(overloaded.accepted)
    assert overloaded.drain_seconds is not None
    assert overloaded.reaccepted == 202
    assert overloaded.health_errors == 0  # every /healthz probe of the burst answered
    # The p95 ratio is a speed figure: `python -m reliability --only load` measures it;
    # on a shared test machine it says more about the other jobs than the service.
    figures = overload.figures(overloaded)
    speed = "/healthz p95 during the burst"
    assert [f for f in broken(figures) if not f.name.endswith(speed)] == []


def test_the_overload_checks_catch_a_5xx_a_bare_429_and_an_unfinished_fan_out() -> None:
    ok = overload.Reply("k", 202, fastapi_scope_shutdown.KEYED_ID_PREFIX + "k")
    assert ok.correct and overload.Reply("k", 429, retry_after="3").correct
    assert not overload.Reply("k", 429).correct  # no Retry-After
    assert not overload.Reply("k", 500).correct and not overload.Reply("k", None).correct
    assert not overload.Reply("k", 202, "other-id").correct
    run = overload.OverloadRun(bound=100, replies=[ok], backlog_peak=101)
    run.rows = {ok.workflow_id or "": "SUCCESS", "stray": "SUCCESS"}
    run.steps_ok = {ok.workflow_id or "": overload.STEPS - 1}
    assert run.complete == [] and run.unrequested == ["stray"]
    failed = {f.name.split(": ", 1)[1] for f in overload.figures(run) if f.ok is False}
    assert {"backlog peak", "accepted fan-outs finished, every step"} <= failed
    assert "fan-outs started for a refused request" in failed
