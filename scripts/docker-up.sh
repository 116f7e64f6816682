#!/usr/bin/env bash
# Make a Docker engine and flowline's offline base image available, for the docker
# backend and its tests: install Debian's docker.io and debootstrap when missing, start
# dockerd when nothing answers (overlay2, else vfs; no default bridge, so no container
# gets an address beyond loopback), then build the base image when the daemon lacks it.
# Idempotent: on a machine that has all of it, it only checks.
set -euo pipefail
BIN="${1:-.venv/bin}"
LOG="${DOCKERD_LOG:-/var/log/flowline-dockerd.log}"

if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io debootstrap >/dev/null
fi

answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if ! answers; then
    for driver in overlay2 vfs; do
        nohup dockerd --bridge=none --storage-driver="$driver" >>"$LOG" 2>&1 &
        pid=$!
        for _ in $(seq 1 60); do
            answers && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        answers && break
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        echo "dockerd would not start with $driver; see $LOG" >&2
    done
    answers || { echo "error: no Docker daemon could be started; see $LOG" >&2; exit 1; }
fi

"$BIN/flowline" image base
