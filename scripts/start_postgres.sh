#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the budgetsearch worker tests.
#
#   url=$(scripts/start_postgres.sh)            # prints postgresql://postgres@127.0.0.1:PORT/budgetsearch
#   BUDGETSEARCH_TEST_POSTGRES_URL=$url pytest tests/search/test_search_workers.py
#   scripts/start_postgres.sh --stop "$url"     # stops it and deletes its directory
#
# Installs PostgreSQL from the Debian packages when no server binaries are found (needs root or
# sudo), then runs initdb in a new temporary directory and starts the server listening on
# 127.0.0.1 only (no Unix socket outside that directory), on a free port, with trust
# authentication for the local user "postgres" and fsync off (a test server: nothing in it is
# meant to survive). Progress goes to stderr; stdout carries only the URL.
set -euo pipefail

log() { echo "start_postgres: $*" >&2; }

as_owner() {  # run a command as the server's owner (postgres when we are root)
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

find_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then
    echo "$d"
  elif command -v initdb >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
  fi
}

state_dir_of() {  # the directory a URL's server lives in (recorded at start)
  local port=${1##*:}
  port=${port%%/*}
  cat "${TMPDIR:-/tmp}/budgetsearch-pg-$port.dir" 2>/dev/null || true
}

if [ "${1:-}" = "--stop" ]; then
  url=${2:?usage: start_postgres.sh --stop URL}
  dir=$(state_dir_of "$url")
  [ -n "$dir" ] && [ -d "$dir" ] || { log "no server recorded for $url"; exit 1; }
  bin=$(find_bin)
  as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >&2 || true
  port=${url##*:}; port=${port%%/*}
  rm -rf "$dir" "${TMPDIR:-/tmp}/budgetsearch-pg-$port.dir"
  log "stopped $url"
  exit 0
fi

bin=$(find_bin)
if [ -z "$bin" ]; then
  log "installing PostgreSQL from the Debian packages"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    postgresql >&2
  bin=$(find_bin)
  [ -n "$bin" ] || { log "PostgreSQL installed but initdb not found"; exit 1; }
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/budgetsearch-pg.XXXXXX")
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres: "$dir"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

log "initdb in $dir (PostgreSQL $("$bin/postgres" --version | awk '{print $NF}'))"
as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c max_connections=100" \
  start >&2 || { cat "$dir/server.log" >&2; exit 1; }
as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres budgetsearch
echo "$dir" >"${TMPDIR:-/tmp}/budgetsearch-pg-$port.dir"
log "server running on 127.0.0.1:$port (data in $dir); stop it with: $0 --stop URL"
echo "postgresql://postgres@127.0.0.1:$port/budgetsearch"
