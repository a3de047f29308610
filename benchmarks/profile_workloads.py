#!/usr/bin/env python3
"""Profiles of run.py's small-file workloads (issue 17): where each one's time goes.

    python benchmarks/profile_workloads.py [--workloads find_cold,...] [--modes plain,counts,pyspy,strace,perf]
                                           [--reps N] [--small] [--tree DIR] [--out profile.json]

The same lower tree and tarball as ``run.py`` (its ``make_tree``/``make_tarball`` and sizes;
``--small`` takes its QUICK sizes), each workload on a fresh mount with an empty upper, after
the set-up run.py's order gives it (find warm: one find first; rm -rf: untar and grep first;
chmod -R: the tree looked up first). Modes, each a separate mount per workload:

- ``plain``: overlaypc and fuse-overlayfs (``--reps`` each, alternated): wall time, the
  daemon's CPU (utime+stime of all its threads, /proc/PID/stat), the client's (rusage of
  the command; ``create`` runs in this process: its thread's rusage), and the machine's other
  busy CPU time meanwhile (/proc/stat minus the two: other work on this shared machine);
- ``counts``: overlaypc under ``benchmarks/count_ops.py``: FUSE requests by opcode;
- ``pyspy``: ``py-spy record --nonblocking -r 1000 -f raw --function`` on the daemon (set
  ``PY_SPY``), folded into self samples per function and per module and inclusive samples
  per function (idle threads are not sampled: the shares are of the daemon's busy time);
- ``strace``: ``strace -c -f -p PID`` on the daemon with the counter as well: system calls
  per request (use it with ``--small``);
- ``perf``: ``perf record -F 2999 -p PID`` on each daemon (overlaypc and fuse-overlayfs):
  the shares of the kernel, the interpreter and other objects, and the top symbols.

``--tree DIR`` runs another overlaypc tree (e.g. ``git archive`` of main) than this checkout.

Needs root (mounts, drop_caches). Prints a summary; ``--out`` keeps everything as JSON.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import (Workspace, cpu_ticks, drop_caches, loadavg, log, make_system,  # noqa: E402
                    proc_cpu_ticks, run)
from run import FULL, QUICK, create_files, make_tarball, make_tree  # noqa: E402

WORKLOADS = ("find_cold", "find_warm", "create", "untar", "grep_lower", "rm_rf", "chmod_r")
TICK = os.sysconf("SC_CLK_TCK")
#: the overlaypc tree the daemons run (``--tree``; None: this checkout)
TREE: list = [None]


def _utime(pid: int) -> int:
    """User time of process ``pid``, all its threads (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    return int(st[st.rindex(")") + 2:].split()[11])


def wait_cmd(cmd: list[str]) -> float:
    """Run ``cmd``; its CPU seconds (user + system, its children included)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode > 1:  # (grep -c: 1 when a file has no match)
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {proc.stderr.read()[-300:]!r}")
    proc.stderr.close()
    return ru.ru_utime + ru.ru_stime


def setup_and_measure(workload: str, mnt: str, data: dict, cfg: dict):
    """Do ``workload``'s set-up in the mount; returns (the measured step: returns the client's
    CPU seconds, the number of files it works on)."""
    tree, src = os.path.join(mnt, "tree"), os.path.join(mnt, "src")
    find = ["find", tree, "-printf", "%s %m %i\n"]
    if workload == "find_cold":
        def step():
            drop_caches()
            return wait_cmd(find)
        step.after_setup = drop_caches  # (drop before the sampler attaches; again inside)
        return step, data["tree_entries"]
    if workload == "find_warm":
        wait_cmd(find)
        return (lambda: wait_cmd(find)), data["tree_entries"]
    if workload == "create":
        def step():
            r0 = resource.getrusage(resource.RUSAGE_THREAD)
            create_files(os.path.join(mnt, "new"), cfg["create_files"])
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        return step, cfg["create_files"]
    if workload == "untar":
        os.makedirs(src)
        return (lambda: wait_cmd(["tar", "-xf", data["tarball"], "-C", src])), data["tar_files"]
    if workload == "rm_rf":
        os.makedirs(src)
        wait_cmd(["tar", "-xf", data["tarball"], "-C", src])
        wait_cmd(["grep", "-r", "-c", "import", src])
        os.sync()
        return (lambda: wait_cmd(["rm", "-rf", src])), data["tar_files"]
    if workload == "grep_lower":
        def step():
            drop_caches()
            return wait_cmd(["grep", "-r", "-c", "x", tree])
        return step, cfg["tree_files"]
    if workload == "chmod_r":
        wait_cmd(find)
        return (lambda: wait_cmd(["chmod", "-R", "g+w", tree])), cfg["tree_files"]
    raise ValueError(workload)


class Sampler:
    """A tool attached to the daemon (py-spy or strace) for the measured step only."""

    def __init__(self, kind: str, pid: int, out: str) -> None:
        self.kind, self.pid, self.out = kind, pid, out
        if kind == "perf":
            cmd = ["perf", "record", "-F", "2999", "-q", "-p", str(pid), "-o", out]
        elif kind == "pyspy":
            cmd = [os.environ.get("PY_SPY", "py-spy"), "record", "--nonblocking", "-r", "1000", "-f", "raw",
                   "--function", "-p", str(pid), "-o", out]
        else:
            cmd = ["strace", "-c", "-f", "-q", "-p", str(pid), "-o", out]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached (py-spy and strace need a few hundred ms here)
        if kind == "strace":
            self._wait_traced()

    def _wait_traced(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            tids = os.listdir(f"/proc/{self.pid}/task")
            traced = 0
            for tid in tids:
                with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                    traced += any(ln.startswith("TracerPid:") and ln.split()[1] != "0" for ln in f)
            if traced == len(tids):
                return
            time.sleep(0.1)
        raise RuntimeError("strace did not attach to every thread")

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=60)


def fold_pyspy(path: str, top: int = 15) -> dict:
    """py-spy's raw (collapsed) stacks: self samples per function and per module, inclusive
    samples per function, the top ``top`` of each, as shares of all samples."""
    own, mod, incl = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            total += n
            frames = [fr for fr in stack.split(";") if "(" in fr]  # (drops "process"/"thread" labels)
            names = [_frame_name(fr) for fr in frames]
            if names:
                own[names[-1]] += n
                mod[names[-1].split(":")[0]] += n
            for name in set(names):
                incl[name] += n

    def share(c):
        return [(k, round(v / max(1, total), 4)) for k, v in c.most_common(top)]
    return {"samples": total, "self": share(own), "module": share(mod), "inclusive": share(incl)}


def _frame_name(frame: str) -> str:
    """``func (path/mod.py:line)`` -> ``mod.py:func`` (package-relative for overlaypc)."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.groups()
    i = path.rfind("overlaypc/")
    where = path[i + len("overlaypc/"):] if i >= 0 else os.path.basename(path)
    return f"{where}:{func}"


