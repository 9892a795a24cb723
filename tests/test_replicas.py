"""Several replicas of the shutdown demo on one Postgres: a replica lost for
good, cut off, frozen, or the database cut from all; the work is finished elsewhere and
no executor id is served twice.

Real parts throughout: ``uvicorn fastapi_scope_shutdown:app`` processes in process groups
and PID namespaces of their own, each reaching Postgres through its own
``harness.faults.FaultProxy``; real SIGKILL, SIGSTOP and SIGCONT. Each case is one trial
of ``reliability.replicas.run_case`` (the reliability area's code), asserted from the
database (workflow_status, operation_outputs, the slot leases), the FIB_LEDGER and every
``/healthz`` answer. The deadlines inside are safety bounds; the takeover and resume
times are figures of ``python -m reliability --only replicas``.

One pair of replicas goes through the cases in file order (starting two replicas costs
more than a case): those that leave A alive first; a lost A is replaced by a new replica
before the next case (``Replicas.ready``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import fastapi_scope_shutdown
from harness.db import ScratchDatabases, assert_no_secret_in_databases
from harness.env import no_secret_leaks
from harness.replicas import Replicas
from reliability import replicas
from reliability.replicas import CaseResult

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def pair(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("replicas")
    scratch = ScratchDatabases(pg_server, prefix="t", directory=workdir)
    try:
        with no_secret_leaks(workdir) as watch:
            url = scratch.postgres("replicas")
            with replicas.replicas(url, workdir) as group:
                yield group
            assert_no_secret_in_databases(watch.secrets, url)
    finally:
        assert not scratch.close()


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


def test_the_database_cut_from_every_replica_is_ridden_out_without_takeover(
    pair: Replicas,
) -> None:
    r = replicas.run_case("cut from all", pair)
    assert_work_finished_once(r)
    assert r.adoptions == 0  # nobody could take over, nobody did after the heal
    assert r.healthy_while_cut == 0
    # Every replica answered 200 again after the heal (run_case waits, with a deadline,
    # for each one): none was left stopped. How fast is a figure.
    assert r.resume_sec is not None
    assert all(m.server.running for m in pair.members)


def test_a_partitioned_replica_fences_itself_and_rejoins_on_a_fresh_claim(
    pair: Replicas,
) -> None:
    r = replicas.run_case("partition", pair)
    assert_work_finished_once(r)
    assert r.adoptions >= 1 and r.takeover_sec is not None
    # A stopped before B took its work: fence line, then adoption line.
    assert r.fence_lead_sec is not None and r.fence_lead_sec > 0, r.fence_lead_sec
    assert r.fresh_claim is True
    assert r.stale_healthy == 0
    # Nothing A had in flight was recorded by A's stale bodies after B took it over.
    assert r.stale_outputs == []


def test_a_frozen_replica_is_taken_over_and_fences_itself_on_waking(pair: Replicas) -> None:
    # Takeover is right: while frozen, A is indistinguishable from a dead replica.
    r = replicas.run_case("freeze", pair)
    assert_work_finished_once(r)
    assert r.adoptions >= 1
    assert r.takeover_sec is not None and r.takeover_sec < replicas.FREEZE_SEC
    assert r.fences >= 1  # A, on waking: its lease had long expired
    assert r.fresh_claim is True
    assert r.stale_healthy == 0
    assert r.stale_outputs == []


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_busy_replica_is_not_taken_over(executor: str, pair: Replicas) -> None:
    b = replicas.run_busy(executor, pair)
    assert b.finished
    assert (b.adoptions, b.fences) == (0, 0)


@pytest.mark.parametrize("case", ["crash", "silent loss"])
def test_a_lost_replica_is_taken_over(case: str, pair: Replicas) -> None:
    r = replicas.run_case(case, pair)
    assert_work_finished_once(r)
    # Nothing restarted A: a peer adopted its slot, after waiting out the lease (the
    # lost owner must have fenced itself first, had it lived).
    assert r.adoptions >= 1
    assert r.takeover_sec is not None
    if pair.own_namespaces:  # else a peer on this host sees A's pid gone, and need not wait
        assert r.takeover_sec > fastapi_scope_shutdown.FENCE_SEC, r.takeover_sec


def test_a_lost_worker_of_a_replica_is_taken_over(pg_url: str, tmp_path: Path) -> None:
    with replicas.replicas(pg_url, tmp_path, workers=replicas.WORKERS) as group:
        r = replicas.run_case("worker crash", group)
    assert_work_finished_once(r)
    # Its replacement (uvicorn restarts it) or a peer took the worker's work over.
    assert r.takeover_sec is not None
