# Sourced by the other scripts: where PostgreSQL 15 lives, and helpers.
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
export PG_CONFIG PG_BINDIR
export PATH="$PG_BINDIR:$HOME/.cargo/bin:$PATH"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ROOT

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# Runs a command as the postgres user (initdb and the postmaster refuse root).
as_postgres() { runuser -u postgres -- "$@"; }

# start_cluster DIR PORT [CONF...]: initdb -k as postgres, the test settings
# of pg_test_configs/blocktrack.conf plus any CONF snippets, start.
start_cluster() {
  local dir=$1 port=$2; shift 2
  rm -rf "$dir"; mkdir -p "$dir"; chown postgres "$dir"
  as_postgres "$PG_BINDIR/initdb" -k -A trust -U postgres -D "$dir/data" >/dev/null
  cat "$ROOT/pg_test_configs/blocktrack.conf" "$@" >> "$dir/data/postgresql.conf"
  echo "port = $port" >> "$dir/data/postgresql.conf"
  as_postgres "$PG_BINDIR/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}

# stop_cluster DIR: fast shutdown, never by process name.
stop_cluster() {
  [ -f "$1/data/postmaster.pid" ] && as_postgres "$PG_BINDIR/pg_ctl" -D "$1/data" -m fast -w stop >/dev/null || true
}
