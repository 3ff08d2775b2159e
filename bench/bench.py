#!/usr/bin/env python3
"""Side-by-side benchmark: blockstream vs pgBackRest vs pg_basebackup.

One PostgreSQL 15 cluster (initdb -k) with pgbench data; the tools run on the
same machine in the same run, interleaved, repeated; medians and ratios are
printed as a markdown table and written to BENCHMARKS.md (or --out).

  python3 bench/bench.py [--scale 50] [--jobs 2] [--reps 3] [--quick]

Run as root (clusters and pgBackRest run as postgres). Needs what
scripts/setup.sh installs. Page caches are not dropped: every tool reads a
warm cache, the same for all.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("PG_BINDIR", "/usr/lib/postgresql/15/bin"))
BS = Path(os.environ.get("BLOCKSTREAM_BIN", ROOT / "target" / "release" / "blockstream"))
BASE = Path("/tmp/blockstream-bench")
PORT = 5470
RPORT = 5471


def sh(cmd, user=None, check=True, capture=False, env=None):
    """Runs a command (a list), as `user` when given."""
    if user:
        cmd = ["runuser", "-u", user, "--"] + [str(c) for c in cmd]
    r = subprocess.run([str(c) for c in cmd], check=False, text=True,
                       stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=env)
    if check and r.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout if capture else r


def timed(cmd, user=None):
    """Wall seconds and peak RSS (MiB) of one command."""
    if user:
        cmd = ["runuser", "-u", user, "--"] + [str(c) for c in cmd]
    t = time.monotonic()
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.monotonic() - t
    err = p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed:\n{err}")
    return secs, usage.ru_maxrss / 1024


def worker_cpu(pid):
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def du(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def wait_promoted(port, what, timeout=600):
    """Waits until the server on `port` has left recovery; exits with a message after `timeout` seconds."""
    deadline = time.time() + timeout
    while psql(port, "SELECT pg_is_in_recovery()", check=False) != "f":
        if time.time() > deadline:
            sys.exit(f"bench: {what} still in recovery after {timeout} s")
        time.sleep(0.05)


def psql(port, sql, db="postgres", check=True):
    if not check:
        r = subprocess.run([PG_BIN / "psql", "-h", "/tmp", "-p", str(port), "-U", "postgres", "-d", db, "-XAtq", "-c", sql],
                           capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    return sh([PG_BIN / "psql", "-h", "/tmp", "-p", port, "-U", "postgres", "-d", db, "-XAtq", "-c", sql],
              capture=True).strip()


def tracked_cluster(data, port, log, extra=""):
    """A new cluster (initdb -k) at `data` with pg_blocktrack loaded, started, the extension created."""
    sh([PG_BIN / "initdb", "-k", "-A", "trust", "-U", "postgres", "-D", data], user="postgres")
    with open(data / "postgresql.conf", "a") as f:
        f.write((ROOT / "pg_test_configs" / "blocktrack.conf").read_text() + f"\nport = {port}\n{extra}")
    sh([PG_BIN / "pg_ctl", "-D", data, "-l", log, "-w", "start"], user="postgres")
    psql(port, "CREATE EXTENSION pg_blocktrack")


def fresh_dir(p, owner="postgres"):
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    shutil.chown(p, owner, owner)
    return p


class Bench:
    def __init__(self, args):
        self.a = args
        self.rows = []  # (section, tool, seconds list, bytes, rss list)

    # --- setup -------------------------------------------------------------
    def setup(self):
        a = self.a
        self.stop(BASE / "data")
        self.stop(BASE / "restored")
        shutil.rmtree(BASE, ignore_errors=True)
        fresh_dir(BASE)
        data = BASE / "data"
        sh([PG_BIN / "initdb", "-k", "-A", "trust", "-U", "postgres", "-D", data], user="postgres")
        conf = (ROOT / "pg_test_configs" / "blocktrack.conf").read_text()
        self.pgbr_conf = BASE / "pgbackrest.conf"
        conf += f"""
port = {PORT}
archive_mode = on
archive_command = 'pgbackrest --config={self.pgbr_conf} --stanza=bench archive-push %p'
max_wal_size = 4GB
"""
        with open(data / "postgresql.conf", "a") as f:
            f.write(conf)
        for d in ("pgbr-repo", "pgbr-log", "pgbr-lock"):
            fresh_dir(BASE / d)
        self.pgbr_conf.write_text(f"""[global]
