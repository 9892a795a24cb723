"""Measure the experiments side by side: ``python -m benchmarks [--quick] [--out PATH]``.

Runs every row on SQLite and, when ``DBOS_SYSTEM_DATABASE_URL`` names a Postgres
server, on Postgres too (in scratch databases created on that server and dropped
afterwards; the configured database itself is not touched). Progress goes to
stderr, the table to stdout, the figures to ``benchmarks/results.json``.
Exit status 1 if any row failed to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import rows as R
from benchmarks.core import Row, progress, table
from harness import REPO
from harness.db import ScratchDatabases, libpq_url

DEFAULT_OUT = REPO / "benchmarks" / "results.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    mode.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the test suite
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument(
        "--only",
        metavar="IDS",
        help="comma-separated row groups to run: 1,2,3,4a (with 4c),4b (with 4d),5,6,7; "
        "default all",
    )
    parser.add_argument(
        "--no-sqlite", action="store_true", help="skip the SQLite rows (Postgres only)"
    )
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - {gid for gid, _, _ in R.ROWS}
        if unknown:
            parser.error(f"unknown row group(s): {', '.join(sorted(unknown))}")
    return args


def postgres_url() -> str | None:
    """The Postgres server to make scratch databases on, as a libpq URL (or None)."""
    url = os.environ.get("DBOS_SYSTEM_DATABASE_URL", "").strip()
    if not url.startswith(("postgresql", "postgres://")):
        return None
    # psycopg2 takes postgresql://, not SQLAlchemy's postgresql+driver:// spelling.
    return libpq_url(url)


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, object]]:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    pg = postgres_url()
    kinds = ([] if args.no_sqlite else ["sqlite"]) + (["postgres"] if pg else [])
    if not kinds:
        sys.exit("nothing to run: --no-sqlite without a Postgres DBOS_SYSTEM_DATABASE_URL")
    only = set(args.only.split(",")) if args.only else None
    # The machine may be shared: how busy it was around the run is part of the result.
    load_at_start = list(os.getloadavg())
    dbs = ScratchDatabases(pg, "bench")
    ctx = R.Context(R.SIZES[mode], dbs, kinds)
    progress(f"mode {mode}, databases: {', '.join(kinds)}")
    results: list[Row] = []
    try:
        for kind in kinds:
            for gid, runs_on, fn in R.ROWS:
                if only is not None and gid not in only:
                    continue
                if kind not in runs_on:
                    results += _placeholders(
                        gid, kind, skipped="needs Postgres (set DBOS_SYSTEM_DATABASE_URL)"
                    )
                    continue
                try:
                    results += fn(ctx, kind)
                except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                    progress(f"{kind}: row group {gid} FAILED: {exc}")
                    results += _placeholders(gid, kind, error=str(exc).splitlines()[0][:200])
    finally:
        for failure in dbs.close():
            progress(f"could not drop scratch database {failure}")
    results.sort(key=lambda r: (kinds.index(r.db), r.id))
    meta: dict[str, object] = {
        "mode": mode,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks"
        + {"full": "", "quick": " --quick", "smoke": " --smoke"}[mode],
        "databases": kinds,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "dbos": _version("dbos"),
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
    }
    return results, meta


def _placeholders(
    gid: str, kind: str, *, skipped: str | None = None, error: str | None = None
) -> list[Row]:
    return [Row(rid, title, kind, skipped=skipped, error=error) for rid, title in R.ROW_TITLES[gid]]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results, meta = run(args)
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({**meta, "rows": [r.as_json() for r in results]}, indent=2) + "\n"
    )
    progress(f"wrote {args.out}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
