#!/usr/bin/env bash
# pg_regress tests of the SQL surface, against a throwaway cluster with
# pg_blocktrack preloaded. Usage: regress/run.sh [test ...]
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$ROOT/regress"
port=${REGRESS_PORT:-5490}
dir=/tmp/blocktrack-regress
trap 'stop_cluster "$dir"' EXIT
start_cluster "$dir" "$port"
tests=("$@")
# setup first (it creates the extensions), then the rest in name order.
((${#tests[@]})) || tests=(setup $(ls sql | sed -n 's/\.sql$//p' | grep -vx setup | sort))
rm -rf results regression.diffs regression.out
mkdir -p results && chown postgres results . 
status=0
as_postgres "$(dirname "$("$PG_CONFIG" --pgxs)")/../test/regress/pg_regress" \
  --host=/tmp --port="$port" --user=postgres \
  --inputdir=. --outputdir=. --dbname=blocktrack_regress "${tests[@]}" || status=$?
if [ "$status" != 0 ] && [ -f regression.diffs ]; then cat regression.diffs; fi
exit "$status"
