"""Experiment: list a whole S3 bucket page by page and record every object exactly once.

An external, paginated service (S3's ListObjectsV2) is read page by page; each page
is handed to a child workflow on ``integration_queue`` (a concurrency and a rate
limit), which records the page's objects in an application table through a DBOS
datasource transaction. Does every object end up recorded exactly once, also when
the process dies in the middle? Do the queue's limits hold? And where can the S3
client live: on a class with static methods, or on a ``DBOSConfiguredInstance``?

Run it, what to observe and what it means: docs/integration.md.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Literal, cast

import sqlalchemy as sa
from dbos import DBOS, DBOSConfiguredInstance, SQLAlchemyDatasource, WorkflowHandle
from sqlalchemy.orm import sessionmaker

from lab.cli import flag_parser
from lab.config import (
    CONNECT_TIMEOUT_SEC,
    ConfigError,
    DatabaseSettings,
    Environ,
    database_kind,
    dbos_config,
    redacted,
    text_env,
)
from lab.launch import LaunchError, check_reachable, launch, launch_and_resume
from lab.logs import exit_on_config_error, fail, setup_logging

log = logging.getLogger("integration")

QUEUE = "integration_queue"
INSTANCE_NAME = "s3-inventory"
SCHEMA = "integration"  # Postgres schema of this experiment's tables
DEFAULT_BUCKET = "experiment6-demo"
DEFAULT_OBJECTS = 300
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 25, 1000  # S3 lists at most 1000 keys a page
DEFAULT_CONCURRENCY = 10  # page workflows running at once
DEFAULT_RATE_LIMIT, DEFAULT_RATE_PERIOD = 50, 10.0  # started per period (s)
QUEUE_POLLING_SEC = 0.2
LOCAL_CREDENTIALS = "experiment6-local"  # moto accepts anything; not a secret


@dataclass(frozen=True)
class IntegrationSettings:
    """The environment this script reads (boto3 reads the S3 keys itself)."""

    database: DatabaseSettings
    s3_endpoint: str = ""  # AWS_ENDPOINT_URL; empty: a local S3 server (moto)
    s3_region: str = "us-east-1"  # AWS_DEFAULT_REGION

    @classmethod
    def load(cls, env: Environ = os.environ) -> IntegrationSettings:
        return cls(
            DatabaseSettings.load(env),
            s3_endpoint=text_env("AWS_ENDPOINT_URL", env=env),
            s3_region=text_env("AWS_DEFAULT_REGION", "us-east-1", env=env),
        )


# Process-level facts (never workflow inputs): a resumed run must not crash again.
crash_after_pages: int | None = None
page_seconds = 0.0
_commits = 0
_commits_lock = threading.Lock()

_metadata = sa.MetaData()


def objects_table(kind: str) -> sa.Table:
    """The application table: one row per object per inventory run."""
    return sa.Table(
        "s3_objects" if kind == "postgres" else "integration_s3_objects",
        _metadata,
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("bucket", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("etag", sa.Text, nullable=False),
        sa.Column("page", sa.Integer, nullable=False),
        sa.Column("page_workflow_id", sa.Text, nullable=False),
        schema=SCHEMA if kind == "postgres" else None,
        extend_existing=True,
    )


@DBOS.dbos_class()
class S3Inventory(DBOSConfiguredInstance):
    """The working pattern: client and datasource live on a named instance."""

    def __init__(self, s3: Any, ds: SQLAlchemyDatasource, table: sa.Table, kind: str) -> None:
        self.s3 = s3
        self.ds = ds
        self.table = table
        # SQLite knows no READ COMMITTED; it serializes writers anyway.
        self.isolation: Literal["READ COMMITTED", "SERIALIZABLE"] = (
            "READ COMMITTED" if kind == "postgres" else "SERIALIZABLE"
        )
        super().__init__(config_name=INSTANCE_NAME)

    @DBOS.workflow()
    def inventory(self, bucket: str, page_size: int) -> dict[str, int]:
        run_id = DBOS.workflow_id
        assert run_id is not None  # inside a workflow
        handles: list[WorkflowHandle[dict[str, int]]] = []
        start_after = ""
        while True:
            page = self.list_page(bucket, page_size, start_after)
            if page["objects"]:
                number = len(handles) + 1
                handles.append(
                    DBOS.enqueue_workflow(
                        QUEUE, self.record_page, run_id, bucket, number, page["objects"]
                    )
                )
            if not page["more"]:
                break
            start_after = page["objects"][-1][0]
        results = [h.get_result(polling_interval_sec=QUEUE_POLLING_SEC) for h in handles]
        return {
            "pages": len(handles),
            "objects": sum(r["objects"] for r in results),
            "inserted": sum(r["inserted"] for r in results),
        }

    @DBOS.step(retries_allowed=True, max_attempts=3, interval_seconds=0.5)
    def list_page(self, bucket: str, page_size: int, start_after: str) -> dict[str, Any]:
        """One page of ``list_objects_v2`` through its paginator."""
        params: dict[str, Any] = {
            "Bucket": bucket,
            "PaginationConfig": {"PageSize": page_size, "MaxItems": page_size},
        }
        if start_after:
            params["StartAfter"] = start_after
        result = self.s3.get_paginator("list_objects_v2").paginate(**params).build_full_result()
        objects = [[o["Key"], o["Size"], o["ETag"].strip('"')] for o in result.get("Contents", [])]
        log.info("listed page", extra={"objects": len(objects), "start_after": start_after})
        return {"objects": objects, "more": "NextToken" in result}

    @DBOS.workflow()
    def record_page(
        self, run_id: str, bucket: str, page: int, objects: list[list[Any]]
    ) -> dict[str, int]:
        page_workflow_id = DBOS.workflow_id
        assert page_workflow_id is not None  # inside a workflow
        inserted = self.ds.run_tx_step(
            {"name": "record_rows", "isolation_level": self.isolation},
            self._insert_rows,
            run_id,
            bucket,
            page,
            page_workflow_id,
            objects,
        )
        log.info("page recorded", extra={"page": page, "inserted": inserted})
        if page_seconds:
            DBOS.sleep(page_seconds)  # simulated processing, so the limits become visible
        return {"objects": len(objects), "inserted": inserted}

    def _insert_rows(
        self,
        run_id: str,
        bucket: str,
        page: int,
        page_workflow_id: str,
        objects: list[list[Any]],
    ) -> int:
        """The transaction body: all of the page's rows, or none."""
        log.info("page transaction", extra={"page": page, "objects": len(objects)})
        rows = [
            {
                "run_id": run_id,
                "key": key,
                "bucket": bucket,
                "size": size,
                "etag": etag,
                "page": page,
                "page_workflow_id": page_workflow_id,
            }
            for key, size, etag in objects
        ]
        stmt = (
            self.ds.dialect.insert(self.table)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["run_id", "key"])
        )
        result = cast("sa.CursorResult[Any]", self.ds.sql_session().execute(stmt))
        return result.rowcount


