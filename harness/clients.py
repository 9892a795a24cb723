"""One client per app HTTP contract: ``ScopeClient`` (fastapi_scope.py), ``CacheClient``
(fastapi_scope_cache.py), ``ShutdownClient`` (fastapi_scope_shutdown.py).

Each wraps an ``httpx.Client`` (``AppServer.client``). Methods named after an endpoint
return the raw ``httpx.Response`` (tests assert on statuses and reasons); the others
(``trigger``, ``workflow``, ``wait_finished``...) check the answer and return its data.
"""

from __future__ import annotations

from typing import Any

import httpx

from harness.proc import wait_for

RUNNING = ("PENDING", "ENQUEUED")


class WorkflowsClient:
    """``GET /workflows/{id}``, which every app serves."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def get_workflow(self, workflow_id: str, timeout: float | None = None) -> httpx.Response:
        if timeout is None:
            return self.http.get(f"/workflows/{workflow_id}")
        return self.http.get(f"/workflows/{workflow_id}", timeout=timeout)

    def workflow(self, workflow_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        """The workflow's view, or None when the app answers anything but 200."""
        answer = self.get_workflow(workflow_id, timeout)
        return answer.json() if answer.status_code == 200 else None

    def view(self, workflow_id: str) -> dict[str, Any]:
        """The workflow's view; the app must know it (200)."""
        answer = self.get_workflow(workflow_id)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def wait_finished(
        self, workflow_id: str, timeout: float = 60, interval: float = 0.1
    ) -> dict[str, Any]:
        """Poll until the workflow has left PENDING/ENQUEUED; its view."""

        def done() -> dict[str, Any] | None:
            body = self.view(workflow_id)
            return body if body["status"] not in RUNNING else None

        found: dict[str, Any] = wait_for(done, timeout, interval, f"workflow {workflow_id}")
        return found

    def wait_success(
        self, workflow_id: str, timeout: float = 60, interval: float = 0.2
    ) -> dict[str, Any]:
        """Poll until the workflow is SUCCESS (an ERROR keeps polling: a recovery may
        still run it); its view."""
        found: dict[str, Any] = wait_for(
            lambda: (view := self.view(workflow_id))["status"] == "SUCCESS" and view,
            timeout,
            interval,
            f"workflow {workflow_id} to succeed",
        )
        return found

    @staticmethod
    def _started(answer: httpx.Response, expected: tuple[int, ...]) -> str:
        assert answer.status_code in expected, f"{answer.status_code}: {answer.text}"
        return str(answer.json()["workflow_id"])


class ScopeClient(WorkflowsClient):
    """fastapi_scope.py: ``A.run`` on a class instance, ``Tally.run`` on a configured one."""

    def trigger_sync(self, **params: Any) -> httpx.Response:
        return self.http.post("/trigger_sync", params=params)

    def trigger_async(self, **params: Any) -> httpx.Response:
        return self.http.post("/trigger_async", params=params)

    def instance_trigger_sync(self, **params: Any) -> httpx.Response:
        return self.http.post("/instance/trigger_sync", params=params)

    def start(self, **params: Any) -> str:
        """``POST /trigger_async``, answered 202: the workflow id."""
        return self._started(self.trigger_async(**params), (202,))

    def counters(self, timeout: float | None = None) -> dict[str, Any]:
        answer = (
            self.http.get("/counters")
            if timeout is None
            else self.http.get("/counters", timeout=timeout)
        )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body


class CacheClient(WorkflowsClient):
    """fastapi_scope_cache.py: ``get_users`` and the per-process credentials cache."""

    def trigger_async(self, **params: Any) -> httpx.Response:
        return self.http.post("/trigger_async", params=params)

    def start(self, **params: Any) -> str:
        """``POST /trigger_async``, answered 202: the workflow id."""
        return self._started(self.trigger_async(**params), (202,))

    def run(self, timeout: float = 60, **params: Any) -> tuple[str, dict[str, Any]]:
        """Start ``get_users`` and wait until it finished: (id, view)."""
        workflow_id = self.start(**params)
        return workflow_id, self.wait_finished(workflow_id, timeout)

    def cache(self) -> dict[str, Any]:
        answer = self.http.get("/cache")
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body


class ShutdownClient(WorkflowsClient):
    """fastapi_scope_shutdown.py: the Fibonacci fan-out, /healthz, /shutdown."""

    def trigger_async(
        self,
        steps: int,
        max_n: int,
        timeout: float | None = None,
        executor: str | None = None,
        key: str | None = None,
    ) -> httpx.Response:
        """``POST /trigger_async``; ``key``: its ``Idempotency-Key`` header."""
        params: dict[str, Any] = {"steps": steps, "max_n": max_n}
        if executor is not None:
            params["executor"] = executor  # process (the demo's default) or thread
        headers = {"Idempotency-Key": key} if key is not None else None
        if timeout is None:
            return self.http.post("/trigger_async", params=params, headers=headers)
        return self.http.post("/trigger_async", params=params, headers=headers, timeout=timeout)

    def trigger(
        self,
        steps: int,
        max_n: int,
        timeout: float | None = None,
        executor: str | None = None,
        key: str | None = None,
    ) -> str:
        """Start a fan-out (202, PENDING): its workflow id."""
        answer = self.trigger_async(steps, max_n, timeout, executor, key)
        assert answer.status_code == 202, f"trigger answered {answer.status_code}: {answer.text}"
        body = answer.json()
        assert body["status"] == "PENDING", body
        return str(body["workflow_id"])

    def healthz(self, timeout: float | None = None) -> httpx.Response:
        if timeout is None:
            return self.http.get("/healthz")
        return self.http.get("/healthz", timeout=timeout)

    def shutdown(
        self,
        mode: str | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """``POST /shutdown?mode=...`` with ``Authorization: Bearer <token>`` (or the
        given headers, near misses included)."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        params = {"mode": mode} if mode is not None else None
        return self.http.post("/shutdown", params=params, headers=sent)
