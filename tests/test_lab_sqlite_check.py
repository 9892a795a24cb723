"""DBOS 3.4 on SQLite needs a new enough SQLite (lab/config.py): the scripts stop with
one line that says what is needed, why and what to do, before DBOS starts.

The version check takes the SQLite and Python versions as parameters; the subprocess
test runs a real script with only ``sqlite3.sqlite_version`` replaced by an old one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.config import ConfigError, check_sqlite_version

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("version", "python", "needed", "why"),
    [
        ("3.40.1", (3, 12), "3.42", "unixepoch('subsec')"),  # Debian 12's SQLite, Python 3.12
        ("3.41.2", (3, 13), "3.42", "unixepoch('subsec')"),
        ("3.34.1", (3, 11), "3.35", "RETURNING"),
    ],
)
def test_too_old_sqlite_is_one_line_saying_what_is_needed_why_and_what_to_do(
    version: str, python: tuple[int, int], needed: str, why: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        check_sqlite_version(version, python)
    message = str(raised.value)
    assert "\n" not in message
    py = f"{python[0]}.{python[1]}"
    assert message.startswith(f"SQLite {version} is too old: DBOS 3.4 on Python {py} ")
    assert f"needs SQLite >= {needed} " in message
    assert why in message
    assert "use Postgres (DBOS_SYSTEM_DATABASE_URL=postgresql://...)" in message
    assert f"or a Python whose sqlite3 module has SQLite {needed} or newer" in message


@pytest.mark.parametrize(
    ("version", "python"),
    [("3.42.0", (3, 12)), ("3.45.1", (3, 14)), ("3.40.1", (3, 11)), ("3.35.0", (3, 11))],
)
def test_new_enough_sqlite_passes(version: str, python: tuple[int, int]) -> None:
    check_sqlite_version(version, python)


# The exit of a real process; in the test process: test_class_instance_state.py and
# test_fan_out_in_one_process.py.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args"),
    [("scope.py", ["--steps", "1", "--step-seconds", "0"]), ("fastapi_scope_shutdown.py", [])],
)
def test_a_script_on_too_old_sqlite_stops_before_dbos_starts(
    script: str, args: list[str], tmp_path: Path
) -> None:
    # Too old on every Python DBOS supports (RETURNING needs 3.35).
    wrapper = (
        "import runpy, sqlite3, sys\n"
        "sqlite3.sqlite_version = '3.34.1'\n"
        f"sys.argv = [{script!r}, *{args!r}]\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    database = tmp_path / "old.sqlite"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DBOS"))}
    env.update(DBOS_SYSTEM_DATABASE_URL=f"sqlite:///{database}", WORKERS="1")
    proc = subprocess.run(
        [sys.executable, "-c", wrapper],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    assert lines[0]["severity"] == "ERROR"
    assert lines[0]["message"].startswith("SQLite 3.34.1 is too old: DBOS 3.4 on Python ")
    assert "use Postgres (DBOS_SYSTEM_DATABASE_URL=postgresql://...)" in lines[0]["message"]
    assert proc.stderr == ""
    assert not database.exists()  # DBOS never opened the database
