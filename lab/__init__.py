"""The machinery two or more experiment scripts share, one module per concern.

config   the system database URL, the DBOS config, the one URL -> psycopg2 mapping,
         the SQLite version check
logs     JSON logging, the one-line fatal error
launch   launching DBOS, resuming an interrupted run, serving a FastAPI app
cli      the flags of the scope experiments
views    the shared ``GET /workflows/{id}`` answer
signals  stopping a server gracefully, crashing it, or crashing a script

What only the shutdown demo uses lives in its own package, ``shutdown/``.
"""
