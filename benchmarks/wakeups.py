#!/usr/bin/env python3
"""Which worker serves each request, on which CPU, woken from which CPU: one tree's daemon in
configurations given as environments (e.g. ``OVERLAYPC_BENCH_WORKERS=1``), per workload.

    python benchmarks/wakeups.py [--tree .] [--config NAME:KEY=VALUE,...] [--workloads untar,rm_rf]

Each configuration mounts afresh per round (run.py's lower tree and tarball; ab_mount.py's
workloads) and runs each workload under ``perf record -a`` of four trace points: a
``readv`` returning in a daemon thread is a request read (which thread, which CPU); a
``sched_wakeup`` of a daemon thread says from which CPU it was woken and onto which;
``sys_enter_futex`` in a daemon thread is a futex call (the GIL, a lock, an Event);
``sched_migrate_task`` of a daemon thread is a migration. Per request: the share read by
another thread than the request before (the alternation of idle workers that the kernel's
FIFO wait queue makes), the share of wake-ups of a daemon thread onto another CPU than the
waker's, futex calls and migrations; per file: daemon CPU and wall (perf's own cost
included in both, the same for every configuration). Needs root and perf.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import System, Workspace, drop_caches, loadavg, log, proc_cpu_ticks  # noqa: E402
from profile_workloads import wait_cmd  # noqa: E402
from run import FULL, QUICK, create_files, find_stat, make_tarball, make_tree  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
EVENTS = ["syscalls:sys_exit_readv", "sched:sched_wakeup", "syscalls:sys_enter_futex",
          "sched:sched_migrate_task"]
_LINE = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<tid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<time>[\d.]+):\s+"
                   r"(?P<event>[\w:]+):\s*(?P<rest>.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")


def workload(name: str, mnt: str, data: dict, cfg: dict):
    """(the step to measure, its file count) after ``name``'s set-up."""
    src = os.path.join(mnt, "src")
    if name == "untar":
        os.makedirs(src)
        return (lambda: wait_cmd(["tar", "-xf", data["tarball"], "-C", src])), data["tar_files"]
    if name == "rm_rf":
        os.makedirs(src)
        wait_cmd(["tar", "-xf", data["tarball"], "-C", src])
        os.sync()
        return (lambda: wait_cmd(["rm", "-rf", src])), data["tar_files"]
    if name == "create":
        return (lambda: create_files(os.path.join(mnt, "new"), cfg["create_files"])), cfg["create_files"]
    if name == "find_cold":
        drop_caches()
        return (lambda: find_stat(os.path.join(mnt, "tree"))), cfg["tree_files"] + cfg["tree_dirs"] + 1
    if name == "grep_lower":
        drop_caches()
        return (lambda: wait_cmd(["grep", "-r", "-c", "x", os.path.join(mnt, "tree")])), cfg["tree_files"]
    raise ValueError(name)


def analyse(script: str, tids: set[int]) -> dict:
    """Per-request figures from ``perf script`` output, for the daemon threads ``tids``."""
    reads = []  # (tid, cpu) of each request read
    wakes = cross = futex = migr = 0
    per_tid = collections.Counter()
    for line in script.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        tid, cpu, ev, rest = int(m["tid"]), int(m["cpu"]), m["event"], m["rest"]
        if ev == "syscalls:sys_exit_readv":
            if tid in tids:
                ret = int(rest.split()[0], 16)  # ("0x68"; an error shows as 0xffff...)
                if 0 < ret < 1 << 63:
                    reads.append((tid, cpu))
                    per_tid[tid] += 1
        elif ev == "syscalls:sys_enter_futex":
            futex += tid in tids
        elif ev == "sched:sched_wakeup":
            f = dict(_FIELD.findall(rest))
            if int(f.get("pid", -1)) in tids:
                wakes += 1
                cross += int(f.get("target_cpu", cpu)) != cpu
        elif ev == "sched:sched_migrate_task":
            f = dict(_FIELD.findall(rest))
            migr += int(f.get("pid", -1)) in tids
    n = len(reads)
    switched = sum(1 for a, b in zip(reads, reads[1:]) if a[0] != b[0])
    cpu_changed = sum(1 for a, b in zip(reads, reads[1:]) if a[1] != b[1])
    return {"requests": n, "other_thread": switched / max(1, n - 1),
            "other_cpu": cpu_changed / max(1, n - 1), "wakeups": wakes / max(1, n),
            "cross_cpu_wakeups": cross / max(1, wakes), "futex": futex / max(1, n),
            "migrations": migr / max(1, n), "threads_serving": len(per_tid)}


