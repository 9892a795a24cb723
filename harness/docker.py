"""A real Docker engine for the tests: find it, build the project's image, run containers
on host networking, run docker-compose.yml, and clean up after them.

The engine is whatever ``docker`` reaches (``DOCKER_HOST``), prepared by the
repository's ``.ci/engine.sh``: an engine that already works (it pulls the base
images), or a private one with no bridge network and local stand-ins. Either way
every container here runs with ``--network host`` (or ``--network none``) and a
compose file is rewritten to host networking (:func:`host_network_compose`). No Docker network is
ever created. Secrets never reach a command line: ``-e NAME`` takes the value from
the environment of the ``docker`` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from harness import REPO
from harness.proc import wait_for

BASE_IMAGE = "python:3.12-slim"
ENGINE_SCRIPT = ".ci/engine.sh"  # relative to the repository (REPO)
# Every container and compose project a test session starts carries this label, with
# the session's id as its value: cleanup removes its own, never another session's.
LABEL = "experiment6.test"
SESSION = uuid.uuid4().hex[:10]


class DockerError(AssertionError):
    """A docker command failed; the message has its output."""


def docker_cli() -> str | None:
    return shutil.which("docker")


def engine_problem() -> str | None:
    """None when a Docker engine answers and has the base image; else why not."""
    cli = docker_cli()
    if cli is None:
        return "no docker CLI on PATH (Debian: docker.io)"
    where = "DOCKER_HOST"  # the docker CLI reads it; unset: the default socket
    try:
        probe = subprocess.run(
            [cli, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return f"the Docker engine at {where} did not answer within 30 s"
    if probe.returncode != 0:
        return (
            f"no Docker engine at {where} ({probe.stderr.strip()[:200]}); prepare one: "
            f'`{ENGINE_SCRIPT} base && {ENGINE_SCRIPT} postgres; eval "$({ENGINE_SCRIPT} env)"`'
        )
    # Never a pull from a test: the engine script decides whether a registry is there.
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        return missing_image(BASE_IMAGE, "base")
    return None


def missing_image(image: str, engine_step: str) -> str:
    return (
        f"the engine has no {image} image: `{ENGINE_SCRIPT} {engine_step}` (pulls it, or "
        f"builds a stand-in where no registry is reachable)"
    )


def docker(
    *args: str,
    timeout: float = 120,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``docker ARGS``; ``env`` adds variables to its environment (for ``-e NAME``)."""
    cli = docker_cli()
    assert cli is not None, "no docker CLI"
    result = subprocess.run(
        [cli, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=input,
    )
    if check and result.returncode != 0:
        raise DockerError(
            f"docker {' '.join(args[:3])} ... exited {result.returncode}:\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    return result


def image_tag(context: Path = REPO) -> str:
    """The test image's tag: one per checkout, so checkouts sharing an engine do not
    overwrite each other's image (and each keeps its layer cache warm)."""
    return f"experiment6-test:{hashlib.sha256(str(context.resolve()).encode()).hexdigest()[:12]}"


def build_image(tag: str, context: Path = REPO, log: Path | None = None) -> str:
    """``docker build --network host -t TAG CONTEXT`` with the context's own Dockerfile,
    unmodified; returns the image id. The output goes to ``log``."""
    previous = docker("image", "inspect", "-f", "{{.Id}}", tag, check=False).stdout.strip()
    result = docker("build", "--network", "host", "-t", tag, str(context), timeout=900, check=False)
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise DockerError(f"docker build failed:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}")
    built = docker("image", "inspect", "-f", "{{.Id}}", tag).stdout.strip()
    if previous and previous != built:  # this tag's previous build: gone if now untagged
        tags = docker("image", "inspect", "-f", "{{len .RepoTags}}", previous, check=False)
        if tags.stdout.strip() == "0":
            docker("image", "rm", previous, check=False)
    return built


def image_config(tag: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(docker("image", "inspect", tag).stdout)[0]["Config"]
    return config


def context_files(context: Path, tag: str) -> list[str]:
    """Every file of the build context of ``context`` as Docker sends it (after
    .dockerignore): a throwaway image copies the whole context, then lists it."""
    dockerfile = f"FROM {BASE_IMAGE}\nCOPY . /context/\n"
    docker("build", "--network", "none", "-f", "-", "-t", tag, str(context), input=dockerfile)
    try:
        listing = docker(
            "run", "--rm", "--network", "none", "--entrypoint", "find", tag,
            "/context", "-type", "f",
        ).stdout  # fmt: skip
    finally:
        docker("image", "rm", "-f", tag, check=False)
    return sorted(line.removeprefix("/context/") for line in listing.split())


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5
) -> Any:
    """``harness.proc.wait_for`` at the pace of ``docker`` commands (every 0.5 s)."""
    return wait_for(predicate, timeout, interval=interval, what=what)


# --- containers -------------------------------------------------------------------


def ledger_volume(directory: Path) -> tuple[dict[str, str], list[str]]:
    """A step-body ledger (the demo's FIB_LEDGER) that containers share with the test,
    at ``directory / "runs.txt"`` on the host: the environment and ``docker run``
    options that mount it. The image's user (not root) must be able to append."""
    directory.mkdir()
    os.chmod(directory, 0o777)
    return {"FIB_LEDGER": "/ledger/runs.txt"}, ["--volume", f"{directory}:/ledger"]


@dataclass
class Container:
    """A container of the project's image on host networking, serving on ``port``."""

    image: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    options: list[str] = field(default_factory=list)
    name: str = field(default_factory=lambda: f"exp6-{SESSION}-{uuid.uuid4().hex[:8]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Container:
        """``docker run -d --network host``, listening on 127.0.0.1 only (HOST): host
        networking shares the machine's interfaces, and the tests need loopback alone."""
        env = {"HOST": "127.0.0.1", "PORT": str(self.port), **self.env}
        flags = [x for name in env for x in ("-e", name)]
        docker(
            "run", "-d", "--name", self.name, "--label", f"{LABEL}={SESSION}",
            "--network", "host", *flags, *self.options, self.image,
            env=env,
        )  # fmt: skip
        return self

    def inspect(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(docker("inspect", self.name).stdout)[0]
        return data

    def health(self) -> str | None:
        """starting / healthy / unhealthy (None: the image has no HEALTHCHECK)."""
        health = self.inspect()["State"].get("Health")
        return health["Status"] if health else None

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def wait_health(self, status: str, timeout: float) -> None:
        def reached() -> bool:
            state = self.inspect()["State"]
            if not state["Running"]:
                raise AssertionError(
                    f"{self.name} exited {state['ExitCode']} while waiting for {status}:\n"
                    f"{self.logs()[-3000:]}"
                )
            return bool(state.get("Health", {}).get("Status") == status)

        wait_until(reached, timeout, f"{self.name} to turn {status}")

    def healthz(self) -> dict[str, Any] | None:
        """/healthz's body when it answers 200; None while it answers otherwise or does
        not listen yet."""
        try:
            answer = httpx.get(f"{self.url}/healthz", timeout=10)
        except httpx.TransportError:
            return None
        if answer.status_code != 200:
            return None
        body: dict[str, Any] = answer.json()
        return body

    def wait_serving(self, timeout: float = 180, interval: float = 0.5) -> dict[str, Any]:
        """/healthz's body once it answers 200; an ``AssertionError`` with the logs as
        soon as the container has exited (it will never answer), or after ``timeout``."""

        def serving() -> dict[str, Any] | None:
            if not self.running():
                raise AssertionError(f"{self.name} exited:\n{self.logs()[-3000:]}")
            return self.healthz()

        body: dict[str, Any] = wait_until(serving, timeout, f"{self.name} to serve", interval)
        return body

    def wait_exit(self, timeout: float) -> int:
        """The exit status once the container has stopped (``docker wait``)."""
        return int(docker("wait", self.name, timeout=timeout).stdout.strip())

    def stop(self, grace: int = 10, timeout: float = 120) -> tuple[int, float]:
        """``docker stop -t GRACE``: SIGTERM to PID 1, SIGKILL after GRACE seconds.
        Returns the exit status and how long the stop took."""
        started = time.monotonic()
        docker("stop", "-t", str(grace), self.name, timeout=timeout)
        took = time.monotonic() - started
        return self.wait_exit(30), took

    def exec(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *cmd, timeout=timeout, check=False)

    def logs(self) -> str:
        """Everything the container wrote (stdout, then stderr)."""
        result = docker("logs", self.name, check=False, timeout=60)
        return result.stdout + result.stderr

    def processes(self) -> list[dict[str, str]]:
        """Every process of the container (``docker top``): uid, pid, ppid, command."""
        out = docker("top", self.name, "-eo", "uid,pid,ppid,args").stdout.splitlines()
        rows = []
        for line in out[1:]:
            uid, pid, ppid, args = line.split(None, 3)
            rows.append({"uid": uid, "pid": pid, "ppid": ppid, "args": args})
        return rows

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.name, check=False, timeout=120)

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def remove_session_containers() -> None:
    """Remove every container this test session started (and left behind)."""
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}={SESSION}", check=False).stdout.split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False, timeout=120)


# --- docker-compose.yml on host networking ------------------------------------------


def compose_cli() -> list[str] | None:
    """docker-compose (v1, Debian's) or the ``docker compose`` plugin, if any."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if docker_cli() and docker("compose", "version", check=False, timeout=30).returncode == 0:
        return ["docker", "compose"]
    return None


def _with_port(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def host_network_compose(
    compose: dict[str, Any], image: str, app_port: int, pg_port: int
) -> dict[str, Any]:
    """docker-compose.yml as it must run on an engine without bridge networks.

    docker-compose v1 cannot drop ``ports:`` in an override file, so this is a copy of
    the real file with only what host networking forces changed: every service gets
    ``network_mode: host`` and loses ``ports:`` (nothing to publish); Postgres listens
    on 127.0.0.1:``pg_port``, the app on 127.0.0.1:``app_port``, and the app reaches the
    service name ``postgres`` through an /etc/hosts entry. The app runs ``image`` (the
    test session's build of the same Dockerfile) instead of building it again.
    Everything else (environment, healthchecks, depends_on, volumes) is the file's.
    """
    variant: dict[str, Any] = json.loads(json.dumps(compose))  # a deep copy
    services = variant["services"]
    for service in services.values():
        service.pop("ports", None)
        service["network_mode"] = "host"
    pg, app = services["postgres"], services["app"]
    pg.setdefault("environment", {})["PGPORT"] = str(pg_port)  # pg_isready reads it too
    pg["command"] = ["postgres", "-c", "listen_addresses=127.0.0.1", "-c", f"port={pg_port}"]
    app.pop("build", None)
    app["image"] = image
    app.setdefault("extra_hosts", []).append("postgres:127.0.0.1")
    env = app.setdefault("environment", {})
    env["DBOS_SYSTEM_DATABASE_URL"] = _with_port(
        env["DBOS_SYSTEM_DATABASE_URL"], "postgres", pg_port
    )
    env.update(HOST="127.0.0.1", PORT=str(app_port))
    for name, service in services.items():
        assert "networks" not in service, f"{name}: host networking only"
    assert not variant.get("networks"), "a compose file here must define no networks"
    return variant


@dataclass
class ComposeProject:
    """``docker-compose -p NAME -f FILE``: up, exec, down -v."""

    file: Path
    env: dict[str, str] = field(default_factory=dict)
    name: str = field(default_factory=lambda: f"exp6test{SESSION}{uuid.uuid4().hex[:6]}")

    def run(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cli = compose_cli()
        assert cli is not None, "no docker compose CLI"
        result = subprocess.run(
            [*cli, "--project-name", self.name, "--file", str(self.file), *args],
            cwd=self.file.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env},
        )
        if check and result.returncode != 0:
            raise DockerError(
                f"compose {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
        return result

    def container(self, service: str) -> str:
        ids = self.run("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def health(self, service: str) -> str | None:
        state = json.loads(docker("inspect", self.container(service)).stdout)[0]["State"]
        return state["Health"]["Status"] if state.get("Health") else None

    def down(self) -> None:
        self.run("down", "--volumes", "--timeout", "10", check=False)


@contextmanager
def networks_unchanged() -> Iterator[None]:
    """Fail if the engine gained a network meanwhile (none may ever be created here)."""
    before = set(docker("network", "ls", "-q").stdout.split())
    yield
    after = set(docker("network", "ls", "-q").stdout.split())
    assert after == before, f"a Docker network was created: {sorted(after - before)}"


def lock_pins(path: Path, environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """name -> version of every entry of a requirements lock whose environment marker
    holds in ``environment`` (default: this interpreter's); hashes are ignored."""
    from packaging.requirements import Requirement

    pins = {}
    text = path.read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = re.sub(r"\s--hash=\S+", "", raw.split("#", 1)[0]).strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: not pinned: {line}"
        if req.marker is None or req.marker.evaluate(dict(environment) if environment else None):
            pins[normalize(req.name)] = specs[0].version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
