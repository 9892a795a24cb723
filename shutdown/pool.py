"""A process pool owned by a service, for the CPU work of its DBOS steps.

    pool.start(size, preload=fib.__module__)
                            # in the lifespan, then pool.ready(), before DBOS launches
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
  thread held at that instant. Without the main module: ``spawn`` re-runs the
  parent's ``__main__`` in every child (as ``__mp_main__``) so that functions defined
  there can be unpickled; for ``python app.py`` that is the whole app, DBOS and
  FastAPI included, about a second of CPU per process. A pool process here runs only
  functions of importable modules, so it starts without the parent's main (the
  preparation data it gets leaves the main module out) and imports the module of the
  function it runs (``preload``: keep that module light, e.g. shutdown/fib.py) as it
  starts, not at its first call: the lifespan starts the pool before DBOS launches
  and waits until every process is up after (``ready``).
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
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import context, popen_spawn_posix, spawn
from multiprocessing.connection import wait
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("shutdown.pool")

START_METHOD = "spawn"  # without the parent's main module: _LightContext
MAX_PROCESSES = 64
# How long stop() waits for the killed pool processes to be reaped.
STOP_TIMEOUT_SEC = 5.0
# Exit status of a pool process whose parent died (the orphan guard).
ORPHAN_EXIT = 70

_executor: ProcessPoolExecutor | None = None
_size = 0
# In a pool process: the CPU time its start-up took (interpreter, imports, preload).
_startup_cpu_s: float | None = None


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


# --- spawn without the parent's main module ----------------------------------------
#
# multiprocessing builds what a spawned child needs before it can unpickle its work
# (sys.path, the working directory, the main module to re-run) in one function,
# spawn.get_preparation_data, called while a process is launched. There is no per-
# process option to leave the main module out, so that function is wrapped (once, in
# start) and changes only the data of a launch of this module's processes, flagged on
# the launching thread; every other process (uvicorn's workers, which need the main
# module re-run) gets multiprocessing's own data.

_launching = threading.local()
_stdlib_preparation_data = spawn.get_preparation_data


def _preparation_data(name: str) -> dict[str, Any]:
    data: dict[str, Any] = _stdlib_preparation_data(name)
    if getattr(_launching, "light", False):
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    return data


class _LightPopen(popen_spawn_posix.Popen):
    def _launch(self, process_obj: Any) -> None:
        _launching.light = True
        try:
            super()._launch(process_obj)  # type: ignore[misc]  # not in the stubs
        finally:
            _launching.light = False


class _LightProcess(context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> _LightPopen:  # noqa: N802 - multiprocessing's name
        return _LightPopen(process_obj)


class _LightContext(context.SpawnContext):
    Process = _LightProcess


# --- the pool ------------------------------------------------------------------------


def _init_process(preload: str | None) -> None:
    global _startup_cpu_s
    # The service stops its pool; a signal for the process group is not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _guard_orphan()
    if preload and not preload.startswith("__"):  # a __main__ function cannot be sent
        importlib.import_module(preload)
    _startup_cpu_s = time.process_time()


def facts() -> dict[str, Any]:
    """What a pool process holds, for ``pool.run(facts)``: its pid, the CPU seconds its
    start-up took, the file of its main module (None: spawn's own, no re-run script)
    and the modules it has imported beyond the standard library (``sys.modules``)."""
    skip = {*sys.stdlib_module_names, "__main__", "__mp_main__"}
    return {
        "pid": os.getpid(),
        "startup_cpu_s": _startup_cpu_s,
        "main": getattr(sys.modules.get("__main__"), "__file__", None),
        "modules": sorted(m for m in sys.modules if m.partition(".")[0] not in skip),
    }


def start(size: int, preload: str | None = None) -> None:
    """Create the pool and start its processes, each importing the module ``preload``
    (``ready()`` waits for them)."""
    global _executor, _size
    if _executor is not None:
        raise RuntimeError("the process pool is already running")
    spawn.get_preparation_data = _preparation_data
    _executor = ProcessPoolExecutor(
        size, mp_context=_LightContext(), initializer=_init_process, initargs=(preload,)
    )
    _size = size
    # With spawn the executor starts a process per call that finds none idle: one call
    # per process starts them all now, together, rather than one by one in ready().
    for _ in range(size):
        _executor.submit(os.getpid)


def ready(timeout: float = 60) -> list[int]:
    """Wait until every process of the pool has started (a process takes calls only
    once its start-up is done), log what each holds (``facts``) and return their pids."""
    if _executor is None:
        raise RuntimeError("the process pool is not running")
    answered: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(answered) < _size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(answered)} of {_size} pool processes up in {timeout} s")
        calls = [_executor.submit(facts) for _ in range(_size)]
        for call in calls:
            found = call.result(timeout=timeout)
            answered[found["pid"]] = found
        time.sleep(0.01)
    log.info("process pool ready", extra={"processes": [answered[p] for p in sorted(answered)]})
    return pids()


def pids() -> list[int]:
    """The pool's processes (empty when it is not running)."""
    procs = getattr(_executor, "_processes", None) or {}
    return sorted(procs)


def run(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` in a pool process and return its result (or raise its error).
    ``fn`` must live in an importable module (not ``__main__``: see the module's doc)."""
    if _executor is None:
        raise RuntimeError("the process pool is not running: start it in the lifespan")
    if getattr(fn, "__module__", None) == "__main__":
        # Sent by reference, it would break the pool: its processes do not load __main__.
        raise ValueError(f"{fn!r} is defined in __main__: move it to an importable module")
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
