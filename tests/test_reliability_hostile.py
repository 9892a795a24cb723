"""Hostile input (reliability/hostile.py): the hand-written table, then schemathesis fuzzing of
every operation of each app, over HTTP against real uvicorn servers on fresh Postgres
databases. Per app one server serves both, so the checks after fuzzing (alive, serving,
baseline unchanged, no traceback in the log) cover the hand-written cases too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from reliability import hostile
from reliability.core import Context, quick_context

SPECS = {spec.key: spec for spec in hostile.APPS}


class Sessions:
    """One started app per spec, shared by the tests of this module; the fuzzing test of an
    app (the last to use it) closes it."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.open: dict[str, hostile.Session | BaseException] = {}

    def get(self, spec: hostile.AppSpec) -> hostile.Session:
        if spec.key not in self.open:
            try:
                self.open[spec.key] = hostile.Session(self.ctx, spec).start()
            except BaseException as exc:  # noqa: BLE001 - do not start it again per case
                self.open[spec.key] = exc
                raise
        found = self.open[spec.key]
        if isinstance(found, BaseException):
            raise AssertionError(f"{spec.key} did not start: {found!r}")
        return found

    def close(self, spec: hostile.AppSpec) -> None:
        found = self.open.get(spec.key)
        if isinstance(found, hostile.Session):
            found.close()

    def close_all(self) -> None:
        for key in list(self.open):
            self.close(SPECS[key])


@pytest.fixture(scope="module")
def sessions(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sessions]:
    with quick_context(pg_server, tmp_path_factory.mktemp("hostile")) as ctx:
        registry = Sessions(ctx)
        try:
            yield registry
        finally:
            registry.close_all()


@pytest.mark.parametrize("case", hostile.CASES, ids=[c.id for c in hostile.CASES])
@pytest.mark.slow
def test_hand_written_hostile_request_gets_its_answer_with_a_reason(
    sessions: Sessions, case: hostile.HandCase
) -> None:
    session = sessions.get(SPECS[case.app])
    outcome = hostile.send_case(session, case)
    assert outcome.passed, outcome.problem
    assert session.server.proc is not None and session.server.proc.poll() is None


# What the derandomized fuzzing must reach besides refusals: the apps' real work (2xx)
# and their input checks (422) — or, for /shutdown alone, only the refusal.
REACHED = {
    hostile.SCOPE.key: {200, 202, 404, 422},
    hostile.CACHE.key: {200, 202, 404, 422},
    hostile.SHUTDOWN.key: {200, 202, 401, 404, 422},
    hostile.SHUTDOWN_UNSET.key: {403},
}
REFUSAL = {hostile.SHUTDOWN.key: 401, hostile.SHUTDOWN_UNSET.key: 403}


@pytest.mark.parametrize("key", list(SPECS))
@pytest.mark.slow
def test_fuzzing_every_operation_gives_no_5xx_no_hang_and_the_app_still_serves(
    sessions: Sessions, key: str
) -> None:
    spec = SPECS[key]
    session = sessions.get(spec)
    try:
        report = hostile.fuzz(session, hostile.QUICK_EXAMPLES, seed=None, quick=True)
        after = hostile.after(session, reaped=bool(spec.reap))
        log = session.server.log_text()
    finally:
        sessions.close(spec)

    assert report.targets and set(report.targets) <= set(report.fuzzed), report.not_generated
    assert len(report.sent) >= 8 * len(report.targets)
    assert not report.server_errors, [(a.request, a.status) for a in report.server_errors]
    assert not report.no_answer, [(a.request, a.error) for a in report.no_answer]
    assert not report.unclear, [(a.request, a.status) for a in report.unclear]
    assert REACHED[key] <= set(report.statuses), report.statuses
    # The fuzzer never knows the token: every /shutdown it sent was refused or invalid.
    shutdowns = {a.status for a in report.sent if a.operation == "POST /shutdown"}
    if key in REFUSAL:
        assert shutdowns and shutdowns <= {REFUSAL[key], 422}, shutdowns
    if spec.reap and "POST /trigger_async" in report.targets:
        assert report.reaped >= 1 and not report.reaper_errors, report.reaper_errors

    assert after.alive and after.serving == "", after.serving
    assert after.baseline_changed == "", after.baseline_changed
    assert after.caps.checked >= 2 and not after.caps.violations, after.caps.violations
    assert not after.log.tracebacks, after.log.tracebacks
    assert after.log.access_5xx == 0
    if session.token:
        assert session.token not in log


def test_log_reader_counts_an_asgi_traceback_and_a_500_but_not_a_reaped_workflow() -> None:
    # The shapes of the lines uvicorn and DBOS wrote before the NUL-id fix.
    lines = [
        {"name": "uvicorn.access", "message": '127.0.0.1:1 - "GET /workflows/%00 HTTP/1.1" 500'},
        {
            "name": "uvicorn.error",
            "message": "Exception in ASGI application\n",
            "exc_info": "Traceback (most recent call last):\n...\nsqlalchemy.exc.DataError: NUL",
        },
        {
            "name": "dbos",
            "message": "Exception encountered in background workflow:",
            "exc_info": "Traceback (most recent call last):\n...\n"
            "dbos._error.DBOSAwaitedWorkflowCancelledError: DBOS Error 13: ... was cancelled",
        },
        {"name": "uvicorn.access", "message": '127.0.0.1:1 - "GET /workflows/x HTTP/1.1" 404'},
    ]
    text = "\n".join(json.dumps(line) for line in lines)
    reaped = hostile.read_log(text, reaped=True)
    assert (len(reaped.tracebacks), reaped.cancellations, reaped.access_5xx) == (1, 1, 1)
    assert "DataError" in reaped.tracebacks[0]
    # Without a reaper, a cancelled workflow is a traceback like any other.
    assert len(hostile.read_log(text, reaped=False).tracebacks) == 2


def test_every_4xx_reason_shape_is_read() -> None:
    assert (
        hostile.reason_of(b'{"detail": "no workflow with id \'x\'"}') == "no workflow with id 'x'"
    )
    assert '"steps"' in hostile.reason_of(b'{"detail": [{"loc": ["query", "steps"]}]}')
    assert hostile.reason_of(b"Invalid HTTP request received.") == "Invalid HTTP request received."
    assert hostile.reason_of(b'{"detail": ""}') == ""
    assert hostile.reason_of(b"") == ""


def test_the_table_covers_every_app_and_never_sends_the_token() -> None:
    assert {c.app for c in hostile.CASES} == set(SPECS)
    token = "t" * 32
    for case in hostile.CASES:
        if case.auth is not None:
            value = case.auth(token)
            sent = value.decode("latin-1") if isinstance(value, bytes) else value
            assert sent != f"Bearer {token}", case.id
