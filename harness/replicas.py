"""Several replicas of the shutdown demo on one Postgres, each behind its own fault proxy.

    with Replicas(db_url, workdir, count=2) as group:
        a, b = group.members
        workflow_id = a.trigger(steps=60, max_n=30)
        a.proxy.blackhole(); a.kill()          # a host that lost power
        group.wait_adopted(a.executor_id, ...)

A replica is ``uvicorn fastapi_scope_shutdown:app`` (the Docker image's command) or,
with ``workers``, ``python fastapi_scope_shutdown.py`` with WORKERS processes; its own
port, its own process group, and ``DBOS_SYSTEM_DATABASE_URL`` pointing at its own
``harness.faults.FaultProxy``. The harness itself reads the database directly.

Each replica runs in a PID namespace of its own (``unshare --pid``, as root; skipped
otherwise), as a replica on another host or in its own container would: a pid in one
means nothing in another, so a peer can learn that a replica is gone only from the
database (its lease), never from the process table. Within a replica (``WORKERS=2``)
the workers share one namespace, as they would share a host.

``HealthLog`` polls every replica's ``/healthz`` on a thread per replica and keeps
every answer, to tell when two live processes answered healthy as one executor id.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from harness.clients import ShutdownClient
from harness.db import duplicate_outputs, query
from harness.fanout import MODULE, shutdown_server
from harness.faults import FaultProxy
from harness.proc import free_port, read_json_lines, wait_for
from harness.server import AppServer

# Every state wait has a deadline; these are safety bounds, not figures.
START_TIMEOUT = 120
HEALTH_POLL_SEC = 0.25
HEALTH_TIMEOUT_SEC = 2.0


def pid_namespaces_available() -> bool:
    """``unshare --pid`` needs root (CAP_SYS_ADMIN) and util-linux's unshare."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def _own_namespace(server: AppServer) -> None:
    """Run the server's command as the first process of a new PID namespace (with its
    own /proc, so pids read there are its own). ``--kill-child``: the namespace ends
    with the ``unshare`` process the harness holds (killpg, SIGKILL)."""
    command = server.command or [
        sys.executable, "-m", "uvicorn", server.target,
        "--host", "127.0.0.1", "--port", str(server.port),
    ]  # fmt: skip
    server.command = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *command]


