"""Draw one fan-out of the shutdown demo from the system database, as a PNG.

    # a fan-out that already ran (any database the demo used):
    python -m benchmarks.timeline --db URL --workflow ID --out fanout.png

    # run one on the demo and draw it (Postgres for 2 workers: in a scratch database
    # on the server of --db or DBOS_SYSTEM_DATABASE_URL, dropped afterwards unless
    # --keep-db; SQLite: in the file itself):
    python -m benchmarks.timeline --workers 2 --steps 100 --max-n 28 --out timeline-2-workers.png
    # (--executor process|thread|both, default both: a fan-out in each mode, side by side)

Top panel: one bar per step workflow (a child of the fan-out, step 0 at the top),
a thin grey line while it waits in the queue (enqueued → dequeued) and a thick
bar while it runs (dequeued → completed), coloured by the executor that ran it;
the scheduled workflow's runs are triangles along the top. Bottom panel: how many
steps run at once, per executor, against the queue's limit.

Times come from ``dbos.workflow_status``: ``created_at``, ``started_at_epoch_ms``
(set at dequeue) and ``completed_at``. On SQLite ``created_at`` is whole seconds.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import shutdown_runs
from benchmarks.core import progress
from harness.db import ScratchDatabases, query
from harness.fanout import child_index


@dataclass
class Unit:
    created: float
    started: float | None
    completed: float | None
    executor: str
    status: str


@dataclass
class FanOutRecord:
    workflow_id: str
    created: float
    completed: float | None
    units: list[Unit]
    scheduled: list[tuple[float, str]]  # (start, executor)


def load(db_url: str, workflow_id: str) -> FanOutRecord:
    parent = query(
        db_url,
        "SELECT created_at, completed_at FROM dbos.workflow_status WHERE workflow_uuid = %s",
        workflow_id,
    )
    if not parent:
        raise SystemExit(f"no workflow {workflow_id} in that database")
    rows = query(
        db_url,
        "SELECT created_at, started_at_epoch_ms, completed_at, executor_id, status, "
        "workflow_uuid FROM dbos.workflow_status WHERE parent_workflow_id = %s",
        workflow_id,
    )
    if not rows:
        raise SystemExit(f"workflow {workflow_id} has no child workflows: not a fan-out")
    # Enqueue order: the child id ends in its operation number (created_at is whole
    # seconds on SQLite).
    rows.sort(key=lambda r: (child_index(r[5]) is None, child_index(r[5]) or 0, r[0]))
    units = [
        Unit(
            created=int(c) / 1000,
            started=int(s) / 1000 if s is not None else None,
            completed=int(e) / 1000 if e is not None else None,
            executor=x or "?",
            status=st,
        )
        for c, s, e, x, st, _ in rows
    ]
    start = int(parent[0][0]) / 1000
    end = max((u.completed or u.created) for u in units)
    sched = query(
        db_url,
        # Only runs that started: a run still waiting in the queue has no executor yet.
        "SELECT started_at_epoch_ms, executor_id FROM dbos.workflow_status "
        "WHERE schedule_name IS NOT NULL AND started_at_epoch_ms IS NOT NULL "
        "AND created_at BETWEEN %s AND %s",
        int((start - 1) * 1000),
        int((end + 1) * 1000),
    )
    return FanOutRecord(
        workflow_id=workflow_id,
        created=start,
        completed=int(parent[0][1]) / 1000 if parent[0][1] is not None else None,
        units=units,
        scheduled=[(int(t) / 1000, x) for t, x in sched if x],
    )


def draw(record: FanOutRecord, out: Path, title: str, limit: int | None = None) -> None:
    """One fan-out: the steps above, how many ran at once below."""
    draw_side_by_side([(record, title)], out, limit)


def draw_side_by_side(
    panels: list[tuple[FanOutRecord, str]], out: Path, limit: int | None = None
) -> None:
    """Fan-outs next to each other (one column each), on the same time scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2,
        len(panels),
        figsize=(11 * len(panels), 7.5),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
    )
    for column, (record, title) in enumerate(panels):
        _draw_panel(record, title, limit, axes[0][column], axes[1][column])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110 if len(panels) == 1 else 80)
    plt.close(fig)


def _draw_panel(record: FanOutRecord, title: str, limit: int | None, top: Any, bottom: Any) -> None:
    import matplotlib.pyplot as plt

    executors = sorted({u.executor for u in record.units} | {x for _, x in record.scheduled})
    palette = plt.get_cmap("tab10")
    colour = {x: palette(i % 10) for i, x in enumerate(executors)}
    _draw_steps(record, title, top, executors, colour)
    _draw_running(record, limit, bottom, executors, colour)


def _draw_steps(
    record: FanOutRecord, title: str, top: Any, executors: list[str], colour: dict[str, Any]
) -> None:
    """The top panel: one bar per step workflow, from its start to its end."""
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    t0 = record.created
    n = len(record.units)
    bar_height = 0.8 if n <= 60 else 1.0
    for i, u in enumerate(record.units):
        if u.started is not None:
            top.plot([u.created - t0, u.started - t0], [i, i], color="0.75", lw=0.8)
        if u.started is not None and u.completed is not None:
            top.barh(
                i,
                u.completed - u.started,
                left=u.started - t0,
                height=bar_height,
                color=colour[u.executor],
                edgecolor="none",
            )
    for when, executor in record.scheduled:
        top.plot([when - t0], [-2], marker="v", ms=9, color=colour[executor], ls="none")
        top.axvline(when - t0, color=colour[executor], lw=0.6, ls=":", alpha=0.6)
    if record.completed is not None:
        top.axvline(record.completed - t0, color="black", lw=1)
    top.set_ylim(n + 1, -3.5)
    top.set_ylabel(f"step workflow (step index, {n} steps)")
    top.set_title(title, fontsize=11)
    handles: list[Artist] = [Patch(color=colour[x], label=f"ran on {x}") for x in executors]
    handles += [
        Line2D([], [], color="0.75", lw=0.8, label="waiting in the queue"),
        Line2D([], [], marker="v", color="0.3", ls="none", label="scheduled workflow (every 5 s)"),
        Line2D([], [], color="black", lw=1, label="fan-out workflow done"),
    ]
    top.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    top.grid(axis="x", alpha=0.3)


