"""A process pool owned by a service, for the CPU work of its DBOS steps.

    pool.start(size, preload=fib.__module__)
                            # in the lifespan, before DBOS launches; pool.ready() after
    pool.run(fib, n)        # in a step: the computation runs in a pool process while
                            # the step thread waits without holding the GIL
    pool.stop()             # after DBOS.destroy

Why a pool: under the GIL, the threads of one process share one core, so CPU-bound
steps on DBOS's thread pool never run in parallel and starve every other thread of
the process (the event loop, the queue poller, the workflow that enqueues). A step
that hands its computation to another process keeps the GIL free.

Lifecycle, for every way a service stops:
- Start method ``spawn``: each pool process is a fresh interpreter (fork + exec),
  never a bare fork of this multi-threaded process, which can copy a lock another
  thread held at that instant. A pool process imports the module of the function
  it runs (``preload``; here the whole app, about a second of CPU) as it starts,
  not at its first call: the lifespan starts the pool before DBOS launches and
  waits until every process is up after (``ready``).
  Not ``forkserver``: the executor watches its processes through the forkserver, so
  a SIGTERM for the whole process group (``docker stop``) that ends the forkserver
  breaks the pool, and every step still waiting fails.
- Pool processes ignore SIGINT and SIGTERM: Ctrl-C in a terminal and ``docker stop``
  (dumb-init signals the whole process group) reach them too, and a computation
  killed then would fail its step while DBOS still records outcomes. The service
  decides when they end: ``stop()`` kills them once ``DBOS.destroy`` has returned,
  when nothing they compute can be recorded any more (those steps re-run on
  recovery, as DBOS promises for steps that were running at a stop).
- Orphan guard: each pool process watches its parent's sentinel (a pipe the parent
  holds open, ``multiprocessing.parent_process().sentinel``) and exits the moment
  the parent is gone, also after a SIGKILL, when nothing of the parent runs.
  multiprocessing's resource tracker exits by itself then.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait
from typing import TypeVar

T = TypeVar("T")

START_METHOD = "spawn"
MAX_PROCESSES = 64
# How long stop() waits for the killed pool processes to be reaped.
STOP_TIMEOUT_SEC = 5.0
# Exit status of a pool process whose parent died (the orphan guard).
ORPHAN_EXIT = 70

_executor: ProcessPoolExecutor | None = None
_size = 0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: ``taskset``, cpusets)."""
    return len(os.sched_getaffinity(0)) or 1


def _guard_orphan() -> None:
    """In a pool process: exit as soon as the parent (the service) is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])  # readable (EOF) once every copy of the parent's end is closed
        os._exit(ORPHAN_EXIT)

    threading.Thread(target=watch, name="orphan-guard", daemon=True).start()


def _init_process(preload: str | None) -> None:
    # The service stops its pool; a signal for the process group is not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _guard_orphan()
    if preload and not preload.startswith("__"):  # __main__ is loaded by spawn itself
        importlib.import_module(preload)


def start(size: int, preload: str | None = None) -> None:
    """Create the pool and start its processes, each importing the module ``preload``
    (``ready()`` waits for them)."""
    global _executor, _size
    if _executor is not None:
        raise RuntimeError("the process pool is already running")
    ctx = multiprocessing.get_context(START_METHOD)
    _executor = ProcessPoolExecutor(
        size, mp_context=ctx, initializer=_init_process, initargs=(preload,)
    )
    _size = size
    _executor.submit(os.getpid)  # the first submit starts every process of the pool


def ready(timeout: float = 60) -> list[int]:
    """Wait until every process of the pool has started (a process takes calls only
    once its start-up is done) and return their pids."""
    if _executor is None:
        raise RuntimeError("the process pool is not running")
    answered: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(answered) < _size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(answered)} of {_size} pool processes up in {timeout} s")
        calls = [_executor.submit(os.getpid) for _ in range(_size)]
        answered |= {call.result(timeout=timeout) for call in calls}
        time.sleep(0.01)
    return pids()


def pids() -> list[int]:
    """The pool's processes (empty when it is not running)."""
    procs = getattr(_executor, "_processes", None) or {}
    return sorted(procs)


def run(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` in a pool process and return its result (or raise its error)."""
    if _executor is None:
        raise RuntimeError("the process pool is not running: start it in the lifespan")
    return _executor.submit(fn, *args).result()


def stop(timeout: float = STOP_TIMEOUT_SEC) -> None:
    """End the pool at once: cancel queued calls, kill the processes, reap them.

    Call it after ``DBOS.destroy``: a step whose computation is cut off here can no
    longer record anything, so it runs again on recovery (DBOS logs "Exception
    encountered in background workflow ... System database accessed before DBOS was
    launched" for it: the failure is not recorded). ``shutdown(wait=True)`` would
    instead wait for every running computation, however long.

    Not handled: a pool process killed from outside while the service runs (the OOM
    killer, say) breaks the pool; every step then waiting fails, and that is recorded.
    """
    global _executor
    executor, _executor = _executor, None
    if executor is None:
        return
    # ProcessPoolExecutor has no public way to end its processes before Python 3.14.
    processes = list((getattr(executor, "_processes", None) or {}).values())
    manager = getattr(executor, "_executor_manager_thread", None)
    executor.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.kill()
    for proc in processes:
        proc.join(timeout)
    # The executor's manager thread sees its processes gone, fails what still waited,
    # and lets go of the queues: once it has ended, their semaphores can be released
    # now rather than be reported as leaked by multiprocessing's resource tracker
    # (uvicorn ends on a re-raised SIGTERM, without running exit handlers).
    if manager is not None:
        manager.join(timeout)
    del executor, processes, manager
    gc.collect()
