"""Hostile input: can anything a client sends make the three apps answer 5xx, hang, crash
or corrupt what they stored?

How
    Each app is served by a real uvicorn subprocess on a fresh Postgres database:
    ``fastapi_scope``, ``fastapi_scope_cache``, ``fastapi_scope_shutdown`` with
    SHUTDOWN_TOKEN set (a random value the fuzzer never sees) and once more with it unset.

    1. Baseline: one valid workflow runs to SUCCESS; its answer and its rows in the
       system database are kept.
    2. Hand-written cases (``CASES``), each with the status it must get and a word its
       reason must contain: huge, negative, fractional, NaN/inf, empty and non-numeric
       numbers; caps + 1; unknown and malformed workflow ids (10k characters, unicode,
       NUL, ``..``, ``../`` and spaces, invalid UTF-8); wrong methods; unknown paths;
       10 MB bodies; ``/shutdown`` with no, wrong, near-miss and oversized Authorization
       headers. The endpoints take query parameters only: a body is ignored, so a 10 MB
       body with valid parameters is answered as without it, and one with bad parameters
       gets the same 422.
    3. Fuzzing: schemathesis turns every operation of the app's OpenAPI schema into
       hypothesis strategies, for valid requests (positive mode) and invalid ones
       (negative mode: wrong types, out-of-range values, missing or extra parameters and
       headers). ``examples`` cases per operation and mode (fewer if hypothesis runs out
       of distinct ones) are sent over HTTP, ``CONCURRENCY`` at a time, each with a
       ``TIMEOUT``. The fuzzing follows the runner's seed (``ctx.seed``, also in the
       "fuzzed requests" note; ``python -m reliability --only hostile --seed <seed>``
       replays a run); without one (the tests) hypothesis derandomizes.
    4. After: the process is alive, a new valid workflow reaches SUCCESS, the baseline
       reads the same (answer and rows), every workflow the hostile requests started has
       inputs within the minimum/maximum the schema documents for the endpoint that
       starts it, and the server log has no traceback and no 5xx.

    The shutdown app's fan-outs are CPU-bound (up to 500 steps of fib(32): minutes of
    CPU each), so while it is fuzzed a reaper cancels every fan-out the fuzzer starts
    (``DBOSClient.cancel_workflows`` with its children); the caps are still checked on
    the recorded inputs. DBOS logs each cancelled workflow with a traceback ("Awaited
    workflow ... was cancelled"): those are counted apart, not as failures.

Figures (one set per app; promise in brackets)
    operations fuzzed          operations of the schema that got fuzzed requests [all]
    fuzzed requests            requests sent, positive + negative (informative)
    5xx answers                fuzzed requests answered 5xx [0]
    hung or dropped requests   no answer within TIMEOUT, or the connection closed [0]
    4xx without a reason       a fuzzed 4xx whose body says nothing [0]
    workflows within caps      workflows started by hostile requests whose inputs are
                               within the bounds the schema documents [all]
    hand-written cases passed  [all]
    alive and serving after    process running, a new valid workflow finishes [yes]
    baseline unchanged         the workflow finished before reads the same [yes]
    log tracebacks             tracebacks or 5xx lines in the server log, apart from
                               DBOS's reports of the reaper's cancellations [0]
"""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, cast

import httpx

import fastapi_scope
import fastapi_scope_cache
import fastapi_scope_shutdown
from harness.clients import WorkflowsClient
from harness.db import query
from harness.env import script_env
from harness.server import AppServer
from reliability.core import Context, Figure, info, progress, promise

AREA = "hostile"
TIMEOUT = 60.0  # an answer later than this counts as hung (the slowest valid request: 10 s)
CONCURRENCY = 16  # fuzzed requests in flight at once (most valid ones just sleep)
QUICK_EXAMPLES = 10  # per operation and generation mode (the tests)
FULL_EXAMPLES = 100  # the runner
REAP_INTERVAL = 0.25
TEN_MB = 10 * 1024 * 1024
HUGE = str(10**30)
# Workflows no request starts (the shutdown app's schedule): not subject to the caps.
UNTRIGGERED = {"every_five_seconds"}


@dataclass(frozen=True)
class AppSpec:
    """One app under test and how to recognise its normal work."""

    key: str
    target: str
    token: bool  # SHUTDOWN_TOKEN set (the shutdown app)
    trigger: str  # the valid run before and after the hostile phase
    params: dict[str, Any]
    expect: Any  # its result (a dict: these items must be in it)
    # Workflow name -> (endpoints that start it, the query parameter of each argument).
    workflows: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    reap: frozenset[str] = frozenset()  # workflows cancelled while fuzzing (CPU-bound)
    quick_paths: tuple[str, ...] | None = None  # operations fuzzed in quick runs (None: all)


