"""The harness the tests, the benchmarks and the reliability suite share.

One module per concern; nothing here imports from ``tests/``. The apps' constants and
limits are imported from the apps themselves (``import fastapi_scope_shutdown``,
``fastapi_scope_shutdown.GRACE_SECONDS``), never copied or parsed.

    harness.env        a script's environment, and the watch on the secrets handed to it
    harness.proc       run a script, wait for something, ports, process liveness, JSON lines
    harness.server     ``AppServer``: an app served in a subprocess, reached over HTTP
    harness.inprocess  a script's ``main`` or an app's lifespan run in the test process
    harness.clients    one client per app HTTP contract (scope, cache, shutdown)
    harness.fanout     the shutdown demo's fan-out: served, its rows, ledger and checks
    harness.db         queries on a system database, scratch databases, secret scans
    harness.faults     a loopback TCP proxy that breaks the network to Postgres on cue
    harness.replicas   several replicas of the shutdown demo, each behind its own proxy
    harness.measure    samplers and README placeholders the benchmarks and reliability share
    harness.report     progress lines on stderr, Markdown tables
    harness.pgcluster  a throwaway PostgreSQL cluster (``python -m harness.pgcluster``)
    harness.docker     the Docker engine for the container tests
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
