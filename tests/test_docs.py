"""The docs cannot drift from the code.

- Every experiment page ``docs/<script>.md`` has the sections Question / Run / Observe /
  What it means, and its ```` ```console ```` blocks are run here, on a fresh database,
  the way a reader would type them (the convention is in docs/testing.md): ``$ command``
  lines, ``# exit N``, ``&`` for a server, ``kill %N``, ``curl`` to the last server, and
  after each command the lines its output must contain (pieces between ``…``).
- The README's table of experiments names each page's first command and a line its
  output must show.
- benchmarks/README.md and reliability/README.md are exactly what their report commands
  generate from the committed JSON.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import REPO
from harness.env import record_output, remember_secrets, script_env
from harness.proc import wait_for
from harness.server import AppServer

SCRIPTS = [
    "scope.py",
    "scope_funcs.py",
    "fastapi_scope.py",
    "fastapi_scope_cache.py",
    "fastapi_scope_shutdown.py",
    "nested_wfs.py",
    "integration.py",
]
SECTIONS = ["Question", "Run", "Observe", "What it means"]
README = REPO / "README.md"
README_MAX_LINES = 200
DOCSTRING_MAX_LINES = 15
GET_RETRY_SEC = 120  # a GET is repeated until its answer matches: work runs in background
COMMAND_TIMEOUT_SEC = 300
SHUTDOWN_EXIT_SEC = 30  # POST /shutdown answered 202: the server is gone within this
SERVER_LOG_WAIT_SEC = 30  # the lines expected after `command &` are in the server's log


def page(script: str) -> Path:
    return REPO / "docs" / f"{script.removesuffix('.py')}.md"


# --- parsing the pages ------------------------------------------------------------------


@dataclass
class Command:
    text: str
    exit_status: int = 0
    expected: list[str] = field(default_factory=list)

    @property
    def background(self) -> bool:
        return self.text.endswith("&")


_EXIT = re.compile(r"\s+#\s*exit (\d+)\s*$")


def console_blocks(markdown: str) -> list[list[Command]]:
    """Every ```console block: its commands, each with its expected output lines."""
    blocks = []
    for body in re.findall(r"^```console\n(.*?)^```", markdown, flags=re.M | re.S):
        commands: list[Command] = []
        for line in body.splitlines():
            if line.startswith("$ "):
                text = line[2:].strip()
                status = 0
                if m := _EXIT.search(text):
                    text, status = text[: m.start()].rstrip(), int(m.group(1))
                commands.append(Command(text, status))
            elif line.strip():
                assert commands, f"output before any command: {line!r}"
                commands[-1].expected.append(line.strip())
        blocks.append(commands)
    return blocks


def sections(markdown: str) -> list[str]:
    return re.findall(r"^## (.+)$", markdown, flags=re.M)


def pieces(expected: str) -> list[str]:
    return [p for p in (part.strip() for part in expected.split("…")) if p]


def shows(expected: str, output: str) -> bool:
    """Some line of ``output`` contains every piece of ``expected`` (split at ``…``)."""
    wanted = pieces(expected)
    return any(all(p in line for p in wanted) for line in output.splitlines())


def first_command(script: str) -> Command:
    """The page's first command that runs something (not an ``export``)."""
    blocks = console_blocks(page(script).read_text())
    return next(c for c in blocks[0] if not c.text.startswith("export "))


def readme_rows() -> dict[str, list[str]]:
    """The experiments table of the README: script -> its cells."""
    text = README.read_text()
    table = text.split("<!-- experiments-table")[1].split("<!-- /experiments-table -->")[0]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\| \[(\w+\.py)\]\(docs/(\w+)\.md\) \|", line)
        if m:
            assert m.group(2) == m.group(1).removesuffix(".py"), line
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split(" | ")]
    return rows


def code(cell: str) -> str:
    m = re.fullmatch(r"`(.+)`", cell)
    assert m, f"not one code span: {cell!r}"
    return m.group(1)


# --- fast checks: structure and cross-references -----------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_page_has_the_four_sections_and_runnable_commands(script: str) -> None:
    text = page(script).read_text()
    assert text.startswith(f"# `{script}`"), "the title names the script"
    found = sections(text)
    assert [s for s in found if s in SECTIONS] == SECTIONS, found
    blocks = console_blocks(text)
    assert blocks, "no ```console block"
    run = text.split("## Run", 1)[1].split("## Observe", 1)[0]
    assert "```console" in run, "the first console block is under Run"
    assert any(c.expected for c in blocks[0]), "no output line to check"
    assert f"{script}" in first_command(script).text or "uvicorn" in first_command(script).text


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_docstring_is_the_question_and_a_pointer_to_its_page(script: str) -> None:
    """The lesson is written once, on the page; the script only asks and points."""
    docstring = ast.get_docstring(ast.parse((REPO / script).read_text())) or ""
    assert f"docs/{script.removesuffix('.py')}.md" in docstring
    assert len(docstring.splitlines()) <= DOCSTRING_MAX_LINES, "the long version is on the page"


