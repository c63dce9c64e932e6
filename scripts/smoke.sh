#!/usr/bin/env bash
# Native smoke test of the built binaries with the configuration that
# docker-compose.yml gives them (service hostnames mapped to 127.0.0.1), against
# the Postgres, Redis and RabbitMQ on this machine:
#
#   build → `worker migrate` twice (idempotent) → start worker and gateway →
#   /readyz 200 → /healthz → both /metrics parse as Prometheus text →
#   track one usage event end to end until its row is in Postgres →
#   SIGTERM both, each must exit 0 → clean up.
#
# Everything it touches is its own: a fresh database smoke_<id>, Redis key
# prefix smoke_<id>, AMQP namespace smoke_<id>, random free ports.
#
#   scripts/smoke.sh                     # what CI runs
#   SMOKE_SKIP_E2E=1 scripts/smoke.sh    # skip the end-to-end event (local use only)
#   SMOKE_KEEP_LOGS=1 scripts/smoke.sh   # keep the logs directory on success too
set -euo pipefail
cd "$(dirname "$0")/.."

ID="smoke_$(date +%s)_$$_${RANDOM}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/smoke.XXXXXX")
STEP="setup"
RESULT="FAIL"
SKIPPED=""
GW_PID=""
WK_PID=""
DB_CREATED=""
READY_DEADLINE_S=${SMOKE_READY_DEADLINE_S:-60}
E2E_DEADLINE_S=15
STOP_DEADLINE_S=30

log() { printf 'smoke: %s\n' "$*"; }
fail() {
  log "FAILED at step '$STEP': $*"
  exit 1
}

# A Python that has PyYAML (the docker-compose package brings one).
PY=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import yaml' 2>/dev/null; then
    PY=$candidate
    break
  fi
done
[ -n "$PY" ] || fail "no python3 with PyYAML (apt-get install python3-yaml)"

