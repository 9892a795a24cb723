"""The flags of the scope experiments (``scope.py``, ``scope_funcs.py``)."""

from __future__ import annotations

import argparse

DEFAULT_STEPS = 30
DEFAULT_STEP_SECONDS = 0.5


def scope_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"number of steps (default {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=DEFAULT_STEP_SECONDS,
        help=f"sleep in each step (default {DEFAULT_STEP_SECONDS})",
    )
    parser.add_argument(
        "--crash-after",
        type=int,
        default=None,
        metavar="K",
        help="exit abruptly (code 3) right after step K has completed",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.step_seconds < 0:
        parser.error("--step-seconds must not be negative")
    if args.crash_after is not None and not 1 <= args.crash_after <= args.steps:
        parser.error("--crash-after must be between 1 and --steps")
    return args
