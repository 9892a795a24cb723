"""A script's environment, and the secrets handed to scripts.

Every secret a test, a benchmark or the reliability suite hands a script is remembered
here; the tests then check (tests/conftest.py), after every test, that none of them
reached a log, a script's output or a system database.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

# Variables the scripts read; the harness sets them explicitly, never inherits them.
_SCRUBBED = (
    "DBOS_SYSTEM_DATABASE_URL",
    "DBOS__VMID",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "SHUTDOWN_TOKEN",
    "CREDENTIALS_SECRET",
    "PORT",
    "HOST",
    "WORKERS",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)

SECRET_VARS = (
    "SHUTDOWN_TOKEN",
    "CREDENTIALS_SECRET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
known_secrets: set[str] = set()
# Logs and outputs of the current test, for the check after it.
outputs: list[str] = []
log_files: list[Path] = []


def script_env(db_url: str | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for a script: the given database and variables only."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["PYTHONUNBUFFERED"] = "1"
    if db_url is not None:
        env["DBOS_SYSTEM_DATABASE_URL"] = db_url
    env.update(extra)
    remember_secrets(env)
    return env


def remember_secrets(env: dict[str, str]) -> None:
    for name in SECRET_VARS:
        value = env.get(name, "")
        if len(value) >= 8:  # shorter values would match by accident
            known_secrets.add(value)


_BASE64 = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")


def secrets_in(data: str | bytes, secrets: set[str] | None = None) -> set[str]:
    """The secrets found in ``data``: as they are, or inside a base64 token (DBOS stores
    pickled inputs and outputs as base64, where a plain search would miss them)."""
    raw = data.encode() if isinstance(data, str) else data
    wanted = secrets if secrets is not None else known_secrets
    found = set()
    for secret in wanted:
        needles = (secret.encode(), base64.b64encode(secret.encode()).rstrip(b"="))
        if any(n in raw for n in needles):
            found.add(secret)
    if len(found) < len(wanted):
        for token in _BASE64.findall(raw):
            try:
                decoded = base64.b64decode(token + b"=" * (-len(token) % 4))
            except (binascii.Error, ValueError):
                continue
            found |= {s for s in wanted if s.encode() in decoded}
    return found