@DBOS.dbos_class()
class StaticInventory:
    """The failing pattern: static methods, the client passed as an argument."""

    @staticmethod
    @DBOS.workflow()
    def inventory(s3: Any, bucket: str, page_size: int) -> int:
        # Never runs: DBOS pickles the workflow's arguments (the client too)
        # into the system database before the body starts.
        return len(StaticInventory.list_page(s3, bucket, page_size))

    @staticmethod
    @DBOS.step()
    def list_page(s3: Any, bucket: str, page_size: int) -> list[str]:
        result = s3.list_objects_v2(Bucket=bucket, MaxKeys=page_size)
        return [o["Key"] for o in result.get("Contents", [])]


# --- S3 -----------------------------------------------------------------------


def start_local_s3() -> tuple[Any, str]:
    """moto's S3 server on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_client(endpoint: str, region: str, local: bool) -> Any:
    import boto3
    from botocore.config import Config

    kwargs: dict[str, Any] = {
        "endpoint_url": endpoint,
        "region_name": region,
        "config": Config(
            connect_timeout=3,
            read_timeout=10,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    }
    if local:
        kwargs["aws_access_key_id"] = LOCAL_CREDENTIALS
        kwargs["aws_secret_access_key"] = LOCAL_CREDENTIALS
    # Otherwise boto3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY itself.
    return boto3.client("s3", **kwargs)


def seed_demo_bucket(s3: Any, bucket: str, objects: int) -> None:
    """Deterministic content: a re-seeded server lists the same keys and etags."""
    s3.create_bucket(Bucket=bucket)
    for i in range(objects):
        s3.put_object(
            Bucket=bucket,
            Key=f"demo/object-{i:05d}.txt",
            Body=f"object {i}\n".encode() * (i % 7 + 1),
        )


def check_bucket(s3: Any, bucket: str, endpoint: str) -> None:
    """``ConfigError`` (one line) if the endpoint, the credentials or the bucket is wrong."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        s3.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise ConfigError(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or unset AWS_ENDPOINT_URL to use a local S3 server)"
        ) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ConfigError(f"bucket '{bucket}' does not exist at {endpoint}") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise ConfigError(
                f"access to bucket '{bucket}' at {endpoint} is denied (check credentials)"
            ) from None
        raise ConfigError(f"S3 at {endpoint} refused HEAD bucket '{bucket}': {code}") from None
    except BotoCoreError as exc:
        raise ConfigError(f"cannot reach the S3 endpoint {endpoint}: {exc}") from None


