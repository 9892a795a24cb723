"""The shutdown demo's process pool: where a step computes, and what each kind of stop
leaves of the pool.

``POST /trigger_async?executor=process|thread``: ``process`` (the default) hands each
step's ``fib`` to the service's process pool (shutdown/pool.py), ``thread`` computes in the
DBOS step thread. The tests check, on real servers and a real Postgres:

- the choice is validated (422 with the reason), recorded as a workflow input, used by
  every step body (the FIB_LEDGER line ends with the mode the body ran in), and real:
  the CPU time goes to the pool's processes, or to the server's;
- a recovered fan-out keeps its mode;
- no process outlives a crash (/shutdown?mode=crash), a graceful stop, or a SIGKILL of
  the server process alone; after each, the next start finishes the fan-out with the
  right numbers and re-runs only the bodies that were in flight;
- two workers split one fan-out, each within the queue's worker_concurrency;
- a pool process holds only what ``fib`` needs (shutdown/fib.py and the pool's machinery):
  no DBOS, no FastAPI, no app, no re-run main module, however the demo is started
  (``python fastapi_scope_shutdown.py`` with one or two workers, uvicorn's own
  command, the image), and computes the fan-out's steps.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

import fastapi_scope_shutdown
import harness.docker as hd
from harness.clients import ShutdownClient
from harness.db import query
from harness.env import remember_secrets, script_env
from harness.fanout import (
    MODULE,
    big_steps_in_flight,
    children,
    fan_out_result,
    ledger_runs,
    max_running,
    shutdown_server,
)
from harness.proc import (
    alive,
    cpu_seconds,
    descendants,
    free_port,
    parse_json_lines,
    run_script,
    wait_for,
)
from harness.server import AppServer

pytestmark = pytest.mark.slow

TOKEN = "pool-test-token-5b2e91"  # must never show up in a log
PROCESSES = 2  # FIB_PROCESSES of the servers here


def server_for(
    tmp_path: Path, db_url: str, name: str, workers: int | None = None, processes: int = PROCESSES
) -> AppServer:
    return shutdown_server(
        db_url,
        tmp_path / f"{name}.log",
        workers=workers,
        token=TOKEN,
        ledger=tmp_path / "ledger.txt",
        env={"FIB_PROCESSES": str(processes)},
        ready_path="/healthz",
    )


def client(server: AppServer) -> ShutdownClient:
    return ShutdownClient(server.client)


def trigger(server: AppServer, steps: int, max_n: int, executor: str) -> str:
    answer = server.client.post(
        "/trigger_async", params={"steps": steps, "max_n": max_n, "executor": executor}
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["workflow_id"])


def wait_done(server: AppServer, workflow_id: str, timeout: float = 120) -> dict[str, Any]:
    view: dict[str, Any] = wait_for(
        lambda: (v := client(server).view(workflow_id))["status"] == "SUCCESS" and v,
        timeout,
        0.2,
        f"fan-out {workflow_id} to finish",
    )
    return view


def ledger_modes(tmp_path: Path, parent: str) -> dict[int, list[str]]:
    """The executor each body of ``parent`` ran in, in order (index -> modes)."""
    modes: dict[int, list[str]] = defaultdict(list)
    for line in (tmp_path / "ledger.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2].startswith(parent + "-"):
            modes[int(parts[0])].append(parts[3])
    return modes


# --- processes -------------------------------------------------------------------


def pool_pids(server_pid: int) -> list[int]:
    """The pool's processes: multiprocessing spawn children of the server process."""
    return sorted(p for p, cmd in descendants(server_pid).items() if "multiprocessing.spawn" in cmd)


def pool_pids_of(tree: dict[int, str]) -> list[int]:
    return [p for p, cmd in tree.items() if "multiprocessing.spawn" in cmd]


def assert_all_gone(pids: list[int], within: float, what: str) -> None:
    wait_for(lambda: not [p for p in pids if alive(p)], within, 0.05, what)


