#!/usr/bin/env bash
# The TypeScript client (clients/typescript): its types are generated from the
# gateway's OpenAPI document (`gateway openapi`), and its tests run against a
# real gateway and worker.
#
#   scripts/ts-client.sh regen   # rewrite openapi.json and src/generated/schema.ts (after an API change)
#   scripts/ts-client.sh check   # CI: fail when the committed files differ from what the gateway generates; tsc
#   scripts/ts-client.sh test    # CI: unit tests, then the stack tests against a gateway + worker it starts
#   TS_CLIENT_BUILD=0 scripts/ts-client.sh test   # with target/debug's binaries as they are (no cargo build)
#
# `npm ci` runs from package-lock.json (the npm cache makes it work offline once filled).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PKG=$ROOT/clients/typescript
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug
MODE=${1:-check}

# Runs a step and prints how long it took.
step() {
  local name=$1; shift
  local t0 rc=0; t0=$(date +%s.%N)
  "$@" || rc=$?
  awk -v n="$name" -v a="$t0" -v b="$(date +%s.%N)" -v rc="$rc" \
    'BEGIN { printf "ts-client: %s took %.1f s%s\n", n, b - a, (rc == 0 ? "" : " (failed)") }'
  return "$rc"
}

# `npm ci` unless node_modules was installed from this very package-lock.json.
npm_ci() {
  local stamp=$PKG/node_modules/.ts-client-lock.json
  if ! cmp -s "$PKG/package-lock.json" "$stamp" 2>/dev/null; then
    (cd "$PKG" && npm ci --no-audit --no-fund --prefer-offline --loglevel=error)
    cp "$PKG/package-lock.json" "$stamp"
  fi
}

# The document as the gateway serves it with the default configuration: a
# clean environment, so no APP__* variable of the caller's shell changes it.
print_document() {
  env -i PATH="$PATH" HOME="${HOME:-/tmp}" APP_ENV=development AUTH_DEV_TOKENS=true "$BIN/gateway" openapi
}

# Writes openapi.json and schema.ts into $1 (a directory laid out as the package).
generate_into() {
  local out=$1
  mkdir -p "$out/src/generated"
  print_document >"$out/openapi.json"
  (cd "$PKG" && npx --no-install openapi-typescript "$out/openapi.json" -o "$out/src/generated/schema.ts" --silent)
}

# TS_CLIENT_BUILD=0: use target/debug's binaries as they are (while the workspace does not build).
build_gateway() { [ "${TS_CLIENT_BUILD:-1}" = 0 ] || cargo build --quiet --bin gateway; }
build_bins() { [ "${TS_CLIENT_BUILD:-1}" = 0 ] || cargo build --quiet --bins; }
typecheck() { (cd "$PKG" && npx --no-install tsc --noEmit -p .); }

check_fresh() {
  local tmp; tmp=$(mktemp -d)
  generate_into "$tmp"
  local status=0
  for f in openapi.json src/generated/schema.ts; do
    if ! diff -q "$PKG/$f" "$tmp/$f" >/dev/null; then
      echo "ts-client: clients/typescript/$f is not what the gateway's document generates; run scripts/ts-client.sh regen"
      diff -u "$PKG/$f" "$tmp/$f" | head -40 || true
      status=1
    fi
  done
  rm -rf "$tmp"
  [ "$status" = 0 ] && echo "ts-client: openapi.json and src/generated/schema.ts are up to date"
  return "$status"
}

case "$MODE" in
  regen)
    step "cargo build" build_gateway
    step "npm ci" npm_ci
    step "generate" generate_into "$PKG"
    step "tsc --noEmit" typecheck
    echo "ts-client: regenerated clients/typescript/openapi.json and src/generated/schema.ts"
    ;;
  check)
    step "cargo build" build_gateway
    step "npm ci" npm_ci
    step "up-to-date check" check_fresh
    step "tsc --noEmit" typecheck
    ;;
  test) ;;
  *) echo "usage: scripts/ts-client.sh [check|test|regen]" >&2; exit 2 ;;
esac
[ "$MODE" = test ] || exit 0

# --- test: a gateway and a worker of their own (as scripts/schemathesis.sh) ---
. scripts/lib/own-stack.sh
own_stack ts

start_stack() {
  psql "$ADMIN_URL" -qtAc "create database \"$ID\"" >/dev/null
  export DATABASE_URL=$DB_URL JWT_SECRET=ts-client-secret AUTH_DEV_TOKENS=true APP_ENV=development
  export GATEWAY_LISTEN=127.0.0.1:$PORT WORKER_LISTEN=127.0.0.1:$WPORT
  export APP__REDIS__KEY_PREFIX=$ID APP__AMQP__NAMESPACE=$ID RUST_LOG=warn
  # Generous limits, so that only the test meant to meet the limiter meets it...
  for c in USAGE ANALYTICS PROFILE CREDITS ADMIN; do export "APP__RATE_LIMIT__CLASSES__${c}__LIMIT=100000"; done
  export APP__RATE_LIMIT__USAGE_EVENTS__LIMIT=1000000 APP__RATE_LIMIT__AUTH_FAILURES__LIMIT=100000
  # ...and a small one for `session`: a burst of 3, then one per second, so a 429's Retry-After is 1 s.
  export APP__RATE_LIMIT__CLASSES__SESSION__LIMIT=3 APP__RATE_LIMIT__CLASSES__SESSION__WINDOW_SECS=3
  "$BIN/worker" migrate >"$LOGS/migrate.log" 2>&1 || { cat "$LOGS/migrate.log"; return 1; }
  "$BIN/worker" run >"$LOGS/worker.log" 2>&1 & WK=$!
  "$BIN/gateway" >"$LOGS/gateway.log" 2>&1 & GW=$!
  for _ in $(seq 150); do curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "ts-client: the gateway did not become ready"; tail -n 30 "$LOGS/gateway.log" "$LOGS/worker.log"; return 1
}

run_tests() {
  (cd "$PKG" && VSC_BASE_URL="http://127.0.0.1:$PORT" VSC_SESSION_LIMIT=3 npx --no-install vitest run --reporter=default)
}

step "cargo build" build_bins
step "npm ci" npm_ci
step "tsc --noEmit" typecheck
step "start gateway + worker" start_stack
status=0
step "vitest (unit + against the stack)" run_tests || status=1
if grep -q 'panicked' "$LOGS/gateway.log" "$LOGS/worker.log"; then
  echo "ts-client: a process panicked"; grep -h -A3 panicked "$LOGS"/*.log | head -20; status=1
fi
if [ "$status" != 0 ]; then tail -n 20 "$LOGS/gateway.log" "$LOGS/worker.log"; fi
exit "$status"
