#!/usr/bin/env bash
# The test command of README.md: the whole suite against the local services.
# Tests that stop shared services (RabbitMQ, Postgres) run afterwards, one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-services.sh
cargo nextest run --workspace --no-fail-fast "$@"
