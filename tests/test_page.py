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
    assert lines <= 500  # "a few hundred lines at most"
    html = (live_page.STATIC / "page.html").read_text()
    assert "<script>" not in html and " style=" not in html  # the policy allows no inline code
    assert 'type="password"' in html and 'autocomplete="off"' in html


@pytest.mark.slow
@pytest.mark.parametrize(
    ("database", "workers", "mode"),
    [("postgres", None, "thread"), ("postgres", 2, "process"), ("sqlite", None, None)],
    ids=["postgres-1-worker-thread", "postgres-WORKERS=2-process", "sqlite-default"],
)
def test_live_page_crash_and_recovery(
    request: pytest.FixtureRequest,
    browser: Any,
    tmp_path: Path,
    database: str,
    workers: int | None,
    mode: str | None,
) -> None:
    """``mode``: the executor the form picks when the app offers one (None: its default)."""
    db_url = request.getfixturevalue("pg_url" if database == "postgres" else "sqlite_url")
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    servers: list[AppServer] = []  # each closed at the end, whatever happens
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    seen: list[Any] = []  # every request the page makes
    context.on("request", lambda r: seen.append(r))
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    # A request the page's Content-Security-Policy blocked shows up here only.
    page.on(
        "console",
        lambda m: page_errors.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.set_default_timeout(60_000)
    try:
        servers.append(app_server(tmp_path, db_url, workers, port, "first"))
        servers[0].start()
        page.goto(f"{origin}/")
        # The form comes from the OpenAPI schema of POST /trigger_async.
        page.wait_for_selector("#param-steps")  # the form is built from the schema
        schema = servers[0].client.get("/openapi.json").json()
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

        # The grid fills: big steps (fib(30..32)) run, and with the pool some are already
        # done. The fan-out enqueues the big ones first and the pool computes in that
        # order. Threads share one core: the big steps end together, and the enqueueing
        # of the rest waits for them, so none is done before they all are; there the crash
        # comes while they run, with nothing done yet.
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
        done_before = {c["index"] for c in before if c["status"] == "SUCCESS"}
        assert all(c["executor"] for c in before if c["status"] in ("SUCCESS", "PENDING"))

        # Crash from the page, with the token typed in.
        page.fill("#token", TOKEN)
        assert TOKEN not in page.content()
        page.click("#crash")
        page.wait_for_selector("#stop-result[data-status='202']")
        assert page.input_value("#token") == ""  # the box is cleared after use
        page.wait_for_selector("#conn[data-state='offline']")
        assert servers[0].wait_exit(30) is not None
        status = workflow_status(db_url, workflow_id)
        assert status == "PENDING", "the crash came after the fan-out finished"

        # Start it again on the same port and database: the page finds it by itself.
        servers.append(app_server(tmp_path, db_url, workers, port, "second"))
        servers[1].start()
        page.wait_for_selector("#conn[data-state='online'][data-outages='1']")
        page.wait_for_selector("#fanout-summary[data-status='SUCCESS']", timeout=120_000)
        page.wait_for_function(
            f"() => document.querySelectorAll('#grid .cell.s-SUCCESS').length === {STEPS}"
        )
        after = cells(page)
        assert page.get_attribute("#fanout-summary", "data-done") == str(STEPS)
        assert page.eval_on_selector("#progress-bar", "b => b.style.width") == "100%"
        page.screenshot(path=str(tmp_path / "live-page.png"), full_page=True)

        # The marks are the database's: steps dispatched twice, nothing else.
        rows = step_rows(db_url, workflow_id)
        assert sorted(rows) == list(range(STEPS))
        assert all(status == "SUCCESS" for status, _, _ in rows.values())
        marked = {c["index"] for c in after if c["rerun"]}
        assert marked == {i for i, (_, _, n) in rows.items() if n > 1}
        assert marked, "no step ran again: the crash found nothing running"
        assert not marked & done_before, "a step done before the crash ran again"
        assert int(page.get_attribute("#fanout-summary", "data-rerun") or -1) == len(marked)
        runs = ledger_runs(tmp_path / "ledger.txt", workflow_id)
        assert all(runs[i] == 1 for i in range(STEPS) if i not in marked), runs
        assert {i for i in range(STEPS) if runs[i] > 1} <= marked, runs
        for c in after:
            assert c["attempts"] == rows[c["index"]][2]
            assert c["executor"] == rows[c["index"]][1]
        # Coloured by worker: one colour per executor id, the legend's.
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

        # The schedule's slots, each with the worker that ran it.
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

        check_endpoints(servers[-1], workflow_id, mode)

        # The stop buttons: a wrong token is refused and the server keeps serving; the
        # right one stops it gracefully (exit 0, or -15: uvicorn re-raises the SIGTERM).
        page.fill("#token", "not-the-token")
        page.click("#graceful")
        page.wait_for_selector("#stop-result[data-status='401']")
        assert servers[-1].running
        page.fill("#token", TOKEN)
        page.click("#graceful")
        page.wait_for_selector("#stop-result[data-status='202']")
        assert servers[-1].wait_exit(60) in (0, -15)
        page.wait_for_selector("#conn[data-state='offline'][data-outages='2']")

        # Where the page went and where the token went.
        assert not page_errors
        urls = [r.url for r in seen]
        assert all(u == origin or u.startswith(origin + "/") for u in urls), urls
        carriers = []
        for r in seen:
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
        storage = page.evaluate(
            "() => [localStorage.length, sessionStorage.length, document.cookie]"
        )
        assert storage == [0, 0, ""]
        assert context.cookies() == []
    finally:
        context.close()
        for server in servers:
            server.close()
