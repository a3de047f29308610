#!/usr/bin/env python3
"""Two overlaypc trees through a mount, alternated (A B B A ...): wall time, daemon CPU and
context switches per workload (a benchmarking aid for paired before/after checks).

    python benchmarks/ab_mount.py --a TREE --b TREE [--rounds 8] [--workloads create,untar,rm_rf,grep_lower]
                                  [--env-a KEY=VALUE ...] [--env-b KEY=VALUE ...]

Each round mounts each tree afresh (run.py's lower tree and tarball) and runs the workloads
in the order given: ``find_cold`` (run.py's find+stat of the lower tree after drop_caches;
per entry), ``create`` (run.py's create+write of ``create_files`` files), ``untar`` (of the
source tarball), ``rm_rf`` (of what untar made, after a sync), ``grep_lower`` (grep -r
over the lower tree after drop_caches), ``chmod_r`` (run.py's). Per workload: the median
over rounds of B's time over A's in the same round, and the daemons' CPU and voluntary
context switches and CPU migrations (all threads alive at the end) per file. ``--env-a``
and ``--env-b`` add to a daemon's environment, so one tree pairs with itself in two
configurations (``OVERLAYPC_BENCH_WORKERS=1``, engine/daemon.py). Needs root.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import System, Workspace, drop_caches, loadavg, log, proc_cpu_ticks  # noqa: E402
from profile_workloads import wait_cmd  # noqa: E402
from run import FULL, QUICK, create_files, find_stat, make_tarball, make_tree  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def switches(pid: int) -> int:
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        n += int(line.split()[1])
        except OSError:
            pass
    return n


def migrations(pid: int) -> int:
    """The CPU migrations of ``pid``'s live threads (/proc/PID/task/TID/sched)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/sched") as f:
                for line in f:
                    if line.startswith("se.nr_migrations"):
                        n += int(line.split()[-1])
        except OSError:
            pass
    return n


def one_round(system: System, ws: Workspace, lower: str, data: dict, cfg: dict, workloads: list[str],
              tag: str) -> dict:
    base = ws.sub("ab", tag)
    upper, work, mnt = (os.path.join(base, x) for x in ("upper", "work", "mnt"))
    out = {}
    try:
        with system.mount(lower, upper, work, mnt) as m:
            pid = m.proc.pid
            src = os.path.join(mnt, "src")
            for w in workloads:
                if w == "untar":
                    os.makedirs(src)
                    fn, files = (lambda: wait_cmd(["tar", "-xf", data["tarball"], "-C", src])), data["tar_files"]
                elif w == "rm_rf":
                    os.sync()
                    fn, files = (lambda: wait_cmd(["rm", "-rf", src])), data["tar_files"]
                elif w == "create":
                    fn, files = (lambda: create_files(os.path.join(mnt, "new"), cfg["create_files"])), cfg["create_files"]
                elif w == "find_cold":  # run.py's find+stat of the lower tree, cold (per entry)
                    drop_caches()
                    fn, files = (lambda: find_stat(os.path.join(mnt, "tree"))), cfg["tree_files"] + cfg["tree_dirs"] + 1
                elif w == "grep_lower":
                    drop_caches()
                    fn, files = (lambda: wait_cmd(["grep", "-r", "-c", "x", os.path.join(mnt, "tree")])), cfg["tree_files"]
                elif w == "chmod_r":
                    fn, files = (lambda: wait_cmd(["chmod", "-R", "g+w", os.path.join(mnt, "tree")])), cfg["tree_files"]
                else:
                    raise ValueError(w)
                c0, s0, m0 = proc_cpu_ticks(pid), switches(pid), migrations(pid)
                t0 = time.perf_counter()
                fn()
                wall = time.perf_counter() - t0
                c1, s1, m1 = proc_cpu_ticks(pid), switches(pid), migrations(pid)
                out[w] = {"wall": wall, "cpu_per_file_us": (c1 - c0) / TICK / files * 1e6,
                          "switches_per_file": (s1 - s0) / files,
                          "migrations_per_file": (m1 - m0) / files, "load": float(loadavg()[0])}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--workloads", default="create,untar,rm_rf,grep_lower")
    ap.add_argument("--env-a", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--env-b", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--base", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = dict(QUICK if args.small else FULL)
    workloads = [w for w in args.workloads.split(",") if w]
    env = {k: dict(kv.split("=", 1) for kv in getattr(args, f"env_{k.lower()}")) for k in "AB"}
    systems = {k: System(k, "overlaypc", "", sys.executable, os.path.abspath(getattr(args, k.lower())), env[k])
               for k in "AB"}
    ws = Workspace(prefix="ab-", base=args.base)
    res: dict = {"A": [], "B": []}
    try:
        lower = ws.sub("lower")
        make_tree(os.path.join(lower, "tree"), cfg["tree_dirs"], cfg["tree_files"])
        tarball = os.path.join(ws.path, "src.tar")
        _, tar_files = make_tarball(tarball, cfg["tar_bytes"])
        data = {"tarball": tarball, "tar_files": tar_files}
        log(f"{args.a} {env['A']} (A) against {args.b} {env['B']} (B), {args.rounds} rounds; load {loadavg()}")
        for r in range(args.rounds):
            order = "AB" if r % 2 == 0 else "BA"
            for k in order:
                res[k].append(one_round(systems[k], ws, lower, data, cfg, workloads, f"{r}-{k}"))
            log(f"round {r + 1}: " + ", ".join(f"{w} {res['B'][-1][w]['wall'] / res['A'][-1][w]['wall']:.2f}"
                                             for w in workloads) + f"; load {loadavg()}")
    finally:
        ws.cleanup()
    print("workload: B/A time, median of the rounds' ratios (range); daemon CPU us/file A -> B; "
          "voluntary context switches/file A -> B; CPU migrations/file A -> B")
    for w in workloads:
        ratios = [b[w]["wall"] / a[w]["wall"] for a, b in zip(res["A"], res["B"])]
        med = lambda k, key: statistics.median(x[w][key] for x in res[k])  # noqa: E731
        print(f"  {w:10s} {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}); "
              f"CPU {med('A', 'cpu_per_file_us'):.0f} -> {med('B', 'cpu_per_file_us'):.0f}; "
              f"switches {med('A', 'switches_per_file'):.2f} -> {med('B', 'switches_per_file'):.2f}; "
              f"migrations {med('A', 'migrations_per_file'):.2f} -> {med('B', 'migrations_per_file'):.2f}; "
              f"wall A {med('A', 'wall'):.3f} s B {med('B', 'wall'):.3f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"a": args.a, "b": args.b, "env": env, "rounds": res, "cfg": cfg}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
