#!/usr/bin/env bash
# Validates docker-compose.yml without a Docker engine: `docker-compose config -q`
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

docker-compose -f docker-compose.yml config -q
echo "docker-compose.yml: valid ($(docker-compose version --short 2>/dev/null || echo docker-compose))"
