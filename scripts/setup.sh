#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian 12 machine (run as root),
# then builds and installs pg_blocktrack and builds blockstream (release).
# Anything already present at the right version is left alone.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

step "Debian packages"
packages=(postgresql-15 postgresql-client-15 postgresql-server-dev-15 postgresql-15-cron
          libclang-dev clang sudo pgbackrest zstd util-linux libpq-dev pkg-config openssl
          chromium fonts-dejavu-core fio)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  # Test clusters are ours; do not let the package create and start its own.
  mkdir -p /etc/postgresql-common
  [ -f /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "all present"
fi

step "Python packages (the metrics tests parse with Prometheus' own parser)"
if python3 -c "import prometheus_client" 2>/dev/null; then
  echo "present"
else
  pip install -q "prometheus_client==0.21.1"
fi

step "cargo-pgrx 0.18.0"
if cargo pgrx --version 2>/dev/null | grep -q ' 0\.18\.0$'; then
  echo "present"
else
  cargo install cargo-pgrx --version 0.18.0 --locked
fi
if ! grep -qs "^pg15 = \"$PG_CONFIG\"" "$HOME/.pgrx/config.toml"; then
  cargo pgrx init --pg15 "$PG_CONFIG"
fi

step "PostgreSQL 16, 17 and 18 (relocatable builds; the version tests run on them)"
bash scripts/pg-versions.sh install 16 17 18
bash scripts/pg-versions.sh pgrx-init

step "Garage 2.5.0 (the S3-compatible store the object-storage tests run on)"
if garage --version 2>/dev/null | grep -q ':2\.5\.0 '; then
  echo "present"
else
  # SQLite metadata only: no LMDB, K2V or metrics, which the tests do not use
  # and which make the build longer.
  cargo install garage --version 2.5.0 --locked --no-default-features --features bundled-libs,sqlite --root /usr/local
fi

step "build and install pg_blocktrack"
(cd extension && cargo pgrx install --release -c "$PG_CONFIG")

step "build blockstream"
cargo build --release -p blockstream
echo "$ROOT/target/release/blockstream"