SCOPE = AppSpec(
    key="fastapi_scope",
    target="fastapi_scope:app",
    token=False,
    trigger="/trigger_sync",
    params={"steps": 2, "step_seconds": 0},
    expect={"steps": 2, "instance_counter": 2, "class_counter": 0},
    workflows={
        "A.run": (("/trigger_sync", "/trigger_async"), ("steps", "step_seconds")),
        "Tally.run": (("/instance/trigger_sync",), ("steps", "step_seconds")),
    },
)
CACHE = AppSpec(
    key="fastapi_scope_cache",
    target="fastapi_scope_cache:app",
    token=False,
    trigger="/trigger_async",
    params={"pages": 1, "users_per_page": 2, "step_seconds": 0},
    expect={"pages": 1, "users_per_page": 2, "users_described": 2},
    workflows={"get_users": (("/trigger_async",), ("pages", "users_per_page", "step_seconds"))},
)
SHUTDOWN = AppSpec(
    key="fastapi_scope_shutdown",
    target="fastapi_scope_shutdown:app",
    token=True,
    trigger="/trigger_async",
    params={"steps": 4, "max_n": 3},
    expect=[0, 1, 1, 2],
    workflows={"fan_out": (("/trigger_async",), ("steps", "max_n", "executor"))},
    reap=frozenset({"fan_out"}),
)
# The same app with the endpoint disabled; quick runs fuzz only /shutdown on it (the
# other operations are the same code as above).
SHUTDOWN_UNSET = replace(
    SHUTDOWN, key="fastapi_scope_shutdown (no token)", token=False, quick_paths=("/shutdown",)
)
APPS = (SCOPE, CACHE, SHUTDOWN, SHUTDOWN_UNSET)


# --- answers -----------------------------------------------------------------


def reason_of(content: bytes) -> str:
    """What a 4xx says about why: FastAPI's ``detail`` (text or the 422 list), or a plain
    text body (uvicorn's own 400)."""
    text = content.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text
    if isinstance(body, dict):
        detail = body.get("detail")
        return detail if isinstance(detail, str) else json.dumps(detail) if detail else ""
    return ""


def _matches(result: Any, expect: Any) -> bool:
    if isinstance(expect, dict):
        return isinstance(result, dict) and all(result.get(k) == v for k, v in expect.items())
    return bool(result == expect)


# --- one app under test ----------------------------------------------------------


class Session:
    """An app served on a fresh database, with a baseline workflow finished before any
    hostile request."""

    def __init__(self, ctx: Context, spec: AppSpec) -> None:
        self.spec = spec
        self.db = ctx.fresh_db("hostile")
        # Random, so neither the fuzzer nor a log can know it.
        self.token = secrets.token_hex(16) if spec.token else None
        extra = {"SHUTDOWN_TOKEN": self.token} if self.token else {}
        log = ctx.scratch(re.sub(r"\W+", "-", spec.key)) / "server.log"
        self.server = AppServer(spec.target, script_env(self.db, **extra), log)
        self.baseline_id = ""
        self.baseline: dict[str, Any] = {}

    @property
    def client(self) -> httpx.Client:
        return self.server.client

    def start(self) -> Session:
        try:
            self.server.start(ready_timeout=120)
            workflow_id, problem = self.run_valid()
            if workflow_id is None:
                raise AssertionError(f"{self.spec.key}: the baseline run failed: {problem}")
            self.baseline_id = workflow_id
            self.baseline = self.snapshot(workflow_id)
        except BaseException:
            self.close()
            raise
        return self

    def run_valid(self, timeout: float = 120) -> tuple[str | None, str]:
        """Start the app's normal workflow and wait for its result: (id, "") or (None, why)."""
        try:
            answer = self.client.post(self.spec.trigger, params=self.spec.params)
            if answer.status_code not in (200, 202):
                return None, f"{self.spec.trigger} answered {answer.status_code}: {answer.text}"
            workflow_id = answer.json()["workflow_id"]
            done = WorkflowsClient(self.client).wait_finished(workflow_id, timeout, 0.2)
        except (httpx.HTTPError, AssertionError, ValueError, KeyError) as exc:
            return None, repr(exc)
        if done["status"] != "SUCCESS" or not _matches(done.get("result"), self.spec.expect):
            return None, f"unexpected end: {done}"
        return workflow_id, ""

    def snapshot(self, workflow_id: str) -> dict[str, Any]:
        """Its answer and its rows: what a corrupted store would change."""
        return {
            "view": WorkflowsClient(self.client).view(workflow_id),
            "status": query(
                self.db,
                "SELECT status, recovery_attempts, updated_at FROM dbos.workflow_status "
                "WHERE workflow_uuid = %s",
                workflow_id,
            ),
            "steps": query(
                self.db,
                "SELECT function_id, function_name, output FROM dbos.operation_outputs "
                "WHERE workflow_uuid = %s ORDER BY function_id",
                workflow_id,
            ),
        }

    def close(self) -> None:
        self.server.close()