# --- the database -------------------------------------------------------------


def ensure_database(url: str) -> None:
    """The datasource needs the database before DBOS.launch() would create it."""
    if database_kind(url) != "postgres":
        return
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql+psycopg2")
    engine = sa.create_engine(parsed, connect_args={"connect_timeout": CONNECT_TIMEOUT_SEC})
    try:
        with engine.connect():
            return
    except sa.exc.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise LaunchError(f"cannot reach the database {redacted(url)}: {exc.orig}") from None
    finally:
        engine.dispose()
    admin = sa.create_engine(
        parsed.set(database="postgres"),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SEC},
    )
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{parsed.database}"'))
    finally:
        admin.dispose()


def create_datasource(url: str, app: str) -> tuple[SQLAlchemyDatasource, sa.Table, str]:
    """The datasource (before launch, as DBOS requires) and the application table."""
    kind = database_kind(url)
    maker = sessionmaker(expire_on_commit=False)
    sa.event.listen(maker, "after_commit", _after_page_commit)
    if kind == "postgres":
        from sqlalchemy.engine import make_url

        engine = sa.create_engine(
            make_url(url).set(drivername="postgresql+psycopg2"),
            pool_size=12,
            connect_args={"connect_timeout": CONNECT_TIMEOUT_SEC, "application_name": app},
        )
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        ds = SQLAlchemyDatasource.create(url, engine=engine, schema=SCHEMA, sessionmaker=maker)
    else:
        ds = SQLAlchemyDatasource.create(url, sessionmaker=maker)
    table = objects_table(kind)
    table.create(ds.engine, checkfirst=True)
    return ds, table, kind


def _after_page_commit(session: Any) -> None:
    """Crash right after a page's rows and its checkpoint committed, before DBOS
    recorded the step: the window the datasource checkpoint exists for."""
    global _commits
    if crash_after_pages is None:
        return
    with _commits_lock:
        _commits += 1
        if _commits >= crash_after_pages:
            log.warning("crashing", extra={"after_pages": _commits})
            logging.shutdown()
            os._exit(3)


def page_workflow_times(
    engine: sa.Engine, kind: str, run_id: str
) -> list[tuple[int | None, int | None]]:
    """(started, completed) epoch ms of the run's page workflows, from the system database."""
    table = "dbos.workflow_status" if kind == "postgres" else "workflow_status"
    with engine.connect() as conn:
        return [
            (row[0], row[1])
            for row in conn.execute(
                sa.text(
                    f"SELECT started_at_epoch_ms, completed_at FROM {table} "
                    "WHERE parent_workflow_id = :run AND name = :name"
                ),
                {"run": run_id, "name": "S3Inventory.record_page"},
            )
        ]


