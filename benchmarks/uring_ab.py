"""FUSE over io_uring against /dev/fuse: cache=shared 4 KiB random reads of a lower file of a
writable mount (``run.py``'s ``shared`` workload, shorter), ``uring=auto`` and ``uring=off``
alternated (A B, B A, ...), one reader then two per mount. Needs root; sets
``fuse.enable_uring=Y`` for the run and restores it. Prints one JSON line per fio run (reads/s,
load, the daemon's and fio's CPU time per read) and the medians; writes them all to
``--out``.

Environment: ``RT`` fio seconds (default 5), ``PAIRS`` (default 3), ``PIN=0`` leaves the queue
threads unpinned (``OVERLAYPC_URING_PIN``, a prototype knob of ``engine/uring.py``).
Scratch under ``/tmp/uring-ab`` (``--dir``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAM = "/sys/module/fuse/parameters/enable_uring"
SIZE = 256 << 20


def fio(path: str, jobs: int, runtime: int) -> float:
    r = subprocess.run(["fio", "--name=r", "--rw=randread", "--bs=4k", f"--size={SIZE}",
                        f"--runtime={runtime}", "--time_based", "--ioengine=psync",
                        f"--filename={path}", "--readonly", "--invalidate=0", f"--numjobs={jobs}",
                        "--group_reporting", "--output-format=json"],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read"]["iops"]


def busy_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    return sum(v) - v[3] - v[4], sum(v)


def daemon_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return int(v[11]) + int(v[12])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/uring-ab")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runtime, pairs = int(os.environ.get("RT", "5")), int(os.environ.get("PAIRS", "3"))
    base = args.dir
    os.makedirs(f"{base}/l", exist_ok=True)
    big = f"{base}/l/big"
    if not os.path.exists(big) or os.path.getsize(big) != SIZE:
        with open(big, "wb") as f:
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
    with open(PARAM) as f:
        old = f.read().strip()
    with open(PARAM, "w") as f:
        f.write("Y")
    env = dict(os.environ, OVERLAYPC_URING_PIN=os.environ.get("PIN", "1"), PYTHONPATH=ROOT)
    tick = 1e6 / os.sysconf("SC_CLK_TCK")
    res = []
    try:
        for pair in range(pairs):
            for mode in (("auto", "off") if pair % 2 == 0 else ("off", "auto")):
                d = f"{base}/{mode}"
                subprocess.run(["rm", "-rf", d], check=True)
                for x in "uwm":
                    os.makedirs(f"{d}/{x}")
                subprocess.run([sys.executable, "-m", "overlaypc", "-o",
                                f"lowerdir={base}/l,upperdir={d}/u,workdir={d}/w,cache=shared,uring={mode}",
                                f"{d}/m"], cwd=ROOT, env=env, check=True)
                try:
                    pid = int(subprocess.run(["pgrep", "-f", f"{d}/u"], capture_output=True,
                                             text=True).stdout.split()[0])
                    with open(big, "rb") as f:
                        while f.read(1 << 20):
                            pass
                    for jobs in (1, 2):
                        ch0, d0, c0 = os.times(), daemon_ticks(pid), busy_ticks()
                        iops = fio(f"{d}/m/big", jobs, runtime)
                        ch1, d1, c1 = os.times(), daemon_ticks(pid), busy_ticks()
                        n = iops * runtime
                        fio_us = (ch1.children_user + ch1.children_system
                                  - ch0.children_user - ch0.children_system) * 1e6 / n
                        row = dict(pair=pair, mode=mode, jobs=jobs, iops=round(iops),
                                   load=os.getloadavg()[0],
                                   busy=round((c1[0] - c0[0]) / max(1, c1[1] - c0[1]), 2),
                                   daemon_us=round((d1 - d0) * tick / n, 2), fio_us=round(fio_us, 2))
                        print(json.dumps(row), flush=True)
                        res.append(row)
                finally:
                    subprocess.run(["umount", f"{d}/m"])
                    time.sleep(0.5)
    finally:
        with open(PARAM, "w") as f:
            f.write(old)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    for jobs in (1, 2):
        for mode in ("off", "auto"):
            rows = [r for r in res if r["jobs"] == jobs and r["mode"] == mode]
            v = sorted(r["iops"] for r in rows)
            us = sorted(r["daemon_us"] for r in rows)
            print(f"{jobs} reader(s) uring={mode}: {v} median {statistics.median(v):.0f}; "
                  f"daemon CPU per read {us} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
