"""The executor-slot lease protocol (shutdown/slots.py), in this process, on a real Postgres.

Each ``ExecutorSlots`` here stands for one process: its own owner uuid, its own
keeper and fence timer. (They share this test's pid, which a lease records: a pid
alone never marks a lease dead while its process lives.) Expiry is always decided by
the database's clock: rows are put in the past or the future with ``clock_timestamp()``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import psycopg2
import pytest

from harness.db import admin, libpq_url, query
from harness.proc import wait_for
from lab.config import app_name
from shutdown.slots import TABLE, ExecutorSlots, SlotConnection, pid_space, start_ticks

APP = "slottest"
NAME = app_name(APP)
# Short, so the tests are: the same ordering as the demo's (renew < fence < lease).
RENEW, FENCE, LEASE = 0.2, 1.0, 2.0


class Process:
    """One claimant: ``ExecutorSlots`` whose fence is recorded instead of ending us."""

    def __init__(self, url: str, max_slots: int = 4) -> None:
        self.url = url
        self.fences: list[tuple[int, bool]] = []
        self.slots = ExecutorSlots(
            APP,
            max_slots=max_slots,
            lease_sec=LEASE,
            renew_every_sec=RENEW,
            fence_sec=FENCE,
            adopt_every_sec=1.0,
            on_fence=lambda slot, stopping: self.fences.append((slot, stopping)),
        )


@pytest.fixture
def procs(pg_url: str) -> Iterator[list[Process]]:
    made: list[Process] = []
    yield made
    for p in made:
        p.slots.release()


def new(procs: list[Process], url: str, max_slots: int = 4) -> Process:
    procs.append(Process(url, max_slots))
    return procs[-1]


def execute(url: str, sql: str, *params: object) -> None:
    """A write, committed (``harness.db.query`` only reads)."""
    with admin(url) as cur:
        cur.execute(sql, params)


def lease_rows(url: str) -> dict[int, tuple[str, bool]]:
    """slot -> (owner, expired by the database's clock)."""
    rows = query(
        url,
        f"SELECT slot, owner::text, expires_at < clock_timestamp() FROM {TABLE} WHERE app = %s",
        NAME,
    )
    return {slot: (owner, expired) for slot, owner, expired in rows}


def put_lease(
    url: str, slot: int, *, seconds: float, pid: int, space: str, start: int, owner: str = ""
) -> str:
    """A lease held by someone else, expiring ``seconds`` from now on the database's clock
    (negative: expired)."""
    owner = owner or str(uuid.uuid4())
    execute(
        url,
        f"INSERT INTO {TABLE} VALUES (%s, %s, %s, %s, 'elsewhere', %s, %s, "
        "clock_timestamp() + %s * interval '1 second') ON CONFLICT (app, slot) DO UPDATE SET "
        "owner = excluded.owner, pid = excluded.pid, pid_space = excluded.pid_space, "
        "pid_start = excluded.pid_start, expires_at = excluded.expires_at",
        NAME,
        slot,
        owner,
        pid,
        space,
        start,
        seconds,
    )
    return owner


def foreign(url: str, slot: int, seconds: float) -> str:
    """A live-looking lease of a process on another machine (another pid space)."""
    return put_lease(url, slot, seconds=seconds, pid=1, space="another-host/1", start=1)


def test_claims_the_lowest_free_slot_and_a_release_frees_it_at_once(
    pg_url: str, procs: list[Process]
) -> None:
    a, b = new(procs, pg_url), new(procs, pg_url)
    assert a.slots.claim(pg_url) == 0
    assert b.slots.claim(pg_url) == 1
    rows = lease_rows(pg_url)
    assert rows == {0: (a.slots.owner, False), 1: (b.slots.owner, False)}
    a.slots.release()
    assert lease_rows(pg_url)[0] == (a.slots.owner, True)  # expired now, by the database
    c = new(procs, pg_url)
    assert c.slots.claim(pg_url) == 0
    assert a.fences == b.fences == c.fences == []


def test_a_live_lease_is_kept_past_its_length_and_never_claimed(
    pg_url: str, procs: list[Process]
) -> None:
    a = new(procs, pg_url, max_slots=1)
    assert a.slots.claim(pg_url) == 0
    # Longer than a lease: only the keeper's renewals keep it live.
    deadline = time.monotonic() + LEASE * 2
    b = new(procs, pg_url, max_slots=1)
    while time.monotonic() < deadline:
        assert b.slots.try_claim(pg_url) is None
        time.sleep(0.1)
    assert lease_rows(pg_url) == {0: (a.slots.owner, False)}
    assert a.fences == []


def test_an_expired_lease_is_claimable_by_the_database_clock(
    pg_url: str, procs: list[Process]
) -> None:
    b = new(procs, pg_url, max_slots=1)
    b.slots.try_claim(pg_url)  # creates the table
    b.slots.release()
    held = foreign(pg_url, 0, seconds=1.5)
    c = new(procs, pg_url, max_slots=1)
    assert c.slots.try_claim(pg_url) is None
    assert lease_rows(pg_url) == {0: (held, False)}
    # Claimable as soon as the database's clock passes expires_at, not before.
    wait_for(lambda: lease_rows(pg_url)[0][1], 10, 0.05, "the lease to expire")
    assert c.slots.try_claim(pg_url) == 0
    assert lease_rows(pg_url)[0][0] == c.slots.owner


def test_orphans_are_slots_with_pending_work_and_no_live_lease(
    pg_url: str, procs: list[Process]
) -> None:
    from dbos import DBOS

    DBOS.migrate(pg_url)
    a, b = new(procs, pg_url), new(procs, pg_url)
    assert a.slots.claim(pg_url) == 0
    assert b.slots.claim(pg_url) == 1
    foreign(pg_url, 2, seconds=-1)  # expired: its holder stopped renewing
    foreign(pg_url, 3, seconds=60)  # live, on another machine
    # PENDING work on every slot, and one row of another version (not ours to recover).
    for n, executor in enumerate(["slottest-0", "slottest-2", "slottest-2", "slottest-3"]):
        execute(
            pg_url,
            "INSERT INTO dbos.workflow_status (workflow_uuid, status, executor_id, "
            "application_name, application_version) VALUES (%s, 'PENDING', %s, %s, 'v1')",
            f"wf-{n}",
            executor,
            NAME,
        )
    execute(
        pg_url,
        "INSERT INTO dbos.workflow_status (workflow_uuid, status, executor_id, "
        "application_name, application_version) VALUES ('old', 'PENDING', 'slottest-2', %s, 'v0')",
        NAME,
    )
    conn = SlotConnection(pg_url, APP)
    try:
        # B sees: its own slot 1 (not an orphan), A's live slot 0, the live foreign 3: none
        # adoptable; the expired 2 with two PENDING workflows of this version is.
        assert b.slots.orphans(conn, "v1") == {2: 2}
        # And with no lease row at all (a slot whose row never existed): adoptable.
        execute(pg_url, f"DELETE FROM {TABLE} WHERE slot = 2")
        assert b.slots.orphans(conn, "v1") == {2: 2}
    finally:
        conn.close()
    assert a.fences == b.fences == []


def test_a_renewal_that_finds_the_row_taken_fences_at_once(
    pg_url: str, procs: list[Process], caplog: pytest.LogCaptureFixture
) -> None:
    a = new(procs, pg_url)
    assert a.slots.claim(pg_url) == 0
    caplog.set_level(logging.ERROR, logger="shutdown.slots")
    taken = time.monotonic()
    execute(pg_url, f"UPDATE {TABLE} SET owner = %s WHERE app = %s", str(uuid.uuid4()), NAME)
    wait_for(lambda: a.fences, 5, 0.02, "the owner to fence")
    # At the next renewal (every RENEW s), not at the fence timer's deadline.
    assert time.monotonic() - taken < FENCE
    assert a.fences == [(0, False)]
    [line] = [r for r in caplog.records if r.getMessage() == "executor slot lost: fencing"]
    assert line.__dict__["reason"] == "another process took the slot"
    assert line.__dict__["executor_id"] == "slottest-0"


def test_an_owner_that_cannot_confirm_its_lease_fences_before_it_expires(
    pg_url: str, procs: list[Process], caplog: pytest.LogCaptureFixture
) -> None:
    """A database that does not answer the keeper (here: the row locked by another
    transaction, so every renewal waits until its statement timeout): the fence timer
    fences after FENCE s without a confirmed renewal, while the lease is still live."""
    margins: list[float] = []
    a = new(procs, pg_url)

    def on_fence(slot: int, stopping: bool) -> None:
        # The lease's time left by the database's clock, at the fence.
        rows = query(
            pg_url,
            f"SELECT extract(epoch FROM expires_at - clock_timestamp()) FROM {TABLE} "
            "WHERE app = %s AND slot = %s",
            NAME,
            slot,
        )
        margins.append(float(rows[0][0]))
        a.fences.append((slot, stopping))

    a.slots.on_fence = on_fence
    assert a.slots.claim(pg_url) == 0
    caplog.set_level(logging.ERROR, logger="shutdown.slots")
    blocker = psycopg2.connect(libpq_url(pg_url))
    try:
        with blocker.cursor() as cur:  # a transaction holds the row until rollback
            cur.execute(f"SELECT 1 FROM {TABLE} WHERE app = %s FOR UPDATE", (NAME,))
            wait_for(lambda: a.fences, FENCE + 5, 0.02, "the owner to fence")
    finally:
        blocker.rollback()
        blocker.close()
    assert a.fences == [(0, False)]
    assert margins[0] > 0, f"fenced {-margins[0]:.3f} s after the lease expired"
    [line] = [r for r in caplog.records if r.getMessage() == "executor slot lost: fencing"]
    assert line.__dict__["reason"].startswith("no lease renewal confirmed")
    assert FENCE <= line.__dict__["since_renewal_sec"] < LEASE


def test_a_dead_owner_on_this_machine_is_taken_over_at_once_a_live_one_never(
    pg_url: str, procs: list[Process]
) -> None:
    b = new(procs, pg_url, max_slots=1)
    b.slots.try_claim(pg_url)
    b.slots.release()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = start_ticks(child.pid)
        assert start is not None
        # A live process of this machine holds slot 0: its lease is respected.
        put_lease(pg_url, 0, seconds=60, pid=child.pid, space=pid_space(), start=start)
        c = new(procs, pg_url, max_slots=1)
        assert c.slots.try_claim(pg_url) is None
        # The same pid in another pid space (another container or host): respected too.
        execute(pg_url, f"UPDATE {TABLE} SET pid_space = 'another-host/1'")
        child.kill()
        child.wait()
        assert c.slots.try_claim(pg_url) is None
        # Back in this pid space, the process gone: dead, taken over at once.
        execute(pg_url, f"UPDATE {TABLE} SET pid_space = %s", pid_space())
        assert lease_rows(pg_url)[0][1] is False  # the lease itself is still live
        assert c.slots.try_claim(pg_url) == 0
    finally:
        child.kill()
        child.wait()


def test_a_rejoining_process_takes_back_the_slot_its_previous_image_held(
    pg_url: str, procs: list[Process]
) -> None:
    b = new(procs, pg_url, max_slots=3)
    b.slots.try_claim(pg_url)
    b.slots.release()
    before = foreign(pg_url, 1, seconds=60)  # live-looking: the image that fenced
    other = new(procs, pg_url, max_slots=3)
    # Someone else's marker does not free the slot: the lowest free one instead.
    assert other.slots.claim(pg_url, rejoin=f"1:{uuid.uuid4()}") == 0
    again = new(procs, pg_url, max_slots=3)
    assert again.slots.claim(pg_url, rejoin=f"1:{before}") == 1
    assert lease_rows(pg_url)[1] == (again.slots.owner, False)
    assert again.slots.rejoin_env() == {"SLOT_REJOIN": f"1:{again.slots.owner}"}
