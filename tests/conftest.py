"""Fixtures: a real Postgres (fresh database per test) and a fresh SQLite file.

Postgres comes from ``DBOS_TEST_DATABASE_URL`` (a server URL; each test gets its
own database on it) or, when unset, from a throwaway cluster started from the
PostgreSQL binaries on this machine. Without either, Postgres tests skip with
the reason, except under ``CI=true`` where that is a failure.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import harness.docker as hd
from harness import REPO, pgcluster
from harness.db import ScratchDatabases, assert_no_secret_in_databases
from harness.env import SecretWatch, no_secret_leaks
from lab.config import ConfigError, check_sqlite_version


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Postgres server the tests may create databases on."""
    url = os.environ.get("DBOS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if pgcluster.find_bindir() is None:
        reason = "no Postgres: set DBOS_TEST_DATABASE_URL or install PostgreSQL server binaries"
        if _in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    datadir = tmp_path_factory.mktemp("pgcluster")
    try:
        url = pgcluster.start(datadir)
    except Exception as exc:  # noqa: BLE001
        if _in_ci():
            raise
        pytest.skip(f"could not start a throwaway Postgres cluster: {exc}")
    try:
        yield url
    finally:
        pgcluster.stop(datadir)


@pytest.fixture(autouse=True)
def secret_watch(tmp_path: Path) -> Iterator[SecretWatch]:
    """The test's secret watch (harness.env): after the test, no secret a script was
    given shows up in a server log, a script's output, or a ``*.log`` file of the
    test's temporary directory (the database fixtures check their databases)."""
    with no_secret_leaks(tmp_path) as watch:
        yield watch


@pytest.fixture
def pg_url(pg_server: str, tmp_path: Path, secret_watch: SecretWatch) -> Iterator[str]:
    """A fresh, empty database on the test server; checked for secrets and dropped
    afterwards."""
    scratch = ScratchDatabases(pg_server, prefix="t", directory=tmp_path)
    url = scratch.postgres()
    try:
        yield url
        assert_no_secret_in_databases(secret_watch.secrets, url)
    finally:
        failed = scratch.close()
        assert not failed, failed


@pytest.fixture
def sqlite_supported() -> None:
    """Skip, with the reason, where this interpreter's SQLite is too old for DBOS (on
    Python 3.12+ DBOS needs SQLite 3.42; some builds link an older one: lab/config.py).
    Tests that run a script on its default SQLite database use it too."""
    try:
        check_sqlite_version(sqlite3.sqlite_version, sys.version_info[:2])
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def sqlite_url(sqlite_supported: None, tmp_path: Path, secret_watch: SecretWatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    yield url
    assert_no_secret_in_databases(secret_watch.secrets, url)


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on a fresh Postgres database, once on SQLite."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return request.getfixturevalue("sqlite_url")


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project's image, built once per session from its Dockerfile as it is, on a
    real engine (CI must have one; elsewhere the container tests skip with the reason).
    Containers the session started are removed afterwards."""
    problem = hd.engine_problem()
    if problem:
        if _in_ci():
            pytest.fail(f"CI runs the container tests on a real engine: {problem}")
        pytest.skip(problem)
    tag = hd.image_tag()
    hd.build_image(tag, REPO, tmp_path_factory.mktemp("docker-build") / "build.txt")
    yield tag
    hd.remove_session_containers()
