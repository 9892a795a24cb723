"""The system database and the DBOS configuration.

- One system database for all experiments: ``DBOS_SYSTEM_DATABASE_URL`` when set
  (Postgres), else ``experiment6.sqlite`` in the working directory. The file name
  is the ``name`` in ``dbos-config.yaml`` so that ``dbos workflow list`` (which
  falls back to ``sqlite:///<name>.sqlite``) reads the same file.
- One application *per experiment* (``experiment6-scope``, ...): in DBOS 3.x,
  application versions, recovery, queues and schedules are keyed by application
  name, so separate names keep the experiments from disturbing each other.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from lab.logs import fail

# The name in dbos-config.yaml; application names are "experiment6-<app>".
CONFIG_NAME = "experiment6"
SQLITE_URL = f"sqlite:///{CONFIG_NAME}.sqlite"
# Fail fast on an unreachable server instead of DBOS's 10 s default.
CONNECT_TIMEOUT_SEC = 5


class ConfigError(Exception):
    """A configuration problem a user can fix; reported as one line."""


def app_name(app: str) -> str:
    return f"{CONFIG_NAME}-{app}"


def database_url() -> str:
    """The system database URL: ``DBOS_SYSTEM_DATABASE_URL``, else SQLite."""
    url = os.environ.get("DBOS_SYSTEM_DATABASE_URL", "").strip()
    if not url:
        url = _url_from_pg_env() or SQLITE_URL
    return check_database_url(url)


def _url_from_pg_env() -> str | None:
    """Compose a URL from libpq's ``PG*`` variables when ``PGHOST`` is set.

    The original Dockerfile configured Postgres this way; the URL wins when both
    are given.
    """
    host = os.environ.get("PGHOST", "").strip()
    if not host:
        return None
    return URL.create(
        "postgresql",
        username=os.environ.get("PGUSER") or "postgres",
        password=os.environ.get("PGPASSWORD") or None,
        host=host,
        port=int(os.environ.get("PGPORT") or 5432),
        database=os.environ.get("PGDATABASE") or CONFIG_NAME,
    ).render_as_string(hide_password=False)


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


def dbos_config(app: str, **extra: Any) -> dict[str, Any]:
    """The DBOSConfig for experiment ``app`` (application ``experiment6-<app>``)."""
    url = database_url()
    config: dict[str, Any] = {
        "name": app_name(app),
        "system_database_url": url,
        "db_engine_kwargs": {
            "connect_args": {
                "application_name": app_name(app),
                "connect_timeout": CONNECT_TIMEOUT_SEC,
            }
        }
        if database_kind(url) == "postgres"
        else {},
    }
    config.update(extra)
    return config


def config_or_exit(app: str, **extra: Any) -> dict[str, Any]:
    """``dbos_config``, or exit with one error line when the URL is malformed."""
    try:
        return dbos_config(app, **extra)
    except ConfigError as exc:
        fail(str(exc))


def url_or_exit() -> str:
    """``database_url``, or exit with one error line."""
    try:
        return database_url()
    except ConfigError as exc:
        fail(str(exc))


def int_env(name: str, default: int, low: int, high: int) -> int:
    """A whole-number environment variable in ``[low, high]``, or exit with one line."""
    raw = os.environ.get(name, "").strip() or str(default)
    if not raw.isdigit() or not low <= int(raw) <= high:
        fail(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
    return int(raw)
