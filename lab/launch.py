"""Launching DBOS (or one clear error line), resuming an interrupted run, serving."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from lab.config import config_or_exit, database_kind, int_env, pg_connect_args, redacted
from lab.logs import fail, log


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

    try:
        psycopg2.connect(**pg_connect_args(url)).close()
    except psycopg2.OperationalError as exc:
        text = str(exc).strip().splitlines()[0]
        if "does not exist" in text:
            return  # DBOS creates the system database on first launch
        fail(f"cannot reach the system database {redacted(url)}: {text}")


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
    from dbos import DBOSClient

    try:
        client = DBOSClient(system_database_url=config["system_database_url"])
    except Exception:  # noqa: BLE001 - a fresh database has nothing to resume
        return []
    try:
        runs = client.list_workflows(
            name=getattr(workflow, "__qualname__", workflow.__name__),
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


def serve(app: Any) -> None:
    """``python <app>.py``: serve ``app`` on 127.0.0.1, port ``PORT`` (default 8000),
    with our JSON logging instead of uvicorn's log config."""
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int_env("PORT", 8000, 1, 65535), log_config=None)
