#!/usr/bin/env bash
# The main job on a throwaway cluster: pgbench data, a full backup, load, a
# block-level incremental backup, a parallel restore of the chain that is
# started and compared with the source, verify, and a one-screen summary.
# Usage: scripts/demo.sh [scale] [jobs]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
scale=${1:-${SCALE:-10}}
jobs=${2:-${JOBS:-$(nproc)}}
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
BS="$ROOT/target/release/blockstream"

demo=/tmp/blockstream-demo
port=5480
rport=5481
cleanup() {
  as_postgres "$PG_BINDIR/pg_ctl" -D "$demo/restored" -m fast -w stop >/dev/null 2>&1 || true
  stop_cluster "$demo"
}
trap cleanup EXIT
step "throwaway cluster in $demo (port $port), pgbench scale $scale"
start_cluster "$demo" "$port"
conn=(-h /tmp -p "$port" -U postgres)
psql "${conn[@]}" -qXc "CREATE EXTENSION pg_blocktrack"
pgbench "${conn[@]}" -i -q -s "$scale" postgres 2>&1 | tail -1
repo="$demo/repo"

step "full backup, $jobs streams"
"$BS" backup -D "$demo/data" "${conn[@]}" --repo "$repo" -j "$jobs" -P
step "load: pgbench -c 2 -t 500"
pgbench "${conn[@]}" -n -c 2 -t 500 postgres 2>&1 | grep -E "^(tps|number of transactions actually)"
step "incremental backup: only the blocks changed since the full one"
"$BS" backup -D "$demo/data" "${conn[@]}" --repo "$repo" -j "$jobs" --type incr --no-fallback

step "parallel restore ($jobs threads) of the chain full + incremental"
"$BS" restore --repo "$repo" -D "$demo/restored" -j "$jobs" -P --output json > "$demo/restore.json"
as_postgres "$PG_BINDIR/pg_ctl" -D "$demo/restored" -l "$demo/restored.log" -o "-p $rport -c archive_mode=off" -w start >/dev/null
until [ "$(psql -h /tmp -p "$rport" -U postgres -XAtc 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; do sleep 0.2; done

step "compare source and restored cluster (pg_dumpall)"
dump() { pg_dumpall -h /tmp -p "$1" -U postgres | grep -v -e '^--' -e '^$' -e '^\\restrict' -e '^\\unrestrict'; }
if diff <(dump "$port") <(dump "$rport") >/dev/null; then same=identical; else same=DIFFERENT; fi
echo "$same"
step "verify the repository"
"$BS" verify --repo "$repo" -j "$jobs"

step "summary"
"$BS" info --repo "$repo"
python3 - "$demo/restore.json" "$same" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  restore: {r['bytes_restored']/2**20:.1f} MiB in {r['duration_secs']:.1f} s "
      f"({r['throughput_mib_s']:.0f} MiB/s, {r['jobs']} threads); restored cluster started; data {sys.argv[2]}")
PY
[ "$same" = identical ]
