"""Processes: run a script, wait for a condition, free ports, liveness and process trees,
JSON lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from harness import REPO
from harness.env import record_output, remember_secrets
from lab.signals import children


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid`` (children, theirs, ...): pid -> command line.
    The parent-child relation is ``lab.signals.children``'s, the one the apps use."""
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        for child in children(frontier.pop()):
            if child in found or not alive(child):
                continue
            try:
                found[child] = " ".join(psutil.Process(child).cmdline())
            except psutil.NoSuchProcess:
                continue
            frontier.append(child)
    return found


def session_of(pid: int) -> int | None:
    """The session id of ``pid`` (None once it is gone)."""
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def session(sid: int) -> set[int]:
    """The live processes of session ``sid``, re-parented orphans included."""
    return {p.pid for p in psutil.process_iter() if alive(p.pid) and session_of(p.pid) == sid}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes (an
    ``AssertionError``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.2,
    tolerate: tuple[type[BaseException], ...] = (OSError,),
) -> Any:
    """Like ``wait_for``, but a timeout is an observation (None), not an error; the
    exceptions in ``tolerate`` count as a falsy answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except tolerate:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line must be one JSON object."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"stdout line {number} is not JSON: {line!r}") from exc
        assert isinstance(record, dict), f"stdout line {number} is not an object: {line!r}"
        records.append(record)
    return records


def read_json_lines(text: str) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects among the lines, and how many non-empty lines were not one (a
    line cut by a SIGKILL, interleaved writes of several processes)."""
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


@dataclass
class ScriptResult:
    returncode: int
    stdout: str
    stderr: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        assert self.records, f"no output; stderr:\n{self.stderr}"
        last = self.records[-1]
        assert last.get("message") == "summary", f"last line is not the summary: {last}"
        return last

    def failure(self, code: int = 2) -> str:
        """The one line a run that failed with ``code`` printed: an ERROR record, and
        no traceback anywhere."""
        assert self.returncode == code, (self.returncode, self.stdout, self.stderr)
        assert len(self.records) == 1, self.records
        assert self.records[0]["severity"] == "ERROR", self.records[0]
        assert "Traceback" not in self.stdout + self.stderr
        message: str = self.records[0]["message"]
        return message

    def messages(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("message") == message]


def run_script(
    script: str,
    *args: str,
    env: dict[str, str],
    cwd: Path | None = None,
    timeout: float = 120,
) -> ScriptResult:
    """Run ``python <repo>/<script> args`` and parse its stdout as JSON lines."""
    remember_secrets(env)
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    record_output(proc.stdout, proc.stderr)
    return ScriptResult(proc.returncode, proc.stdout, proc.stderr, parse_json_lines(proc.stdout))
