"""A loopback TCP fault proxy: the network between one replica and Postgres, broken on cue.

    with FaultProxy.to_url(db_url) as proxy:
        env["DBOS_SYSTEM_DATABASE_URL"] = proxy.url(db_url)   # the replica goes through it
        proxy.blackhole()   # packets vanish, both ways: nothing forwarded, every socket open
        proxy.heal()        # forwarding again; what was held back flows (TCP retransmits)
        proxy.reset()       # every connection ends with a RST, on both sides, at once
        proxy.delay(200)    # every chunk leaves 200 ms after it arrived, both ways

It runs in the test process, on one thread of its own (a ``poll`` loop over every
socket), listening on 127.0.0.1 on a free port; commands are carried out on that
thread, and return once they have been. Modes can change at any time.

What it models, and what it does not:

- **blackhole** is a partition or a host that lost power as its peer sees it: bytes stop
  arriving, nobody closes anything. The proxy stops reading and writing (what is
  in flight stays in the kernels' buffers and in the proxy, so a heal delivers it in
  order, as TCP retransmission would after a partition). New connections are accepted
  but not connected upstream until the heal: the client's connect_timeout fires, and
  Postgres never sees them.
- **The proxy's kernel keeps ACKing on both sides.** The client and Postgres each talk
  to a live TCP endpoint (this process), as they would to a connection pooler in
  between or to a frozen process's kernel: TCP keepalives and ``tcp_user_timeout``
  never fire through it, and Postgres keeps the session (``pg_stat_activity``: idle)
  however long the blackhole lasts. Ownership decided through it must therefore rest on
  deadlines the application and the database enforce (a lease), not on TCP noticing.
- **reset** is what a crashed host's kernel (or a restarted one) answers: RST
  (``SO_LINGER`` 0), so both ends learn at once that the connection is gone.
- **delay** adds latency per chunk, both directions, from the moment it was read.
"""

from __future__ import annotations

import errno
import queue
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHUNK = 65536
# A command waits this long for the loop thread to carry it out.
COMMAND_TIMEOUT_SEC = 10.0
UPSTREAM_CONNECT_TIMEOUT_SEC = 5.0


