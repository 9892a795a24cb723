"""DBOS in the test process, as DBOS's own suite runs it: one instance at a time, on the
test's own database, destroyed after the test (the registry of decorated functions is
kept: the scripts register their workflows once, at import).

A script's ``main`` or an app's lifespan runs here unchanged, configured only through
the environment (``script_env``), with its JSON lines captured from stdout. What a new
process would start with (module counters) is reset by the test, and a crash that
needs no real process death is ``die``: the workflow's thread ends at that point and
DBOS records nothing more, so the run stays PENDING with the steps it checkpointed,
as a killed process leaves it; the next launch recovers it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest
from dbos import DBOS
from fastapi.testclient import TestClient

from harness.env import record_output, script_env
from harness.proc import ScriptResult, parse_json_lines

# Loggers the scripts' logging setup rewires (lab/logs.py, integration.py's quiet ones).
_REWIRED = ("dbos", "uvicorn", "uvicorn.error", "uvicorn.access", "werkzeug", "botocore", "boto3")


class ProcessDeath(BaseException):
    """Ends a workflow's thread the way a crash ends the process: DBOS's workflow
    wrapper records an ``Exception`` as the run's error, but lets a ``BaseException``
    through without recording anything."""


def die(**context: Any) -> NoReturn:
    """Stands in for ``lab.signals.crash`` (which ends the whole process)."""
    raise ProcessDeath(context)


def use_environment(monkeypatch: pytest.MonkeyPatch, db_url: str | None, **extra: str) -> None:
    """The environment a script would get from ``script_env``, set in this process
    (and restored by ``monkeypatch`` after the test)."""
    wanted = script_env(db_url, **extra)
    for name in set(os.environ) - set(wanted):
        monkeypatch.delenv(name)
    for name, value in wanted.items():
        monkeypatch.setenv(name, value)


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """Put back the handlers, filters and levels the scripts' logging setup replaces
    (their JSON handler writes to the stream captured for one run only)."""
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    saved = {
        name: (lg.handlers[:], lg.filters[:], lg.level, lg.propagate)
        for name in _REWIRED
        for lg in [logging.getLogger(name)]
    }
    try:
        yield
    finally:
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        for name, (handlers, filters, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.filters[:] = handlers, filters
            lg.setLevel(level)
            lg.propagate = propagate


class Output:
    """What the code run in this process printed on stdout (its JSON log lines)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def result(self) -> ScriptResult:
        text = self.stream.getvalue()
        record_output(text)  # searched for secrets when the open watch ends
        return ScriptResult(0, text, "", parse_json_lines(text))


@contextlib.contextmanager
def stdout_captured() -> Iterator[Output]:
    """Capture stdout while the block runs: a logging setup done inside it writes there."""
    output = Output()
    with contextlib.redirect_stdout(output.stream):
        yield output


