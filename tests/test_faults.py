"""harness/faults.py: each mode of the fault proxy, seen by psycopg2 and by Postgres itself.

A real Postgres (the test server's fresh database), psycopg2 connections through the
proxy, and what the server says about those sessions (``pg_stat_activity``, read on a
direct connection).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from harness.db import libpq_url, query
from harness.faults import FaultProxy
from harness.proc import wait_for

DEADLINE = 15  # seconds: every wait on a state ends here at the latest


@pytest.fixture
def proxy(pg_url: str) -> Iterator[FaultProxy]:
    with FaultProxy.to_url(pg_url, "test") as p:
        yield p


def connect(url: str, app: str, timeout: int = 5) -> Any:
    conn = psycopg2.connect(libpq_url(url), connect_timeout=timeout, application_name=app)
    conn.autocommit = True
    return conn


def backend(pg_url: str, app: str) -> tuple[int, str] | None:
    """(pid, state) of the server session with application_name ``app``, or None."""
    rows = query(
        pg_url,
        "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s",
        app,
    )
    return (int(rows[0][0]), str(rows[0][1])) if rows else None


def select_one(conn: Any) -> Any:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        return cur.fetchone()[0]


def round_trip(conn: Any) -> float:
    started = time.perf_counter()
    assert select_one(conn) == 1
    return time.perf_counter() - started


def test_forward_passes_queries_both_ways(pg_url: str, proxy: FaultProxy) -> None:
    app = f"fwd-{uuid.uuid4().hex[:8]}"
    conn = connect(proxy.url(pg_url), app)
    try:
        assert select_one(conn) == 1
        assert backend(pg_url, app) is not None
        assert (proxy.accepted, proxy.open_connections) == (1, 1)
        assert proxy.forwarded > 0
    finally:
        conn.close()
    wait_for(lambda: proxy.open_connections == 0, DEADLINE, what="the proxy to drop the link")
    wait_for(lambda: backend(pg_url, app) is None, DEADLINE, what="the session to end")


def test_blackhole_holds_queries_and_connections_until_heal(pg_url: str, proxy: FaultProxy) -> None:
    app = f"bh-{uuid.uuid4().hex[:8]}"
    conn = connect(proxy.url(pg_url), app)
    pid, _ = backend(pg_url, app) or (None, "")
    assert pid is not None
    proxy.blackhole()
    answer: list[Any] = []
    worker = threading.Thread(target=lambda: answer.append(select_one(conn)), daemon=True)
    worker.start()
    worker.join(1)
    # No answer, and the server never saw the query: its session waits, idle and open.
    assert worker.is_alive() and answer == []
    assert backend(pg_url, app) == (pid, "idle")
    # A new connection is accepted by the proxy but never reaches the server.
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="timeout"):
        connect(proxy.url(pg_url), f"{app}-new", timeout=2)
    assert time.monotonic() - started >= 2
    assert backend(pg_url, f"{app}-new") is None
    proxy.heal()
    worker.join(DEADLINE)
    assert answer == [1]  # the held query went through once healed, on the same session
    assert backend(pg_url, app) == (pid, "idle")
    fresh = connect(proxy.url(pg_url), f"{app}-after")
    try:
        assert select_one(fresh) == 1
    finally:
        fresh.close()
        conn.close()


def test_reset_ends_every_connection_at_once_on_both_sides(pg_url: str, proxy: FaultProxy) -> None:
    app = f"rst-{uuid.uuid4().hex[:8]}"
    conns = [connect(proxy.url(pg_url), f"{app}-{i}") for i in range(2)]
    assert all(backend(pg_url, f"{app}-{i}") for i in range(2))
    proxy.reset()
    assert proxy.open_connections == 0
    for conn in conns:
        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError):
            select_one(conn)
        assert time.monotonic() - started < 2, "a reset must be noticed at once"
        conn.close()
    # The server saw the reset too: the sessions end without waiting for any timeout.
    wait_for(
        lambda: all(backend(pg_url, f"{app}-{i}") is None for i in range(2)),
        DEADLINE,
        what="the server to end the reset sessions",
    )
    fresh = connect(proxy.url(pg_url), f"{app}-after")  # new connections are served
    try:
        assert select_one(fresh) == 1
    finally:
        fresh.close()


def test_delay_adds_its_latency_in_each_direction(pg_url: str, proxy: FaultProxy) -> None:
    conn = connect(proxy.url(pg_url), f"delay-{uuid.uuid4().hex[:8]}")
    try:
        round_trip(conn)
        proxy.delay(200)
        delayed = [round_trip(conn) for _ in range(3)]
        proxy.heal()
        healed = min(round_trip(conn) for _ in range(3))
    finally:
        conn.close()
    # One query is one chunk each way: each waits 200 ms in the proxy.
    assert min(delayed) >= 0.4, delayed
    assert healed < 0.4, healed


def test_close_releases_its_port_and_connections(pg_url: str) -> None:
    proxy = FaultProxy.to_url(pg_url, "closing")
    conn = connect(proxy.url(pg_url), f"close-{uuid.uuid4().hex[:8]}")
    proxy.blackhole()
    proxy.close()
    with pytest.raises(psycopg2.OperationalError):
        select_one(conn)
    conn.close()
    with pytest.raises(ConnectionRefusedError), socket.socket() as s:
        s.connect(("127.0.0.1", proxy.port))
    with pytest.raises(RuntimeError, match="closed"):
        proxy.heal()