def assert_recovered(
    tmp_path: Path,
    db_url: str,
    workflow_id: str,
    steps: int,
    max_n: int,
    at_stop: dict[int, dict[str, Any]],
    view: dict[str, Any],
) -> Counter[int]:
    """The right numbers, one recorded output per step, and a body ran twice only if its
    step was in flight (dequeued, not finished) at the stop."""
    assert view["result"] == fan_out_result(steps, max_n)
    after = children(db_url, workflow_id)
    assert sorted(after) == list(range(steps))
    assert {c["outputs"] for c in after.values()} == {1}
    runs = ledger_runs(tmp_path / "ledger.txt", workflow_id)
    assert set(runs) == set(range(steps)) and max(runs.values()) <= 2
    in_flight = {i for i, c in at_stop.items() if c["status"] == "PENDING"}
    assert {i for i, n in runs.items() if n == 2} <= in_flight
    assert all(runs[i] == 1 for i, c in at_stop.items() if c["status"] == "SUCCESS")
    return runs


# --- the choice --------------------------------------------------------------------


def test_executor_is_validated_recorded_and_decides_where_fib_runs(
    pg_url: str, tmp_path: Path
) -> None:
    # 5 steps of fib(31) plus the lighter ones: about a second and a half of CPU.
    steps, max_n = 36, 31
    with server_for(tmp_path, pg_url, "server") as server:
        assert server.proc is not None
        bad = server.client.post("/trigger_async", params={"executor": "gpu"})
        (error,) = bad.json()["detail"]
        assert bad.status_code == 422 and error["loc"] == ["query", "executor"]
        assert "'process'" in error["msg"] and "'thread'" in error["msg"]
        pool = pool_pids(server.proc.pid)
        assert len(pool) == PROCESSES

        used: dict[str, tuple[float, float]] = {}
        views = {}
        for executor in ("process", "thread"):
            before = cpu_seconds(server.proc.pid), sum(cpu_seconds(p) for p in pool)
            workflow_id = trigger(server, steps, max_n, executor)
            views[executor] = wait_done(server, workflow_id)
            after = cpu_seconds(server.proc.pid), sum(cpu_seconds(p) for p in pool)
            used[executor] = (after[0] - before[0], after[1] - before[1])
            modes = ledger_modes(tmp_path, workflow_id)
            assert modes == {i: [executor] for i in range(steps)}
        assert pool_pids(server.proc.pid) == pool  # the same processes throughout
        default = client(server).view(trigger(server, 2, 1, "process"))
        openapi = server.client.get("/openapi.json").json()

    for executor, view in views.items():
        assert view["executor"] == executor  # read back from the recorded input
        assert view["result"] == fan_out_result(steps, max_n)
    assert default["executor"] == "process"
    params = {p["name"]: p for p in openapi["paths"]["/trigger_async"]["post"]["parameters"]}
    assert params["executor"]["schema"]["default"] == "process"
    # Where the CPU time went: the fib work (~1.5 s) in the pool's processes, or in the
    # server process; the other side stays near idle.
    (server_p, pool_p), (server_t, pool_t) = used["process"], used["thread"]
    assert pool_p > 0.8 * server_p and pool_p > 0.5, used
    assert pool_t < 0.1 and server_t > 5 * pool_t, used


@pytest.mark.parametrize("value", ["0", "many", "65"])
def test_a_bad_fib_processes_fails_fast_with_one_line(tmp_path: Path, value: str) -> None:
    url = f"sqlite:///{tmp_path / 'experiment6.sqlite'}"
    result = run_script(
        "fastapi_scope_shutdown.py", env=script_env(url, FIB_PROCESSES=value), timeout=60
    )
    assert result.returncode == 2
    assert len(result.records) == 1
    message = result.records[0]["message"]
    assert "FIB_PROCESSES" in message and repr(value) in message, message


