#!/usr/bin/env bash
# engine.sh: the Docker engine for this project's container tests (.ci/run and
# harness/docker.py use it; nothing outside the repository is needed).
#
# Two cases, decided once per call (ENGINE=auto, the default):
#  - a working engine already answers (DOCKER_HOST, else /var/run/docker.sock) and is
#    not one this script started: it is used as it is, and a missing python:3.12-slim
#    or postgres:17 is pulled from its registry (a normal Docker installation);
#  - none does (this machine: no engine, no registry reachable): a private dockerd
#    without a bridge network is started, and stand-ins for python:3.12-slim and
#    postgres:17 are built locally from Debian's and Python's packages.
# ENGINE=existing or ENGINE=private forces one case.
#
#   engine.sh [all]     the engine, the base image, then the project's image
#   engine.sh daemon    the engine (private: start dockerd; installs Debian's docker.io if missing)
#   engine.sh base      + python:3.12-slim (existing engine: pulled; private: the stand-in)
#   engine.sh build     + docker build --network host -t $IMAGE_TAG $PROJECT (Dockerfile unmodified)
#   engine.sh postgres  + postgres:17 (existing: pulled; private: Debian's postgresql-17), for docker-compose.yml
#   engine.sh clean-base  forget the stand-in base (the next run rebuilds it)
#   engine.sh stop      stop the dockerd this script started (pid from its pidfile)
#   engine.sh env       print the export line for DOCKER_HOST (the engine the other steps use)
# Every step is skipped when its result exists, so re-running is cheap (warm: < 1 s;
# private from scratch: a few minutes, most of it debootstrap and apt).
#
# NETWORK RULES (the private engine): the daemon runs with no bridge (no docker0), no
# iptables, no forwarding or masquerading. Build with `--network host` and run
# containers with `--network host` (the host's loopback) or `--network none`. Never
# create a Docker network: bridge networks use private address ranges, and traffic to
# private ranges is not allowed on these machines. The tests follow the same rules on
# any engine.
#
# The stand-in base: python:3.12-slim is Debian 13 (trixie) with CPython 3.12 built into
# /usr/local. This builds the same shape: debootstrap trixie (minbase) + the runtime
# libraries CPython needs + the machine's own CPython 3.12 (found via `python3.12` on
# PATH, else pyenv) copied to /usr/local + pip, with the official image's
# PATH/LANG/PYTHON_VERSION. It also carries the host's CA bundle and PIP_CERT, because
# packages may be fetched through a TLS proxy. It is labelled as a stand-in and never
# replaces an image that is not one.
#
# Settings (environment): ENGINE (auto | existing | private), STATE (default
# ${TMPDIR:-/tmp}/experiment6-docker: data root, socket, pidfile, logs, cached rootfs),
# PROJECT (default $PWD), IMAGE_TAG (experiment6), SUITE (trixie | bookworm), PYSRC (a
# CPython 3.12 prefix), DEBIAN_MIRROR (default: the first URIs line of
# /etc/apt/sources.list.d/debian.sources), PIP_VERSION.
# The private engine needs root (dockerd, debootstrap, chroot).
# Use:  eval "$(.ci/engine.sh env)"; .ci/engine.sh base
#       docker run --rm --network host -e DBOS_SYSTEM_DATABASE_URL=... experiment6
set -euo pipefail

need_pkg() { # $1: command, $2: Debian package
    command -v "$1" >/dev/null 2>&1 && return
    echo "[engine] installing $2 from Debian's packages" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2"; } >&2
}
case "${1:-all}" in env | stop) ;; *) need_pkg docker docker.io ;; esac

DOCKERD=${DOCKERD:-$(command -v dockerd || true)}
DOCKER=${DOCKER:-$(command -v docker || true)}
if [[ -z ${PYSRC:-} ]]; then # a CPython 3.12 prefix: python3.12 on PATH, else pyenv's
    PYSRC=$(python3.12 -c 'import sys; print(sys.base_prefix)' 2>/dev/null || true)
    if [[ -z $PYSRC ]] && command -v pyenv >/dev/null 2>&1; then
        v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$' | sort -V | tail -n 1 || true)
        [[ -z $v ]] || PYSRC=$(pyenv prefix "$v" 2>/dev/null || true)
    fi