repo1-path={BASE}/pgbr-repo
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
        shutil.chown(self.pgbr_conf, "postgres", "postgres")
        sh([PG_BIN / "pg_ctl", "-D", data, "-l", BASE / "server.log", "-w", "start"], user="postgres")
        psql(PORT, "CREATE EXTENSION pg_blocktrack")
        print(f"pgbench -i -s {a.scale} ...", flush=True)
        sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-i", "-q", "-s", a.scale, "postgres"])
        if a.dataset == "random":
            # Rows that do not compress like pgbench's blank filler.
            psql(PORT, f"""CREATE TABLE noise AS
                SELECT g AS id, md5(random()::text) || md5(random()::text) AS a,
                       (random() * 1e9)::numeric(20,4) AS b, repeat(md5(g::text), 4) AS c
                  FROM generate_series(1, {a.scale * 40000}) g""")
        psql(PORT, "CHECKPOINT")
        self.pgbr("stanza-create")
        self.db_bytes = int(psql(PORT, "SELECT sum(pg_database_size(oid)) FROM pg_database"))

    def pgbr(self, *cmd):
        return sh(["pgbackrest", f"--config={self.pgbr_conf}", "--stanza=bench", *cmd], user="postgres")

    def stop(self, data):
        if (data / "postmaster.pid").exists():
            sh([PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], user="postgres", check=False)

    # --- measurements -------------------------------------------------------
    def full_backups(self):
        a = self.a
        bs_repo = BASE / "bs-repo"
        results = {"blockstream": ([], [], []), "pgBackRest": ([], [], []), "pg_basebackup": ([], [], [])}
        for rep in range(a.reps):
            print(f"full backups, round {rep + 1}/{a.reps}", flush=True)
            before = du(bs_repo) if bs_repo.exists() else 0
            secs, rss = timed([BS, "backup", "-D", BASE / "data", "-h", "/tmp", "-p", PORT, "-U", "postgres",
                               "--repo", bs_repo, "-j", a.jobs, "--compress", "zstd:3"])
            r = results["blockstream"]
            r[0].append(secs), r[1].append(du(bs_repo) - before), r[2].append(rss)

            before = du(BASE / "pgbr-repo")
            secs, rss = timed(["pgbackrest", f"--config={self.pgbr_conf}", "--stanza=bench", "--type=full", "backup"],
                              user="postgres")
            r = results["pgBackRest"]
            r[0].append(secs), r[1].append(du(BASE / "pgbr-repo") - before), r[2].append(rss)

            out = fresh_dir(BASE / f"basebackup-{rep}")
            secs, rss = timed([PG_BIN / "pg_basebackup", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-D", out,
                               "-Ft", "--compress=client-zstd:3", "-X", "fetch", "-c", "fast"], user="postgres")
            r = results["pg_basebackup"]
            r[0].append(secs), r[1].append(du(out)), r[2].append(rss)
            shutil.rmtree(out)
        for tool, (secs, size, rss) in results.items():
            self.rows.append(("full backup", tool, secs, statistics.median(size), rss))

    def restores(self):
        a = self.a
        results = {"blockstream": ([], [], [], []), "pgBackRest": ([], [], [], [])}
        target = BASE / "restored"
        for rep in range(a.reps):
            print(f"restores, round {rep + 1}/{a.reps}", flush=True)
            for tool in ("blockstream", "pgBackRest"):
                self.stop(target)
                fresh_dir(target)
                target.chmod(0o700)
                if tool == "blockstream":
                    secs, rss = timed([BS, "restore", "--repo", BASE / "bs-repo", "-D", target, "-j", a.jobs,
                                       "--target", "immediate"])
                else:
                    secs, rss = timed(["pgbackrest", f"--config={self.pgbr_conf}", "--stanza=bench",
                                       f"--pg1-path={target}", "--type=immediate", "--target-action=promote",
                                       "restore"], user="postgres")
                t = time.monotonic()
                sh([PG_BIN / "pg_ctl", "-D", target, "-l", BASE / f"restored-{tool}.log", "-o",
                    f"-p {RPORT} -c archive_mode=off", "-w", "-t", "600", "start"], user="postgres")
                wait_promoted(RPORT, f"restore by {tool}")
                recovery = time.monotonic() - t
                count = psql(RPORT, "SELECT count(*) FROM pgbench_accounts")
                assert int(count) == a.scale * 100000, f"{tool} restore holds {count} accounts"
                self.stop(target)
                r = results[tool]
                r[0].append(secs), r[1].append(secs + recovery), r[2].append(rss), r[3].append(recovery)
        for tool, (secs, total, rss, rec) in results.items():
            self.rows.append(("restore", tool, secs, None, rss))
            self.rows.append(("restore + recovery to a started cluster", tool, total, None, rss))

    def bs_backup(self, *extra):
        """A blockstream backup; returns (seconds, rss, summary json)."""
        cmd = [BS, "backup", "-D", BASE / "data", "-h", "/tmp", "-p", PORT, "-U", "postgres", "--repo",
               BASE / "bs-repo", "-j", self.a.jobs, "--compress", "zstd:3", "--output", "json", *extra]
        t = time.monotonic()
        out = sh(cmd, capture=True)
        return time.monotonic() - t, json.loads(out)

    def pgbr_last_delta(self):
        info = json.loads(sh(["pgbackrest", f"--config={self.pgbr_conf}", "--stanza=bench", "--output=json", "info"],
                             user="postgres", capture=True))
        last = info[0]["backup"][-1]
        return last["info"]["delta"], last["info"]["repository"]["delta"]

    def incrementals(self):
        """Full, then pgbench -c 2 -t N, then an incremental: both tools; then the chain restore."""
        a = self.a
        self.incr_rows = []
        for n in a.incr_tx:
            res = {"blockstream": [], "pgBackRest": []}
            restore = {"blockstream": [], "pgBackRest": []}
            for rep in range(a.reps):
                print(f"incremental after pgbench -c 2 -t {n}, round {rep + 1}/{a.reps}", flush=True)
                self.bs_backup("--type", "full")
                self.pgbr("--type=full", "backup")
                psql(PORT, "CHECKPOINT")
                sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-n", "-c", "2", "-t", n, "postgres"])
                for tool in (["blockstream", "pgBackRest"] if rep % 2 == 0 else ["pgBackRest", "blockstream"]):
                    if tool == "blockstream":
                        secs, out = self.bs_backup("--type", "incr", "--no-fallback")
                        st = out["stats"]
                        res[tool].append((secs, st["data_bytes"], st["bytes_written"], st["changed_blocks"],
                                          st["trackable_blocks"]))
                    else:
                        t = time.monotonic()
                        self.pgbr("--type=incr", "backup")
                        secs = time.monotonic() - t
                        read, written = self.pgbr_last_delta()
                        res[tool].append((secs, read, written, None, None))
                for tool in ("blockstream", "pgBackRest"):
                    restore[tool].append(self.restore_once(tool))
            self.incr_rows.append((n, res, restore))

    def restore_once(self, tool):
        """Restores the latest backup (a chain for incrementals); (restore s, to started cluster s)."""
        target = BASE / "restored"
        self.stop(target)
        fresh_dir(target)
        target.chmod(0o700)
        if tool == "blockstream":
            secs, _ = timed([BS, "restore", "--repo", BASE / "bs-repo", "-D", target, "-j", self.a.jobs,
                             "--target", "immediate"])
        else:
            secs, _ = timed(["pgbackrest", f"--config={self.pgbr_conf}", "--stanza=bench", f"--pg1-path={target}",
                             "--type=immediate", "--target-action=promote", "restore"], user="postgres")
        t = time.monotonic()
        sh([PG_BIN / "pg_ctl", "-D", target, "-l", BASE / f"restored-{tool}.log", "-o",
            f"-p {RPORT} -c archive_mode=off", "-w", "-t", "600", "start"], user="postgres")
        wait_promoted(RPORT, "restored chain")
        total = secs + time.monotonic() - t
        self.stop(target)
        return secs, total

    def validation(self):
        """Checksum verification cost in a full backup, verify throughput, drill RTO."""
        a = self.a
        on, off, ck = [], [], []
        for rep in range(a.reps):
            print(f"checksum verification on/off, round {rep + 1}/{a.reps}", flush=True)
            for verify in ([True, False] if rep % 2 == 0 else [False, True]):
                secs, out = self.bs_backup("--type", "full", *([] if verify else ["--no-verify-checksums"]))
                (on if verify else off).append(secs)
                if verify:
                    ck.append((out["stats"]["checksum_secs"], out["stats"]["pages_checked"]))
        latest = json.loads(sh([BS, "info", "--repo", BASE / "bs-repo", "--output", "json"], capture=True))["backups"][-1]
        ver = []
        for rep in range(a.reps):
            out = json.loads(sh([BS, "verify", "--repo", BASE / "bs-repo", "--backup", latest["backup_id"], "-j", a.jobs,
                                 "--output", "json"], capture=True))["backups"][0]
            ver.append((out["secs"], out["stored_bytes"], out["pages_checked"]))
        drills = []
        for rep in range(a.reps):
            print(f"drill, round {rep + 1}/{a.reps}", flush=True)
            out = sh([BS, "drill", "--repo", BASE / "bs-repo", "-j", a.jobs, "--output", "json"], capture=True)
            drills.append(json.loads(out))
        self.valid = {"on": on, "off": off, "ck": ck, "verify": ver, "drills": drills,
                      "raw": latest["stats"]["bytes_read"]}

    def set_tracking(self, on):
        psql(PORT, f"ALTER SYSTEM SET blocktrack.enabled = {'on' if on else 'off'}")
        psql(PORT, "SELECT pg_reload_conf()")
        want = "t" if on else "f"
        for _ in range(300):
            if psql(PORT, "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pg_blocktrack') = 1") == want:
                return
            time.sleep(0.1)
        sys.exit(f"bench: tracking did not turn {'on' if on else 'off'}")

    def tracking_overhead(self):
        """pgbench TPS with the summarizer on and off, alternating; WAL and summary volume, lag, memory."""
        a = self.a
        tps = {True: [], False: []}
        self.tracking = {}
        self.worker_cpu_share = []
        order = [False, True] * a.reps
        for i, on in enumerate(order):
            self.set_tracking(on)
            psql(PORT, "CHECKPOINT")
            print(f"pgbench -c 2 -T {a.tps_seconds}, tracking {'on' if on else 'off'} ({i + 1}/{len(order)})", flush=True)
            wal0 = psql(PORT, "SELECT pg_current_wal_lsn()")
            sum0 = psql(PORT, "SELECT coalesce(sum(bytes), 0) FROM blocktrack.summaries()") if on else "0"
            pid = psql(PORT, "SELECT worker_pid FROM blocktrack.status()") if on else ""
            cpu0 = worker_cpu(pid) if on else 0.0
            t0 = time.monotonic()
            out = sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-n", "-c", "2", "-T",
                      a.tps_seconds, "postgres"], capture=True)
            tps[on].append(float(out.split("tps = ")[1].split()[0]))
            if on:
                # The summarizer's CPU time as a share of the machine during the run:
                # a steadier measure of its cost than TPS on a noisy machine.
                self.worker_cpu_share.append((worker_cpu(pid) - cpu0) / ((time.monotonic() - t0) * os.cpu_count()))
                lag = int(psql(PORT, "SELECT pg_current_wal_flush_lsn() - pending_lsn FROM blocktrack.status()"))
                wal = int(psql(PORT, f"SELECT pg_current_wal_lsn() - '{wal0}'"))
                psql(PORT, "SELECT blocktrack.flush_summary()")
                summ = int(psql(PORT, "SELECT coalesce(sum(bytes), 0) FROM blocktrack.summaries()")) - int(sum0)
                pid = psql(PORT, "SELECT worker_pid FROM blocktrack.status()")
                hwm = 0
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) / 1024
                peak = int(psql(PORT, "SELECT peak_memory_bytes FROM blocktrack.status()"))
                self.tracking = {"lag": lag, "wal": wal, "summary": summ, "hwm": hwm, "table": peak}
        self.set_tracking(True)
        self.tps = tps

    # --- report -------------------------------------------------------------
    def report(self):
        a = self.a
        med = lambda xs: statistics.median(xs)
        lines = [
            f"## Full backup and restore, pgbench scale {a.scale} ({a.dataset} data), -j {a.jobs}",
            "",
            f"Database size {self.db_bytes / 2**20:.0f} MiB; median of {a.reps} interleaved runs; "
            f"pgBackRest process-max={a.jobs}, zstd level 3; pg_basebackup -Ft --compress=client-zstd:3 -X fetch.",
            "",
            "| step | tool | wall s (median) | runs | repository bytes | peak RSS MiB | time vs blockstream |",
            "|---|---|---:|---|---:|---:|---:|",
        ]
        base = {}
        for step, tool, secs, size, rss in self.rows:
            if tool == "blockstream":
                base[step] = med(secs)
        for step, tool, secs, size, rss in self.rows:
            ratio = med(secs) / base[step] if base.get(step) else float("nan")
            runs = " ".join(f"{s:.2f}" for s in secs)
            size_s = f"{size / 2**20:.1f} MiB" if size is not None else ""
            lines.append(f"| {step} | {tool} | {med(secs):.2f} | {runs} | {size_s} | {max(rss):.0f} | {ratio:.2f}x |")
        lines.append("")
        goals = []
        b = {(s, t): med(x) for s, t, x, _, _ in self.rows}
        if ("full backup", "pgBackRest") in b:
            goals.append(f"- full backup: blockstream / pgBackRest = {b[('full backup','blockstream')] / b[('full backup','pgBackRest')]:.2f} (goal <= 0.30)")
            goals.append(f"- full backup: blockstream / pg_basebackup = {b[('full backup','blockstream')] / b[('full backup','pg_basebackup')]:.2f} (goal <= 0.75)")
        if ("restore", "pgBackRest") in b:
            goals.append(f"- restore: blockstream / pgBackRest = {b[('restore','blockstream')] / b[('restore','pgBackRest')]:.2f} (goal <= 0.30)")
            k = "restore + recovery to a started cluster"
            goals.append(f"- restore to a started cluster: blockstream / pgBackRest = {b[(k,'blockstream')] / b[(k,'pgBackRest')]:.2f}")
        for n, res, restore in getattr(self, "incr_rows", []):
            b, r = res["blockstream"], res["pgBackRest"]
            mt = lambda rows, i: med([x[i] for x in rows])
            lines += [
                "",
                f"## Incremental backup after pgbench -c 2 -t {n} (scale {a.scale}), median of {a.reps}",
                "",
                "| tool | wall s | runs | bytes read from PGDATA | bytes written | changed main-fork blocks |",
                "|---|---:|---|---:|---:|---:|",
                f"| blockstream | {mt(b, 0):.2f} | {' '.join(f'{x[0]:.2f}' for x in b)} | {mt(b, 1) / 2**20:.1f} MiB | "
                f"{mt(b, 2) / 2**20:.2f} MiB | {mt(b, 3):.0f} of {mt(b, 4):.0f} ({100 * mt(b, 3) / max(mt(b, 4), 1):.1f}%) |",
                f"| pgBackRest | {mt(r, 0):.2f} | {' '.join(f'{x[0]:.2f}' for x in r)} | {mt(r, 1) / 2**20:.1f} MiB | "
                f"{mt(r, 2) / 2**20:.2f} MiB | |",
                "",
                f"- time: blockstream / pgBackRest = {mt(b, 0) / mt(r, 0):.2f}",
                f"- repository bytes: blockstream / pgBackRest = {mt(b, 2) / mt(r, 2):.2f}",
                f"- chain restore: blockstream {med([x[0] for x in restore['blockstream']]):.2f} s vs pgBackRest "
                f"{med([x[0] for x in restore['pgBackRest']]):.2f} s "
                f"(= {med([x[0] for x in restore['blockstream']]) / med([x[0] for x in restore['pgBackRest']]):.2f}); "
                f"to a started cluster {med([x[1] for x in restore['blockstream']]):.2f} s vs "
                f"{med([x[1] for x in restore['pgBackRest']]):.2f} s",
            ]
        v = getattr(self, "valid", None)
        if v:
            vs = med([x[0] for x in v["verify"]])
            vb = med([x[1] for x in v["verify"]])
            lines += [
                "",
                f"## Validation (scale {a.scale}, -j {a.jobs}), median of {a.reps}",
                "",
                f"- full backup with page checksum verification {med(v['on']):.2f} s, without {med(v['off']):.2f} s "
                f"(runs {' '.join(f'{x:.2f}' for x in v['on'])} / {' '.join(f'{x:.2f}' for x in v['off'])}); "
                f"{med([x[1] for x in v['ck']]):.0f} pages checked in {med([x[0] for x in v['ck']]):.3f} s of thread time",
                f"- verify of the latest full backup: {vs:.2f} s for {vb / 2**20:.1f} MiB of repository "
                f"= {vb / 2**20 / vs:.0f} MiB/s stored ({v['raw'] / 2**20 / vs:.0f} MiB/s of data restored in memory), "
                f"{v['verify'][0][2]} page checksums",
                f"- drill RTO (restore + recovery to a consistent cluster): "
                f"{med([d['restore_secs'] + d['recovery_secs'] for d in v['drills']]):.2f} s "
                f"(restore {med([d['restore_secs'] for d in v['drills']]):.2f} s, recovery "
                f"{med([d['recovery_secs'] for d in v['drills']]):.2f} s); checks (amcheck heapallindexed, "
                f"pg_visibility) {med([d['check_secs'] for d in v['drills']]):.2f} s; all passed: "
                f"{all(d['ok'] for d in v['drills'])}",
            ]
        if getattr(self, "tps", None):
            on, off = med(self.tps[True]), med(self.tps[False])
            t = self.tracking
            lines2 = [
                "",
                f"## Tracking overhead: pgbench -c 2 -T {a.tps_seconds}, scale {a.scale}, summarizer on vs off (alternating)",
                "",
                "| tracking | TPS (median) | runs |",
                "|---|---:|---|",
                f"| off | {off:.0f} | {' '.join(f'{x:.0f}' for x in self.tps[False])} |",
                f"| on | {on:.0f} | {' '.join(f'{x:.0f}' for x in self.tps[True])} |",
                "",
                f"- TPS cost of tracking: {100 * (off - on) / off:.1f}% (goal <= 3%); pairwise (off, on): "
                + ", ".join(f"{100 * (f - n) / f:+.1f}%" for f, n in zip(self.tps[False], self.tps[True])),
                f"- summarizer CPU while pgbench ran: {100 * med(self.worker_cpu_share):.2f}% of the machine "
                f"(runs {' '.join(f'{100 * x:.2f}%' for x in self.worker_cpu_share)})",
                f"- summary bytes per GB of WAL: {t['summary'] / max(t['wal'], 1) * 2**30 / 2**20:.2f} MiB "
                f"({t['summary']} bytes for {t['wal'] / 2**20:.0f} MiB of WAL in the last run)",
                f"- summarizer lag when pgbench stopped: {t['lag']} bytes",
                f"- summarizer peak RSS (VmHWM): {t['hwm']:.1f} MiB; peak block-table memory: {t['table'] / 2**20:.2f} MiB",
            ]
            return "\n".join(lines + goals + lines2) + "\n"
        return "\n".join(lines + goals) + "\n"


