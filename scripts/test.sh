#!/usr/bin/env bash
# The test command of README.md: the whole suite against the local services.
# Then, one at a time: the outage tests (they stop RabbitMQ and Postgres), and
# last the dev-stack test (it builds a clean checkout of HEAD into target/, whose
# gateway and worker binaries then stand in target/debug until the next build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-services.sh --drop-test-databases
cargo nextest run --workspace --no-fail-fast -E 'not binary(faults) and not binary(devstack)' "$@"
echo "== outage tests (serial)"
cargo nextest run -p e2e --test faults --no-fail-fast --test-threads 1 --no-capture "$@"
bash scripts/ensure-services.sh
echo "== dev stack from a clean checkout (serial, slow: builds the checkout)"
cargo nextest run -p worker --test devstack --no-fail-fast "$@"