# --- stops ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("executor", "crash"),
    [
        ("process", "endpoint"),
        # With steps computing in its threads, the server answers /shutdown only when the
        # GIL lets it, possibly after the fan-out is done: a SIGKILL from outside instead.
        ("thread", "sigkill"),
    ],
)
def test_crash_leaves_no_process_and_the_recovered_fan_out_keeps_its_mode(
    pg_url: str, tmp_path: Path, executor: str, crash: str
) -> None:
    steps, max_n = 48, 32  # 16 steps of fib(32): seconds of work left when the crash lands
    server = server_for(tmp_path, pg_url, "first").start()
    try:
        assert server.proc is not None
        workflow_id = trigger(server, steps, max_n, executor)
        big_steps_in_flight(pg_url, workflow_id, max_n, 3, 90)
        tree = descendants(server.proc.pid)
        assert len(pool_pids(server.proc.pid)) == PROCESSES, tree
        if crash == "endpoint":
            assert client(server).shutdown("crash", TOKEN).status_code == 202
        else:
            os.kill(server.proc.pid, signal.SIGKILL)  # the server process alone
        assert server.wait_exit(timeout=15) == -signal.SIGKILL
        # The pool's processes and multiprocessing's resource tracker go with the server.
        assert_all_gone(list(tree), 5, f"the server's processes {tree} to end")
    finally:
        server.close()
    at_crash = children(pg_url, workflow_id)
    assert any(c["status"] == "PENDING" for c in at_crash.values())

    with server_for(tmp_path, pg_url, "second") as again:
        view = wait_done(again, workflow_id)
    assert view["executor"] == executor
    runs = assert_recovered(tmp_path, pg_url, workflow_id, steps, max_n, at_crash, view)
    # Every body, the ones re-run after the crash included, ran in the recorded mode.
    modes = ledger_modes(tmp_path, workflow_id)
    assert {m for ms in modes.values() for m in ms} == {executor}
    assert sum(runs.values()) == sum(len(ms) for ms in modes.values())


def test_sigkill_of_the_server_alone_ends_its_pool_at_once(pg_url: str, tmp_path: Path) -> None:
    """Not through the endpoint and not to the process group: only the server process
    dies, and its pool processes, busy with seconds of work, must not compute on."""
    steps, max_n = 48, 32  # 16 steps of fib(32), ~0.5 s each: seconds of queued work
    server = server_for(tmp_path, pg_url, "first").start()
    try:
        assert server.proc is not None
        workflow_id = trigger(server, steps, max_n, "process")
        big_steps_in_flight(pg_url, workflow_id, max_n, PROCESSES + 2, 90)
        pool = pool_pids(server.proc.pid)
        tree = descendants(server.proc.pid)
        assert len(pool) == PROCESSES
        busy = [cpu_seconds(p) for p in pool]
        os.kill(server.proc.pid, signal.SIGKILL)
        assert server.wait_exit(timeout=10) == -signal.SIGKILL
        killed = time.monotonic()
        assert_all_gone(list(tree), 5, f"the pool {tree} to end after its server")
        gone_after = time.monotonic() - killed
    finally:
        server.close()
    assert busy and gone_after < 2, gone_after
    at_kill = children(pg_url, workflow_id)

    with server_for(tmp_path, pg_url, "second") as again:
        view = wait_done(again, workflow_id)
    assert_recovered(tmp_path, pg_url, workflow_id, steps, max_n, at_kill, view)


