#!/usr/bin/env bash
# The native dev stack in one command (no Docker needed):
#   checks Postgres, Redis and RabbitMQ on this machine (starting local ones it can),
#   migrates, runs worker and gateway in the foreground with readable logs,
#   prints dev tokens for a demo user and an admin and a curl line to try.
# Ctrl-C (SIGINT) or SIGTERM stops both cleanly.
#
#   scripts/dev.sh                 # gateway on :8080, worker health/metrics on :9090
#   GATEWAY_LISTEN=127.0.0.1:18080 WORKER_LISTEN=127.0.0.1:19090 scripts/dev.sh
set -euo pipefail
cd "$(dirname "$0")/.."

export APP_ENV=development
export AUTH_DEV_TOKENS=true
export JWT_SECRET=${JWT_SECRET:-dev-secret-change-me}
export GATEWAY_LISTEN=${GATEWAY_LISTEN:-127.0.0.1:8080}
export WORKER_LISTEN=${WORKER_LISTEN:-127.0.0.1:9090}
export RUST_LOG=${RUST_LOG:-info,lapin=warn,sqlx=warn}

bash scripts/ensure-services.sh
cargo build --bins --quiet
BIN=${CARGO_TARGET_DIR:-target}/debug
"$BIN/worker" migrate

"$BIN/worker" run &
WORKER=$!
"$BIN/gateway" &
GATEWAY=$!

stop() {
  trap - INT TERM
  echo "dev: stopping gateway and worker"
  kill -TERM "$GATEWAY" "$WORKER" 2>/dev/null || true
  local rc=0
  wait "$GATEWAY" || rc=$?
  wait "$WORKER" || rc=$?
  echo "dev: stopped (exit $rc)"
  exit "$rc"
}
trap stop INT TERM

URL="http://${GATEWAY_LISTEN/0.0.0.0/127.0.0.1}"
for _ in $(seq 100); do
  curl -fsS "$URL/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
cat <<MSG

dev: gateway $URL is ready (worker metrics on http://$WORKER_LISTEN/metrics)
dev: demo user token:   dev:demo_user
dev: admin token:       dev:demo_admin:admin
dev: try:
curl -sS -X POST $URL/api/vscode/usage/track -H 'Authorization: Bearer dev:demo_user' -H 'Content-Type: application/json' -d '{"kind":"model","provider":"openai","model":"gpt-4o","prompt_tokens":120,"completion_tokens":30}'
curl -sS $URL/api/vscode/analytics?days=1 -H 'Authorization: Bearer dev:demo_user'
dev: Ctrl-C stops both.

MSG
wait -n "$GATEWAY" "$WORKER" || true
echo "dev: a process exited on its own" >&2
stop
