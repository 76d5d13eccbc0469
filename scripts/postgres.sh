#!/usr/bin/env bash
# Starts (once) a throwaway PostgreSQL cluster for the tests on 127.0.0.1 and prints its URL.
# The tests create and drop their own databases in it. Stop it with: scripts/postgres.sh stop
set -euo pipefail
dir=${SCXNN_PG_DIR:-/tmp/scxnn-test-pg}
port=${SCXNN_PG_PORT:-54329}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ "${1:-}" = "stop" ]; then
  as_postgres "$bin/pg_ctl" -D "$dir" -m fast stop >/dev/null 2>&1 || true
  exit 0
fi
fresh_cluster() {
  rm -rf "$dir"
  mkdir -p "$dir"
  if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir"; fi
  as_postgres "$bin/initdb" -D "$dir" -A trust -U postgres >/dev/null
}
start() {
  as_postgres "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
    -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
}
if ! "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
  as_postgres "$bin/pg_ctl" -D "$dir" -m immediate stop >/dev/null 2>&1 || true
  [ -f "$dir/PG_VERSION" ] || fresh_cluster
  start || { fresh_cluster; start; }  # a cluster left by a killed run: start over
fi
echo "postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