# --- hand-written cases ------------------------------------------------------------


@dataclass(frozen=True)
class HandCase:
    """One hostile request, the statuses it may get and a word its reason must contain."""

    app: str  # AppSpec.key
    name: str
    method: str
    path: str  # sent as is (percent-escapes included); {baseline} is the baseline's id
    params: dict[str, Any] | None = None
    expect: tuple[int, ...] = (422,)
    reason: str = ""
    # The Authorization header, made from the real token (near misses only, never it).
    auth: Callable[[str], str | bytes] | None = None
    body: bytes | None = None

    @property
    def id(self) -> str:
        return f"{self.app}: {self.name}"


def _numbers(app: str, path: str, values: dict[str, Any], valid: dict[str, Any]) -> list[HandCase]:
    """Each hostile value in turn, the other parameters valid: 422 naming the parameter."""
    return [
        HandCase(
            app, f"{path} {name}={value!s:.20}", "POST", path, {**valid, name: value}, reason=name
        )
        for name, value in values.items()
        for value in (value if isinstance(value, list) else [value])
    ]


def _hostile_numbers(int_param: str, float_param: str | None) -> dict[str, Any]:
    numbers: dict[str, Any] = {int_param: [HUGE, "-5", "0", "2.5", "five", "", "9" * 5000]}
    if float_param:
        numbers[float_param] = ["nan", "inf", "-inf", "1e308", "-0.1", "fast", ""]
    return numbers


def _ids(app: str, reason: str) -> list[HandCase]:
    """Unknown and malformed workflow ids: 404 with the reason, never a 5xx."""
    unknown = [
        ("unknown id", f"/workflows/{uuid.uuid4()}"),
        ("10k-character id", "/workflows/" + "x" * 10_000),
        ("unicode id", "/workflows/%E2%98%83-%F0%9F%92%A5"),
        ("NUL id", "/workflows/%00"),
        ("NUL inside id", "/workflows/abc%00def"),
        ("'..' id", "/workflows/%2E%2E"),
        ("id with spaces", "/workflows/a%20b%20c"),
        ("invalid UTF-8 id", "/workflows/%FF%FE"),
        ("baseline id + suffix", "/workflows/{baseline}x"),
    ]
    cases = [
        HandCase(app, name, "GET", path, expect=(404,), reason=reason) for name, path in unknown
    ]
    cases += [
        # Decoded to /workflows/../../etc/passwd: no route matches several segments.
        HandCase(
            app,
            "'../' id",
            "GET",
            "/workflows/..%2F..%2Fetc%2Fpasswd",
            expect=(404,),
            reason="Not Found",
        ),
        HandCase(app, "no id", "GET", "/workflows/", expect=(404,), reason="Not Found"),
        HandCase(app, "baseline id reads", "GET", "/workflows/{baseline}", expect=(200,)),
    ]
    return cases


def _methods(app: str, wrong: list[tuple[str, str]]) -> list[HandCase]:
    return [
        HandCase(app, f"{method} {path}", method, path, expect=(405,), reason="Method Not Allowed")
        for method, path in wrong
    ] + [HandCase(app, "unknown path", "GET", "/nope", expect=(404,), reason="Not Found")]


def _bodies(
    app: str, path: str, valid: dict[str, Any], ok: int, bad: dict[str, Any]
) -> list[HandCase]:
    """The endpoints read no body: ignored with valid parameters, the 422 with bad ones."""
    big = b"{" + b'"x": "' + b"y" * TEN_MB + b'"}'
    return [
        HandCase(app, f"{path}, 10 MB body, valid query", "POST", path, valid, (ok,), body=big),
        HandCase(
            app,
            f"{path}, 10 MB body, bad query",
            "POST",
            path,
            {**valid, **bad},
            reason="query",
            body=big,
        ),
    ]