fi
PYSRC=${PYSRC:-}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [[ -z ${DEBIAN_MIRROR:-} ]]; then
    DEBIAN_MIRROR=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [[ -n $DEBIAN_MIRROR ]] || DEBIAN_MIRROR=$(awk '/^deb / { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
fi
STATE=${STATE:-${TMPDIR:-/tmp}/experiment6-docker}
PROJECT=${PROJECT:-$PWD}
IMAGE_TAG=${IMAGE_TAG:-experiment6}
SUITE=${SUITE:-trixie}
PIP_VERSION=${PIP_VERSION:-25.0.1}

BASE_TAG=python:3.12-slim
SUITE_TAG=python:3.12-slim-$SUITE
ROOTFS_TAG=standin/$SUITE-minbase-py312:rootfs
STANDIN_LABEL=standin.python312slim # marks OUR python:3.12-slim* (never a pulled one)
SOCK=$STATE/docker.sock
PIDFILE=$STATE/dockerd.pid
OWN_HOST=unix://$SOCK

# --- which engine: one that already works, or a private one ------------------------

answers() { # $1: a DOCKER_HOST value
    [[ -n $DOCKER ]] && DOCKER_HOST=$1 "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

# MODE=existing: the engine at DOCKER_HOST (else the default socket), which pulls what
# it lacks. MODE=private: the dockerd of $STATE (this script's), with stand-ins. An
# engine at our own socket is the private one, even when it is already running.
CANDIDATE=${DOCKER_HOST:-unix:///var/run/docker.sock}
case ${ENGINE:-auto} in
    existing) MODE=existing ;;
    private) MODE=private ;;
    auto) if [[ $CANDIDATE != "$OWN_HOST" ]] && answers "$CANDIDATE"; then MODE=existing; else MODE=private; fi ;;
    *) echo "ENGINE must be auto, existing or private, not '$ENGINE'" >&2; exit 2 ;;
esac
if [[ $MODE == existing ]]; then export DOCKER_HOST=$CANDIDATE; else export DOCKER_HOST=$OWN_HOST; fi

# Runtime libraries: what CPython 3.12's extension modules link (ldd of lib-dynload,
# _tkinter left out as in the slim image), plus what python:3.12-slim installs itself
# (ca-certificates, netbase, tzdata). trixie renamed some (64-bit time_t: ...t64).
case $SUITE in
    bookworm) T64= ;;
    trixie) T64=t64 ;;
    *) echo "SUITE must be trixie or bookworm, not '$SUITE'" >&2; exit 2 ;;
esac
PACKAGES=ca-certificates,netbase,tzdata,libbz2-1.0,libcrypt1,libexpat1,libffi8,liblzma5
PACKAGES+=,libncursesw6,libtinfo6,libnsl2,libtirpc3$T64,libreadline8$T64,libsqlite3-0
PACKAGES+=,libssl3$T64,libuuid1,zlib1g

