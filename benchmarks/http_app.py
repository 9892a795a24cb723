"""The shutdown demo plus one no-op route, for the HTTP latency row (row 5).

    python -m benchmarks.http_app        # PORT, HOST, DBOS_SYSTEM_DATABASE_URL as for the demo

The demo's app, unchanged, served the way ``python fastapi_scope_shutdown.py``
serves one process (``uvicorn.run(app, log_config=None)``), with ``GET
/_bench/noop`` added. Why not the demo's ``/healthz``: it is the health check,
free to grow (it parses the database URL today and could ping the database
tomorrow); the benchmark wants the floor of the HTTP stack itself, an ``async
def`` route like ``POST /trigger_async`` that returns a constant. Both routes pass
through the same server, middleware, JSON access log and event loop.
"""

from __future__ import annotations

import os

from fastapi_scope_shutdown import app

NOOP_PATH = "/_bench/noop"


async def noop() -> dict[str, str]:
    return {"status": "ok"}


app.add_api_route(NOOP_PATH, noop, methods=["GET"], include_in_schema=False)


def main() -> None:
    import uvicorn

    host = os.environ.get("HOST", "").strip() or "127.0.0.1"
    port = int(os.environ.get("PORT", "8000"))
    uvicorn.run(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