def max_started_per_window(starts: list[int], period_ms: int) -> int:
    """Most starts within any window [t, t + period) beginning at a start."""
    starts = sorted(starts)
    return max(
        (bisect.bisect_left(starts, s + period_ms) - i for i, s in enumerate(starts)), default=0
    )


def max_concurrent(intervals: list[tuple[int, int]]) -> int:
    """Most intervals [start, end) covering one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = best = 0
    for _, delta in events:  # at equal times ends (-1) sort first
        running += delta
        best = max(best, running)
    return best


def count_recorded(engine: sa.Engine, table: sa.Table, run_id: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(table).where(table.c.run_id == run_id)
            ).scalar_one()
        )


# --- main -----------------------------------------------------------------------


FLAGS: dict[str, dict[str, Any]] = {
    "--bucket": {"default": DEFAULT_BUCKET, "help": f"default {DEFAULT_BUCKET}"},
    "--objects": {
        "type": int,
        "default": DEFAULT_OBJECTS,
        "help": f"objects to seed the local bucket with ({DEFAULT_OBJECTS})",
    },
    "--page-size": {
        "type": int,
        "default": DEFAULT_PAGE_SIZE,
        "help": f"objects per page ({DEFAULT_PAGE_SIZE})",
    },
    "--concurrency": {
        "type": int,
        "default": DEFAULT_CONCURRENCY,
        "help": f"page workflows running at once ({DEFAULT_CONCURRENCY})",
    },
    "--rate-limit": {
        "type": int,
        "default": DEFAULT_RATE_LIMIT,
        "help": f"page workflows started per period ({DEFAULT_RATE_LIMIT})",
    },
    "--rate-period": {
        "type": float,
        "default": DEFAULT_RATE_PERIOD,
        "help": f"rate-limit period in seconds ({DEFAULT_RATE_PERIOD:g})",
    },
    "--page-seconds": {
        "type": float,
        "default": 0.0,
        "help": "extra durable sleep in each page workflow (0), to make the limits visible",
    },
    "--crash-after-pages": {
        "type": int,
        "metavar": "N",
        "help": "exit abruptly (code 3) right after the N-th page transaction commits",
    },
    "--client-holder": {
        "choices": ("instance", "static"),
        "default": "instance",
        "help": "instance: the working pattern (default); static: show how the other one fails",
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flag_parser(__doc__.splitlines()[0], FLAGS)
    args = parser.parse_args(argv)
    if args.objects < 0:
        parser.error("--objects must not be negative")
    if not 1 <= args.page_size <= MAX_PAGE_SIZE:
        parser.error(f"--page-size must be between 1 and {MAX_PAGE_SIZE} (S3's maximum)")
    if args.concurrency < 1 or args.rate_limit < 1:
        parser.error("--concurrency and --rate-limit must be at least 1")
    if args.rate_period <= 0 or args.page_seconds < 0:
        parser.error("--rate-period must be positive and --page-seconds not negative")
    if args.crash_after_pages is not None and args.crash_after_pages < 1:
        parser.error("--crash-after-pages must be at least 1")
    return args


def connect_s3(settings: IntegrationSettings, args: argparse.Namespace) -> tuple[Any, str, Any]:
    """The S3 client, its endpoint and the local server (None for ``AWS_ENDPOINT_URL``):
    without an endpoint, a local S3 server seeded with a demo bucket. ``ConfigError``
    if the bucket cannot be read."""
    endpoint, server = settings.s3_endpoint, None
    if endpoint:
        s3 = s3_client(endpoint, settings.s3_region, local=False)
    else:
        server, endpoint = start_local_s3()
        s3 = s3_client(endpoint, settings.s3_region, local=True)
        try:
            seed_demo_bucket(s3, args.bucket, args.objects)
        except Exception as exc:  # noqa: BLE001 - e.g. an invalid bucket name
            raise ConfigError(
                f"cannot seed the demo bucket '{args.bucket}' on the local S3 server: {exc}"
            ) from None
        log.info(
            "started a local S3 server (moto) and seeded a demo bucket",
            extra={"endpoint": endpoint, "bucket": args.bucket, "objects": args.objects},
        )
    check_bucket(s3, args.bucket, endpoint)
    return s3, endpoint, server


def register_queue(args: argparse.Namespace) -> None:
    """The page queue, with the run's limits (after launch, before any run resumes)."""
    DBOS.register_queue(
        QUEUE,
        global_concurrency=args.concurrency,
        limiter={"limit": args.rate_limit, "period": args.rate_period},
        polling_interval_sec=QUEUE_POLLING_SEC,
    )