def scaling(a):
    """blockstream alone: how time and memory grow with the data and the threads."""
    rows = []
    for scale in a.scaling_scales:
        a.scale = scale
        b = Bench(a)
        b.setup()
        for jobs in a.scaling_jobs:
            a.jobs = jobs
            print(f"scaling: scale {scale}, -j {jobs}", flush=True)
            shutil.rmtree(BASE / "bs-repo", ignore_errors=True)
            t = time.monotonic()
            _, full_rss = timed([BS, "backup", "-D", BASE / "data", "-h", "/tmp", "-p", PORT, "-U", "postgres",
                                 "--repo", BASE / "bs-repo", "-j", jobs])
            full = time.monotonic() - t
            sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-n", "-c", "2", "-t", "2000", "postgres"])
            t = time.monotonic()
            _, incr_rss = timed([BS, "backup", "-D", BASE / "data", "-h", "/tmp", "-p", PORT, "-U", "postgres",
                                 "--repo", BASE / "bs-repo", "-j", jobs, "--type", "incr", "--no-fallback"])
            incr = time.monotonic() - t
            info = json.loads(sh([BS, "info", "--repo", BASE / "bs-repo", "--output", "json"], capture=True))
            st = info["backups"][-1]["stats"]
            target = fresh_dir(BASE / "restored")
            target.chmod(0o700)
            restore, restore_rss = timed([BS, "restore", "--repo", BASE / "bs-repo", "-D", target, "-j", jobs])
            shutil.rmtree(target)
            rows.append((scale, jobs, b.db_bytes, full, full_rss, incr, incr_rss, st["data_bytes"], st["changed_blocks"],
                         st["trackable_blocks"], restore, restore_rss))
        b.stop(BASE / "data")
    lines = [
        "## Scaling: blockstream alone (full backup, pgbench -c 2 -t 2000, incremental, chain restore)",
        "",
        "| scale | -j | database | full s | full RSS | incr s | incr read | changed blocks | incr RSS | restore s | restore RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (scale, jobs, db, full, frss, incr, irss, iread, chg, trk, rest, rrss) in rows:
        lines.append(f"| {scale} | {jobs} | {db / 2**20:.0f} MiB | {full:.2f} | {frss:.0f} MiB | {incr:.2f} | "
                     f"{iread / 2**20:.1f} MiB | {chg} of {trk} | {irss:.0f} MiB | {rest:.2f} | {rrss:.0f} MiB |")
    return "\n".join(lines) + "\n"


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    pg = sh([PG_BIN / "postgres", "--version"], capture=True).strip()
    pgbr = sh(["pgbackrest", "version"], capture=True).strip()
    bs = sh([BS, "--version"], capture=True).strip()
    return (f"Machine: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}; "
            f"{pg}; {pgbr}; {bs}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dataset", choices=["pgbench", "random"], default="pgbench")
    p.add_argument("--tps-seconds", type=int, default=60, help="pgbench duration for the tracking overhead runs")
    p.add_argument("--incr-tx", default="500,8000", help="pgbench -t values before the incremental backups")
    p.add_argument("--skip", default="", help="comma list of sections to skip: full,restore,incr,validation,tracking")
    p.add_argument("--scaling", action="store_true", help="blockstream alone at several scales and -j values")
    p.add_argument("--scaling-scales", default="10,50,150")
    p.add_argument("--scaling-jobs", default="1,2,4")
    p.add_argument("--quick", action="store_true", help="scale 5, one run: keeps the harness from rotting")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    a = p.parse_args()
    if a.quick:
        a.scale, a.reps, a.tps_seconds = 5, 1, 3
    skip = set(a.skip.split(",")) if a.skip else set()
    a.incr_tx = [int(x) for x in a.incr_tx.split(",")] if not a.quick else [100]
    if os.geteuid() != 0:
        sys.exit("bench: run as root (clusters run as postgres)")
    print("cargo build --release -p blockstream ...", flush=True)
    sh(["cargo", "build", "--release", "-p", "blockstream"])
    if a.scaling:
        a.scaling_scales = [int(x) for x in a.scaling_scales.split(",")]
        a.scaling_jobs = [int(x) for x in a.scaling_jobs.split(",")]
        if a.quick:
            a.scaling_scales, a.scaling_jobs = [2], [1, 2]
        try:
            text = f"{machine()}\n\n" + scaling(a)
        finally:
            Bench(a).stop(BASE / "data")
        print("\n" + text)
        if not a.quick:
            out = Path(a.out)
            with open(out, "a") as f:
                f.write("\n" + text)
            print(f"appended to {out}")
        return
    b = Bench(a)
    try:
        b.setup()
        if "full" not in skip:
            b.full_backups()
        if "restore" not in skip and "full" not in skip:
            b.restores()
        if "incr" not in skip:
            b.incrementals()
        if "validation" not in skip:
            b.validation()
        if "tracking" not in skip:
            b.tracking_overhead()
        cmd = " ".join(["python3 bench/bench.py"] + sys.argv[1:])
        text = (f"# Benchmarks\n\nProduced by `{cmd}` (see README.md, Benchmarks).\n\n{machine()}\n\n"
                + b.report())
        print("\n" + text)
        if not a.quick:
            Path(a.out).write_text(text)
            print(f"written to {a.out}")
    finally:
        b.stop(BASE / "restored")
        b.stop(BASE / "data")


if __name__ == "__main__":
    main()
