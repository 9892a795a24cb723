"""Measuring pieces the benchmarks and the reliability suite both use.

``Sampler``: something read again and again on a thread of its own while the code
under measurement runs (a health check's latency, a process's memory).
``fill_placeholders``: the ``{{...}}`` placeholders of a generated README's template.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Self

from harness.report import written_for


class Sampler:
    """Calls ``sample()`` on a daemon thread, at most once every ``interval`` seconds (the
    time a sample takes counts toward it), from the ``with`` block's start to its end."""

    def __init__(self, interval: float, join_timeout: float) -> None:
        self.interval = interval
        self._join_timeout = join_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - t0)))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._join_timeout)


def fill_placeholders(
    header: str, template: str, run_date: str, answer: Callable[[list[str]], str | None]
) -> str:
    """``header`` + ``template`` with each ``{{words}}`` replaced: ``written-for DATE``
    here (the same for every README), the others by ``answer(words)``; a placeholder
    ``answer`` does not know (None) is an error, so a typo never reaches a README."""

    def replace(match: re.Match[str]) -> str:
        words = match.group(1).split()
        if len(words) == 2 and words[0] == "written-for":
            return written_for(words[1], run_date)
        found = answer(words)
        if found is None:
            raise ValueError(f"unknown placeholder {match.group(0)!r}")
        return found

    return header + re.sub(r"\{\{(.+?)\}\}", replace, template)
