"""The pool's stop ends its processes at once (shutdown/pool.py).

A stop must not wait for running computations: with long steps it would take as long
as the longest one and leave processes behind. Here the pool module is used directly,
in the test process, as the demo's lifespan uses it, with computations that would run
far longer than ``STOP_TIMEOUT_SEC``: ``stop()`` returns within a second, every pool
process is gone when it returns, and the calls still waiting on the pool end too.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

import fastapi_scope_shutdown
from harness.proc import alive, cpu_seconds, descendants, wait_for
from lab.signals import children
from shutdown import pool

# A pool in the test process, processes spawned and killed: seconds, not the fast tier.
pytestmark = pytest.mark.slow

PROCESSES = 2
# fib(32) takes ~0.2 s of CPU (the demo's note), each further n ~1.6 times more:
# fib(45) is minutes of CPU, far longer than STOP_TIMEOUT_SEC.
LONG_N = 45
# The stop's promise: at once, not after the computations or the reaping timeout.
STOP_BOUND_SEC = 1.0


def spawned_children() -> list[int]:
    """Live children of this process started by multiprocessing's spawn (the pool's
    processes; not its resource tracker, which lives as long as this process)."""
    tree = descendants(os.getpid())
    return [p for p in children(os.getpid()) if "multiprocessing.spawn" in tree.get(p, "")]


def kill(pids: list[int]) -> None:
    """A stop that failed must not leave fib(45) burning the shared cores."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def timed_stop(pids: list[int]) -> str | None:
    """Run ``pool.stop()``: None when it returned within STOP_BOUND_SEC with every pool
    process gone, else what went wrong. A stop still running after twice the reaping
    timeout is cut short (its processes killed)."""
    stopper = threading.Thread(target=pool.stop, name="pool-stop")
    started = time.monotonic()
    stopper.start()
    stopper.join(2 * pool.STOP_TIMEOUT_SEC)
    took = time.monotonic() - started
    if stopper.is_alive():
        kill(pids)
        stopper.join(30)
        return f"stop() still waiting after {took:.1f} s"
    left = [p for p in pids if alive(p)]
    if left:
        return f"stop() returned after {took:.2f} s, its processes {left} still alive"
    if took >= STOP_BOUND_SEC:
        return f"stop() took {took:.2f} s"
    return None


def test_stop_ends_the_pool_at_once_while_it_computes_far_longer_than_the_stop_timeout() -> None:
    assert (
        fastapi_scope_shutdown.fib.__module__ == "shutdown.fib"
    )  # what the pool processes import: fib alone
    pool.start(PROCESSES, preload=fastapi_scope_shutdown.fib.__module__)
    pids: list[int] = []
    callers = ThreadPoolExecutor(2 * PROCESSES, thread_name_prefix="step")
    try:
        pids = pool.ready()
        assert len(pids) == PROCESSES and sorted(spawned_children()) == pids
        idle = {p: cpu_seconds(p) for p in pids}
        # One computation per process, and as many queued behind them: the steps of a
        # service whose stop comes mid fan-out.
        calls: list[Future[int]] = [
            callers.submit(pool.run, fastapi_scope_shutdown.fib, LONG_N)
            for _ in range(2 * PROCESSES)
        ]
        wait_for(
            lambda: all(cpu_seconds(p) > idle[p] + 0.3 for p in pids),
            60,
            0.05,
            "every pool process to be computing",
        )
        assert not any(call.done() for call in calls)

        problem = timed_stop(pids)
        # The callers (the step threads) are released: each call ends with an error, none
        # with a result, and none keeps waiting for a process that is gone.
        errors = [call.exception(timeout=10) for call in calls]
    finally:
        pool.stop()
        callers.shutdown(wait=False, cancel_futures=True)
        kill(pids)
    assert problem is None, problem
    assert spawned_children() == []
    assert pool.pids() == []
    assert all(isinstance(e, Exception) for e in errors), errors
