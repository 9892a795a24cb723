"""Replay a Dockerfile without a Docker engine (support for tests/test_container.py).

``build(dockerfile_text, context, dest, venvs)`` walks the Dockerfile with
dockerfile-parse and produces an :class:`Image`:

- a directory holding *only* what the ``COPY`` lines copy (from a build context
  filtered by ``.dockerignore``), laid out under the ``WORKDIR``;
- a fresh virtualenv holding *only* what ``RUN pip install`` installs;
- the ``ENV``, ``USER``, ``EXPOSE``, ``HEALTHCHECK``, ``ENTRYPOINT`` and ``CMD`` it
  declares.

:meth:`Image.server` then runs ``ENTRYPOINT`` + ``CMD`` from that directory, with
that virtualenv first on ``PATH`` and that environment; when the tests run as root,
also with that user id and as PID 1 of a new PID namespace (``unshare``), which is
how the kernel sees a container's first process.
Anything the replay does not understand (``ADD``, a shell-form ``ENTRYPOINT``,
multi-stage builds, an unknown ``RUN`` command) raises :class:`Unsupported`, so a new
Dockerfile line can never be skipped silently.

Differences from a real build, on purpose: the host's Python (3.11 here) stands in
for the image's (tests/test_container.py checks separately that the pins install from
wheels on CPython 3.12); ``--no-cache-dir`` is dropped (it only decides whether
pip's download cache lands in the image layer) and pip does not byte-compile;
``groupadd``/``useradd`` are not run (the ids they create are recorded and used
for ``USER``).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dockerfile_parse import DockerfileParser

from harness.server import AppServer

# What python:3.12-slim sets before our ENV lines. Its PATH starts with /usr/local/bin,
# where its python, pip and everything pip installs live: here the virtualenv's bin
# takes that place (this machine's /usr/local/bin is left out: it is not the image's).
BASE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BASE_ENV = {"LANG": "C.UTF-8"}
SETPRIV, UNSHARE = shutil.which("setpriv"), shutil.which("unshare")


class Unsupported(Exception):
    """A Dockerfile construct this replay cannot reproduce faithfully."""


# --- .dockerignore ------------------------------------------------------------


def read_dockerignore(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.exists():
        return []
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line)
    return patterns


def ignored(rel_path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``rel_path`` out of the build context.

    Last matching pattern wins; ``!`` re-includes; a pattern matching a directory
    excludes everything below it. ``fnmatch``'s ``*`` also crosses ``/``, which is
    looser than Docker's: it can only make a COPY source look excluded (a false
    failure), never smuggle an excluded file into the image.
    """
    parts = PurePosixPath(rel_path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = os.path.normpath(pattern.lstrip("/")).replace("**/", "*").replace("/**", "/*")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            result = not negate
    return result


def context_files(context: Path) -> list[str]:
    """Every file of the build context that .dockerignore lets through."""
    patterns = read_dockerignore(context)
    negations = [p[1:].lstrip("/") for p in patterns if p.startswith("!")]
    files = []
    for top, dirs, names in os.walk(context):
        base = Path(top).relative_to(context).as_posix()
        prefix = "" if base == "." else f"{base}/"
        # Skip an excluded directory (.git, .venv) unless a "!" pattern reaches inside it.
        dirs[:] = [
            d
            for d in dirs
            if not ignored(prefix + d, patterns)
            or any(n.startswith(f"{prefix}{d}/") for n in negations)
        ]
        files += [prefix + n for n in names if not ignored(prefix + n, patterns)]
    return sorted(files)


# --- the image ------------------------------------------------------------------


@dataclass
class Image:
    root: Path
    base: str = ""
    workdir: str = "/"
    venv: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    uid: int = 0
    gid: int = 0
    exposed: list[str] = field(default_factory=list)
    healthcheck: list[str] | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    pip_installs: list[list[str]] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # image paths, relative to root

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    @property
    def cwd(self) -> Path:
        return self.path(self.workdir)

    def run_env(self, **overrides: str) -> dict[str, str]:
        """What a process in the container sees (plus ``docker run -e`` overrides)."""
        assert self.venv is not None, "the Dockerfile installs nothing"
        env = {
            **BASE_ENV,
            "PATH": f"{self.venv / 'bin'}:{BASE_PATH}",
            "HOME": str(self.path("/home/app")),  # as useradd --no-create-home: absent
            "HOSTNAME": "experiment6-test",
        }
        env.update(self.env)
        env.update(overrides)
        return env

    def as_user(self, argv: list[str]) -> list[str]:
        """``argv`` run with the image's user id (when we are root and can)."""
        if not switch_user() or self.uid == 0:
            return argv
        return [
            str(SETPRIV),
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--",
            *argv,
        ]

    def command(self, port: int) -> list[str]:
        """ENTRYPOINT + CMD, with CMD's port swapped for ``port`` and its host for
        loopback; as PID 1 of a new PID namespace when we may create one (root), so
        the kernel treats it as it treats a container's first process."""
        argv = self.as_user([*self.entrypoint, *_swap_host_port(self.cmd, port)])
        if pid_namespaces():
            argv = [str(UNSHARE), "--pid", "--fork", "--mount-proc", "--kill-child", *argv]
        return argv

    def server(self, port: int, log_path: Path, **env_overrides: str) -> AppServer:
        return AppServer(
            "CMD",
            env=self.run_env(**env_overrides),
            log_path=log_path,
            port=port,
            command=self.command(port),
            cwd=self.cwd,
        )

    def run_healthcheck(self, port: int, **env_overrides: str) -> subprocess.CompletedProcess[str]:
        assert self.healthcheck, "the Dockerfile has no HEALTHCHECK"
        exposed = self.exposed[0].split("/")[0]
        argv = [a.replace(f":{exposed}/", f":{port}/") for a in self.healthcheck]
        if argv == self.healthcheck:
            raise Unsupported(f"HEALTHCHECK does not name the exposed port {exposed}")
        return subprocess.run(
            self.as_user(argv),
            env=self.run_env(**env_overrides),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )


def _world_executable(path: str) -> bool:
    """Whether any user can run ``path`` (every directory on the way searchable)."""
    real = Path(os.path.realpath(path))
    if not real.is_file() or not real.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in real.parents)


