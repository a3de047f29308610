#!/usr/bin/env python3
"""Evidence for the goals overlaypc still misses (RESULTS.md, "Goals").

    python benchmarks/limits.py [--reps 5] [--out benchmarks/limits.json] [--keep-profiles DIR]

Three parts, all in one run on the same lower data:

1. Cold sequential read ceiling: ``dd if=FILE of=/dev/null bs=1M`` right after
   ``drop_caches``, of the lower file itself ("lower file (dd)") and of the same file through
   each mount, systems interleaved per repetition. Shows how close the FUSE systems already are
   to what the disk delivers.
2. Per-request cost: fio 4 KiB random reads (psync, one job, queue depth 1, warm) for 10 s;
   IOPS, fio's mean completion latency, and the daemon's CPU time per request (utime+stime of
   the daemon process over the run / requests).
3. Where the daemon's time goes: py-spy (``record -f raw --nonblocking``) attached to the
   overlaypc daemon during create+write+close x5000 then unlink x5000, during untar, during
   grep -r (after an unprofiled untar), during 5 warm find+stat passes, and (cache=shared)
   during fio. Per workload: wall time, daemon CPU
   time (user, system), the Python-active samples (py-spy's non-idle samples, as thread-seconds),
   the top Python frames by self time, the top overlaypc functions by inclusive time, and time
   per FUSE operation (the handler the engine's ``Session.dispatch`` called).
4. Syscalls of the daemon per operation (``strace -f -c``, counts only): create+write+close
   x1000 in kernel mode, 3 s of fio in shared mode; the engine's workers read each FUSE
   request with one ``readv`` of their /dev/fuse fd, so readv calls = FUSE requests.
5. ``mv`` of a lower directory tree (100 dirs, 10,000 files) with overlaypc redirect_dir=off
   (EXDEV, so mv copies) and =on (the default since 07bdcc3), and the other systems
   (``--parts rename``; not in the default set).

Needs root, fio, fuse-overlayfs, strace and py-spy (``--py-spy``; default: the one beside the
Python that runs this, else /tmp/v/bin/py-spy).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MiB, Workspace, drop_caches, drops, loadavg, log, machine_info,  # noqa: E402
                    rotated, run, select_systems, summary, timer, write_file, write_json)
from run import create_files, find_stat, make_tarball, make_tree, read_file, unlink_files  # noqa: E402

RAW = "lower file (dd)"


def dd_read(path: str) -> float:
    """MB/s as dd reports it (its own elapsed time; 1 MiB reads)."""
    r = run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], timeout=600)
    m = re.search(r"copied, ([\d.]+) s", r.stderr)
    nbytes = int(r.stderr.split(" bytes", 1)[0].splitlines()[-1])
    return nbytes / float(m.group(1)) / 1e6


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def fio(path: str, size: int, runtime: int) -> dict:
    r = run(["fio", "--name=randread", "--rw=randread", "--bs=4k", f"--size={size}",
             f"--runtime={runtime}", "--time_based", "--ioengine=psync", f"--filename={path}",
             "--readonly", "--invalidate=0", "--output-format=json"], timeout=runtime + 120)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    rd = job["read"]
    return {"iops": rd["iops"], "ios": rd["total_ios"], "clat_mean_us": rd["clat_ns"]["mean"] / 1e3,
            "clat_p50_us": rd["clat_ns"]["percentile"].get("50.000000", 0) / 1e3,
            "clat_p99_us": rd["clat_ns"]["percentile"].get("99.000000", 0) / 1e3,
            "fio_usr_cpu_pct": job["usr_cpu"], "fio_sys_cpu_pct": job["sys_cpu"]}


# -- py-spy ---------------------------------------------------------------------------------------

class Profiler:
    def __init__(self, py_spy: str, pid: int, out: str, rate: int) -> None:
        self.out, self.rate = out, rate
        self.proc = subprocess.Popen([py_spy, "record", "--nonblocking", "-f", "raw", "-r", str(rate),
                                      "-p", str(pid), "-o", out], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        time.sleep(1.5)                                   # attached and sampling
        if self.proc.poll() is not None:
            raise RuntimeError(f"py-spy exited: {self.proc.stdout.read()[-500:]}")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()[0]


# A thread sample with no Python frame, not idle: native code outside any Python function
# (with the engine every worker runs Python from its first frame, so this should stay ~0).
NATIVE = "(no Python frame: native code)"
#: the engine's entry for one request (overlaypc/engine/session.py): the frame it calls is the
#: operation's decoder (``Session._lookup``, ``Session._read``, ...)
DISPATCH = "dispatch"
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def analyse(raw_path: str, rate: int, top: int = 12) -> dict:
    """Self time by leaf frame, inclusive time by overlaypc function, and time by FUSE
    operation (the frame ``Session.dispatch`` called), from py-spy raw."""
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            n = int(n)
            total += n
            frames = []
            for fr in stack.split(";"):
                m = FRAME.match(fr)
                frames.append((m.group("func"), m.group("file")) if m else (fr, ""))
            leaf = frames[-1]
            self_t[NATIVE if stack.strip() == "" else f"{leaf[0]} ({leaf[1]})"] += n
            seen = set()
            for func, file in frames:
                if "overlaypc" in file:
                    key = f"{func} ({file})"
                    if key not in seen:
                        seen.add(key)
                        incl[key] += n
            # the FUSE operation: the frame the engine's Session.dispatch called
            names = [func for func, _ in frames]
            at = next((i for i, (func, file) in enumerate(frames)
                       if func.rsplit(".", 1)[-1] == DISPATCH and "engine/session" in file), None)
            if at is not None and at + 1 < len(frames):
                op = names[at + 1].rsplit(".", 1)[-1].lstrip("_")
            elif stack.strip() == "":
                op = NATIVE
            else:
                op = names[0]
            ops[op] += n
    to_s = lambda c: [(k, round(v / rate, 3), round(100 * v / total, 1) if total else 0) for k, v in c.most_common(top)]
    return {"samples": total, "active_thread_s": round(total / rate, 3),
            "self": to_s(self_t), "inclusive": to_s(incl), "ops": to_s(ops)}


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions of parts 1 and 2 (default 5)")
    p.add_argument("--size-mib", type=int, default=1024, help="lower file size (default 1024)")
    p.add_argument("--fio-runtime", type=int, default=10)
    p.add_argument("--creates", type=int, default=5000)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--parts", default="cold,fio,profile,strace")
    p.add_argument("--systems", default="overlaypc-kernel,overlaypc-shared,kernel-overlay,fuse-overlayfs")
    p.add_argument("--python", default=sys.executable, help="Python that runs overlaypc")
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    p.add_argument("--py-spy", default=beside if os.path.exists(beside) else "/tmp/v/bin/py-spy")
    p.add_argument("--keep-profiles", default="", help="directory to keep the raw py-spy files in")
    p.add_argument("--out", default="limits.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    parts = set(args.parts.split(","))
    systems, skipped = select_systems(args.systems.split(","), args.python)
    by_name = {s.name: s for s in systems}
    size = args.size_mib * MiB
    machine = machine_info()
    t_start = time.perf_counter()
    ws = Workspace(prefix="overlaypc-limits-")
    res: dict = {"cold_dd": {}, "cold_dd_disturbed": {}, "fio": {}, "profiles": {}}
    try:
        lower = ws.sub("lower")
        big = os.path.join(lower, "big")
        write_file(big, size)
        make_tree(os.path.join(lower, "tree"), 100, 10_000)
        tarball = os.path.join(ws.path, "src.tar")
        make_tarball(tarball, 20 * MiB)
        with open("/sys/block/vda/queue/read_ahead_kb") as f:
            res["lower_disk_read_ahead_kb"] = int(f.read())

        def mounted(system, tag):
            base = ws.sub("m", tag)
            return system.mount(lower, os.path.join(base, "u"), os.path.join(base, "w"), os.path.join(base, "mnt"))

        # 1. cold sequential read, dd, lower file vs through each mount
        if "cold" in parts:
            entries = [None] + systems
            for rep in range(args.reps):
                for system in rotated(entries, rep):
                    name = RAW if system is None else system.name
                    for attempt in range(3):
                        d0 = drops()
                        if system is None:
                            drop_caches()
                            v = dd_read(big)
                        else:
                            with mounted(system, f"cold-{rep}-{name}-{attempt}") as m:
                                os.stat(os.path.join(m.path, "big"))
                                drop_caches()
                                v = dd_read(os.path.join(m.path, "big"))
                        if drops() - d0 <= 1:
                            break
                        log(f"cold dd {name}: someone else dropped caches; redoing")
                    else:
                        res["cold_dd_disturbed"][name] = res["cold_dd_disturbed"].get(name, 0) + 1
                    res["cold_dd"].setdefault(name, []).append(v)
                log(f"cold dd rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in res["cold_dd"].items()))

        # 2. per-request cost: fio 4k random reads, warm, with the daemon's CPU time
        if "fio" in parts:
            entries = [None] + [s for s in systems if s.name != "kernel-overlay"]
            for rep in range(min(args.reps, 3)):
                for system in rotated(entries, rep):
                    name = RAW if system is None else system.name
                    if system is None:
                        read_file(big)
                        r = fio(big, size, args.fio_runtime)
                    else:
                        with mounted(system, f"fio-{rep}-{name}") as m:
                            path = os.path.join(m.path, "big")
                            read_file(path)
                            c0 = proc_cpu(m.proc.pid)
                            r = fio(path, size, args.fio_runtime)
                            c1 = proc_cpu(m.proc.pid)
                            r["daemon_user_s"], r["daemon_sys_s"] = c1[0] - c0[0], c1[1] - c0[1]
                            r["daemon_cpu_us_per_req"] = (sum(c1) - sum(c0)) * 1e6 / max(r["ios"], 1)
                    r["us_per_req"] = 1e6 / r["iops"]
                    res["fio"].setdefault(name, []).append(r)
                    log(f"fio rep {rep + 1} {name}: {r['iops']:.0f} IOPS, {r['us_per_req']:.1f} us/req, "
                        f"daemon CPU {r.get('daemon_cpu_us_per_req', 0):.1f} us/req")

        # 3. py-spy profiles of the overlaypc daemon
        if "profile" in parts:
            keep = args.keep_profiles or ws.sub("profiles")
            os.makedirs(keep, exist_ok=True)
            plan = [("create_unlink", "overlaypc-kernel"), ("untar", "overlaypc-kernel"),
                    ("grep", "overlaypc-kernel"), ("find_warm", "overlaypc-kernel"),
                    ("fio_shared", "overlaypc-shared")]
            for work, sysname in plan:
                if sysname not in by_name:
                    continue
                with mounted(by_name[sysname], f"prof-{work}") as m:
                    pid = m.proc.pid
                    mnt = m.path
                    phases = {}
                    if work == "find_warm":
                        find_stat(os.path.join(mnt, "tree"))
                    if work == "fio_shared":
                        read_file(os.path.join(mnt, "big"))
                    src = os.path.join(mnt, "src")
                    if work == "grep":                    # untar first, outside the profile
                        os.makedirs(src)
                        run(["tar", "-xf", tarball, "-C", src], timeout=600)
                    raw = os.path.join(keep, f"{work}.raw.txt")
                    prof = Profiler(args.py_spy, pid, raw, args.rate)
                    c0, t0 = proc_cpu(pid), time.perf_counter()
                    try:
                        if work == "create_unlink":
                            d = os.path.join(mnt, "new")
                            with timer() as t:
                                create_files(d, args.creates)
                            phases["create_s"] = t[0]
                            with timer() as t:
                                _, err = unlink_files(d, args.creates)
                            phases["unlink_s"] = t[0]
                            if err:
                                phases["unlink_error"] = err
                        elif work == "untar":
                            os.makedirs(src)
                            with timer() as t:
                                run(["tar", "-xf", tarball, "-C", src], timeout=600)
                            phases["untar_s"] = t[0]
                        elif work == "grep":
                            with timer() as t:
                                run(["grep", "-r", "-c", "import", src], check=False, timeout=600)
                            phases["grep_s"] = t[0]
                        elif work == "find_warm":
                            with timer() as t:
                                for _ in range(5):
                                    find_stat(os.path.join(mnt, "tree"))
                            phases["find_warm_x5_s"] = t[0]
                        elif work == "fio_shared":
                            r = fio(os.path.join(mnt, "big"), size, args.fio_runtime)
                            phases["fio_iops"] = r["iops"]
                    finally:
                        wall = time.perf_counter() - t0
                        c1 = proc_cpu(pid)
                        out = prof.stop()
                    a = analyse(raw, args.rate) if os.path.exists(raw) else {"error": out[-500:]}
                    a.update(phases, system=sysname, wall_s=round(wall, 3),
                             daemon_user_s=round(c1[0] - c0[0], 3), daemon_sys_s=round(c1[1] - c0[1], 3),
                             threads=len(os.listdir(f"/proc/{pid}/task")))
                    res["profiles"][work] = a
                    log(f"profile {work}: wall {wall:.2f} s, daemon user {a['daemon_user_s']} s sys "
                        f"{a['daemon_sys_s']} s, py-spy active {a.get('active_thread_s')} s; {phases}")
        # 4. syscalls of the daemon per FUSE request (strace -c; counts only, its times are
        #    inflated by strace itself): create+write+close x1000 (kernel mode), fio (shared)
        if "strace" in parts:
            for work, sysname in (("create", "overlaypc-kernel"), ("fio_shared", "overlaypc-shared")):
                if sysname not in by_name:
                    continue
                with mounted(by_name[sysname], f"strace-{work}") as m:
                    if work == "fio_shared":
                        read_file(os.path.join(m.path, "big"))
                    out = os.path.join(ws.path, f"strace-{work}.txt")
                    sp = subprocess.Popen(["strace", "-f", "-c", "-p", str(m.proc.pid), "-o", out],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1.5)
                    if work == "create":
                        n_ops = 1000
                        create_files(os.path.join(m.path, "new"), n_ops)
                    else:
                        n_ops = fio(os.path.join(m.path, "big"), size, 3)["ios"]
                    sp.send_signal(signal.SIGINT)
                    sp.wait(timeout=60)
                    calls = {}
                    with open(out) as f:
                        for line in f:
                            fld = line.split()
                            if len(fld) >= 5 and fld[0][0].isdigit() and fld[-1] != "total":
                                calls[fld[-1]] = int(fld[3])
                    res.setdefault("strace", {})[work] = {
                        "system": sysname, "ops": n_ops, "fuse_requests": calls.get("readv", 0),
                        "per_op": {k: round(v / n_ops, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}}
                    log(f"strace {work}: {res['strace'][work]}")
        # 5. rename of a lower directory tree (100 dirs, 10,000 files) with ``mv``: with
        #    redirect_dir=off the rename fails with EXDEV and mv copies and deletes everything
        if "rename" in parts:
            from common import System
            variants = [System("overlaypc redirect_dir=off", "overlaypc", "redirect_dir=off", args.python),
                        System("overlaypc redirect_dir=on (default)", "overlaypc", "", args.python)]
            variants += [s for s in systems if s.kind != "overlaypc"]
            for rep in range(min(args.reps, 3)):
                for system in rotated(variants, rep):
                    with mounted(system, f"mv-{rep}-{system.name.replace(' ', '_')}") as m:
                        with timer() as t:
                            r = run(["mv", os.path.join(m.path, "tree"), os.path.join(m.path, "tree2")],
                                    check=False, timeout=600)
                        n = find_stat(os.path.join(m.path, "tree2")) if r.returncode == 0 else 0
                        res.setdefault("rename", {}).setdefault(system.name, []).append(
                            {"s": t[0], "rc": r.returncode, "entries_after": n, "stderr": r.stderr[-200:]})
                        log(f"mv tree {system.name}: {t[0]:.3f} s rc={r.returncode} entries={n}")
    finally:
        ws.cleanup()

    # report
    print("\n## cold dd (MB/s), median (min–max)")
    for k, v in res["cold_dd"].items():
        s = summary(v)
        print(f"- {k}: {s['median']:.0f} ({s['min']:.0f}–{s['max']:.0f}) n={s['n']}"
              + (f" ({res['cold_dd_disturbed'][k]} disturbed)" if k in res["cold_dd_disturbed"] else ""))
    print("\n## fio 4k randread warm")
    for k, lst in res["fio"].items():
        med = lambda key: summary([r[key] for r in lst if key in r])
        i, u, c = med("iops"), med("us_per_req"), med("daemon_cpu_us_per_req")
        print(f"- {k}: {i['median']:.0f} IOPS ({i['min']:.0f}–{i['max']:.0f}), {u['median']:.1f} us/req"
              + (f", daemon CPU {c['median']:.1f} us/req" if c else ""))
    for work, a in res["profiles"].items():
        print(f"\n## profile {work}: " + json.dumps({k: v for k, v in a.items() if k not in ("self", "inclusive", "ops")}))
        for sect in ("ops", "inclusive", "self"):
            print(f"  {sect}:")
            for k, s, pct in a.get(sect, [])[:10]:
                print(f"    {pct:5.1f}%  {s:7.3f} s  {k}")
    for work, a in res.get("strace", {}).items():
        print(f"\n## syscalls per operation, {work} ({a['system']}): {a['fuse_requests'] / a['ops']:.1f} "
              f"FUSE requests (readv of /dev/fuse) per operation; " + ", ".join(f"{k} {v}" for k, v in a["per_op"].items()))
    for k, lst in res.get("rename", {}).items():
        sm = summary([r["s"] for r in lst])
        print(f"- mv tree, {k}: {sm['median']:.3f} s ({sm['min']:.3f}–{sm['max']:.3f}), "
              f"rc {[r['rc'] for r in lst]}, entries after {[r['entries_after'] for r in lst]}")
    write_json(args.out, {"suite": "limits.py", "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                          "machine": dict(machine, loadavg_at_end=loadavg()), "skipped": skipped,
                          "elapsed_s": round(time.perf_counter() - t_start, 1), "results": res})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
