# shellcheck shell=bash
# Parts "redis-cluster" (three masters on 7001-7003, no replicas, no persistence,
# cluster-require-full-coverage no) and "redis-tls" (TLS only on 6390; 6391 serves
# the wrong-host certificate) of scripts/clusters.sh. Sourced, not run.

REDIS_CLUSTER_PORTS=(7001 7002 7003)
REDIS_TLS_PORT=6390
REDIS_TLS_WRONG_PORT=6391
RC_DIR="$STATE/redis-cluster"
RT_DIR="$STATE/redis-tls"

_rc() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}"; }
_redis_pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# One cluster node. An existing nodes.conf is kept (the node comes back with its
# slots); any data file is removed first, so a (re)start is always empty.
_rc_node_start() {
  local p=$1 d="$RC_DIR/$1"
  if [ "$(_rc "$p" ping 2>/dev/null)" = PONG ]; then return 0; fi
  mkdir -p "$d" && rm -rf "$d/dump.rdb" "$d/appendonlydir"
  redis-server --port "$p" --bind 127.0.0.1 --daemonize yes --dir "$d" \
    --pidfile "$d/redis.pid" --logfile "$d/redis.log" --save "" --appendonly no \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --cluster-require-full-coverage no --maxmemory-policy noeviction
  wait_until "redis $p answers" 20 "[ \"\$(_rc $p ping 2>/dev/null)\" = PONG ]"
}

