"""The Dockerfile, the locks and the files around the image, checked without an engine.

- hadolint finds nothing in the Dockerfile;
- one lock for what ships: requirements-service.txt (what the demo imports) is generated
  (uv, hashes) from requirements-service.in by the command in its header and is
  current, as are the runtime and dev locks built on it; the locks agree on every
  version they share, so the test environment has exactly the image's versions
  (tests/test_container_engine.py checks the image itself); the Dockerfile installs
  the service lock and nothing else; the pins install from wheels on CPython 3.12,
  amd64 and arm64;
- docker-compose.yml, dbos-config.yaml and envrc-template agree with the code.

The image itself, built and run on a real engine: tests/test_container_engine.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from sqlalchemy.engine import make_url

from harness import REPO
from harness.docker import ENGINE_SCRIPT, compose_cli, lock_pins, normalize

DOCKERFILE = REPO / "Dockerfile"
SERVICE_LOCK = REPO / "requirements-service.txt"
RUNTIME_LOCK = REPO / "requirements-runtime.txt"
DEV_LOCK = REPO / "requirements-dev.txt"
BIN = Path(sys.executable).parent
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


# --- one lock for what ships ----------------------------------------------------------


def direct(path: Path) -> dict[str, str]:
    """name -> pinned version of each requirement of a .in file (all must be ==)."""
    found = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==(\S+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        found[normalize(match[1])] = match[3]
    return found


def test_requirements_txt_is_the_two_locks() -> None:
    lines = [
        line
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == ["-r requirements-runtime.txt", "-r requirements-dev.txt"]


LOCKS = ["requirements-service", "requirements-runtime", "requirements-dev"]


def requirements_of(path: Path) -> dict[str, str]:
    """``direct`` of a .in file and of every .in file it includes with ``-r``."""
    found = {}
    for line in path.read_text().splitlines():
        if line.startswith("-r "):
            found.update(requirements_of(path.parent / line.split()[1]))
    return {**found, **direct(path)}


@pytest.mark.parametrize("name", LOCKS)
def test_each_lock_pins_its_direct_requirements_and_everything_below_them(name: str) -> None:
    lock = REPO / f"{name}.txt"
    text = lock.read_text()
    # Every entry carries hashes (pip then refuses any file whose hash differs).
    entries = [line for line in text.replace("\\\n", " ").splitlines() if "==" in line]
    assert entries and all(
        re.match(r"[A-Za-z0-9._-]+==", e) and "--hash=sha256:" in e for e in entries
    ), entries
    pins = lock_pins(lock)
    wanted = requirements_of(REPO / f"{name}.in")
    assert {n: pins.get(n) for n in wanted} == wanted
    if name != "requirements-dev":
        assert len(pins) > 2 * len(wanted)  # transitive ones too
        assert {"python-dateutil", "starlette", "pydantic", "sqlalchemy", "pyyaml"} <= set(pins)
    if name == "requirements-runtime":  # the service set, and integration.py's S3
        assert set(requirements_of(REPO / "requirements-service.in")) < set(wanted)


def test_the_service_lock_holds_nothing_of_the_other_experiments() -> None:
    service = lock_pins(SERVICE_LOCK)
    assert {"dbos", "fastapi", "uvicorn", "dumb-init", "psutil"} <= set(service)
    assert not {"boto3", "botocore", "moto", "werkzeug", "flask", "cryptography"} & set(service)


def test_the_locks_agree_on_every_package_they_share() -> None:
    service, runtime, dev = (lock_pins(REPO / f"{name}.txt") for name in LOCKS)
    # The runtime lock holds the whole service lock, at its versions (what the image
    # ships is what the tests ran).
    assert {n: runtime.get(n) for n in service} == service
    shared = set(runtime) & set(dev)
    assert shared  # httpx and schemathesis share anyio, idna, ... with the runtime
    assert {n: dev[n] for n in shared} == {n: runtime[n] for n in shared}


def test_the_test_environment_has_exactly_the_locked_versions() -> None:
    installed = {normalize(d.metadata["Name"]): d.version for d in distributions()}
    locked = {**lock_pins(DEV_LOCK), **lock_pins(RUNTIME_LOCK)}
    assert {n: installed.get(n) for n in locked} == locked
    # Nothing else, but pip itself (and what a developer installed by hand, outside CI).
    extra = set(installed) - set(locked) - {"pip"}
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        assert not extra, f"installed but in no lock: {sorted(extra)}"


@pytest.mark.parametrize("name", LOCKS)
def test_each_lock_is_what_its_header_command_generates(name: str, tmp_path: Path) -> None:
    """Regenerated by the command in its header, the lock does not change (uv keeps the
    pins of an existing output file unless the .in file asks otherwise): nobody edited
    a .in file without regenerating, or edited the lock by hand."""
    lock = (REPO / f"{name}.txt").read_text()
    command = lock.splitlines()[1].lstrip("# ").split()
    assert command[:3] == ["uv", "pip", "compile"] and f"{name}.in" in command
    assert {"--universal", "--generate-hashes", "--fork-strategy"} <= set(command)
    for file in REPO.glob("requirements-*.*"):  # the lock and what its .in file includes
        shutil.copy(file, tmp_path / file.name)
    uv = shutil.which("uv", path=str(BIN)) or shutil.which("uv")
    assert uv, "uv (requirements-dev.in) is not installed"
    result = subprocess.run(
        [uv, *command[1:], "--quiet", "--no-progress", "--native-tls"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / f"{name}.txt").read_text() == lock, f"{name}.txt is stale: regenerate it"


def test_the_dockerfile_installs_the_service_lock_and_nothing_else() -> None:
    parser = DockerfileParser(path=str(DOCKERFILE))
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    installs = [cmd for run in runs for cmd in run.split("&&") if "pip install" in cmd]
    assert [i.split() for i in installs] == [
        ["pip", "install", "--no-cache-dir", "--require-hashes", "-r", "requirements-service.txt"]
    ]
    assert parser.baseimage == "python:3.12-slim"
    # uid 10001 lies above SYS_UID_MAX: `useradd --system` would warn about it.
    (useradd,) = [cmd.split() for run in runs for cmd in run.split("&&") if "useradd" in cmd]
    assert "--uid" in useradd and "--system" not in useradd and "--create-home" in useradd


@pytest.mark.slow
def test_service_lock_installs_from_wheels_on_the_images_python_3_12(tmp_path: Path) -> None:
    """The image has CPython 3.12 and no compiler. Both architectures python:3.12-slim
    ships (amd64, arm64) resolve the lock to wheels alone, at its versions."""
    runs = {}
    for arch in ("x86_64", "aarch64"):
        platforms = [f"manylinux_2_{v}_{arch}" for v in (17, 24, 28, 34, 36)]
        runs[arch] = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet"]
            + ["--ignore-installed", "--only-binary=:all:", "--python-version=3.12"]
            + ["--implementation=cp", "--abi=cp312", "--abi=abi3", "--abi=none"]
            + [f"--platform={p}" for p in [*platforms, f"manylinux2014_{arch}", "any"]]
            + [f"--target={tmp_path / arch}", f"--report={tmp_path / f'{arch}.json'}"]
            + ["--require-hashes", "-r", str(SERVICE_LOCK)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    for arch, proc in runs.items():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{arch}: {stderr[-3000:]}"
        report = json.loads((tmp_path / f"{arch}.json").read_text())
        resolved = {
            normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]
        }
        environment = {
            "python_version": "3.12",
            "python_full_version": "3.12.0",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "sys_platform": "linux",
            "platform_machine": arch,
            "os_name": "posix",
        }
        assert resolved == lock_pins(SERVICE_LOCK, environment), arch


# --- CI uses only what the repository holds --------------------------------------


def test_ci_and_the_harness_name_only_the_repositorys_engine_script() -> None:
    run = (REPO / ".ci" / "run").read_text()
    assert (REPO / ENGINE_SCRIPT).is_file() and f"ENGINE_SH={ENGINE_SCRIPT}" in run
    for path in (REPO / ".ci" / "run", REPO / ENGINE_SCRIPT, REPO / "harness" / "docker.py"):
        assert not re.search(r"\.\./\w", path.read_text()), f"{path.name} reaches outside"


def engine(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The engine script with only PATH and ``env`` (no DOCKER_HOST unless given)."""
    return subprocess.run(
        ["bash", str(REPO / ENGINE_SCRIPT), *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_engine_script_chooses_its_private_engine_when_none_answers(tmp_path: Path) -> None:
    nowhere = f"unix://{tmp_path}/none.sock"
    own = f"export DOCKER_HOST=unix://{tmp_path}/state/docker.sock"
    assert engine("env", STATE=f"{tmp_path}/state", DOCKER_HOST=nowhere).stdout.strip() == own
    forced = engine("daemon", ENGINE="existing", STATE=f"{tmp_path}/state", DOCKER_HOST=nowhere)
    assert forced.returncode == 1 and f"no Docker engine answers at {nowhere}" in forced.stderr
    bad = engine("env", ENGINE="bogus", STATE=f"{tmp_path}/state")
    assert bad.returncode == 2 and "ENGINE must be" in bad.stderr


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
