"""Executor slots: every live process of an app acts as its own DBOS executor id, and
no two live processes ever act as the same one.

DBOS recovers, at launch, the PENDING workflows whose ``executor_id`` is its own, so
processes sharing one id would re-run each other's in-flight work, and work of a
process that is gone for good would wait forever. Each process therefore holds a
LEASE on a numbered slot ``<prefix>-<n>``: a row of ``experiment6.executor_slots`` in
the system database whose ``expires_at`` is set by the database's own clock.

- ``claim``: the lowest slot whose lease has expired (or that never had one) is taken
  with one conditional upsert (``... ON CONFLICT DO UPDATE ... WHERE expires_at <
  clock_timestamp()``): of processes racing for a slot, exactly one gets its row back.
- Keeper thread: renews the lease every ``renew_every_sec`` (``expires_at =
  clock_timestamp() + lease``, only while the row is still ours) on its own
  connection, each attempt bounded on the client side too (a silent network can hang
  a socket read for minutes). It records the local monotonic time at which the last
  renewal that succeeded was SENT.
- Fence timer thread: when no renewal sent in the last ``fence_sec`` succeeded, or a
  renewal found the row taken, the process fences itself: it ends at once, all its
  threads and its pool with it, the way a crash does (``on_fence``). The database set
  ``expires_at`` >= (when that renewal was sent) + ``lease_sec``, and ``fence_sec`` <
  ``lease_sec``: the owner has stopped before any peer may take the slot over.
- Adopter thread (``start_adopting``): every ``adopt_every_sec``, slots whose lease
  expired and which still have PENDING workflows of this application version are
  taken (the same conditional upsert, so no process claims them meanwhile), their
  work re-enqueued with ``DBOS._recover_pending_workflows``, and let go. A live lease
  is never adopted.
- Claiming (never adopting) also takes a live-looking lease whose owner is known
  dead: on this very machine (same boot and pid namespace) its pid is gone or is
  another process now, or it is the previous image of a process re-executed after a
  fence. So a restarted process, or uvicorn's replacement of a dead worker, takes its
  predecessor's slot at once and recovers exactly its work at launch.

On SQLite there is one process, slot 0, enforced with a lock file (no leases).
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lab.config import app_name, database_kind, pg_connect_args
from lab.logs import fail

SCHEMA = "experiment6"
TABLE = f"{SCHEMA}.executor_slots"
# Each call on a slot connection (connect, one statement) gives up after this long on
# the client side; the server's statement_timeout is a little shorter.
CALL_TIMEOUT_SEC = 1.5
CONNECT_TIMEOUT_SEC = 2  # libpq's own bound for a connection attempt (whole seconds)
# How often the fence timer looks at the time of the last good renewal.
FENCE_CHECK_SEC = 0.2
# A rejoining process (a fenced one, re-executed; a uvicorn worker) tries this often
# to reach the database and claim a slot.
REJOIN_RETRY_SEC = 0.5
# Set by a fenced single process for its next image: "<slot>:<owner>", the slot it
# held and the owner it held it as (that owner is gone: the new image may take it).
REJOIN_ENV = "SLOT_REJOIN"

_CREATE = f"""
SELECT pg_advisory_xact_lock(hashtext('{TABLE}'));
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {TABLE} (
    app text NOT NULL,
    slot integer NOT NULL,
    owner uuid NOT NULL,
    pid integer NOT NULL,
    host text NOT NULL,
    pid_space text NOT NULL,
    pid_start bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (app, slot)
)"""
_ROWS = f"""
SELECT slot, owner::text, pid, pid_space, pid_start, expires_at < clock_timestamp()
FROM {TABLE} WHERE app = %(app)s"""
_TAKE = f"""
INSERT INTO {TABLE} AS s (app, slot, owner, pid, host, pid_space, pid_start, expires_at)
VALUES (%(app)s, %(slot)s, %(owner)s, %(pid)s, %(host)s, %(space)s, %(start)s,
        clock_timestamp() + %(lease)s * interval '1 second')
ON CONFLICT (app, slot) DO UPDATE SET owner = excluded.owner, pid = excluded.pid,
    host = excluded.host, pid_space = excluded.pid_space, pid_start = excluded.pid_start,
    expires_at = excluded.expires_at
