#!/usr/bin/env bash
# The native dev stack in one command (no Docker needed):
#   checks Postgres, Redis and RabbitMQ on this machine (starting local ones it can),
#   builds, migrates, runs worker and gateway in the foreground with readable logs,
#   waits until both answer, then prints dev tokens for a demo user and an admin
#   and two curl lines: one tracks a usage event, one reads it back.
# Ctrl-C (SIGINT) or SIGTERM stops both cleanly; the script exits 0 when both did.
# (Started as a background job of another script, bash ignores SIGINT and so
# does this script: stop it with SIGTERM then.)
#
#   scripts/dev.sh                 # gateway on :8080, worker health/metrics on :9090
#   GATEWAY_LISTEN=127.0.0.1:18080 WORKER_LISTEN=127.0.0.1:19090 scripts/dev.sh
#
# Every setting of SPEC §2 passes through from the environment, so a second
# stack (or a test) can run beside the first with its own ports, database and
# namespaces: GATEWAY_LISTEN, WORKER_LISTEN, DATABASE_URL (the database must
# exist; it is migrated), REDIS_URL, AMQP_URL, APP__REDIS__KEY_PREFIX,
# APP__AMQP__NAMESPACE, JWT_SECRET, RUST_LOG, any APP__* key, and
# CARGO_TARGET_DIR (where the binaries are built). DEV_READY_TIMEOUT_S (default
# 120) bounds the wait for both processes to answer; past it the script stops
# them and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

export APP_ENV=development
export AUTH_DEV_TOKENS=true
export JWT_SECRET=${JWT_SECRET:-dev-secret-change-me}
export GATEWAY_LISTEN=${GATEWAY_LISTEN:-127.0.0.1:8080}
export WORKER_LISTEN=${WORKER_LISTEN:-127.0.0.1:9090}
export RUST_LOG=${RUST_LOG:-info,lapin=warn,sqlx=warn}
READY_TIMEOUT_S=${DEV_READY_TIMEOUT_S:-120}

bash scripts/ensure-services.sh
echo "dev: building (cargo build --bins)"
cargo build --bins --quiet
BIN=${CARGO_TARGET_DIR:-target}/debug
"$BIN/worker" migrate

GATEWAY=""
WORKER=""
stop() {
  trap - INT TERM
  echo "dev: stopping gateway and worker"
  [ -n "$GATEWAY" ] && kill -TERM "$GATEWAY" 2>/dev/null || true
  [ -n "$WORKER" ] && kill -TERM "$WORKER" 2>/dev/null || true
  local rc=0 pid status
  for pid in $GATEWAY $WORKER; do
    # Both drain in-flight work on SIGTERM; 30 s is past their longest wait.
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "dev: process $pid did not stop within 30 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    status=0
    wait "$pid" || status=$?
    [ "$rc" -ne 0 ] || rc=$status
  done
  echo "dev: stopped (exit $rc)"
  exit "$rc"
}
trap stop INT TERM

"$BIN/worker" run &
WORKER=$!
"$BIN/gateway" &
GATEWAY=$!

# A wildcard bind is reached through loopback.
URL="http://${GATEWAY_LISTEN/0.0.0.0/127.0.0.1}"
WORKER_URL="http://${WORKER_LISTEN/0.0.0.0/127.0.0.1}"
abort() { # message: stop both without waiting for a clean exit status, exit 1
  trap - INT TERM
  echo "dev: $1" >&2
  kill -TERM "$GATEWAY" "$WORKER" 2>/dev/null || true
  wait "$GATEWAY" "$WORKER" 2>/dev/null || true
  exit 1
}
deadline=$((SECONDS + READY_TIMEOUT_S))
until curl -fsS "$URL/readyz" >/dev/null 2>&1 && curl -fsS "$WORKER_URL/healthz" >/dev/null 2>&1; do
  if ! kill -0 "$GATEWAY" 2>/dev/null || ! kill -0 "$WORKER" 2>/dev/null; then
    abort "a process exited before the stack was ready (see its log above)"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    abort "not ready within ${READY_TIMEOUT_S} s ($URL/readyz names the dependency that is down)"
  fi
  sleep 0.2
done

# The read-back is the user's analytics for today: the tracked event shows in
# totals.requests and by_model as soon as the worker has stored it (≤ 2 s).
cat <<MSG

dev: ready: gateway $URL, worker $WORKER_URL (/healthz, /metrics)
dev: demo user token:   dev:demo_user
dev: admin token:       dev:demo_admin:admin
dev: try (track an event, then read it back):
curl -sS -X POST '$URL/api/vscode/usage/track' -H 'Authorization: Bearer dev:demo_user' -H 'Content-Type: application/json' -d '{"kind":"model","provider":"openai","model":"gpt-4o","prompt_tokens":120,"completion_tokens":30}'
curl -sS '$URL/api/vscode/analytics?days=1' -H 'Authorization: Bearer dev:demo_user'
dev: more demo data: $BIN/worker demo --gateway $URL --users 5 --days 7
dev: Ctrl-C stops both.

MSG
# Either process ending on its own ends the stack.
wait -n "$GATEWAY" "$WORKER" || true
echo "dev: a process exited on its own" >&2
stop