@functools.cache
def base_python() -> str:
    """The interpreter the image's virtualenv is made from.

    The image's user must be able to run it and its library, so this one's base
    (e.g. under a private /root/.pyenv) may not do: then the system's python3.
    """
    candidates = [getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3"]
    for candidate in candidates:
        if _world_executable(candidate) and "/root/" not in os.path.realpath(candidate):
            return candidate
    return sys.executable


@functools.cache
def switch_user() -> bool:
    """Run as the image's user: needs root, setpriv and an interpreter it may run."""
    return os.geteuid() == 0 and SETPRIV is not None and base_python() != sys.executable


@functools.cache
def pid_namespaces() -> bool:
    if os.geteuid() != 0 or UNSHARE is None:
        return False
    probe = [UNSHARE, "--pid", "--fork", "--mount-proc", "--kill-child", "true"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def container_pid(server: AppServer) -> int:
    """Host pid of the container's PID 1 (the child of ``unshare``, when used)."""
    assert server.proc is not None
    if not pid_namespaces():
        return server.proc.pid
    with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    assert len(children) == 1, children
    return children[0]


def container_processes(server: AppServer) -> list[int]:
    """PID 1 of the container and every process below it."""
    pids = [container_pid(server)]
    for pid in pids:  # grows while we walk it
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(child) for child in f.read().split()]
    return pids


def docker_stop(server: AppServer, timeout: float) -> int:
    """SIGTERM to the container's PID 1; its exit status once it has exited."""
    assert server.proc is not None
    os.kill(container_pid(server), signal.SIGTERM)
    return server.proc.wait(timeout=timeout)


def _swap_host_port(cmd: list[str], port: int) -> list[str]:
    out = list(cmd)
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        if flag not in out:
            raise Unsupported(f"CMD has no {flag} to point at the test's address: {cmd}")
        out[out.index(flag) + 1] = value
    return out


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        parsed = json.loads(value)
        assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
        return parsed
    return ["/bin/sh", "-c", value]


# --- the build ----------------------------------------------------------------


class VenvCache:
    """Virtualenvs keyed by what was installed into them, shared by a test session."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.built: dict[str, Path] = {}

    def get(self, key: str, installs: list[list[str]], env: dict[str, str]) -> Path:
        if key in self.built:
            return self.built[key]
        venv = self.base / f"venv-{key[:12]}"
        # Without pip of its own: this process's pip installs into it (--python), which
        # saves seeding every virtualenv with pip; --no-compile skips byte-compiling,
        # which changes nothing the app can observe.
        subprocess.run(
            [base_python(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
        )
        for args in installs:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
                + ["install", "--quiet", "--no-compile", *args],
                env={**env, "PATH": f"{venv / 'bin'}:{BASE_PATH}"},
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise AssertionError(f"RUN pip install {args} failed:\n{proc.stderr[-3000:]}")
        self.built[key] = venv
        return venv


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def build(dockerfile_text: str, context: Path, dest: Path, venvs: VenvCache | None) -> Image:
    """Replay ``dockerfile_text`` on ``context``; the image filesystem goes to ``dest``.

    Without ``venvs`` nothing is installed: ``image.pip_installs`` says what would be.
    """
    parser = DockerfileParser(fileobj=io.BytesIO(dockerfile_text.encode()))
    root = dest / "rootfs"
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    image = Image(root=root)
    allowed = set(context_files(context))
    users: dict[str, int] = {}
    groups: dict[str, int] = {}
    run_key = hashlib.sha256()

    for item, ctx in zip(parser.structure, parser.context_structure, strict=True):
        instruction, value = item["instruction"], item["value"]
        if instruction == "COMMENT":
            continue
        if instruction == "FROM":
            if image.base:
                raise Unsupported("multi-stage builds")
            image.base = value
        elif instruction == "WORKDIR":
            image.workdir = str(PurePosixPath(image.workdir) / value)
            image.cwd.mkdir(parents=True, exist_ok=True)
            os.chmod(image.cwd, 0o755)
        elif instruction == "COPY":
            _copy(image, value, context, allowed)
        elif instruction == "ENV":
            image.env = dict(ctx.envs)
        elif instruction == "RUN":
            for args in _run(image, value, users, groups):
                image.pip_installs.append(args)
            run_key.update(value.encode())
            run_key.update(_tree_digest(root).encode())
        elif instruction == "USER":
            name, _, group = value.partition(":")
            image.user = value
            image.uid = int(name) if name.isdigit() else users[name]
            image.gid = int(group) if group.isdigit() else groups.get(group or name, image.uid)
        elif instruction == "EXPOSE":
            image.exposed.extend(value.split())
        elif instruction == "HEALTHCHECK":
            tokens = value.split(None, 1)
            while tokens and tokens[0].startswith("--"):
                tokens = tokens[1].split(None, 1)
            if tokens[0] == "NONE":
                image.healthcheck = None
            else:
                assert tokens[0] == "CMD", f"HEALTHCHECK {value}"
                image.healthcheck = _exec_form(tokens[1])
        elif instruction == "CMD":
            image.cmd = _exec_form(value)
        elif instruction == "ENTRYPOINT":
            if not value.strip().startswith("["):
                raise Unsupported("ENTRYPOINT in shell form (it ignores CMD)")
            image.entrypoint = _exec_form(value)
        elif instruction in ("LABEL", "STOPSIGNAL"):
            pass  # metadata: nothing to replay
        else:
            raise Unsupported(f"{instruction} {value}")

    if image.pip_installs and venvs is not None:
        env = {**BASE_ENV, "HOME": str(dest), **image.env}
        image.venv = venvs.get(run_key.hexdigest(), image.pip_installs, env)
    return image


def _copy(image: Image, value: str, context: Path, allowed: set[str]) -> None:
    args = shlex.split(value)
    flags = [a for a in args if a.startswith("--")]
    owner = None
    for flag in flags:
        name, _, setting = flag.partition("=")
        if name != "--chown" or not re.fullmatch(r"\d+(:\d+)?", setting):
            raise Unsupported(f"COPY {flag} (numeric --chown only)")
        uid, _, gid = setting.partition(":")
        owner = (int(uid), int(gid or uid))
    operands = [a for a in args if not a.startswith("--")]
    if value.strip().startswith("["):
        operands = json.loads(value)
    *sources, target = operands
    dest = PurePosixPath(image.workdir) / target
    for source in sources:
        whole = source.rstrip("/") in (".", "")
        source = source.rstrip("/")
        matches = sorted(
            f
            for f in allowed
            if whole or fnmatch.fnmatchcase(f, source) or f.startswith(f"{source}/")
        )
        if not matches:
            raise AssertionError(
                f"COPY {source}: not in the build context (missing, or excluded by .dockerignore)"
            )
        for rel in matches:
            into_dir = (
                target.endswith("/")
                or len(sources) > 1
                or rel != source
                or image.path(str(dest)).is_dir()
            )
            if whole:
                relative = rel
            elif rel.startswith(f"{source}/"):
                relative = rel[len(source) + 1 :]
            else:
                relative = Path(rel).name
            out = image.path(str(dest / relative if into_dir else dest))
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(context / rel, out)
            os.chmod(out, 0o644)
            if owner and os.geteuid() == 0:
                os.chown(out, *owner)
            image.copied.append(str(out.relative_to(image.root)))


def _run(
    image: Image, value: str, users: dict[str, int], groups: dict[str, int]
) -> list[list[str]]:
    """The pip installs of one RUN line; record users and groups; refuse anything else."""
    installs = []
    for command in value.split("&&"):
        argv = shlex.split(command)
        if argv[:2] == ["pip", "install"] or argv[:4] == ["python", "-m", "pip", "install"]:
            rest = argv[2:] if argv[0] == "pip" else argv[4:]
            installs.append(_pip_args(image, rest))
        elif argv and argv[0] in ("groupadd", "useradd"):
            ids = {"groupadd": ("--gid", "-g"), "useradd": ("--uid", "-u")}[argv[0]]
            number = next(int(argv[i + 1]) for i, a in enumerate(argv) if a in ids)
            (groups if argv[0] == "groupadd" else users)[argv[-1]] = number
            if argv[0] == "useradd" and "--gid" in argv:
                gid = argv[argv.index("--gid") + 1]
                groups.setdefault(argv[-1], int(gid) if gid.isdigit() else groups[gid])
        else:
            raise Unsupported(
                f"RUN {command.strip()!r}: teach tests/container_image.py to replay it"
            )
    return installs


def _pip_args(image: Image, args: list[str]) -> list[str]:
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--no-cache-dir":
            pass  # only decides whether pip's download cache stays in the layer
        elif arg in ("-r", "--requirement"):
            requirement = image.path(str(PurePosixPath(image.workdir) / args[i + 1]))
            if not requirement.exists():
                raise AssertionError(f"RUN pip install -r {args[i + 1]}: not copied into the image")
            out += ["-r", str(requirement)]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def new_dir(prefix: str) -> Path:
    """A directory any user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path
