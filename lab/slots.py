"""Executor slots: every live process of an app gets its own DBOS executor id.

DBOS recovers, at launch, the PENDING workflows whose ``executor_id`` is its own, so
processes sharing one id would re-run each other's in-flight work. Each process
claims the lowest free slot ``<prefix>-<n>``: a Postgres session-level advisory lock
held on a dedicated connection for the life of the process (so a pooler in
transaction mode must not sit in between). When a process dies, Postgres drops its
connection and the lock with it; a restarted process takes the slot of the one that
stopped and recovers exactly its work. A watchdog takes the lock again after a
database restart, and slots nobody claims are adopted (their pending work
recovered). On SQLite there is one process, slot 0, enforced with a lock file.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from lab.config import app_name, database_kind, pg_connect_args
from lab.logs import fail


class ExecutorSlots:
    """The slot protocol of one app: ``claim`` at startup, ``watch`` once DBOS runs,
    ``release`` after ``DBOS.destroy``."""

    def __init__(
        self,
        app: str,
        *,
        max_slots: int,
        adopt_after_sec: float,
        check_every_sec: float,
        on_lost: Callable[[], None],
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app  # executor ids are "<app>-<slot>"
        self.max_slots = max_slots
        # A slot nobody has claimed this long after this process started is orphaned.
        self.adopt_after_sec = adopt_after_sec
        self.check_every_sec = check_every_sec
        self.on_lost = on_lost  # called when another process took our slot
        self.log = logger or logging.getLogger("lab.slots")
        # The lock holder (a Postgres connection or an open lock file) must live as
        # long as the process: closing it releases the slot.
        self._holder: Any = None
        self._url = ""
        self._stop = threading.Event()
        self._adopter: threading.Thread | None = None

    def executor_id(self, slot: int) -> str:
        return f"{self.app}-{slot}"

    def _key(self, slot: int) -> int:
        """A 64-bit advisory lock key for (application, slot)."""
        digest = hashlib.sha256(f"experiment6.executor-slot.{app_name(self.app)}.{slot}".encode())
        return int.from_bytes(digest.digest()[:8], "big", signed=True)

    def _connect(self) -> Any:
        import psycopg2

        conn = psycopg2.connect(
            **pg_connect_args(self._url, application_name=f"{app_name(self.app)}-slot")
        )
        conn.autocommit = True  # session-level locks, no idle transaction
        return conn

    def _try_lock(self, conn: Any, slot: int) -> bool:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (self._key(slot),))
            return bool(cur.fetchone()[0])

    def _unlock(self, conn: Any, slot: int) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (self._key(slot),))

    def claim(self, url: str) -> int:
        """Claim the lowest free slot for this process, or exit with one line."""
        self._url = url
        if database_kind(url) == "sqlite":
            from sqlalchemy.engine import make_url

            holder = open(f"{make_url(url).database}-{self.app}.lock", "a")  # noqa: SIM115
            try:
                fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fail(
                    f"another process already serves {app_name(self.app)} on this SQLite "
                    "database; SQLite takes one process (use Postgres for several workers)"
                )
            self._holder = holder
            return 0
        import psycopg2
        from dbos import DBOS

        try:
            conn = self._connect()
        except psycopg2.OperationalError as exc:
            if "does not exist" not in str(exc):
                fail(f"cannot reach the system database: {str(exc).strip().splitlines()[0]}")
            DBOS.migrate(url)  # creates the database, as DBOS.launch() would
            conn = self._connect()
        for slot in range(self.max_slots):
            if self._try_lock(conn, slot):
                self._holder = conn
                return slot
        conn.close()
        fail(f"all {self.max_slots} executor slots of {app_name(self.app)} are taken")

    def watch(self, slot: int) -> None:
        """On Postgres: start the watchdog (``keep``) and the orphan adopter (``adopt``)."""
        if database_kind(self._url) != "postgres":
            return
        self._adopter = threading.Thread(target=self.adopt, args=(slot,), daemon=True)
        self._adopter.start()
        threading.Thread(target=self.keep, args=(slot,), daemon=True).start()

    def stop_watching(self) -> None:
        """Stop both; wait for an adoption in progress (the watchdog stops at its next check)."""
        self._stop.set()
        if self._adopter is not None:
            self._adopter.join(timeout=5)

    def release(self) -> None:
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    def keep(self, slot: int) -> None:
        """Take the slot's lock again when a database restart ended its session.

        The lock lives as long as its Postgres session, and a restart (or an outage)
        of the server ends every session: without this, the slot would be free while
        this process still runs as its executor, and a process starting next would
        claim it and recover this one's in-flight workflows. Checked every
        ``check_every_sec``; once the server is back the lock is taken again on a new
        connection. Should another process have claimed the slot first, this one
        stops (``on_lost``): two live processes must never share an executor id.
        """
        while not self._stop.wait(self.check_every_sec):
            try:
                with self._holder.cursor() as cur:
                    cur.execute("SELECT 1")
                continue
            except Exception:  # noqa: BLE001 - the session is gone, and the lock with it
                pass
            try:
                conn = self._connect()
            except Exception:  # noqa: BLE001 - still down: try again at the next check
                continue
            context = {"executor_id": self.executor_id(slot), "pid": os.getpid()}
            if not self._try_lock(conn, slot):
                conn.close()
                self.log.error(
                    "executor slot taken by another process after a database restart: stopping",
                    extra=context,
                )
                self.on_lost()
                return
            old, self._holder = self._holder, conn
            try:
                old.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self.log.warning(
                "executor slot lock taken again after a database restart", extra=context
            )

    def adopt(self, my_slot: int) -> None:
        """After ``adopt_after_sec``, recover the pending work of slots no live process
        holds.

        Holding the orphan's lock while re-enqueueing keeps a process that starts
        meanwhile from claiming that slot (it takes another), so no workflow is
        recovered twice. DBOS's recovery re-enqueues a PENDING workflow only while its
        executor id is still the dead one, so running this twice is harmless too.
        """
        from dbos import DBOS

        if self._stop.wait(self.adopt_after_sec):
            return
        conn = self._holder
        others = [self.executor_id(s) for s in range(self.max_slots) if s != my_slot]
        try:
            pending = DBOS.list_workflows(
                status="PENDING",
                executor_id=others,
                app_version=DBOS.application_version,
                load_input=False,
                load_output=False,
            )
            for orphan in sorted({w.executor_id for w in pending if w.executor_id}):
                slot = int(orphan.rsplit("-", 1)[1])
                if self._stop.is_set() or not self._try_lock(conn, slot):
                    continue  # a live process holds it and recovered its own work
                try:
                    # DBOS 3.4 has no public call to recover another executor's
                    # workflows; this one re-enqueues the PENDING ones of the given ids.
                    handles = DBOS._recover_pending_workflows([orphan])
                    self.log.info(
                        "adopted orphaned executor slot",
                        extra={"orphan": orphan, "workflows": len(handles)},
                    )
                finally:
                    self._unlock(conn, slot)
        except Exception as exc:  # noqa: BLE001 - a later start tries again
            if not self._stop.is_set():
                self.log.warning(
                    "could not adopt orphaned executor slots", extra={"error": str(exc)}
                )
