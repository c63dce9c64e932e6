#!/usr/bin/env bash
# The benchmark harness of docs/benchmarks.md. Run by hand on a quiet machine,
# never by CI:
#
#   scripts/bench.sh                 # everything (~6 min after the release build)
#   BENCH_SECONDS=20 BENCH_DRAIN_EVENTS=1000000 scripts/bench.sh
#   BENCH_TOKENS=both scripts/bench.sh  # track1 with RS256 and with HS256 tokens
#   REDIS_CLUSTER_URLS=redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003 \
#     scripts/bench.sh                # on a Redis Cluster (scripts/clusters.sh start redis-cluster)
#
# Builds gateway, worker and loadgen in release, starts them natively against
# the local Postgres, Redis and RabbitMQ (a fresh database, Redis key prefix
# and AMQP namespace of its own, dropped afterwards), mints tokens for
# BENCH_USERS users and measures, in one run. Tokens (BENCH_TOKENS): rs256
# (default, as production's Clerk tokens: a fresh RSA key per run, its JWKS
# served on loopback, JWKS_URL pointing there, a `kid` in every token), hs256
# (JWT_SECRET), or both (the phases with RS256, track1 also with HS256).
#   1. a bare axum "hello" (the ceiling),
#   2. usage/track with 1 and with 100 events per request,
#   3. credits/consume, 4. analytics from the cache:
#      each first closed loop (the maximum), then open loop at 80 % of that
#      maximum with latency counted from each request's due time (and, for
#      single requests, at 50 % too);
#   5. accepted events = rows in Postgres after the phases above,
#   6. publish-to-Postgres lag (stored_at - received_at) at a steady rate,
#   7. worker drain: BENCH_DRAIN_EVENTS queued with the worker stopped, then
#      the worker started and timed until every row is in Postgres,
#   8. peak RSS (VmHWM) of gateway and worker,
#  10. the broker's confirm wait over the run (publish_confirm_seconds),
#   9. during every closed loop, each component's CPU (top, 5 s): the
#      per-request cost across processes that bounds a 2-core machine.
#  11. phase "cpu": CPU per request, repeatably: BENCH_CPU_RUNS (5) closed
#      loops of exactly BENCH_CPU_REQUESTS (100,000) requests each, for
#      track1 and consume, with RS256 and with HS256 tokens; the gateway's
#      utime+stime (/proc/PID/stat) and Redis's (INFO cpu of the server on
#      REDIS_URL) before and after each; scripts/capacity.py prints the table.
# Figures go to stdout and to target/bench/<time>/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS=${BENCH_USERS:-1000}
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
DRAIN_EVENTS=${BENCH_DRAIN_EVENTS:-1000000}
LAG_RATE=${BENCH_LAG_RATE:-2000}
LOADGEN_THREADS=${BENCH_LOADGEN_THREADS:-1}
CONNS=${BENCH_CONNECTIONS:-64}
PHASES=${BENCH_PHASES:-hello,track1,track100,consume,analytics,cpu,lag,drain}
TOKENS=${BENCH_TOKENS:-rs256}
CPU_RUNS=${BENCH_CPU_RUNS:-5}
CPU_REQUESTS=${BENCH_CPU_REQUESTS:-100000}
# BENCH_CPU_SCENARIOS ("track1 consume") and BENCH_CPU_TOKENS ("rs256 hs256") narrow the cpu phase.
case $TOKENS in
  rs256 | both) TOK=rs256 ;;
  hs256) TOK=hs256 ;;
  *) echo "bench: BENCH_TOKENS is rs256, hs256 or both" >&2; exit 2 ;;
esac
want() { [[ ",$PHASES," == *",$1,"* ]]; }