def _shutdown(app: str, status: int, reason: str) -> list[HandCase]:
    """/shutdown with anything but ``Bearer <token>``: refused, the server keeps serving."""
    auth: list[tuple[str, Callable[[str], str | bytes] | None]] = [
        ("no header", None),
        ("empty header", lambda t: ""),
        ("scheme only", lambda t: "Bearer"),
        ("wrong token", lambda t: "Bearer wrong"),
        ("token without scheme", lambda t: t),
        ("Basic scheme", lambda t: f"Basic {t}"),
        ("lower-case scheme", lambda t: f"bearer {t}"),
        ("two spaces", lambda t: f"Bearer  {t}"),
        ("tab", lambda t: f"Bearer\t{t}"),
        ("token twice", lambda t: f"Bearer {t} Bearer {t}"),
        ("token + 1 char", lambda t: f"Bearer {t}x"),
        ("token - 1 char", lambda t: f"Bearer {t[:-1]}"),
        ("non-ASCII bytes", lambda t: b"Bearer \xff\xfe" + t.encode()),
        ("20 kB header", lambda t: "Bearer " + "x" * 20_000),
    ]
    cases = [
        HandCase(
            app, f"shutdown, {name}", "POST", "/shutdown", {"mode": "crash"}, (status,), reason, a
        )
        for name, a in auth
    ]
    cases += [
        # Beyond h11's limit for an incomplete header block (16 kB): uvicorn's own 400
        # "Invalid HTTP request received." when the block arrives in pieces, else the
        # app's refusal; either way a 4xx with a reason.
        HandCase(
            app,
            "shutdown, 200 kB header",
            "POST",
            "/shutdown",
            {"mode": "crash"},
            (400, status),
            "",
            lambda t: "Bearer " + "x" * 200_000,
        ),
        HandCase(
            app, "shutdown, unknown mode", "POST", "/shutdown", {"mode": "reboot"}, (422,), "mode"
        ),
        HandCase(
            app,
            "shutdown, 10 MB body",
            "POST",
            "/shutdown",
            {"mode": "graceful"},
            (status,),
            reason,
            lambda t: "Bearer wrong",
            b"x" * TEN_MB,
        ),
        HandCase(
            app, "GET /shutdown", "GET", "/shutdown", expect=(405,), reason="Method Not Allowed"
        ),
    ]
    return cases


def above(limit: float) -> str:
    """The smallest value past an app's limit, as a query parameter: the cap + 1 for a
    count, + 0.01 for seconds."""
    return str(limit + 1) if isinstance(limit, int) else f"{limit + 0.01:g}"


def _cases() -> list[HandCase]:
    # The limits come from the apps themselves.
    return _scope_cases() + _cache_cases() + _shutdown_cases()


def _scope_cases() -> list[HandCase]:
    s, sa = SCOPE.key, fastapi_scope
    cases: list[HandCase] = []
    sync_ok = {"steps": 1, "step_seconds": 0}
    cases += _numbers(s, "/trigger_sync", _hostile_numbers("steps", "step_seconds"), sync_ok)
    cases += _numbers(
        s,
        "/trigger_async",
        {
            "steps": [HUGE, above(sa.ASYNC_MAX_STEPS)],
            "step_seconds": above(sa.ASYNC_MAX_STEP_SECONDS),
        },
        sync_ok,
    )
    cases += _numbers(
        s,
        "/instance/trigger_sync",
        {
            "steps": [above(sa.SYNC_MAX_STEPS), "-1"],
            "step_seconds": above(sa.SYNC_MAX_STEP_SECONDS),
        },
        sync_ok,
    )
    cases += _numbers(
        s,
        "/trigger_sync",
        {"steps": above(sa.SYNC_MAX_STEPS), "step_seconds": above(sa.SYNC_MAX_STEP_SECONDS)},
        sync_ok,
    )
    cases += _ids(s, "no workflow with id")
    cases += _methods(
        s, [("GET", "/trigger_sync"), ("DELETE", "/workflows/x"), ("PUT", "/counters")]
    )
    cases += _bodies(s, "/trigger_async", {"steps": 1, "step_seconds": 0}, 202, {"steps": HUGE})
    cases += _bodies(s, "/trigger_sync", {"steps": 1, "step_seconds": 0}, 200, {"steps": "-1"})
    return cases


