"""The three FastAPI apps, imported for their own constants and limits.

    from harness.apps import shutdown_app
    shutdown_app.GRACE_SECONDS, shutdown_app.MAX_STEPS, shutdown_app.QUEUE_CONCURRENCY

Limits are read from the app modules themselves, never copied, parsed or hard-coded.
Importing an app registers its workflows with DBOS (nothing here launches DBOS) and
leaves the importer's logging alone (lab/logs.py: only uvicorn's loggers are set up at
import).
"""

from __future__ import annotations

import fastapi_scope as scope_app
import fastapi_scope_cache as cache_app
import fastapi_scope_shutdown as shutdown_app

__all__ = ["cache_app", "scope_app", "shutdown_app"]
