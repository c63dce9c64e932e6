#!/usr/bin/env bash
# The usage dashboard in headless Chromium (issue 21): starts its own gateway
# and worker natively (fresh database, own Redis prefix and AMQP namespace, dev
# tokens), makes demo data for one user with `worker demo` plus a consume whose
# description is hostile markup, waits until the analytics show it, then runs
# tests/dashboard/check.py (Selenium from PyPI, in target/dashboard-venv, driving
# Debian's chromium + chromium-driver): chart drawn, figures equal to the API's,
# strict CSP and no console violation, the hostile text shown as text in the
# admin view. Screenshots: target/dashboard/dashboard.png (and -admin.png).
#
#   scripts/dashboard-test.sh          # what CI runs; installs what is missing (idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
fi
VENV=${CARGO_TARGET_DIR:-target}/dashboard-venv
if ! "$VENV/bin/python" -c 'import selenium' >/dev/null 2>&1; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "selenium>=4.20,<5"
fi

. scripts/lib/own-stack.sh
own_stack dash

psql "$ADMIN_URL" -qtAc "create database \"$ID\"" >/dev/null
export DATABASE_URL=$DB_URL JWT_SECRET=dash-secret AUTH_DEV_TOKENS=true APP_ENV=development
export GATEWAY_LISTEN=127.0.0.1:$PORT WORKER_LISTEN=127.0.0.1:$WPORT
export APP__REDIS__KEY_PREFIX=$ID APP__AMQP__NAMESPACE=$ID RUST_LOG=warn
cargo build --bins --quiet
BIN=${CARGO_TARGET_DIR:-target}/debug
"$BIN/worker" migrate
"$BIN/worker" run >"$LOGS/worker.log" 2>&1 & WK=$!
"$BIN/gateway" >"$LOGS/gateway.log" 2>&1 & GW=$!
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 150); do curl -fsS "$BASE/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

USER_ID=dash_user_0
"$BIN/worker" demo --gateway "$BASE" --users 1 --days 14 --events-per-day 20 --user-prefix dash_user_
HOSTILE='<img src=x onerror=alert(1)>'
BODY=$(python3 -c 'import json,sys; print(json.dumps({"amount": 3, "model": "gpt-4o", "provider": "openai", "description": sys.argv[1]}))' "$HOSTILE")
curl -fsS -X POST "$BASE/api/users/$USER_ID/credits/consume" -H "Authorization: Bearer dev:$USER_ID" \
  -H 'Content-Type: application/json' -d "$BODY" >/dev/null

# Settled: the hostile row is in the ledger, the balance the API shows equals the
# ledger's (nothing in flight), and the analytics count the consumes.
DEADLINE=$(( $(date +%s) + 60 ))
until python3 - "$BASE" "$USER_ID" "$DB_URL" <<'PY'
import json, subprocess, sys, urllib.request
base, user, db = sys.argv[1:]
get = lambda p: json.load(urllib.request.urlopen(urllib.request.Request(base + p, headers={"Authorization": f"Bearer dev:{user}"})))
ledger = get(f"/api/users/{user}/credits/transactions?limit=1")["transactions"]
settled = subprocess.run(["psql", db, "-qtAc", f"select credits_balance from users where id = '{user}'"],
                         capture_output=True, text=True).stdout.strip()
a = get("/api/vscode/analytics?days=30")
ok = (ledger and ledger[0]["description"] and "onerror" in ledger[0]["description"]
      and str(get(f"/api/users/{user}/profile")["credits"]["balance"]) == settled
      and a["totals"]["requests"] > 0 and a["totals"]["credits_consumed"] > 0)
sys.exit(0 if ok else 1)
PY
do
  if [ "$(date +%s)" -ge "$DEADLINE" ]; then echo "dashboard: the demo data did not settle within 60 s"; tail -n 20 "$LOGS"/*.log; exit 1; fi
  sleep 0.5
done

status=0
DASH_URL=$BASE DASH_USER=$USER_ID DASH_ADMIN_TOKEN="dev:dash_admin:admin" DASH_HOSTILE="$HOSTILE" \
  DASH_OUT=${CARGO_TARGET_DIR:-target}/dashboard "$VENV/bin/python" tests/dashboard/check.py || status=1
if grep -q 'panicked' "$LOGS/gateway.log" "$LOGS/worker.log"; then
  echo "dashboard: a process panicked"; grep -h -A3 panicked "$LOGS"/*.log | head -20; status=1
fi
echo "dashboard: script took $(( $(date +%s) - START )) s"
if [ "$status" = 0 ]; then echo "dashboard: 1 passed, 0 failed"; else echo "dashboard: 0 passed, 1 failed"; fi
exit "$status"