_rc_state_ok() { _rc "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }
_rc_all_ok() { local p; for p in "${REDIS_CLUSTER_PORTS[@]}"; do _rc_state_ok "$p" || return 1; done; }

redis_cluster_up() { _rc_all_ok; }

redis_cluster_start() {
  local p nodes=()
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do _rc_node_start "$p" || return 1; nodes+=("127.0.0.1:$p"); done
  if [ "$(_rc "${REDIS_CLUSTER_PORTS[0]}" cluster info | awk -F: '/^cluster_slots_assigned/{print $2+0}')" = 0 ]; then
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$RC_DIR/create.log" 2>&1 \
      || { cat "$RC_DIR/create.log" >&2; return 1; }
  fi
  wait_until "redis-cluster state ok on every node" 60 _rc_all_ok
}

redis_cluster_stop() {
  local p
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do
    _rc "$p" shutdown nosave >/dev/null 2>&1 || true
    _redis_pid_alive "$RC_DIR/$p/redis.pid" && kill "$(cat "$RC_DIR/$p/redis.pid")" 2>/dev/null
  done
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do
    wait_until "redis $p stopped" 20 "! _redis_pid_alive '$RC_DIR/$p/redis.pid'" || return 1
  done
  rm -rf "$RC_DIR" # the next start builds a fresh cluster
}

redis_cluster_status() {
  local p out=() rc=0
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do
    if _rc_state_ok "$p"; then out+=("$p:ok(keys=$(_rc "$p" dbsize))");
    elif [ "$(_rc "$p" ping 2>/dev/null)" = PONG ]; then out+=("$p:up,cluster-not-ok"); rc=1;
    else out+=("$p:down"); rc=1; fi
  done
  echo "redis-cluster: ${out[*]}"
  return $rc
}

redis_cluster_pids() { local p; for p in "${REDIS_CLUSTER_PORTS[@]}"; do _redis_pid_alive "$RC_DIR/$p/redis.pid" && cat "$RC_DIR/$p/redis.pid"; done; return 0; }

redis_cluster_env() {
  local p urls=()
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do urls+=("redis://127.0.0.1:$p"); done
  echo "REDIS_CLUSTER_URLS=$(IFS=,; echo "${urls[*]}")"
}

_rc_port_known() { local p; for p in "${REDIS_CLUSTER_PORTS[@]}"; do [ "$p" = "$1" ] && return 0; done; echo "not a cluster port: $1" >&2; return 1; }

# kill -9 one master, then wait until the other masters flag it as failed.
redis_kill_master() {
  local port=$1 other
  _rc_port_known "$port" || return 1
  _redis_pid_alive "$RC_DIR/$port/redis.pid" || { echo "redis $port is not running"; return 0; }
  local id; id=$(_rc "$port" cluster myid)
  kill -9 "$(cat "$RC_DIR/$port/redis.pid")"
  wait_until "redis $port gone" 10 "! _redis_pid_alive '$RC_DIR/$port/redis.pid'" || return 1
  for other in "${REDIS_CLUSTER_PORTS[@]}"; do
    [ "$other" = "$port" ] && continue
    wait_until "redis $other sees $port as failed" 30 "_rc $other cluster nodes | grep '^$id ' | grep -q ',fail'" || return 1
  done
  echo "redis $port: killed (kill -9); the other masters flag it failed and keep serving their slots"
}

# Start the killed master again, empty, with its nodes.conf: it comes back with its own slots.
redis_restart_master() {
  local port=$1
  _rc_port_known "$port" || return 1
  _rc_node_start "$port" || return 1
  wait_until "redis-cluster state ok on every node" 60 _rc_all_ok || return 1
  local slots keys
  slots=$(_rc "$port" cluster nodes | awk '$3 ~ /myself/ {n=0; for (i=9; i<=NF; i++) n++; print n}')
  keys=$(_rc "$port" dbsize)
  if [ "${slots:-0}" -lt 1 ] || [ "$keys" != 0 ]; then
    echo "redis $port: rejoined with slot ranges=$slots keys=$keys (expected >=1 and 0)" >&2; return 1
  fi
  echo "redis $port: restarted empty (keys=$keys), rejoined with its $slots slot range(s), cluster_state ok"
}

_rt_server() { # port, cert name, dir
  local d=$3
  mkdir -p "$d"
  redis-server --port 0 --tls-port "$1" --bind 127.0.0.1 --daemonize yes --dir "$d" \
    --pidfile "$d/redis.pid" --logfile "$d/redis.log" --save "" --appendonly no --maxmemory-policy noeviction \
    --tls-cert-file "$CERTS/$2.crt" --tls-key-file "$CERTS/$2.key" --tls-ca-cert-file "$CERTS/ca.crt" \
    --tls-auth-clients yes
}

_rt_cli() { # port, extra args...
  redis-cli --tls --cacert "$CERTS/ca.crt" --cert "$CERTS/client.crt" --key "$CERTS/client.key" -h localhost -p "$1" "${@:2}"
}

redis_tls_up() { [ "$(_rt_cli "$REDIS_TLS_PORT" ping 2>/dev/null)" = PONG ] && _redis_pid_alive "$RT_DIR/wrong/redis.pid"; }

redis_tls_start() {
  certs_start >/dev/null || return 1
  _redis_pid_alive "$RT_DIR/main/redis.pid" || _rt_server "$REDIS_TLS_PORT" server "$RT_DIR/main" || return 1
  _redis_pid_alive "$RT_DIR/wrong/redis.pid" || _rt_server "$REDIS_TLS_WRONG_PORT" wrong-host "$RT_DIR/wrong" || return 1
  wait_until "redis-tls answers" 20 "[ \"\$(_rt_cli $REDIS_TLS_PORT ping 2>/dev/null)\" = PONG ]" || return 1
  redis_tls_check
}

# The checks: a client with the CA and the client cert gets in; without a client
# cert, with the wrong CA, in plain text, or at the wrong-host server it does not.
redis_tls_check() {
  local bad=0
  [ "$(_rt_cli "$REDIS_TLS_PORT" ping 2>&1)" = PONG ] || { echo "redis-tls: verified client refused" >&2; bad=1; }
  [ "$(redis-cli --tls --cacert "$CERTS/ca.crt" -h localhost -p "$REDIS_TLS_PORT" ping 2>&1)" = PONG ] \
    && { echo "redis-tls: a client without a certificate got in" >&2; bad=1; }
  [ "$(redis-cli --tls --cacert "$CERTS/wrong-ca.crt" --cert "$CERTS/client.crt" --key "$CERTS/client.key" \
    -h localhost -p "$REDIS_TLS_PORT" ping 2>&1)" = PONG ] && { echo "redis-tls: the wrong CA was accepted" >&2; bad=1; }
  [ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_TLS_PORT" ping 2>&1)" = PONG ] && { echo "redis-tls: plain text answered" >&2; bad=1; }
  # redis-cli verifies the chain but not the host name: check the name with openssl.
  echo | timeout 5 openssl s_client -connect "127.0.0.1:$REDIS_TLS_WRONG_PORT" -CAfile "$CERTS/ca.crt" \
    -cert "$CERTS/client.crt" -key "$CERTS/client.key" -verify_hostname localhost -verify_return_error >/dev/null 2>&1 \
    && { echo "redis-tls: the wrong-host cert passed a localhost name check" >&2; bad=1; }
  [ $bad = 0 ] && echo "redis-tls: checked (client cert required; wrong CA, plain text, wrong host refused)"
  return $bad
}

redis_tls_stop() {
  local d
  for d in main wrong; do
    _redis_pid_alive "$RT_DIR/$d/redis.pid" && kill "$(cat "$RT_DIR/$d/redis.pid")" 2>/dev/null
    wait_until "redis-tls $d stopped" 20 "! _redis_pid_alive '$RT_DIR/$d/redis.pid'" || return 1
  done
  rm -rf "$RT_DIR"
}

redis_tls_status() {
  if redis_tls_up; then echo "redis-tls: up on $REDIS_TLS_PORT (keys=$(_rt_cli "$REDIS_TLS_PORT" dbsize)), wrong-host on $REDIS_TLS_WRONG_PORT";
  else echo "redis-tls: down"; return 1; fi
}
redis_tls_pids() { local d; for d in main wrong; do _redis_pid_alive "$RT_DIR/$d/redis.pid" && cat "$RT_DIR/$d/redis.pid"; done; return 0; }
redis_tls_env() {
  echo "REDIS_URL=rediss://localhost:$REDIS_TLS_PORT"
  echo "CLUSTER_TLS_REDIS_URL=rediss://localhost:$REDIS_TLS_PORT"
  echo "CLUSTER_TLS_REDIS_WRONG_HOST_URL=rediss://localhost:$REDIS_TLS_WRONG_PORT"
}

# Part "redis-cluster-tls": three TLS-only masters on 7011-7013 (bus 17011-17013, over TLS too),
# client certificates required, for the run with the cluster and TLS together.
REDIS_CLUSTER_TLS_PORTS=(7011 7012 7013)
RCT_DIR="$STATE/redis-cluster-tls"

_rct_node_start() {
  local p=$1 d="$RCT_DIR/$1"
  if [ "$(_rt_cli "$p" ping 2>/dev/null)" = PONG ]; then return 0; fi
  mkdir -p "$d" && rm -rf "$d/dump.rdb" "$d/appendonlydir"
  redis-server --port 0 --tls-port "$p" --bind 127.0.0.1 --daemonize yes --dir "$d" \
    --pidfile "$d/redis.pid" --logfile "$d/redis.log" --save "" --appendonly no \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --cluster-require-full-coverage no --maxmemory-policy noeviction \
    --tls-cluster yes --tls-replication yes --tls-auth-clients yes \
    --tls-cert-file "$CERTS/server.crt" --tls-key-file "$CERTS/server.key" --tls-ca-cert-file "$CERTS/ca.crt" \
    --tls-client-cert-file "$CERTS/client.crt" --tls-client-key-file "$CERTS/client.key"
  wait_until "redis tls $p answers" 20 "[ \"\$(_rt_cli $p ping 2>/dev/null)\" = PONG ]"
}

_rct_all_ok() { local p; for p in "${REDIS_CLUSTER_TLS_PORTS[@]}"; do _rt_cli "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1; done; }

redis_cluster_tls_up() { _rct_all_ok; }

redis_cluster_tls_start() {
  certs_start >/dev/null || return 1
  local p nodes=()
  for p in "${REDIS_CLUSTER_TLS_PORTS[@]}"; do _rct_node_start "$p" || return 1; nodes+=("127.0.0.1:$p"); done
  if [ "$(_rt_cli "${REDIS_CLUSTER_TLS_PORTS[0]}" cluster info | awk -F: '/^cluster_slots_assigned/{print $2+0}')" = 0 ]; then
    redis-cli --tls --cacert "$CERTS/ca.crt" --cert "$CERTS/client.crt" --key "$CERTS/client.key" \
      --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$RCT_DIR/create.log" 2>&1 \
      || { cat "$RCT_DIR/create.log" >&2; return 1; }
  fi
  wait_until "redis-cluster-tls state ok on every node" 60 _rct_all_ok || return 1
  [ "$(timeout 5 redis-cli -h 127.0.0.1 -p "${REDIS_CLUSTER_TLS_PORTS[0]}" ping 2>&1)" = PONG ] \
    && { echo "redis-cluster-tls: plain text answered" >&2; return 1; }
  echo "redis-cluster-tls: checked (TLS only, bus over TLS, client cert required)"
}

redis_cluster_tls_stop() {
  local p
  for p in "${REDIS_CLUSTER_TLS_PORTS[@]}"; do
    _rt_cli "$p" shutdown nosave >/dev/null 2>&1 || true
    _redis_pid_alive "$RCT_DIR/$p/redis.pid" && kill "$(cat "$RCT_DIR/$p/redis.pid")" 2>/dev/null
  done
  for p in "${REDIS_CLUSTER_TLS_PORTS[@]}"; do
    wait_until "redis tls $p stopped" 20 "! _redis_pid_alive '$RCT_DIR/$p/redis.pid'" || return 1
  done
  rm -rf "$RCT_DIR"
}

redis_cluster_tls_status() {
  if _rct_all_ok; then echo "redis-cluster-tls: ok on ${REDIS_CLUSTER_TLS_PORTS[*]}"; else echo "redis-cluster-tls: down"; return 1; fi
}
redis_cluster_tls_pids() { local p; for p in "${REDIS_CLUSTER_TLS_PORTS[@]}"; do _redis_pid_alive "$RCT_DIR/$p/redis.pid" && cat "$RCT_DIR/$p/redis.pid"; done; return 0; }
redis_cluster_tls_env() {
  local p urls=()
  for p in "${REDIS_CLUSTER_TLS_PORTS[@]}"; do urls+=("rediss://127.0.0.1:$p"); done
  echo "CLUSTER_TLS_REDIS_CLUSTER_URLS=$(IFS=,; echo "${urls[*]}")"
}
