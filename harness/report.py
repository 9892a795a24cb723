"""Progress lines and result tables, for the benchmarks and the reliability suite.

Progress goes to stderr, one line at a time, so a long run never looks hung; stdout
carries the table, in Markdown so it pastes into a document as is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


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


def written_for(date: str, run_date: str) -> str:
    """The ``{{written-for DATE}}`` placeholder of a generated README: nothing when its
    results are from the run of ``date`` the prose was written for, else a note saying
    that the prose around the figures may describe another run."""
    if date == run_date:
        return ""
    return (
        f"> **Note:** the explanations here were written for the run of {date}; "
        f"the figures they take from the results are from the run of {run_date}.\n"
    )


def readme_main(
    prog: str,
    description: str | None,
    render: Callable[[dict[str, Any], str], str],
    json_path: Path,
    template: Path,
    out: Path,
    argv: list[str] | None = None,
) -> int:
    """The command behind a generated README: render ``out`` from the results JSON and
    a template (``--check``: compare instead of writing, exit 1 if they differ)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--json", type=Path, default=json_path, help="the results (JSON)")
    parser.add_argument("--template", type=Path, default=template)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    text = render(json.loads(args.json.read_text()), args.template.read_text())
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is not generated from {args.json}: run {prog}")
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
