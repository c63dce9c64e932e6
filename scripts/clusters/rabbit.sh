# shellcheck shell=bash
# Parts "rabbit-cluster" (rabbit-c1..c3@localhost, AMQP 5681-5683, distribution
# 25681-25683, no plugins, their own cookie, data, logs and config) and "rabbit-tls"
# (the AMQPS listeners 5691-5693 of the same nodes) of scripts/clusters.sh.
# Sourced, not run. The machine's node (rabbit@localhost, 5672/25672) is never
# addressed: every rabbitmqctl call here names one of ours with -n.

RB_DIR="$STATE/rabbit"
RB_BIN=/usr/lib/rabbitmq/bin
RB_NODES=(1 2 3)
RB_HOME="$RB_DIR/home" # holds this cluster's own .erlang.cookie for servers and CLI tools

_rb_name() { echo "rabbit-c$1@localhost"; }
_rb_amqp() { echo $((5680 + $1)); }
_rb_amqps() { echo $((5690 + $1)); }
_rb_dist() { echo $((25680 + $1)); }

# Everything a server or CLI of node $1 needs in its environment. The machine's
# /etc/rabbitmq/rabbitmq-env.conf (which names rabbit@localhost) is not read.
_rb_env() {
  local n=$1 d="$RB_DIR/c$1"
  echo HOME="$RB_HOME" RABBITMQ_CONF_ENV_FILE="$RB_DIR/rabbitmq-env.conf" \
    RABBITMQ_NODENAME="$(_rb_name "$n")" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$(_rb_amqp "$n")" \
    RABBITMQ_DIST_PORT="$(_rb_dist "$n")" RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RB_DIR/enabled_plugins" RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/rabbit.pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="'-kernel inet_dist_use_interface {127,0,0,1}'"
}
_rbctl() { # node, rabbitmqctl args...
  env HOME="$RB_HOME" RABBITMQ_CONF_ENV_FILE="$RB_DIR/rabbitmq-env.conf" \
    "$RB_BIN/rabbitmqctl" -n "$(_rb_name "$1")" "${@:2}"
}
_rb_pid() { local f="$RB_DIR/c$1/rabbit.pid"; [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && echo "$(cat "$f")"; }
_rb_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

_rb_layout() {
  mkdir -p "$RB_HOME"
  if [ ! -s "$RB_HOME/.erlang.cookie" ]; then
    (umask 077; head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RB_HOME/.erlang.cookie")
  fi
  chmod 0400 "$RB_HOME/.erlang.cookie"
  echo "[]." >"$RB_DIR/enabled_plugins"
  echo "# scripts/clusters.sh: keeps /etc/rabbitmq/rabbitmq-env.conf out" >"$RB_DIR/rabbitmq-env.conf"
  local n d
  for n in "${RB_NODES[@]}"; do
    d="$RB_DIR/c$n"; mkdir -p "$d/mnesia" "$d/log"
    cat >"$d/rabbitmq.conf" <<CONF
# scripts/clusters.sh: node $(_rb_name "$n")
listeners.tcp.1 = 127.0.0.1:$(_rb_amqp "$n")
listeners.ssl.1 = 127.0.0.1:$(_rb_amqps "$n")
ssl_options.cacertfile = $CERTS/ca.crt
ssl_options.certfile = $CERTS/server.crt
ssl_options.keyfile = $CERTS/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
distribution.listener.interface = 127.0.0.1
distribution.listener.port_range.min = $(_rb_dist "$n")
distribution.listener.port_range.max = $(_rb_dist "$n")
log.file.level = info
log.console = false
CONF
  done
}

# Start the server of node $1 (if not running) and wait until its app runs. A
# node that was in the cluster comes back into it from its own data.
_rb_spawn() {
  local n=$1 d="$RB_DIR/c$1"
  _rb_pid "$n" >/dev/null && return 0
  if _rb_port_open "$(_rb_amqp "$n")" || _rb_port_open "$(_rb_dist "$n")"; then
    echo "$(_rb_name "$n"): port $(_rb_amqp "$n") or $(_rb_dist "$n") is taken by a process without our pid file" >&2
    return 1
  fi
  eval "setsid env $(_rb_env "$n") '$RB_BIN/rabbitmq-server'" >>"$d/server.out" 2>&1 </dev/null &
}
_rb_await() {
  local n=$1
  wait_until "$(_rb_name "$n") pid file" 60 "_rb_pid $n" || return 1
  timeout 300 env HOME="$RB_HOME" RABBITMQ_CONF_ENV_FILE="$RB_DIR/rabbitmq-env.conf" \
    "$RB_BIN/rabbitmqctl" -n "$(_rb_name "$n")" -q await_startup --timeout 290 >/dev/null 2>&1 \
    || { echo "$(_rb_name "$n") did not start; see $RB_DIR/c$n/log" >&2; return 1; }
  wait_until "$(_rb_name "$n") AMQP port" 30 "_rb_port_open $(_rb_amqp "$n")"
}

_rb_running() { # node to ask -> running node names, one a line
  _rbctl "$1" -q cluster_status --formatter json 2>/dev/null \
    | python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin).get("running_nodes", [])))' 2>/dev/null
}
_rb_members() {
  _rbctl "$1" -q cluster_status --formatter json 2>/dev/null \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print("\n".join(d.get("disk_nodes", []) + d.get("ram_nodes", [])))' 2>/dev/null
}
_rb_three_running() { [ "$(_rb_running 1 | grep -c '^rabbit-c[123]@localhost$')" = 3 ]; }

