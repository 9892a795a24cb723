"""The apps' own constants and limits.

Limits are read from the app modules themselves, never copied, parsed or hard-coded::

    from harness.apps import shutdown_app
    shutdown_app.GRACE_SECONDS, shutdown_app.MAX_STEPS

Importing an app registers its workflows with DBOS (harmless: nothing here launches
DBOS) and sets up the app's JSON logging on stdout; ``load`` puts the importer's
logging back as it was, so a test run or a benchmark table is not turned into JSON.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType


def load(name: str) -> ModuleType:
    """Import the app module ``name`` and leave this process's logging as it was."""
    names = ("", "dbos", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {
        n: (lg.handlers[:], lg.level, lg.propagate) for n in names for lg in [logging.getLogger(n)]
    }
    try:
        return importlib.import_module(name)
    finally:
        for n, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(n)
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


scope_app = load("fastapi_scope")
cache_app = load("fastapi_scope_cache")
shutdown_app = load("fastapi_scope_shutdown")