def test_the_readme_is_short_and_its_table_matches_the_pages() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    rows = readme_rows()
    assert list(rows) == SCRIPTS, "one row per experiment, in this order"
    for script, cells in rows.items():
        assert len(cells) == 4, cells
        command = first_command(script)
        assert code(cells[2]) == command.text.removesuffix("&").strip(), script
        line = code(cells[3])
        expected = [
            e
            for block in console_blocks(page(script).read_text())
            for c in block
            for e in c.expected
        ]
        assert any(line in e for e in expected), f"{script}: {line!r} is not on its page"
    for extra in ("docs/service.md", "benchmarks/README.md", "reliability/README.md"):
        assert f"({extra})" in text, extra


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_output_quoted_under_observe_is_output_the_commands_are_checked_for(
    script: str,
) -> None:
    """A JSON fragment quoted under Observe (`"key": value`) is part of an output line of
    a console block, so the slow test below checks it against the real output."""
    text = page(script).read_text()
    observe = text.split("## Observe", 1)[1].split("\n## ", 1)[0]
    expected = [e for block in console_blocks(text) for c in block for e in c.expected]
    quoted = [q for q in re.findall(r"`([^`]+)`", observe) if re.search(r'"\w+":', q)]
    assert quoted, "Observe quotes no output"
    for q in quoted:
        assert any(q in e for e in expected), f"{q!r} is not in the checked output"


def anchors(markdown: str) -> set[str]:
    """GitHub's ids of the headings: link text kept, punctuation dropped, spaces to -."""
    ids = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
        ids.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return ids


def test_relative_links_in_the_docs_resolve() -> None:
    files = [README, *sorted((REPO / "docs").glob("*.md"))]
    for doc in files:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)]*))?\)", doc.read_text()):
            if "://" in target:
                continue
            path = doc.parent / target if target else doc
            assert path.exists(), f"{doc.name}: broken link {target}"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path.read_text()), f"{doc.name}: no #{anchor} in {target}"


def test_benchmarks_readme_is_generated_from_its_json() -> None:
    from benchmarks import report

    expected = report.render(json.loads(report.JSON.read_text()), report.TEMPLATE.read_text())
    assert report.OUT.read_text() == expected, (
        "benchmarks/README.md differs from what `python -m benchmarks.report` writes: "
        "edit README.in.md or results.json, then regenerate"
    )


def test_reliability_readme_is_generated_from_its_json() -> None:
    from reliability import report

    expected = report.render(json.loads(report.JSON.read_text()), report.TEMPLATE.read_text())
    assert report.OUT.read_text() == expected, (
        "reliability/README.md differs from what `python -m reliability.report` writes: "
        "edit README.in.md or results.json, then regenerate"
    )


def test_the_matcher_needs_every_piece_on_one_line() -> None:
    out = '{"a": 1, "b": 2}\n{"c": 3}'
    assert shows('{… "a": 1 … "b": 2 …}', out)
    assert not shows('{… "a": 1 … "c": 3 …}', out)
    assert not shows('"a": 2', out)


# --- slow: run the pages ---------------------------------------------------------------