rabbit_cluster_up() { _rb_three_running; }

rabbit_cluster_start() {
  certs_start >/dev/null || return 1
  if _rb_three_running; then rabbit_cluster_check; return; fi
  _rb_layout
  local n
  for n in "${RB_NODES[@]}"; do _rb_spawn "$n" || return 1; done
  for n in "${RB_NODES[@]}"; do _rb_await "$n" || return 1; done
  for n in 2 3; do
    _rb_members 1 | grep -qx "$(_rb_name "$n")" && continue
    # A fresh node (no data yet): no reset needed before join_cluster.
    _rbctl "$n" -q stop_app >/dev/null 2>&1 && _rbctl "$n" -q join_cluster "$(_rb_name 1)" >/dev/null 2>&1 \
      && _rbctl "$n" -q start_app >/dev/null 2>&1 \
      || { echo "$(_rb_name "$n") could not join $(_rb_name 1)" >&2; return 1; }
  done
  wait_until "three running nodes in cluster_status" 120 _rb_three_running || return 1
  rabbit_cluster_check
}

rabbit_cluster_check() {
  local running; running=$(_rb_running 1 | tr '\n' ' ')
  if _rb_three_running; then echo "rabbit-cluster: checked (running: $running)"; return 0; fi
  echo "rabbit-cluster: not three running nodes (running: $running)" >&2; return 1
}

rabbit_cluster_stop() {
  local n
  for n in 3 2 1; do
    _rb_pid "$n" >/dev/null || continue
    _rbctl "$n" -q stop >/dev/null 2>&1 || kill "$(_rb_pid "$n")" 2>/dev/null
  done
  for n in "${RB_NODES[@]}"; do wait_until "$(_rb_name "$n") stopped" 60 "! _rb_pid $n" || return 1; done
  rm -rf "$RB_DIR" # the next start builds a fresh cluster (and a fresh cookie)
}

rabbit_cluster_status() {
  local n out=() rc=0
  for n in "${RB_NODES[@]}"; do
    if _rb_pid "$n" >/dev/null && _rb_port_open "$(_rb_amqp "$n")"; then out+=("c$n:up"); else out+=("c$n:down"); rc=1; fi
  done
  echo "rabbit-cluster: ${out[*]} (running per c1: $(_rb_running 1 | tr '\n' ' '))"
  return $rc
}
rabbit_cluster_pids() { local n; for n in "${RB_NODES[@]}"; do _rb_pid "$n"; done; return 0; }
rabbit_cluster_urls() {
  local n u=(); for n in "${RB_NODES[@]}"; do u+=("amqp://guest:guest@127.0.0.1:$(_rb_amqp "$n")/%2f"); done
  (IFS=,; echo "${u[*]}")
}
rabbit_tls_urls() {
  local n u=(); for n in "${RB_NODES[@]}"; do u+=("amqps://guest:guest@localhost:$(_rb_amqps "$n")/%2f"); done
  (IFS=,; echo "${u[*]}")
}
rabbit_cluster_env() {
  echo "CLUSTER_AMQP_URL=$(rabbit_cluster_urls)"
  echo "CLUSTER_RABBIT_NODES=$(_rb_name 1),$(_rb_name 2),$(_rb_name 3)"
}

