"""The Docker image on a real engine: every README claim for `docker run` and compose.

The project's Dockerfile is built unmodified, once per test session, on the engine
``docker`` reaches (``.ci/engine.sh`` prepares one; ``.ci/run`` calls it). Every
container runs with ``--network host`` on its own port (PORT) and listens on
127.0.0.1 (HOST). Without an engine these tests skip with the reason; under CI=true
they fail instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from sqlalchemy.engine import make_url

import harness.docker as hd
from harness import REPO, pgcluster
from harness.db import query
from harness.env import remember_secrets
from harness.fanout import children, fan_out_result, ledger_runs
from harness.proc import free_port, parse_json_lines, wait_for

# Generous: the first test also builds the image (about a minute from scratch).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SERVICE_LOCK = REPO / "requirements-service.txt"
# The image's budget, in Docker's units (`docker images`: 1 MB = 10**6 bytes), base
# included. docs/service.md states what was measured.
MAX_IMAGE_BYTES = 200_000_000
GRACE = 10  # docker stop's default: SIGTERM, then SIGKILL after this many seconds
UID = "10001"
# A fan-out still running when it is stopped: 60 steps, the last 30 of them fib(31)
# (~0.35 s of CPU each, one core under the GIL).
LONG = {"steps": 60, "max_n": 31}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(problem: str | None) -> None:
    if problem:
        if in_ci():
            pytest.fail(f"CI runs the container tests on a real engine: {problem}")
        pytest.skip(problem)


@pytest.fixture
def token() -> str:
    value = secrets.token_hex(16)
    remember_secrets({"SHUTDOWN_TOKEN": value})  # conftest then scans the logs for it
    return value


Run = Callable[..., hd.Container]


@pytest.fixture
def run(image: str, tmp_path: Path) -> Iterator[Run]:
    """Start a container of the image; afterwards its logs land in ``<name>.log`` (which
    conftest scans for secrets) and it is removed."""
    started: list[hd.Container] = []

    def _run(env: dict[str, str], options: list[str] | None = None, port: int = 0) -> hd.Container:
        remember_secrets(env)
        container = hd.Container(image, port or free_port(), env, options or [])
        started.append(container)
        return container.start()

    yield _run
    for container in started:
        (tmp_path / f"{container.name}.log").write_text(container.logs())
        container.remove()


def client(container: hd.Container) -> httpx.Client:
    return httpx.Client(base_url=container.url, timeout=30)


def start_fan_out(http: httpx.Client, steps: int, max_n: int) -> str:
    answer = http.post("/trigger_async", params={"steps": steps, "max_n": max_n})
    assert answer.status_code == 202, answer.text
    workflow_id: str = answer.json()["workflow_id"]
    return workflow_id


def view(http: httpx.Client, workflow_id: str) -> dict[str, Any]:
    answer = http.get(f"/workflows/{workflow_id}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def wait_done(http: httpx.Client, workflow_id: str, timeout: float = 300) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = view(http, workflow_id)
        return body if body["status"] in ("SUCCESS", "ERROR") else None

    body: dict[str, Any] = hd.wait_until(done, timeout, f"fan-out {workflow_id}")
    return body


def wait_mid_fan_out(http: httpx.Client, workflow_id: str) -> int:
    """Steps done once at least one is, while the fan-out still runs."""

    def some_done() -> int:
        body = view(http, workflow_id)
        assert body["status"] == "PENDING", f"the fan-out ended before the stop: {body}"
        return int(body["progress"]["done"])

    done: int = hd.wait_until(some_done, 180, "a first step to finish")
    return done


def done_steps(url: str, workflow_id: str) -> set[int]:
    """Indices of the fan-out's steps recorded as SUCCESS."""
    return {i for i, step in children(url, workflow_id).items() if step["status"] == "SUCCESS"}


def json_logs(container: hd.Container, *secret: str) -> list[dict[str, Any]]:
    """The container's log lines, every one a JSON object, none holding a secret."""
    text = container.logs()
    for value in secret:
        assert value not in text, f"{container.name}: a secret reached the logs"
    records = parse_json_lines(text)
    assert records
    return records


# --- the image as built ---------------------------------------------------------------


