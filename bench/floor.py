#!/usr/bin/env python3
"""The floor under a restore: what writing, decompressing and hashing the
restored bytes cost at best on this machine, beside our restore of the same
backup.

  python3 bench/floor.py [--scale 50] [--jobs 2] [--reps 3] [--out BENCHMARKS-floor.md]

- buffered writes of the restored bytes into one file, then fsync (dd
  conv=fsync, 4 MiB blocks, from a copy of the restored files in /dev/shm:
  the same bytes, not zeros, which this virtual disk writes at another speed);
- O_DIRECT writes of the same, 4 MiB (dd oflag=direct), which skip the page cache;
- two buffered writers of half the bytes each, as a restore at -j 2 writes;
- io_uring (fio, ioengine=io_uring, 1 MiB writes, then fsync): two buffered
  writers with 8 writes in flight each, and one O_DIRECT writer with 32 in
  flight; fio writes its own random bytes, which this disk writes at the
  same speed as the restored ones (incompressible either way);
- decompression alone: `zstd -d` of the backup's streams (one thread; divided by
  --jobs for the parallel floor);
- SHA-256 of the restored bytes (`openssl dgst -sha256`, one thread, SHA
  extensions like our sha2 crate; coreutils' sha256sum has none), what
  restore's end-to-end digest check costs;
- reading the restored files back with the page cache dropped (`cat` to
  /dev/null): what a delta restore, which compares every block of the
  target, pays before it writes anything;
- blockstream restore -j JOBS of the same full backup into an empty directory.

Every round runs each step once, in that order, so that all steps see the
disk in the same state (its speed drifts by 2x over an hour here); the
medians are over rounds.

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
from bench import BS, PG_BIN, ROOT, fresh_dir, psql, sh  # noqa: E402

BASE = Path("/tmp/blockstream-floor")
PORT = 5496


def seconds(cmd, shell=False):
    t = time.monotonic()
    subprocess.run(cmd, check=True, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS-floor.md"))
    a = p.parse_args()

    data, repo = BASE / "data", BASE / "repo"
    sh([PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "stop"], user="postgres", check=False)
    fresh_dir(BASE)
    sh([PG_BIN / "initdb", "-k", "-A", "trust", "-U", "postgres", "-D", data], user="postgres", capture=True)
    conf = (ROOT / "pg_test_configs/blocktrack.conf").read_text() + f"port = {PORT}\n"
    with open(data / "postgresql.conf", "a") as f:
        f.write(conf)
    sh([PG_BIN / "pg_ctl", "-D", data, "-l", BASE / "server.log", "-w", "start"], user="postgres", capture=True)
    psql(PORT, "CREATE EXTENSION pg_blocktrack")
    sh([PG_BIN / "pgbench", "-h", "/tmp", "-p", PORT, "-U", "postgres", "-i", "-q", "-s", a.scale, "postgres"],
       user="postgres", capture=True)
    psql(PORT, "CHECKPOINT")
    fresh_dir(repo)
    sh([BS, "backup", "-D", data, "-h", "/tmp", "-p", PORT, "-U", "postgres", "--repo", repo, "-j", a.jobs],
       user="postgres", capture=True)
    sh([PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], user="postgres", capture=True)

    (backup,) = [d for d in (repo / "backups").iterdir() if d.is_dir()]
    streams = sorted(backup.glob("stream-*.bsz"))
    stored = sum(s.stat().st_size for s in streams)
    target = BASE / "target"
    rows, results = [], {}

    # Our restore first: it gives the restored bytes the floors write.
    def restore():
        fresh_dir(target).chmod(0o700)
        return seconds(["runuser", "-u", "postgres", "--", BS, "restore", "--repo", repo, "-D", target,
                        "-j", str(a.jobs)])
    restore()
    restored = int(subprocess.run(["du", "-sb", target], capture_output=True, text=True, check=True)
                   .stdout.split()[0])
    mib = restored / 2**20
    blob = BASE / "floor.bin"
    source = Path("/dev/shm/blockstream-floor.bin")
    subprocess.run(f"cat $(find {target} -type f | sort) > {source}", shell=True, check=True)

    def buffered():
        blob.unlink(missing_ok=True)
        os.sync()
        return seconds(["dd", f"if={source}", f"of={blob}", "bs=4M", "conv=fsync"])

    def direct():
        blob.unlink(missing_ok=True)
        os.sync()
        return seconds(["dd", f"if={source}", f"of={blob}", "bs=4M", "oflag=direct", "conv=fsync"])

    # Every stream is a 32-byte header and zstd frames end to end.
    dec = " ; ".join(f"tail -c +33 {s} | zstd -d -q -c > /dev/null" for s in streams)
    def two_writers():
        # Two buffered writers, each half of the bytes, as a restore at -j 2 writes.
        blob.unlink(missing_ok=True)
        os.sync()
        half = (restored + (8 << 20) - 1) // (8 << 20)
        both = (f"dd if={source} of={blob} bs=4M count={half} conv=fsync,notrunc 2>/dev/null & "
                f"dd if={source} of={blob} bs=4M skip={half} seek={half} conv=fsync,notrunc 2>/dev/null & wait")
        return seconds(both, shell=True)

    def uring(jobs, direct, depth):
        def run():
            for f in BASE.glob("fio.*"):
                f.unlink()
            os.sync()
            size = (restored + jobs * (1 << 20) - 1) // jobs
            return seconds(["fio", "--name=floor", f"--directory={BASE}", "--filename_format=fio.$jobnum",
                            "--rw=write", "--ioengine=io_uring", f"--direct={direct}", "--bs=1M",
                            f"--iodepth={depth}", f"--numjobs={jobs}", f"--size={size}", "--end_fsync=1"])
        return run

    hashing = f"cat {source} | openssl dgst -sha256 > /dev/null"

    def cold_read():
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return seconds(f"cat $(find {target} -type f) > /dev/null", shell=True)

    steps = [
        (f"blockstream restore -j {a.jobs}", restore),
        ("buffered write + fsync (dd conv=fsync, 4 MiB)", buffered),
        ("O_DIRECT write (dd oflag=direct, 4 MiB)", direct),
        ("two buffered writers + fsync (2 x dd, each half)", two_writers),
        ("io_uring, two buffered writers, 8 in flight each (fio)", uring(2, 0, 8)),
        ("io_uring, O_DIRECT, 32 in flight (fio)", uring(1, 1, 32)),
        ("zstd -d of the streams (1 thread)", lambda: seconds(dec, shell=True)),
        ("SHA-256 of the restored bytes (1 thread, page cache)", lambda: seconds(hashing, shell=True)),
        ("read of the restored files, page cache dropped (cat)", cold_read),
    ]
    # The steps that write the restored bytes: the best of them is the write floor.
    writers = [name for name, _ in steps[1:6]]
    for rnd in range(a.reps):
        for name, fn in steps:
            results.setdefault(name, []).append(fn())
        print(f"  round {rnd + 1}: " + ", ".join(f"{k.split(' (')[0]} {v[-1]:.2f}" for k, v in results.items()),
              flush=True)
    blob.unlink(missing_ok=True)
    source.unlink(missing_ok=True)
    for f in BASE.glob("fio.*"):
        f.unlink()

    med = {k: statistics.median(v) for k, v in results.items()}
    ours = med[f"blockstream restore -j {a.jobs}"]
    write_floor = min(med[k] for k in writers)
    floor = max(write_floor, med["zstd -d of the streams (1 thread)"] / a.jobs)
    rows.append("| step | median (s) | runs (s) | MiB/s of restored data |")
    rows.append("|---|---:|---|---:|")
    for k, v in results.items():
        rows.append(f"| {k} | {med[k]:.2f} | {', '.join(f'{r:.2f}' for r in v)} | {mib / med[k]:.0f} |")
    text = [
        "# Restore floor",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. `python3 bench/floor.py --scale {a.scale} "
        f"--jobs {a.jobs} --reps {a.reps}`.",
        "",
        f"pgbench scale {a.scale}: a full backup of {mib:.0f} MiB restored, {stored / 2**20:.1f} MiB stored "
        f"in {len(streams)} streams.",
        "",
        *rows,
        "",
        f"Floor = max(best write {write_floor:.2f} s, zstd -d / {a.jobs} threads "
        f"{med['zstd -d of the streams (1 thread)'] / a.jobs:.2f} s) = {floor:.2f} s; "
        f"our restore is {ours / floor:.2f}x the floor. A delta restore that compares every block reads the "
        f"whole target: its floor is the cold read, "
        f"{med['read of the restored files, page cache dropped (cat)']:.2f} s; one guided by the target's "
        f"tracking reads only its small files, and decodes every chunk that holds a changed block "
        f"(zstd -d / {a.jobs} threads).",
        "",
    ]
    Path(a.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