_rb_node_known() { case $1 in 1|2|3) return 0 ;; *) echo "not a node number (1..3): $1" >&2; return 1 ;; esac; }
rabbit_stop_node() {
  _rb_node_known "$1" || return 1
  _rb_pid "$1" >/dev/null || { echo "$(_rb_name "$1") is not running"; return 0; }
  _rbctl "$1" -q stop >/dev/null 2>&1 || kill "$(_rb_pid "$1")" 2>/dev/null
  wait_until "$(_rb_name "$1") stopped" 60 "! _rb_pid $1" || return 1
  echo "$(_rb_name "$1"): stopped (still a cluster member)"
}
rabbit_start_node() {
  _rb_node_known "$1" || return 1
  [ -f "$RB_DIR/c$1/rabbitmq.conf" ] || { echo "no rabbit-cluster here: run scripts/clusters.sh start rabbit-cluster" >&2; return 1; }
  _rb_spawn "$1" && _rb_await "$1" || return 1
  wait_until "three running nodes in cluster_status" 120 _rb_three_running || return 1
  echo "$(_rb_name "$1"): running, back in the cluster"
}

# rabbit-tls: the AMQPS listeners of the cluster nodes.
rabbit_tls_up() { _rb_port_open "$(_rb_amqps 1)"; }
rabbit_tls_start() { rabbit_tls_up || rabbit_cluster_start >/dev/null || return 1; rabbit_tls_check; }
rabbit_tls_stop() { :; } # the listeners stop with rabbit-cluster
_rb_sclient() { # port, CA file, extra args...
  echo | timeout 10 openssl s_client -connect "127.0.0.1:$1" -CAfile "$2" -verify_hostname localhost \
    -verify_return_error "${@:3}" 2>&1
}
rabbit_tls_check() {
  local n bad=0 out
  for n in "${RB_NODES[@]}"; do
    _rb_pid "$n" >/dev/null || { echo "rabbit-tls: node $n down" >&2; bad=1; continue; }
    out=$(_rb_sclient "$(_rb_amqps "$n")" "$CERTS/ca.crt" -cert "$CERTS/client.crt" -key "$CERTS/client.key")
    grep -q 'Verify return code: 0 (ok)' <<<"$out" || { echo "rabbit-tls: $(_rb_amqps "$n") did not verify" >&2; bad=1; }
    _rb_sclient "$(_rb_amqps "$n")" "$CERTS/wrong-ca.crt" | grep -q 'Verify return code: 0 (ok)' \
      && { echo "rabbit-tls: $(_rb_amqps "$n") verified against the wrong CA" >&2; bad=1; }
  done
  [ $bad = 0 ] && echo "rabbit-tls: checked (AMQPS $(_rb_amqps 1)-$(_rb_amqps 3) verify for localhost; wrong CA refused)"
  return $bad
}
rabbit_tls_status() {
  local n out=()
  for n in "${RB_NODES[@]}"; do if _rb_port_open "$(_rb_amqps "$n")"; then out+=("$(_rb_amqps "$n"):up"); else out+=("$(_rb_amqps "$n"):down"); fi; done
  echo "rabbit-tls: ${out[*]}"
  rabbit_tls_up
}
rabbit_tls_env() { echo "CLUSTER_AMQPS_URL=$(rabbit_tls_urls)"; }

# A quorum queue declared on c1 (its leader there) keeps accepting confirmed
# publishes through c2 while c1 is stopped; c1 is started again afterwards.
rabbit_check_quorum() {
  _rb_three_running || { echo "rabbit-cluster is not running" >&2; return 1; }
  local venv="$STATE/venv"
  if ! "$venv/bin/python" -c 'import pika' 2>/dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install -q pika >/dev/null || { echo "could not install pika" >&2; return 1; }
  fi
  local t rc=0; t=$(now)
  "$venv/bin/python" "$HERE/quorum_check.py" "$(_rb_amqp 1)" "$(_rb_amqp 2)" \
    "$ROOT/scripts/clusters.sh stop-rabbit-node 1" "$ROOT/scripts/clusters.sh start-rabbit-node 1" || rc=1
  echo "check-quorum: $(secs_since "$t")s"
  return $rc
}