def _cache_cases() -> list[HandCase]:
    c, ca = CACHE.key, fastapi_scope_cache
    cases: list[HandCase] = []
    cache_ok = {"pages": 1, "users_per_page": 1, "step_seconds": 0}
    cases += _numbers(c, "/trigger_async", _hostile_numbers("pages", "step_seconds"), cache_ok)
    cases += _numbers(
        c,
        "/trigger_async",
        {
            "users_per_page": [HUGE, "-1", "2.5", above(ca.MAX_USERS_PER_PAGE)],
            "pages": above(ca.MAX_PAGES),
        },
        cache_ok,
    )
    cases += _ids(c, "no workflow with id")
    cases += _methods(c, [("POST", "/cache"), ("GET", "/trigger_async")])
    cases += _bodies(c, "/trigger_async", cache_ok, 202, {"pages": "0"})
    return cases


def _shutdown_cases() -> list[HandCase]:
    da = fastapi_scope_shutdown
    cases: list[HandCase] = []
    for spec in (SHUTDOWN, SHUTDOWN_UNSET):
        d = spec.key
        if spec.token:
            shut_ok = {"steps": 1, "max_n": 1}
            cases += _numbers(d, "/trigger_async", _hostile_numbers("steps", None), shut_ok)
            cases += _numbers(
                d,
                "/trigger_async",
                {
                    "max_n": [HUGE, "-1", above(da.MAX_MAX_N), "nan", "1.5"],
                    "steps": above(da.MAX_STEPS),
                },
                shut_ok,
            )
            cases += _ids(d, "no fan-out workflow with id")
            cases += _methods(d, [("GET", "/trigger_async"), ("POST", "/healthz")])
            cases += _bodies(d, "/trigger_async", shut_ok, 202, {"max_n": "99"})
            cases += _shutdown(d, 401, "missing or wrong bearer token")
        else:
            cases += _shutdown(d, 403, "SHUTDOWN_TOKEN is not set")
    return cases


CASES = _cases()


@dataclass
class HandOutcome:
    case: HandCase
    status: int | None
    reason: str
    problem: str  # empty when the case passed

    @property
    def passed(self) -> bool:
        return not self.problem


def send_case(session: Session, case: HandCase) -> HandOutcome:
    """Send one hand-written case and judge its answer."""
    path = case.path.replace("{baseline}", session.baseline_id)
    headers: dict[bytes, bytes] = {}
    if case.auth is not None:
        value = case.auth(session.token or "not-set")
        # As httpx sends a str value: ASCII (the non-ASCII cases are bytes already).
        headers[b"Authorization"] = value if isinstance(value, bytes) else value.encode("ascii")
    try:
        answer = session.client.request(
            case.method,
            path,
            params=case.params,
            headers=headers,
            content=case.body,
            timeout=TIMEOUT,
        )
    except httpx.TimeoutException as exc:
        return HandOutcome(case, None, "", f"no answer within {TIMEOUT:.0f} s ({exc!r})")
    except httpx.TransportError as exc:
        return HandOutcome(case, None, "", f"no answer: {exc!r}")
    reason = reason_of(answer.content)
    problem = ""
    if answer.status_code not in case.expect:
        problem = f"status {answer.status_code}, expected {case.expect}: {reason[:300]}"
    elif answer.status_code >= 400 and not reason:
        problem = f"{answer.status_code} without a reason"
    elif case.reason and case.reason not in reason:
        problem = f"reason {reason[:300]!r} does not say {case.reason!r}"
    return HandOutcome(case, answer.status_code, reason, problem)


def hand_cases(session: Session) -> list[HandOutcome]:
    return [send_case(session, case) for case in CASES if case.app == session.spec.key]


# --- fuzzing ---------------------------------------------------------------------


@dataclass
class Answer:
    operation: str
    mode: str
    request: str  # method, path, query: enough to replay it
    status: int | None  # None: no answer
    reason: str = ""
    seconds: float = 0.0
    error: str = ""  # "hung", "dropped: ..." or "unsendable: ..." (never left the client)


@dataclass
class FuzzReport:
    operations: list[str]  # every operation of the schema
    targets: list[str]  # those fuzzed in this run (all, except quick_paths in quick runs)
    fuzzed: list[str]  # operations that got at least one request
    answers: list[Answer]
    seed: int | None
    reaped: int = 0  # fan-outs (with children) the reaper cancelled
    reaper_errors: list[str] = field(default_factory=list)
    not_generated: list[str] = field(default_factory=list)  # (operation, mode) with no cases

    @property
    def sent(self) -> list[Answer]:
        return [a for a in self.answers if not a.error.startswith("unsendable")]

    @property
    def unsendable(self) -> list[Answer]:
        return [a for a in self.answers if a.error.startswith("unsendable")]

    @property
    def server_errors(self) -> list[Answer]:
        return [a for a in self.sent if a.status is not None and a.status >= 500]

    @property
    def no_answer(self) -> list[Answer]:
        return [a for a in self.sent if a.status is None]

    @property
    def unclear(self) -> list[Answer]:
        return [a for a in self.sent if a.status and 400 <= a.status < 500 and not a.reason]

    @property
    def statuses(self) -> Counter[int | None]:
        return Counter(a.status for a in self.sent)


