"""``AppServer``: an app served in a subprocess of its own, reached with httpx.

The one server wrapper of the tests, the benchmarks and the reliability suite. The
process runs in its own process group (``kill`` takes every worker with it); its
stdout and stderr (JSON log lines) go to a file, read after a crash or a restart.
Its environment's secrets and its log file go to the open secret watch (harness.env).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from harness import REPO
from harness.env import record_log_file, remember_secrets, script_env
from harness.proc import free_port, parse_json_lines, read_json_lines, wait_for


class AppServer:
    """``uvicorn <target>`` (the Docker image's way), or any ``command`` that serves on
    ``port`` (``AppServer.script``: ``python <script>``; ``AppServer.module``:
    ``python -m <module>``, both reading PORT).

    Ready once ``GET ready_path`` answers 200 (``/openapi.json``: the app has started;
    ``/healthz``: the shutdown demo's health check, DBOS launched and the database up).
    """

    def __init__(
        self,
        target: str,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        args: list[str] | None = None,
        command: list[str] | None = None,
        cwd: Path | None = None,
        ready_path: str = "/openapi.json",
        ready_interval: float = 0.2,
        ready_timeout: float = 60,
    ) -> None:
        self.target = target
        self.env = env
        remember_secrets(env)
        record_log_file(log_path)
        self.port = port or free_port()
        self.log_path = log_path
        self.extra_args = args or []
        self.command = command
        self.cwd = cwd or REPO
        self.ready_path = ready_path
        self.ready_interval = ready_interval
        self.ready_timeout = ready_timeout
        self.ready_seconds = 0.0  # spawn -> ready, of the last start
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.base_url, timeout=30)

    @classmethod
    def script(
        cls, script: str, env: dict[str, str], log_path: Path, port: int | None = None, **kw: Any
    ) -> AppServer:
        """``python <script>``, serving on the port it reads from ``PORT``."""
        return cls._python(script, [str(REPO / script)], env, log_path, port, **kw)

    @classmethod
    def module(
        cls, module: str, env: dict[str, str], log_path: Path, port: int | None = None, **kw: Any
    ) -> AppServer:
        """``python -m <module>``, serving on the port it reads from ``PORT``."""
        return cls._python(module, ["-m", module], env, log_path, port, **kw)

    @classmethod
    def _python(
        cls,
        target: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        port: int | None,
        **kw: Any,
    ) -> AppServer:
        port = port or free_port()
        env["PORT"] = str(port)
        command = [sys.executable, *argv]
        return cls(target, env, log_path, port=port, command=command, **kw)

    def start(self, ready_timeout: float | None = None) -> AppServer:
        """Spawn the server and wait until it is ready (``ready_timeout`` seconds, by
        default the one given to the constructor)."""
        remember_secrets(self.env)
        cmd = self.command or [
            sys.executable,
            "-m",
            "uvicorn",
            self.target,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.extra_args,
        ]
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_ready(self.ready_timeout if ready_timeout is None else ready_timeout)
        except BaseException:
            self.kill()  # `with AppServer(...)` never reaches __exit__ when start fails
            raise
        self.ready_seconds = time.perf_counter() - started
        return self

    def wait_ready(self, timeout: float) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            try:
                return self.client.get(self.ready_path, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout, self.ready_interval, f"{self.target} to accept requests")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().strip().splitlines()[-lines:])

    def records(self, strict: bool = True) -> list[dict[str, Any]]:
        """Log lines as JSON: all must parse (``strict``), or the ones that do."""
        if strict:
            return parse_json_lines(self.log_text())
        return read_json_lines(self.log_text())[0]

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, nothing runs on the way out."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        self.kill()
        self.client.close()

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def cache_server(db_url: str, log_path: Path, credentials_secret: str) -> AppServer:
    """``uvicorn fastapi_scope_cache:app`` on ``db_url``, fetching ``credentials_secret``
    as its credentials (a secret: the tests look for it in logs and databases)."""
    env = script_env(db_url, CREDENTIALS_SECRET=credentials_secret)
    return AppServer("fastapi_scope_cache:app", env, log_path)
