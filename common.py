"""What every experiment shares: the DBOS configuration and JSON logging.

- One system database for all experiments: ``DBOS_SYSTEM_DATABASE_URL`` when set
  (Postgres), else ``experiment6.sqlite`` in the working directory. The file name
  is the ``name`` in ``dbos-config.yaml`` so that ``dbos workflow list`` (which
  falls back to ``sqlite:///<name>.sqlite``) reads the same file.
- One application *per experiment* (``experiment6-scope``, ...): in DBOS 3.x,
  application versions, recovery, queues and schedules are keyed by application
  name, so separate names keep the experiments from disturbing each other
  (see README, "One database, many experiments").
- Every stdout line is one JSON object (python-json-logger), DBOS's own records
  included.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from pythonjsonlogger.json import JsonFormatter
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

CONFIG_NAME = "experiment6"
SQLITE_URL = f"sqlite:///{CONFIG_NAME}.sqlite"

log = logging.getLogger("experiment6")


class ConfigError(Exception):
    """A configuration problem a user can fix; reported as one line."""


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
    from sqlalchemy.engine import URL

    return URL.create(
        "postgresql",
        username=os.environ.get("PGUSER") or "postgres",
        password=os.environ.get("PGPASSWORD") or None,
        host=host,
        port=int(os.environ.get("PGPORT") or 5432),
        database=os.environ.get("PGDATABASE") or CONFIG_NAME,
    ).render_as_string(hide_password=False)


def check_database_url(url: str) -> str:
    """Reject a malformed URL with a message that says what is wrong."""
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
    if backend == "sqlite" and not parsed.database:
        raise ConfigError("DBOS_SYSTEM_DATABASE_URL names no SQLite file")
    return url


def database_kind(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


def redacted(url: str) -> str:
    """The URL without its password, safe to log."""
    return make_url(url).render_as_string(hide_password=True)


def dbos_config(app: str, **extra: Any) -> dict[str, Any]:
    """The DBOSConfig for experiment ``app`` (application ``experiment6-<app>``)."""
    url = database_url()
    config: dict[str, Any] = {
        "name": app_name(app),
        "system_database_url": url,
        # Fail fast on an unreachable server instead of DBOS's 10 s default.
        "db_engine_kwargs": {
            "connect_args": {"application_name": app_name(app), "connect_timeout": 5}
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


def int_env(name: str, default: int, low: int, high: int) -> int:
    """A whole-number environment variable in ``[low, high]``, or exit with one line."""
    raw = os.environ.get(name, "").strip() or str(default)
    if not raw.isdigit() or not low <= int(raw) <= high:
        fail(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
    return int(raw)


def app_name(app: str) -> str:
    return f"{CONFIG_NAME}-{app}"


# --- JSON logging -----------------------------------------------------------

# DBOS decorates its records with these attributes (uvicorn adds color_message, with
# terminal escapes); we report them under our own stable names or drop them, so every
# line has the same shape.
_DROPPED_ATTRS = (
    "applicationID",
    "applicationVersion",
    "executorID",
    "operationUUID",
    "color_message",
)
_app_name: str | None = None


class _ContextFilter(logging.Filter):
    """Adds ``workflow_id``, ``step_number`` and ``app_name`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        from dbos import DBOS

        wf = getattr(record, "operationUUID", None) or DBOS.workflow_id
        if wf and not hasattr(record, "workflow_id"):
            record.workflow_id = wf
        step = DBOS.step_id
        if step is not None and not hasattr(record, "step_number"):
            record.step_number = step
        if _app_name and not hasattr(record, "app_name"):
            record.app_name = _app_name
        for attr in _DROPPED_ATTRS:
            record.__dict__.pop(attr, None)
        return True


def setup_logging(app: str, level: int = logging.INFO) -> None:
    """Route every logger (ours, DBOS's, uvicorn's) to one JSON handler on stdout.

    Call before ``DBOS(config=...)``: DBOS only adds its own plain-text console
    handler when the ``dbos`` logger has none.
    """
    global _app_name
    _app_name = app_name(app)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        JsonFormatter(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "severity"},
            timestamp=True,
        )
    )
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # DBOS, uvicorn: no handlers of their own, so each record is printed once, as JSON.
    dbos_logger = logging.getLogger("dbos")
    dbos_logger.handlers[:] = [logging.NullHandler()]
    dbos_logger.propagate = True
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def crash(**context: Any) -> NoReturn:
    """Simulate a crash: exit at once, skipping every cleanup (no DBOS shutdown)."""
    log.warning("crashing", extra=context)
    logging.shutdown()
    os._exit(3)


def scope_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of the scope experiments (``scope.py``, ``scope_funcs.py``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=30, help="number of steps (default 30)")
    parser.add_argument(
        "--step-seconds", type=float, default=0.5, help="sleep in each step (default 0.5)"
    )
    parser.add_argument(
        "--crash-after",
        type=int,
        default=None,
        metavar="K",
        help="exit abruptly (code 3) right after step K has completed",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.step_seconds < 0:
        parser.error("--step-seconds must not be negative")
    if args.crash_after is not None and not 1 <= args.crash_after <= args.steps:
        parser.error("--crash-after must be between 1 and --steps")
    return args


def fail(message: str, code: int = 2) -> NoReturn:
    """Report a fatal problem as one JSON line and exit."""
    log.error(message)
    logging.shutdown()
    os._exit(code)


def launch_error(exc: BaseException) -> str:
    """One line that says why DBOS could not start."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "could not connect" in text or "Connection refused" in text or "timeout" in text:
        return f"cannot reach the system database: {text}"
    return f"DBOS failed to launch: {text}"


def _quiet_launch_traceback() -> None:
    """DBOS logs its launch failure with a full traceback; keep the one line."""

    class _NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage().startswith("DBOS failed to launch"):
                return False
            return True

    logging.getLogger("dbos").addFilter(_NoTraceback())


def launch(config: dict[str, Any]) -> None:
    """Construct and launch DBOS, or exit with one clear error line."""
    from dbos import DBOS

    _quiet_launch_traceback()
    try:
        DBOS(config=config)  # type: ignore[arg-type]
        DBOS.launch()
    except Exception as exc:  # noqa: BLE001 - any launch failure ends the script
        fail(launch_error(exc))


def check_reachable(url: str) -> None:
    """Exit with one line if the Postgres server cannot be reached (SQLite always can)."""
    if database_kind(url) != "postgres":
        return
    import psycopg2

    parsed = make_url(url)
    try:
        psycopg2.connect(
            host=parsed.host or "localhost",
            port=parsed.port or 5432,
            user=parsed.username,
            password=parsed.password,
            dbname=parsed.database,
            connect_timeout=5,
        ).close()
    except psycopg2.OperationalError as exc:
        text = str(exc).strip().splitlines()[0]
        if "does not exist" in text:
            return  # DBOS creates the system database on first launch
        fail(f"cannot reach the system database {redacted(url)}: {text}")


def pending_before_launch(config: dict[str, Any], workflow: Callable[..., Any]) -> list[str]:
    """Ids of this application's PENDING runs of ``workflow`` on this executor.

    Read *before* ``DBOS.launch()``, which recovers them on a background thread
    (and may finish them before we could look again).
    """
    from dbos import DBOSClient

    try:
        client = DBOSClient(system_database_url=config["system_database_url"])
    except Exception:  # noqa: BLE001 - a fresh database has nothing to resume
        return []
    try:
        runs = client.list_workflows(
            name=_workflow_name(workflow),
            status="PENDING",
            executor_id=os.environ.get("DBOS__VMID") or config.get("executor_id") or "local",
            application_name=config["name"],
            load_input=False,
            load_output=False,
        )
        return [w.workflow_id for w in runs if w.app_version]
    except Exception:  # noqa: BLE001 - no tables yet: nothing to resume
        return []
    finally:
        client.destroy()


def launch_and_resume(
    app: str | dict[str, Any], workflow: Callable[..., Any], *args: Any
) -> tuple[Any, bool]:
    """Launch DBOS for experiment ``app``, then wait for an interrupted run of
    ``workflow`` if this launch recovers one, else start a fresh one.
    Returns ``(handle, recovered)``; exits with one error line if DBOS cannot start.

    DBOS recovers PENDING workflows of the same executor id and application
    version; a run left by older code (another version) is not resumed.
    """
    from dbos import DBOS

    config = config_or_exit(app) if isinstance(app, str) else app
    check_reachable(config["system_database_url"])
    pending = pending_before_launch(config, workflow)
    launch(config)
    if pending:
        mine = DBOS.list_workflows(
            workflow_ids=pending,
            app_version=DBOS.application_version,
            load_input=False,
            load_output=False,
        )
        if mine:
            latest = max(mine, key=lambda w: w.created_at or 0)
            log.info("resuming interrupted workflow", extra={"workflow_id": latest.workflow_id})
            return DBOS.retrieve_workflow(latest.workflow_id), True
    return DBOS.start_workflow(workflow, *args), False


def _workflow_name(workflow: Callable[..., Any]) -> str:
    return getattr(workflow, "__qualname__", workflow.__name__)


# --- FastAPI ---


def serve(app: Any) -> None:
    """``python <app>.py``: serve ``app`` on 127.0.0.1, port ``PORT`` (default 8000),
    with our JSON logging instead of uvicorn's log config."""
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int_env("PORT", 8000, 1, 65535), log_config=None)


async def launch_async(config: dict[str, Any]) -> None:
    """``check_reachable`` + ``launch`` for a FastAPI lifespan.

    The sync DBOS APIs refuse to run on the event loop: construct and launch on a thread.
    """
    import asyncio

    await asyncio.to_thread(check_reachable, config["system_database_url"])
    await asyncio.to_thread(launch, config)


async def workflow_view(workflow_id: str) -> dict[str, Any]:
    """The answer of ``GET /workflows/{workflow_id}``, shared by the FastAPI apps.

    ``{"workflow_id", "status"}`` plus ``"result"`` once ``SUCCESS`` or ``"error"``
    when it failed; an unknown id is a 404 with the reason. Read from the system
    database, so runs from before a restart are answered too.
    """
    from dbos import DBOS
    from fastapi import HTTPException

    # Postgres text cannot hold NUL: no workflow has such an id, and the query would fail (500).
    status = None if "\x00" in workflow_id else await DBOS.get_workflow_status_async(workflow_id)
    if status is None:
        raise HTTPException(status_code=404, detail=f"no workflow with id {workflow_id!r}")
    view: dict[str, Any] = {"workflow_id": workflow_id, "status": status.status}
    if status.status == "SUCCESS":
        view["result"] = status.output
    elif status.error is not None:
        view["error"] = f"{type(status.error).__name__}: {status.error}"
    return view
