"""Secrets: do they stay out of logs and the system database, is /shutdown guarded, and
does the container run as non-root?

How
    1. Exercise. Each FastAPI app is served (uvicorn, Postgres) with distinctive values of
       ``CREDENTIALS_SECRET`` and ``SHUTDOWN_TOKEN`` and does its work: the cache app
       fetches and uses the credentials in workflows, the shutdown app runs a fan-out.
       ``/shutdown`` is then called with no header and with wrong or near-miss tokens
       (wrong value, other scheme, lower-case scheme, a double space, the bare token,
       an 8 KB header): the server must answer 401 every time and keep serving. With
       ``SHUTDOWN_TOKEN`` unset it must answer 403. Only the right token stops it (202,
       then a clean exit). ``integration.py`` runs against a local S3 server with
       distinctive AWS keys, and ``scope.py`` with a database URL carrying a password.
    2. Scan. Every secret handed to a script during the run (the run's secret watch,
       ``ctx.watch``, remembers them) is searched for in every log and output, and in
       every row of every table of every system database the run used: as is, and
       inside base64 tokens (DBOS stores pickled inputs and outputs as base64, where a
       plain search would miss them). Run by ``python -m reliability``, this area comes
       last and also scans the logs and databases of all other areas.
    3. Control. A workflow that (deliberately) takes a secret as its argument must be
       found by the same scan: otherwise a zero would prove nothing.
    4. Container. The Dockerfile's last ``USER`` is a numeric, non-root uid (the tests in
       tests/test_container.py also run the image's command as that user).

The pytest suite applies the scan of step 2 after every single test (tests/conftest.py).

Figures (area "secrets")
    secrets handed to scripts: how many distinct values were searched for.
    logs and outputs scanned / with a secret: files and captured outputs; promise 0.
    database rows scanned / with a secret: promise 0.
    control secret found by the scan: promise yes.
    /shutdown without the right token: answers (all 401, 403 when disabled), and
        whether the server was still serving after each; promise: never stopped.
    /shutdown with the right token: 202 and a clean stop.
    container user: the uid:gid of the image; promise: not root.
"""

from __future__ import annotations

import secrets as random_secrets
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from harness import REPO
from harness.clients import CacheClient, ScopeClient, ShutdownClient
from harness.db import database_dump, secrets_in_database
from harness.env import remember_secret, script_env, secrets_in
from harness.fanout import shutdown_server
from harness.proc import run_script
from harness.server import AppServer
from reliability.core import Context, Figure, info, progress, promise

AREA = "secrets"


def distinctive(label: str) -> str:
    """A secret no other text could contain by accident."""
    return f"{label}-{random_secrets.token_hex(12)}"