WHERE s.expires_at < clock_timestamp() OR s.owner::text = ANY(%(dead)s::text[])
RETURNING slot"""
_RENEW = f"""
UPDATE {TABLE} SET expires_at = clock_timestamp() + %(lease)s * interval '1 second'
WHERE app = %(app)s AND slot = %(slot)s AND owner = %(owner)s RETURNING 1"""
_RELEASE = f"""
UPDATE {TABLE} SET expires_at = clock_timestamp()
WHERE app = %(app)s AND owner = %(owner)s AND (%(slot)s::integer IS NULL OR slot = %(slot)s)"""
_PENDING = """
SELECT executor_id, count(*) FROM dbos.workflow_status
WHERE status = 'PENDING' AND application_name = %(app)s AND application_version = %(version)s
  AND executor_id = ANY(%(ids)s::text[])
GROUP BY executor_id"""


def pid_space() -> str:
    """This machine's boot and this process's pid namespace: pids mean the same
    process only between two processes with the same value."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None when no live
    process has that pid (a zombie has ended: its threads and sockets are gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass(frozen=True)
class Lease:
    """One row of the slot table, as this process sees it."""

    slot: int
    owner: str
    pid: int
    pid_space: str
    pid_start: int
    expired: bool  # by the database's clock


class SlotConnection:
    """An autocommit Postgres connection whose every call is bounded on the client
    side: psycopg2's asynchronous mode, waited on with ``select``. A call that does
    not finish in time leaves the connection unusable; the caller opens a new one."""

    def __init__(self, url: str, app: str) -> None:
        import psycopg2

        args = pg_connect_args(
            url,
            connect_timeout=CONNECT_TIMEOUT_SEC,
            application_name=f"{app_name(app)}-slot",
            statement_timeout_ms=int(CALL_TIMEOUT_SEC * 1000) - 200,
        )
        self.conn = psycopg2.connect(**args, async_=1)
        self._wait()

    def _wait(self) -> None:
        import psycopg2.extensions as ext

        deadline = time.monotonic() + CALL_TIMEOUT_SEC
        while True:
            state = self.conn.poll()
            if state == ext.POLL_OK:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise TimeoutError(f"no answer from the database within {CALL_TIMEOUT_SEC} s")
            fd = self.conn.fileno()
            if state == ext.POLL_READ:
                select.select([fd], [], [], left)
            else:
                select.select([], [fd], [], left)

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        cur.execute(sql, params)
        self._wait()
        return cur.fetchall() if cur.description is not None else []

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - already broken
            pass


class ClaimStopped(Exception):
    """``stop_claiming`` was called while ``claim`` waited for a slot."""


class ExecutorSlots:
    """The slot protocol of one app: ``claim`` at startup (the lease is kept from then
    on), ``start_adopting`` once DBOS runs, ``release`` after ``DBOS.destroy``."""

    def __init__(
        self,
        app: str,
        *,
        max_slots: int,
        lease_sec: float,
        renew_every_sec: float,
        fence_sec: float,
        adopt_every_sec: float,
        on_fence: Callable[[int, bool], None],
        logger: logging.Logger | None = None,
    ) -> None:
        if not renew_every_sec < fence_sec < lease_sec:
            raise ValueError("need renew_every_sec < fence_sec < lease_sec")
        self.app = app  # executor ids are "<app>-<slot>"
        self.name = app_name(app)  # the table's key: one application, its slots
        self.max_slots = max_slots
        self.lease_sec = lease_sec
        self.renew_every_sec = renew_every_sec
        self.fence_sec = fence_sec
        self.adopt_every_sec = adopt_every_sec
        # on_fence(slot, stopping): end this process now; called at most once.
        self.on_fence = on_fence
        self.log = logger or logging.getLogger("shutdown.slots")
        self.owner = str(uuid.uuid4())  # this incarnation; a re-executed process gets a new one
        self.slot: int | None = None
        self._url = ""
        self._lock_file: Any = None  # SQLite: held open for the life of the process
        self._last_ok_sent = 0.0  # monotonic time the last successful renewal was sent
        self._stop = threading.Event()  # keeper and fence timer
        self._stop_adopting = threading.Event()
        self._stop_claim = threading.Event()  # a stop while waiting to claim
        self._stopping = False  # a graceful stop has begun: a fence exits, no rejoin
        self._fenced = threading.Lock()
        self._threads: list[threading.Thread] = []

    def executor_id(self, slot: int) -> str:
        return f"{self.app}-{slot}"

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {"app": self.name, "owner": self.owner, "lease": self.lease_sec, **extra}

    # --- claiming ---------------------------------------------------------------

    def rejoin_env(self) -> dict[str, str]:
        """For the next image of a fenced process: the slot and owner it had."""
        return {REJOIN_ENV: f"{self.slot}:{self.owner}"}

    def claim(self, url: str, *, wait: bool = False, rejoin: str | None = None) -> int:
        """Claim a slot and start keeping it: the lowest free one, or after a fence
        (``rejoin``: the previous image's ``REJOIN_ENV``) the one it held, if free.
        ``wait``: retry until the database answers and a slot is free (a rejoining
        process); otherwise exit with one line."""
        self._url = url
        prefer, previous = None, None
        if rejoin and rejoin.partition(":")[0].isdigit():
            prefer, previous = int(rejoin.partition(":")[0]), rejoin.partition(":")[2]
        waited = False
        if database_kind(url) == "sqlite":
            return self._claim_sqlite(url)
        while True:
            try:
                slot = self.try_claim(url, prefer, previous)
                problem = f"all {self.max_slots} executor slots of {self.name} are taken"
            except Exception as exc:  # noqa: BLE001 - unreachable, refused, timed out
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                slot, problem = None, f"cannot reach the system database: {first}"
            if slot is not None:
                break
            if not wait:
                fail(problem)
            if self._stop_claim.is_set():
                raise ClaimStopped(problem)
            if not waited:
                self.log.warning("waiting to claim an executor slot", extra={"reason": problem})
                waited = True
            time.sleep(REJOIN_RETRY_SEC)
        self.slot = slot
        self._start(self._keep, "slot-keeper")
        self._start(self._fence_timer, "slot-fence")
        return slot

    def _claim_sqlite(self, url: str) -> int:
        from sqlalchemy.engine import make_url

        holder = open(f"{make_url(url).database}-{self.app}.lock", "a")  # noqa: SIM115
        try:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(
                f"another process already serves {self.name} on this SQLite "
                "database; SQLite takes one process (use Postgres for several workers)"
            )
        self._lock_file = holder
        self.slot = 0
        return 0

    def try_claim(
        self, url: str, prefer: int | None = None, previous: str | None = None
    ) -> int | None:
        """One attempt (no keeping): the slot taken, or None when every slot is held.
        ``previous``: an owner known gone (this process's image before a fence)."""
        import psycopg2

        self._url = url
        try:
            conn = SlotConnection(self._url, self.app)
        except psycopg2.OperationalError as exc:
            if "does not exist" not in str(exc):
                raise
            from dbos import DBOS

            DBOS.migrate(self._url)  # creates the database, as DBOS.launch() would
            conn = SlotConnection(self._url, self.app)
        try:
            conn.rows(_CREATE)
            leases = {lease.slot: lease for lease in self.leases(conn)}
            dead = self.dead_owners(leases.values()) + ([previous] if previous else [])
            order = list(range(self.max_slots))
            if prefer is not None and 0 <= prefer < self.max_slots:
                order.remove(prefer)
                order.insert(0, prefer)
            for slot in order:
                lease = leases.get(slot)
                if lease is not None and not lease.expired and lease.owner not in dead:
                    continue
                sent = time.monotonic()
                if self._take(conn, slot, dead):
                    self._last_ok_sent = sent
                    return slot
            return None
        finally:
            conn.close()

    def leases(self, conn: SlotConnection) -> list[Lease]:
        return [Lease(*row) for row in conn.rows(_ROWS, self._params())]

    def dead_owners(self, leases: Any) -> list[str]:
        """Owners of live-looking leases known dead without waiting for expiry: same
        boot and pid namespace as this process, and their pid is gone or another
        process now (a crashed or fenced worker, a process killed and restarted)."""
        space = pid_space()
        return [
            lease.owner
            for lease in leases
            if lease.owner != self.owner
            and lease.pid_space == space
            and start_ticks(lease.pid) != lease.pid_start
        ]

    def _take(self, conn: SlotConnection, slot: int, dead: list[str]) -> bool:
        """The conditional upsert: True when this process now holds ``slot``."""
        params = self._params(
            slot=slot,
            pid=os.getpid(),
            host=socket.gethostname(),
            space=pid_space(),
            start=start_ticks(os.getpid()) or 0,
            dead=dead,
        )
        return bool(conn.rows(_TAKE, params))

    def _start(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # --- keeping ----------------------------------------------------------------

    def _keep(self) -> None:
        """Renew the lease every ``renew_every_sec``; fence at once if it is taken."""
        conn: SlotConnection | None = None
        while not self._stop.wait(self.renew_every_sec):
            try:
                if conn is None:
                    conn = SlotConnection(self._url, self.app)
                sent = time.monotonic()
                kept = conn.rows(_RENEW, self._params(slot=self.slot))
            except Exception:  # noqa: BLE001 - the fence timer decides; try again
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if not kept:
                self.fence("another process took the slot")
                return
            self._last_ok_sent = sent
        if conn is not None:
            conn.close()

    def _fence_timer(self) -> None:
        while not self._stop.wait(FENCE_CHECK_SEC):
            if time.monotonic() - self._last_ok_sent > self.fence_sec:
                self.fence(f"no lease renewal confirmed for {self.fence_sec} s")
                return

    def unconfirmed_sec(self) -> float:
        """Seconds since the last lease renewal that succeeded was sent (0 on SQLite,
        where there is no lease)."""
        if self._lock_file is not None:
            return 0.0
        return time.monotonic() - self._last_ok_sent

    def fence(self, reason: str) -> None:
        """Stop acting as this executor: log one line and end the process image."""
        if not self._fenced.acquire(blocking=False) or self.slot is None:
            return
        self.log.error(
            "executor slot lost: fencing",
            extra={
                "executor_id": self.executor_id(self.slot),
                "reason": reason,
                "since_renewal_sec": round(time.monotonic() - self._last_ok_sent, 3),
                "pid": os.getpid(),
            },
        )
        self.on_fence(self.slot, self._stopping)

    # --- adopting ---------------------------------------------------------------

    def start_adopting(self) -> None:
        """On Postgres, once DBOS has launched: adopt orphaned slots continuously."""
        if database_kind(self._url) == "postgres":
            self._start(self._adopt_loop, "slot-adopter")

    def _adopt_loop(self) -> None:
        conn: SlotConnection | None = None
        while not self._stop_adopting.wait(self.adopt_every_sec):
            try:
                if conn is None:
                    conn = SlotConnection(self._url, self.app)
                self.adopt_once(conn)
            except Exception as exc:  # noqa: BLE001 - the next period tries again
                if conn is not None:
                    conn.close()
                conn = None
                if not self._stop_adopting.is_set():
                    self.log.warning(
                        "could not adopt orphaned executor slots", extra={"error": str(exc)}
                    )
        if conn is not None:
            conn.close()

    def orphans(self, conn: SlotConnection, version: str) -> dict[int, int]:
        """slot -> PENDING workflows of this version, for slots whose lease has expired
        (or that never had one). A live lease is never adopted, even one whose owner
        is known dead: its own replacement (a restarted worker) claims it and
        recovers its work at launch, without racing an adopter for the slot."""
        leases = {lease.slot: lease for lease in self.leases(conn)}
        free = [
            s
            for s in range(self.max_slots)
            if s != self.slot and (s not in leases or leases[s].expired)
        ]
        ids = {self.executor_id(s): s for s in free}
        params = {"app": self.name, "version": version, "ids": list(ids)}
        return {ids[e]: n for e, n in conn.rows(_PENDING, params) if n}

    def adopt_once(self, conn: SlotConnection) -> int:
        """One adopter period; returns the number of slots adopted."""
        from dbos import DBOS

        version = DBOS.application_version
        orphans = self.orphans(conn, version)
        if not orphans:
            return 0
        adopted = 0
        for slot in sorted(orphans):
            if self._stop_adopting.is_set() or not self._take(conn, slot, []):
                continue  # claimed meanwhile: its new owner recovers its work
            orphan = self.executor_id(slot)
            try:
                # DBOS 3.4 has no public call to recover another executor's
                # workflows; this one re-enqueues the PENDING ones of the given ids.
                handles = DBOS._recover_pending_workflows([orphan])
                self.log.info(
                    "adopted orphaned executor slot",
                    extra={"orphan": orphan, "workflows": len(handles), "pid": os.getpid()},
                )
                adopted += 1
            finally:
                conn.rows(_RELEASE, self._params(slot=slot))
        return adopted

    # --- stopping ---------------------------------------------------------------

    def stop_claiming(self) -> None:
        """A stop while ``claim(wait=True)`` waits: it gives up (``ClaimStopped``)."""
        self._stopping = True
        self._stop_claim.set()

    def stop_adopting(self) -> None:
        """A graceful stop begins: adopt nothing more (wait for an adoption in progress)."""
        self._stopping = True
        self._stop_adopting.set()
        for thread in self._threads:
            if thread.name == "slot-adopter":
                thread.join(timeout=5)

    def release(self) -> None:
        """After ``DBOS.destroy``: stop keeping the lease and end it now, so that the
        slot can be claimed at once."""
        self._stopping = True
        self._stop_adopting.set()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_SEC * 2)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        if not self._url or database_kind(self._url) != "postgres":
            return
        try:
            conn = SlotConnection(self._url, self.app)
            try:
                conn.rows(_RELEASE, self._params(slot=None))
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - the lease then expires by itself
            self.log.warning("could not release the executor slot", extra={"error": str(exc)})
