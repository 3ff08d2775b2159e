#!/usr/bin/env python3
"""The cost of encryption at rest: full backups and restores of pgbench
scale --scale at -j --jobs, plain and encrypted, blockstream (AES-256-GCM)
beside pgBackRest (repo2-cipher-type=aes-256-cbc), same machine, same run,
interleaved.

  python3 bench/crypt.py [--scale 50] [--jobs 2] [--reps 2] [--out BENCHMARKS-crypt.md]

pgBackRest has one stanza with two repositories: repo1 plain, repo2
encrypted; archive-push writes to both. Restores are started and checked.
Run as root; needs what scripts/setup.sh installs and a release build.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BS, PG_BIN, ROOT, fresh_dir, psql, sh, timed, wait_promoted  # noqa: E402

BASE = Path("/tmp/blockstream-cryptbench")
PORT = 5500
RPORT = 5501


def stop(data):
    if (data / "postmaster.pid").exists():
        sh([PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], user="postgres", check=False)


def aes_ni():
    flags = Path("/proc/cpuinfo").read_text()
    return " aes " in flags or " aes\n" in flags


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS-crypt.md"))
    a = ap.parse_args()
    stop(BASE / "data")
    stop(BASE / "restored")
    fresh_dir(BASE)
    data = BASE / "data"
    sh([PG_BIN / "initdb", "-k", "-A", "trust", "-U", "postgres", "-D", data], user="postgres")
    conf = BASE / "pgbackrest.conf"
    for d in ("pgbr1", "pgbr2", "pgbr-log", "pgbr-lock"):
        fresh_dir(BASE / d)
    conf.write_text(f"""[global]
repo1-path={BASE}/pgbr1
repo2-path={BASE}/pgbr2
repo2-cipher-type=aes-256-cbc
repo2-cipher-pass=bench-passphrase-for-pgbackrest
compress-type=zst
compress-level=3
process-max={a.jobs}
start-fast=y
log-level-console=warn
log-level-file=off
log-path={BASE}/pgbr-log
lock-path={BASE}/pgbr-lock

[bench]
pg1-path={data}
pg1-port={PORT}
pg1-socket-path=/tmp
""")
    sh(["chown", "postgres:postgres", conf])
    conf.chmod(0o600)
    with open(data / "postgresql.conf", "a") as f:
        f.write((ROOT / "pg_test_configs" / "blocktrack.conf").read_text())
        f.write(f"\nport = {PORT}\narchive_mode = on\n"
                f"archive_command = 'pgbackrest --config={conf} --stanza=bench archive-push %p'\nmax_wal_size = 4GB\n")
    sh([PG_BIN / "pg_ctl", "-D", data, "-l", BASE / "server.log", "-w", "start"], user="postgres")
    try:
        run(a, data, conf)
    finally:
        stop(BASE / "restored")
        stop(data)


def run(a, data, conf):
    psql(PORT, "CREATE EXTENSION pg_blocktrack")
    print(f"pgbench -i -s {a.scale} ...", flush=True)
    sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-i", "-q", "-s", a.scale, "postgres"])
    psql(PORT, "CHECKPOINT")
    sh(["pgbackrest", f"--config={conf}", "--stanza=bench", "stanza-create"], user="postgres")
    passfile = BASE / "passphrase"
    passfile.write_text("bench passphrase for blockstream\n")
    passfile.chmod(0o600)
    accounts = a.scale * 100000
    conn = ["-D", data, "-h", "/tmp", "-p", PORT, "-U", "postgres", "-j", a.jobs]
    variants = {
        "blockstream": ([BS, "backup", *conn, "--repo", BASE / "bs-plain"], None, BASE / "bs-plain", []),
        "blockstream AES-256-GCM": ([BS, "backup", *conn, "--repo", BASE / "bs-enc", "--passphrase-file", passfile],
                                    None, BASE / "bs-enc", ["--passphrase-file", passfile]),
        "pgBackRest": (["pgbackrest", f"--config={conf}", "--stanza=bench", "--repo=1", "--type=full", "backup"],
                       "postgres", 1, []),
        "pgBackRest AES-256-CBC": (["pgbackrest", f"--config={conf}", "--stanza=bench", "--repo=2", "--type=full",
                                    "backup"], "postgres", 2, []),
    }
    backup, restore = {}, {}
    target = BASE / "restored"
    for rep in range(a.reps):
        print(f"round {rep + 1}/{a.reps}", flush=True)
        for name, (cmd, user, repo, keyargs) in variants.items():
            secs, rss = timed(cmd, user=user)
            backup.setdefault(name, []).append((secs, rss))
        for name, (cmd, user, repo, keyargs) in variants.items():
            stop(target)
            fresh_dir(target).chmod(0o700)
            if user is None:
                secs, rss = timed([BS, "restore", "--repo", repo, "-D", target, "-j", a.jobs, "--target", "immediate",
                                   *keyargs])
            else:
                secs, rss = timed(["pgbackrest", f"--config={conf}", "--stanza=bench", f"--repo={repo}",
                                   f"--pg1-path={target}", "--type=immediate", "--target-action=promote", "restore"],
                                  user="postgres")
            restore.setdefault(name, []).append((secs, rss))
            sh([PG_BIN / "pg_ctl", "-D", target, "-l", BASE / "restored.log", "-o",
                f"-p {RPORT} -c archive_mode=off", "-w", "-t", "600", "start"], user="postgres")
            wait_promoted(RPORT, f"restore by {name}")
            count = int(psql(RPORT, "SELECT count(*) FROM pgbench_accounts"))
            stop(target)
            if count != accounts:
                sys.exit(f"bench: restore by {name} has {count} accounts, expected {accounts}")

    def med(runs):
        return statistics.median(s for s, _ in runs), max(r for _, r in runs)

    lines = [
        "# Encryption at rest: what it costs",
        "",
        f"Generated by `python3 bench/crypt.py --scale {a.scale} --jobs {a.jobs} --reps {a.reps}` on "
        f"{platform.node()} ({os.cpu_count()} CPUs, AES-NI {'yes' if aes_ni() else 'no'}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. pgbench scale {a.scale}; full backups into a "
        f"directory at -j {a.jobs} (pgBackRest process-max {a.jobs}), zstd level 3; restores into an empty "
        f"directory, started and checked ({accounts} accounts). Medians of {a.reps} interleaved rounds.",
        "",
        "| tool | backup s | restore s | backup vs plain | restore vs plain | peak RSS MiB (backup / restore) |",
        "|---|---|---|---|---|---|",
    ]
    for name in variants:
        b, br = med(backup[name])
        r, rr = med(restore[name])
        plain = name.split(" AES")[0]
        pb, pr = med(backup[plain])[0], med(restore[plain])[0]
        lines.append(f"| {name} | {b:.2f} | {r:.2f} | {b / pb:.2f}x | {r / pr:.2f}x | {br:.0f} / {rr:.0f} |")
    ours_b, ours_r = med(backup["blockstream AES-256-GCM"])[0], med(restore["blockstream AES-256-GCM"])[0]
    theirs_b, theirs_r = med(backup["pgBackRest AES-256-CBC"])[0], med(restore["pgBackRest AES-256-CBC"])[0]
    lines += ["", f"Encrypted, blockstream against pgBackRest: backup {ours_b / theirs_b:.2f}x, "
              f"restore {ours_r / theirs_r:.2f}x.", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