def fold_perf(path: str, top: int = 15) -> dict:
    """``perf record``'s samples of the daemon: the shares in the kernel, in the
    interpreter (libpython or the executable) and elsewhere, and the top symbols."""
    where = collections.Counter()
    r = run(["perf", "report", "-i", path, "--stdio", "--sort", "dso"], timeout=300)
    for line in r.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s*$", line)
        if m:
            dso = m.group(2)
            where["kernel" if dso == "[kernel.kallsyms]" else "python" if "python" in dso else dso] += float(m.group(1))
    r = run(["perf", "report", "-i", path, "--stdio", "--sort", "dso,sym", "--percent-limit", "0.3"],
            timeout=300)
    syms = []
    for line in r.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
        if m and len(syms) < top:
            syms.append((f"{m.group(2)} {m.group(4).strip()}", float(m.group(1))))
    return {"areas": dict(where.most_common()), "top": syms}


def fold_strace(path: str) -> dict:
    """``strace -c``'s table: calls per system call and the total."""
    calls, total = {}, 0
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts or not parts[0][0].isdigit() and parts[0] != "100.00":
                continue
            if parts[-1] == "total":
                total = int(parts[3]) if len(parts) >= 5 else 0
                continue
            if len(parts) >= 5 and parts[3].isdigit():
                calls[parts[-1]] = int(parts[3])
    return {"total": total or sum(calls.values()), "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1]))}


def dump_counts(logfile: str, trigger: str) -> dict:
    """Ask count_ops for its counts since the last dump; they are read back from the log."""
    with open(logfile, errors="replace") as f:
        before = f.read().count("COUNTS ")
    open(trigger, "w").close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(logfile, errors="replace") as f:
            lines = [ln for ln in f if ln.startswith("COUNTS ")]
        if len(lines) > before:
            return eval(lines[-1][len("COUNTS "):], {})  # (a dict literal count_ops printed)
        time.sleep(0.05)
    raise RuntimeError("count_ops did not dump its counts")


def one(system_name: str, mode: str, workload: str, ws: Workspace, lower: str, data: dict, cfg: dict,
        n: int) -> dict:
    system = make_system(system_name)
    if system.kind == "overlaypc" and TREE[0]:
        system.tree = TREE[0]
    base = ws.sub("p", f"{workload}-{system_name}-{mode}-{n}")
    upper, work, mnt = (os.path.join(base, x) for x in ("upper", "work", "mnt"))
    trigger = os.path.join(base, "count-ops.dump")
    saved = common._pc_command
    if mode in ("counts", "strace"):
        os.environ["OVERLAYPC_COUNT_OPS_TRIGGER"] = trigger
        common._pc_command = lambda tree: [os.path.join(tree, "benchmarks", "count_ops.py")]
    rec: dict = {"system": system_name, "mode": mode, "workload": workload}
    try:
        with system.mount(lower, upper, work, mnt) as m:
            pid = m.proc.pid
            step, files = setup_and_measure(workload, mnt, data, cfg)
            getattr(step, "after_setup", lambda: None)()
            sampler = None
            if mode in ("pyspy", "strace", "perf"):
                sampler = Sampler(mode, pid, os.path.join(ws.path, f"{workload}-{mode}-{n}.out"))
            if mode in ("counts", "strace"):
                dump_counts(m.logfile, trigger)
            rec["load"] = float(loadavg()[0])
            d0, c0, u0 = proc_cpu_ticks(pid), cpu_ticks(), _utime(pid)
            t0 = time.perf_counter()
            client = step()
            wall = time.perf_counter() - t0
            d1, c1, u1 = proc_cpu_ticks(pid), cpu_ticks(), _utime(pid)
            if sampler:
                sampler.stop()
            daemon = (d1 - d0) / TICK
            rec.update(files=files, wall=wall, daemon_cpu=daemon, daemon_user=(u1 - u0) / TICK,
                       client_cpu=client,
                       other_cpu=max(0.0, (c1[0] - c0[0]) / TICK - daemon - client))
            if mode in ("counts", "strace"):
                ops = dump_counts(m.logfile, trigger)
                rec["ops"] = ops
                rec["requests"] = sum(ops.values())
            if mode == "pyspy":
                rec["pyspy"] = fold_pyspy(sampler.out)
            if mode == "strace":
                rec["strace"] = fold_strace(sampler.out)
            if mode == "perf":
                rec["perf"] = fold_perf(sampler.out)
    except Exception:
        logfile = os.path.join(base, f".mnt.{system_name}.log")
        if os.path.exists(logfile):
            with open(logfile, errors="replace") as f:
                log(f"{system_name} {mode} {workload} failed; its log ends:\n{f.read()[-2000:]}")
        raise
    finally:
        common._pc_command = saved
        shutil.rmtree(base, ignore_errors=True)
    return rec


def summary(recs: list[dict]) -> None:
    by = collections.defaultdict(list)
    for r in recs:
        by[r["workload"], r["system"], r["mode"]].append(r)
    for w in WORKLOADS:
        if not any(k[0] == w for k in by):
            continue
        print(f"\n## {w}")
        for sysname in ("overlaypc-kernel", "fuse-overlayfs"):
            rs = by.get((w, sysname, "plain"))
            if rs:
                med = lambda k: sorted(r[k] for r in rs)[len(rs) // 2]  # noqa: E731
                f = rs[0]["files"]
                print(f"  {sysname:17s} wall {med('wall'):.3f} s  daemon CPU {med('daemon_cpu'):.3f} s "
                      f"({med('daemon_cpu') / f * 1e6:.0f} us/file, user {med('daemon_user') / f * 1e6:.0f})  client CPU {med('client_cpu'):.3f} s  "
                      f"other {med('other_cpu'):.3f} s  idle-waiting {med('wall') - med('daemon_cpu') - med('client_cpu'):.3f} s"
                      f"  load {[r['load'] for r in rs]}")
        for mode in ("counts", "strace"):
            for r in by.get((w, "overlaypc-kernel", mode), []):
                f = r["files"]
                ops = ", ".join(f"{k} {v / f:.2f}" for k, v in sorted(r["ops"].items(), key=lambda kv: -kv[1]))
                print(f"  [{mode}] {r['requests'] / f:.2f} requests/file: {ops}")
                if mode == "strace":
                    s = r["strace"]
                    print(f"  [strace] {s['total'] / r['requests']:.2f} syscalls/request, {s['total'] / f:.1f}/file: "
                          + ", ".join(f"{k} {v / r['requests']:.2f}" for k, v in list(s["calls"].items())[:10]))
        for sysname in ("overlaypc-kernel", "fuse-overlayfs"):
            for r in by.get((w, sysname, "perf"), []):
                print(f"  [perf {sysname}] " + ", ".join(f"{k} {v:.0f}%" for k, v in r["perf"]["areas"].items()))
                print("    " + ", ".join(f"{k} {v:.1f}%" for k, v in r["perf"]["top"]))
        for r in by.get((w, "overlaypc-kernel", "pyspy"), []):
            p = r["pyspy"]
            print(f"  [py-spy] {p['samples']} samples; self by module: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in p["module"][:8]))
            print("    self by function: " + ", ".join(f"{k} {v:.1%}" for k, v in p["self"]))
            print("    inclusive: " + ", ".join(f"{k} {v:.0%}" for k, v in p["inclusive"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--modes", default="plain,counts,pyspy")
    ap.add_argument("--reps", type=int, default=3, help="plain runs per system and workload")
    ap.add_argument("--small", action="store_true", help="run.py's QUICK sizes")
    ap.add_argument("--base", default=None, help="the workspace's parent directory")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tree", default=None, help="the overlaypc tree to run (default: this one)")
    args = ap.parse_args()
    TREE[0] = os.path.abspath(args.tree) if args.tree else None
    if os.geteuid() != 0:
        raise SystemExit("run as root (mounts, drop_caches)")
    cfg = dict(QUICK if args.small else FULL)
    workloads = [w for w in args.workloads.split(",") if w]
    modes = [m for m in args.modes.split(",") if m]
    ws = Workspace(prefix="profile-", base=args.base)
    recs: list[dict] = []
    try:
        lower = ws.sub("lower")
        entries = make_tree(os.path.join(lower, "tree"), cfg["tree_dirs"], cfg["tree_files"])
        tarball = os.path.join(ws.path, "src.tar")
        _, tar_files = make_tarball(tarball, cfg["tar_bytes"])
        data = {"tree_entries": entries, "tarball": tarball, "tar_files": tar_files}
        log(f"workspace {ws.path}; {entries} tree entries, {tar_files} files in the tarball; load {loadavg()}")
        for w in workloads:
            for mode in modes:
                if mode == "plain":
                    for rep in range(args.reps):
                        for sysname in (("overlaypc-kernel", "fuse-overlayfs") if rep % 2 == 0
                                        else ("fuse-overlayfs", "overlaypc-kernel")):
                            recs.append(one(sysname, mode, w, ws, lower, data, cfg, rep))
                elif mode == "perf":
                    for sysname in ("overlaypc-kernel", "fuse-overlayfs"):
                        recs.append(one(sysname, mode, w, ws, lower, data, cfg, 0))
                else:
                    recs.append(one("overlaypc-kernel", mode, w, ws, lower, data, cfg, 0))
                log(f"{w} {mode} done; load {loadavg()}")
    finally:
        ws.cleanup()
    summary(recs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": cfg, "records": recs, "command": " ".join(sys.argv),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
