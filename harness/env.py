"""A script's environment, and the watch on the secrets handed to scripts.

Whoever starts scripts owns a ``SecretWatch`` (``watching()``: a test, through the
fixture in tests/conftest.py; a module-scoped fixture; a reliability run): every
secret handed to a script while it is open is remembered in it, with the outputs
captured and the log files written meanwhile, and its owner checks them when it ends.
The module keeps only which watch is open (a context variable, as ``logging`` keeps the
handlers pytest's ``caplog`` installs); a watch opened inside another also answers for
the outer one's secrets, and passes its own up.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

# Variables the scripts read; the harness sets them explicitly, never inherits them.
_SCRUBBED = (
    "DBOS_SYSTEM_DATABASE_URL",
    "DBOS__VMID",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "SHUTDOWN_TOKEN",
    "CREDENTIALS_SECRET",
    "PORT",
    "HOST",
    "WORKERS",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)

SECRET_VARS = (
    "SHUTDOWN_TOKEN",
    "CREDENTIALS_SECRET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


def script_env(db_url: str | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for a script: the given database and variables only."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONUNBUFFERED"] = "1"
    if db_url is not None:
        env["DBOS_SYSTEM_DATABASE_URL"] = db_url
    env.update(extra)
    remember_secrets(env)
    return env


class SecretWatch:
    """The secrets handed to scripts while it was open, the outputs captured and the log
    files written meanwhile."""

    def __init__(self, parent: SecretWatch | None = None) -> None:
        self.parent = parent
        self.own_secrets: set[str] = set()
        self.outputs: list[str] = []
        self.log_files: list[Path] = []

    @property
    def secrets(self) -> set[str]:
        """Its own secrets and those of the watches it is open inside."""
        outer = self.parent.secrets if self.parent is not None else set()
        return self.own_secrets | outer

    def remember(self, value: str) -> None:
        if len(value) >= 8:  # shorter values would match by accident
            watch: SecretWatch | None = self
            while watch is not None:
                watch.own_secrets.add(value)
                watch = watch.parent

    def leaks(self, files: Iterable[Path] = ()) -> list[str]:
        """The log files (its own and ``files``) and outputs holding one of its secrets."""
        secrets = self.secrets
        paths = sorted(set(self.log_files) | set(files))
        found = [str(p) for p in paths if p.is_file() and secrets_in(p.read_bytes(), secrets)]
        found += [f"output {n}" for n, text in enumerate(self.outputs) if secrets_in(text, secrets)]
        return found


_open: ContextVar[SecretWatch | None] = ContextVar("secret_watch", default=None)


@contextmanager
def watching() -> Iterator[SecretWatch]:
    """Open a watch for the block (inside the one already open, if any)."""
    watch = SecretWatch(parent=_open.get())
    token = _open.set(watch)
    try:
        yield watch
    finally:
        _open.reset(token)


@contextmanager
def no_secret_leaks(directory: Path | None = None) -> Iterator[SecretWatch]:
    """``watching()``, and when the block ends without an error: no secret in an output,
    a log file it wrote, or a ``*.log`` file under ``directory``."""
    with watching() as watch:
        yield watch
        leaks = watch.leaks(directory.rglob("*.log") if directory is not None else ())
        assert not leaks, f"a secret reached: {leaks}"


def remember_secrets(env: dict[str, str]) -> None:
    """Remember the secrets in a script's environment in the open watch (none: no one
    is checking, as in a benchmark run)."""
    for name in SECRET_VARS:
        remember_secret(env.get(name, ""))


def remember_secret(value: str) -> None:
    watch = _open.get()
    if watch is not None:
        watch.remember(value)


def record_output(*texts: str) -> None:
    """A script's captured output, for the open watch to search."""
    watch = _open.get()
    if watch is not None:
        watch.outputs.extend(texts)


def record_log_file(path: Path) -> None:
    """A log file a script writes, for the open watch to search."""
    watch = _open.get()
    if watch is not None:
        watch.log_files.append(path)


_BASE64 = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")


def secrets_in(data: str | bytes, secrets: set[str]) -> set[str]:
    """The secrets found in ``data``: as they are, or inside a base64 token (DBOS stores
    pickled inputs and outputs as base64, where a plain search would miss them)."""
    raw = data.encode() if isinstance(data, str) else data
    found = set()
    for secret in secrets:
        needles = (secret.encode(), base64.b64encode(secret.encode()).rstrip(b"="))
        if any(n in raw for n in needles):
            found.add(secret)
    if len(found) < len(secrets):
        for token in _BASE64.findall(raw):
            try:
                decoded = base64.b64decode(token + b"=" * (-len(token) % 4))
            except (binascii.Error, ValueError):
                continue
            found |= {s for s in secrets if s.encode() in decoded}
    return found
