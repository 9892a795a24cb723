"""The settings: one loader (lab/config.py), one typed object per app, read at start.

envrc-template lists exactly what the settings objects read (plus what only the tests
or boto3 read), and the loader rejects a bad value with the one line the scripts
print. No server: each object is loaded from a plain mapping.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import fastapi_scope_cache
import integration
from lab.config import (
    CONFIG_NAME,
    CONNECT_TIMEOUT_SEC,
    SQLITE_NOTIFY_POLL_SEC,
    ConfigError,
    DatabaseSettings,
    ServeSettings,
    dbos_config,
    int_env,
    text_env,
)
from shutdown import pool
from shutdown.settings import MAX_MAX_QUEUED_STEPS, MAX_SLOTS, ShutdownSettings
from shutdown.slots import REJOIN_ENV

REPO = Path(__file__).resolve().parents[1]
PG = "postgresql://u:pw@db.example:5432/experiment6"

LOADERS: dict[str, Callable[..., Any]] = {
    "DatabaseSettings": DatabaseSettings.load,
    "ServeSettings": ServeSettings.load,
    "CacheSettings": fastapi_scope_cache.CacheSettings.load,
    "IntegrationSettings": integration.IntegrationSettings.load,
    "ShutdownSettings": ShutdownSettings.load,
}

# In envrc-template, read by no settings object, and why.
TESTS_ONLY = {"DBOS_TEST_DATABASE_URL", "CI"}  # tests/conftest.py
BOTO3_OWN = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # boto3 reads the keys itself
# Read by a settings object, absent from envrc-template: the shutdown demo sets it
# itself when it re-executes after a fence; a user never does.
INTERNAL = {REJOIN_ENV}


class Recording(dict[str, str]):
    """An environment that remembers every name looked up in it."""

    def __init__(self, **values: str) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def read_by_settings() -> dict[str, set[str]]:
    """Variable -> the settings objects that read it: each loaded from a URL, and from
    the PG* variables (read only when PGHOST is set)."""
    read: dict[str, set[str]] = {}
    for name, load in LOADERS.items():
        for env in (Recording(DBOS_SYSTEM_DATABASE_URL=PG), Recording(PGHOST="db.example")):
            load(env)
            for var in env.read:
                read.setdefault(var, set()).add(name)
    return read


def template_variables() -> set[str]:
    """Every ``export VAR=`` of envrc-template, active or commented out."""
    text = (REPO / "envrc-template").read_text()
    return set(re.findall(r"^#?\s*export ([A-Za-z_][A-Za-z0-9_]*)=", text, re.M))


# --- envrc-template against the settings objects ------------------------------------


def test_every_variable_a_settings_object_reads_is_in_envrc_template() -> None:
    read = read_by_settings()
    # What must be seen, so an empty result cannot pass.
    assert {"DBOS_SYSTEM_DATABASE_URL", "PGHOST", "PGPASSWORD", "WORKERS", "FIB_LEDGER"} <= set(
        read
    )
    missing = {var: by for var, by in read.items() if var not in template_variables()}
    assert set(missing) == INTERNAL, f"read by settings, absent from envrc-template: {missing}"


def test_every_variable_in_envrc_template_is_read_by_a_settings_object_or_listed() -> None:
    read = set(read_by_settings())
    listed = template_variables()
    unread = listed - read - TESTS_ONLY - BOTO3_OWN
    assert not unread, f"in envrc-template, read by no settings object: {unread}"
    # The exceptions are honest: listed in the template, and really not settings.
    assert TESTS_ONLY | BOTO3_OWN <= listed
    assert not (TESTS_ONLY | BOTO3_OWN) & read


# --- the loader -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5", "many", "1000001", "2.5"])
def test_a_bad_whole_number_is_one_line_naming_the_variable_range_and_value(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ShutdownSettings.load({"DBOS_SYSTEM_DATABASE_URL": PG, "MAX_QUEUED_STEPS": value})
    assert str(raised.value) == (
        f"MAX_QUEUED_STEPS must be a whole number from 1 to {MAX_MAX_QUEUED_STEPS}, got {value!r}"
    )


def test_empty_or_blank_means_the_default_and_values_are_stripped() -> None:
    assert int_env("PORT", 8000, 1, 65535, env={"PORT": "  "}) == 8000
    assert int_env("PORT", 8000, 1, 65535, env={"PORT": " 8080 "}) == 8080
    assert text_env("HOST", "127.0.0.1", env={"HOST": ""}) == "127.0.0.1"
    assert text_env("HOST", "127.0.0.1", env={"HOST": " 0.0.0.0 "}) == "0.0.0.0"


def test_the_shutdown_demo_defaults() -> None:
    settings = ShutdownSettings.load({"DBOS_SYSTEM_DATABASE_URL": PG})
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8000, 2)
    assert settings.fib_processes == pool.usable_cores()
    assert settings.max_queued_steps == 500
    assert (settings.shutdown_token, settings.fib_ledger, settings.rejoin) == ("", "", None)


@pytest.mark.usefixtures("sqlite_supported")
def test_workers_default_to_one_on_sqlite_and_several_need_postgres(tmp_path: Path) -> None:
    sqlite = f"sqlite:///{tmp_path / 'x.sqlite'}"
    assert ShutdownSettings.load({"DBOS_SYSTEM_DATABASE_URL": sqlite}).workers == 1
    with pytest.raises(ConfigError) as raised:
        ShutdownSettings.load({"DBOS_SYSTEM_DATABASE_URL": sqlite, "WORKERS": "2"})
    assert str(raised.value) == (
        "WORKERS=2 needs Postgres (DBOS_SYSTEM_DATABASE_URL=postgresql://...): "
        "SQLite takes one process"
    )


def test_a_worker_process_computes_the_workers_main_did() -> None:
    # A uvicorn worker inherits main()'s environment and loads it with the same loader.
    for env in ({"DBOS_SYSTEM_DATABASE_URL": PG}, {"DBOS_SYSTEM_DATABASE_URL": PG, "WORKERS": "3"}):
        assert ShutdownSettings.load(dict(env)).workers == ShutdownSettings.load(env).workers
    with pytest.raises(ConfigError) as raised:
        ShutdownSettings.load({"DBOS_SYSTEM_DATABASE_URL": PG, "WORKERS": str(MAX_SLOTS + 1)})
    assert str(raised.value) == f"WORKERS must be a whole number from 1 to {MAX_SLOTS}, got '33'"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "not a url",
            "DBOS_SYSTEM_DATABASE_URL is not a database URL "
            "(expected postgresql://user:password@host:port/dbname or sqlite:///file.sqlite)",
        ),
        (
            "mysql://u@h/d",
            "DBOS_SYSTEM_DATABASE_URL uses 'mysql'; DBOS supports postgresql:// and sqlite://",
        ),
        ("postgresql://u@h:5432", "DBOS_SYSTEM_DATABASE_URL names no database (add /dbname)"),
        ("sqlite://", "DBOS_SYSTEM_DATABASE_URL names no SQLite file"),
    ],
)
def test_a_bad_database_url_is_one_line_saying_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        DatabaseSettings.load({"DBOS_SYSTEM_DATABASE_URL": url})
    assert str(raised.value) == message


def test_the_pg_variables_compose_the_url_and_the_url_wins() -> None:
    pg = {"PGHOST": "db", "PGPASSWORD": "pw", "PGPORT": "6543", "PGUSER": "me"}
    assert DatabaseSettings.load(pg).url == f"postgresql://me:pw@db:6543/{CONFIG_NAME}"
    defaults = DatabaseSettings.load({"PGHOST": "db"})
    assert defaults.url == f"postgresql://postgres@db:5432/{CONFIG_NAME}"
    assert DatabaseSettings.load({**pg, "DBOS_SYSTEM_DATABASE_URL": PG}).url == PG
    with pytest.raises(ConfigError) as raised:
        DatabaseSettings.load({"PGHOST": "db", "PGPORT": "x"})
    assert str(raised.value) == "PGPORT must be a whole number from 1 to 65535, got 'x'"


def test_no_secret_in_a_settings_object_s_repr() -> None:
    env = {
        "DBOS_SYSTEM_DATABASE_URL": PG,
        "SHUTDOWN_TOKEN": "token-42",
        "CREDENTIALS_SECRET": "secret-42",
    }
    for load in (ShutdownSettings.load, fastapi_scope_cache.CacheSettings.load):
        shown = repr(load(env))
        assert "pw" not in shown
        assert "-42" not in shown
    assert ShutdownSettings.load(env).database.redacted == PG.replace(":pw@", ":***@")


def test_the_dbos_config_polls_sqlite_often_and_bounds_the_connect_time_on_postgres() -> None:
    on_sqlite = dbos_config("scope", DatabaseSettings("sqlite:///x.sqlite"))
    on_postgres = dbos_config("scope", DatabaseSettings("postgresql://u@h:5432/d", "w-1"))
    assert on_sqlite["notification_listener_polling_interval_sec"] == SQLITE_NOTIFY_POLL_SEC
    assert on_sqlite["db_engine_kwargs"] == {}
    assert "notification_listener_polling_interval_sec" not in on_postgres  # LISTEN/NOTIFY
    assert on_postgres["db_engine_kwargs"]["connect_args"] == {
        "application_name": f"{CONFIG_NAME}-scope",
        "connect_timeout": CONNECT_TIMEOUT_SEC,
    }
    assert (on_postgres["name"], on_postgres["executor_id"]) == (f"{CONFIG_NAME}-scope", "w-1")