class Exited(BaseException):
    """The code run here called ``os._exit(code)`` (``lab.logs.fail``): a process would
    have ended there, with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _exit(code: int) -> NoReturn:
    raise Exited(code)


def run_to_exit(entry_point: Callable[[], object]) -> ScriptResult:
    """Run, in this process, an entry point that must end its process early: a bad flag
    (argparse's ``SystemExit``) or a bad setting (``lab.logs.fail``'s ``os._exit``,
    which raises ``Exited`` here). Its exit code, stdout and stderr, as a
    ``ScriptResult``; returning normally is an ``AssertionError``."""
    errors = io.StringIO()
    with (
        stdout_captured() as output,
        contextlib.redirect_stderr(errors),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setattr(os, "_exit", _exit)
        try:
            entry_point()
        except Exited as exc:
            code = exc.code
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:
            raise AssertionError("the entry point returned instead of ending the process")
    out = output.result()
    record_output(errors.getvalue())
    return ScriptResult(code, out.stdout, errors.getvalue(), out.records)


def refused_flags(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, main: Callable[[list[str]], None], *argv: str
) -> str:
    """``python <script>.py argv`` in this process, run in ``workdir`` on the default
    (SQLite) database, with flags its parser must refuse: the parser's error (stderr).
    It exits with 2 and writes nothing to ``workdir``."""
    monkeypatch.chdir(workdir)
    use_environment(monkeypatch, None)
    result = run_to_exit(lambda: main(list(argv)))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert list(workdir.iterdir()) == []
    return result.stderr


def run_main(main: Callable[[list[str]], None], *argv: str) -> ScriptResult:
    """``python <script>.py argv``, in this process: its stdout as a ``ScriptResult``."""
    with stdout_captured() as output:
        main(list(argv))
    return output.result()


@contextlib.contextmanager
def registrations_restored() -> Iterator[None]:
    """Forget what a run registered at run time, as a process would on exit: the
    configured instances and datasources ``main`` created (integration.py's
    ``S3Inventory`` and its datasource; DBOS refuses a second instance under the same
    name, and a later launch would connect to a datasource of a dropped database), and
    the destroyed DBOS, which the registry would still count as launched (DBOS then
    refuses new datasources). DBOS has no public API for this; its own suite drops the
    whole registry, which would also drop what the scripts registered at import."""
    from dbos._dbos import _get_or_create_dbos_registry

    registry = _get_or_create_dbos_registry()
    instances, datasources = dict(registry.instance_info_map), list(registry.datasources)
    registry.dbos = None  # called with no DBOS alive (after DBOS.destroy)
    try:
        yield
    finally:
        registry.instance_info_map.clear()
        registry.instance_info_map.update(instances)
        registry.datasources[:] = datasources
        registry.dbos = None


@contextlib.contextmanager
def registry_in_use(registry: Any) -> Iterator[None]:
    """Make ``registry`` the one DBOS registers into and launches with, for the block.

    DBOS keeps one process-wide registry of decorated functions (``DBOS.destroy(
    destroy_registry=True)`` is its public way to drop it); swapping it is how two
    scripts that define the same names share a test process."""
    import dbos._dbos as internals

    saved = internals._dbos_global_registry
    internals._dbos_global_registry = registry
    try:
        yield
    finally:
        internals._dbos_global_registry = saved


def import_apart(name: str) -> tuple[ModuleType, Any]:
    """Import script ``name`` with its DBOS registrations in a registry of its own:
    ``scope.py`` and ``fastapi_scope.py`` both define ``A.run``, which one registry
    refuses. Returns the module and its registry (for ``registry_in_use``)."""
    from dbos._dbos import DBOSRegistry

    module = sys.modules.get(name)
    if module is None:
        fresh = DBOSRegistry()
        with registry_in_use(fresh):
            module = importlib.import_module(name)
        module._inprocess_registry = fresh  # type: ignore[attr-defined]
    registry = getattr(module, "_inprocess_registry", None)
    assert registry is not None, f"{name} was imported before, into DBOS's shared registry"
    return module, registry


@pytest.fixture
def in_process() -> Iterator[None]:
    """DBOS may be launched by the test; none is left running after it, and logging and
    DBOS's registry are as they were."""
    DBOS.destroy(destroy_registry=False)
    with logging_restored(), registrations_restored():
        try:
            yield
        finally:
            DBOS.destroy(destroy_registry=False)


@contextlib.contextmanager
def served(app: Any) -> Iterator[tuple[TestClient, Output]]:
    """An app served in this process, its lifespan (which launches and destroys DBOS)
    run by Starlette's ``TestClient``; the client, and the app's stdout (scanned for
    secrets after the test)."""
    with stdout_captured() as output:
        try:
            with TestClient(app) as client:
                yield client, output
        finally:
            output.result()


def picked(record: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The fields ``keys`` of a log record, to compare in one assertion."""
    return {key: record.get(key) for key in keys}
