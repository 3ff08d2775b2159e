#!/usr/bin/env python3
"""A/B of the hot path: two blockstream binaries (or one, plain against a
raw key file), interleaved, full backup and restore of pgbench scale
--scale at -j --jobs, --reps rounds; prints every run and the medians.

  python3 bench/ab.py A_BINARY B_BINARY [--scale 50] [--jobs 2] [--reps 5] [--b-key-file FILE] [--chain N]

With --chain N, each binary takes one full backup, the cluster runs
`pgbench -c 2 -t N`, each takes an incremental; the rounds then time
restores of that chain only.

Build the "before" binary from another commit with its own target
directory, e.g. `git worktree add /tmp/old COMMIT && cargo build --release
-p blockstream --manifest-path /tmp/old/Cargo.toml --target-dir /tmp/old-target`.
Run as root.
"""

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import PG_BIN, ROOT, fresh_dir, psql, sh, timed  # noqa: E402

BASE = Path("/tmp/blockstream-ab")
PORT = 5520


def stop(d):
    if (d / "postmaster.pid").exists():
        sh([PG_BIN / "pg_ctl", "-D", d, "-m", "fast", "-w", "stop"], user="postgres", check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--b-key-file", help="B backs up into an encrypted repository with this raw key file")
    ap.add_argument("--chain", type=int, help="time chain restores (full + incremental after pgbench -t N)")
    a = ap.parse_args()
    stop(BASE / "data")
    fresh_dir(BASE)
    data = BASE / "data"
    sh([PG_BIN / "initdb", "-k", "-A", "trust", "-U", "postgres", "-D", data], user="postgres")
    with open(data / "postgresql.conf", "a") as f:
        f.write((ROOT / "pg_test_configs" / "blocktrack.conf").read_text() + f"\nport = {PORT}\nmax_wal_size = 4GB\n")
    sh([PG_BIN / "pg_ctl", "-D", data, "-l", BASE / "log", "-w", "start"], user="postgres")
    try:
        psql(PORT, "CREATE EXTENSION pg_blocktrack")
        sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-i", "-q", "-s", a.scale, "postgres"])
        psql(PORT, "CHECKPOINT")
        res = {}
        key = ["--key-file", a.b_key_file] if a.b_key_file else []
        if a.chain:
            chain_rounds(a, data, key, res)
            return report(a, key, res, ("restore",))
        for rep in range(a.reps):
            for name, exe, extra in (("A", a.a, []), ("B", a.b, key)):
                repo = BASE / f"repo-{name}-{rep}"
                target = BASE / "restored"
                s, _ = timed([exe, "backup", "-D", data, "-h", "/tmp", "-p", PORT, "-U", "postgres", "--repo", repo,
                              "-j", a.jobs, *extra])
                res.setdefault(("backup", name), []).append(s)
                shutil.rmtree(target, ignore_errors=True)
                s, _ = timed([exe, "restore", "--repo", repo, "-D", target, "-j", a.jobs, *extra])
                res.setdefault(("restore", name), []).append(s)
                shutil.rmtree(repo)
                shutil.rmtree(target)
    finally:
        stop(data)
    report(a, key, res, ("backup", "restore"))


def chain_rounds(a, data, key, res):
    """One chain per binary (full, pgbench -t N, incremental); the rounds restore it."""
    binaries = (("A", a.a, []), ("B", a.b, key))
    conn = ["-D", data, "-h", "/tmp", "-p", PORT, "-U", "postgres", "-j", a.jobs]
    for kind in ("full", "incr"):
        if kind == "incr":
            sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-c", "2", "-t", a.chain, "postgres"])
        for name, exe, extra in binaries:
            sh([exe, "backup", *conn, "--repo", BASE / f"chain-{name}", "--type", kind, "--no-fallback", *extra])
    target = BASE / "restored"
    for rep in range(a.reps):
        for name, exe, extra in binaries:
            shutil.rmtree(target, ignore_errors=True)
            s, _ = timed([exe, "restore", "--repo", BASE / f"chain-{name}", "-D", target, "-j", a.jobs, *extra])
            res.setdefault(("restore", name), []).append(s)


def report(a, key, res, ops):
    what = f"chain restores after pgbench -t {a.chain}" if a.chain else "full backup and restore"
    print(f"A = {a.a}\nB = {a.b}{' with --key-file' if key else ''}; scale {a.scale}, -j {a.jobs}, {a.reps} rounds, {what}")
    for op in ops:
        ma, mb = statistics.median(res[(op, "A")]), statistics.median(res[(op, "B")])
        runs = lambda n: " ".join(f"{x:.3f}" for x in res[(op, n)])  # noqa: E731
        print(f"{op}: A {ma:.3f} s ({runs('A')}), B {mb:.3f} s ({runs('B')}), B/A {mb / ma:.2f}")


if __name__ == "__main__":
    main()
