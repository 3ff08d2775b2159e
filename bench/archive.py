#!/usr/bin/env python3
"""WAL archive benchmark: blockstream vs pgBackRest, same machine, same run.

  python3 bench/archive.py [--scale 50] [--segments 64] [--reps 2] [--replay-mb 1024]
                           [--rpo-seconds 45] [--skip push,pitr,rpo] [--quick]

- push: one cluster's WAL backlog (the same closed segments, marked .ready
  again before every run) archived by PostgreSQL's archiver through each
  tool's archive_command, sync and async; segments/s until every segment is
  in the tool's repository.
- pitr: pgbench scale --scale, a full backup by each tool, then about
  --replay-mb of WAL archived by both; restore to a restore point at its end
  and start: blockstream with and without prefetch, pgBackRest with sync and
  async archive-get. The data is checked against the source.
- rpo: rate-limited pgbench plus a tick committed every 10 ms; the primary
  stopped -m immediate (its disk "gone"); a restore to the end of the
  repository; the seconds of acknowledged ticks missing. archive-push
  --async, wal-receive, wal-receive --synchronous.

Run as root; needs what scripts/setup.sh installs and a release build.
Writes BENCHMARKS-archive.md (or --out).
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
from bench import BS, PG_BIN, ROOT, fresh_dir, psql, sh, wait_promoted  # noqa: E402

BASE = Path("/tmp/blockstream-archbench")
PORT = 5480
RPORT = 5481


def start(data, port, log, extra=""):
    sh([PG_BIN / "pg_ctl", "-D", data, "-l", log, "-o", f"-p {port} {extra}".strip(), "-w", "-t", "600", "start"],
       user="postgres")


def stop(data, mode="fast"):
    if (data / "postmaster.pid").exists():
        sh([PG_BIN / "pg_ctl", "-D", data, "-m", mode, "-w", "stop"], user="postgres", check=False)


def init(data, extra_conf):
    stop(data)
    shutil.rmtree(data, ignore_errors=True)
    sh([PG_BIN / "initdb", "-k", "-A", "trust", "-U", "postgres", "-D", data], user="postgres")
    conf = (ROOT / "pg_test_configs" / "blocktrack.conf").read_text()
    with open(data / "postgresql.conf", "a") as f:
        f.write(conf + "\n" + extra_conf + "\n")


def pgbench(port, *args):
    sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", port, "-U", "postgres", *args, "postgres"])


def pgbr_conf(name, data, repo, spool=None, workers=1):
    path = BASE / f"{name}.conf"
    text = f"""[global]