def test_pip_freeze_in_the_image_equals_the_service_lock(image: str) -> None:
    def inside(*cmd: str) -> str:
        return hd.docker(
            "run", "--rm", "--network", "none", "--entrypoint", cmd[0], image, *cmd[1:]
        ).stdout  # fmt: skip

    probe = "import json; from pip._vendor.packaging import markers; "
    environment = json.loads(
        inside("python", "-c", probe + "print(json.dumps(markers.default_environment()))")
    )
    assert environment["python_version"] == "3.12"
    frozen = {}
    for line in inside("pip", "freeze", "--all").splitlines():
        name, _, version = line.partition("==")
        assert version, f"not a pinned distribution: {line!r}"
        frozen[hd.normalize(name)] = version
    frozen.pop("pip")  # the base image's own installer, not the app's
    assert frozen == hd.lock_pins(SERVICE_LOCK, environment)
    # pip check: no dependency of an installed package is missing or of a wrong version.
    assert "No broken requirements" in inside("pip", "check")


def test_engine_script_uses_a_working_engine_as_it_is(tmp_path: Path) -> None:
    """An engine the script did not start (its STATE is elsewhere) is used, not replaced;
    what it already has is not pulled again."""
    need(hd.engine_problem())
    # The engine the tests use (DOCKER_HOST, else the default socket), as docker sees it.
    host = hd.docker("context", "inspect", "-f", "{{.Endpoints.docker.Host}}").stdout.strip()
    env = {"PATH": os.environ["PATH"], "DOCKER_HOST": host, "STATE": str(tmp_path / "state")}
    script = str(REPO / hd.ENGINE_SCRIPT)

    def call(step: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", script, step], env=env, capture_output=True, text=True, timeout=120
        )

    assert call("env").stdout.strip() == f"export DOCKER_HOST={host}"
    base = call("base")
    assert base.returncode == 0, base.stderr
    assert f"using the engine at {host}" in base.stderr
    assert f"{hd.BASE_IMAGE} already present" in base.stderr and "docker pull" not in base.stderr
    assert not (tmp_path / "state").exists()  # no daemon of its own, no stand-in built


def test_the_image_stays_within_its_size_budget(image: str) -> None:
    size = int(hd.docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    base = int(hd.docker("image", "inspect", "-f", "{{.Size}}", hd.BASE_IMAGE).stdout)
    print(f"image {size / 1e6:.1f} MB = base {base / 1e6:.1f} MB + {(size - base) / 1e6:.1f} MB")
    assert size <= MAX_IMAGE_BYTES, (
        f"{image}: {size / 1e6:.1f} MB (base {base / 1e6:.1f} MB) > {MAX_IMAGE_BYTES / 1e6:.0f} MB"
    )


def test_the_build_context_holds_only_what_copy_needs(image: str, tmp_path: Path) -> None:
    """.dockerignore, as Docker itself applies it, on a checkout with the usual clutter."""
    context = tmp_path / "context"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, context / rel)
    clutter = [
        ".envrc",
        ".venv/bin/python",
        "__pycache__/common.cpython-312.pyc",
        "lab/__pycache__/config.cpython-312.pyc",
        "experiment6.sqlite",
        "experiment6.sqlite-wal",
        ".pytest_cache/v/cache/nodeids",
    ]
    for rel in clutter:
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        (context / rel).write_text("clutter\n")
    # What the COPY lines name: files, and every file below a directory.
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    sources = [
        src
        for i in parser.structure
        if i["instruction"] == "COPY"
        for src in i["value"].split()[:-1]
        if not src.startswith("--")
    ]
    expected = set()
    for src in sources:
        path = REPO / src
        if path.is_dir():
            expected |= {
                p.relative_to(REPO).as_posix()
                for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
            }
        else:
            expected.add(src)
    assert "fastapi_scope_shutdown.py" in expected
    found = hd.context_files(context, f"experiment6-context:{hd.SESSION}")
    assert set(found) == expected, "the build context must hold exactly what COPY copies"


def test_the_image_declares_its_user_port_health_check_and_init(image: str) -> None:
    config = hd.image_config(image)
    assert config["User"] == f"{UID}:{UID}"
    assert list(config["ExposedPorts"]) == ["8000/tcp"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert (env["PORT"], env["HOST"]) == ("8000", "0.0.0.0")
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["Entrypoint"] == ["dumb-init", "--"]
    # The app user: a regular account (uid 10001 lies in login.defs' UID_MIN..UID_MAX,
    # so useradd has nothing to warn about, as it did with --system), with a home.
    probe = "grep -E '^(UID_MIN|UID_MAX)[[:space:]]' /etc/login.defs; getent passwd app"
    out = hd.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", probe
    ).stdout.split("\n")  # fmt: skip
    limits = dict(line.split() for line in out if line.startswith("UID_"))
    assert int(limits["UID_MIN"]) <= int(UID) <= int(limits["UID_MAX"])
    (passwd,) = [line for line in out if line.startswith("app:")]
    assert passwd.split(":")[2:] == [UID, UID, "", "/home/app", "/usr/sbin/nologin"]


