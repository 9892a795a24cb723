"""JSON logging: every stdout line is one JSON object, DBOS's and uvicorn's included."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from dbos import DBOS
from pythonjsonlogger.json import JsonFormatter

from lab.config import ConfigError, app_name

log = logging.getLogger("experiment6")

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
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")


class _ContextFilter(logging.Filter):
    """Adds ``workflow_id``, ``step_number`` and ``app_name`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
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


def _json_handler() -> logging.Handler:
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
    return handler


def setup_logging(app: str, level: int = logging.INFO) -> None:
    """Route every logger (ours, DBOS's, uvicorn's) to one JSON handler on stdout.

    Call before ``DBOS(config=...)``: DBOS only adds its own plain-text console
    handler when the ``dbos`` logger has none.
    """
    global _app_name
    _app_name = app_name(app)
    root = logging.getLogger()
    root.handlers[:] = [_json_handler()]
    root.setLevel(level)
    # DBOS, uvicorn: no handlers of their own, so each record is printed once, as JSON.
    dbos_logger = logging.getLogger("dbos")
    dbos_logger.handlers[:] = [logging.NullHandler()]
    dbos_logger.propagate = True
    for name in _UVICORN:
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def uvicorn_logging(app: str) -> None:
    """JSON for uvicorn's own lines, for an app module to call at import.

    ``uvicorn module:app`` logs its first lines ("Started server process") after
    importing the app and before the lifespan runs (which calls ``setup_logging``).
    Only uvicorn's loggers are touched, so a program that imports the app for its
    constants keeps its own logging.
    """
    global _app_name
    _app_name = app_name(app)
    top = logging.getLogger("uvicorn")
    top.handlers[:] = [_json_handler()]
    top.propagate = False
    if top.level == logging.NOTSET or top.level > logging.INFO:
        top.setLevel(logging.INFO)
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = True  # to "uvicorn"
    error = logging.getLogger("uvicorn.error")
    error.handlers[:] = []
    error.propagate = True


def fail(message: str, code: int = 2) -> NoReturn:
    """Report a fatal problem as one JSON line and exit."""
    log.error(message)
    logging.shutdown()
    os._exit(code)


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """For an entry point (``main()``, a lifespan): a ``ConfigError`` raised inside,
    a problem the user can fix, ends the process with its one line (``fail``)."""
    try:
        yield
    except ConfigError as exc:
        fail(str(exc))
