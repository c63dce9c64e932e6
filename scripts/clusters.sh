#!/usr/bin/env bash
# Loopback clusters and TLS stores for the cluster/TLS tests (issue 20), started
# beside the machine's own services (Postgres 5432, Redis 6379, RabbitMQ 5672/25672),
# which this script never touches. State lives under target/clusters/.
#
#   scripts/clusters.sh start  [what...]   # idempotent; each part prints its seconds
#   scripts/clusters.sh stop   [what...]   # stops and wipes the part's data (certs are kept)
#   scripts/clusters.sh status [what...]   # up/down per part, and the RSS of what runs
#   scripts/clusters.sh env    [what...]   # KEY=value lines for the tests (--export: `export KEY='value'`)
#   scripts/clusters.sh check  [what...]   # re-run the checks of running parts
#
#   what: certs redis-cluster rabbit-cluster pg-tls redis-tls rabbit-tls redis-cluster-tls (default: all)
#
# Fault helpers for the node-failure tests:
#   scripts/clusters.sh kill-redis-master PORT      # kill -9, waits until the others flag it failed
#   scripts/clusters.sh restart-redis-master PORT   # back EMPTY with its nodes.conf: same slots, no data
#   scripts/clusters.sh stop-rabbit-node N          # N = 1..3 (rabbit-cN@localhost)
#   scripts/clusters.sh start-rabbit-node N
#   scripts/clusters.sh check-quorum                # a quorum queue keeps taking publishes with its leader stopped
#
# Ports: Redis Cluster 7001-7003 (bus 17001-17003); RabbitMQ rabbit-c{1,2,3}@localhost AMQP 5681-5683,
# AMQPS 5691-5693, distribution 25681-25683, no management/prometheus plugins; Postgres TLS 5442;
# Redis TLS 6390 (6391: a server whose certificate names wrong.invalid); a TLS-only Redis Cluster
# 7011-7013 (redis-cluster-tls, bus over TLS too). rabbit-tls is the TLS
# listeners of the cluster nodes, so it starts rabbit-cluster.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE="$ROOT/target/clusters"
HERE="$ROOT/scripts/clusters"
mkdir -p "$STATE"

# wait_until DESCRIPTION SECONDS COMMAND: polls COMMAND (eval'd) every 0.2 s.
wait_until() {
  local what=$1 secs=$2 cmd=$3 deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    if eval "$cmd" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "timed out after ${secs}s waiting for: $what" >&2
  return 1
}

# shellcheck source=clusters/certs.sh
. "$HERE/certs.sh"
# shellcheck source=clusters/redis.sh
. "$HERE/redis.sh"
# shellcheck source=clusters/rabbit.sh
. "$HERE/rabbit.sh"
# shellcheck source=clusters/pg.sh
. "$HERE/pg.sh"

ALL=(certs redis-cluster rabbit-cluster pg-tls redis-tls rabbit-tls redis-cluster-tls)
fn_of() { # part -> function prefix
  case $1 in
    certs) echo certs ;; redis-cluster) echo redis_cluster ;; rabbit-cluster) echo rabbit_cluster ;;
    pg-tls) echo pg_tls ;; redis-tls) echo redis_tls ;; rabbit-tls) echo rabbit_tls ;;
    redis-cluster-tls) echo redis_cluster_tls ;;
    *) echo "unknown part: $1 (one of: ${ALL[*]})" >&2; return 1 ;;
  esac
}

now() { date +%s.%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The RSS (MiB) of the given pids and all their descendants.
rss_mib() {
  [ $# -gt 0 ] || { echo 0; return; }
  ps -eo pid=,ppid=,rss= | awk -v roots="$*" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
    { ppid[$1] = $2; rss[$1] = $3 }
    END {
      changed = 1
      while (changed) { changed = 0; for (p in ppid) if (!(p in keep) && (ppid[p] in keep)) { keep[p] = 1; changed = 1 } }
      for (p in keep) if (p in rss) t += rss[p]
      printf "%.0f", t / 1024
    }'
}

pids_of() { case $1 in certs) ;; rabbit-tls) ;; *) "$(fn_of "$1")_pids" ;; esac; }

cmd=${1:-status}
[ $# -gt 0 ] && shift
case $cmd in
  start|stop|status|env|check)
    export_fmt=""
    if [ "${1:-}" = "--export" ]; then export_fmt=1; shift; fi
    parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=("${ALL[@]}")
    for p in "${parts[@]}"; do fn_of "$p" >/dev/null || exit 2; done
    ;;
esac

rc=0
case $cmd in
  start)
    total=$(now)
    for p in "${parts[@]}"; do
      t=$(now)
      if "$(fn_of "$p")_start"; then echo "$p: up in $(secs_since "$t")s"; else echo "$p: FAILED after $(secs_since "$t")s" >&2; rc=1; fi
    done
    echo "start: $(secs_since "$total")s in all"
    ;;
  stop)
    # Reverse order: rabbit-tls before rabbit-cluster, certs last (kept anyway).
    for ((i = ${#parts[@]} - 1; i >= 0; i--)); do
      p=${parts[$i]}; t=$(now)
      if "$(fn_of "$p")_stop"; then echo "$p: stopped in $(secs_since "$t")s"; else echo "$p: stop FAILED" >&2; rc=1; fi
    done
    ;;
  status)
    all_pids=()
    for p in "${parts[@]}"; do
      "$(fn_of "$p")_status" || rc=1
      mapfile -t ps_ < <(pids_of "$p")
      [ ${#ps_[@]} -gt 0 ] && { echo "  rss: $(rss_mib "${ps_[@]}") MiB"; all_pids+=("${ps_[@]}"); }
    done
    echo "rss of all of the above: $(rss_mib "${all_pids[@]}") MiB"
    ;;
  check)
    for p in "${parts[@]}"; do
      f="$(fn_of "$p")_check"
      if declare -F "$f" >/dev/null; then "$f" || rc=1; fi
    done
    ;;
  env)
    want() { local w; for w in "${parts[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }
    {
      for p in "${parts[@]}"; do "$(fn_of "$p")_env"; done
      # AMQP_URL: the TLS list when rabbit-tls is wanted (the cluster and TLS together), else the plain one.
      if want rabbit-tls; then rabbit_tls_urls | sed 's/^/AMQP_URL=/'; elif want rabbit-cluster; then rabbit_cluster_urls | sed 's/^/AMQP_URL=/'; fi
    } | awk -F= '!seen[$1]++' | if [ -n "$export_fmt" ]; then sed -E "s/^([A-Z0-9_]+)=(.*)$/export \1='\2'/"; else cat; fi
    ;;
  kill-redis-master) redis_kill_master "${1:?PORT}" || rc=1 ;;
  restart-redis-master) t=$(now); redis_restart_master "${1:?PORT}" && echo "in $(secs_since "$t")s" || rc=1 ;;
  stop-rabbit-node) t=$(now); rabbit_stop_node "${1:?N}" && echo "in $(secs_since "$t")s" || rc=1 ;;
  start-rabbit-node) t=$(now); rabbit_start_node "${1:?N}" && echo "in $(secs_since "$t")s" || rc=1 ;;
  check-quorum) rabbit_check_quorum || rc=1 ;;
  -h|--help|help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "unknown command: $cmd (see scripts/clusters.sh help)" >&2; rc=2 ;;
esac
exit $rc
