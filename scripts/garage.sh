#!/usr/bin/env bash
# A throwaway 3-node Garage cluster (S3-compatible object store) on
# 127.0.0.1, replication factor 3, for tests of object-store repositories.
#
#   scripts/garage.sh start [DIR]   start it (default DIR /tmp/blockstream-garage),
#                                   create bucket "blockstream" and a key; writes
#                                   DIR/env with the AWS_* variables to use it
#   scripts/garage.sh stop [DIR]    stop every node
#   scripts/garage.sh kill N [DIR]  kill node N (1-3) with SIGKILL
#   scripts/garage.sh restart N [DIR]  start node N again (after kill)
#
# Needs the garage binary; scripts/setup.sh installs it when missing
# (`cargo install garage --version 2.5.0 --locked`, SQLite metadata only).
# scripts/test.sh starts it for the object-storage tests and stops it after.
set -euo pipefail
cmd=${1:-start}
case $cmd in
  kill|restart) node=$2; dir=${3:-/tmp/blockstream-garage} ;;
  *) dir=${2:-/tmp/blockstream-garage} ;;
esac
GARAGE=${GARAGE:-$(command -v garage || echo /usr/local/bin/garage)}

stop() {
  for n in 1 2 3; do
    if [ -f "$dir/node$n.pid" ]; then
      kill "$(cat "$dir/node$n.pid")" 2>/dev/null || true
      rm -f "$dir/node$n.pid"
    fi
  done
}

case $cmd in
  stop) stop; exit 0 ;;
  kill)
    kill -9 "$(cat "$dir/node$node.pid")"
    rm -f "$dir/node$node.pid"
    exit 0 ;;
  restart)
    "$GARAGE" -c "$dir/node$node.toml" server >> "$dir/node$node.log" 2>&1 &
    echo $! > "$dir/node$node.pid"
    for _ in $(seq 100); do
      "$GARAGE" -c "$dir/node$node.toml" status >/dev/null 2>&1 && exit 0
      sleep 0.1
    done
    echo "garage.sh: node $node did not come back" >&2; exit 1 ;;
  start) ;;
  *) echo "usage: scripts/garage.sh start|stop [DIR] | kill N [DIR] | restart N [DIR]" >&2; exit 2 ;;
esac

[ -x "$GARAGE" ] || { echo "garage.sh: no garage binary (scripts/setup.sh installs it)" >&2; exit 1; }
stop
rm -rf "$dir"
mkdir -p "$dir"
chmod 700 "$dir"
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
for n in 1 2 3; do
  base=$((3900 + (n - 1) * 10))
  mkdir -p "$dir/node$n/meta" "$dir/node$n/data"
  cat > "$dir/node$n.toml" <<EOF
metadata_dir = "$dir/node$n/meta"
data_dir = "$dir/node$n/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$((base + 1))"
rpc_public_addr = "127.0.0.1:$((base + 1))"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$base"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((base + 3))"
admin_token = "$token"
EOF
  "$GARAGE" -c "$dir/node$n.toml" server > "$dir/node$n.log" 2>&1 &
  echo $! > "$dir/node$n.pid"
done
g() { "$GARAGE" -c "$dir/node1.toml" "$@"; }
# Wait until every node answers, then join them.
ids=()
for n in 1 2 3; do
  for _ in $(seq 100); do
    "$GARAGE" -c "$dir/node$n.toml" status >/dev/null 2>&1 && break
    sleep 0.1
  done
  ids+=("$("$GARAGE" -c "$dir/node$n.toml" node id -q)")
done
for n in 2 3; do g node connect "${ids[$((n - 1))]}" >/dev/null; done
for n in 1 2 3; do
  g layout assign -z "dc$n" -c 1G "${ids[$((n - 1))]%%@*}" >/dev/null
done
g layout apply --version 1 >/dev/null
for _ in $(seq 100); do g bucket create blockstream >/dev/null 2>&1 && break; sleep 0.2; done
key=$(g key create blockstream-key)
key_id=$(echo "$key" | sed -n 's/^Key ID: *//p' | head -1)
key_secret=$(echo "$key" | sed -n 's/^Secret key: *//p' | head -1)
g bucket allow --read --write --owner blockstream --key blockstream-key >/dev/null
cat > "$dir/env" <<EOF
export AWS_ACCESS_KEY_ID=$key_id
export AWS_SECRET_ACCESS_KEY=$key_secret
export AWS_DEFAULT_REGION=garage
export AWS_ENDPOINT_URL=http://127.0.0.1:3900
export AWS_ALLOW_HTTP=true
EOF
chmod 600 "$dir/env"
echo "garage: 3 nodes up, bucket blockstream; source $dir/env"
