# Sourced by the scripts that run a gateway and a worker of their own against the
# local services (schemathesis.sh, ts-client.sh, dashboard-test.sh):
#   own_stack TAG     sets ID (TAG_<time>_<pid>: database, Redis key prefix and AMQP
#                     namespace), ADMIN_URL, DB_URL, PORT, WPORT, LOGS, GW and WK, and
#                     a cleanup on EXIT that stops both processes and drops the
#                     database, the keys, the queues and the exchanges.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
own_stack() {
  OWN_TAG=$1
  ID="${OWN_TAG}_$(date +%s)_$$"
  ADMIN_URL=${TEST_DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  DB_URL="${ADMIN_URL%/*}/$ID"
  PORT=$(free_port); WPORT=$(free_port)
  LOGS=$(mktemp -d)
  GW=""; WK=""
  trap own_stack_cleanup EXIT
}
own_stack_cleanup() {
  set +e
  [ -n "$GW" ] && kill -TERM "$GW" 2>/dev/null && wait "$GW" 2>/dev/null
  [ -n "$WK" ] && kill -TERM "$WK" 2>/dev/null && wait "$WK" 2>/dev/null
  psql "$ADMIN_URL" -qtAc "drop database if exists \"$ID\" with (force)" >/dev/null 2>&1
  redis-cli --scan --pattern "$ID:*" | xargs -r -n 500 redis-cli del >/dev/null 2>&1
  for q in usage credits sessions users dead; do rabbitmqctl -q delete_queue "$ID.$q" >/dev/null 2>&1; done
  for x in events dlx; do
    rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$ID.$x\">>), false, <<\"$OWN_TAG\">>)." >/dev/null 2>&1
  done
  rm -rf "$LOGS"
}
