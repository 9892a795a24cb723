"""The shutdown demo's own machinery (``fastapi_scope_shutdown.py`` runs on it).

settings   the demo's settings, read once at start
slots      executor slots: one executor id per live process (leases timed by the database)
health     the ``/healthz`` database check
pool       a process pool owned by the service, for CPU-bound steps: its lifecycle and
           the guard that ends its processes when the service dies
admission  admission control: a bound on the steps admitted and not yet finished
page       the live page (``GET /``) and the JSON it reads; static/ holds its files
fib        the CPU work, alone in its module: a pool process imports it and nothing of
           the app (this package imports nothing either)
"""