# --- docker run -----------------------------------------------------------------------


def test_container_turns_healthy_runs_a_fan_out_as_non_root_under_its_init(
    run: Run, pg_url: str, token: str
) -> None:
    container = run({"DBOS_SYSTEM_DATABASE_URL": pg_url, "SHUTDOWN_TOKEN": token})
    # The image's own HEALTHCHECK (10 s interval) turns it healthy: `docker ps` says so.
    container.wait_health("healthy", 240)
    status = hd.docker("ps", "--filter", f"name={container.name}", "--format", "{{.Status}}")
    assert "(healthy)" in status.stdout
    body = container.wait_serving()
    assert (body["status"], body["database"], body["executor_id"]) == (
        "ok",
        "postgres",
        "shutdown-0",
    )

    # PID 1 is the init; its one child is uvicorn itself (the shell exec'd it); every
    # process runs as the image's user.
    pid1 = str(container.inspect()["State"]["Pid"])
    processes = container.processes()
    assert {p["uid"] for p in processes} == {UID}, processes
    (init,) = [p for p in processes if p["pid"] == pid1]
    assert init["args"].split()[:2] == ["dumb-init", "--"]
    children = [p for p in processes if p["ppid"] == pid1]
    assert len(children) == 1 and "uvicorn fastapi_scope_shutdown:app" in children[0]["args"]
    assert not any(p["args"].split()[0] in ("sh", "/bin/sh") for p in processes)
    # The code is root's: the app can change none of it. The app user has a home.
    code = container.exec("sh", "-c", "test -w /app || test -w /app/fastapi_scope_shutdown.py")
    assert code.returncode == 1
    owners = container.exec(
        "stat", "-c", "%u", "/app", "/app/fastapi_scope_shutdown.py", "/app/lab"
    )
    assert owners.stdout.split() == ["0", "0", "0"], owners.stderr
    # The app user has a home of its own.
    home = container.exec("sh", "-c", 'id -u; echo "$HOME"; test -d "$HOME" && test -w "$HOME"')
    assert (home.returncode, home.stdout.split()) == (0, [UID, "/home/app"]), home.stderr

    with client(container) as http:
        workflow_id = start_fan_out(http, 5, 3)
        done = wait_done(http, workflow_id)
    assert (done["status"], done["result"]) == ("SUCCESS", fan_out_result(5, 3))
    rows = query(
        pg_url,
        "SELECT status, executor_id FROM dbos.workflow_status "
        "WHERE workflow_uuid = %s OR parent_workflow_id = %s",
        workflow_id,
        workflow_id,
    )
    assert sorted(rows) == [("SUCCESS", "shutdown-0")] * 6

    # docker exec <c> dbos workflow list: the CLI in the image finds its config and the
    # database (DBOS_SYSTEM_DATABASE_URL, from the container's environment).
    listed = container.exec("dbos", "workflow", "list", "--name", "fan_out")
    assert listed.returncode == 0, listed.stderr
    assert workflow_id in listed.stdout
    records = json_logs(container, token)
    assert any(r.get("message") == "Application startup complete." for r in records)


def test_port_is_honoured_by_the_app_and_the_health_check(run: Run, pg_url: str) -> None:
    """docker run -e PORT=9000 --network host ...: serves and turns healthy on 9000."""
    port = 9000
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
        port = free_port()  # 9000 is taken on this machine: any other port proves it
    except httpx.TransportError:
        pass
    container = run({"DBOS_SYSTEM_DATABASE_URL": pg_url}, port=port)
    # Healthy means the HEALTHCHECK asked PORT and the app answered there.
    container.wait_health("healthy", 240)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
    assert any(f"127.0.0.1:{port}" in str(r.get("message")) for r in json_logs(container))
    # Without SHUTDOWN_TOKEN, POST /shutdown is disabled; with it, mode=graceful is
    # the same clean stop as docker stop.
    assert httpx.post(f"{container.url}/shutdown", timeout=30).status_code == 403


def test_shutdown_graceful_from_inside_exits_143(run: Run, pg_url: str, token: str) -> None:
    container = run({"DBOS_SYSTEM_DATABASE_URL": pg_url, "SHUTDOWN_TOKEN": token})
    container.wait_serving()
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.post(f"{container.url}/shutdown", timeout=30).status_code == 401
    answer = httpx.post(
        f"{container.url}/shutdown", params={"mode": "graceful"}, headers=auth, timeout=30
    )
    assert answer.status_code == 202, answer.text
    assert container.wait_exit(60) == 143
    assert "DBOS successfully shut down" in [
        str(r.get("message")) for r in json_logs(container, token)
    ]