def show_static_pattern_fails(s3: Any, args: argparse.Namespace) -> None:
    """``--client-holder static``: the client as a workflow argument cannot start."""
    try:
        DBOS.start_workflow(StaticInventory.inventory, s3, args.bucket, args.page_size)
    except Exception as exc:  # noqa: BLE001 - the finding is this exception
        fail(f"static-method pattern cannot start: {type(exc).__name__}: {exc}", code=1)
    fail("static-method pattern unexpectedly started", code=1)


def page_timing(
    args: argparse.Namespace, engine: sa.Engine, kind: str, run_id: str
) -> dict[str, Any]:
    """How the run's page workflows were timed against the queue's limits, from the
    system database."""
    times = page_workflow_times(engine, kind, run_id)
    starts = [s for s, _ in times if s is not None]
    intervals = [(s, e) for s, e in times if s is not None and e is not None]
    # DBOS stamps SQLite rows with whole seconds before Python 3.12: too coarse
    # for overlaps (the rate window is still right: DBOS's limiter sees the same).
    resolution_ms = 1000 if kind == "sqlite" and sys.version_info < (3, 12) else 1
    return {
        "rate_limit": {"limit": args.rate_limit, "period": args.rate_period},
        "max_started_per_window": max_started_per_window(starts, int(args.rate_period * 1000)),
        "concurrency": args.concurrency,
        "max_concurrent": max_concurrent(intervals) if resolution_ms == 1 else None,
        "time_resolution_ms": resolution_ms,
    }


def main(argv: list[str] | None = None) -> None:
    global crash_after_pages, page_seconds
    args = parse_args(argv)
    setup_logging("integration")
    # No line per S3 request (moto's werkzeug) or per credential lookup (botocore).
    for name in ("werkzeug", "botocore", "boto3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    crash_after_pages, page_seconds = args.crash_after_pages, args.page_seconds
    with exit_on_config_error():
        settings = IntegrationSettings.load()
        config = dbos_config("integration", settings.database)
        s3, endpoint, server = connect_s3(settings, args)
        url = config["system_database_url"]
        check_reachable(url)
        ensure_database(url)
        ds, table, kind = create_datasource(url, config["name"])
        inventory = S3Inventory(s3, ds, table, kind)
        if args.client_holder == "static":
            launch(config)
            show_static_pattern_fails(s3, args)
        handle, recovered = launch_and_resume(
            config,
            inventory.inventory,
            args.bucket,
            args.page_size,
            on_launch=lambda: register_queue(args),
        )
    run_id = handle.get_workflow_id()
    try:
        result = handle.get_result(polling_interval_sec=QUEUE_POLLING_SEC)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        fail(f"inventory {run_id} failed: {type(exc).__name__}: {exc}", code=1)
    recorded = count_recorded(ds.engine, table, run_id)
    timing = page_timing(args, ds.engine, kind, run_id)
    DBOS.destroy()
    if server is not None:
        server.stop()
    log.info(
        "summary",
        extra={
            "workflow_id": run_id,
            "recovered": recovered,
            "bucket": args.bucket,
            "local_s3": server is not None,
            "pages": result["pages"],
            "objects": result["objects"],
            "recorded": recorded,
            "inserted": result["inserted"],
            **timing,
        },
    )


if __name__ == "__main__":
    main()