def test_graceful_stop_ends_the_pool_within_the_grace_period(pg_url: str, tmp_path: Path) -> None:
    steps, max_n = 60, 32  # ~15 s of CPU: still running when the grace period ends
    server = server_for(tmp_path, pg_url, "first").start()
    try:
        assert server.proc is not None
        workflow_id = trigger(server, steps, max_n, "process")
        big_steps_in_flight(pg_url, workflow_id, max_n, PROCESSES + 2, 90)
        tree = descendants(server.proc.pid)
        assert len(pool_pids(server.proc.pid)) == PROCESSES
        answer = client(server).shutdown("graceful", TOKEN)
        started = time.monotonic()
        assert answer.status_code == 202
        code = server.wait_exit(timeout=fastapi_scope_shutdown.GRACE_SECONDS + 20)
        stopped_after = time.monotonic() - started
        # The pool ended before the server exited; multiprocessing's resource tracker
        # ends when it sees the server gone.
        pool_left = [p for p in pool_pids_of(tree) if alive(p)]
        assert_all_gone(list(tree), 2, f"the server's processes {tree} to end")
    finally:
        server.close()
    assert code == -signal.SIGTERM
    # uvicorn's own wait for open requests, DBOS.destroy's grace period, then the pool.
    assert stopped_after < fastapi_scope_shutdown.GRACE_SECONDS + 5, stopped_after
    assert pool_left == [], pool_left
    messages = [r["message"] for r in server.records()]
    assert messages.index("DBOS successfully shut down") > messages.index("stopping DBOS")
    at_stop = children(pg_url, workflow_id)
    parent = query(
        pg_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", workflow_id
    )
    assert parent == [("PENDING",)], "the fan-out finished before the stop"
    # Nothing the stop cut off was recorded as a failure: no step ended in ERROR.
    assert {c["status"] for c in at_stop.values()} <= {"SUCCESS", "PENDING", "ENQUEUED"}

    with server_for(tmp_path, pg_url, "second") as again:
        view = wait_done(again, workflow_id, timeout=180)
    assert_recovered(tmp_path, pg_url, workflow_id, steps, max_n, at_stop, view)


# --- two workers -----------------------------------------------------------------------


def test_two_workers_split_the_default_fan_out(pg_url: str, tmp_path: Path) -> None:
    steps, max_n = fastapi_scope_shutdown.DEFAULT_STEPS, fastapi_scope_shutdown.DEFAULT_MAX_N
    server = server_for(tmp_path, pg_url, "server", workers=2).start()
    try:
        workflow_id = trigger(server, steps, max_n, "process")
        view = wait_done(server, workflow_id)
    finally:
        server.close()
    assert view["result"] == fan_out_result(steps, max_n)
    queue = query(
        pg_url,
        "SELECT concurrency, worker_concurrency FROM dbos.queues WHERE name = %s",
        fastapi_scope_shutdown.QUEUE,
    )
    share = fastapi_scope_shutdown.worker_concurrency(2)
    assert queue == [(fastapi_scope_shutdown.QUEUE_CONCURRENCY, share)]
    kids = children(pg_url, workflow_id)
    per_executor = Counter(c["executor_id"] for c in kids.values())
    assert set(per_executor) == {"shutdown-0", "shutdown-1"}, per_executor
    # Each worker ran a fair part (benchmark row 8d measures the share against its target,
    # 30%; here a margin for a loaded machine), never more than worker_concurrency at once.
    assert min(per_executor.values()) >= 0.2 * steps, per_executor
    for executor in per_executor:
        bodies = [c["body"] for c in kids.values() if c["executor_id"] == executor]
        assert max_running(bodies) <= share


# --- what a pool process holds ---------------------------------------------------------

# Never in a pool process: DBOS and its database layer, the web stack, the app.
HEAVY = {"dbos", "sqlalchemy", "fastapi", "starlette", "pydantic", "uvicorn", MODULE}
# What it needs: the pool's machinery and the module of fib.
NEEDED = {"shutdown.pool", "shutdown.fib"}


