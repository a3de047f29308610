#!/usr/bin/env python3
"""Passthrough read speed (issue 16): warm sequential and 4 KiB random reads of one file,
through overlaypc and as the raw file, in one run, systems interleaved.

Cases (the same 256 MiB file each time, warm: read once before measuring):
  raw            the backing file itself
  upper          an upper file of a writable cache=kernel mount (passes through)
  upper-shared   the same in cache=shared (passes through)
  ro             a lower file of a read-only mount (passes through)
  nopt           the upper file with passthrough=off (cache=kernel: the FUSE page cache)
  lower-shared   a lower file of a writable cache=shared mount (direct io: a round trip each)

    python benchmarks/passthrough.py [--size-mib 256] [--reps 3] [--runtime 3] [--out F.json]

Reports medians and each median's ratio to the raw file's (the goal: >= 0.8x). fio 3.x,
psync, one job. The machine is shared: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import loadavg, log, machine_info, make_system, write_json  # noqa: E402

CASES = ["raw", "upper", "upper-shared", "ro", "nopt", "lower-shared"]


def fio(path: str, rw: str, bs: str, size: int, runtime: float) -> dict:
    out = subprocess.run(["fio", "--name=pt", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
                          f"--size={size}", "--ioengine=psync", "--numjobs=1", "--time_based",
                          f"--runtime={runtime}", "--invalidate=0", "--output-format=json"],
                         check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]["read"]
    return {"iops": job["iops"], "MBps": job["bw_bytes"] / 1e6}


@contextlib.contextmanager
def case_path(case: str, root: str, python: str):
    lower, upper = os.path.join(root, "lower"), os.path.join(root, "upper")
    if case == "raw":
        yield os.path.join(upper, "up")
        return
    name, option = {"upper": ("overlaypc-kernel", ""), "upper-shared": ("overlaypc-shared", ""),
                    "ro": ("overlaypc-ro", ""), "nopt": ("overlaypc-nopt", ""),
                    "lower-shared": ("overlaypc-shared", "")}[case]
    system = make_system(name, python)
    mnt = tempfile.mkdtemp(prefix=f"m-{case}-", dir=root)
    work = tempfile.mkdtemp(prefix=f"w-{case}-", dir=root)
    with system.mount(lower, upper, work, mnt):
        yield os.path.join(mnt, "low" if case in ("ro", "lower-shared") else "up")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--runtime", type=float, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--dir", default="/tmp", help="where the layers live")
    p.add_argument("--out", default="passthrough.json")
    a = p.parse_args(argv)
    cases = a.cases.split(",")
    size = a.size_mib << 20
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ptbench-", dir=a.dir) as root:
        for d in ("lower", "upper"):
            os.mkdir(os.path.join(root, d))
        data = os.urandom(1 << 20)
        for rel in ("lower/low", "upper/up"):
            with open(os.path.join(root, rel), "wb") as f:
                for _ in range(a.size_mib):
                    f.write(data)
        for rep in range(a.reps):
            order = cases[rep % len(cases):] + cases[:rep % len(cases)]
            for case in order:
                with case_path(case, root, a.python) as path:
                    with open(path, "rb") as f:  # warm
                        while f.read(1 << 20):
                            pass
                    seq = fio(path, "read", "1M", size, a.runtime)
                    rnd = fio(path, "randread", "4k", size, a.runtime)
                results.append({"case": case, "rep": rep, "seq_MBps": seq["MBps"],
                                "rand_iops": rnd["iops"], "load": loadavg()})
                log(f"{case} rep {rep}: seq {seq['MBps']:.0f} MB/s, 4k random {rnd['iops']:.0f} IOPS")
    med = {c: {k: statistics.median(r[k] for r in results if r["case"] == c)
               for k in ("seq_MBps", "rand_iops")} for c in cases}
    lines = ["| case | warm sequential MB/s | ratio to raw | warm 4 KiB random IOPS | ratio to raw |",
             "|---|---|---|---|---|"]
    raw = med.get("raw")
    for c in cases:
        m = med[c]
        rs = f"{m['seq_MBps'] / raw['seq_MBps']:.2f}x" if raw else "-"
        rr = f"{m['rand_iops'] / raw['rand_iops']:.2f}x" if raw else "-"
        lines.append(f"| {c} | {m['seq_MBps']:.0f} | {rs} | {m['rand_iops']:.0f} | {rr} |")
    table = "\n".join(lines)
    print(table)
    write_json(a.out, {"machine": machine_info(), "size_mib": a.size_mib, "reps": a.reps,
                       "runtime_s": a.runtime, "results": results, "medians": med, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
