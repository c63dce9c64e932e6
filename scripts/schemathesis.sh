#!/usr/bin/env bash
# Schemathesis against /openapi.json with two users' tokens: no 5xx, no answer
# that breaks the schema, no access across users. Starts its own gateway and
# worker natively (fresh database, own Redis prefix and AMQP namespace).
#
#   scripts/schemathesis.sh            # what CI runs (installs schemathesis from PyPI if missing)
#   ST_MAX_EXAMPLES=50 scripts/schemathesis.sh
set -euo pipefail
cd "$(dirname "$0")/.."

command -v st >/dev/null 2>&1 || python3 -m pip install -q "schemathesis>=4,<5" >/dev/null
. scripts/lib/own-stack.sh
own_stack st

psql "$ADMIN_URL" -qtAc "create database \"$ID\"" >/dev/null
export DATABASE_URL=$DB_URL JWT_SECRET=st-secret AUTH_DEV_TOKENS=true APP_ENV=development
export GATEWAY_LISTEN=127.0.0.1:$PORT WORKER_LISTEN=127.0.0.1:$WPORT
export APP__REDIS__KEY_PREFIX=$ID APP__AMQP__NAMESPACE=$ID RUST_LOG=warn
# Generous limits: the fuzzer must meet the handlers, not the rate limiter.
for c in SESSION USAGE ANALYTICS PROFILE CREDITS ADMIN; do export "APP__RATE_LIMIT__CLASSES__${c}__LIMIT=100000"; done
# Schemathesis sends many requests without a valid token from one address.
export APP__RATE_LIMIT__AUTH_FAILURES__LIMIT=1000000
cargo build --bins --quiet
BIN=${CARGO_TARGET_DIR:-target}/debug
"$BIN/worker" migrate
"$BIN/worker" run >"$LOGS/worker.log" 2>&1 & WK=$!
"$BIN/gateway" >"$LOGS/gateway.log" 2>&1 & GW=$!
for _ in $(seq 150); do curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

# One run per user; any failure fails the step (no retries: see below).
#
# --workers 1: with two worker threads, Schemathesis 4 under CPython 3.11
# intermittently failed its *generation* of coverage-phase bodies for
# POST /api/vscode/usage/track with "Inconsistent results" (a Hypothesis
# FlakyFailure; its first line is sometimes a KeyError in Hypothesis's
# lambda-source cache). The sub-exception is CPython's
# "SystemError: AST constructor recursion depth mismatch", raised inside
# ast.parse, which Hypothesis calls to describe a strategy's lambdas while
# validating it. The failing case never reached the gateway: no request was
# sent for it. CPython 3.11 keeps that recursion counter in interpreter-wide
# AST state, and the two workers' threads parse at once (python/cpython#106905
# reports the same error in threaded programs). Measured with seed 1: two
# workers hit it in 4 of 13 runs, one worker in 0 of 13. See docs/reliability.md.
run_as() {
  ST_CALLER=$1 SCHEMATHESIS_HOOKS=tests.schemathesis.hooks PYTHONPATH=. \
    st run "http://127.0.0.1:$PORT/openapi.json" \
      --header "Authorization: Bearer dev:$1" \
      --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,no_access_across_users \
      --max-examples "${ST_MAX_EXAMPLES:-25}" --seed 1 --workers 1 \
      --exclude-path /metrics --exclude-path /readyz \
      --suppress-health-check all --warnings off
}
status=0
for user in st_alice st_bob; do
  echo "schemathesis: as $user"
  if run_as "$user" >"$LOGS/st.out" 2>&1; then
    tail -n 3 "$LOGS/st.out"
  else
    tail -n 80 "$LOGS/st.out" || true; status=1
  fi
done
if grep -q 'panicked' "$LOGS/gateway.log" "$LOGS/worker.log"; then
  echo "schemathesis: a process panicked"; grep -h -A3 panicked "$LOGS"/*.log | head -20; status=1
fi
if [ "$status" = 0 ]; then echo "schemathesis: 1 passed, 0 failed"; else echo "schemathesis: 0 passed, 1 failed"; fi
exit "$status"