def near_misses(token: str) -> list[dict[str, str]]:
    """Authorization headers that must not open /shutdown (the first sends none)."""
    return [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": f"bearer {token}x"},
        {"Authorization": f"Bearer  {token}"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": token},
        {"Authorization": "Bearer " + "x" * 8192},
    ]


def exercise_shutdown_guard(ctx: Context) -> dict[str, Any]:
    """Hit /shutdown without the right token (token set, then unset), then with it."""
    token = distinctive("shutdown-token")
    url = ctx.fresh_db("secrets-shutdown")
    work = ctx.scratch("secrets-shutdown")
    answers: list[int] = []
    serving_after: list[bool] = []
    server = shutdown_server(url, work / "guarded.log", token=token).start()
    api = ShutdownClient(server.client)
    try:
        workflow_id = api.trigger(20, 15)
        for headers in near_misses(token):
            answers.append(api.shutdown("crash", headers=headers).status_code)
            serving_after.append(server.running and api.healthz().status_code in (200, 503))
        api.wait_success(workflow_id, 60)
        right = api.shutdown("graceful", token=token)
        exit_code = server.wait_exit(timeout=30)
    finally:
        server.close()

    disabled: list[int] = []
    with shutdown_server(url, work / "disabled.log") as off:
        for headers in near_misses(token)[:3] + [{"Authorization": f"Bearer {token}"}]:
            disabled.append(ShutdownClient(off.client).shutdown(headers=headers).status_code)
        disabled_serving = off.running
    return {
        "answers": answers,
        "serving_after": serving_after,
        "right_status": right.status_code,
        "exit_code": exit_code,
        "disabled_answers": disabled,
        "disabled_serving": disabled_serving,
    }


def exercise_apps(ctx: Context) -> dict[str, Any]:
    """Run the cache app's credential-using workflows, fastapi_scope's workflows,
    integration.py with AWS keys and scope.py with a password in its database URL."""
    url = ctx.fresh_db("secrets-apps")
    ran = _web_apps(url, ctx.scratch("secrets-apps"))
    ran["integration_exit"] = _integration(url)
    ran["scope_exit"] = _scope_with_password(url)
    return ran


def _web_apps(url: str, work: Path) -> dict[str, Any]:
    """The cache app with a credentials secret, then fastapi_scope, on the same database."""
    ran: dict[str, Any] = {}
    credentials = distinctive("credentials")
    env = script_env(url, CREDENTIALS_SECRET=credentials)
    with AppServer("fastapi_scope_cache:app", env, work / "cache.log") as cache:
        api = CacheClient(cache.client)
        ids = [api.start(pages=2, users_per_page=2) for _ in range(2)]
        for workflow_id in ids:
            api.wait_success(workflow_id, 60)
        ran["cache_stats"] = api.cache()
    with AppServer("fastapi_scope:app", script_env(url), work / "scope.log") as scope:
        sync = ScopeClient(scope.client).trigger_sync(steps=2, step_seconds=0)
        ran["fastapi_scope"] = sync.status_code
    return ran


def _integration(url: str) -> int:
    """integration.py against moto's S3 server with distinctive keys: its exit code."""
    import boto3

    import integration

    s3, endpoint = integration.start_local_s3()
    try:
        key_id, secret_key = distinctive("AKIDTEST"), distinctive("aws-secret")
        bucket = f"secrets-{uuid.uuid4().hex[:8]}"
        keys = {"aws_access_key_id": key_id, "aws_secret_access_key": secret_key}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        integration.seed_demo_bucket(client, bucket, 30)
        result = run_script(
            "integration.py",
            "--bucket",
            bucket,
            "--page-size",
            "10",
            env=script_env(
                url,
                AWS_ENDPOINT_URL=endpoint,
                AWS_ACCESS_KEY_ID=key_id,
                AWS_SECRET_ACCESS_KEY=secret_key,
                AWS_DEFAULT_REGION="us-east-1",
            ),
            timeout=180,
        )
        return result.returncode
    finally:
        s3.stop()


def _scope_with_password(url: str) -> int:
    """scope.py with a password in its database URL: its exit code."""
    # The server trusts local connections, so any password works, and it must show up
    # redacted only.
    from sqlalchemy.engine import make_url

    password = distinctive("db-password")
    with_password = make_url(url).set(password=password).render_as_string(hide_password=False)
    remember_secret(password)
    result = run_script(
        "scope.py",
        "--steps",
        "2",
        "--step-seconds",
        "0",
        env=script_env(with_password),
        timeout=120,
    )
    return result.returncode


def control(ctx: Context) -> bool:
    """A workflow that takes a secret as its argument: the scan must find it."""
    secret = distinctive("control")
    url = ctx.fresh_db("secrets-control")
    program = (
        "import sys\n"
        "from dbos import DBOS\n"
        "from lab.config import dbos_config\n"
        "@DBOS.workflow()\n"
        "def leaky(secret: str) -> int:\n"
        "    return len(secret)\n"
        "DBOS(config=dbos_config('secrets-control'))\n"
        "DBOS.launch()\n"
        "leaky(sys.stdin.read())\n"
        "DBOS.destroy()\n"
    )
    subprocess.run(
        [sys.executable, "-c", program],
        input=secret,
        text=True,
        env=script_env(url),
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=120,
    )
    # DBOS 3.4 keeps workflow inputs in dbos.workflow_input (pickled, base64).
    return "dbos.workflow_input" in secrets_in_database(url, {secret})


def container_user() -> str:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    users = [i["value"].strip() for i in parser.structure if i["instruction"] == "USER"]
    return users[-1] if users else "root"


def is_root(user: str) -> bool:
    name = user.split(":", 1)[0]
    return name in ("", "0", "root")


def scan(ctx: Context) -> dict[str, int]:
    """Search every remembered secret in the run's logs, outputs and databases."""
    secrets, outputs = ctx.watch.secrets, ctx.watch.outputs
    files = [
        p
        for p in ctx.workdir.rglob("*")
        if p.is_file()
        and p.suffix in (".log", ".txt", ".out", ".jsonl")
        and "data" not in p.relative_to(ctx.workdir).parts  # a cluster's own files
    ]
    leaky_files = [p for p in files if secrets_in(p.read_bytes(), secrets)]
    leaky_outputs = [o for o in outputs if secrets_in(o, secrets)]
    rows = leaky_rows = 0
    for url in ctx.databases():
        for table, row in database_dump(url):
            rows += 1
            if secrets_in(row, secrets):
                leaky_rows += 1
                progress(f"a secret in {table} of {url.rsplit('/', 1)[-1]}")
    return {
        "secrets": len(secrets),
        "files": len(files),
        "outputs": len(outputs),
        "leaky_logs": len(leaky_files) + len(leaky_outputs),
        "rows": rows,
        "leaky_rows": leaky_rows,
    }


def run(ctx: Context) -> list[Figure]:
    progress("secrets: the shutdown guard")
    guard = exercise_shutdown_guard(ctx)
    progress("secrets: apps with secrets")
    apps = exercise_apps(ctx)
    progress("secrets: control and scan")
    found_control = control(ctx)
    counts = scan(ctx)
    user = container_user()
    return [
        *_scan_figures(counts, found_control),
        *_guard_figures(guard),
        promise(
            AREA,
            "apps ran with their secrets",
            f"cache fetches {apps['cache_stats']['fetches']}, "
            f"integration exit {apps['integration_exit']}, scope exit {apps['scope_exit']}",
            apps["cache_stats"]["fetches"] == 1
            and apps["integration_exit"] == 0
            and apps["scope_exit"] == 0,
            "ran",
        ),
        promise(AREA, "container user", user, not is_root(user), "not root", "Dockerfile USER"),
    ]


def _scan_figures(counts: dict[str, int], found_control: bool) -> list[Figure]:
    """Where the scan looked, what it found, and that it can find a secret at all."""
    return [
        info(AREA, "secrets handed to scripts (searched for)", counts["secrets"]),
        promise(
            AREA,
            "logs and outputs with a secret",
            f"{counts['leaky_logs']} of {counts['files'] + counts['outputs']}",
            counts["leaky_logs"] == 0,
            "0",
        ),
        promise(
            AREA,
            "database rows with a secret",
            f"{counts['leaky_rows']} of {counts['rows']}",
            counts["leaky_rows"] == 0,
            "0",
            "every table of every system database of the run",
        ),
        promise(
            AREA,
            "control: a secret passed as a workflow argument is found",
            "yes" if found_control else "no",
            found_control,
            "yes",
            "proves the scan sees pickled, base64 inputs",
        ),
    ]


def _guard_figures(guard: dict[str, Any]) -> list[Figure]:
    """How /shutdown answered without, with a wrong and with the right token."""
    refused = sum(a == 401 for a in guard["answers"])
    return [
        promise(
            AREA,
            "/shutdown without the right token: refused",
            f"{refused} of {len(guard['answers'])} (401)",
            refused == len(guard["answers"]) and all(guard["serving_after"]),
            "all, server keeps serving",
            "no header, wrong token, other scheme, near misses, 8 KB header",
        ),
        promise(
            AREA,
            "/shutdown with SHUTDOWN_TOKEN unset",
            f"{sorted(set(guard['disabled_answers']))}",
            set(guard["disabled_answers"]) == {403} and guard["disabled_serving"],
            "403, server keeps serving",
        ),
        promise(
            AREA,
            "/shutdown with the right token",
            f"{guard['right_status']}, exit {guard['exit_code']}",
            guard["right_status"] == 202 and guard["exit_code"] in (0, -signal.SIGTERM),
            "202, clean stop",
        ),
    ]