def one(system: System, ws: Workspace, lower: str, data: dict, cfg: dict, name: str, tag: str) -> dict:
    base = ws.sub("wk", tag)
    upper, work, mnt = (os.path.join(base, x) for x in ("upper", "work", "mnt"))
    perf_data = os.path.join(ws.path, f"perf-{tag}.data")
    try:
        with system.mount(lower, upper, work, mnt) as m:
            pid = m.proc.pid
            fn, files = workload(name, mnt, data, cfg)
            perf = subprocess.Popen(["perf", "record", "-q", "-a", "-o", perf_data,
                                     *(x for e in EVENTS for x in ("-e", e))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # (perf's set-up)
            c0 = proc_cpu_ticks(pid)
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            c1 = proc_cpu_ticks(pid)
            tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
            perf.send_signal(2)
            perf.wait(timeout=60)
        script = subprocess.run(["perf", "script", "-i", perf_data, "-F", "comm,tid,cpu,time,event,trace"],
                                capture_output=True, text=True).stdout
        out = analyse(script, tids)
        out.update(wall_per_file_us=wall / files * 1e6, cpu_per_file_us=(c1 - c0) / TICK / files * 1e6,
                   requests_per_file=out["requests"] / files, load=float(loadavg()[0]))
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if os.path.exists(perf_data):
            os.unlink(perf_data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=".")
    ap.add_argument("--config", action="append", default=[],
                    help="NAME:KEY=VALUE,... (default: w2: and w1:OVERLAYPC_BENCH_WORKERS=1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="untar,rm_rf,grep_lower,create,find_cold")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--base", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = dict(QUICK if args.small else FULL)
    configs = {}
    for c in args.config or ["w2:", "w1:OVERLAYPC_BENCH_WORKERS=1"]:
        name, _, kvs = c.partition(":")
        configs[name] = System(name, "overlaypc", "", sys.executable, os.path.abspath(args.tree),
                               dict(kv.split("=", 1) for kv in kvs.split(",") if kv))
    workloads = [w for w in args.workloads.split(",") if w]
    ws = Workspace(prefix="wk-", base=args.base)
    res: dict = {k: {w: [] for w in workloads} for k in configs}
    try:
        lower = ws.sub("lower")
        make_tree(os.path.join(lower, "tree"), cfg["tree_dirs"], cfg["tree_files"])
        tarball = os.path.join(ws.path, "src.tar")
        _, tar_files = make_tarball(tarball, cfg["tar_bytes"])
        data = {"tarball": tarball, "tar_files": tar_files}
        log(f"{list(configs)} {args.rounds} rounds; load {loadavg()}")
        names = list(configs)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for w in workloads:
                for k in order:
                    res[k][w].append(one(configs[k], ws, lower, data, cfg, w, f"{r}-{k}-{w}"))
            log(f"round {r + 1}; load {loadavg()}")
    finally:
        ws.cleanup()
    keys = ["wall_per_file_us", "cpu_per_file_us", "requests_per_file", "other_thread", "other_cpu",
            "wakeups", "cross_cpu_wakeups", "futex", "migrations", "threads_serving"]
    print("config workload: medians over rounds of " + ", ".join(keys))
    for w in workloads:
        for k in configs:
            med = {key: statistics.median(x[key] for x in res[k][w]) for key in keys}
            print(f"  {k:6s} {w:10s} " + " ".join(f"{key.split('_per')[0]}={med[key]:.3g}" for key in keys))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"configs": {k: s.env for k, s in configs.items()}, "res": res, "cfg": cfg}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
