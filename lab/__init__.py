"""The machinery the experiment scripts share, one module per concern.

config   the system database URL, the DBOS config, the one URL -> psycopg2 mapping,
         the SQLite version check
logs     JSON logging, the one-line fatal error
launch   launching DBOS, resuming an interrupted run, serving a FastAPI app
cli      the flags of the scope experiments
views    the shared ``GET /workflows/{id}`` answer
slots    executor slots: one executor id per live process (leases timed by the database)
health   the ``/healthz`` database check
signals  stopping a server gracefully, crashing it, or crashing a script
pool     a process pool owned by a service, for CPU-bound steps: its lifecycle and
         the guard that ends its processes when the service dies
"""