def _draw_running(
    record: FanOutRecord,
    limit: int | None,
    bottom: Any,
    executors: list[str],
    colour: dict[str, Any],
) -> None:
    """The bottom panel: steps running at once, per executor, stacked; the queue's limit
    is the dashed line."""
    t0 = record.created
    events = sorted(
        {u.started - t0 for u in record.units if u.started}
        | {u.completed - t0 for u in record.units if u.completed}
    )
    series = []
    for x in executors:
        series.append(
            [
                sum(
                    1
                    for u in record.units
                    if u.executor == x
                    and u.started is not None
                    and u.completed is not None
                    and u.started - t0 <= t < u.completed - t0
                )
                for t in events
            ]
        )
    if events:
        bottom.stackplot(
            events, *series, step="post", colors=[colour[x] for x in executors], alpha=0.85
        )
    if limit:
        bottom.axhline(limit, color="black", ls="--", lw=1)
        bottom.text(0, limit, f" queue limit {limit}", va="bottom", fontsize=8)
        bottom.set_ylim(0, limit * 1.25)
    bottom.set_ylabel("steps running")
    bottom.set_xlabel("seconds since the fan-out workflow was created")
    bottom.grid(axis="y", alpha=0.3)


def run_and_draw(
    server_url: str,
    workers: int,
    steps: int,
    max_n: int,
    out: Path,
    keep_db: bool,
    executors: tuple[str, ...] = ("process", "thread"),
) -> None:

    postgres = server_url.startswith("postgres")
    dbs = ScratchDatabases(server_url if postgres else None, "bench")
    try:
        # Postgres: a scratch database on that server; SQLite: the file itself.
        url = dbs.fresh("postgres", "timeline") if postgres else server_url
        progress(f"starting the demo with {workers} worker(s)")
        with shutdown_runs.server(url, workers=workers, log_dir=dbs.directory) as server:
            # Let every worker's queue poller come up before the fan-out is enqueued.
            import time

            time.sleep(2)
            runs = []
            for executor in executors:
                progress(f"fan-out of {steps} steps, max_n {max_n}, executor={executor}")
                runs.append(
                    (executor, shutdown_runs.run_fan_out(server, url, steps, max_n, 600, executor))
                )
        settings = shutdown_runs.settings()
        panels = []
        for executor, run in runs:
            progress(
                f"{executor}: done in {run.wall:.1f} s; steps per executor: {run.per_executor}"
            )
            title = (
                f"executor={executor}: {steps} steps (step i = fib(min(i, {max_n}))), "
                f"{workers} worker process{'es' if workers > 1 else ''}, "
                f"queue limit {settings.queue_concurrency}\n"
                f"enqueueing took {run.enqueue_span:.1f} s; first enqueue → last step done "
                f"{run.span:.1f} s; steps per executor: "
                + ", ".join(f"{x} {c}" for x, c in sorted(run.per_executor.items()))
            )
            panels.append((load(url, run.workflow_id), title))
        # One time scale for all: the longer run sets it.
        draw_side_by_side(panels, out, limit=settings.queue_concurrency)
        progress(f"wrote {out}")
        if keep_db and postgres:
            dbs.keep(url)
            print(url)
    finally:
        dbs.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.timeline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--db", help="database URL (default: DBOS_SYSTEM_DATABASE_URL)")
    parser.add_argument("--workflow", help="draw this existing fan-out workflow")
    parser.add_argument("--workers", type=int, help="run a fan-out on the demo with N workers")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--max-n", type=int, default=28)
    parser.add_argument(
        "--executor",
        choices=("process", "thread", "both"),
        default="both",
        help="run mode: where the steps compute (both: one fan-out each, side by side)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=shutdown_runs.settings().queue_concurrency,
        help="queue limit line (draw mode; default: the demo's)",
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument(
        "--keep-db", action="store_true", help="run mode: keep the scratch database, print it"
    )
    args = parser.parse_args(argv)
    import os

    db = args.db or os.environ.get("DBOS_SYSTEM_DATABASE_URL", "").strip()
    if not db:
        parser.error("give --db URL or set DBOS_SYSTEM_DATABASE_URL")
    if (args.workflow is None) == (args.workers is None):
        parser.error("give either --workflow ID (draw) or --workers N (run and draw)")
    if args.workflow:
        record = load(db, args.workflow)
        title = f"fan-out {args.workflow}: {len(record.units)} steps"
        draw(record, args.out, title, limit=args.limit)
        progress(f"wrote {args.out}")
        return 0
    if args.workers > 1 and not db.startswith("postgres"):
        parser.error("several workers need Postgres (--db postgresql://...)")
    executors = ("process", "thread") if args.executor == "both" else (args.executor,)
    run_and_draw(db, args.workers, args.steps, args.max_n, args.out, args.keep_db, executors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