def generate(operation: Any, mode: Any, examples: int, seed: int | None) -> list[Any]:
    """Up to ``examples`` schemathesis cases for one operation in one generation mode."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings

    cases: list[Any] = []

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=seed is None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(operation.as_strategy(generation_mode=mode))
    def collect(case: Any) -> None:
        cases.append(case)  # never fails: the answers are judged after sending

    if seed is not None:
        collect = hypothesis.seed(seed)(collect)
    collect()
    return cases


def _send(base_url: str, case: Any, mode: str) -> Answer:
    import requests

    request = f"{case.method} {case.formatted_path} {case.query or ''}"[:300]
    started = time.monotonic()
    try:
        response = case.call(base_url=base_url, timeout=TIMEOUT)
    except requests.Timeout:
        return Answer(case.operation.label, mode, request, None, error="hung")
    except requests.ConnectionError as exc:
        return Answer(case.operation.label, mode, request, None, error=f"dropped: {exc!r:.200}")
    except Exception as exc:  # noqa: BLE001 - e.g. a header value requests cannot encode
        return Answer(case.operation.label, mode, request, None, error=f"unsendable: {exc!r:.200}")
    return Answer(
        case.operation.label,
        mode,
        request,
        response.status_code,
        reason_of(response.content),
        time.monotonic() - started,
    )


class Reaper(threading.Thread):
    """Cancels the workflows named ``names`` (and their children) that the fuzzer starts."""

    def __init__(self, db: str, names: frozenset[str], keep: set[str]) -> None:
        super().__init__(daemon=True)
        self.db, self.names, self.keep = db, names, keep
        self.cancelled: set[str] = set()
        self.errors: list[str] = []
        self.done = threading.Event()

    def sweep(self, client: Any) -> None:
        live = client.list_workflows(
            status=["PENDING", "ENQUEUED"],
            name=sorted(self.names),
            load_input=False,
            load_output=False,
        )
        ids = [w.workflow_id for w in live if w.workflow_id not in self.keep]
        if ids:
            client.cancel_workflows(ids, cancel_children=True)
            self.cancelled.update(ids)

    def run(self) -> None:
        from dbos import DBOSClient

        client = DBOSClient(system_database_url=self.db)
        try:
            while True:
                stopping = self.done.wait(REAP_INTERVAL)
                try:
                    self.sweep(client)
                except Exception as exc:  # noqa: BLE001 - report it, keep sweeping
                    self.errors.append(repr(exc)[:200])
                if stopping:
                    return
        finally:
            client.destroy()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=60)


def fuzz(session: Session, examples: int, seed: int | None, quick: bool = False) -> FuzzReport:
    """Generate cases for every operation of the app's schema and send them."""
    import schemathesis
    from schemathesis import GenerationMode

    base_url = session.server.base_url
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [cast(Any, result).ok() for result in schema.get_all_operations()]
    paths = session.spec.quick_paths if quick else None
    targets = [op for op in operations if paths is None or op.path in paths]
    batch: list[tuple[Any, str]] = []
    not_generated = []
    for op in targets:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                batch += [(case, mode.value) for case in generate(op, mode, examples, seed)]
            except Exception as exc:  # noqa: BLE001 - e.g. no negative value for a free string
                not_generated.append(f"{op.label} {mode.value}: {type(exc).__name__}")
    random.Random(seed or 0).shuffle(batch)  # slow operations spread over the run
    reaper = None
    if session.spec.reap:
        reaper = Reaper(session.db, session.spec.reap, {session.baseline_id})
        reaper.start()
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            answers = list(pool.map(lambda item: _send(base_url, *item), batch))
    finally:
        if reaper is not None:
            reaper.stop()
    return FuzzReport(
        operations=[op.label for op in operations],
        targets=[op.label for op in targets],
        fuzzed=sorted({a.operation for a in answers if not a.error.startswith("unsendable")}),
        answers=answers,
        seed=seed,
        reaped=len(reaper.cancelled) if reaper else 0,
        reaper_errors=reaper.errors if reaper else [],
        not_generated=not_generated,
    )


# --- after the hostile phase -------------------------------------------------------


@dataclass
class Caps:
    checked: int
    violations: list[str]


