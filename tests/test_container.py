"""The Docker image, checked without a Docker engine.

- hadolint finds nothing in the Dockerfile;
- the image "built" by replaying the Dockerfile (tests/container_image.py: only the
  COPY'd files, a fresh virtualenv with only what RUN installs, its ENV and USER)
  serves /healthz and a fan-out against Postgres, passes its own HEALTHCHECK and
  stops cleanly on SIGTERM; the same image without one file or one package fails;
- versions, .dockerignore, docker-compose.yml, dbos-config.yaml and envrc-template
  agree with the code.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import container_image as ci
import httpx
import pytest
import yaml
from sqlalchemy.engine import make_url

from harness import REPO
from harness.db import query
from harness.proc import free_port, wait_for

DOCKERFILE = REPO / "Dockerfile"
BIN = Path(sys.executable).parent
RUNTIME = {"dbos", "fastapi", "uvicorn", "psycopg2-binary", "python-json-logger", "dumb-init"}
TOKEN = "test-shutdown-token"  # noqa: S105 - a test value


# --- hadolint -------------------------------------------------------------------


def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """hadolint at its strictest: style level fails, no config file can loosen it."""
    return subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_finds_nothing_and_every_ignore_is_explained(tmp_path: Path) -> None:
    result = hadolint(DOCKERFILE, tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"Dockerfile line {number + 1}: say why above `{line.strip()}`"
            )


def test_hadolint_does_flag_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install fastapi\nCMD uvicorn app:app\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode == 1
    assert {"DL3006", "DL3013", "DL3042", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


# --- versions -----------------------------------------------------------------------


def pins(path: Path) -> dict[str, str]:
    """name -> version of every requirement in ``path`` (following ``-r``); all must be ==."""
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            found.update(pins(path.parent / line.split(None, 1)[1]))
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[3]
    return found


def test_dockerfile_installs_exactly_the_runtime_pins_of_requirements_txt(
    tmp_path: Path,
) -> None:
    image = ci.build(DOCKERFILE.read_text(), REPO, tmp_path, venvs=None)
    assert image.base == "python:3.12-slim"
    # Every pip install in the image reads requirement files: no inline specs or options.
    image_pins: dict[str, str] = {}
    for args in image.pip_installs:
        files = args[1::2]
        assert args == [x for f in files for x in ("-r", f)], args
        for file in files:
            image_pins.update(pins(Path(file)))
    assert set(image_pins) == RUNTIME
    everything = pins(REPO / "requirements.txt")
    assert {name: everything.get(name) for name in image_pins} == image_pins
    # And the tests run against the same versions.
    assert {name: version(name) for name in image_pins} == image_pins


@pytest.mark.parametrize(
    "line",
    [
        "RUN apt-get update",
        "ADD common.py .",
        "ENTRYPOINT uvicorn app:app",
        "COPY --chmod=600 common.py .",
        "FROM python:3.12-slim AS second",
        "ARG VERSION=1",
    ],
)
def test_replay_refuses_a_line_it_cannot_reproduce(line: str, tmp_path: Path) -> None:
    with pytest.raises(ci.Unsupported):
        ci.build(f"FROM python:3.12-slim\nWORKDIR /app\n{line}\n", REPO, tmp_path, None)


@pytest.mark.parametrize("source", ["no_such_file.py", "scope.py", "tests/conftest.py"])
def test_replay_cannot_copy_what_the_build_context_lacks(source: str, tmp_path: Path) -> None:
    """Missing, or left out by .dockerignore: `docker build` would fail the same way."""
    with pytest.raises(AssertionError, match="not in the build context"):
        ci.build(f"FROM python:3.12-slim\nWORKDIR /app\nCOPY {source} ./\n", REPO, tmp_path, None)


# --- .dockerignore ------------------------------------------------------------------


def test_dockerignore_lets_in_only_what_copy_needs() -> None:
    patterns = ci.read_dockerignore(REPO)
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "__pycache__/common.cpython-312.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "experiment6.sqlite",
        "experiment6.sqlite-wal",
        "tests/test_scope.py",
        "benchmarks/core.py",
        ".envrc",
        "scope.py",
    ):
        assert ci.ignored(path, patterns), f"{path} would reach the build context"
    copied = {"requirements-runtime.txt", "dbos-config.yaml", "common.py"}
    copied.add("fastapi_scope_shutdown.py")
    assert not any(ci.ignored(p, patterns) for p in copied)
    present = {p for p in copied if (REPO / p).exists()}
    assert set(ci.context_files(REPO)) == present


def test_dockerignore_matching_follows_docker_rules() -> None:
    patterns = ["*", "!keep.py", "**/*.log", "build/"]
    assert not ci.ignored("keep.py", patterns)
    assert ci.ignored("other.py", patterns)
    assert ci.ignored("a/b/c.log", ["**/*.log"])
    assert ci.ignored("build/x/y", ["build"])
    assert not ci.ignored("src/x.py", ["build", "*.log"])


# --- docker-compose.yml and dbos-config.yaml -------------------------------------


def test_compose_runs_the_image_against_a_healthy_postgres_it_can_log_into() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    pg, app = compose["services"]["postgres"], compose["services"]["app"]
    assert pg["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert app["build"] in (".", {"context": "."})
    assert app["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    url = make_url(app["environment"]["DBOS_SYSTEM_DATABASE_URL"])
    pg_env = pg["environment"]
    assert (url.host, url.port) == ("postgres", 5432)
    assert url.username == pg_env.get("POSTGRES_USER", "postgres")
    assert url.password == pg_env["POSTGRES_PASSWORD"]
    assert url.database == pg_env.get("POSTGRES_DB", url.username)
    assert "SHUTDOWN_TOKEN" in app["environment"]
    # Published on loopback only, onto the port the image exposes and serves.
    assert app["ports"] == ["127.0.0.1:8000:8000"]
    assert all(p.startswith("127.0.0.1:") for p in pg.get("ports", []))


def compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.skipif(compose_cli() is None, reason="no docker compose CLI (apt: docker-compose)")
def test_compose_file_passes_docker_composes_own_validation(tmp_path: Path) -> None:
    """`config` validates against the Compose schema; it needs no Docker engine."""
    result = subprocess.run(
        [*(compose_cli() or []), "--file", str(REPO / "docker-compose.yml"), "config"],
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SHUTDOWN_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["services"]["app"]["environment"]["SHUTDOWN_TOKEN"] == TOKEN


def test_dbos_config_starts_the_demo_and_takes_the_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dbos._dbos_config import load_config

    raw = (REPO / "dbos-config.yaml").read_text()
    start_lines = yaml.safe_load(raw)["runtimeConfig"]["start"]
    # The CLI empties every ${...} before the shell runs: no shell defaults in commands.
    assert start_lines == ["python fastapi_scope_shutdown.py"]
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DBOS_SYSTEM_DATABASE_URL", "postgresql://u:p@h:5432/d")
    config = load_config()
    assert config["name"] == "experiment6"  # CLI fallback: sqlite:///experiment6.sqlite
    assert config["system_database_url"] == "postgresql://u:p@h:5432/d"
    assert config["runtimeConfig"]["start"] == start_lines
    monkeypatch.delenv("DBOS_SYSTEM_DATABASE_URL")
    assert load_config()["system_database_url"] is None


# --- envrc-template --------------------------------------------------------------

# Read by a library rather than by our code; listed in envrc-template all the same.
LIBRARY_VARIABLES = {
    "AWS_ENDPOINT_URL": "boto3",
    "AWS_ACCESS_KEY_ID": "boto3",
    "AWS_SECRET_ACCESS_KEY": "boto3",
    "AWS_DEFAULT_REGION": "boto3",
}


# The operating system's, not configuration (tests pass PATH on to subprocesses).
OS_VARIABLES = {"PATH", "HOME", "USER", "TMPDIR", "LANG"}


def variables_read_by_code() -> dict[str, str]:
    """Variable -> first file reading it: os.environ.get/[]/setdefault/pop, os.getenv,
    ``"X" in os.environ``, ``*env*("X", ...)`` in *.py, and ${X} in the YAML files
    that tools expand."""
    found: dict[str, str] = {}

    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith(".") or rel.parts[0] in ("build", "node_modules"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = None
            if isinstance(node, ast.Call) and node.args:
                func = node.func
                called = getattr(func, "attr", getattr(func, "id", ""))
                if isinstance(func, ast.Attribute) and (
                    (func.attr in ("get", "setdefault", "pop") and is_environ(func.value))
                    or func.attr == "getenv"
                ):
                    name = node.args[0]
                # A wrapper such as _int_env("WORKERS", ...): an env-named function
                # whose first argument is an upper-case constant.
                elif "env" in called.lower() and isinstance(node.args[0], ast.Constant):
                    if re.fullmatch(r"[A-Z][A-Z0-9_]+", str(node.args[0].value)):
                        name = node.args[0]
            elif isinstance(node, ast.Subscript) and is_environ(node.value):
                if isinstance(node.ctx, ast.Load):
                    name = node.slice
            elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
                name = node.left
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                found.setdefault(name.value, str(rel))
    for file in ("dbos-config.yaml", "docker-compose.yml"):
        for line in (REPO / file).read_text().splitlines():
            if not line.lstrip().startswith("#"):
                for var in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", line):
                    found.setdefault(var, file)
    return {var: where for var, where in found.items() if var not in OS_VARIABLES}


def envrc_entries() -> dict[str, int]:
    """Variable -> line number of its ``export VAR=`` (active or commented out)."""
    lines = (REPO / "envrc-template").read_text().splitlines()
    entries = {}
    for number, line in enumerate(lines):
        match = re.match(r"#?\s*export ([A-Za-z_][A-Za-z0-9_]*)=", line)
        if match:
            above = lines[number - 1] if number else ""
            assert above.startswith("#") and "export" not in above, (
                f"envrc-template: {match[1]} needs a one-line comment above it"
            )
            entries[match[1]] = number + 1
    return entries


def test_envrc_template_lists_every_variable_the_code_reads() -> None:
    read = variables_read_by_code()
    # The scanner sees what it must (so an empty result cannot pass).
    assert {"DBOS_SYSTEM_DATABASE_URL", "PGHOST", "CREDENTIALS_SECRET"} <= set(read)
    listed = envrc_entries()
    missing = {var: where for var, where in read.items() if var not in listed}
    assert not missing, f"read by the code, absent from envrc-template: {missing}"
    stale = set(listed) - set(read) - set(LIBRARY_VARIABLES)
    assert not stale, f"in envrc-template, read by nothing: {stale}"


def test_envrc_template_is_a_valid_script_exporting_its_variables(tmp_path: Path) -> None:
    shutil.copy(REPO / "envrc-template", tmp_path / ".envrc")
    result = subprocess.run(
        ["bash", "-euc", "source .envrc && env -0"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    exported = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    active = [
        m[1] for m in re.finditer(r"^export (\w+)=", (REPO / "envrc-template").read_text(), re.M)
    ]
    assert active and all(var in exported for var in active)


# --- the image, replayed and run -------------------------------------------------


@pytest.fixture(scope="session")
def venvs() -> Iterator[ci.VenvCache]:
    base = ci.new_dir("exp6-venvs-")
    yield ci.VenvCache(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def build(venvs: ci.VenvCache) -> Iterator[Callable[..., ci.Image]]:
    """Build an image from a Dockerfile text (default: ours) and a context (default: REPO)."""
    dirs: list[Path] = []

    def _build(text: str | None = None, context: Path = REPO) -> ci.Image:
        dirs.append(ci.new_dir("exp6-image-"))
        return ci.build(text or DOCKERFILE.read_text(), context, dirs[-1], venvs)

    yield _build
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def fan_out_view(client: httpx.Client, workflow_id: str) -> dict[str, Any] | None:
    view = client.get(f"/workflows/{workflow_id}").json()
    return view if view["status"] in ("SUCCESS", "ERROR") else None


def test_image_serves_a_fan_out_on_postgres_passes_its_healthcheck_and_stops_on_sigterm(
    build: Callable[..., ci.Image], pg_url: str, tmp_path: Path
) -> None:
    image = build()
    assert sorted(image.copied) == [
        "app/common.py",
        "app/dbos-config.yaml",
        "app/fastapi_scope_shutdown.py",
        "app/requirements-runtime.txt",
    ]
    assert image.uid != 0 and image.exposed == ["8000"]
    assert image.cmd[:2] == ["uvicorn", "fastapi_scope_shutdown:app"]
    assert image.cmd[image.cmd.index("--host") + 1] == "0.0.0.0"
    assert image.cmd[image.cmd.index("--port") + 1] == "8000"
    # `python` in the container is the image's virtualenv, which holds the runtime only:
    # nothing leaks in from the test's environment (httpx, pytest).
    probe = "import sys, importlib.util as u; print(sys.prefix, u.find_spec('httpx') is None)"
    inside = subprocess.run(
        image.as_user(["python", "-c", probe]),
        env=image.run_env(),
        cwd=image.cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert inside.stdout.split() == [str(image.venv), "True"], inside.stderr

    port = free_port()
    server = image.server(port, tmp_path / "image.log", DBOS_SYSTEM_DATABASE_URL=pg_url)
    with server:
        if ci.switch_user():  # USER 10001: nothing in the container runs as root
            processes = ci.container_processes(server)
            assert len(processes) >= 2  # dumb-init and uvicorn
            assert {os.stat(f"/proc/{pid}").st_uid for pid in processes} == {image.uid}
        health = server.client.get("/healthz")
        assert health.status_code == 200
        assert (health.json()["status"], health.json()["database"]) == ("ok", "postgres")
        assert health.json()["executor_id"] == "shutdown-0"

        started = server.client.post("/trigger_async", params={"steps": 5, "max_n": 3})
        assert started.status_code == 202, started.text
        workflow_id = started.json()["workflow_id"]
        view = wait_for(lambda: fan_out_view(server.client, workflow_id), 60, 0.2, "fan-out")
        assert view["status"] == "SUCCESS"
        assert view["result"] == [0, 1, 1, 2, 2]  # fib(min(i, 3)) for i in 0..4
        assert view["progress"] == {"done": 5, "total": 5}
        rows = query(
            pg_url,
            "SELECT status, executor_id FROM dbos.workflow_status "
            "WHERE workflow_uuid = %s OR parent_workflow_id = %s",
            workflow_id,
            workflow_id,
        )
        assert sorted(rows) == [("SUCCESS", "shutdown-0")] * 6

        # HEALTHCHECK, as Docker runs it inside the container.
        check = image.run_healthcheck(port)
        assert check.returncode == 0, check.stderr
        # The DBOS CLI in the image finds its dbos-config.yaml and the database.
        cli = subprocess.run(
            image.as_user(["dbos", "workflow", "list", "--name", "fan_out"]),
            env=image.run_env(DBOS_SYSTEM_DATABASE_URL=pg_url),
            cwd=image.cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert workflow_id in cli.stdout, cli.stderr

        # docker stop: SIGTERM to the container's PID 1; uvicorn stops gracefully and
        # re-raises SIGTERM, which dumb-init reports as 128 + 15.
        code = ci.docker_stop(server, timeout=30)
        assert code in (0, 128 + signal.SIGTERM), server.log_text()[-2000:]
        assert port_closed(port)
        assert image.run_healthcheck(port).returncode != 0
    messages = [r.get("message") for r in server.records()]  # every line is JSON
    assert "DBOS successfully shut down" in " ".join(str(m) for m in messages)


def test_image_stops_on_both_kinds_of_shutdown_request(
    build: Callable[..., ci.Image], pg_url: str, tmp_path: Path
) -> None:
    """/shutdown from inside the container: mode=crash (SIGKILL, which the kernel
    would drop if uvicorn were PID 1) and mode=graceful (SIGTERM) both end it."""
    image = build()
    log = tmp_path / "image.log"
    env = {"DBOS_SYSTEM_DATABASE_URL": pg_url, "SHUTDOWN_TOKEN": TOKEN}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for mode, status in (("crash", 128 + signal.SIGKILL), ("graceful", 128 + signal.SIGTERM)):
        port = free_port()
        with image.server(port, log, **env) as server:
            answer = server.client.post("/shutdown", params={"mode": mode}, headers=auth)
            assert answer.status_code == 202, answer.text
            assert server.wait_exit(30) == status, mode
            assert port_closed(port)


def test_image_composes_its_database_url_from_the_pg_variables(
    build: Callable[..., ci.Image], pg_url: str, tmp_path: Path
) -> None:
    image = build()
    assert image.env["DBOS_SYSTEM_DATABASE_URL"] == ""
    url = make_url(pg_url)
    overrides = {  # docker run -e PGHOST=... -e PGPORT=...: no URL given
        "PGHOST": str(url.host),
        "PGPORT": str(url.port),
        "PGUSER": str(url.username),
        "PGDATABASE": str(url.database),
    }
    if url.password:
        overrides["PGPASSWORD"] = url.password
    with image.server(free_port(), tmp_path / "image.log", **overrides) as server:
        assert server.client.get("/healthz").json()["database"] == "postgres"
        # DBOS made its tables in that very database, which the fixture left empty.
        assert query(pg_url, "SELECT to_regclass('dbos.workflow_status') IS NOT NULL") == [(True,)]


def test_image_without_the_shared_module_does_not_start(
    build: Callable[..., ci.Image], pg_url: str, tmp_path: Path
) -> None:
    text = DOCKERFILE.read_text()
    mutated = re.sub(r"^(COPY .*) common\.py", r"\1", text, count=1, flags=re.M)
    assert mutated != text
    image = build(mutated)
    assert "app/common.py" not in image.copied
    server = image.server(free_port(), tmp_path / "image.log", DBOS_SYSTEM_DATABASE_URL=pg_url)
    with pytest.raises(AssertionError, match="server exited"):
        server.start(ready_timeout=60)
    server.close()
    assert "No module named 'common'" in server.log_text()


def test_image_without_a_runtime_package_does_not_start(
    build: Callable[..., ci.Image], pg_url: str, tmp_path: Path
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for name in [".dockerignore", *ci.context_files(REPO)]:
        shutil.copy(REPO / name, context / name)
    requirements = context / "requirements-runtime.txt"
    lines = requirements.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("psycopg2-binary==")]
    assert len(kept) == len(lines) - 1
    requirements.write_text("".join(kept))
    image = build(context=context)
    server = image.server(free_port(), tmp_path / "image.log", DBOS_SYSTEM_DATABASE_URL=pg_url)
    with pytest.raises(AssertionError, match="server exited"):
        server.start(ready_timeout=60)
    server.close()
    assert "No module named 'psycopg2'" in server.log_text()


def test_runtime_pins_install_from_wheels_on_the_images_python_3_12(tmp_path: Path) -> None:
    """The replay runs on this machine's Python; the image has 3.12 and no compiler.
    Both architectures python:3.12-slim ships (amd64, arm64), resolved at once."""
    runs = {}
    for arch in ("x86_64", "aarch64"):
        platforms = [f"manylinux_2_{v}_{arch}" for v in (17, 24, 28, 34, 36)]
        runs[arch] = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet"]
            + ["--ignore-installed", "--only-binary=:all:", "--python-version=3.12"]
            + ["--implementation=cp", "--abi=cp312"]
            + [f"--platform={p}" for p in [*platforms, f"manylinux2014_{arch}"]]
            + [f"--target={tmp_path / arch}", f"--report={tmp_path / f'{arch}.json'}"]
            + ["-r", str(REPO / "requirements-runtime.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    expected = pins(REPO / "requirements-runtime.txt")
    for arch, proc in runs.items():
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{arch}: {stderr[-3000:]}"
        report = json.loads((tmp_path / f"{arch}.json").read_text())
        resolved = {
            re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
            for i in report["install"]
        }
        assert {name: resolved.get(name) for name in RUNTIME} == expected, arch