@dataclass
class Replica:
    name: str
    proxy: FaultProxy
    server: AppServer
    executor_id: str = ""  # the one it first answered /healthz with

    @property
    def client(self) -> ShutdownClient:
        return ShutdownClient(self.server.client)

    @property
    def pgid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def trigger(self, steps: int, max_n: int, executor: str | None = None) -> str:
        return self.client.trigger(steps, max_n, timeout=60, executor=executor)

    def health(self, timeout: float = HEALTH_TIMEOUT_SEC) -> tuple[int, dict[str, Any]] | None:
        """(status, body) of ``GET /healthz``, or None when nothing answered."""
        try:
            answer = self.server.client.get("/healthz", timeout=timeout)
        except httpx.HTTPError:
            return None
        try:
            body = answer.json()
        except ValueError:
            body = {}
        return answer.status_code, body if isinstance(body, dict) else {}

    def wait_healthy(self, timeout: float) -> dict[str, Any]:
        """/healthz's 200 body (the process must keep running)."""

        def healthy() -> dict[str, Any] | None:
            if not self.server.running:
                raise AssertionError(f"{self.name} exited:\n{self.server.log_tail(40)}")
            answer = self.health()
            return answer[1] if answer and answer[0] == 200 else None

        body: dict[str, Any] = wait_for(healthy, timeout, 0.2, f"{self.name} to be healthy")
        return body

    def kill(self) -> None:
        """SIGKILL to the whole process group: nothing runs on the way out."""
        self.server.kill()

    def processes(self) -> dict[int, int]:
        """pid as the replica sees it (its own namespace, its log lines) -> pid here, for
        every process of its group."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getpgid(int(entry)) != self.pgid:
                    continue
                with open(f"/proc/{entry}/status") as f:
                    nspids = next(line for line in f if line.startswith("NSpid:")).split()[1:]
            except (OSError, StopIteration):
                continue
            found[int(nspids[-1])] = int(entry)
        return found

    def kill_worker(self, executor_id: str) -> int:
        """SIGKILL the one process that claimed ``executor_id`` (a uvicorn worker, when
        the replica runs WORKERS processes); its pid here."""
        claimed = [
            r["pid"]
            for r in self.messages("executor slot claimed")
            if r["executor_id"] == executor_id
        ]
        assert claimed, f"{self.name} has no process that claimed {executor_id}"
        pid = self.processes()[claimed[-1]]
        os.kill(pid, signal.SIGKILL)
        return pid

    def freeze(self) -> None:
        os.killpg(self.pgid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.pgid, signal.SIGCONT)

    def records(self) -> list[dict[str, Any]]:
        return read_json_lines(self.server.log_text())[0]

    def messages(self, message: str, since: float | None = None) -> list[dict[str, Any]]:
        """Log lines with this message (logged at or after ``since``, monotonic)."""
        lines = [r for r in self.records() if r.get("message") == message]
        if since is not None:
            lines = [r for r in lines if logged_at(r) >= since]
        return lines


def logged_at(record: dict[str, Any]) -> float:
    """A log line's wall-clock timestamp on this process's monotonic clock (one machine)."""
    return datetime.fromisoformat(record["timestamp"]).timestamp() - (
        time.time() - time.monotonic()
    )


@dataclass
class Answer:
    replica: str
    sent: float  # monotonic
    received: float
    status: int | None  # None: no answer within the timeout
    executor_id: str | None
    pid: int | None


class HealthLog:
    """Every ``/healthz`` answer of every replica while it runs (a thread per replica,
    so a frozen one cannot hold the others up)."""

    def __init__(self, replicas: list[Replica], interval: float = HEALTH_POLL_SEC) -> None:
        self.replicas = replicas
        self.interval = interval
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, args=(r,), daemon=True) for r in replicas
        ]

    def start(self) -> HealthLog:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HEALTH_TIMEOUT_SEC * 3)

    def _poll(self, replica: Replica) -> None:
        with httpx.Client(base_url=replica.server.base_url) as http:
            while not self._stop.is_set():
                sent = time.monotonic()
                status, body = None, {}
                try:
                    answer = http.get("/healthz", timeout=HEALTH_TIMEOUT_SEC)
                    status, body = answer.status_code, answer.json()
                except (httpx.HTTPError, ValueError):
                    pass
                received = time.monotonic()
                self.answers.append(
                    Answer(
                        replica.name, sent, received, status, body.get("executor_id"),
                        body.get("pid"),
                    )
                )  # fmt: skip
                self._stop.wait(max(0.0, self.interval - (received - sent)))

    def healthy(
        self, replica: str, since: float = 0.0, until: float = float("inf")
    ) -> list[Answer]:
        """200 answers of ``replica`` to requests sent in [since, until]."""
        return [
            a
            for a in self.answers
            if a.replica == replica and a.status == 200 and since <= a.sent <= until
        ]

    def spans(self) -> dict[tuple[str, str], list[tuple[float, float]]]:
        """(replica, executor id) -> the time spans over which it answered 200 as that id
        without a break (from the first such request sent to the last answer received)."""
        found: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for replica in {a.replica for a in self.answers}:
            run: list[Answer] = []
            for answer in sorted((a for a in self.answers if a.replica == replica), key=_sent):
                if run and (answer.status != 200 or answer.executor_id != run[0].executor_id):
                    key = (replica, str(run[0].executor_id))
                    found.setdefault(key, []).append((run[0].sent, run[-1].received))
                    run = []
                if answer.status == 200:
                    run.append(answer)
            if run:
                key = (replica, str(run[0].executor_id))
                found.setdefault(key, []).append((run[0].sent, run[-1].received))
        return found

    def double_served_seconds(self) -> float:
        """How long two replicas both answered 200 as the same executor id (overlap of
        their spans)."""
        spans = self.spans()
        total = 0.0
        keys = sorted(spans)
        for i, (r1, id1) in enumerate(keys):
            for r2, id2 in keys[i + 1 :]:
                if r1 == r2 or id1 != id2:
                    continue
                for s1, e1 in spans[(r1, id1)]:
                    for s2, e2 in spans[(r2, id2)]:
                        total += max(0.0, min(e1, e2) - max(s1, s2))
        return total


def _sent(answer: Answer) -> float:
    return answer.sent


@dataclass
class Replicas:
    """``count`` replicas of the demo on ``db_url`` (a fresh database), one proxy each,
    a shared FIB_LEDGER; started in order (the first claims slot 0)."""

    db_url: str
    workdir: Path
    count: int = 2
    workers: int | None = None  # per replica: None = one uvicorn process
    own_namespaces: bool = field(default_factory=pid_namespaces_available)
    env: dict[str, str] = field(default_factory=dict)
    members: list[Replica] = field(default_factory=list)
    spawned: int = 0

    @property
    def ledger(self) -> Path:
        return self.workdir / "ledger.txt"

    def start(self) -> Replicas:
        for i in range(self.count):
            self.members.append(self._spawn("ABCDEFGH"[i]))
        return self

    def _spawn(self, name: str) -> Replica:
        """A new replica (process and proxy), started and healthy."""
        proxy = FaultProxy.to_url(self.db_url, name)
        self.spawned += 1
        server = shutdown_server(
            proxy.url(self.db_url),
            self.workdir / f"replica-{name}-{self.spawned}.log",
            workers=self.workers,
            ledger=self.ledger,
            port=free_port(),
            env=self.env,
            ready_path="/healthz",
            ready_timeout=START_TIMEOUT,
        )
        if self.own_namespaces:
            _own_namespace(server)
        replica = Replica(name, proxy, server)
        try:
            server.start()
            replica.executor_id = str(replica.wait_healthy(START_TIMEOUT)["executor_id"])
        except BaseException:
            server.close()
            proxy.close()
            raise
        return replica

    def ready(self, timeout: float = START_TIMEOUT) -> None:
        """Every member serves: a dead one is replaced by a new replica of that name (a
        new process, a new proxy), then all must answer /healthz 200."""
        for i, member in enumerate(self.members):
            if member.server.running:
                member.thaw()  # a case that failed may have left it frozen
            else:
                member.server.close()
                member.proxy.close()
                self.members[i] = self._spawn(member.name)
        for member in self.members:
            member.proxy.heal()
            member.wait_healthy(timeout)

    def close(self) -> None:
        for replica in self.members:
            try:
                replica.thaw()  # a frozen group cannot be reaped
            except (AssertionError, ProcessLookupError):
                pass
            replica.server.close()
            replica.proxy.close()

    def __enter__(self) -> Replicas:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lines(self, message: str, since: float | None = None) -> list[dict[str, Any]]:
        """The log lines with ``message`` of every member (since ``since``, monotonic)."""
        return [r for m in self.members for r in m.messages(message, since)]

    def adoptions(self, since: float | None = None) -> list[dict[str, Any]]:
        return self.lines("adopted orphaned executor slot", since)

    def fences(self, since: float | None = None) -> list[dict[str, Any]]:
        return self.lines("executor slot lost: fencing", since)


# --- what the database says -------------------------------------------------------------


def pending_under(db_url: str, executor_id: str) -> int:
    """PENDING workflows (of any kind) whose executor is ``executor_id``."""
    rows = query(
        db_url,
        "SELECT count(*) FROM dbos.workflow_status WHERE status = 'PENDING' AND executor_id = %s",
        executor_id,
    )
    return int(rows[0][0])


def unfinished(db_url: str, parent: str) -> list[tuple[str, str]]:
    """(id, status) of the fan-out and its steps that did not end in SUCCESS."""
    return [
        (str(i), str(s))
        for i, s in query(
            db_url,
            "SELECT workflow_uuid, status FROM dbos.workflow_status "
            "WHERE (workflow_uuid = %s OR parent_workflow_id = %s) AND status <> 'SUCCESS'",
            parent,
            parent,
        )
    ]


def leases(db_url: str) -> dict[int, tuple[str, int, bool]]:
    """slot -> (owner, pid, expired by the database's clock) of the shutdown demo's rows
    in ``experiment6.executor_slots`` (shutdown/slots.py)."""
    import fastapi_scope_shutdown
    from lab.config import app_name
    from shutdown.slots import TABLE

    try:
        rows = query(
            db_url,
            f"SELECT slot, owner::text, pid, expires_at < clock_timestamp() FROM {TABLE} "
            "WHERE app = %s",
            app_name(fastapi_scope_shutdown.APP),
        )
    except Exception:  # noqa: BLE001 - no table yet: no leases
        return {}
    return {int(s): (str(o), int(p), bool(e)) for s, o, p, e in rows}


__all__ = [
    "MODULE",
    "Answer",
    "HealthLog",
    "Replica",
    "Replicas",
    "duplicate_outputs",
    "leases",
    "pending_under",
    "pid_namespaces_available",
    "unfinished",
]
