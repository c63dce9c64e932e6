#!/usr/bin/env bash
# Validates docker-compose.yml and docker-compose.cluster.yml without a Docker engine: `docker-compose config -q`
# only parses and resolves the file. Installs Debian's docker-compose (1.29) when
# no compose tool is present. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker-compose >/dev/null 2>&1; then
  echo "installing docker-compose (apt)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # A slow or failing index refresh is tolerated: the install below may still
  # succeed from the lists already on the machine.
  $SUDO timeout 600 apt-get update -qq >/dev/null 2>&1 || echo "apt-get update failed or timed out; trying the cached lists"
  $SUDO env DEBIAN_FRONTEND=noninteractive timeout 600 \
    apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi

for f in docker-compose.yml docker-compose.cluster.yml; do
  docker-compose -f "$f" config -q
  echo "$f: valid ($(docker-compose version --short 2>/dev/null || echo docker-compose))"
done