ID="bench_$(date +%s)"
ADMIN_URL=${TEST_DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL="${ADMIN_URL%/*}/$ID"
OUT="target/bench/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); WPORT=$(free_port); HPORT=$(free_port); JPORT=$(free_port)
GW=""; WK=""; HELLO=""; JWKS=""
# The Redis servers the stack uses: every node of REDIS_CLUSTER_URLS when it is set (the gateway
# and worker then run on that cluster; scripts/clusters.sh start redis-cluster), else REDIS_URL.
# Redis figures are summed over them; the run's keys are removed from each.
REDIS_NODES=${REDIS_CLUSTER_URLS:-${REDIS_URL:-redis://127.0.0.1:6379}}
REDIS_NODES=${REDIS_NODES//,/ }
WORKER_HWM_KB=0

cleanup() {
  set +e
  for p in $GW $WK $HELLO $JWKS; do kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  psql "$ADMIN_URL" -qtAc "drop database if exists \"$ID\" with (force)" >/dev/null 2>&1
  for n in $REDIS_NODES; do
    redis-cli -u "$n" --scan --pattern "$ID:*" | xargs -r -n 500 redis-cli -u "$n" del >/dev/null 2>&1
  done
  for q in usage credits sessions users dead; do rabbitmqctl -q delete_queue "$ID.$q" >/dev/null 2>&1; done
  for x in events dlx; do
    rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$ID.$x\">>), false, <<\"bench\">>)." >/dev/null 2>&1
  done
}
trap cleanup EXIT

bash scripts/ensure-services.sh >/dev/null
echo "bench: building release binaries"
cargo build --release --quiet -p gateway -p worker -p bench
BIN=${CARGO_TARGET_DIR:-target}/release

export JWT_SECRET="bench-$(openssl rand -hex 24)"
# RS256 as Clerk signs: a fresh 2048-bit key per run, its public half as a
# JWKS on a loopback port; loadgen signs with the private half under BENCH_RSA_KID.
mkdir -p "$OUT/jwks"
export BENCH_RSA_KEY=$OUT/rsa.pem BENCH_RSA_KID="bench-$(date +%s)"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$BENCH_RSA_KEY" 2>/dev/null
python3 - "$BENCH_RSA_KEY" "$BENCH_RSA_KID" >"$OUT/jwks/jwks.json" <<'EOF'
import base64, json, subprocess, sys
out = subprocess.run(["openssl", "rsa", "-in", sys.argv[1], "-noout", "-modulus"], check=True, capture_output=True, text=True).stdout
b64u = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
n = bytes.fromhex(out.strip().split("=", 1)[1])
print(json.dumps({"keys": [{"kty": "RSA", "kid": sys.argv[2], "use": "sig", "alg": "RS256",
                            "n": b64u(n), "e": b64u((65537).to_bytes(3, "big"))}]}))
EOF
python3 -m http.server --bind 127.0.0.1 --directory "$OUT/jwks" "$JPORT" >"$OUT/jwks.log" 2>&1 & JWKS=$!
export JWKS_URL=http://127.0.0.1:$JPORT/jwks.json
export APP_ENV=production RUST_LOG=${RUST_LOG:-warn}
export DATABASE_URL=$DB_URL GATEWAY_LISTEN=127.0.0.1:$PORT WORKER_LISTEN=127.0.0.1:$WPORT
export APP__REDIS__KEY_PREFIX=$ID APP__AMQP__NAMESPACE=$ID
# The benchmark measures the machine, not the per-user limits.
for c in SESSION USAGE ANALYTICS PROFILE CREDITS ADMIN; do
  export "APP__RATE_LIMIT__CLASSES__${c}__LIMIT=1000000000"
done
psql "$ADMIN_URL" -qtAc "create database \"$ID\"" >/dev/null
"$BIN/worker" migrate >/dev/null

sql() { psql "$DB_URL" -qtAc "$1"; }
hwm_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
start_worker() { "$BIN/worker" run >>"$OUT/worker.log" 2>&1 & WK=$!; }
stop_worker() {
  local h; h=$(hwm_kb "$WK"); [ "$h" -gt "$WORKER_HWM_KB" ] && WORKER_HWM_KB=$h
  kill -TERM "$WK"; wait "$WK" || true; WK=""
}
wait_ready() {
  for _ in $(seq 300); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench: $1 did not answer" >&2; return 1
}
stored() {
  sql "select (select count(*) from model_usage) + (select count(*) from feature_usage)"
}
wait_stored() { # N: until N rows are stored (or 120 s)
  for _ in $(seq 1200); do [ "$(stored)" -ge "$1" ] && return 0; sleep 0.1; done
  echo "bench: only $(stored) of $1 events stored after 120 s" >&2; return 1
}
# Waits until the worker has stored every accepted event and settled every
# answered consume, so a phase does not pay for the previous one's backlog.
quiesce() {
  wait_stored "$ACCEPTED"
  for _ in $(seq 1200); do
    [ "$(sql "select count(*) from credit_transactions where kind = 'consume'")" -ge "$CONSUMED" ] && return 0
    sleep 0.1
  done
}
# loadgen with the tokens of $TOK (minted once a run into $OUT/tokens-$TOK.txt).
lg() {
  local cmd=$1; shift
  "$BIN/loadgen" --threads "$LOADGEN_THREADS" "$cmd" --users "$USERS" --tokens "$TOK" --token-file "$OUT/tokens-$TOK.txt" "$@"
}
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

# Microseconds Redis spent running scripts so far (INFO commandstats of
# EVALSHA: a script's time includes the commands it calls; Redis runs them
# one at a time on its one thread).
redis_usec() {
  for n in $REDIS_NODES; do redis-cli -u "$n" info commandstats; done |
    awk -F'usec=' '/^cmdstat_evalsha:/ {split($2, a, ","); s += a[1]} END {print s + 0}'
}

# CPU time so far, in µs: of process PID (utime + stime of /proc/PID/stat,
# the fields after the command name), and of the Redis server on REDIS_URL (INFO cpu).
proc_cpu_us() { sed 's/.*) //' "/proc/$1/stat" | awk -v t="$(getconf CLK_TCK)" '{printf "%d\n", ($12 + $13) * 1e6 / t}'; }
redis_cpu_us() {
  for n in $REDIS_NODES; do redis-cli -u "$n" info cpu; done | tr -d '\r' |
    awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%d\n", s * 1e6}'
}

# cpu_run SCENARIO RUN: exactly CPU_REQUESTS requests, closed loop; the CPU the
# gateway and Redis spent over them (and the worker, until it caught up).
cpu_run() {
  local res g0 g1 r0 r1 s0 s1 w0 w1
  g0=$(proc_cpu_us "$GW"); r0=$(redis_cpu_us); s0=$(redis_usec); w0=$(proc_cpu_us "$WK")
  res=$(lg run --url "$GWURL" --scenario "$1" --connections "$CONNS" --seconds 3600 --requests "$CPU_REQUESTS")
  g1=$(proc_cpu_us "$GW"); r1=$(redis_cpu_us); s1=$(redis_usec)
  ACCEPTED=$((ACCEPTED + $(field "$res" events_accepted)))
  [ "$1" = consume ] && CONSUMED=$((CONSUMED + $(field "$res" ok)))
  quiesce
  w1=$(proc_cpu_us "$WK")
  python3 - "$res" "$2" "$((g1 - g0))" "$((r1 - r0))" "$((s1 - s0))" "$((w1 - w0))" <<'EOF' | tee -a "$OUT/results.jsonl"
import json, sys
r = json.loads(sys.argv[1])
run, gw, redis, script, worker = map(int, sys.argv[2:7])
n = max(r["requests"], 1)
print(json.dumps({"check": "cpu_per_request", "scenario": r["scenario"], "tokens": r["tokens"], "run": run,
                  "requests": r["requests"], "ok": r["ok"], "errors": r["errors"], "req_per_s": r["req_per_s"],
                  "gateway_us": round(gw / n, 1), "redis_us": round(redis / n, 1),
                  "redis_script_us": round(script / n, 1), "worker_us": round(worker / n, 1)}))
EOF
}

# cpu_sample SCENARIO: % of one core per process over 5 s (from the 4th second
# of a closed loop), summed per component, as one results line. Background.
cpu_sample() {
  sleep 3
  top -b -n 2 -d 5 -w 200 | python3 -c '
import json, sys
frames = sys.stdin.read().split("top - ")
cpu = {}
names = {"gateway": "gateway", "worker": "worker", "loadgen": "loadgen", "redis-ser": "redis",
         "beam.smp": "rabbitmq", "postgres": "postgres"}
for line in frames[-1].splitlines():
    f = line.split()
    if len(f) >= 12 and f[0].isdigit():
        for prefix, comp in names.items():
            if f[11].startswith(prefix):
                cpu[comp] = round(cpu.get(comp, 0) + float(f[8]), 1)
cpu["all"] = round(sum(cpu.values()), 1)
print(json.dumps({"check": "cpu_percent_of_one_core", "scenario": sys.argv[1], "tokens": sys.argv[2], **cpu}))
' "$1" "$TOK" >>"$OUT/cpu.jsonl"
}

# run SCENARIO URL [extra loadgen args]: closed loop, then open loop at 80 %.
# Prints both lines and leaves the closed-loop maximum in $MAX.
run_pair() {
  local scenario=$1 url=$2; shift 2
  local closed open rate sampler r0 r1
  r0=$(redis_usec)
  cpu_sample "$scenario" & sampler=$!
  closed=$(lg run --url "$url" --scenario "$scenario" --connections "$CONNS" --seconds "$SECONDS_PER_RUN" "$@")
  r1=$(redis_usec)
  wait "$sampler" || true
  echo "$closed" | tee -a "$OUT/results.jsonl"
  us=$(python3 -c "print(round(($r1 - $r0) / max($(field "$closed" requests), 1), 1))")
  echo "{\"check\":\"redis_script_us_per_request\",\"scenario\":\"$scenario\",\"tokens\":\"$TOK\",\"us\":$us}" | tee -a "$OUT/results.jsonl"
  tail -n 1 "$OUT/cpu.jsonl" 2>/dev/null | tee -a "$OUT/results.jsonl"
  MAX=$(field "$closed" req_per_s)
  rate=$(python3 -c "print(round($MAX * 0.8))")
  open=$(lg run --url "$url" --scenario "$scenario" --connections "$CONNS" --seconds "$SECONDS_PER_RUN" --rate "$rate" "$@")
  echo "$open" | tee -a "$OUT/results.jsonl"
  ACCEPTED=$((ACCEPTED + $(field "$closed" events_accepted) + $(field "$open" events_accepted)))
  [ "$scenario" = consume ] && CONSUMED=$((CONSUMED + $(field "$closed" ok) + $(field "$open" ok)))
  # And at half the maximum: how the tail looks with the cores not saturated.
  if [ "$scenario" != hello ] && [ "$scenario" != track100 ]; then
    rate=$(python3 -c "print(round($MAX * 0.5))")
    open=$(lg run --url "$url" --scenario "$scenario" --connections "$CONNS" --seconds "$SECONDS_PER_RUN" --rate "$rate" "$@")
    echo "$open" | tee -a "$OUT/results.jsonl"
    ACCEPTED=$((ACCEPTED + $(field "$open" events_accepted)))
    [ "$scenario" = consume ] && CONSUMED=$((CONSUMED + $(field "$open" ok)))
  fi
  return 0
}
ACCEPTED=0
CONSUMED=0

echo "bench: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $USERS users, ${SECONDS_PER_RUN}s per run," \
  "loadgen threads $LOADGEN_THREADS, $CONNS connections, tokens $TOKENS"
if want hello; then
  echo "== 1. bare axum hello (ceiling)"
  "$BIN/loadgen" hello --listen "127.0.0.1:$HPORT" & HELLO=$!
  wait_ready "http://127.0.0.1:$HPORT/hello"
  run_pair hello "http://127.0.0.1:$HPORT"
  kill -TERM "$HELLO"; wait "$HELLO" 2>/dev/null || true; HELLO=""
fi

start_worker
"$BIN/gateway" >"$OUT/gateway.log" 2>&1 & GW=$!
wait_ready "http://127.0.0.1:$PORT/readyz"
wait_ready "http://127.0.0.1:$WPORT/healthz"
GWURL="http://127.0.0.1:$PORT"
wait_ready "$JWKS_URL"
lg setup --url "$GWURL"
for TOK in rs256 hs256; do lg mint; done
TOK=$([ "$TOKENS" = hs256 ] && echo hs256 || echo rs256)

if want track1; then
  echo "== 2. usage/track, 1 event per request"
  run_pair track1 "$GWURL"
  if [ "$TOKENS" = both ]; then
    echo "== 2. usage/track, 1 event per request, HS256 tokens"
    rs_max=$MAX
    quiesce
    TOK=hs256
    run_pair track1 "$GWURL"
    TOK=rs256
    ratio=$(python3 -c "print(round($rs_max / max($MAX, 1), 3))")
    echo "{\"check\":\"rs256_vs_hs256\",\"scenario\":\"track1\",\"rs256_req_per_s\":$rs_max,\"hs256_req_per_s\":$MAX,\"ratio\":$ratio}" |
      tee -a "$OUT/results.jsonl"
  fi
fi
if want track100; then
  echo "== 2. usage/track, 100 events per request"
  quiesce
  run_pair track100 "$GWURL"
fi
if want consume; then
  echo "== 3. credits/consume"
  quiesce
  run_pair consume "$GWURL"
fi
if want analytics; then
  echo "== 4. analytics (the worker caught up, every user's cache warmed first)"
  # Settlements invalidate the users' cached views: let them land first.
  quiesce
  lg run --url "$GWURL" --scenario analytics --connections 16 --seconds 60 --requests "$USERS" >/dev/null
  run_pair analytics "$GWURL"
fi

if want cpu; then
  echo "== 11. CPU per request: $CPU_RUNS runs of $CPU_REQUESTS requests, closed loop, $CONNS connections"
  for scenario in ${BENCH_CPU_SCENARIOS:-track1 consume}; do
    for TOK in ${BENCH_CPU_TOKENS:-rs256 hs256}; do
      # Every token seen once first (a verified-token cache then holds them all).
      warm=$(lg run --url "$GWURL" --scenario "$scenario" --connections "$CONNS" --seconds 600 --requests "$USERS")
      ACCEPTED=$((ACCEPTED + $(field "$warm" events_accepted)))
      [ "$scenario" = consume ] && CONSUMED=$((CONSUMED + $(field "$warm" ok)))
      for run in $(seq "$CPU_RUNS"); do
        quiesce
        cpu_run "$scenario" "$run"
      done
    done
  done
  TOK=$([ "$TOKENS" = hs256 ] && echo hs256 || echo rs256)
  python3 scripts/capacity.py --cpu "$OUT/results.jsonl" | tee -a "$OUT/results.jsonl" >/dev/null
  python3 scripts/capacity.py "$OUT/results.jsonl" --cpu-table
fi

echo "== 5. accepted = stored"
wait_stored "$ACCEPTED"
echo "{\"check\":\"accepted_vs_stored\",\"accepted\":$ACCEPTED,\"stored\":$(stored)}" | tee -a "$OUT/results.jsonl"

if want lag; then
echo "== 6. publish-to-Postgres lag at $LAG_RATE req/s (1 event each)"
lag=$(lg run --url "$GWURL" --scenario track1 --connections "$CONNS" --seconds "$SECONDS_PER_RUN" --rate "$LAG_RATE" --model lagprobe)
echo "$lag" | tee -a "$OUT/results.jsonl"
ACCEPTED=$((ACCEPTED + $(field "$lag" events_accepted)))
wait_stored "$ACCEPTED"
sql "select json_build_object('check','lag_ms','rows',count(*),
       'p50',round((percentile_cont(0.5) within group (order by ms))::numeric,1),
       'p99',round((percentile_cont(0.99) within group (order by ms))::numeric,1),
       'max',round(max(ms)::numeric,1))
     from (select extract(epoch from stored_at - received_at) * 1000 as ms
           from model_usage where model like 'lagprobe%') t" | tee -a "$OUT/results.jsonl"
fi

if want drain; then
echo "== 7. worker drain of $DRAIN_EVENTS events"
stop_worker
before=$(stored)
fill=$(lg run --url "$GWURL" --scenario track100 --connections 16 --seconds 600 --requests $((DRAIN_EVENTS / 100)) --model drain)
echo "$fill" | tee -a "$OUT/results.jsonl"
target=$((before + $(field "$fill" events_accepted)))
t0=$(date +%s.%N)
start_worker
cpu_sample drain & drain_sampler=$!
first=""
for _ in $(seq 6000); do
  n=$(stored)
  [ -z "$first" ] && [ "$n" -gt "$before" ] && first=$(date +%s.%N)
  [ "$n" -ge "$target" ] && break
  sleep 0.2
done
t1=$(date +%s.%N)
wait "$drain_sampler" || true
tail -n 1 "$OUT/cpu.jsonl" | tee -a "$OUT/results.jsonl"
python3 - "$before" "$target" "$(stored)" "$t0" "${first:-$t1}" "$t1" <<'EOF' | tee -a "$OUT/results.jsonl"
import json, sys
before, target, stored = map(int, sys.argv[1:4])
t0, first, t1 = map(float, sys.argv[4:7])
rows = stored - before
print(json.dumps({"check": "drain", "queued": target - before, "stored": rows,
                  "seconds_from_start": round(t1 - t0, 2),
                  "rows_per_s_from_start": round(rows / (t1 - t0)),
                  "rows_per_s_from_first_row": round(rows / max(t1 - first, 1e-9))}))
EOF
fi

echo "== 8. broker confirm wait (every publish of the run, gateway /metrics)"
curl -fsS "$GWURL/metrics" | python3 -c '
import json, sys
b = []
for line in sys.stdin:
    if line.startswith("publish_confirm_seconds_bucket"):
        le = line.split("le=\"")[1].split("\"")[0]
        b.append((float("inf") if le == "+Inf" else float(le), float(line.split()[-1])))
total = b[-1][1] if b else 0
out = {"check": "publish_confirm_ms", "publishes": int(total)}
for q in (0.5, 0.9, 0.99):
    out["p%d_at_most" % round(q * 100)] = next((le * 1000 for le, n in b if n >= q * total), None)
out["over_10ms_percent"] = round(100 * (1 - next(n for le, n in b if le >= 0.01) / total), 1) if total else None
print(json.dumps(out))' | tee -a "$OUT/results.jsonl"

echo "== 9. peak RSS"
stop_worker
echo "{\"check\":\"peak_rss_mib\",\"gateway\":$(( $(hwm_kb "$GW") / 1024 )),\"worker\":$((WORKER_HWM_KB / 1024))}" | tee -a "$OUT/results.jsonl"
echo "bench: results in $OUT/results.jsonl"
