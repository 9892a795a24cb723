"""The configuration every experiment shares: the environment's one loader, the
system database, and the DBOS configuration.

- Every setting is read from the environment through ``text_env`` and ``int_env``,
  once, by an app's ``load`` at start (``main()`` or the lifespan); a bad value is a
  ``ConfigError`` with one line that says what is wrong, and the entry point reports it.
- One system database for all experiments: ``DBOS_SYSTEM_DATABASE_URL`` when set
  (Postgres), else a URL from libpq's ``PG*`` variables when ``PGHOST`` is set (how
  the Docker image configures it), else ``experiment6.sqlite`` in the working
  directory. The file name is the ``name`` in ``dbos-config.yaml`` so that ``dbos
  workflow list`` (which falls back to ``sqlite:///<name>.sqlite``) reads the same file.
- One application *per experiment* (``experiment6-scope``, ...): in DBOS 3.x,
  application versions, recovery, queues and schedules are keyed by application
  name, so separate names keep the experiments from disturbing each other.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

# The name in dbos-config.yaml; application names are "experiment6-<app>".
CONFIG_NAME = "experiment6"
SQLITE_URL = f"sqlite:///{CONFIG_NAME}.sqlite"
# A script or server that starts against an unreachable database fails within this
# long, with one line, instead of after DBOS's 10 s default.
CONNECT_TIMEOUT_SEC = 5
# How often DBOS polls a SQLite system database for notifications (it has no
# LISTEN/NOTIFY); a script on SQLite ends this long, at most, after its last line.
SQLITE_NOTIFY_POLL_SEC = 0.1
PORT_RANGE = (1, 65535)

Environ = Mapping[str, str]


class ConfigError(Exception):
    """A configuration problem a user can fix; the entry point reports it as one line."""


# --- the loader -----------------------------------------------------------------


def text_env(name: str, default: str = "", *, env: Environ) -> str:
    """Variable ``name``, stripped; empty or unset is ``default``."""
    return env.get(name, "").strip() or default


def int_env(name: str, default: int, low: int, high: int, *, env: Environ) -> int:
    """A whole-number variable in ``[low, high]``; empty or unset is ``default``."""
    raw = text_env(name, str(default), env=env)
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class DatabaseSettings:
    """The system database, and the executor id DBOS takes from the environment."""

    url: str = field(repr=False)  # may hold a password: log ``redacted`` instead
    executor_id: str = "local"

    @property
    def kind(self) -> str:
        return database_kind(self.url)

    @property
    def redacted(self) -> str:
        return redacted(self.url)

    @classmethod
    def load(cls, env: Environ = os.environ) -> DatabaseSettings:
        url = text_env("DBOS_SYSTEM_DATABASE_URL", env=env) or _url_from_pg_env(env) or SQLITE_URL
        # DBOS reads DBOS__VMID itself; we read it to find this executor's runs.
        return cls(check_database_url(url), text_env("DBOS__VMID", "local", env=env))


@dataclass(frozen=True)
class ServeSettings:
    """A FastAPI experiment served by ``python <app>.py``: its database and its port."""

    database: DatabaseSettings
    port: int = 8000

    @classmethod
    def load(cls, env: Environ = os.environ) -> ServeSettings:
        port = int_env("PORT", 8000, *PORT_RANGE, env=env)
        return cls(DatabaseSettings.load(env), port)


def _url_from_pg_env(env: Environ) -> str | None:
    """A URL from libpq's ``PG*`` variables when ``PGHOST`` is set (the Docker image's
    configuration); ``DBOS_SYSTEM_DATABASE_URL`` wins when both are given."""
    host = text_env("PGHOST", env=env)
    if not host:
        return None
    return URL.create(
        "postgresql",
        username=text_env("PGUSER", "postgres", env=env),
        password=text_env("PGPASSWORD", env=env) or None,
        host=host,
        port=int_env("PGPORT", 5432, *PORT_RANGE, env=env),
        database=text_env("PGDATABASE", CONFIG_NAME, env=env),
    ).render_as_string(hide_password=False)


# --- the system database ----------------------------------------------------------


def check_database_url(url: str) -> str:
    """Reject a malformed URL, or a SQLite too old for DBOS, with a message that says
    what is wrong."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            "DBOS_SYSTEM_DATABASE_URL is not a database URL "
            "(expected postgresql://user:password@host:port/dbname or sqlite:///file.sqlite)"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "sqlite"):
        raise ConfigError(
            f"DBOS_SYSTEM_DATABASE_URL uses '{backend}'; DBOS supports postgresql:// and sqlite://"
        )
    if backend == "postgresql" and not parsed.database:
        raise ConfigError("DBOS_SYSTEM_DATABASE_URL names no database (add /dbname)")
    if backend == "sqlite":
        if not parsed.database:
            raise ConfigError("DBOS_SYSTEM_DATABASE_URL names no SQLite file")
        # Read at call time (not imported by name), so a test can set an old version.
        check_sqlite_version(sqlite3.sqlite_version, sys.version_info[:2])
    return url


