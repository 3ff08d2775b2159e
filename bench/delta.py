#!/usr/bin/env python3
"""`restore --delta` against a full restore, on the same backup.

pgbench scale --scale, a full backup at -j --jobs; the cluster then goes on
with `pgbench -c 2 -t --diverge` and stops (the failed primary to re-seed):
shut down cleanly, or with --crash stopped with `pg_ctl -m immediate`, as
a crashed primary is, after a checkpoint half way through (its delta then
follows its WAL to the end; what it names after the checkpoint may never
have reached the disk, and is rewritten all the same).
Each round, with the page cache dropped before each run:
  - a full restore into an empty directory;
  - `restore --delta` over a fresh copy of the diverged data directory (the
    copy's own pg_blocktrack tracking names the blocks to rewrite);
  - the same with `--delta-compare-all` (every block read and compared).
Also counts the changed bytes: 8 kB blocks that differ between the diverged
copy and the backup's restore, plus bytes of files only the backup has.
Prints every run and the medians, and writes BENCHMARKS-delta.md.

  python3 bench/delta.py [--scale 50] [--jobs 2] [--diverge 2000] [--reps 3] [--crash]
                         [--out BENCHMARKS-delta.md]

Run as root.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BS, PG_BIN, ROOT, fresh_dir, psql, sh, timed, tracked_cluster  # noqa: E402

BASE = Path("/tmp/blockstream-delta")
PORT = 5540
BLOCK = 8192
# Written by every restore: not part of the data that diverged.
RESTORE_FILES = {"backup_label", "recovery.signal", "postgresql.auto.conf", "tablespace_map"}


def drop_caches():
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def run_json(cmd):
    """Wall seconds and the JSON summary of one command."""
    t = time.monotonic()
    r = subprocess.run([str(c) for c in cmd], text=True, capture_output=True)
    secs = time.monotonic() - t
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed:\n{r.stderr}")
    return secs, json.loads(r.stdout)


def files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if not p.is_symlink():
                out[str(p.relative_to(root))] = p
    return out


def changed_bytes(backup_copy, diverged):
    """Bytes a perfect delta would write: differing blocks, and files only the backup has."""
    a, b = files(backup_copy), files(diverged)
    total = 0
    for rel, p in a.items():
        if rel in RESTORE_FILES:
            continue
        q = b.get(rel)
        if q is None:
            total += p.stat().st_size
            continue
        with open(p, "rb") as fa, open(q, "rb") as fb:
            while True:
                x = fa.read(BLOCK)
                if not x:
                    break
                if x != fb.read(BLOCK)[: len(x)]:
                    total += len(x)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--diverge", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--crash", action="store_true", help="stop the diverged cluster with -m immediate")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS-delta.md"))
    a = ap.parse_args()
    data = BASE / "data"
    if (data / "postmaster.pid").exists():
        sh([PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], user="postgres", check=False)
    fresh_dir(BASE)
    repo = BASE / "repo"
    try:
        tracked_cluster(data, PORT, BASE / "log", "max_wal_size = 4GB\n")
        sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-i", "-q", "-s", a.scale, "postgres"])
        psql(PORT, "CHECKPOINT")
        sh([BS, "backup", "-D", data, "-h", "/tmp", "-p", PORT, "-U", "postgres", "--repo", repo, "-j", a.jobs])
        if a.crash:
            # Half, a checkpoint (changed pages reach the disk), the other half.
            half = a.diverge // 2
            sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-c", "2", "-t", half, "postgres"])
            psql(PORT, "CHECKPOINT")
            sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-c", "2", "-t", a.diverge - half,
                "postgres"])
        else:
            sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-c", "2", "-t", a.diverge, "postgres"])
        if a.crash:
            sh([PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], user="postgres")
    finally:
        sh([PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], user="postgres", check=False)
    full_target, delta_target = BASE / "full", BASE / "delta"
    full, delta, compare = [], [], []
    for rep in range(a.reps):
        shutil.rmtree(full_target, ignore_errors=True)
        drop_caches()
        secs, rss = timed([BS, "restore", "--repo", repo, "-D", full_target, "-j", a.jobs])
        full.append((secs, rss))
        shutil.rmtree(delta_target, ignore_errors=True)
        sh(["cp", "-a", data, delta_target])
        drop_caches()
        secs, r = run_json([BS, "restore", "--repo", repo, "-D", delta_target, "-j", a.jobs, "--delta",
                            "--output", "json"])
        delta.append((secs, r))
        # The same, comparing every block instead of trusting the target's tracking.
        shutil.rmtree(delta_target, ignore_errors=True)
        sh(["cp", "-a", data, delta_target])
        drop_caches()
        csecs, c = run_json([BS, "restore", "--repo", repo, "-D", delta_target, "-j", a.jobs, "--delta",
                             "--delta-compare-all", "--output", "json"])
        compare.append((csecs, c))
        print(f"round {rep + 1}: full {full[-1][0]:.2f} s, delta {secs:.2f} s "
              f"({r['bytes_written'] / 2**20:.1f} MiB written, {r['bytes_compared'] / 2**20:.1f} MiB read, "
              f"{r['files_unchanged']} files unchanged, {r['removed']} removed), "
              f"delta comparing every block {csecs:.2f} s", flush=True)
    shutil.rmtree(delta_target, ignore_errors=True)
    sh(["cp", "-a", data, delta_target])
    changed = changed_bytes(full_target, delta_target)
    restored = delta[0][1]["bytes_restored"]
    written = statistics.median(d[1]["bytes_written"] for d in delta)
    mf, md = statistics.median(f[0] for f in full), statistics.median(d[0] for d in delta)
    mc = statistics.median(c[0] for c in compare)

    def mib(runs, key):
        return f"{statistics.median(x[1][key] for x in runs) / 2**20:.1f} MiB"
    lines = [
        "# Delta restore",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"`python3 bench/delta.py --scale {a.scale} --jobs {a.jobs} --diverge {a.diverge} --reps {a.reps}"
        f"{' --crash' if a.crash else ''}`.",
        "",
        f"pgbench scale {a.scale} ({restored / 2**20:.0f} MiB restored), a full backup at -j {a.jobs}; the cluster "
        f"then ran `pgbench -c 2 -t {a.diverge}` and "
        f"{'crashed (`pg_ctl -m immediate`; a CHECKPOINT half way)' if a.crash else 'stopped'}. "
        "Page cache dropped before every run.",
        "",
        "| restore | median (s) | runs (s) | bytes written | bytes of the target read |",
        "|---|---:|---|---:|---:|",
        f"| full, into an empty directory | {mf:.2f} | {', '.join(f'{f[0]:.2f}' for f in full)} | "
        f"{restored / 2**20:.1f} MiB | |",
        f"| --delta over the diverged copy | {md:.2f} | {', '.join(f'{d[0]:.2f}' for d in delta)} | "
        f"{written / 2**20:.1f} MiB | {mib(delta, 'bytes_compared')} |",
        f"| --delta --delta-compare-all | {mc:.2f} | {', '.join(f'{c[0]:.2f}' for c in compare)} | "
        f"{mib(compare, 'bytes_written')} | {mib(compare, 'bytes_compared')} |",
        "",
        f"What the delta went by: {delta[0][1].get('delta_basis')}.",
        "",
        f"Changed bytes (blocks that differ from the backup, files only the backup has): {changed / 2**20:.1f} MiB.",
        "",
        f"- delta / full restore time: {md / mf:.2f} (goal <= 0.25); comparing every block: {mc / mf:.2f}",
        f"- bytes written / changed bytes: {written / max(changed, 1):.2f} (goal <= 1.5)",
        f"- peak RSS of the full restore: {max(f[1] for f in full):.0f} MiB",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