def _bounds(openapi: dict[str, Any], path: str, name: str) -> tuple[Any, ...] | None:
    """What the schema allows for a query parameter: ``(minimum, maximum)`` of a number,
    or the values of an enum (a ``Literal``, inline or by reference); None if neither."""
    for param in openapi["paths"][path]["post"].get("parameters", []):
        if param["name"] == name:
            schema = param.get("schema", {})
            ref = schema.get("$ref", "")
            if ref.startswith("#/components/schemas/"):
                schema = openapi["components"]["schemas"][ref.rsplit("/", 1)[1]]
            if "minimum" in schema and "maximum" in schema:
                return schema["minimum"], schema["maximum"]
            if "enum" in schema:
                return tuple(schema["enum"])
    return None


def _allows(found: list[tuple[Any, ...]], value: Any) -> bool:
    if all(len(b) == 2 and not isinstance(b[0], str) for b in found):
        return bool(min(lo for lo, _ in found) <= value <= max(hi for _, hi in found))
    return any(value in b for b in found)


def check_caps(session: Session) -> Caps:
    """Every workflow a request started has inputs within the bounds the schema documents
    for the endpoint(s) that start it (and the schema documents bounds)."""
    from dbos import DBOSClient

    openapi = session.client.get("/openapi.json").json()
    client = DBOSClient(system_database_url=session.db)
    try:
        workflows = client.list_workflows(load_input=True, load_output=False)
    finally:
        client.destroy()
    checked, violations = 0, []
    for wf in workflows:
        if wf.parent_workflow_id or wf.name in UNTRIGGERED:
            continue
        started_by = session.spec.workflows.get(wf.name)
        if started_by is None:
            violations.append(f"{wf.workflow_id}: {wf.name} is started by no known endpoint")
            continue
        paths, names = started_by
        args = tuple(wf.input["args"]) if wf.input else ()
        checked += 1
        if len(args) != len(names):
            violations.append(f"{wf.workflow_id}: {wf.name} has arguments {args!r}")
            continue
        for value, name in zip(args, names, strict=True):
            found = [b for p in paths if (b := _bounds(openapi, p, name)) is not None]
            if len(found) != len(paths):
                violations.append(f"the schema documents no bounds for {name} on {paths}")
            elif not _allows(found, value):
                violations.append(f"{wf.workflow_id}: {wf.name} {name}={value!r} outside {found}")
    return Caps(checked, violations)


@dataclass
class LogReport:
    tracebacks: list[str]  # first words + last line of each
    cancellations: int  # DBOS's tracebacks for workflows the reaper cancelled
    access_5xx: int  # uvicorn access lines with a 5xx status


def read_log(text: str, reaped: bool) -> LogReport:
    tracebacks, cancellations, access_5xx = [], 0, 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if "Traceback" in line:  # a line that is not JSON: not ours, and a traceback
                tracebacks.append(line[:200])
            continue
        message = str(record.get("message", ""))
        exc = str(record.get("exc_info", "") or "")
        if record.get("name") == "uvicorn.access" and re.search(r'" 5\d\d$', message):
            access_5xx += 1
        if exc or "Traceback" in message or "Exception in ASGI application" in message:
            last = (exc or message).strip().splitlines()[-1]
            if reaped and "WorkflowCancelledError" in last:
                cancellations += 1
            else:
                tracebacks.append(f"{message[:60]!r} {last[:200]}")
    return LogReport(tracebacks, cancellations, access_5xx)


@dataclass
class After:
    alive: bool
    serving: str  # "" when a new valid workflow finished, else why not
    baseline_changed: str  # "" when the baseline reads the same, else the difference
    caps: Caps
    log: LogReport

    @property
    def ok(self) -> bool:
        return self.alive and not self.serving


def after(session: Session, reaped: bool) -> After:
    proc = session.server.proc
    alive = proc is not None and proc.poll() is None
    serving = "the process is gone"
    changed = "not read: the process is gone"
    if alive:
        _, serving = session.run_valid()
        now = session.snapshot(session.baseline_id)
        changed = "" if now == session.baseline else f"before {session.baseline}, after {now}"
    caps = check_caps(session) if alive else Caps(0, ["not read: the process is gone"])
    return After(alive, serving, changed, caps, read_log(session.server.log_text(), reaped))


# --- the runner --------------------------------------------------------------------


@dataclass
class AppReport:
    spec: AppSpec
    hand: list[HandOutcome]
    fuzz: FuzzReport
    after: After