class Session:
    """One console block: a shell-like environment, background servers, seen values."""

    def __init__(self, db_url: str, tmp_path: Path) -> None:
        self.env = script_env(db_url)
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}"
        self.tmp_path = tmp_path
        self.servers: list[AppServer] = []
        self.seen: dict[str, Any] = {}

    def close(self) -> None:
        for server in self.servers:
            server.close()

    # Values and variables.

    def _remember(self, output: str) -> None:
        for line in output.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                self.seen.update(
                    (k, v) for k, v in record.items() if isinstance(v, str | int | float)
                )

    def _fill(self, text: str) -> str:
        def value(m: re.Match[str]) -> str:
            assert m.group(1) in self.seen, f"no {m.group(1)} seen before {text!r}"
            return str(self.seen[m.group(1)])

        return re.sub(r"<([a-z_]+)>", value, text)

    def _expand(self, text: str) -> str:
        return re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: self.env.get(m.group(1), ""), text)

    # Commands.

    def run(self, command: Command) -> None:
        text = self._fill(command.text)
        if text.startswith("export "):
            self._export(text)
        elif command.background:
            self._serve(text.removesuffix("&").strip(), command)
        elif re.fullmatch(r"kill( -9)? %\d+", text):
            self._kill(text)
        elif text.startswith("curl "):
            self._curl(text, command)
        else:
            self._shell(text, command)

    def _export(self, text: str) -> None:
        name, _, rhs = text.removeprefix("export ").partition("=")
        proc = subprocess.run(
            ["bash", "-c", f"printf %s {rhs}"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        self.env[name] = proc.stdout
        remember_secrets(self.env)

    def _serve(self, text: str, command: Command) -> None:
        argv = shlex.split(text, comments=True)
        env = dict(self.env)
        while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
            name, _, value = argv.pop(0).partition("=")
            env[name] = value
        log = self.tmp_path / f"server-{len(self.servers) + 1}.log"
        if argv[0] == "uvicorn":
            server = AppServer(argv[1], env, log, args=argv[2:])
        else:
            assert argv[0] == "python" and argv[1].endswith(".py"), text
            server = AppServer.script(argv[1], env, log)
        self.servers.append(server)
        server.start(ready_timeout=90)

        def logged() -> bool:
            return all(shows(e, server.log_text()) for e in command.expected)

        wait_for(logged, SERVER_LOG_WAIT_SEC, 0.5, f"{command.expected} in the log of {text}")

    def _kill(self, text: str) -> None:
        server = self.servers[int(text.rsplit("%", 1)[1]) - 1]
        if " -9 " in text:
            server.kill()
        else:
            server.terminate(timeout=30)

    def _curl(self, text: str, command: Command) -> None:
        args = shlex.split(self._expand(text), comments=True)[1:]
        method, headers, url = "GET", {}, None
        while args:
            arg = args.pop(0)
            if arg == "-X":
                method = args.pop(0)
            elif arg == "-H":
                name, _, value = args.pop(0).partition(":")
                headers[name.strip()] = value.strip()
            elif arg in ("-s", "--silent"):
                continue
            else:
                assert not arg.startswith("-"), f"curl option {arg} not understood"
                url = arg
        assert url is not None, text
        live = [s for s in self.servers if s.proc is not None and s.proc.poll() is None]
        assert live, f"{text}: no server is running"
        url = re.sub(r"^(https?://)?(localhost|127\.0\.0\.1):8000", live[-1].base_url, url)
        deadline = time.monotonic() + (GET_RETRY_SEC if method == "GET" else 0)
        while True:
            response = httpx.request(method, url, headers=headers, timeout=60)
            answer = response.text
            record_output(answer)
            if all(shows(e, answer) for e in command.expected) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self._remember(answer)
        for expected in command.expected:
            assert shows(expected, answer), f"{text}: {expected!r} not in {answer[:2000]!r}"
        if httpx.URL(url).path == "/shutdown" and response.status_code == 202:
            # The page says the server stops: it must, before the next command.
            live[-1].wait_exit(SHUTDOWN_EXIT_SEC)

    def _shell(self, text: str, command: Command) -> None:
        proc = subprocess.run(
            ["bash", "-c", text],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SEC,
        )
        record_output(proc.stdout, proc.stderr)
        output = proc.stdout + proc.stderr
        assert proc.returncode == command.exit_status, (
            f"{text}: exit {proc.returncode}, expected {command.exit_status}\n{output[-3000:]}"
        )
        self._remember(proc.stdout)
        for expected in command.expected:
            assert shows(expected, output), f"{text}: {expected!r} not in\n{output[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_commands_of_each_page_show_what_it_says(
    script: str, sqlite_url: str, tmp_path: Path
) -> None:
    """SQLite, as a reader who has set nothing up would run them."""
    for block in console_blocks(page(script).read_text()):
        session = Session(sqlite_url, tmp_path)
        try:
            for command in block:
                session.run(command)
        finally:
            session.close()
