#!/usr/bin/env bash
# The test command of README.md: the whole suite against the local services.
# The outage tests (they stop RabbitMQ and Postgres) run afterwards, one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-services.sh
cargo nextest run --workspace --no-fail-fast -E 'not binary(faults)' "$@"
echo "== outage tests (serial)"
cargo nextest run -p gateway --test faults --no-fail-fast --test-threads 1 --no-capture "$@"
bash scripts/ensure-services.sh
