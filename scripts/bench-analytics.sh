#!/usr/bin/env bash
# Analytics read latency for one heavy user (docs/benchmarks.md, "Analytics").
#
#   scripts/bench-analytics.sh [ROWS] [N]
#
# Loads ONE user with ROWS usage events (default 1,000,000) spread over 365
# days into a scratch database `bench_analytics` (with the matching rollups
# and one ledger consume per model event, scripts/bench-analytics.sql), starts
# a release gateway against it, and times N requests (default 50) each of:
# analytics cache misses (30 and 365 days), cache hits, and usage stats over
# 366 days by day, model and session. Needs Postgres, Redis and RabbitMQ on
# 127.0.0.1 (scripts/ensure-services.sh), psql, redis-cli and curl.
# Set SKIP_LOAD=1 to reuse the loaded database.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${1:-1000000}
N=${2:-50}
DB=bench_analytics
USER_ID=bench_user
PG=${PG:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-18080}
PREFIX=bench
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

# PROFILE=dev measures the debug build (faster to build, slower to run).
PROFILE=${PROFILE:-release}
if [[ $PROFILE == release ]]; then
  cargo build --release -q -p gateway -p worker
  BIN=$CARGO_TARGET_DIR/release
else
  cargo build -q -p gateway -p worker
  BIN=$CARGO_TARGET_DIR/debug
fi

if [[ -z ${SKIP_LOAD:-} ]]; then
  psql -q "$PG/postgres" -c "drop database if exists $DB with (force)" -c "create database $DB"
  DATABASE_URL=$PG/$DB JWT_SECRET=bench-secret-0123456789-0123456789 "$BIN/worker" migrate
  echo "loading $ROWS usage rows for $USER_ID (a few minutes) ..."
  psql -q "$PG/$DB" -v user=$USER_ID -v rows="$ROWS" -f scripts/bench-analytics.sql
fi

redis-cli --scan --pattern "$PREFIX:*" | xargs -r redis-cli del >/dev/null
DATABASE_URL=$PG/$DB JWT_SECRET=bench-secret-0123456789-0123456789 AUTH_DEV_TOKENS=true \
  GATEWAY_LISTEN=127.0.0.1:$PORT APP__REDIS__KEY_PREFIX=$PREFIX APP__AMQP__NAMESPACE=$PREFIX \
  APP__RATE_LIMIT__CLASSES__ANALYTICS__LIMIT=1000000 RUST_LOG=warn \
  "$BIN/gateway" >/tmp/bench-analytics-gateway.log 2>&1 &
GW=$!
trap 'kill $GW 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done

AUTH="Authorization: Bearer dev:$USER_ID"
URL=http://127.0.0.1:$PORT
# One request, its total time in ms; fails on a non-200.
hit() {
  local code t
  read -r code t < <(curl -s -o /dev/null -w '%{http_code} %{time_total}\n' -H "$AUTH" "$URL$1")
  [[ $code == 200 ]] || { echo "GET $1 answered $code" >&2; exit 1; }
  awk -v t="$t" 'BEGIN { printf "%.2f\n", t * 1000 }'
}
# N timings → "p50 p95 max mean" in ms.
summary() {
  sort -n | awk '{ a[NR] = $1; s += $1 } END {
    p50 = a[int((NR + 1) * 0.50)]; p95 = a[int(NR * 0.95 + 0.5)];
    printf "%.1f | %.1f | %.1f | %.1f", p50, p95, a[NR], s / NR }'
}
miss() { # days
  for _ in $(seq "$N"); do
    redis-cli del "$PREFIX:{$USER_ID}:analytics:$1" >/dev/null
    hit "/api/vscode/analytics?days=$1"
  done | summary
}
repeat() { # path
  for _ in $(seq "$N"); do hit "$1"; done | summary
}

hit "/api/vscode/analytics?days=365" >/dev/null # provisions nothing (loaded), warms pools
FROM=$(date -u -d '365 days ago' +%F)
TO=$(date -u +%F)
echo
echo "$ROWS usage rows, $N requests each, sequential, $PROFILE build, ms:"
echo
echo "| request | p50 | p95 | max | mean |"
echo "|---|---|---|---|---|"
echo "| analytics days=30, cache miss | $(miss 30) |"
echo "| analytics days=365, cache miss | $(miss 365) |"
echo "| analytics days=365, cache hit | $(repeat "/api/vscode/analytics?days=365") |"
for g in day model session; do
  echo "| stats 366 days, group_by=$g | $(repeat "/api/users/$USER_ID/usage/stats?from=$FROM&to=$TO&group_by=$g") |"
done
psql -qAt "$PG/$DB" -c "select 'rows: usage_daily ' || (select count(*) from usage_daily) || ', credit_daily ' || (select count(*) from credit_daily) || ', ledger ' || (select count(*) from credit_transactions)"
