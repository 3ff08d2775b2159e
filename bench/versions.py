#!/usr/bin/env python3
"""Per PostgreSQL version: blockstream's full backup, incremental and chain
restore, beside pg_basebackup, and on 17+ beside PostgreSQL's own
incremental (`pg_basebackup --incremental` plus `pg_combinebackup`).

  python3 bench/versions.py [--versions 15,16,17,18] [--scale 50] [--jobs 2] [--incr-tx 8000] [--reps 1]

For each version: initdb -k, pg_blocktrack loaded (and `summarize_wal = on`
on 17+), pgbench -i at --scale, then a full backup by each tool, `pgbench -c
2 -t --incr-tx`, an incremental by each tool that has one, the server
stopped, and the restore: ours of the chain at -j --jobs into an empty
directory (synced), PostgreSQL's `pg_combinebackup` of full + incremental
(it syncs too), each after a sync of what came before. pg_basebackup writes plain format (pg_combinebackup reads
nothing else), uncompressed, `-X fetch -c fast`. pgBackRest 2.45 supports
PostgreSQL up to 15 only: bench.py compares with it there.

Run as root after `bash scripts/test-versions.sh` (the extension must be
installed into every version). Writes BENCHMARKS-versions.md (or --out).
"""

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BS, ROOT, du, fresh_dir, sh, timed  # noqa: E402

BASE = Path("/tmp/blockstream-versions")
PORT = 5560


def bindir(v):
    return Path("/usr/lib/postgresql/15/bin") if v == 15 else Path(f"/opt/blockstream/pg/{v}/bin")


def psql(b, sql):
    return sh([b / "psql", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-d", "postgres", "-XAtq", "-c", sql],
              capture=True).strip()


def one_round(v, a):
    b = bindir(v)
    base = fresh_dir(BASE / str(v))
    data = base / "data"
    sh([b / "initdb", "-k", "-A", "trust", "-U", "postgres", "-D", data], user="postgres")
    conf = (ROOT / "pg_test_configs" / "blocktrack.conf").read_text() + f"\nport = {PORT}\nmax_wal_size = 4GB\n"
    if v >= 17:
        conf += "summarize_wal = on\n"
    with open(data / "postgresql.conf", "a") as f:
        f.write(conf)
    sh([b / "pg_ctl", "-D", data, "-l", base / "log", "-w", "start"], user="postgres")
    r = {}
    try:
        psql(b, "CREATE EXTENSION pg_blocktrack")
        sh([b / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-i", "-q", "-s", a.scale, "postgres"])
        psql(b, "CHECKPOINT")
        r["db"] = int(psql(b, "SELECT pg_database_size('postgres')"))
        repo = fresh_dir(base / "repo")
        conn = ["-D", data, "-h", "/tmp", "-p", PORT, "-U", "postgres", "--repo", repo, "-j", a.jobs]
        r["full"], _ = timed([BS, "backup", *conn], user="postgres")
        full = base / "pgb-full"
        r["pgb_full"], _ = timed([b / "pg_basebackup", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-D", full,
                                  "-Fp", "-X", "fetch", "-c", "fast"], user="postgres")
        sh([b / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-n", "-c", "2", "-t", a.incr_tx, "postgres"])
        r["incr"], _ = timed([BS, "backup", *conn, "--type", "incr", "--no-fallback"], user="postgres")
        if v >= 17:
            incr = base / "pgb-incr"
            r["pgb_incr"], _ = timed([b / "pg_basebackup", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-D", incr,
                                      "-Fp", "-X", "fetch", "-c", "fast", "--incremental", full / "backup_manifest"],
                                     user="postgres")
            r["pgb_incr_bytes"] = du(incr)
        r["repo_bytes"] = du(repo)
        r["pgb_full_bytes"] = du(full)
    finally:
        sh([b / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], user="postgres", check=False)
    target = base / "restored"
    # Neither restore pays for the other's writeback, nor for the backups'.
    os.sync()
    r["restore"], r["restore_rss"] = timed([BS, "restore", "--repo", repo, "-D", target, "-j", a.jobs],
                                           user="postgres")
    shutil.rmtree(target)
    if v >= 17:
        out = base / "combined"
        os.sync()
        r["combine"], _ = timed([b / "pg_combinebackup", full, base / "pgb-incr", "-o", out], user="postgres")
        shutil.rmtree(out)
    shutil.rmtree(base)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", default="15,16,17,18")
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--incr-tx", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS-versions.md"))
    a = ap.parse_args()
    versions = [int(x) for x in a.versions.split(",")]
    for v in versions:
        if not (bindir(v) / "postgres").exists():
            sys.exit(f"bench: no PostgreSQL {v} in {bindir(v)} (bash scripts/pg-versions.sh install {v})")
    results = {v: [] for v in versions}
    for rep in range(a.reps):
        for v in versions:
            print(f"PostgreSQL {v}, round {rep + 1}/{a.reps}", flush=True)
            results[v].append(one_round(v, a))

    def med(v, k):
        xs = [r[k] for r in results[v] if k in r]
        return statistics.median(xs) if xs else None

    def s(x):
        return "" if x is None else f"{x:.2f}"

    lines = [
        "# Per PostgreSQL version",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"`python3 bench/versions.py --versions {a.versions} --scale {a.scale} --jobs {a.jobs} "
        f"--incr-tx {a.incr_tx} --reps {a.reps}`; medians of {a.reps} round(s), seconds.",
        "",
        f"pgbench scale {a.scale}; blockstream -j {a.jobs} (zstd); pg_basebackup plain format, uncompressed, "
        f"`-X fetch -c fast`; the incremental after `pgbench -c 2 -t {a.incr_tx}`; restores into an empty "
        "directory, synced.",
        "",
        "| version | database | full: blockstream | full: pg_basebackup | incr: blockstream | "
        "incr: pg_basebackup --incremental | restore chain: blockstream | pg_combinebackup | "
        "repository (both backups) | pg_basebackup full + incr |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in versions:
        pgb_bytes = med(v, "pgb_full_bytes") + (med(v, "pgb_incr_bytes") or 0)
        lines.append(
            f"| {v} | {med(v, 'db') / 2**20:.0f} MiB | {s(med(v, 'full'))} | {s(med(v, 'pgb_full'))} | "
            f"{s(med(v, 'incr'))} | {s(med(v, 'pgb_incr')) or 'none'} | {s(med(v, 'restore'))} | "
            f"{s(med(v, 'combine')) or 'none'} | {med(v, 'repo_bytes') / 2**20:.1f} MiB | {pgb_bytes / 2**20:.1f} MiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
