#!/usr/bin/env bash
# The suites that must pass on every supported PostgreSQL version, on 16, 17
# and 18 (15 runs them in scripts/test.sh): change tracking against the
# pg_walinspect oracle (and against pg_walsummary on 17+), the end-to-end
# backup and restore under pgbench, the incremental chains, validation
# (page checksums against the server's own function, verify, drill), and
# backups from a streaming standby.
#
#   bash scripts/test-versions.sh [16 17 18]     (default: all three)
#
# Run as root after scripts/setup.sh. Downloads and unpacks the servers once
# (scripts/pg-versions.sh), builds and installs pg_blocktrack into each.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

versions=("$@")
((${#versions[@]})) || versions=(16 17 18)
for v in "${versions[@]}"; do
  case $v in 16 | 17 | 18) ;; *) echo "usage: bash scripts/test-versions.sh [16 17 18]" >&2; exit 2 ;; esac
done

step "PostgreSQL ${versions[*]}: servers"
bash scripts/pg-versions.sh install "${versions[@]}"
bash scripts/pg-versions.sh pgrx-init
cargo build --release -p blockstream

for v in "${versions[@]}"; do
  pg_config=$(bash scripts/pg-versions.sh pg_config "$v")
  step "PostgreSQL $v: clippy, build and install pg_blocktrack"
  cargo clippy --release -p pg_blocktrack --no-default-features --features "pg$v" -- -D warnings
  (cd extension && cargo pgrx install --release -c "$pg_config" >/dev/null)
  for suite in tracking e2e incremental validation standby; do
    step "PostgreSQL $v: $suite tests"
    PG_BINDIR=$(bash scripts/pg-versions.sh bindir "$v") \
      cargo test --release -p blockstream --test "$suite" -- --test-threads=1
  done
done
step "PostgreSQL ${versions[*]}: all passed"
