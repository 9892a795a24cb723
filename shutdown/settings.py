"""The shutdown demo's settings: read from the environment once, at start (``main()``,
or the lifespan when uvicorn imports the app), through lab.config's one loader.

A uvicorn worker is a fresh interpreter that inherits the environment: it loads the
same settings with the same loader, so it computes the same ``workers`` as the
``main()`` that started it (the default depends only on the database kind); nothing is
handed on by writing ``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lab.config import (
    PORT_RANGE,
    ConfigError,
    DatabaseSettings,
    Environ,
    int_env,
    text_env,
)
from shutdown import pool
from shutdown.slots import REJOIN_ENV

# Executor slots (shutdown/slots.py): at most this many processes serve one database,
# so WORKERS is at most this too.
MAX_SLOTS = 32
# Admitted steps not finished yet, across the service (shutdown/admission.py). The
# default drains in about a minute at the demo's DRAIN_STEPS_PER_SEC: 500 steps (ten
# default fan-outs, or one of MAX_STEPS) take about 66 s.
DEFAULT_MAX_QUEUED_STEPS, MAX_MAX_QUEUED_STEPS = 500, 1_000_000


@dataclass(frozen=True)
class ShutdownSettings:
    database: DatabaseSettings
    host: str = "127.0.0.1"  # HOST; 0.0.0.0 serves the network
    port: int = 8000  # PORT
    # WORKERS: uvicorn worker processes; several need Postgres (SQLite takes one).
    workers: int = 1
    fib_processes: int = 1  # FIB_PROCESSES: each server's pool; default the usable cores
    max_queued_steps: int = DEFAULT_MAX_QUEUED_STEPS  # MAX_QUEUED_STEPS: the 429 bound
    # SHUTDOWN_TOKEN: POST /shutdown's bearer token; empty disables the endpoint.
    shutdown_token: str = field(default="", repr=False)
    # FIB_LEDGER: a file each fib_step body appends a line to before it runs, the
    # tests' witness of body executions (why a ledger: docs/fastapi_scope_shutdown.md).
    fib_ledger: str = ""
    # REJOIN_ENV, set by this process itself when it re-executes after a fence (never
    # by a user): the slot and owner it had.
    rejoin: str | None = None

    @classmethod
    def load(cls, env: Environ = os.environ) -> ShutdownSettings:
        """The settings, or ``ConfigError`` with one line naming the first bad one."""
        host = text_env("HOST", "127.0.0.1", env=env)
        port = int_env("PORT", 8000, *PORT_RANGE, env=env)
        database = DatabaseSettings.load(env)
        postgres = database.kind == "postgres"
        workers = int_env("WORKERS", 2 if postgres else 1, 1, MAX_SLOTS, env=env)
        fib_processes = int_env(
            "FIB_PROCESSES", pool.usable_cores(), 1, pool.MAX_PROCESSES, env=env
        )
        max_queued_steps = int_env(
            "MAX_QUEUED_STEPS", DEFAULT_MAX_QUEUED_STEPS, 1, MAX_MAX_QUEUED_STEPS, env=env
        )
        if workers > 1 and not postgres:
            raise ConfigError(
                f"WORKERS={workers} needs Postgres (DBOS_SYSTEM_DATABASE_URL=postgresql://...): "
                "SQLite takes one process"
            )
        token = text_env("SHUTDOWN_TOKEN", env=env)
        ledger = text_env("FIB_LEDGER", env=env)
        rejoin = text_env(REJOIN_ENV, env=env) or None
        return cls(
            database, host, port, workers, fib_processes, max_queued_steps, token, ledger, rejoin
        )