log() { printf '[engine %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
docker() { "$DOCKER" "$@"; }

# --- the daemon -------------------------------------------------------------------

daemon_alive() {
    [[ -S $SOCK && -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null &&
        docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

no_docker0() {
    # --bridge=none keeps it from being created; delete it should it ever appear.
    if ip link show docker0 >/dev/null 2>&1; then
        log "docker0 appeared: deleting it"
        ip link delete docker0
    fi
}

start_daemon() {
    if [[ $MODE == existing ]]; then
        answers "$DOCKER_HOST" || { log "no Docker engine answers at $DOCKER_HOST (ENGINE=existing)"; exit 1; }
        log "using the engine at $DOCKER_HOST ($(docker version --format '{{.Server.Version}}'))"
        return
    fi
    need_pkg dockerd docker.io
    DOCKERD=${DOCKERD:-$(command -v dockerd)}
    mkdir -p "$STATE/data" "$STATE/exec"
    if daemon_alive; then
        log "dockerd already running (pid $(cat "$PIDFILE"))"
        no_docker0
        return
    fi
    log "starting dockerd (log: $STATE/dockerd.log)"
    # setsid: the daemon outlives this script; stop it with "$0 stop".
    setsid "$DOCKERD" \
        -H "unix://$SOCK" \
        --data-root "$STATE/data" \
        --exec-root "$STATE/exec" \
        --pidfile "$PIDFILE" \
        --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        --userland-proxy=false \
        --storage-driver=overlay2 \
        >>"$STATE/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 120); do
        daemon_alive && break
        sleep 0.5
    done
    daemon_alive || { tail -20 "$STATE/dockerd.log" >&2; log "dockerd did not start"; exit 1; }
    no_docker0
    log "dockerd $(docker version --format '{{.Server.Version}}') up, pid $(cat "$PIDFILE")"
}

stop_daemon() {
    if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        local pid
        pid=$(cat "$PIDFILE")
        log "stopping dockerd pid $pid"
        kill "$pid"
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then log "dockerd $pid still running"; exit 1; fi
    else
        log "no dockerd of ours running"
    fi
    # dockerd 20.10 leaves $STATE/exec/netns/default (an nsfs bind mount) behind on
    # exit, which blocks deleting $STATE; unmount what is left under our roots.
    local mnt
    awk -v a="$STATE/exec/" -v b="$STATE/data" 'index($5, a) == 1 || $5 == b || index($5, b "/") == 1 { print $5 }' \
        /proc/self/mountinfo | sort -r | while read -r mnt; do
        log "unmounting leftover $mnt"
        umount "$mnt" || true
    done
}

# --- the stand-in for python:3.12-slim -------------------------------------------

make_rootfs() {
    local work=$STATE/standin/$SUITE
    local rootfs=$work/rootfs
    mkdir -p "$work"
    if [[ -f $work/rootfs.tar ]]; then
        log "reusing $work/rootfs.tar"
        return
    fi
    need_pkg debootstrap debootstrap
    [[ -n $PYSRC && -x $PYSRC/bin/python3.12 ]] || { log "no CPython 3.12 found (set PYSRC to its prefix)"; exit 1; }
    [[ -n $DEBIAN_MIRROR ]] || { log "no Debian mirror found (set DEBIAN_MIRROR)"; exit 1; }
    rm -rf "$rootfs" "$rootfs.partial"
    log "debootstrap --variant=minbase $SUITE from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs.partial" "$DEBIAN_MIRROR" \
        >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
    mv "$rootfs.partial" "$rootfs"

    # As debian:*-slim: no package lists or caches, no docs (but copyright), man pages, locales.
    rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    find "$rootfs"/usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
    find "$rootfs"/usr/share/doc -mindepth 1 -type d -empty -delete
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR $SUITE main
deb $DEBIAN_MIRROR $SUITE-updates main
deb ${DEBIAN_MIRROR%/debian}/debian-security $SUITE-security main
EOF

    # CPython at /usr/local, as the official image. Its RUNPATH names $PYSRC/lib,
    # absent in the image: libpython is found through ldconfig (/usr/local/lib).
    # Left out as python:3.12-slim leaves them out: test dirs, _tkinter, *.pyc,
    # libpython*.a; and this machine's site-packages (pip comes from ensurepip).
    log "copying CPython from $PYSRC to /usr/local"
    tar -C "$PYSRC" -c \
        --exclude=test --exclude=tests --exclude=idle_test \
        --exclude='__pycache__' --exclude='*.pyc' \
        --exclude='libpython*.a' --exclude='_tkinter*.so' \
        --exclude='lib/python3.12/site-packages/*' --exclude='bin/pip*' \
        bin include lib share | tar -C "$rootfs/usr/local" -x
    # Paths baked in at build time: script shebangs, python-config, sysconfig data.
    grep -rlI --null "$PYSRC" "$rootfs/usr/local/bin" "$rootfs/usr/local/lib/python3.12" \
        "$rootfs/usr/local/lib/pkgconfig" 2>/dev/null |
        xargs -0 -r sed -i "s#$PYSRC#/usr/local#g"
    # The official image's binaries are linked with --strip-all; strip ours likewise.
    if command -v strip >/dev/null; then
        find "$rootfs/usr/local" -type f \( -name '*.so' -o -name '*.so.*' -o -name python3.12 \) \
            -exec strip --strip-unneeded {} +
    fi
    # The network's environment: the host's CA bundle (packages come through its TLS proxy).
    cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
    chroot "$rootfs" /sbin/ldconfig
    chroot "$rootfs" /usr/local/bin/python3.12 -c \
        'import ssl, sqlite3, ctypes, venv, zlib, bz2, lzma, uuid, readline, ensurepip; print("chroot: python runs, sqlite", sqlite3.sqlite_version)' >&2

    log "packing $work/rootfs.tar"
    tar -C "$rootfs" --numeric-owner -cf "$work/rootfs.tar.partial" .
    mv "$work/rootfs.tar.partial" "$work/rootfs.tar"
    rm -rf "$rootfs"
}

is_standin() { # $1: an image reference; true when it is one of our stand-ins
    [[ $(docker image inspect -f "{{index .Config.Labels \"$STANDIN_LABEL\"}}" "$1" 2>/dev/null) == yes ]]
}

image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }

build_base() {
    if [[ -n $(image_id "$BASE_TAG") ]] && ! is_standin "$BASE_TAG"; then
        log "$BASE_TAG exists but is not our stand-in: refusing to touch it"
        exit 1
    fi
    if is_standin "$SUITE_TAG"; then
        log "$SUITE_TAG (stand-in) already present: $(image_id "$SUITE_TAG")"
    else
        if [[ -z $(image_id "$ROOTFS_TAG") ]]; then
            make_rootfs
            log "docker import -> $ROOTFS_TAG"
            docker import "$STATE/standin/$SUITE/rootfs.tar" "$ROOTFS_TAG" >/dev/null
        fi
        local ctx=$STATE/standin/$SUITE/base-context version
        version=$("$PYSRC/bin/python3" -c 'import platform; print(platform.python_version())')
        rm -rf "$ctx" && mkdir -p "$ctx"
        cat >"$ctx/Dockerfile" <<EOF
FROM $ROOTFS_TAG
LABEL $STANDIN_LABEL=yes \\
      description="Stand-in for python:3.12-slim: Debian $SUITE minbase + CPython $version in /usr/local"
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8 \\
    PYTHON_VERSION=$version \\
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN set -eux; \\
    ldconfig; \\
    python3 -m ensurepip --default-pip; \\
    PIP_ROOT_USER_ACTION=ignore pip install --no-cache-dir --disable-pip-version-check "pip==$PIP_VERSION"; \\
    python -c 'import ssl, sqlite3, ctypes, venv, sys; print(sys.version, "sqlite", sqlite3.sqlite_version)'; \\
    python3 --version; pip --version; \\
    find /usr/local -depth -name __pycache__ -exec rm -rf {} +; \\
    rm -rf /root/.cache /tmp/*
CMD ["python3"]
EOF
        log "building $SUITE_TAG (stand-in)"
        docker build --network host -t "$SUITE_TAG" "$ctx"
    fi
    if [[ $(image_id "$BASE_TAG") != "$(image_id "$SUITE_TAG")" ]]; then
        log "tagging $SUITE_TAG as $BASE_TAG"
        docker tag "$SUITE_TAG" "$BASE_TAG"
    fi
}

clean_base() {
    if is_standin "$SUITE_TAG"; then
        if [[ $(image_id "$BASE_TAG") == "$(image_id "$SUITE_TAG")" ]]; then
            docker image rm "$BASE_TAG"
        fi
        docker image rm "$SUITE_TAG"
    fi
    if [[ -n $(image_id "$ROOTFS_TAG") ]]; then docker image rm "$ROOTFS_TAG"; fi
    rm -rf "${STATE:?}/standin/$SUITE"
}

# --- a stand-in for postgres:17 (for docker-compose.yml only) -------------------------
# Debian trixie's own PostgreSQL 17 on the trixie rootfs, with a minimal entrypoint
# doing what the official image's does on first start (POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB; initdb into $PGDATA, owned by user postgres). One deliberate
# difference: it listens on 127.0.0.1 only (the official image: '*'), because here it
# can only run with host networking.

build_postgres() {
    local tag=postgres:17 rootfs=standin/trixie-minbase-py312:rootfs
    if [[ $(docker image inspect -f '{{index .Config.Labels "standin.postgres17"}}' "$tag" 2>/dev/null) == yes ]]; then
        log "$tag (stand-in) already present: $(image_id "$tag")"
        return
    fi
    [[ -z $(image_id "$tag") ]] || { log "$tag exists but is not our stand-in"; exit 1; }
    [[ -n $(image_id "$rootfs") ]] || SUITE=trixie "$0" base
    local ctx=$STATE/standin/postgres-context
    rm -rf "$ctx" && mkdir -p "$ctx"
    cat >"$ctx/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
if [ "$(id -u)" = 0 ] && [ "${1:-}" = postgres ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -n "${POSTGRES_PASSWORD:-}" ] || { echo "POSTGRES_PASSWORD must be set" >&2; exit 1; }
    pw=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pw"
    initdb -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$pw" \
        --auth-local=trust --auth-host=scram-sha-256
    rm -f "$pw"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    if [ "$POSTGRES_DB" != postgres ]; then
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
            -c "CREATE DATABASE \"$POSTGRES_DB\""
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop
fi
exec "$@"
EOF
    chmod 755 "$ctx/docker-entrypoint.sh"
    cat >"$ctx/Dockerfile" <<EOF
FROM $rootfs
LABEL standin.postgres17=yes description="Stand-in for postgres:17: Debian trixie's postgresql-17"
ENV PG_MAJOR=17 PGDATA=/var/lib/postgresql/data LANG=C.UTF-8 \\
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/postgresql/17/bin
RUN set -eux; \\
    mkdir -p /etc/postgresql-common/createcluster.d; \\
    echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/standin.conf; \\
    apt-get update; \\
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-17; \\
    rm -rf /var/lib/apt/lists/*; \\
    mkdir -p /var/run/postgresql "\$PGDATA"; chown postgres:postgres /var/run/postgresql "\$PGDATA"
COPY docker-entrypoint.sh /usr/local/bin/
VOLUME /var/lib/postgresql/data
ENTRYPOINT ["docker-entrypoint.sh"]
STOPSIGNAL SIGINT
EXPOSE 5432
CMD ["postgres", "-c", "listen_addresses=127.0.0.1"]
EOF
    log "building $tag (stand-in)"
    docker build --network host -t "$tag" "$ctx"
}

# --- an engine with registry access: pull what is missing --------------------------

pull_missing() { # $1: an image reference
    if [[ -n $(image_id "$1") ]]; then
        log "$1 already present: $(image_id "$1")"
    else
        log "docker pull $1"
        docker pull "$1"
    fi
}

# --- the project -------------------------------------------------------------------

build_project() {
    [[ -f $PROJECT/Dockerfile ]] || { log "no Dockerfile in PROJECT=$PROJECT"; exit 1; }
    log "docker build --network host -t $IMAGE_TAG $PROJECT"
    local t0=$SECONDS
    (cd "$PROJECT" && docker build --network host -t "$IMAGE_TAG" .)
    log "built $IMAGE_TAG in $((SECONDS - t0)) s: $(docker image inspect -f '{{.Size}}' "$IMAGE_TAG") bytes"
}

base_image() { if [[ $MODE == existing ]]; then pull_missing "$BASE_TAG"; else build_base; fi; }
postgres_image() { if [[ $MODE == existing ]]; then pull_missing postgres:17; else build_postgres; fi; }

case "${1:-all}" in
    daemon) start_daemon ;;
    base) start_daemon; base_image ;;
    build | all) start_daemon; base_image; build_project ;;
    clean-base) [[ $MODE == private ]] || { log "clean-base: only for the private engine's stand-in"; exit 2; }
        start_daemon; clean_base ;;
    postgres) start_daemon; postgres_image ;;
    stop) stop_daemon ;;
    env) echo "export DOCKER_HOST=$DOCKER_HOST" ;;
    *) echo "usage: $0 [all|daemon|base|build|clean-base|postgres|stop|env]" >&2; exit 2 ;;
esac
