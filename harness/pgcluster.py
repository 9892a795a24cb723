"""A throwaway PostgreSQL cluster for the tests, the reliability suite and `.ci/run`.

    python -m harness.pgcluster start DIR   # prints the server URL
    python -m harness.pgcluster stop DIR

``Cluster`` (for the reliability suite) also stops and starts a cluster again on
the same port, to take the database away from a running application.

The cluster lives in DIR, listens on 127.0.0.1 on a free port, trusts local
connections and skips fsync: it is for tests only. ``initdb`` refuses to run as
root, so as root the cluster is created and run by the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.proc import free_port


def find_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    return Path(versions[0]).parent if versions else None


def _as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _owned_by_the_server(datadir: Path) -> None:
    """As root the server runs as ``postgres``: it owns ``datadir`` and may pass
    through every directory above it."""
    if os.geteuid() != 0:
        return
    shutil.chown(datadir, "postgres", "postgres")
    for parent in datadir.parents:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


def _initdb(bindir: Path, datadir: Path) -> None:
    initdb = [str(bindir / "initdb"), "-D", str(datadir / "data"), "-U", "postgres"]
    subprocess.run(
        _as_owner([*initdb, "-A", "trust", "--no-sync", "-E", "UTF8"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=True,
    )


def start(datadir: Path) -> str:
    """Create and start a cluster in ``datadir``; return its URL (no database)."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries (pg_ctl, initdb) not found")
    datadir = datadir.resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    _owned_by_the_server(datadir)
    port = free_port()
    _initdb(bindir, datadir)
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1 -k {datadir} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        "-c max_connections=400 -c shared_buffers=128MB"
    )
    log = str(datadir / "server.log")
    _pg_ctl(datadir, "-o", options, "-l", log, "-w", "-t", "60", "start")
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    (datadir / "url").write_text(url)
    (datadir / "options").write_text(options)
    return url


def stop(datadir: Path) -> None:
    bindir = find_bindir()
    data = datadir.resolve() / "data"
    if bindir is None or not (data / "postmaster.pid").exists():
        return
    subprocess.run(
        _as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def _pg_ctl(datadir: Path, *args: str) -> None:
    bindir = find_bindir()
    assert bindir is not None
    subprocess.run(
        _as_owner([str(bindir / "pg_ctl"), "-D", str(datadir.resolve() / "data"), *args]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=True,
    )


class Cluster:
    """A throwaway cluster that can be taken down and brought back on the same port."""

    def __init__(self, datadir: Path) -> None:
        self.datadir = datadir
        self.url = start(datadir)

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect every client and shut down cleanly; ``immediate``: like
        a crash of the server (recovery from the WAL on the next start)."""
        _pg_ctl(self.datadir, "-m", mode, "-w", "-t", "60", "stop")

    def start(self) -> None:
        """Start again, same data, same port."""
        options = (self.datadir.resolve() / "options").read_text()
        log = str(self.datadir.resolve() / "server.log")
        _pg_ctl(self.datadir, "-o", options, "-l", log, "-w", "-t", "60", "start")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def close(self) -> None:
        stop(self.datadir)


@contextmanager
def private_cluster(keep_log: Path | None = None) -> Iterator[Cluster]:
    """A cluster one test may stop and start, stopped and removed afterwards (its
    server log copied to ``keep_log`` first). Its files live outside pytest's
    temporary directory: a second pytest session makes that private (mode 700) while
    the server runs as the postgres user, cutting the server off from its files."""
    workdir = Path(tempfile.mkdtemp(prefix="experiment6-cluster-"))
    try:
        cluster = Cluster(workdir / "pg")
        try:
            yield cluster
        finally:
            cluster.close()
    finally:
        log = workdir / "pg" / "server.log"
        if keep_log is not None and log.exists():
            shutil.copy(log, keep_log)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    if sys.argv[1] == "start":
        print(start(Path(sys.argv[2])))
    else:
        stop(Path(sys.argv[2]))