def test_sqlite_in_a_writable_path_of_the_container(run: Run) -> None:
    """/app is not writable; a SQLite URL under /tmp works (gone with the container)."""
    container = run({"DBOS_SYSTEM_DATABASE_URL": "sqlite:////tmp/experiment6.sqlite"})
    assert container.wait_serving()["database"] == "sqlite"
    with client(container) as http:
        done = wait_done(http, start_fan_out(http, 5, 3))
    assert (done["status"], done["result"]) == ("SUCCESS", fan_out_result(5, 3))


def test_crash_exits_137_and_a_new_container_finishes_the_same_fan_out(
    run: Run, pg_url: str, token: str, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    ledger_env, options = hd.ledger_volume(ledger)
    env = {"DBOS_SYSTEM_DATABASE_URL": pg_url, "SHUTDOWN_TOKEN": token, **ledger_env}
    first = run(env, options)
    first.wait_serving()
    with client(first) as http:
        workflow_id = start_fan_out(http, **LONG)
        wait_mid_fan_out(http, workflow_id)
        answer = http.post(
            "/shutdown", params={"mode": "crash"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 202, answer.text
    # SIGKILL from inside reaches uvicorn (PID 2); dumb-init exits with its status.
    assert first.wait_exit(60) == 137
    before = done_steps(pg_url, workflow_id)
    assert 0 < len(before) < LONG["steps"]
    assert query(
        pg_url, "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", workflow_id
    ) == [("PENDING",)]
    json_logs(first, token)

    # Same database. The dead container's lease (shutdown-0) stays live for up to
    # LEASE_SEC after its last renewal: another pid namespace, so its owner cannot be
    # known dead from here. Started within that time, the new container serves under a
    # slot of its own and adopts shutdown-0 once the lease has expired; started later,
    # it claims shutdown-0 itself and recovers it at launch.
    second = run(env, options)
    executor = second.wait_serving()["executor_id"]
    with client(second) as http:
        done = wait_done(http, workflow_id)
    if executor != "shutdown-0":
        adopted = [
            r["orphan"]
            for r in json_logs(second, token)
            if r["message"] == "adopted orphaned executor slot"
        ]
        assert adopted == ["shutdown-0"], (executor, adopted)
    assert (done["status"], done["result"]) == ("SUCCESS", fan_out_result(**LONG))
    runs = ledger_runs(ledger / "runs.txt", workflow_id)
    assert set(runs) == set(range(LONG["steps"]))  # every step ran
    assert {i: runs[i] for i in before} == dict.fromkeys(before, 1)  # recorded ones: once
    json_logs(second, token)


def test_docker_stop_mid_fan_out_is_a_graceful_143_within_the_grace(
    run: Run, pg_url: str, token: str
) -> None:
    container = run({"DBOS_SYSTEM_DATABASE_URL": pg_url, "SHUTDOWN_TOKEN": token})
    container.wait_serving()
    with client(container) as http:
        workflow_id = start_fan_out(http, **LONG)
        wait_mid_fan_out(http, workflow_id)
    code, took = container.stop(GRACE)
    # 143: uvicorn stopped on the SIGTERM and re-raised it; a SIGKILL at the end of the
    # grace would have made it 137.
    assert code == 143, f"exit {code} after {took:.1f} s:\n{container.logs()[-3000:]}"
    assert took < GRACE, f"took {took:.1f} s"
    messages = [str(r.get("message")) for r in json_logs(container, token)]
    assert "DBOS successfully shut down" in messages


def answer_or_none(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=30)
    except httpx.TransportError:  # refused while the server re-executes itself
        return None


def test_database_outage_turns_the_container_unhealthy_and_it_recovers(
    run: Run, tmp_path: Path
) -> None:
    """A private Postgres, stopped and started again on the same port. The image's own
    health check command, run every 2 s instead of 10 s to keep the test short."""
    if pgcluster.find_bindir() is None:
        need("no PostgreSQL server binaries for a private cluster")
    with pgcluster.private_cluster(keep_log=tmp_path / "postgres-server.txt") as cluster:
        fast = ["--health-interval=2s", "--health-retries=2", "--health-start-period=120s"]
        container = run({"DBOS_SYSTEM_DATABASE_URL": cluster.url}, fast)
        container.wait_health("healthy", 180)

        cluster.stop("fast")
        container.wait_health("unhealthy", 120)
        # Past FENCE_SEC the server fences itself and re-executes in place: for the
        # import time it does not listen (refused), then answers 503 while it waits.
        answer = wait_for(lambda: answer_or_none(f"{container.url}/healthz"), 60, 0.5, "/healthz")
        assert answer.status_code == 503
        assert answer.json()["reason"].startswith("database unreachable")

        cluster.start()
        container.wait_health("healthy", 180)
        with client(container) as http:
            done = wait_done(http, start_fan_out(http, 5, 3))
        assert (done["status"], done["result"]) == ("SUCCESS", fan_out_result(5, 3))
        assert container.running()


def test_the_image_composes_its_database_url_from_the_pg_variables(run: Run, pg_url: str) -> None:
    url = make_url(pg_url)
    env = {  # docker run -e PGHOST=... -e PGPORT=...: no URL given
        "PGHOST": str(url.host),
        "PGPORT": str(url.port),
        "PGUSER": str(url.username),
        "PGDATABASE": str(url.database),
    }
    if url.password:
        env["PGPASSWORD"] = url.password
    container = run(env)
    assert container.wait_serving()["database"] == "postgres"
    # DBOS made its tables in that very database, which the fixture left empty.
    assert query(pg_url, "SELECT to_regclass('dbos.workflow_status') IS NOT NULL") == [(True,)]


# --- docker compose ---------------------------------------------------------------


def test_compose_runs_the_projects_services_for_real(
    image: str, token: str, tmp_path: Path
) -> None:
    """docker-compose.yml's services, with the stand-in postgres:17, on host networking."""
    need(None if hd.compose_cli() else "no docker compose CLI (Debian: docker-compose)")
    if hd.docker("image", "inspect", "postgres:17", check=False).returncode != 0:
        need(hd.missing_image("postgres:17", "postgres"))  # a test never pulls
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    app_port, pg_port = free_port(), free_port()
    variant = hd.host_network_compose(compose, image, app_port, pg_port)
    file = tmp_path / "docker-compose.yml"
    file.write_text(yaml.safe_dump(variant, sort_keys=False))
    project = hd.ComposeProject(file, {"SHUTDOWN_TOKEN": token})
    config = yaml.safe_load(project.run("config").stdout)
    assert all(s["network_mode"] == "host" for s in config["services"].values())
    assert not config.get("networks")

    auth = {"Authorization": f"Bearer {token}"}
    with hd.networks_unchanged():
        try:
            # depends_on: the app starts once Postgres's own healthcheck passes.
            project.run("up", "--detach", "--no-build", timeout=600)
            assert project.health("postgres") == "healthy"
            hd.wait_until(lambda: project.health("app") == "healthy", 240, "the app to be healthy")
            with httpx.Client(base_url=f"http://127.0.0.1:{app_port}", timeout=30) as http:
                health = http.get("/healthz").json()
                assert (health["status"], health["database"]) == ("ok", "postgres")
                # Crash mid fan-out: exit 137; `docker compose start app` finishes it.
                workflow_id = start_fan_out(http, **LONG)
                wait_mid_fan_out(http, workflow_id)
                app = project.container("app")
                answer = http.post("/shutdown", params={"mode": "crash"}, headers=auth)
                assert answer.status_code == 202, answer.text
                assert hd.docker("wait", app).stdout.strip() == "137"
                project.run("start", "app")
                hd.wait_until(lambda: project.health("app") == "healthy", 240, "app healthy again")
                done = wait_done(http, workflow_id)
            assert (done["status"], done["result"]) == ("SUCCESS", fan_out_result(**LONG))
            listed = project.run("exec", "-T", "app", "dbos", "workflow", "list", "--limit", "5")
            assert workflow_id in listed.stdout
            # `docker compose logs app`: JSON lines (read without compose's name prefix).
            records = parse_json_lines(hd.docker("logs", app).stdout)
            assert any(r.get("message") == "Application startup complete." for r in records)
            # A graceful stop, within the grace.
            started = time.monotonic()
            project.run("stop", "--timeout", str(GRACE), "app")
            assert hd.docker("wait", app).stdout.strip() == "143"
            assert time.monotonic() - started < GRACE
            # Workflows survive `down` (the pgdata volume); `down --volumes` deletes them.
            project.run("down", "--timeout", str(GRACE))
            project.run("up", "--detach", "--no-build", timeout=600)
            hd.wait_until(lambda: project.health("app") == "healthy", 240, "the app after down/up")
            with httpx.Client(base_url=f"http://127.0.0.1:{app_port}", timeout=30) as http:
                assert view(http, workflow_id)["status"] == "SUCCESS"
        finally:
            logs = project.run("logs", "--no-color", check=False)
            (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
            project.down()
    assert token not in (tmp_path / "compose.log").read_text()
