"""Progress lines and result tables, for the benchmarks and the reliability suite.

Progress goes to stderr, one line at a time, so a long run never looks hung; stdout
carries the table, in Markdown so it pastes into a document as is.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence


class Progress:
    """``progress("message")`` prints ``[<name>  12.3s] message`` on stderr (seconds
    since the ``Progress`` was made)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{self.name} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table; a ``|`` inside a cell is escaped."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
