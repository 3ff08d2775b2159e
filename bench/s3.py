#!/usr/bin/env python3
"""Backups and restores to S3 (a local 3-node Garage cluster), beside a
local repository and beside pgBackRest with repo1-type=s3 on the same
Garage, same machine, same run.

  python3 bench/s3.py [--scale 50] [--jobs 2,4] [--reps 1] [--rss-jobs 8] [--out BENCHMARKS-s3.md]

- full backup of pgbench scale --scale at each -j: blockstream to a
  directory, blockstream to s3://blockstream/bench-..., pgBackRest to
  s3://blockstream/pgbr-bench (process-max = jobs);
- restore of each into an empty directory at the same -j, then start it
  and count pgbench_accounts;
- at --rss-jobs: blockstream's peak RSS and peak bytes held in upload
  buffers (BLOCKSTREAM_S3_STATS) for a backup and a restore to S3.

pgBackRest speaks S3 only over TLS and Garage serves plain HTTP, so
pgBackRest goes through bench/tls_proxy.py (Python, one process): the
proxy's cost is pgBackRest's, and the table says so.

Run as root; needs what scripts/setup.sh installs (Garage included) and a
release build. Writes BENCHMARKS-s3.md (or --out).
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
from bench import BS, PG_BIN, ROOT, du, fresh_dir, psql, sh, timed, wait_promoted  # noqa: E402

BASE = Path("/tmp/blockstream-s3bench")
GARAGE_DIR = Path("/tmp/blockstream-garage")
PORT = 5510
RPORT = 5511
TLS_PORT = 3443


def garage_env():
    env = {}
    for line in (GARAGE_DIR / "env").read_text().splitlines():
        if line.startswith("export "):
            k, v = line[len("export "):].split("=", 1)
            env[k] = v
    return env


def stop(data):
    if (data / "postmaster.pid").exists():
        sh([PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], user="postgres", check=False)


def timed_env(cmd, env, user=None):
    """Wall seconds, peak RSS (MiB) and stderr of one command with `env` added."""
    full = dict(os.environ, **env)
    if user:
        cmd = ["runuser", "-u", user, "--", "env"] + [f"{k}={v}" for k, v in env.items()] + [str(c) for c in cmd]
    t = time.monotonic()
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full)
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.monotonic() - t
    err = p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed:\n{err}")
    return secs, usage.ru_maxrss / 1024, err


def start_check(target, what):
    sh([PG_BIN / "pg_ctl", "-D", target, "-l", BASE / "restored.log", "-o", f"-p {RPORT} -c archive_mode=off",
        "-w", "-t", "600", "start"], user="postgres")
    wait_promoted(RPORT, what)
    count = int(psql(RPORT, "SELECT count(*) FROM pgbench_accounts"))
    stop(target)
    return count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--jobs", default="2,4")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rss-jobs", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS-s3.md"))
    a = ap.parse_args()
    jobs = [int(j) for j in a.jobs.split(",")]

    stop(BASE / "data")
    stop(BASE / "restored")
    fresh_dir(BASE)
    sh(["bash", ROOT / "scripts/garage.sh", "start", GARAGE_DIR])
    env = garage_env()
    key = BASE / "tls.key"
    cert = BASE / "tls.crt"
    sh(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-days", "1",
        "-keyout", key, "-out", cert])
    proxy = subprocess.Popen([sys.executable, ROOT / "bench/tls_proxy.py", str(TLS_PORT), "127.0.0.1:3900",
                              str(cert), str(key)])
    try:
        run(a, jobs, env)
    finally:
        # Servers first: the archiver's pgBackRest needs the proxy to finish.
        stop(BASE / "data")
        stop(BASE / "restored")
        proxy.terminate()
        sh(["bash", ROOT / "scripts/garage.sh", "stop", GARAGE_DIR])


def run(a, jobs, env):
    data = BASE / "data"
    sh([PG_BIN / "initdb", "-k", "-A", "trust", "-U", "postgres", "-D", data], user="postgres")
    pgbr_conf = BASE / "pgbackrest.conf"
    for d in ("pgbr-log", "pgbr-lock"):
        fresh_dir(BASE / d)
    pgbr_path = f"/pgbr-bench-{int(time.time())}"
    pgbr_conf.write_text(f"""[global]
