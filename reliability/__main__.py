"""Run the reliability suite and print its figures: ``python -m reliability``.

    python -m reliability                  # every area, 10 crash trials each
    python -m reliability --trials 3       # fewer crash trials
    python -m reliability --only crash,schedule

Postgres comes from ``DBOS_TEST_DATABASE_URL`` (a server the suite may create and drop
databases on) or, when unset, from a throwaway cluster started from the PostgreSQL
binaries on this machine. The outage area always starts a private cluster of its own.
Progress goes to stderr, the Markdown table to stdout, the figures to
``reliability/results.json``. Exit status 1 if any promise was broken or an area failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import traceback
from datetime import UTC, datetime
from pathlib import Path

from harness import REPO, pgcluster
from harness.env import watching
from reliability.core import Context, Figure, broken, progress, table

# (id, module): each module has run(ctx) -> list[Figure]. Secrets go last: they scan
# what the other areas left behind.
AREAS = [
    ("crash", "reliability.crash_matrix"),
    ("outage", "reliability.outage"),
    ("schedule", "reliability.schedule"),
    ("hostile", "reliability.hostile"),
    ("load", "reliability.load"),
    ("replicas", "reliability.replicas"),
    ("secrets", "reliability.secrets"),
]
DEFAULT_OUT = REPO / "reliability" / "results.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__)
    parser.add_argument("--trials", type=int, default=10, help="crash trials per script")
    parser.add_argument("--quick", action="store_true", help="shorter runs where an area can")
    parser.add_argument(
        "--seed", type=int, help="repeat a run's random choices (printed with the figures)"
    )
    parser.add_argument(
        "--only", metavar="AREAS", help="comma-separated: " + ",".join(a for a, _ in AREAS)
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    if args.only:
        unknown = set(args.only.split(",")) - {a for a, _ in AREAS}
        if unknown:
            parser.error(f"unknown area(s): {', '.join(sorted(unknown))}")
    return args


def run_areas(ctx: Context, only: set[str] | None) -> list[Figure]:
    """Each area's figures; an area that fails to run is a broken figure of its own."""
    figures: list[Figure] = []
    for area, module in AREAS:
        if only is not None and area not in only:
            continue
        progress(f"area {area}")
        try:
            figures += importlib.import_module(module).run(ctx)
        except Exception as exc:  # noqa: BLE001 - report it, go on with the others
            traceback.print_exc()
            figures.append(Figure(area, "area failed to run", repr(exc)[:200], "runs", False))
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    workdir = Path(tempfile.mkdtemp(prefix="experiment6-reliability-"))
    server = os.environ.get("DBOS_TEST_DATABASE_URL", "").strip()
    cluster = None
    if not server:
        progress("starting a throwaway Postgres cluster")
        cluster = pgcluster.Cluster(workdir / "server")
        server = cluster.url
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    progress(f"seed {seed} (repeat this run with --seed {seed})")
    try:
        with watching() as watch:  # every secret handed to a script during the run
            ctx = Context(server, workdir, watch, args.trials, args.quick, seed)
            try:
                figures = run_areas(ctx, only)
            finally:
                # Only now: the secrets area scans the databases of every area.
                ctx.close()
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(figures))
    args.out.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "trials": args.trials,
                "seed": seed,
                "quick": args.quick,
                "figures": [f.as_json() for f in figures],
            },
            indent=2,
        )
        + "\n"
    )
    progress(f"figures written to {args.out}")
    bad = broken(figures)
    for f in bad:
        progress(f"BROKEN: {f.area}: {f.name} = {f.value} (promise: {f.promise}) {f.note}")
    return 1 if bad else 0  # an area that failed to run is a broken figure


if __name__ == "__main__":
    sys.exit(main())