# ---------------------------------------------------------------- cleanup ----
stop_quietly() { # pid: TERM, then KILL after 10 s
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  set +e
  stop_quietly "$GW_PID"
  stop_quietly "$WK_PID"
  if [ -n "$DB_CREATED" ]; then
    psql "$ADMIN_URL" -qtA -c "drop database if exists \"$ID\" with (force)" >/dev/null 2>&1 \
      || log "warning: could not drop database $ID"
  fi
  if [ -n "${REDIS_URL_LOCAL:-}" ]; then
    redis-cli -u "$REDIS_URL_LOCAL" --scan --pattern "$ID:*" 2>/dev/null \
      | xargs -r -n 500 redis-cli -u "$REDIS_URL_LOCAL" del >/dev/null 2>&1
  fi
  if [ -n "${AMQP_VHOST:-}" ]; then
    if command -v rabbitmqctl >/dev/null 2>&1; then
      for q in usage credits sessions users dead; do
        rabbitmqctl -q delete_queue -p "$AMQP_VHOST" "$ID.$q" >/dev/null 2>&1
      done
      # rabbitmqctl has no delete_exchange; the broker's own function does it.
      for x in events dlx; do
        rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"$AMQP_VHOST\">>, exchange, <<\"$ID.$x\">>), false, <<\"smoke\">>)." >/dev/null 2>&1
      done
    else
      log "warning: rabbitmqctl not found; queues and exchanges $ID.* left on the broker"
    fi
  fi
  if [ "$RESULT" = PASS ] && [ $rc -eq 0 ]; then
    if [ -n "${SMOKE_KEEP_LOGS:-}" ]; then log "logs kept in $WORK"; else rm -rf "$WORK"; fi
    echo "SMOKE PASS${SKIPPED:+ ($SKIPPED)}"
  else
    for f in "$WORK"/*.log; do
      [ -f "$f" ] || continue
      echo "----- last lines of $(basename "$f")"
      tail -n 40 "$f" | cut -c 1-400
    done
    echo "SMOKE FAIL at step '$STEP' (logs in $WORK)"
    rc=1
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------- environment from compose --
STEP="read docker-compose.yml"
# The rendered compose file when a compose tool is at hand (it resolves anchors
# exactly as `docker compose up` will), else the file itself through PyYAML.
if command -v docker-compose >/dev/null 2>&1; then
  docker-compose -f docker-compose.yml config >"$WORK/compose.yml" || fail "docker-compose config failed"
elif docker compose version >/dev/null 2>&1; then
  docker compose -f docker-compose.yml config >"$WORK/compose.yml" || fail "docker compose config failed"
else
  cp docker-compose.yml "$WORK/compose.yml"
fi

# Prints a service's environment as KEY=VALUE lines, with URLs pointing at the
# compose hostnames rewritten to 127.0.0.1.
compose_env() { # service
  "$PY" - "$WORK/compose.yml" "$1" <<'PY'
import re, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
env = doc["services"][sys.argv[2]].get("environment") or {}
if isinstance(env, list):
    env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
hosts = {"postgres", "redis", "rabbitmq"}
url = re.compile(r"^([a-z][a-z0-9+.-]*://)([^@/]*@)?([^:/?#]+)(.*)$")
for key, value in env.items():
    if value is None:
        continue
    value = str(value).lower() if isinstance(value, bool) else str(value)
    m = url.match(value)
    if m and m.group(3) in hosts:
        value = m.group(1) + (m.group(2) or "") + "127.0.0.1" + m.group(4)
    print(f"{key}={value}")
PY
}
compose_env gateway >"$WORK/gateway.env"
compose_env worker >"$WORK/worker.env"
compose_env migrate >"$WORK/migrate.env"

env_get() { # file key
  sed -n "s/^$2=//p" "$1" | tail -n 1
}
ADMIN_URL=$(env_get "$WORK/worker.env" DATABASE_URL)
REDIS_URL_LOCAL=$(env_get "$WORK/worker.env" REDIS_URL)
AMQP_URL_LOCAL=$(env_get "$WORK/worker.env" AMQP_URL)
# shellcheck disable=SC2015 # fail when any is empty
[ -n "$ADMIN_URL" ] && [ -n "$REDIS_URL_LOCAL" ] && [ -n "$AMQP_URL_LOCAL" ] ||
  fail "docker-compose.yml gives worker no DATABASE_URL, REDIS_URL or AMQP_URL"

read -r DB_URL AMQP_VHOST GW_PORT WK_PORT < <("$PY" - "$ADMIN_URL" "$AMQP_URL_LOCAL" "$ID" <<'PY'
import socket, sys
from urllib.parse import urlsplit, urlunsplit, unquote
db, amqp, name = sys.argv[1:4]
u = urlsplit(db)
print(urlunsplit(u._replace(path="/" + name)), end=" ")
vhost = unquote(urlsplit(amqp).path[1:]) or "/"
print(vhost, end=" ")
# Two distinct free ports: both sockets stay bound until both are known.
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)
[ -n "${WK_PORT:-}" ] || fail "could not derive the database URL, vhost and free ports"

# What this run sets on top of the compose environment (later lines win in env).
OVERRIDES=(
  "DATABASE_URL=$DB_URL"
  "APP__REDIS__KEY_PREFIX=$ID"
  "APP__AMQP__NAMESPACE=$ID"
  "GATEWAY_LISTEN=127.0.0.1:$GW_PORT"
  "WORKER_LISTEN=127.0.0.1:$WK_PORT"
)
mapfile -t GW_ENV <"$WORK/gateway.env"
mapfile -t WK_ENV <"$WORK/worker.env"
mapfile -t MG_ENV <"$WORK/migrate.env"
# A clean environment: nothing of the caller's shell (APP__*, RUST_LOG…) leaks in.
BASE_ENV=("PATH=$PATH" "HOME=${HOME:-/tmp}" "NO_COLOR=1")

# ------------------------------------------------------------------ build ----
STEP="cargo build --bins"
log "building the binaries"
cargo build --workspace --bins --quiet || fail "cargo build failed"
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps \
  | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
# Copied at once: the target directory may be shared with other builds.
mkdir -p "$WORK/bin"
cp "$TARGET_DIR/debug/gateway" "$TARGET_DIR/debug/worker" "$WORK/bin/"
BIN="$WORK/bin"

# ---------------------------------------------------------------- migrate ----
STEP="create database"
psql "$ADMIN_URL" -v ON_ERROR_STOP=1 -qtA -c "create database \"$ID\"" >/dev/null \
  || fail "cannot create database $ID via $ADMIN_URL"
DB_CREATED=1

applied() {
  psql "$DB_URL" -qtA -c "select count(*) from _sqlx_migrations where success" 2>/dev/null
}
STEP="worker migrate (1st)"
env -i "${BASE_ENV[@]}" "${MG_ENV[@]}" "${OVERRIDES[@]}" "$BIN/worker" migrate \
  >"$WORK/migrate1.log" 2>&1 || fail "worker migrate exited $?"
first=$(applied || true)
STEP="worker migrate (2nd, idempotent)"
env -i "${BASE_ENV[@]}" "${MG_ENV[@]}" "${OVERRIDES[@]}" "$BIN/worker" migrate \
  >"$WORK/migrate2.log" 2>&1 || fail "second worker migrate exited $?"
second=$(applied || true)
expected=$(find migrations -maxdepth 1 -name '*.sql' | wc -l)
# shellcheck disable=SC2015 # fail when either differs
[ "$first" = "$expected" ] && [ "$second" = "$expected" ] ||
  fail "applied migrations: $first then $second, expected $expected"
log "migrate: $expected migration(s) applied, second run a no-op"

# ------------------------------------------------------------------ start ----
STEP="start worker and gateway"
env -i "${BASE_ENV[@]}" "${WK_ENV[@]}" "${OVERRIDES[@]}" "$BIN/worker" run >"$WORK/worker.log" 2>&1 &
WK_PID=$!
env -i "${BASE_ENV[@]}" "${GW_ENV[@]}" "${OVERRIDES[@]}" "$BIN/gateway" >"$WORK/gateway.log" 2>&1 &
GW_PID=$!
GW="http://127.0.0.1:$GW_PORT"
WK="http://127.0.0.1:$WK_PORT"

http_code() { # url [curl args...] → status code (000 when nothing answers)
  local url=$1
  shift
  curl -s -o "$WORK/body" -w '%{http_code}' --max-time 5 "$@" "$url" || true
}
alive() { # pid name
  kill -0 "$1" 2>/dev/null || fail "$2 exited early"
}

STEP="wait for /readyz"
deadline=$((SECONDS + READY_DEADLINE_S))
until [ "$(http_code "$GW/readyz")" = 200 ]; do
  alive "$GW_PID" gateway
  alive "$WK_PID" worker
  [ $SECONDS -lt $deadline ] || fail "gateway /readyz not 200 within ${READY_DEADLINE_S}s: $(cat "$WORK/body" 2>/dev/null)"
  sleep 0.25
done
log "gateway ready: $(cat "$WORK/body")"
until [ "$(http_code "$WK/healthz")" = 200 ]; do
  alive "$WK_PID" worker
  [ $SECONDS -lt $deadline ] || fail "worker /healthz not 200 within ${READY_DEADLINE_S}s"
  sleep 0.25
done

STEP="/healthz"
[ "$(http_code "$GW/healthz")" = 200 ] || fail "gateway /healthz answered $(cat "$WORK/body")"
"$PY" -c 'import json, sys; assert json.load(open(sys.argv[1]))["status"] == "ok"' "$WORK/body" \
  || fail "gateway /healthz body is not {\"status\":\"ok\"}: $(cat "$WORK/body")"

# Every sample line must read `name{labels} value [timestamp]`; names given as
# arguments must have at least one sample.
check_metrics() { # name url [required metric names...]
  local name=$1 url=$2
  shift 2
  [ "$(http_code "$url")" = 200 ] || fail "$name /metrics answered $(head -c 300 "$WORK/body")"
  cp "$WORK/body" "$WORK/$name.metrics"
  "$PY" - "$WORK/$name.metrics" "$@" <<'PY' || fail "$name /metrics is not valid Prometheus text"
import re, sys
name = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
label = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
labels = r"\{(?:" + label + r"(?:," + label + r")*,?)?\}"
value = r"(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?Inf|NaN)"
sample = re.compile(r"^(" + name + r")(?:" + labels + r")? " + value + r"(?: -?[0-9]+)?$")
seen, bad = set(), []
for n, line in enumerate(open(sys.argv[1]).read().splitlines(), 1):
    if not line.strip() or line.startswith("#"):
        continue
    m = sample.match(line)
    if m:
        seen.add(m.group(1))
    else:
        bad.append(f"  line {n}: {line!r}")
missing = [r for r in sys.argv[2:] if not any(s == r or s.startswith(r + "_") for s in seen)]
for b in bad[:10]:
    print(b, file=sys.stderr)
if missing:
    print("  missing metrics: " + ", ".join(missing), file=sys.stderr)
if bad or missing:
    sys.exit(1)
print(f"smoke: {sys.argv[1].rsplit('/', 1)[-1]}: {len(seen)} metric names, every sample line valid")
PY
}

STEP="/metrics"
check_metrics gateway "$GW/metrics"
check_metrics worker "$WK/metrics"

# ------------------------------------------------------------ end to end -----
if [ -n "${SMOKE_SKIP_E2E:-}" ]; then
  SKIPPED="end-to-end step skipped by SMOKE_SKIP_E2E"
  log "$SKIPPED"
else
  STEP="track a usage event"
  code=$(http_code "$GW/api/vscode/usage/track" -X POST \
    -H 'Authorization: Bearer dev:smoke_user' -H 'Content-Type: application/json' \
    -d '{"kind":"feature","feature":"chat"}')
  [ "$code" = 202 ] || fail "POST /api/vscode/usage/track answered $code: $(head -c 500 "$WORK/body")"
  event_id=$("$PY" -c '
import json, re, sys
d = json.load(open(sys.argv[1]))
assert d["accepted"] == 1, d
eid = d["event_ids"][0]
assert re.fullmatch(r"[0-9a-fA-F-]{36}", eid), eid
print(eid)' "$WORK/body") || fail "unexpected track answer: $(head -c 500 "$WORK/body")"
  log "tracked event $event_id"

  STEP="event stored in Postgres"
  deadline=$((SECONDS + E2E_DEADLINE_S))
  until [ "$(psql "$DB_URL" -qtA -c "select count(*) from feature_usage where id = '$event_id'" 2>/dev/null)" = 1 ]; do
    alive "$WK_PID" worker
    [ $SECONDS -lt $deadline ] || fail "event $event_id not in feature_usage within ${E2E_DEADLINE_S}s"
    sleep 0.25
  done
  log "event $event_id stored"

  STEP="/metrics after the event"
  check_metrics gateway "$GW/metrics" http_requests_total publish_confirms_total
  check_metrics worker "$WK/metrics" worker_events_stored_total
fi

# --------------------------------------------------------------- shutdown ----
stop_and_check() { # pid name
  local pid=$1 name=$2 rc
  kill -TERM "$pid" 2>/dev/null || fail "$name was not running at SIGTERM"
  local deadline=$((SECONDS + STOP_DEADLINE_S))
  while kill -0 "$pid" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "$name still running ${STOP_DEADLINE_S}s after SIGTERM"
    sleep 0.1
  done
  wait "$pid" && rc=0 || rc=$?
  [ "$rc" -eq 0 ] || fail "$name exited with status $rc after SIGTERM"
  log "$name exited 0 after SIGTERM"
}
STEP="SIGTERM gateway"
stop_and_check "$GW_PID" gateway
GW_PID=""
STEP="SIGTERM worker"
stop_and_check "$WK_PID" worker
WK_PID=""

STEP="done"
RESULT=PASS