def pool_reports(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each pool process answered to ``pool.ready`` (``shutdown.pool.facts``: computed in
    the pool process from its own ``sys.modules``), from every serving process's log."""
    return [p for r in records if r["message"] == "process pool ready" for p in r["processes"]]


def assert_light(reports: list[dict[str, Any]], count: int) -> None:
    assert len(reports) == count, reports
    for report in reports:
        modules = set(report["modules"])
        assert NEEDED <= modules, report  # the list is real: it has what fib needs
        assert not {m.partition(".")[0] for m in modules} & HEAVY, report
        assert report["main"] is None, report  # no main module re-run (script or uvicorn's)


def compute_a_fan_out(api: ShutdownClient) -> None:
    """The light pool processes do compute the steps (fib pickled by its module)."""
    steps, max_n = 12, 20
    view = api.wait_success(api.trigger(steps, max_n, executor="process"), timeout=120)
    assert view["result"] == fan_out_result(steps, max_n)


def uvicorn_command(tmp_path: Path, db_url: str) -> AppServer:
    """``uvicorn fastapi_scope_shutdown:app``: uvicorn's own script as the main module
    (the image's command), not ``python -m uvicorn``."""
    script = shutil.which("uvicorn", path=str(Path(sys.executable).parent))
    assert script is not None, "no uvicorn script next to the interpreter"
    port = free_port()
    command = [script, f"{MODULE}:app", "--host", "127.0.0.1", "--port", str(port)]
    env = script_env(db_url, FIB_PROCESSES=str(PROCESSES))
    return AppServer(f"{MODULE}:app", env, tmp_path / "uvicorn.log", port, command=command,
                     ready_path="/healthz")  # fmt: skip


@pytest.mark.parametrize("start", ["python-script", "python-script-2-workers", "uvicorn"])
def test_a_pool_process_imports_only_what_fib_needs(
    pg_url: str, tmp_path: Path, start: str
) -> None:
    if start == "uvicorn":
        server = uvicorn_command(tmp_path, pg_url)
    else:
        server = server_for(tmp_path, pg_url, start, workers=2 if "2" in start else 1)
    workers = 2 if start == "python-script-2-workers" else 1
    with server:
        assert server.proc is not None
        compute_a_fan_out(client(server))
        # With two workers /healthz answers once the first one serves: wait for both.
        reports = wait_for(
            lambda: len(r := pool_reports(server.records())) >= workers * PROCESSES and r,
            60,
            0.1,
            "every worker's pool to report",
        )
        tree = descendants(server.proc.pid)
    assert_light(reports, workers * PROCESSES)
    # The reports come from the pool's own processes, children of the serving process.
    assert {r["pid"] for r in reports} <= set(pool_pids_of(tree))


@pytest.mark.timeout(900)  # the first image build of a checkout takes minutes
def test_in_the_image_a_pool_process_imports_only_what_fib_needs(
    pg_url: str, image: str, tmp_path: Path
) -> None:
    env = {"DBOS_SYSTEM_DATABASE_URL": pg_url, "FIB_PROCESSES": str(PROCESSES)}
    remember_secrets(env)
    container = hd.Container(image, free_port(), env).start()
    try:
        wait_for(lambda: "process pool ready" in container.logs(), 180, 0.5, "the pool")
        assert container.running()
        with httpx.Client(base_url=container.url, timeout=30) as http:
            # The pool is ready before DBOS launches: the server listens only after.
            container.wait_serving(60, interval=0.2)
            compute_a_fan_out(ShutdownClient(http))
        reports = pool_reports(parse_json_lines(container.logs()))
    finally:
        (tmp_path / f"{container.name}.log").write_text(container.logs())
        container.remove()
    assert_light(reports, PROCESSES)


def test_a_function_of_main_is_refused_and_the_pool_keeps_working() -> None:
    """Pool processes do not load ``__main__``: such a function, sent by reference, would
    fail to unpickle there and break the pool for every step; ``run`` refuses it."""
    from shutdown import pool
    from shutdown.fib import fib

    def in_main(n: int) -> int:
        return n

    in_main.__module__ = "__main__"  # as in a script run directly
    pool.start(1, preload=fib.__module__)
    try:
        pool.ready()
        with pytest.raises(ValueError, match="__main__"):
            pool.run(in_main, 1)
        assert pool.run(fib, 20) == 6765
    finally:
        pool.stop()
