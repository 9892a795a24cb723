"""The machinery two or more experiment scripts share, one module per concern.

config   the one settings loader and the shared settings (database, port), the DBOS
         config, the one URL -> psycopg2 mapping, the SQLite version check
logs     JSON logging, the one-line fatal error an entry point reports
launch   launching DBOS, resuming an interrupted run, serving a FastAPI app
cli      the flags and the run of the scope experiments, the flag parser
views    the shared ``GET /workflows/{id}`` answer
signals  stopping a server gracefully, crashing it, or crashing a script

What only the shutdown demo uses lives in its own package, ``shutdown/``.
"""
