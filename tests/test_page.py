"""The shutdown demo's live page (shutdown/page.py, shutdown/static/) in a real browser.

Debian's Chromium, headless, driven by Playwright (no browser download): the test starts
a fan-out from the page's form, watches the grid fill, types the SHUTDOWN_TOKEN into the
page and crashes the server with the page's button (the app's real
``POST /shutdown?mode=crash``), starts a new server on the same port and database, and
checks on the page's DOM that it reconnected by itself, that the fan-out finished, and
that exactly the steps the database shows as dispatched twice are marked as re-run (and
the FIB_LEDGER file agrees: every unmarked step body ran once). Then a wrong token is
refused and the right one stops the server gracefully, from the page. It runs against one
worker (executor=thread) and ``WORKERS=2`` (executor=process) on Postgres and against
SQLite (the app's default executor), the executor picked in the form when the app
offers one.

It also checks what the page may and may not do: every request it makes goes to the
app's origin (and none was blocked by its Content-Security-Policy), and the token shows
up in the two stop requests only, in their Authorization header, never in the page's
HTML, storage, cookies or any URL.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

import fastapi_scope_shutdown
from harness.db import query, workflow_status
from harness.fanout import child_index, ledger_runs, shutdown_server
from harness.proc import free_port
from harness.server import AppServer
from shutdown import page as live_page
from shutdown.page import MAX_ID_LENGTH, MAX_LIMIT

TOKEN = "page-token-5e2a91c4d7"  # typed into the page; must never reach a log
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless Chromium as root needs --no-sandbox; the rest keeps it from calling home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Steps 32..59 compute fib(32) (~0.2 s of CPU each here): in thread mode they share one
# core for about 6 s, enough for a crash from the page to land while they run (the
# server's own answers wait for that core too: the crash request can take seconds);
# with the pool about 3 s. Small enough for a shared 2-core machine.
STEPS, MAX_N = 60, fastapi_scope_shutdown.MAX_MAX_N
SLOT_PREFIX = f"sched-{fastapi_scope_shutdown.SCHEDULE}-"


def _missing(reason: str) -> NoReturn:
    """Skip, except under CI=true, where a missing browser is a failure."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("no Playwright: pip install -r requirements.txt")
    if not os.path.exists(CHROMIUM):
        _missing("no Chromium: apt-get install chromium (Debian's package)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def app_server(tmp_path: Path, db_url: str, workers: int | None, port: int, name: str) -> AppServer:
    """The demo with the token and the ledger, on a fixed port (the restart reuses it)."""
    return shutdown_server(
        db_url,
        tmp_path / f"{name}.log",
        workers=workers,
        token=TOKEN,
        ledger=tmp_path / "ledger.txt",
        port=port,
    )


def cells(page: Any) -> list[dict[str, Any]]:
    """The grid as the page shows it: one dict per step cell."""
    return list(
        page.eval_on_selector_all(
            "#grid .cell",
            """cells => cells.map(c => ({
                index: Number(c.dataset.index), status: c.dataset.status,
                executor: c.dataset.executor, attempts: Number(c.dataset.attempts),
                rerun: c.classList.contains('rerun'), colour: getComputedStyle(c).backgroundColor,
            }))""",
        )
    )


def step_rows(db_url: str, parent: str) -> dict[int, tuple[str, str | None, int]]:
    """step index -> (status, executor id, dispatches) from workflow_status."""
    rows = query(
        db_url,
        "SELECT workflow_uuid, status, executor_id, recovery_attempts FROM dbos.workflow_status "
        "WHERE parent_workflow_id = %s",
        parent,
    )
    found = {child_index(wf): (st, ex, int(n)) for wf, st, ex, n in rows}
    return {i: row for i, row in found.items() if i is not None}


def check_endpoints(server: AppServer, workflow_id: str, mode: str | None) -> None:
    """The JSON the page reads: validated, bounded, no secrets."""
    c = server.client
    home = c.get("/")
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in home.headers["content-security-policy"]
    assert TOKEN not in home.text
    view = c.get(f"/workflows/{workflow_id}/steps")
    assert view.status_code == 200, view.text
    body = view.json()
    assert body["total"] == STEPS and len(body["steps"]) == STEPS and body["max_n"] == MAX_N
    assert [s["index"] for s in body["steps"]] == list(range(STEPS))
    assert TOKEN not in view.text
    assert c.get("/workflows/no-such-fan-out/steps").status_code == 404
    assert c.get("/workflows/%00/steps").status_code == 404
    assert c.get(f"/workflows/{'x' * (MAX_ID_LENGTH + 1)}/steps").status_code == 422
    slot = c.get("/schedule/slots", params={"limit": 1}).json()
    assert len(slot) == 1 and slot[0]["workflow_id"].startswith(SLOT_PREFIX)
    # a workflow that is not a fan-out
    assert c.get(f"/workflows/{slot[0]['workflow_id']}/steps").status_code == 404
    for path in ("/fanouts", "/schedule/slots"):
        for bad in ("0", str(MAX_LIMIT + 1), "x"):
            answer = c.get(path, params={"limit": bad})
            assert answer.status_code == 422, (path, bad, answer.text)
        assert len(c.get(path, params={"limit": MAX_LIMIT}).json()) <= MAX_LIMIT
    recent = c.get("/fanouts").json()
    assert recent[0]["workflow_id"] == workflow_id
    assert (recent[0]["steps"], recent[0]["max_n"], recent[0]["mode"]) == (STEPS, MAX_N, mode)
    assert body["mode"] == mode


# --- the page's files, without a server (fast) -------------------------------------------


def test_page_is_self_contained_and_keeps_nothing() -> None:
    """One small page, served with a policy that lets it reach its own origin only; no
    third-party code, no URL of another origin, no browser storage. (The browser test
    checks what it does; this checks what it is.)"""
    policy = live_page.HEADERS["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    files = sorted(live_page.STATIC.iterdir())
    assert [f.name for f in files] == ["page.css", "page.html", "page.js"]
    lines = 0
    for f in files:
        text = f.read_text()
        lines += len(text.splitlines())
        assert "http://" not in text and "https://" not in text, f.name
        for store in ("localStorage", "sessionStorage", "document.cookie", "indexedDB"):
            assert store not in text, (f.name, store)
    assert lines <= 500  # small enough to read whole and audit: what it can do is all here
    html = (live_page.STATIC / "page.html").read_text()
    assert "<script>" not in html and " style=" not in html  # the policy allows no inline code
    assert 'type="password"' in html and 'autocomplete="off"' in html


@dataclass
class Watched:
    """A browser page and what it did: every request it made, and its errors (uncaught
    exceptions, and requests its Content-Security-Policy blocked)."""

    context: Any
    page: Any
    requests: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    """A fresh browser context and page; every wait on it ends within a minute unless
    it says otherwise. Closed after the test."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        watched = Watched(context, context.new_page())
        context.on("request", lambda r: watched.requests.append(r))
        watched.page.on("pageerror", lambda exc: watched.errors.append(str(exc)))
        # A request the page's Content-Security-Policy blocked shows up here only.
        watched.page.on(
            "console",
            lambda m: (
                watched.errors.append(m.text) if "Content Security Policy" in m.text else None
            ),
        )
        watched.page.set_default_timeout(60_000)
        yield watched
    finally:
        context.close()


@dataclass
class Demo:
    """The demo's servers in one test: one database, one port (the restart reuses it, so
    the page finds the new server by itself)."""

    tmp_path: Path
    db_url: str
    workers: int | None
    port: int = field(default_factory=free_port)
    started: list[AppServer] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, name: str) -> AppServer:
        """A server, started and ready (``AppServer.start`` waits with its timeout)."""
        server = app_server(self.tmp_path, self.db_url, self.workers, self.port, name)
        self.started.append(server)  # closed at the end even if it never got ready
        return server.start()

    def close(self) -> None:
        for server in self.started:
            server.close()


@pytest.fixture
def demo(
    request: pytest.FixtureRequest, tmp_path: Path, database: str, workers: int | None
) -> Iterator[Demo]:
    """The servers of a test on ``database``; each closed after it, before the database
    is dropped."""
    db_url = request.getfixturevalue("pg_url" if database == "postgres" else "sqlite_url")
    demo = Demo(tmp_path, db_url, workers)
    try:
        yield demo
    finally:
        demo.close()


def trigger_from_form(page: Any, server: AppServer, mode: str | None) -> tuple[str, str | None]:
    """Start a fan-out of STEPS steps from the page's form, which is built from the
    OpenAPI schema of ``POST /trigger_async``; picks the executor ``mode`` when the app
    offers one. Returns the fan-out's id and the executor it runs on (None: not offered)."""
    page.wait_for_selector("#param-steps")
    schema = server.client.get("/openapi.json").json()
    params = schema["paths"]["/trigger_async"]["post"]["parameters"]
    fields = page.eval_on_selector_all(
        "#trigger-fields input, #trigger-fields select", "fs => fs.map(f => f.name)"
    )
    assert sorted(fields) == sorted(p["name"] for p in params if p["in"] == "query")
    page.fill("#param-steps", str(STEPS))
    page.fill("#param-max_n", str(MAX_N))
    offered = {p["name"]: p["schema"].get("default") for p in params}
    if "executor" in offered:
        if mode:
            page.select_option("#param-executor", mode)
        mode = mode or offered["executor"]
    else:
        mode = None
    page.click("#trigger")
    page.wait_for_selector("#trigger-result[data-status='202']")
    page.wait_for_function("() => document.querySelector('#fanout').dataset.workflowId !== ''")
    workflow_id = page.get_attribute("#fanout", "data-workflow-id")
    assert workflow_id and workflow_id.startswith(
        fastapi_scope_shutdown.KEYED_ID_PREFIX
    )  # a key per click
    page.wait_for_selector(f"#fanouts li[data-workflow-id='{workflow_id}']")
    return workflow_id, mode


def wait_for_big_steps(page: Any, mode: str | None) -> set[int]:
    """Wait until the grid shows big steps (fib(30..32)) running, and with the pool some
    steps done; returns the steps done by then.

    The fan-out enqueues the big ones first and the pool computes in that order. Threads
    share one core: the big steps end together, and the enqueueing of the rest waits for
    them, so none is done before they all are; there the crash comes while they run,
    with nothing done yet."""
    page.wait_for_function(
        """([heavy, someDone]) => {
            const cs = [...document.querySelectorAll('#grid .cell')];
            const running = c => c.dataset.status === 'PENDING' && +c.dataset.index >= heavy;
            const done = c => c.dataset.status === 'SUCCESS';
            return cs.some(running) && (!someDone || cs.some(done));
        }""",
        arg=[MAX_N - 2, mode != "thread"],
    )
    before = cells(page)
    assert len(before) == STEPS
    assert all(c["executor"] for c in before if c["status"] in ("SUCCESS", "PENDING"))
    return {c["index"] for c in before if c["status"] == "SUCCESS"}


def crash_from_page(page: Any, server: AppServer, db_url: str, workflow_id: str) -> None:
    """Type the token and press Crash: the server dies with the fan-out unfinished, and
    the page says it is offline."""
    page.fill("#token", TOKEN)
    assert TOKEN not in page.content()
    page.click("#crash")
    page.wait_for_selector("#stop-result[data-status='202']")
    assert page.input_value("#token") == ""  # the box is cleared after use
    page.wait_for_selector("#conn[data-state='offline']")
    assert server.wait_exit(30) is not None
    status = workflow_status(db_url, workflow_id)
    assert status == "PENDING", "the crash came after the fan-out finished"


def wait_for_recovery(page: Any, screenshot: Path) -> list[dict[str, Any]]:
    """The page reconnects by itself and shows the fan-out finished; returns its grid."""
    page.wait_for_selector("#conn[data-state='online'][data-outages='1']")
    page.wait_for_selector("#fanout-summary[data-status='SUCCESS']", timeout=120_000)
    page.wait_for_function(
        f"() => document.querySelectorAll('#grid .cell.s-SUCCESS').length === {STEPS}"
    )
    after = cells(page)
    assert page.get_attribute("#fanout-summary", "data-done") == str(STEPS)
    assert page.eval_on_selector("#progress-bar", "b => b.style.width") == "100%"
    page.screenshot(path=str(screenshot), full_page=True)
    return after


def check_rerun_marks(
    page: Any,
    db_url: str,
    workflow_id: str,
    after: list[dict[str, Any]],
    done_before: set[int],
    ledger: Path,
) -> None:
    """The marks are the database's: steps dispatched twice, nothing else; the ledger
    agrees (every unmarked step body ran once), and each cell shows its row's executor
    and dispatches."""
    rows = step_rows(db_url, workflow_id)
    assert sorted(rows) == list(range(STEPS))
    assert all(status == "SUCCESS" for status, _, _ in rows.values())
    marked = {c["index"] for c in after if c["rerun"]}
    assert marked == {i for i, (_, _, n) in rows.items() if n > 1}
    assert marked, "no step ran again: the crash found nothing running"
    assert not marked & done_before, "a step done before the crash ran again"
    assert int(page.get_attribute("#fanout-summary", "data-rerun") or -1) == len(marked)
    runs = ledger_runs(ledger, workflow_id)
    assert all(runs[i] == 1 for i in range(STEPS) if i not in marked), runs
    assert {i for i in range(STEPS) if runs[i] > 1} <= marked, runs
    for c in after:
        assert c["attempts"] == rows[c["index"]][2]
        assert c["executor"] == rows[c["index"]][1]


def check_colours(page: Any, after: list[dict[str, Any]], workers: int | None) -> None:
    """Coloured by worker: one colour per executor id, the legend's; a Gantt row a step."""
    colours = {c["executor"]: c["colour"] for c in after}
    assert len(set(colours.values())) == len(colours)
    legend = page.eval_on_selector_all(
        "#legend .chip",
        "cs => Object.fromEntries(cs.map("
        "c => [c.textContent, getComputedStyle(c).backgroundColor]))",
    )
    assert {k: legend[k] for k in colours} == colours
    expected = {f"shutdown-{n}" for n in range(workers or 1)}
    assert set(colours) <= expected
    assert page.locator("#gantt .row").count() == STEPS


def check_slots(page: Any, db_url: str) -> None:
    """The schedule's slots, each with the worker the database says ran it."""
    page.wait_for_selector("#slots tr[data-status='SUCCESS']")
    slot_rows = page.eval_on_selector_all(
        "#slots tr",
        "rs => rs.map(r => [r.dataset.workflowId, r.dataset.status, r.dataset.executor])",
    )
    for slot_id, slot_status, executor in slot_rows:
        assert slot_id.startswith(SLOT_PREFIX)
        if slot_status != "SUCCESS":
            continue  # still on its way: compare finished slots only
        db = query(
            db_url,
            "SELECT executor_id FROM dbos.workflow_status WHERE workflow_uuid = %s",
            slot_id,
        )
        assert db and executor == db[0][0], (slot_id, executor, db)


def stop_from_page(page: Any, server: AppServer) -> None:
    """A wrong token is refused and the server keeps serving; the right one stops it
    gracefully (exit 0, or -15: uvicorn re-raises the SIGTERM)."""
    page.fill("#token", "not-the-token")
    page.click("#graceful")
    page.wait_for_selector("#stop-result[data-status='401']")
    assert server.running
    page.fill("#token", TOKEN)
    page.click("#graceful")
    page.wait_for_selector("#stop-result[data-status='202']")
    assert server.wait_exit(60) in (0, -15)
    page.wait_for_selector("#conn[data-state='offline'][data-outages='2']")


def check_where_things_went(watched: Watched, origin: str) -> None:
    """Every request went to the app's origin, none was blocked, and the token went in
    the two stop requests' Authorization header only: not in the page, its storage, its
    cookies or any URL."""
    page = watched.page
    assert not watched.errors
    urls = [r.url for r in watched.requests]
    assert all(u == origin or u.startswith(origin + "/") for u in urls), urls
    carriers = []
    for r in watched.requests:
        headers = r.all_headers()
        if (
            TOKEN in r.url
            or TOKEN in (r.post_data or "")
            or any(TOKEN in v for v in headers.values())
        ):
            carriers.append((r.method, r.url, headers.get("authorization")))
    assert carriers == [
        ("POST", f"{origin}/shutdown?mode={mode}", f"Bearer {TOKEN}")
        for mode in ("crash", "graceful")
    ]
    assert TOKEN not in page.content()
    storage = page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]")
    assert storage == [0, 0, ""]
    assert watched.context.cookies() == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("database", "workers", "mode"),
    [("postgres", None, "thread"), ("postgres", 2, "process"), ("sqlite", None, None)],
    ids=["postgres-1-worker-thread", "postgres-WORKERS=2-process", "sqlite-default"],
)
def test_live_page_crash_and_recovery(
    watched: Watched, demo: Demo, tmp_path: Path, workers: int | None, mode: str | None
) -> None:
    """``mode``: the executor the form picks when the app offers one (None: its default)."""
    page = watched.page
    first = demo.start("first")
    page.goto(f"{demo.origin}/")
    workflow_id, mode = trigger_from_form(page, first, mode)
    done_before = wait_for_big_steps(page, mode)
    crash_from_page(page, first, demo.db_url, workflow_id)

    second = demo.start("second")
    after = wait_for_recovery(page, tmp_path / "live-page.png")
    check_rerun_marks(page, demo.db_url, workflow_id, after, done_before, tmp_path / "ledger.txt")
    check_colours(page, after, workers)
    check_slots(page, demo.db_url)
    check_endpoints(second, workflow_id, mode)
    stop_from_page(page, second)
    check_where_things_went(watched, demo.origin)