repo1-path={repo}
compress-type=zst
compress-level=3
start-fast=y
log-level-console=warn
log-level-file=off
log-path={BASE}/pgbr-log
lock-path={BASE}/pgbr-lock-{name}
"""
    if spool:
        text += f"archive-async=y\nspool-path={spool}\n\n[global:archive-push]\nprocess-max={workers}\n\n" \
                f"[global:archive-get]\nprocess-max={workers}\n"
    text += f"\n[bench]\npg1-path={data}\npg1-port={PORT}\npg1-socket-path=/tmp\n"
    path.write_text(text)
    shutil.chown(path, "postgres", "postgres")
    for d in ("pgbr-log", f"pgbr-lock-{name}"):
        if not (BASE / d).exists():
            fresh_dir(BASE / d)
    return path


def set_archive_command(port, cmd):
    psql(port, "ALTER SYSTEM SET archive_command = '{}'".format(cmd.replace("'", "''")))
    psql(port, "SELECT pg_reload_conf()")


def kill_pushers():
    sh(["pkill", "-f", "archive-push-daemon"], check=False)
    sh(["pkill", "-f", "archive-get-daemon"], check=False)
    time.sleep(0.3)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


class ArchiveBench:
    def __init__(self, a):
        self.a = a
        self.out = []

    # --- push throughput --------------------------------------------------------
    def push(self):
        a = self.a
        data = BASE / "push-data"
        init(data, f"port = {PORT}\narchive_mode = on\narchive_command = ''\nwal_keep_size = '16GB'\n"
                   "max_wal_size = '16GB'\ncheckpoint_timeout = '1h'\n")
        start(data, PORT, BASE / "push.log")
        psql(PORT, "CREATE EXTENSION pg_blocktrack")
        print(f"push: pgbench -i -s {a.scale}, then load until {a.segments} segments wait", flush=True)
        pgbench(PORT, "-i", "-q", "-s", str(a.scale))
        status = data / "pg_wal" / "archive_status"

        def ready():
            return sorted(p.name[:-6] for p in status.iterdir() if p.name.endswith(".ready"))

        while len(ready()) < a.segments:
            pgbench(PORT, "-n", "-c", "2", "-t", "2000")
            psql(PORT, "SELECT pg_switch_wal()")
        segs = ready()
        seg_set = set(segs)
        raw_mb = len(segs) * 16
        print(f"push: {len(segs)} segments ({raw_mb} MiB of WAL)", flush=True)
        bs_repo, pgbr_repo = BASE / "push-bs-repo", BASE / "push-pgbr-repo"
        bs_spool, pgbr_spool = BASE / "push-bs-spool", BASE / "push-pgbr-spool"
        sync_conf = pgbr_conf("push-sync", data, pgbr_repo)
        async_conf = pgbr_conf("push-async", data, pgbr_repo, spool=pgbr_spool, workers=4)
        configs = [
            ("blockstream archive-push (defaults: zstd:1)", "bs",
             f"{BS} archive-push --repo {bs_repo} %p"),
            ("blockstream archive-push --compress zstd:3 --threads 2", "bs",
             f"{BS} archive-push --repo {bs_repo} --compress zstd:3 --threads 2 %p"),
            ("blockstream archive-push --compress zstd:3 --threads 1", "bs",
             f"{BS} archive-push --repo {bs_repo} --compress zstd:3 --threads 1 %p"),
            ("blockstream archive-push --async --workers 4 --compress zstd:3", "bs",
             f"{BS} archive-push --repo {bs_repo} --compress zstd:3 --async --workers 4 --spool {bs_spool} %p"),
            ("pgBackRest 2.45 archive-push (zst:3)", "pgbr",
             f"pgbackrest --config={sync_conf} --stanza=bench archive-push %p"),
            ("pgBackRest 2.45 archive-push, archive-async, process-max 4 (zst:3)", "pgbr",
             f"pgbackrest --config={async_conf} --stanza=bench archive-push %p"),
        ]
        results = {c[0]: [] for c in configs}
        sizes = {}
        for rep in range(a.reps):
            order = configs if rep % 2 == 0 else list(reversed(configs))
            for name, tool, cmd in order:
                kill_pushers()
                for p in (bs_repo, pgbr_repo, bs_spool, pgbr_spool):
                    fresh_dir(p)
                if tool == "pgbr":
                    sh(["pgbackrest", f"--config={sync_conf}", "--stanza=bench", "stanza-create"], user="postgres")
                for s in segs:
                    done = status / f"{s}.done"
                    if done.exists():
                        done.rename(status / f"{s}.ready")
                t = time.monotonic()
                set_archive_command(PORT, cmd)
                while True:
                    if tool == "bs":
                        d = bs_repo / "archive" / "00000001"
                        n = sum(1 for p in d.iterdir() if p.name.endswith(".bsw")) if d.exists() else 0
                    else:
                        n = sum(1 for _, _, fs in os.walk(pgbr_repo / "archive") for f in fs
                                if len(f) > 24 and f[:24] in seg_set)
                    if n >= len(segs) and not ready():
                        break
                    if time.monotonic() - t > 1800:
                        sys.exit(f"bench: {name} did not archive {len(segs)} segments in 30 min ({n} done)")
                    time.sleep(0.05)
                secs = time.monotonic() - t
                set_archive_command(PORT, "")
                stored = sum(p.stat().st_size for p in (bs_repo if tool == "bs" else pgbr_repo).rglob("*")
                             if p.is_file())
                results[name].append(secs)
                sizes[name] = stored
                print(f"  {name}: {secs:.2f} s, {len(segs) / secs:.1f} segments/s", flush=True)
        kill_pushers()
        stop(data)
        rows = ["| archive_command | segments/s (median) | MiB/s of WAL | runs (s) | archive size |",
                "|---|---:|---:|---|---:|"]
        for name, _, _ in configs:
            m = median(results[name])
            rows.append(f"| {name} | {len(segs) / m:.1f} | {raw_mb / m:.0f} | "
                        f"{', '.join(f'{x:.2f}' for x in results[name])} | {sizes[name] / 2**20:.0f} MiB |")
        base_sync = median(results[configs[4][0]])
        base_async = median(results[configs[5][0]])
        rows.append("")
        rows.append(f"Ratios to pgBackRest (above 1: blockstream faster): sync zstd:3, 2 threads "
                    f"{base_sync / median(results[configs[1][0]]):.2f}x, 1 thread "
                    f"{base_sync / median(results[configs[2][0]]):.2f}x; async, 4 workers each "
                    f"{base_async / median(results[configs[3][0]]):.2f}x.")
        self.out.append((f"Archive push: {len(segs)} segments of pgbench WAL, {a.reps} runs each, "
                         "PostgreSQL's archiver driving each tool", rows))

    # --- PITR restore with ~1 GB of WAL to replay ---------------------------------------
    def pitr(self):
        a = self.a
        data = BASE / "pitr-data"
        bs_repo, pgbr_repo = BASE / "pitr-bs-repo", BASE / "pitr-pgbr-repo"
        for p in (bs_repo, pgbr_repo):
            fresh_dir(p)
        sync_conf = pgbr_conf("pitr-sync", data, pgbr_repo)
        async_conf = pgbr_conf("pitr-async", data, pgbr_repo, spool=BASE / "pitr-pgbr-spool", workers=4)
        fresh_dir(BASE / "pitr-pgbr-spool")
        both = (f"{BS} archive-push --repo {bs_repo} --compress zstd:3 %p && "
                f"pgbackrest --config={sync_conf} --stanza=bench archive-push %p")
        init(data, f"port = {PORT}\narchive_mode = on\narchive_command = '{both}'\nmax_wal_size = '4GB'\n")
        start(data, PORT, BASE / "pitr.log")
        psql(PORT, "CREATE EXTENSION pg_blocktrack")
        print(f"pitr: pgbench -i -s {a.scale}; full backups by both tools", flush=True)
        pgbench(PORT, "-i", "-q", "-s", str(a.scale))
        sh(["pgbackrest", f"--config={sync_conf}", "--stanza=bench", "stanza-create"], user="postgres")
        sh([BS, "backup", "-D", data, "-h", "/tmp", "-p", PORT, "-U", "postgres", "--repo", bs_repo, "-j", "2",
            "--compress", "zstd:3"], user="postgres")
        sh(["pgbackrest", f"--config={sync_conf}", "--stanza=bench", "--type=full", "backup"], user="postgres")
        begin = psql(PORT, "SELECT pg_current_wal_lsn()")
        print(f"pitr: pgbench until {a.replay_mb} MiB of WAL", flush=True)
        while int(psql(PORT, f"SELECT pg_current_wal_lsn() - '{begin}'")) < a.replay_mb << 20:
            pgbench(PORT, "-n", "-c", "2", "-t", "5000")
        wal_mb = int(psql(PORT, f"SELECT pg_current_wal_lsn() - '{begin}'")) >> 20
        psql(PORT, "SELECT pg_create_restore_point('bench_end')")
        state = psql(PORT, "SELECT sum(abalance) || '/' || (SELECT count(*) FROM pgbench_history) FROM pgbench_accounts")
        last = psql(PORT, "SELECT pg_walfile_name(pg_switch_wal())")
        while psql(PORT, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < last:
            time.sleep(0.2)
        stop(data)
        target = BASE / "pitr-restored"
        configs = [
            ("blockstream restore --prefetch 0 (archive-get one segment at a time)", "bs", ["--prefetch", "0"]),
            ("blockstream restore (archive-get --prefetch 4, the default)", "bs", []),
            ("pgBackRest restore, archive-get sync", "pgbr", sync_conf),
            ("pgBackRest restore, archive-get async, process-max 4", "pgbr", async_conf),
        ]
        results = {c[0]: [] for c in configs}
        for rep in range(a.reps):
            order = configs if rep % 2 == 0 else list(reversed(configs))
            for name, tool, extra in order:
                kill_pushers()
                stop(target)
                fresh_dir(target).chmod(0o700)
                fresh_dir(BASE / "pitr-pgbr-spool")
                t = time.monotonic()
                if tool == "bs":
                    sh([BS, "restore", "--repo", bs_repo, "-D", target, "-j", "2", "--target-name", "bench_end",
                        *extra])
                else:
                    sh(["pgbackrest", f"--config={extra}", "--stanza=bench", f"--pg1-path={target}", "--type=name",
                        "--target=bench_end", "--target-action=promote", "restore"], user="postgres")
                restored = time.monotonic() - t
                start(target, RPORT, BASE / "pitr-restored.log", "-c archive_mode=off")
                wait_promoted(RPORT, name, timeout=3600)
                total = time.monotonic() - t
                got = psql(RPORT, "SELECT sum(abalance) || '/' || (SELECT count(*) FROM pgbench_history) "
                                  "FROM pgbench_accounts")
                if got != state:
                    sys.exit(f"bench: {name} restored {got}, the source had {state}")
                stop(target)
                results[name].append((restored, total))
                print(f"  {name}: restore {restored:.1f} s, to promoted {total:.1f} s", flush=True)
        kill_pushers()
        rows = ["| restore to a restore point | files (s) | replay (s) | total to promoted (s), median | runs |",
                "|---|---:|---:|---:|---|"]
        for name, _, _ in configs:
            r = results[name]
            rows.append(f"| {name} | {median([x[0] for x in r]):.1f} | {median([x[1] - x[0] for x in r]):.1f} | "
                        f"{median([x[1] for x in r]):.1f} | {', '.join(f'{x[1]:.1f}' for x in r)} |")
        bs0 = median([x[1] for x in results[configs[0][0]]])
        bs4 = median([x[1] for x in results[configs[1][0]]])
        pa = median([x[1] for x in results[configs[3][0]]])
        rows.append("")
        rows.append(f"Prefetch saves {bs0 - bs4:.1f} s ({bs0 / bs4:.2f}x); blockstream with prefetch vs pgBackRest "
                    f"async: {pa / bs4:.2f}x (above 1: blockstream faster). Every restore's data equals the source.")
        self.out.append((f"PITR: pgbench scale {a.scale}, {wal_mb} MiB of WAL after the backup replayed to a "
                         f"restore point, {a.reps} runs each", rows))

    # --- RPO ------------------------------------------------------------------------------
    def rpo_once(self, mode):
        a = self.a
        data = BASE / "rpo-data"
        repo = fresh_dir(BASE / "rpo-repo")
        conf = f"port = {PORT}\n"
        if mode == "push":
            conf += (f"archive_mode = on\narchive_command = '{BS} archive-push --repo {repo} --async --workers 4 "
                     f"--spool {BASE}/rpo-spool %p'\n")
            fresh_dir(BASE / "rpo-spool")
        init(data, conf)
        start(data, PORT, BASE / "rpo.log")
        psql(PORT, "CREATE EXTENSION pg_blocktrack")
        pgbench(PORT, "-i", "-q", "-s", "10")
        psql(PORT, "CREATE TABLE ticks (t timestamptz)")
        receiver = None
        if mode != "push":
            cmd = [BS, "wal-receive", "--repo", repo, "-h", "/tmp", "-p", str(PORT), "-U", "postgres"]
            if mode == "sync":
                cmd.append("--synchronous")
            receiver = subprocess.Popen(["runuser", "-u", "postgres", "--", *map(str, cmd)],
                                        stderr=subprocess.DEVNULL)
            while psql(PORT, "SELECT count(*) FROM pg_stat_replication") != "1":
                time.sleep(0.1)
        sh([BS, "backup", "-D", data, "-h", "/tmp", "-p", PORT, "-U", "postgres", "--repo", repo], user="postgres")
        if mode == "sync":
            psql(PORT, "ALTER SYSTEM SET synchronous_standby_names = 'blockstream_receiver'")
            psql(PORT, "SELECT pg_reload_conf()")
        tick = BASE / "tick.sql"
        tick.write_text("INSERT INTO ticks VALUES (clock_timestamp());\n")
        conn = ["-h", "/tmp", "-p", str(PORT), "-U", "postgres"]
        load = subprocess.Popen([PG_BIN / "pgbench", *conn, "-n", "-c", "2", "-R", "400", "-T", "600", "postgres"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ticks = subprocess.Popen([PG_BIN / "pgbench", *conn, "-n", "-c", "1", "-R", "100", "-T", "600", "-f", tick,
                                  "postgres"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(a.rpo_seconds)
        sh([PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], user="postgres")
        for p in (load, ticks):
            p.wait()
        if receiver:
            try:
                receiver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                receiver.terminate()
        kill_pushers()
        # What the primary had committed (acknowledged or still waiting for a
        # synchronous standby): its own crash recovery shows it.
        start(data, PORT, BASE / "rpo.log", "-c archive_mode=off -c synchronous_standby_names=''")
        acked, acked_n = psql(PORT, "SELECT max(t) || '|' || count(*) FROM ticks").split("|")
        wal_mb = int(psql(PORT, "SELECT pg_current_wal_lsn() - '0/0'")) >> 20
        stop(data)
        target = BASE / "rpo-restored"
        stop(target)
        fresh_dir(target).chmod(0o700)
        sh([BS, "restore", "--repo", repo, "-D", target, "-j", "2"])
        start(target, RPORT, BASE / "rpo-restored.log", "-c archive_mode=off")
        wait_promoted(RPORT, f"rpo {mode}", timeout=1800)
        lost = float(psql(RPORT, f"SELECT extract(epoch FROM '{acked}'::timestamptz - max(t)) FROM ticks"))
        missing = int(acked_n) - int(psql(RPORT, "SELECT count(*) FROM ticks"))
        stop(target)
        return lost, wal_mb, missing

    def rpo(self):
        a = self.a
        rows = ["| continuous archiving | committed work lost (s) | ticks committed on the primary, missing | WAL written (MiB) |",
                "|---|---:|---:|---:|"]
        for mode, name in (("push", "archive-push --async --workers 4 (no archive_timeout)"),
                           ("stream", "wal-receive"),
                           ("sync", "wal-receive --synchronous, a synchronous standby")):
            print(f"rpo: {name}", flush=True)
            lost, wal_mb, missing = self.rpo_once(mode)
            print(f"  {name}: {lost:.3f} s lost", flush=True)
            rows.append(f"| {name} | {lost:.3f} | {missing} | {wal_mb} |")
        self.out.append((f"RPO: pgbench -c 2 -R 400 (scale 10) plus a tick committed every 10 ms for "
                         f"{a.rpo_seconds} s, then the primary stopped -m immediate and its disk treated as gone; "
                         "the restore to the end of the repository against the last tick the primary committed. "
                         "With --synchronous a commit still waiting for the receiver's confirmation when the "
                         "primary died is on the primary's disk but was never acknowledged to its client; "
                         "tests/pitr.rs checks that every acknowledged commit is restored", rows))

    def write(self):
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        pgbr = sh(["pgbackrest", "version"], capture=True).strip()
        text = ["# WAL archive benchmarks", "",
                f"Machine: {cpu}, {os.cpu_count()} cores; PostgreSQL 15; {pgbr}; "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. `python3 bench/archive.py`.", ""]
        for title, rows in self.out:
            text += [f"## {title}", "", *rows, ""]
        Path(self.a.out).write_text("\n".join(text))
        print("\n".join(text))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=50)
    p.add_argument("--segments", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--replay-mb", type=int, default=1024)
    p.add_argument("--rpo-seconds", type=int, default=45)
    p.add_argument("--skip", default="")
    p.add_argument("--quick", action="store_true", help="small sizes, one run: keeps the harness from rotting")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS-archive.md"))
    a = p.parse_args()
    if a.quick:
        a.scale, a.segments, a.reps, a.replay_mb, a.rpo_seconds = 2, 4, 1, 48, 5
        if a.out == str(ROOT / "BENCHMARKS-archive.md"):
            a.out = str(BASE / "quick.md")
    if os.geteuid() != 0:
        sys.exit("bench: run as root (clusters run as postgres)")
    if not BS.exists():
        sys.exit(f"bench: {BS} is missing: cargo build --release -p blockstream")
    for d in ("push-data", "pitr-data", "pitr-restored", "rpo-data", "rpo-restored"):
        stop(BASE / d, "immediate")
    kill_pushers()
    shutil.rmtree(BASE, ignore_errors=True)
    fresh_dir(BASE)
    b = ArchiveBench(a)
    skip = set(filter(None, a.skip.split(",")))
    for section in ("push", "pitr", "rpo"):
        if section not in skip:
            getattr(b, section)()
    b.write()


if __name__ == "__main__":
    main()
