"""The flags and the run of the scope experiments (``scope.py``, ``scope_funcs.py``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from dbos import DBOS

from lab.config import dbos_config
from lab.launch import launch_and_resume
from lab.logs import exit_on_config_error, setup_logging

DEFAULT_STEPS = 30
DEFAULT_STEP_SECONDS = 0.5

FLAGS: dict[str, dict[str, Any]] = {
    "--steps": {"type": int, "default": DEFAULT_STEPS, "help": "number of steps"},
    "--step-seconds": {
        "type": float,
        "default": DEFAULT_STEP_SECONDS,
        "help": "sleep in each step",
    },
    "--crash-after": {
        "type": int,
        "metavar": "K",
        "help": "exit abruptly (code 3) right after step K has completed",
    },
}


def flag_parser(description: str, flags: dict[str, dict[str, Any]]) -> argparse.ArgumentParser:
    """A parser of ``flags``: each flag's ``add_argument`` options."""
    parser = argparse.ArgumentParser(description=description)
    for flag, options in flags.items():
        parser.add_argument(flag, **options)
    return parser


def scope_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = flag_parser(description, FLAGS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.step_seconds < 0:
        parser.error("--step-seconds must not be negative")
    if args.crash_after is not None and not 1 <= args.crash_after <= args.steps:
        parser.error("--crash-after must be between 1 and --steps")
    return args


def run_scope(
    app: str, workflow: Callable[..., dict[str, Any]], args: argparse.Namespace
) -> tuple[str, dict[str, Any], bool]:
    """Experiment ``app``'s run: launch DBOS (or end with one line), wait for the
    interrupted run of ``workflow`` or start one with ``--steps``/``--step-seconds``,
    then stop DBOS. Returns ``(workflow_id, result, recovered)``."""
    setup_logging(app)
    with exit_on_config_error():
        handle, recovered = launch_and_resume(
            dbos_config(app), workflow, args.steps, args.step_seconds
        )
    result = handle.get_result()
    DBOS.destroy()
    return handle.get_workflow_id(), result, recovered