repo1-type=s3
repo1-path={pgbr_path}
repo1-s3-bucket=blockstream
repo1-s3-endpoint=127.0.0.1
repo1-storage-port={TLS_PORT}
repo1-storage-verify-tls=n
repo1-s3-region={env['AWS_DEFAULT_REGION']}
repo1-s3-key={env['AWS_ACCESS_KEY_ID']}
repo1-s3-key-secret={env['AWS_SECRET_ACCESS_KEY']}
repo1-s3-uri-style=path
compress-type=zst
compress-level=3
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
    os.chown(pgbr_conf, 0, 0)
    sh(["chown", "postgres:postgres", pgbr_conf])
    pgbr_conf.chmod(0o600)
    conf = (ROOT / "pg_test_configs" / "blocktrack.conf").read_text()
    conf += f"""
port = {PORT}
archive_mode = on
archive_command = 'pgbackrest --config={pgbr_conf} --stanza=bench archive-push %p'
max_wal_size = 4GB
"""
    with open(data / "postgresql.conf", "a") as f:
        f.write(conf)
    sh([PG_BIN / "pg_ctl", "-D", data, "-l", BASE / "server.log", "-w", "start"], user="postgres")
    psql(PORT, "CREATE EXTENSION pg_blocktrack")
    print(f"pgbench -i -s {a.scale} ...", flush=True)
    sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-i", "-q", "-s", a.scale, "postgres"])
    psql(PORT, "CHECKPOINT")
    sh(["pgbackrest", f"--config={pgbr_conf}", "--stanza=bench", "stanza-create"], user="postgres")
    accounts = a.scale * 100000
    db_mib = int(psql(PORT, "SELECT sum(pg_database_size(oid)) FROM pg_database")) / 2**20
    stamp = int(time.time())
    rows = []
    conn = ["-D", data, "-h", "/tmp", "-p", PORT, "-U", "postgres"]
    for j in jobs:
        local = BASE / f"bs-repo-j{j}"
        s3 = f"s3://blockstream/bench-{stamp}-j{j}"
        results = {}
        for rep in range(a.reps):
            print(f"-j {j}, round {rep + 1}/{a.reps}", flush=True)
            for tool, cmd, user in (
                ("blockstream, directory", [BS, "backup", *conn, "--repo", local, "-j", j, "--type", "full"], None),
                ("blockstream, S3", [BS, "backup", *conn, "--repo", s3, "-j", j, "--type", "full"], None),
                ("pgBackRest, S3 (TLS proxy)", ["pgbackrest", f"--config={pgbr_conf}", "--stanza=bench",
                                                 "--type=full", f"--process-max={j}", "backup"], "postgres"),
            ):
                secs, rss, _ = timed_env(cmd, env if tool == "blockstream, S3" else {}, user)
                results.setdefault(("backup", tool), []).append((secs, rss))
            target = BASE / "restored"
            for tool, cmd, user in (
                ("blockstream, directory", [BS, "restore", "--repo", local, "-D", target, "-j", j,
                                            "--target", "immediate"], None),
                ("blockstream, S3", [BS, "restore", "--repo", s3, "-D", target, "-j", j, "--target", "immediate"],
                 None),
                ("pgBackRest, S3 (TLS proxy)", ["pgbackrest", f"--config={pgbr_conf}", "--stanza=bench",
                                                 f"--pg1-path={target}", f"--process-max={j}", "--type=immediate",
                                                 "--target-action=promote", "restore"], "postgres"),
            ):
                stop(target)
                fresh_dir(target).chmod(0o700)
                secs, rss, _ = timed_env(cmd, env if tool == "blockstream, S3" else {}, user)
                count = start_check(target, f"restore by {tool}")
                if count != accounts:
                    sys.exit(f"bench: restore by {tool} has {count} accounts, expected {accounts}")
                results.setdefault(("restore", tool), []).append((secs, rss))
        for (what, tool), runs in results.items():
            rows.append((what, j, tool, statistics.median(s for s, _ in runs), max(r for _, r in runs)))

    # Memory at -j rss_jobs: peak RSS and what the uploads held at most.
    j = a.rss_jobs
    s3 = f"s3://blockstream/bench-{stamp}-j{j}"
    stats = dict(env, BLOCKSTREAM_S3_STATS="1")
    secs_b, rss_b, err = timed_env([BS, "backup", *conn, "--repo", s3, "-j", j, "--type", "full"], stats)
    in_flight = int(err.strip().rsplit(" ", 1)[-1])
    target = BASE / "restored"
    fresh_dir(target).chmod(0o700)
    secs_r, rss_r, _ = timed_env([BS, "restore", "--repo", s3, "-D", target, "-j", j, "--target", "immediate"], stats)

    lines = [
        "# Object storage: blockstream and pgBackRest on S3 (Garage)",
        "",
        f"Generated by `python3 bench/s3.py --scale {a.scale} --jobs {a.jobs} --reps {a.reps}` on "
        f"{platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"pgbench scale {a.scale} ({db_mib:.0f} MiB of databases); a 3-node Garage 2.5.0 cluster on 127.0.0.1 "
        "(replication factor 3, every write on 3 nodes of the same disk); zstd level 3 for both tools; "
        "full backups; restores into an empty directory, started and checked "
        f"({accounts} accounts). Medians of {a.reps} round(s); peak RSS is the maximum.",
        "",
        "pgBackRest reaches Garage through `bench/tls_proxy.py` (it speaks S3 only over TLS); the proxy's "
        "CPU is on the same 2 cores, so its figures include that cost. blockstream talks plain HTTP to Garage.",
        "",
        "| operation | -j | tool | seconds | peak RSS MiB | vs blockstream S3 |",
        "|---|---|---|---|---|---|",
    ]
    for what, j, tool, secs, rss in rows:
        ours = next(s for w, jj, t, s, _ in rows if w == what and jj == j and t == "blockstream, S3")
        lines.append(f"| {what} | {j} | {tool} | {secs:.2f} | {rss:.0f} | {secs / ours:.2f}x |")
    lines += [
        "",
        f"At -j {a.rss_jobs} to S3: backup {secs_b:.2f} s, peak RSS {rss_b:.0f} MiB, at most "
        f"{in_flight / 2**20:.1f} MiB held in upload buffers; restore {secs_r:.2f} s, peak RSS {rss_r:.0f} MiB "
        "(goal: 256 MiB).",
        "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
