"""Launching DBOS, resuming an interrupted run, serving. Failures raise
``LaunchError`` (one line); the entry point reports it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

from dbos import DBOS, DBOSClient, WorkflowStatus

from lab.config import (
    ConfigError,
    ServeSettings,
    database_kind,
    dbos_config,
    pg_connect_args,
    redacted,
)
from lab.logs import exit_on_config_error, log, setup_logging

T_co = TypeVar("T_co", covariant=True)


class SettingsAtStart(Generic[T_co]):
    """An app's settings, read from the environment once per process, at start: by
    ``main()``, else by the lifespan (``uvicorn <app>:app``, or each of uvicorn's
    worker processes). A bad value ends the process with its one line."""

    def __init__(self, load: Callable[[], T_co]) -> None:
        self._load = load
        self._value: T_co | None = None

    def get(self) -> T_co:
        if self._value is None:
            with exit_on_config_error():
                self._value = self._load()
        return self._value

    def forget(self) -> None:
        """At the end of a start: a start again in this process (a lifespan run anew,
        as the in-process tests do) reads the environment anew."""
        self._value = None


class LaunchError(ConfigError):
    """DBOS cannot start here (the database is unreachable, the launch failed): a
    problem the user fixes in the environment, reported as one line."""


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
            return not record.getMessage().startswith("DBOS failed to launch")

    logging.getLogger("dbos").addFilter(_NoTraceback())


def launch(config: dict[str, Any]) -> None:
    """Construct and launch DBOS; ``LaunchError`` with one line if it cannot start."""
    _quiet_launch_traceback()
    try:
        DBOS(config=config)  # type: ignore[arg-type]
        DBOS.launch()
    except Exception as exc:  # noqa: BLE001 - any launch failure is the one line
        raise LaunchError(launch_error(exc)) from None


def check_reachable(url: str) -> None:
    """``LaunchError`` if the Postgres server cannot be reached (SQLite always can)."""
    if database_kind(url) != "postgres":
        return
    import psycopg2

    try:
        psycopg2.connect(**pg_connect_args(url)).close()
    except psycopg2.OperationalError as exc:
        text = str(exc).strip().splitlines()[0]
        if "does not exist" in text:
            return  # DBOS creates the system database on first launch
        raise LaunchError(f"cannot reach the system database {redacted(url)}: {text}") from None


async def launch_async(config: dict[str, Any]) -> None:
    """``check_reachable`` + ``launch`` for a FastAPI lifespan.

    The sync DBOS APIs refuse to run on the event loop: construct and launch on a thread.
    """
    await asyncio.to_thread(check_reachable, config["system_database_url"])
    await asyncio.to_thread(launch, config)


def pending_before_launch(config: dict[str, Any], workflow: Callable[..., Any]) -> list[str]:
    """Ids of this application's PENDING runs of ``workflow`` on this executor.

    Read *before* ``DBOS.launch()``, which recovers them on a background thread
    (and may finish them before we could look again).
    """
    try:
        client = DBOSClient(system_database_url=config["system_database_url"])
    except Exception:  # noqa: BLE001 - a fresh database has nothing to resume
        return []
    try:
        runs = client.list_workflows(
            name=getattr(workflow, "__qualname__", workflow.__name__),
            status="PENDING",
            executor_id=config.get("executor_id") or "local",
            application_name=config["name"],
            load_input=False,
            load_output=False,
        )
        return [w.workflow_id for w in runs if w.app_version]
    except Exception:  # noqa: BLE001 - no tables yet: nothing to resume
        return []
    finally:
        client.destroy()


def launch_recovering(
    config: dict[str, Any],
    workflow: Callable[..., Any],
    on_launch: Callable[[], None] | None = None,
) -> WorkflowStatus | None:
    """Launch DBOS, then call ``on_launch`` (an experiment registers its queues
    there: after launch, before any run is resumed or started). Returns the latest
    interrupted run of ``workflow`` this launch recovers (with its input), or None.

    DBOS recovers PENDING workflows of the same executor id and application
    version; a run left by older code (another version) is not resumed.
    """
    check_reachable(config["system_database_url"])
    pending = pending_before_launch(config, workflow)
    launch(config)
    if on_launch is not None:
        on_launch()
    if not pending:
        return None
    mine = DBOS.list_workflows(
        workflow_ids=pending,
        app_version=DBOS.application_version,
        load_input=True,
        load_output=False,
    )
    return max(mine, key=lambda w: w.created_at or 0) if mine else None


def launch_and_resume(
    config: dict[str, Any],
    workflow: Callable[..., Any],
    *args: Any,
    on_launch: Callable[[], None] | None = None,
) -> tuple[Any, bool]:
    """Launch DBOS (``launch_recovering``), then wait for the interrupted run of
    ``workflow`` this launch recovers, else start a fresh one with ``args``.
    Returns ``(handle, recovered)``."""
    interrupted = launch_recovering(config, workflow, on_launch)
    if interrupted is not None:
        log.info("resuming interrupted workflow", extra={"workflow_id": interrupted.workflow_id})
        return DBOS.retrieve_workflow(interrupted.workflow_id), True
    return DBOS.start_workflow(workflow, *args), False


@asynccontextmanager
async def dbos_lifespan(name: str, settings: SettingsAtStart[ServeSettings]) -> AsyncIterator[None]:
    """A FastAPI experiment's DBOS: JSON logging, then DBOS launched for experiment
    ``name`` (or one line and exit) before the app serves; destroyed once it stops."""
    setup_logging(name)
    database = settings.get().database
    with exit_on_config_error():
        await launch_async(dbos_config(name, database))
    log.info("serving", extra={"database": database.redacted})
    try:
        yield
        await asyncio.to_thread(DBOS.destroy)
    finally:
        settings.forget()


def serve(app: Any, name: str, settings: SettingsAtStart[ServeSettings]) -> None:
    """``python <app>.py``: JSON logging for experiment ``name``, its settings (or one
    line), then ``app`` served on 127.0.0.1 at ``PORT`` with our logging instead of
    uvicorn's log config."""
    import uvicorn

    setup_logging(name)
    port = settings.get().port
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None)
