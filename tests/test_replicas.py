"""Several replicas of the shutdown demo on one Postgres (issue 20): a replica lost for
good, cut off, frozen, or the database cut from all; the work is finished elsewhere and
no executor id is served twice.

Real parts throughout: two ``uvicorn fastapi_scope_shutdown:app`` processes in process
groups and PID namespaces of their own, each reaching Postgres through its own
``harness.faults.FaultProxy``; real SIGKILL, SIGSTOP and SIGCONT. Each case is one trial
of ``reliability.replicas.run_case`` (the reliability area's code), asserted from the
database (workflow_status, operation_outputs, the slot leases), the FIB_LEDGER and every
``/healthz`` answer. The deadlines inside are safety bounds; the takeover and resume
times are figures of ``python -m reliability --only replicas``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.apps import shutdown_app
from reliability import replicas
from reliability.replicas import CaseResult

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def assert_work_finished_once(r: CaseResult) -> None:
    """The fan-out finished right; every step output recorded once; only bodies in
    flight at the fault ran again; never two live processes healthy as one id."""
    assert r.error is None, r.error
    assert r.in_flight, "the fault must land while steps run"
    assert r.finished and r.result_ok, r
    assert r.lost == [], r.lost
    assert r.outputs_not_one == [] and r.duplicate_rows == 0, (r.outputs_not_one, r.duplicate_rows)
    assert r.reruns_not_in_flight == [], (r.runs, r.in_flight)
    assert r.double_served_sec == 0, r.double_served_sec


@pytest.mark.parametrize("case", ["crash", "silent loss", "worker crash"])
def test_a_lost_replica_or_worker_is_taken_over(case: str, pg_url: str, tmp_path: Path) -> None:
    r = replicas.run_case(case, pg_url, tmp_path)
    assert_work_finished_once(r)
    assert r.takeover_sec is not None
    if case != "worker crash":
        # Nothing restarted A: a peer adopted its slot. (A worker's replacement may
        # instead find its predecessor's slot free at once and recover it at launch.)
        assert r.adoptions >= 1
        # A peer waits out the lease: the lost owner must have fenced itself first.
        assert r.takeover_sec > shutdown_app.FENCE_SEC, r.takeover_sec


def test_a_partitioned_replica_fences_itself_and_rejoins_on_a_fresh_claim(
    pg_url: str, tmp_path: Path
) -> None:
    r = replicas.run_case("partition", pg_url, tmp_path)
    assert_work_finished_once(r)
    assert r.adoptions >= 1 and r.takeover_sec is not None
    # A stopped before B took its work: fence line, then adoption line.
    assert r.fence_lead_sec is not None and r.fence_lead_sec > 0, r.fence_lead_sec
    assert r.fresh_claim is True
    assert r.stale_healthy == 0
    # Nothing A had in flight was recorded by A's stale bodies after B took it over.
    assert r.stale_outputs == []


def test_a_frozen_replica_is_taken_over_and_fences_itself_on_waking(
    pg_url: str, tmp_path: Path
) -> None:
    # Takeover is right: while frozen, A is indistinguishable from a dead replica.
    r = replicas.run_case("freeze", pg_url, tmp_path)
    assert_work_finished_once(r)
    assert r.adoptions >= 1
    assert r.takeover_sec is not None and r.takeover_sec < replicas.FREEZE_SEC
    assert r.fences >= 1  # A, on waking: its lease had long expired
    assert r.fresh_claim is True
    assert r.stale_healthy == 0
    assert r.stale_outputs == []


def test_the_database_cut_from_every_replica_is_ridden_out_without_takeover(
    pg_url: str, tmp_path: Path
) -> None:
    r = replicas.run_case("cut from all", pg_url, tmp_path)
    assert_work_finished_once(r)
    assert r.adoptions == 0  # nobody could take over, nobody did after the heal
    assert r.healthy_while_cut == 0
    # Every replica answered 200 again after the heal (run_case waits, with a deadline,
    # for each one): none was left stopped. How fast is a figure.
    assert r.resume_sec is not None


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_busy_replica_is_not_taken_over(executor: str, pg_url: str, tmp_path: Path) -> None:
    b = replicas.run_busy(executor, pg_url, tmp_path)
    assert b.finished
    assert (b.adoptions, b.fences) == (0, 0)
