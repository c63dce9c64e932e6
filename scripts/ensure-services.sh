#!/usr/bin/env bash
# Checks that Postgres, Redis and RabbitMQ answer on loopback and starts any
# that do not (the commands of this machine kind). Idempotent.
#
#   scripts/ensure-services.sh                       # what dev.sh and CI run
#   scripts/ensure-services.sh --drop-test-databases # also drop the t_* and devstack_*
#                                                    # databases interrupted test runs left
# Only scripts/test.sh passes the flag, before it starts the suite: anything else
# (dev.sh, which a test runs) must not drop the databases of tests still running.
set -uo pipefail
DROP_TEST_DBS=""
[ "${1:-}" = "--drop-test-databases" ] && DROP_TEST_DBS=1

wait_for() { # name, check command, tries
  local name=$1 check=$2 tries=${3:-60}
  for _ in $(seq "$tries"); do
    if eval "$check" >/dev/null 2>&1; then echo "$name: up"; return 0; fi
    sleep 1
  done
  echo "$name: did not come up" >&2
  return 1
}

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }
rabbit_up() { rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1 || (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! pg_up; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
if ! redis_up; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
if ! rabbit_up; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached || true
fi

wait_for postgres pg_up 60 || exit 1
wait_for redis redis_up 30 || exit 1
wait_for rabbitmq "rabbitmqctl -q await_startup" 120 || exit 1
# A stopped app (a fault test interrupted) would refuse connections.
rabbitmqctl -q start_app >/dev/null 2>&1 || true
wait_for rabbitmq-port rabbit_up 60 || exit 1
# SPEC §6: the Redis that holds credits must never evict keys.
redis-cli -h 127.0.0.1 config set maxmemory-policy noeviction >/dev/null || true

# Leftovers of interrupted test runs.
if [ -n "$DROP_TEST_DBS" ]; then
  psql -h 127.0.0.1 -U postgres -d postgres -tAc \
    "select 'drop database if exists \"' || datname || '\" with (force);' from pg_database where datname like 't\_%' or datname like 'devstack\_%'" \
    | psql -h 127.0.0.1 -U postgres -d postgres -q >/dev/null 2>&1 || true
fi
exit 0
