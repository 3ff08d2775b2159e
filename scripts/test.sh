#!/usr/bin/env bash
# Every test of the project, in order of cost: formatting and lints, unit
# tests, #[pg_test]s, pg_regress tests of the SQL surface, end-to-end tests on
# real clusters. Exits non-zero on the first failure.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings

step "unit tests (blockstream)"
cargo test --release -p blockstream --lib

step "engine tests without PostgreSQL (fake cluster; a repository in memory; encryption; every format's fixture)"
cargo test --release -p blockstream --test engine
cargo test --release -p blockstream --test memory_store
cargo test --release -p blockstream --test encryption

step "fuzzing: every decoder of data read from disk, 100,000 inputs each (FUZZ_ITERS=N for longer)"
cargo test --release -p blockstream --test fuzz

step "#[pg_test]s (pg_blocktrack)"
pgrx_data=/tmp/blocktrack-pgrx-test
rm -rf "$pgrx_data" && mkdir -p "$pgrx_data" && chown postgres "$pgrx_data"
(cd extension && cargo pgrx test pg15 --runas postgres --pgdata "$pgrx_data")
# cargo pgrx test installs its debug build (with the test schema); put the release build back.
(cd extension && cargo pgrx install --release -c "$PG_CONFIG" >/dev/null)

step "pg_regress (SQL surface)"
bash regress/run.sh

step "change tracking tests (real clusters, pg_walinspect as oracle)"
cargo test --release -p blockstream --test tracking -- --test-threads=1

step "end-to-end tests (real clusters)"
cargo test --release -p blockstream --test e2e -- --test-threads=1

step "object storage: the S3 driver and one suite on both drivers (3-node Garage cluster)"
bash scripts/garage.sh start
trap 'bash scripts/garage.sh stop' EXIT
(
  source /tmp/blockstream-garage/env
  cargo test --release -p blockstream --test s3_store
  cargo test --release -p blockstream --test drivers -- --test-threads=1
)
bash scripts/garage.sh stop

step "incremental backup tests (real clusters)"
cargo test --release -p blockstream --test incremental -- --test-threads=1

step "backups from a streaming standby (full and incremental under pgbench on the primary, promotion)"
cargo test --release -p blockstream --test standby -- --test-threads=1

step "restore modes (--delta over a diverged data directory, killed and rerun; --db-include)"
cargo test --release -p blockstream --test restore_modes -- --test-threads=1

step "validation tests (checksums, verify, validate_backup, drill)"
cargo test --release -p blockstream --test validation -- --test-threads=1

step "security tests (hostile repositories, grantees, --force, root, drill, modes, TLS)"
cargo test --release -p blockstream --test security -- --test-threads=1

step "operations tests (pg_cron, run_backup and its cancel, progress view, metrics, retention, report)"
cargo test --release -p blockstream --test operations -- --test-threads=1

step "fault tests (kill -9 at every failpoint, server stopped, disks full, two at once)"
cargo test --release -p blockstream --test faults -- --test-threads=1

step "WAL archive and PITR tests (archive-push sync and async, every recovery target, timelines, gaps, wal-receive)"
cargo test --release -p blockstream --test pitr -- --test-threads=1

# PostgreSQL 18 on every run; 16 and 17 (and all three) with
# `bash scripts/test-versions.sh`, documented in the README.
bash scripts/test-versions.sh 18

step "benchmark harness, quick mode (keeps bench/ from rotting; figures come from the full run)"
python3 bench/bench.py --quick

step "WAL archive benchmark, quick mode (push, PITR and RPO against pgBackRest)"
python3 bench/archive.py --quick

step "all tests passed"
