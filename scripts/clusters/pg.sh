# shellcheck shell=bash
# Part "pg-tls" of scripts/clusters.sh: a second Postgres 15 (initdb into
# target/clusters/pg, run as the postgres user) on 5442 with ssl = on. hostssl
# connections are trusted, plain-text ones rejected. Sourced, not run.

PG_PORT=5442
PG_DIR="$STATE/pg"
PG_BIN=$(ls -d /usr/lib/postgresql/15/bin 2>/dev/null || ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1)

_pg_as() { su postgres -s /bin/sh -c "$*"; }
_pg_psql() { psql "host=localhost port=$PG_PORT user=postgres dbname=postgres $1" -tAqX -c "$2"; }
_pg_tls() { _pg_psql "sslmode=verify-full sslrootcert=$CERTS/ca.crt" "$1"; }

pg_tls_up() { [ -f "$PG_DIR/data/postmaster.pid" ] && _pg_tls "select 1" 2>/dev/null | grep -q '^1$'; }

_pg_init() {
  rm -rf "$PG_DIR" && mkdir -p "$PG_DIR/run"
  # The server key must belong to the server's user, mode 0600.
  cp "$CERTS/server.crt" "$CERTS/server.key" "$CERTS/ca.crt" "$PG_DIR/"
  chmod 0600 "$PG_DIR/server.key"
  chown -R postgres:postgres "$PG_DIR"
  _pg_as "'$PG_BIN/initdb' -D '$PG_DIR/data' -U postgres --auth=trust -E UTF8 --no-instructions" >"$PG_DIR/initdb.log" 2>&1 \
    || { cat "$PG_DIR/initdb.log" >&2; return 1; }
  cat >>"$PG_DIR/data/postgresql.conf" <<CONF
# scripts/clusters.sh pg-tls
port = $PG_PORT
listen_addresses = '127.0.0.1,::1'
unix_socket_directories = '$PG_DIR/run'
ssl = on
ssl_cert_file = '$PG_DIR/server.crt'
ssl_key_file = '$PG_DIR/server.key'
ssl_ca_file = '$PG_DIR/ca.crt'
max_connections = 200
shared_buffers = 32MB
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  cat >"$PG_DIR/data/pg_hba.conf" <<HBA
# scripts/clusters.sh pg-tls: TLS or nothing over TCP; the socket is for this script.
local     all all               trust
hostssl   all all 127.0.0.1/32  trust
hostssl   all all ::1/128       trust
hostnossl all all 0.0.0.0/0     reject
hostnossl all all ::/0          reject
HBA
}

pg_tls_start() {
  certs_start >/dev/null || return 1
  if ! pg_tls_up; then
    [ -f "$PG_DIR/data/PG_VERSION" ] || _pg_init || return 1
    _pg_as "'$PG_BIN/pg_ctl' -D '$PG_DIR/data' -l '$PG_DIR/postgres.log' -w -t 60 start" >/dev/null \
      || { tail -20 "$PG_DIR/postgres.log" >&2; return 1; }
  fi
  wait_until "pg-tls answers over TLS" 30 pg_tls_up || return 1
  pg_tls_check
}

# verify-full with the CA works and is TLS; the wrong CA, plain text and a
# host name not in the certificate are refused; postgres can create databases.
pg_tls_check() {
  local bad=0
  [ "$(_pg_tls "select ssl from pg_stat_ssl where pid = pg_backend_pid()" 2>&1)" = t ] \
    || { echo "pg-tls: verify-full with the CA failed" >&2; bad=1; }
  _pg_tls "create database clusters_check" >/dev/null 2>&1 && _pg_tls "drop database clusters_check" >/dev/null 2>&1 \
    || { echo "pg-tls: postgres cannot create a database" >&2; bad=1; }
  _pg_psql "sslmode=verify-full sslrootcert=$CERTS/wrong-ca.crt" "select 1" >/dev/null 2>&1 \
    && { echo "pg-tls: the wrong CA was accepted" >&2; bad=1; }
  _pg_psql "sslmode=disable" "select 1" >/dev/null 2>&1 && { echo "pg-tls: plain text was accepted" >&2; bad=1; }
  psql "host=127.0.0.2 hostaddr=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres sslmode=verify-full sslrootcert=$CERTS/ca.crt" \
    -tAqX -c "select 1" >/dev/null 2>&1 && { echo "pg-tls: a host name outside the certificate was accepted" >&2; bad=1; }
  [ $bad = 0 ] && echo "pg-tls: checked (verify-full ok; wrong CA, plain text, wrong host name refused)"
  return $bad
}

pg_tls_stop() {
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then
    _pg_as "'$PG_BIN/pg_ctl' -D '$PG_DIR/data' -m fast -w -t 60 stop" >/dev/null || return 1
  fi
  rm -rf "$PG_DIR"
}

pg_tls_status() {
  if pg_tls_up; then echo "pg-tls: up on $PG_PORT ($(_pg_tls "select count(*) from pg_database where not datistemplate") databases)";
  else echo "pg-tls: down"; return 1; fi
}
pg_tls_pids() { [ -f "$PG_DIR/data/postmaster.pid" ] && head -1 "$PG_DIR/data/postmaster.pid"; return 0; }
pg_tls_env() {
  local url="postgres://postgres@localhost:$PG_PORT/postgres?sslmode=verify-full&sslrootcert=$CERTS/ca.crt"
  echo "DATABASE_URL=$url"
  echo "CLUSTER_TLS_DATABASE_URL=$url"
}
