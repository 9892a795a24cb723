# The shutdown demo (fastapi_scope_shutdown.py) served by uvicorn on $HOST:$PORT
# (0.0.0.0:8000), keeping its workflows in Postgres.
#
#   docker build -t experiment6 .
#   export SHUTDOWN_TOKEN=$(openssl rand -hex 16)
#   docker run --rm -p 8000:8000 --add-host=host.docker.internal:host-gateway \
#     -e DBOS_SYSTEM_DATABASE_URL=postgresql://postgres:dbos@host.docker.internal:5432/experiment6 \
#     -e SHUTDOWN_TOKEN experiment6
#   (or `docker compose up`: docker-compose.yml adds the Postgres)
#
# tests/test_container.py builds this file unmodified on a real Docker engine and
# runs the image (health, fan-out, crash and restart, docker stop, PORT, a database
# outage, compose); `pip freeze` in the image must equal requirements-service.txt, and
# the image must stay within 200 MB.

# A tag, not a digest: patch releases of 3.12 and Debian security fixes arrive on rebuild.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# The service lock: what the demo, shutdown/ and lab/ import, nothing of the other experiments
# (integration.py's S3 libraries stay out); every package at the version the tests ran
# (the runtime lock the tests install is constrained to it), each with its hashes
# (--require-hashes refuses anything unlisted or altered). Installed before the code
# is copied, so editing the code reuses this layer. The app user is a regular one
# (uid 10001 is above the system range) with a home of its own.
COPY requirements-service.txt .
RUN pip install --no-cache-dir --require-hashes -r requirements-service.txt \
    && pip check \
    && groupadd --gid 10001 app \
    && useradd --no-log-init --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app

# Only what the shutdown demo needs: the script, shutdown/ (its own package, with the
# page's static files) and lab/ (what the experiments share); owned by root, so the app cannot change its code.
# dbos-config.yaml serves the DBOS CLI inside the container (dbos workflow list).
COPY dbos-config.yaml fastapi_scope_shutdown.py ./
COPY lab/ lab/
COPY shutdown/ shutdown/

# The system database. DBOS_SYSTEM_DATABASE_URL wins when given (-e at run time);
# left empty, lab/config.py composes postgresql://PGUSER:PGPASSWORD@PGHOST:PGPORT/PGDATABASE
# from the libpq variables below (the ones every Postgres client reads): the
# default host is the Docker host (Docker Desktop names it; on Linux add
# --add-host=host.docker.internal:host-gateway). PGPASSWORD has no default: a
# password does not belong in an image layer (docker run -e PGPASSWORD=...).
# HOST and PORT: where uvicorn listens (docker run -e PORT=9000; the HEALTHCHECK
# follows PORT and asks 127.0.0.1, so HOST must include the loopback).
ENV DBOS_SYSTEM_DATABASE_URL="" \
    PGHOST=host.docker.internal \
    PGPORT=5432 \
    PGUSER=postgres \
    PGDATABASE=experiment6 \
    HOST=0.0.0.0 \
    PORT=8000

# Numeric, so "runAsNonRoot" checks (Kubernetes) can verify it without /etc/passwd.
USER 10001:10001

EXPOSE 8000

# python:3.12-slim has no curl; urlopen raises (exit 1) on a refused connection or a
# non-2xx answer, and /healthz answers 200 only once DBOS has launched and the
# database answers (503 within 3 s while it does not: the container turns unhealthy).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('PORT') or '8000'), timeout=4)"]

# PID 1 is dumb-init (from requirements-service.txt): the kernel drops a SIGKILL, and
# any signal without a handler, that PID 1 gets from inside the container, so with
# uvicorn as PID 1 /shutdown?mode=crash would not kill it. The shell only reads HOST
# and PORT and replaces itself with uvicorn (exec), so dumb-init forwards docker
# stop's SIGTERM straight to uvicorn, which stops accepting requests, gives open ones
# 3 s, then the app's shutdown gives running workflows 5 s (DBOS.destroy): both fit
# in docker stop's 10 s before SIGKILL. Exit status 143 (uvicorn re-raises SIGTERM)
# is that clean stop. One server process: scale with replicas, each process claims
# its own executor slot (see fastapi_scope_shutdown.py).
ENTRYPOINT ["dumb-init", "--"]
CMD ["sh", "-c", "exec uvicorn fastapi_scope_shutdown:app --host \"${HOST:-0.0.0.0}\" --port \"${PORT:-8000}\" --timeout-graceful-shutdown 3"]
