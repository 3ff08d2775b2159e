#!/usr/bin/env python3
"""What a backup taken from a standby costs the primary: a full backup from
the standby and one from the primary, each with the page cache dropped, and
the disk reads of each side during it.

  python3 bench/standby.py [--scale 50] [--jobs 2] [--reps 3] [--out BENCHMARKS-standby.md]

- the primary's server processes (postmaster and its children, from
  /proc/PID/io: read_bytes is what came from the disk, rchar every read());
- blockstream's own disk reads (getrusage of the child: blocks read in).

A backup from the standby reads the standby's data directory and talks only
to the standby: the primary's side should stay at what it does anyway
(streaming WAL to the standby, its own checkpoints).

Run as root; needs what scripts/setup.sh installs and a release build.
"""

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BS, PG_BIN, ROOT, fresh_dir, psql, sh, tracked_cluster  # noqa: E402

BASE = Path("/tmp/blockstream-standby-bench")
PRIMARY, STANDBY = 5560, 5561


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def server_pids(data):
    """The postmaster of `data` and its children."""
    pm = int((data / "postmaster.pid").read_text().split()[0])
    pids = [pm]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pm:
                pids.append(int(d.name))
    return pids


def io_of(pids):
    """Sum of read_bytes and rchar over processes still alive."""
    rb = rc = 0
    for p in pids:
        try:
            fields = dict(line.split(": ") for line in Path(f"/proc/{p}/io").read_text().splitlines())
        except OSError:
            continue
        rb += int(fields["read_bytes"])
        rc += int(fields["rchar"])
    return rb, rc


def backup(data, port, repo, jobs):
    """Wall seconds and disk bytes read by blockstream itself."""
    t = time.monotonic()
    p = subprocess.Popen([str(c) for c in [BS, "backup", "-D", data, "-h", "/tmp", "-p", port, "-U", "postgres",
                                           "--repo", repo, "-j", jobs, "--type", "full"]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.monotonic() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: backup of {data} failed:\n{p.stderr.read()}")
    return secs, usage.ru_inblock * 512


def caught_up():
    lsn = psql(PRIMARY, "SELECT pg_current_wal_lsn()")
    for _ in range(600):
        if psql(STANDBY, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'") == "t":
            return
        time.sleep(0.1)
    sys.exit("bench: the standby did not catch up")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS-standby.md"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (clusters run as postgres)")
    primary, standby = BASE / "primary", BASE / "standby"
    for d in (primary, standby):
        if (d / "postmaster.pid").exists():
            sh([PG_BIN / "pg_ctl", "-D", d, "-m", "immediate", "-w", "stop"], user="postgres", check=False)
    fresh_dir(BASE)
    rows = {"standby": [], "primary": []}
    try:
        tracked_cluster(primary, PRIMARY, BASE / "primary.log")
        sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PRIMARY, "-U", "postgres", "-i", "-q", "-s", a.scale, "postgres"])
        sh([PG_BIN / "pg_basebackup", "-h", "/tmp", "-p", PRIMARY, "-U", "postgres", "-D", standby, "-R",
            "-X", "stream", "-c", "fast"], user="postgres")
        with open(standby / "postgresql.auto.conf", "a") as f:
            f.write(f"port = {STANDBY}\n")
        sh([PG_BIN / "pg_ctl", "-D", standby, "-l", BASE / "standby.log", "-w", "start"], user="postgres")
        for _ in range(600):
            if psql(STANDBY, "SELECT worker_pid IS NOT NULL FROM blocktrack.status()", check=False) == "t":
                break
            time.sleep(0.1)
        db_bytes = int(psql(PRIMARY, "SELECT pg_database_size('postgres')"))
        for rep in range(a.reps):
            for source, data, port in (("standby", standby, STANDBY), ("primary", primary, PRIMARY)):
                psql(PRIMARY, "CHECKPOINT")
                caught_up()
                repo = BASE / f"repo-{source}"
                shutil.rmtree(repo, ignore_errors=True)
                drop_caches()
                pids = server_pids(primary)
                before = io_of(pids)
                secs, own = backup(data, port, repo, a.jobs)
                after = io_of(pids)
                rows[source].append((secs, own, after[0] - before[0], after[1] - before[1]))
                r = rows[source][-1]
                print(f"round {rep + 1}, from the {source}: {secs:.2f} s; blockstream read {own / 2**20:.1f} MiB "
                      f"from disk; the primary's processes read {r[2] / 2**20:.1f} MiB from disk, "
                      f"{r[3] / 2**20:.1f} MiB by read()", flush=True)
    finally:
        for d in (standby, primary):
            sh([PG_BIN / "pg_ctl", "-D", d, "-m", "fast", "-w", "stop"], user="postgres", check=False)

    def med(source, i):
        return statistics.median(r[i] for r in rows[source])

    lines = [
        "# A backup from a standby: what it costs the primary",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"`python3 bench/standby.py --scale {a.scale} --jobs {a.jobs} --reps {a.reps}`.",
        "",
        f"pgbench scale {a.scale} ({db_bytes / 2**20:.0f} MiB), a streaming standby made with `pg_basebackup -R`; "
        f"a full backup at -j {a.jobs} from each, page cache dropped before each, a CHECKPOINT on the primary "
        "(replayed) before each. Medians; MiB.",
        "",
        "| backup taken from | wall s | blockstream's disk reads | primary processes: disk reads | "
        "primary processes: read() bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for source in ("standby", "primary"):
        lines.append(f"| {source} | {med(source, 0):.2f} | {med(source, 1) / 2**20:.1f} | "
                     f"{med(source, 2) / 2**20:.1f} | {med(source, 3) / 2**20:.1f} |")
    lines += [
        "",
        "blockstream reads the data directory it is given (`-D`) and connects only to that server: from the "
        "standby, its reads land on the standby's files, and the primary's processes read what they would "
        "anyway (WAL sent to the standby, its own checkpoint).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
