"""Experiment: where do credentials live when durable workflows need them?

Workflows call a users API that needs a token. Fetching the token is slow, so the
process caches it. Where must that cache live so that (a) the token is fetched once
per process, (b) a workflow recovered after a crash still gets a token, and (c) the
token never ends up in the DBOS system database or the logs?

Run it, what to observe and what it means: docs/fastapi_scope_cache.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from dbos import DBOS
from fastapi import FastAPI, Query

from lab.config import Environ, ServeSettings, text_env
from lab.launch import SettingsAtStart, dbos_lifespan, serve
from lab.logs import uvicorn_logging
from lab.views import workflow_view

APP = "fastapi-scope-cache"
log = logging.getLogger("fastapi_scope_cache")

# uvicorn logs its first lines before the lifespan runs: JSON for those too (no DBOS,
# no database at import; an importer's own logging is left alone).
uvicorn_logging(APP)

PROVIDER_SECONDS = 0.5
DEFAULT_PAGES, MAX_PAGES = 5, 10
DEFAULT_USERS_PER_PAGE, MAX_USERS_PER_PAGE = 3, 10
DEFAULT_STEP_SECONDS, MAX_STEP_SECONDS = 0.0, 0.5


@dataclass(frozen=True)
class CacheSettings(ServeSettings):
    # CREDENTIALS_SECRET: what the demo provider returns; empty: a random one per process.
    credentials_secret: str = field(default="", repr=False)

    @classmethod
    def load(cls, env: Environ = os.environ) -> CacheSettings:
        serve = ServeSettings.load(env)
        return cls(serve.database, serve.port, text_env("CREDENTIALS_SECRET", env=env))


settings = SettingsAtStart(CacheSettings.load)

# --- credentials: process memory only ------------------------------------------

# Workflow and step arguments and return values are written to the system database
# and replayed on recovery: a token passed that way would be stored in clear and
# replayed after it expired. So code that needs the token calls get_credentials(),
# which fills this cache on first use in whichever process runs the code.

credentials_cache: dict[str, str] = {}
cache_stats = {"fetches": 0, "hits": 0}
_cache_lock = threading.Lock()
_random_secret: str | None = None


def fingerprint(secret: str) -> str:
    """What may be logged about a secret: enough to tell two apart, not to recover one."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def fetch_from_provider() -> str:
    """The demo credentials provider: slow, like a secrets manager."""
    global _random_secret
    time.sleep(PROVIDER_SECONDS)
    secret = settings.get().credentials_secret
    if secret:
        return secret
    if _random_secret is None:
        _random_secret = secrets.token_hex(16)
    return _random_secret


def get_credentials() -> str:
    """The token, from the cache or (first use in this process) from the provider."""
    with _cache_lock:  # concurrent workflows: one fetch, the others wait for it
        token = credentials_cache.get("users_api")
        if token is not None:
            cache_stats["hits"] += 1
            return token
        cache_stats["fetches"] += 1
        token = fetch_from_provider()
        credentials_cache["users_api"] = token
    log.info("credentials fetched", extra={"credentials_fingerprint": fingerprint(token)})
    return token


def clear_cache() -> None:
    with _cache_lock:
        credentials_cache.clear()


def _authorize(token: str) -> None:
    """Stand-in for the users API checking the token on every call."""
    if not token:
        raise PermissionError("users API: no credentials")


# --- workflows: the token is used, never passed, returned or logged -------------


@DBOS.workflow()
def get_users(pages: int, users_per_page: int, step_seconds: float) -> dict[str, Any]:
    token = get_credentials()  # on every execution, recovery included; never recorded
    _authorize(token)
    log.info(
        "get_users",
        extra={"pages": pages, "credentials_fingerprint": fingerprint(token)},
    )
    described = 0
    for page in range(1, pages + 1):
        described += get_users_page(page, users_per_page, step_seconds)
    return {"pages": pages, "users_per_page": users_per_page, "users_described": described}


@DBOS.workflow()
def get_users_page(page: int, users_per_page: int, step_seconds: float) -> int:
    _authorize(get_credentials())
    for number in range(1, users_per_page + 1):
        describe_user(page, f"user-{page}-{number}", step_seconds)
    return users_per_page


@DBOS.step()
def describe_user(page: int, user: str, step_seconds: float) -> dict[str, Any]:
    _authorize(get_credentials())
    log.info("describe_user", extra={"page": page, "user": user})
    time.sleep(step_seconds)
    return {"page": page, "user": user, "description": f"{user} (page {page})"}


# --- the app -----------------------------------------------------------------------


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    # Not warmed: the lazy path is the one recovery depends on, and a provider outage
    # does not stop the server from starting.
    clear_cache()  # before launch: recovered workflows fetch on first use
    async with dbos_lifespan(APP, settings):
        yield
    clear_cache()  # no secret in memory once no workflow can use it


app = FastAPI(
    title="fastapi_scope_cache",
    summary="A credentials cache outside workflow state; DBOS in the lifespan.",
    lifespan=lifespan,
)


# `DBOS.start_workflow_async` only takes `async def` workflows; `get_users` is sync,
# so this is a `def` endpoint (it returns as soon as the workflow has started).
# response_model=None: FastAPI would validate a `def` endpoint's answer on the same
# thread pool, queued behind every request not yet started (see fastapi_scope.py).
@app.post("/trigger_async", status_code=202, response_model=None)
def trigger_async(
    pages: Annotated[
        int, Query(ge=1, le=MAX_PAGES, description=f"pages to walk, 1..{MAX_PAGES}")
    ] = DEFAULT_PAGES,
    users_per_page: Annotated[
        int,
        Query(
            ge=1,
            le=MAX_USERS_PER_PAGE,
            description=f"users on each page, 1..{MAX_USERS_PER_PAGE}",
        ),
    ] = DEFAULT_USERS_PER_PAGE,
    step_seconds: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_STEP_SECONDS,
            description=f"sleep in each describe_user step, 0..{MAX_STEP_SECONDS} s",
        ),
    ] = DEFAULT_STEP_SECONDS,
) -> dict[str, Any]:
    """Start ``get_users``; poll ``GET /workflows/{workflow_id}`` for its result."""
    handle = DBOS.start_workflow(get_users, pages, users_per_page, step_seconds)
    return {"workflow_id": handle.workflow_id, "status": handle.get_status().status}


@app.get("/cache")
def cache() -> dict[str, Any]:
    """This process's credentials cache: counts only, never the secret."""
    with _cache_lock:
        return {**cache_stats, "cached": "users_api" in credentials_cache}


@app.get("/workflows/{workflow_id}", responses={404: {"description": "no workflow with this id"}})
async def get_workflow(workflow_id: str) -> dict[str, Any]:
    """Status of any workflow, from the database (also runs from before a restart)."""
    return await workflow_view(workflow_id)


def main() -> None:
    serve(app, APP, settings)


if __name__ == "__main__":
    main()