def run_app(ctx: Context, spec: AppSpec, examples: int, seed: int | None) -> AppReport:
    session = Session(ctx, spec)
    try:
        progress(f"hostile: {spec.key}: starting")
        session.start()
        hand = hand_cases(session)
        progress(f"hostile: {spec.key}: {sum(h.passed for h in hand)}/{len(hand)} hand cases")
        report = fuzz(session, examples, seed, quick=ctx.quick)
        progress(f"hostile: {spec.key}: {len(report.sent)} fuzzed requests")
        return AppReport(spec, hand, report, after(session, bool(spec.reap)))
    finally:
        session.close()


def _examples(items: list[str], limit: int = 3) -> str:
    return "; ".join(items[:limit]) + (
        f" (+{len(items) - limit} more)" if len(items) > limit else ""
    )


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def figures(report: AppReport) -> list[Figure]:
    return _fuzz_figures(report) + _after_figures(report)


def _fuzz_figures(report: AppReport) -> list[Figure]:
    """What the fuzzer sent and how the app answered it."""
    k, f = report.spec.key, report.fuzz
    sent = f.sent
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(f.statuses.items(), key=str))
    slowest = max((x.seconds for x in sent if x.status is not None), default=0.0)
    subset = len(f.targets) < len(f.operations)
    return [
        promise(
            AREA,
            f"{k}: operations fuzzed",
            f"{len(f.fuzzed)}/{len(f.targets)}",
            set(f.targets) <= set(f.fuzzed),
            "all",
            f"quick run: {len(f.targets)} of {len(f.operations)} operations" if subset else "",
        ),
        info(
            AREA,
            f"{k}: fuzzed requests",
            len(sent),
            _join(
                f"statuses {statuses}",
                f"{len(f.unsendable)} cases the client could not send" if f.unsendable else "",
                f"slowest answer {slowest:.1f} s",
                f"seed {f.seed}" if f.seed is not None else "derandomized",
            ),
        ),
        promise(
            AREA,
            f"{k}: 5xx answers",
            len(f.server_errors),
            not f.server_errors,
            "0",
            _examples([f"{x.request} -> {x.status}" for x in f.server_errors]),
        ),
        promise(
            AREA,
            f"{k}: hung or dropped requests",
            len(f.no_answer),
            not f.no_answer,
            "0",
            _examples([f"{x.request}: {x.error}" for x in f.no_answer]),
        ),
        promise(
            AREA,
            f"{k}: 4xx without a reason",
            len(f.unclear),
            not f.unclear,
            "0",
            _examples([f"{x.request} -> {x.status}" for x in f.unclear]),
        ),
    ]


def _after_figures(report: AppReport) -> list[Figure]:
    """The app after the fuzzing: its workflows, the hand-written cases, its health,
    its baseline and its log."""
    k, f, a = report.spec.key, report.fuzz, report.after
    failed = [f"{h.case.name}: {h.problem}" for h in report.hand if not h.passed]
    return [
        promise(
            AREA,
            f"{k}: workflows within the schema's caps",
            f"{a.caps.checked - len(a.caps.violations)}/{a.caps.checked}",
            not a.caps.violations,
            "all",
            _join(
                _examples(a.caps.violations),
                f"the reaper cancelled {f.reaped} fan-outs" if report.spec.reap else "",
            ),
        ),
        promise(
            AREA,
            f"{k}: hand-written cases passed",
            f"{len(report.hand) - len(failed)}/{len(report.hand)}",
            not failed,
            "all",
            _examples(failed),
        ),
        promise(
            AREA,
            f"{k}: alive and serving after",
            "yes" if a.ok else "no",
            a.ok,
            "yes",
            a.serving,
        ),
        promise(
            AREA,
            f"{k}: baseline unchanged",
            "yes" if not a.baseline_changed else "no",
            not a.baseline_changed,
            "yes",
            a.baseline_changed[:300],
        ),
        promise(
            AREA,
            f"{k}: log tracebacks",
            len(a.log.tracebacks) + a.log.access_5xx,
            not a.log.tracebacks and not a.log.access_5xx,
            "0",
            _join(
                _examples(a.log.tracebacks),
                f"{a.log.access_5xx} 5xx access lines" if a.log.access_5xx else "",
                f"not counted: {a.log.cancellations} DBOS reports of cancelled workflows"
                if a.log.cancellations
                else "",
            ),
        ),
    ]


def run(ctx: Context) -> list[Figure]:
    examples = QUICK_EXAMPLES if ctx.quick else FULL_EXAMPLES
    # The runner's seed (--seed replays a run); without one (the tests) hypothesis derandomizes.
    seed = ctx.seed
    result: list[Figure] = []
    for spec in APPS:
        result += figures(run_app(ctx, spec, examples, seed))
    return result