def _rst_close(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN: linger on, timeout 0."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


@dataclass
class _Link:
    """One client connection and its upstream (None until connected: accepted during a
    blackhole). ``out[s]``: what waits to be written to socket ``s``, with when it is due."""

    client: socket.socket
    upstream: socket.socket | None = None
    out: dict[socket.socket, deque[tuple[float, bytes]]] = field(default_factory=dict)
    eof: bool = False  # one side closed: drain toward the other, then close both

    def peer(self, sock: socket.socket) -> socket.socket | None:
        return self.upstream if sock is self.client else self.client

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]

    def drained(self) -> bool:
        return not any(self.out.get(s) for s in self.sockets())


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``target`` (host, port); see the module's docstring."""

    def __init__(self, target: tuple[str, int], name: str = "proxy") -> None:
        self.target = target
        self.name = name
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._links: list[_Link] = []
        self.blackholed = False
        self.delay_sec = 0.0
        self.accepted = 0  # connections accepted since the start
        self.forwarded = 0  # bytes written on, both ways
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"fault-{name}", daemon=True)
        self._thread.start()

    @classmethod
    def to_url(cls, db_url: str, name: str = "proxy") -> FaultProxy:
        """A proxy to the Postgres server of ``db_url``."""
        from sqlalchemy.engine import make_url

        url = make_url(db_url)
        return cls((url.host or "127.0.0.1", url.port or 5432), name)

    def url(self, db_url: str) -> str:
        """``db_url`` with its server replaced by this proxy."""
        from sqlalchemy.engine import make_url

        proxied = make_url(db_url).set(host="127.0.0.1", port=self.port)
        return proxied.render_as_string(hide_password=False)

    # --- the modes (carried out on the loop thread; return once done) -------------

    def blackhole(self) -> None:
        """Stop forwarding both ways; keep every socket open."""
        self._do(lambda: setattr(self, "blackholed", True))

    def heal(self) -> None:
        """Forward again, without delay; held bytes and held connections go through."""

        def heal() -> None:
            self.blackholed, self.delay_sec = False, 0.0
            for link in list(self._links):
                if link.upstream is None:
                    self._connect_upstream(link)

        self._do(heal)

    def delay(self, ms: float) -> None:
        """Hold every chunk read from now on ``ms`` milliseconds before writing it on."""
        self._do(lambda: setattr(self, "delay_sec", ms / 1000))

    def reset(self) -> None:
        """End every open connection with a RST on both sides (new ones are served)."""

        def reset() -> None:
            for link in self._links:
                for sock in link.sockets():
                    _rst_close(sock)
            self._links.clear()

        self._do(reset)

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def close(self) -> None:
        """Stop the thread; close the listener and every connection (RST)."""
        if not self._running:
            return
        self.reset()
        self._running = False
        self._wake_w.send(b"x")
        self._thread.join(COMMAND_TIMEOUT_SEC)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _do(self, command: Callable[[], None]) -> None:
        if not self._running:
            raise RuntimeError(f"fault proxy {self.name} is closed")
        done = threading.Event()
        self._commands.put((command, done))
        self._wake_w.send(b"x")
        if not done.wait(COMMAND_TIMEOUT_SEC):
            raise RuntimeError(f"fault proxy {self.name}: command not carried out")

    # --- the loop thread ------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            poller, owners, timeout = self._poller()
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                continue
            for fd, event in events:
                self._handle(owners.get(fd), fd, event)
            self._flush_due()
            self._run_commands()

    def _poller(self) -> tuple[Any, dict[int, tuple[_Link, socket.socket]], int]:
        """What to wait for now, and for how long (ms; -1: until something happens)."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self._listener, select.POLLIN)
        owners: dict[int, tuple[_Link, socket.socket]] = {}
        now, next_due = time.monotonic(), None
        for link in self._links:
            for sock in link.sockets():
                owners[sock.fileno()] = (link, sock)
                mask = 0
                if not self.blackholed and link.upstream is not None and not link.eof:
                    mask |= select.POLLIN
                pending = link.out.get(sock)
                if pending and not self.blackholed:
                    if pending[0][0] <= now:
                        mask |= select.POLLOUT
                    else:
                        due = pending[0][0]
                        next_due = due if next_due is None else min(next_due, due)
                if mask:
                    poller.register(sock, mask)
        timeout = -1 if next_due is None else max(0, int((next_due - now) * 1000) + 1)
        return poller, owners, timeout

    def _handle(self, owner: tuple[_Link, socket.socket] | None, fd: int, event: int) -> None:
        if fd == self._wake_r.fileno():
            self._wake_r.recv(4096)
        elif fd == self._listener.fileno():
            self._accept()
        elif owner is not None and owner[0] in self._links:
            link, sock = owner
            if event & select.POLLIN or event & (select.POLLHUP | select.POLLERR):
                self._read(link, sock)
            if link in self._links and event & select.POLLOUT:
                self._write(link, sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        link = _Link(client)
        self._links.append(link)
        if not self.blackholed:
            self._connect_upstream(link)

    def _connect_upstream(self, link: _Link) -> None:
        try:
            upstream = socket.create_connection(self.target, UPSTREAM_CONNECT_TIMEOUT_SEC)
        except OSError:
            self._drop(link, rst=True)  # a refused server: the client learns at once
            return
        for sock in (link.client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.upstream = upstream
        link.out = {link.client: deque(), upstream: deque()}

    def _read(self, link: _Link, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._drop(link, rst=True)  # reset by a peer: the other side gets one too
            return
        target = link.peer(sock)
        if not data or target is None:
            link.eof = True
            self._close_if_drained(link)
            return
        link.out[target].append((time.monotonic() + self.delay_sec, data))

    def _write(self, link: _Link, sock: socket.socket) -> None:
        pending = link.out[sock]
        now = time.monotonic()
        while pending and pending[0][0] <= now and not self.blackholed:
            due, data = pending[0]
            try:
                sent = sock.send(data)
            except BlockingIOError:
                return
            except OSError as exc:
                self._drop(link, rst=exc.errno != errno.EPIPE)
                return
            self.forwarded += sent
            if sent < len(data):
                pending[0] = (due, data[sent:])
                return
            pending.popleft()
        self._close_if_drained(link)

    def _flush_due(self) -> None:
        """Write what became due without waiting for POLLOUT (sockets are mostly writable)."""
        if self.blackholed:
            return
        now = time.monotonic()
        for link in list(self._links):
            for sock in link.sockets():
                pending = link.out.get(sock)
                if link in self._links and pending and pending[0][0] <= now:
                    self._write(link, sock)

    def _close_if_drained(self, link: _Link) -> None:
        if link.eof and link.drained():
            self._drop(link, rst=False)

    def _drop(self, link: _Link, rst: bool) -> None:
        if link in self._links:
            self._links.remove(link)
        for sock in link.sockets():
            if rst:
                _rst_close(sock)
            else:
                sock.close()

    def _run_commands(self) -> None:
        while True:
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            finally:
                done.set()