def sqlite_needed(python: tuple[int, ...]) -> tuple[tuple[int, int], str]:
    """The oldest SQLite DBOS 3.4 works with on Python ``python``, and what needs it.

    DBOS's SQLite backend writes ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``
    (SQLite 3.35) on every Python, and on Python 3.12+ its timestamps are
    ``unixepoch('subsec')`` (SQLite 3.42; dbos/_migration.py, dbos/_sys_db.py).
    """
    if tuple(python[:2]) >= (3, 12):
        return (3, 42), "it uses unixepoch('subsec')"
    return (3, 35), "it uses INSERT ... RETURNING"


def check_sqlite_version(version: str, python: tuple[int, ...]) -> None:
    """Raise ConfigError (one line: what is needed, why, what to do) when SQLite
    ``version`` is too old for DBOS on Python ``python``."""
    needed, why = sqlite_needed(python)
    try:
        have = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return  # not a version we can read: let DBOS try
    if have >= needed:
        return
    py = ".".join(str(p) for p in python[:2])
    least = f"{needed[0]}.{needed[1]}"
    raise ConfigError(
        f"SQLite {version} is too old: DBOS 3.4 on Python {py} needs SQLite >= {least} "
        f"({why}); use Postgres (DBOS_SYSTEM_DATABASE_URL=postgresql://...) "
        f"or a Python whose sqlite3 module has SQLite {least} or newer"
    )


def database_kind(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


def redacted(url: str) -> str:
    """The URL without its password, safe to log."""
    return make_url(url).render_as_string(hide_password=True)


def pg_connect_args(
    url: str,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SEC,
    application_name: str | None = None,
    statement_timeout_ms: int | None = None,
) -> dict[str, Any]:
    """The one mapping of a ``postgresql://`` URL to ``psycopg2.connect`` arguments.

    The URL's query parameters (``sslmode``, ``options``, ...) are kept; a statement
    timeout is added to the URL's own server ``options``.
    """
    u = make_url(url)
    args: dict[str, Any] = {k: v for k, v in u.query.items() if isinstance(v, str)}
    args.update(
        host=u.host or "localhost",
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        dbname=u.database,
        connect_timeout=connect_timeout,
    )
    if application_name:
        args["application_name"] = application_name
    if statement_timeout_ms is not None:
        options = f"{args.get('options', '')} -c statement_timeout=".lstrip()
        args["options"] = f"{options}{statement_timeout_ms}"
    return args


def app_name(app: str) -> str:
    return f"{CONFIG_NAME}-{app}"


def dbos_config(app: str, database: DatabaseSettings | None = None, **extra: Any) -> dict[str, Any]:
    """The DBOSConfig for experiment ``app`` (application ``experiment6-<app>``) on
    ``database`` (default: loaded from the environment now)."""
    database = database or DatabaseSettings.load()
    url = database.url
    config: dict[str, Any] = {
        "name": app_name(app),
        "system_database_url": url,
        # What DBOS would take from DBOS__VMID itself; here too, for the code that
        # looks for this executor's runs (lab.launch.pending_before_launch).
        "executor_id": database.executor_id,
        "db_engine_kwargs": {
            "connect_args": {
                "application_name": app_name(app),
                "connect_timeout": CONNECT_TIMEOUT_SEC,
            }
        }
        if database_kind(url) == "postgres"
        else {},
    }
    if database_kind(url) == "sqlite":
        # SQLite has no LISTEN/NOTIFY: DBOS polls it for notifications, and stopping
        # DBOS waits for the poller's sleep (up to 1 s at DBOS's default).
        config["notification_listener_polling_interval_sec"] = SQLITE_NOTIFY_POLL_SEC
    config.update(extra)
    return config
