#!/usr/bin/env python3
"""overlaypc benchmark suite (issue 7), side by side with the systems users would pick instead.

    python benchmarks/run.py [--quick] [--systems a,b] [--reps N] [--out results.json]

Systems (each only when present): overlaypc-kernel (default cache=kernel), overlaypc-shared
(cache=shared), kernel-overlay (mount -t overlay), fuse-overlayfs, unionfs-fuse. Same lower data
for all; systems interleaved per repetition (the starting system rotates); every repetition
mounts each system afresh with an empty upper. Prints a markdown table, workload x system,
"median (min-max) ratio", the ratio being the system's median over fuse-overlayfs's.

Workloads: sequential read of a 1 GiB lower file cold (after drop_caches) and warm (MB/s);
4 KiB random reads with fio, warm (IOPS); find+stat over 10k files in 100 dirs, cold and warm;
create+write+close of 5k files, then unlink of them (ops/s); copy-up of a 1 GiB lower file by
open(O_RDWR) on XFS with reflink and on ext4 (loop images, ms); untar of a ~20 MB source tree
into the mount, grep -r over it and rm -rf of it (s); grep -r over the lower tree after
dropping caches (s); chmod -R of the lower tree (copy-up
of every file, s); mount until a stat of the mount point answers (ms; overlaypc's also
minus the interpreter's own start, with the mountinfo / INIT / first-reply times in the
JSON); ``cache=shared`` 4 KiB random reads of a lower file in a writable mount by one and
two fio jobs (group ``shared``). ``--quick`` shrinks the sizes (see QUICK below);
``--only small`` runs the per-mount workloads without the sequential and fio reads.
Needs root (mounts, drop_caches, loop devices). ``OVERLAYPC_BENCH_BASE=DIR`` adds the system
``overlaypc-base``: the overlaypc package in DIR, for before/after ratios within one run.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ALL_SYSTEMS, GiB, MiB, Metric, Watchdog, Workspace, _pc_env, cpu_ticks,  # noqa: E402
                    drop_caches, drops, fs_dev, loadavg, log, loop_fs, machine_info, make_system,
                    markdown_table, python_start, read_file, resident, rotated, run, select_systems,
                    timer, write_file, write_json)

#: what ``cli.mount_main`` imports to mount (its import time is part of the mount's)
MOUNT_IMPORTS = ("import overlaypc.cli, overlaypc.core, overlaypc.engine.channel, "
                 "overlaypc.engine.daemon, overlaypc.mounting, overlaypc.overlay_ops")

FULL = dict(seq_size=1 * GiB, fio_runtime=10, tree_dirs=100, tree_files=10_000, create_files=5_000,
            copyup_size=1 * GiB, tar_bytes=20 * MiB, reps=3)
#: the share of the lower file that must be in the page cache before and after a
#: cache=shared measurement, and at most 1 - this read from disk by the daemon during it
#: (reclaim here takes a few MiB of a warm 1 GiB file in 10 s)
SHARED_RESIDENT = 0.99
#: the most of the machine's CPU time that anything but fio and the daemon may take during a
#: cache=shared measurement: the goal is the daemon's rate on a quiet machine, and one busy
#: process (another session's tests) halves two readers' rate (the load balancer then puts
#: both workers on the other CPU: benchmarks/RESULTS.md, "cache=shared, two readers: what
#: decides the rate")
SHARED_OTHER_CPU = 0.1
#: fio's IOPS are logged per this many milliseconds in a cache=shared measurement
RATE_WINDOW_MS = 500
QUICK = dict(seq_size=256 * MiB, fio_runtime=2, tree_dirs=20, tree_files=2_000, create_files=1_000,
             copyup_size=256 * MiB, tar_bytes=5 * MiB, reps=3)


# -- data -----------------------------------------------------------------------------------------

def make_tree(root: str, dirs: int, files: int) -> int:
    """``files`` small files spread over ``dirs`` directories; returns the number of entries."""
    per = files // dirs
    for d in range(dirs):
        dp = os.path.join(root, f"d{d:03d}")
        os.makedirs(dp, exist_ok=True)
        for i in range(per):
            with open(os.path.join(dp, f"f{i:05d}"), "wb") as f:
                f.write(b"x" * (64 + i % 512))
    return dirs + dirs * per + 1


def make_tarball(path: str, target: int) -> tuple[int, int]:
    """A tar of source files (Python stdlib, then dist-packages, then C headers), about
    ``target`` bytes of file data; returns (bytes, files)."""
    stdlib = sorted(d for d in (f"/usr/lib/python3.{v}" for v in range(30, 5, -1)) if os.path.isdir(d))
    bases = (stdlib[-1:] or [os.path.dirname(os.__file__)]) + ["/usr/lib/python3/dist-packages", "/usr/include"]
    total = count = 0
    with tarfile.open(path, "w") as tar:
        for base in bases:
            if not os.path.isdir(base):
                continue
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames.sort()
                for skip in ("site-packages", "__pycache__"):
                    if skip in dirnames:
                        dirnames.remove(skip)
                for name in sorted(filenames):
                    if not name.endswith((".py", ".txt", ".cfg", ".toml", ".c", ".h")):
                        continue
                    p = os.path.join(dirpath, name)
                    if not os.path.isfile(p) or os.path.islink(p):
                        continue
                    tar.add(p, arcname=os.path.relpath(p, "/"), recursive=False)
                    total += os.path.getsize(p)
                    count += 1
                    if total >= target:
                        return total, count
    return total, count


# -- workloads ------------------------------------------------------------------------------------

def find_stat(root: str) -> int:
    """find + stat of every entry below ``root`` (GNU find, -printf needs the stat); entry count."""
    r = run(["find", root, "-printf", "%s %m %i\n"], timeout=600)
    return r.stdout.count("\n")


def fio_randread(path: str, size: int, runtime: int, jobs: int = 1,
                 rates: list[int] | None = None) -> float:
    """4 KiB random reads (psync) by ``jobs`` processes on one file; total IOPS. With
    ``rates``, the total IOPS of each ``RATE_WINDOW_MS`` window are appended to it."""
    cmd = ["fio", "--name=randread", "--rw=randread", "--bs=4k", f"--size={size}",
           f"--runtime={runtime}", "--time_based", "--ioengine=psync", f"--filename={path}",
           "--readonly", "--invalidate=0", f"--numjobs={jobs}", "--group_reporting",
           "--output-format=json"]
    with tempfile.TemporaryDirectory(prefix="fio-log-") as logs:
        if rates is not None:
            cmd += [f"--write_iops_log={os.path.join(logs, 'r')}", f"--log_avg_msec={RATE_WINDOW_MS}"]
        r = run(cmd, timeout=runtime + 120)
        if rates is not None:
            rates.extend(window_rates([os.path.join(logs, n) for n in sorted(os.listdir(logs))]))
    data = json.loads(r.stdout[r.stdout.index("{"):])
    return float(data["jobs"][0]["read"]["iops"])


def window_rates(logs: list[str]) -> list[int]:
    """The IOPS of all jobs together per ``RATE_WINDOW_MS`` window, from fio's IOPS logs (one
    per job: "msec, IOPS, direction, ..." per line, the window's end first); a window not
    every job logged is left out."""
    per: dict[int, list[int]] = {}
    for path in logs:
        with open(path) as f:
            for line in f:
                parts = line.split(",")
                if len(parts) >= 2 and parts[0].strip().isdigit():
                    w = round(int(parts[0]) / RATE_WINDOW_MS)  # (stamps drift: 499, 1000, 1501)
                    per.setdefault(w, []).append(int(parts[1]))
    return [sum(v) for _, v in sorted(per.items()) if len(v) == len(logs)]


def shared_disturbed(run_: dict) -> str | None:
    """Why a cache=shared run measured more than the daemon on a warm file and a quiet
    machine (None: it did not)."""
    low = min(run_["resident_before"], run_["resident_after"])
    if low < SHARED_RESIDENT:
        return f"lower file {low:.1%} resident around fio"
    if run_["daemon_disk_read"] > 1 - SHARED_RESIDENT:
        return (f"the daemon read {run_['daemon_disk_read']:.1%} of the lower file from disk "
                f"during fio (evicted meanwhile)")
    if run_.get("other_cpu", 0.0) > SHARED_OTHER_CPU:
        return (f"other work took {run_['other_cpu']:.0%} of the CPUs during fio "
                f"(the machine was not quiet)")
    return None


def shared_reads(ws: Workspace, lower: str, cfg: dict, M: dict[str, Metric], python: str,
                 extra: dict) -> None:
    """cache=shared in a writable mount: 4 KiB random reads of a lower file (each one a
    READ round trip through the daemon) by one reader, then by two.

    The goal is the daemon's rate on a lower file in the page cache, so each measurement
    reads the file whole first, inside the guarded step (a drop between that read and fio
    is seen), and is redone when the file was not wholly resident before and after fio:
    other work here drops caches every few seconds at times, and reclaim evicts pages
    without a drop; or when the daemon read more than 1 % of the file from disk during
    fio (evicted and read again in between); or when other work took more than
    ``SHARED_OTHER_CPU`` of the CPUs meanwhile (redone up to twice, as after a page-cache
    drop, then kept and marked disturbed). Per fio run (redone ones too),
    ``extra["shared_runs"]`` keeps the residency, the share of the file the daemon read
    from disk, the daemon's threads afterwards (the main thread, the notifier, the pool's
    watch and one worker per CPU: more means the pool grew because reads blocked), the
    load, the shares of the machine's CPU time that the daemon, fio, other tasks and the
    hypervisor (steal) took during fio, and the rate per ``RATE_WINDOW_MS`` window: two
    readers' rate switches between ~70k and ~150k/s as the scheduler places the workers
    (RESULTS.md, "cache=shared, two readers: what decides the rate"), and the windows show
    which states a run's figure averages."""
    system = make_system("overlaypc-shared", python)
    big_lower = os.path.join(lower, "big")
    size = os.path.getsize(big_lower)
    runs = extra.setdefault("shared_runs", [])
    for rep in range(cfg["reps"]):
        base = ws.sub("shared", str(rep))
        upper, work, mnt = (os.path.join(base, x) for x in ("upper", "work", "mnt"))
        try:
            with system.mount(lower, upper, work, mnt) as m:
                big = os.path.join(mnt, "big")
                for jobs, key in ((1, "shared_1"), (2, "shared_2")):
                    run_ = {}

                    def measure(jobs=jobs, run_=run_):
                        read_file(big_lower)                       # the lower file in the page cache
                        run_.clear()
                        run_.update(rep=rep, jobs=jobs, resident_before=round(resident(big_lower) / size, 4))
                        io0 = m.disk_read_bytes() or 0
                        rates: list[int] = []
                        cpu0, daemon0, fio0 = cpu_ticks(), m.cpu_ticks() or 0, _children_ticks()
                        iops = fio_randread(big, cfg["seq_size"], cfg["fio_runtime"], jobs, rates)
                        cpu1, daemon1, fio1 = cpu_ticks(), m.cpu_ticks() or 0, _children_ticks()
                        total = max(1, cpu1[2] - cpu0[2])
                        daemon, fio = daemon1 - daemon0, fio1 - fio0
                        run_.update(iops=round(iops), resident_after=round(resident(big_lower) / size, 4),
                                    daemon_disk_read=round(((m.disk_read_bytes() or 0) - io0) / size, 4),
                                    daemon_threads=m.threads(), load=float(loadavg()[0]),
                                    daemon_cpu=round(daemon / total, 3), fio_cpu=round(fio / total, 3),
                                    other_cpu=round(max(0, cpu1[0] - cpu0[0] - daemon - fio) / total, 3),
                                    steal=round((cpu1[1] - cpu0[1]) / total, 3), rates=rates)
                        runs.append(dict(run_))
                        return iops

                    step(M[key], system.name, m, cfg["fio_runtime"] + 180, measure,
                         cold=lambda run_=run_: shared_disturbed(run_))
        except Exception as e:  # noqa: BLE001
            log(f"shared reads rep {rep}: {e}")
            M["shared_1"].error(system.name, str(e))
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _children_ticks() -> int:
    """CPU time (clock ticks) of this process's children that have been waited for: fio and
    its job processes, once fio has exited."""
    t = os.times()
    return round((t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


def create_files(d: str, n: int) -> float:
    os.makedirs(d, exist_ok=True)
    payload = b"y" * 1024
    with timer() as t:
        for i in range(n):
            fd = os.open(os.path.join(d, f"n{i:05d}"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)
    return n / t[0]


def unlink_files(d: str, n: int) -> tuple[float, str | None]:
    """Unlink the files ``create_files`` made; a failed unlink is counted, not fatal, so the
    rate is still measured (the failure is reported next to it)."""
    failed: dict[int, int] = {}
    first = None
    with timer() as t:
        for i in range(n):
            try:
                os.unlink(os.path.join(d, f"n{i:05d}"))
            except OSError as e:
                failed[e.errno] = failed.get(e.errno, 0) + 1
                first = first or f"unlink n{i:05d}: {e.strerror}"
    left = len(os.listdir(d))
    err = None
    if failed or left:
        err = (f"{sum(failed.values())}/{n} unlink calls failed "
               f"({', '.join(f'{errno.errorcode.get(k, k)} x{v}' for k, v in failed.items())}; first: {first}); "
               f"{left} names left in the dir afterwards")
    return n / t[0], err


def step(metric: Metric, system: str, mount, seconds: float, fn, own_drops: int = 0, redo: bool = True,
         cold=None):
    """Run one measurement under a watchdog; record its value or its error.

    Other work on this shared machine drops the page cache now and then (seen in /proc/vmstat):
    a measurement during which that happened (beyond ``own_drops``, the drops ``fn`` does itself),
    or after which ``cold()`` (if given) says that data it needed warm was not all in the page
    cache (reclaim evicts pages too, without a drop), is redone up to twice when ``redo`` (the
    step is repeatable), else kept and marked."""
    try:
        for attempt in range(3 if redo else 1):
            d0 = drops()
            with Watchdog(mount, seconds) as wd:
                value = fn()
            if wd.fired:
                raise TimeoutError(f"hung > {seconds} s; daemon killed")
            dropped = drops() - d0 > own_drops
            why = cold() if cold is not None and not dropped else None
            disturbed = dropped or bool(why)
            if not disturbed:
                break
            log(f"{system} {metric.key}: " + (why or "page cache dropped by someone else meanwhile")
                + ("; redoing" if redo and attempt < 2 else "; keeping the value, marked"))
        if disturbed:
            metric.disturbed[system] = metric.disturbed.get(system, 0) + 1
        metric.add(system, value)
        return value
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and carries on
        msg = f"{type(e).__name__}: {e}"
        if isinstance(e, subprocess.CalledProcessError):
            msg += f" stderr={e.stderr.strip()[-300:]!r}"
        log(f"{system} {metric.key}: {msg}")
        metric.error(system, msg)
        if daemon_died(mount):
            raise
        return None


def daemon_died(mount) -> bool:
    return mount.proc is not None and mount.proc.poll() is not None


def main_workloads(system, rep: int, ws: Workspace, lower: str, data: dict, cfg: dict,
                   M: dict[str, Metric], extra: dict) -> None:
    name = system.name
    base = ws.sub("runs", f"{rep}-{name}")
    upper, work, mnt = (os.path.join(base, x) for x in ("upper", "work", "mnt"))
    # the goal compares overlaypc minus Python's own start with the others as they are
    own = data["python_pass"] if system.kind == "overlaypc" else 0.0
    try:
        with system.mount(lower, upper, work, mnt) as m:
            # cold: the previous system's workloads dropped the page cache, so the mount
            # program (for overlaypc: the interpreter and every module) is read from disk
            M["mount"].add(name, m.timings["visible"] * 1e3)
            M["mount_net"].add(name, (m.timings["visible"] - own) * 1e3)
            extra.setdefault("mount_timings", {}).setdefault(name, []).append(dict(m.timings))
        # warm: the same mount again, its files now in the page cache (as a host that mounts
        # often, e.g. a container engine, sees it)
        with system.mount(lower, upper, work, mnt) as m:
            M["mount_warm"].add(name, m.timings["visible"] * 1e3)
            M["mount_warm_net"].add(name, (m.timings["visible"] - own) * 1e3)
            tree, big = os.path.join(mnt, "tree"), os.path.join(mnt, "big")

            def find_cold():
                drop_caches()
                with timer() as t:
                    n = find_stat(tree)
                if n != data["tree_entries"]:
                    raise RuntimeError(f"find saw {n} entries, expected {data['tree_entries']}")
                return n / t[0]

            def find_warm():
                find_stat(tree)                            # warm (again, if redone)
                with timer() as t:
                    n = find_stat(tree)
                return n / t[0]

            def seq_cold():
                drop_caches()
                with timer() as t:
                    n = read_file(big)
                if n != cfg["seq_size"]:
                    raise RuntimeError(f"read {n} bytes, expected {cfg['seq_size']}")
                return n / t[0] / 1e6

            def seq_warm():
                read_file(big)                             # warm (again, if redone)
                with timer() as t:
                    n = read_file(big)
                return n / t[0] / 1e6

            def fio_warm():
                read_file(big)                             # warm (again, if redone)
                return fio_randread(big, cfg["seq_size"], cfg["fio_runtime"])

            def grep_lower():
                drop_caches()
                with timer() as t:
                    r = run(["grep", "-r", "-c", "x", tree], check=False, timeout=600)
                if r.returncode > 1 or r.stdout.count("\n") != data["tree_entries"] - cfg["tree_dirs"] - 1:
                    raise RuntimeError(f"grep over the lower tree failed: {r.stderr.strip()[-300:]}")
                return t[0]

            step(M["find_cold"], name, m, 300, find_cold, own_drops=1)
            step(M["find_warm"], name, m, 300, find_warm)
            step(M["grep_lower"], name, m, 300, grep_lower, own_drops=1)
            # The FUSE bdi's readahead as the sequential reads see it (overlaypc raises it
            # from a thread shortly after mounting; files take it at open).
            dev = fs_dev(mnt)
            ra = None
            if dev and os.path.exists(f"/sys/class/bdi/{dev}/read_ahead_kb"):
                with open(f"/sys/class/bdi/{dev}/read_ahead_kb") as f:
                    ra = int(f.read())
            extra.setdefault("read_ahead_kb", {}).setdefault(name, []).append(ra)
            if not data["small_only"]:
                step(M["seq_cold"], name, m, 300, seq_cold, own_drops=1)
                step(M["seq_warm"], name, m, 300, seq_warm)
                step(M["fio_warm"], name, m, cfg["fio_runtime"] + 120, fio_warm)
            newdir = os.path.join(mnt, "new")
            if step(M["create"], name, m, 600, lambda: create_files(newdir, cfg["create_files"]),
                    redo=False) is not None:
                res = step(M["unlink_raw"], name, m, 600, lambda: unlink_files(newdir, cfg["create_files"]),
                           redo=False)
                if res is not None:
                    M["unlink"].add(name, res[0])
                    if res[1]:
                        log(f"{name} unlink: {res[1]}")
                        M["unlink"].error(name, res[1])

            src = os.path.join(mnt, "src")

            def untar():
                os.makedirs(src)
                with timer() as t:
                    run(["tar", "-xf", data["tarball"], "-C", src], timeout=600)
                return t[0]

            def grep():
                with timer() as t:
                    r = run(["grep", "-r", "-c", "import", src], check=False, timeout=600)
                if r.returncode > 1:
                    raise RuntimeError(f"grep failed: {r.stderr.strip()[-300:]}")
                return t[0]

            def rm_rf():
                with timer() as t:
                    run(["rm", "-rf", src], timeout=600)
                if os.path.exists(src):
                    raise RuntimeError("rm -rf left the tree behind")
                return t[0]

            def chmod_r():
                # every file of the lower tree is copied up (metadata and data)
                with timer() as t:
                    run(["chmod", "-R", "g+w", tree], timeout=600)
                return t[0]

            if step(M["untar"], name, m, 600, untar, redo=False) is not None:
                if step(M["grep"], name, m, 600, grep, redo=False) is not None:
                    step(M["rm_rf"], name, m, 600, rm_rf, redo=False)
            step(M["chmod_r"], name, m, 600, chmod_r, redo=False)
            st = m.stats()
            if st is not None:
                extra.setdefault("overlaypc_stats", {}).setdefault(name, []).append(st)
                if st.get("errors"):
                    log(f"{name}: daemon counted {st['errors']} errors (EIO); see {m.logfile}")
    except Exception as e:  # noqa: BLE001
        log(f"{name} rep {rep}: mount/run failed: {e}")
        M["mount"].error(name, str(e))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def copyup_bench(ws: Workspace, systems, fstype: str, size: int, reps: int, metric: Metric) -> dict:
    """Copy-up of a ``size``-byte lower file by open(O_RDWR), on a fresh loop ``fstype``.
    The lower file is in the page cache (read once before each open), so the figure is the
    copy-up's own cost plus its fsync to the (direct-io) loop device, not the disk's read speed.
    Returns per-system copy-up methods reported by overlaypc's stats."""
    methods: dict[str, list] = {}
    img_size = max(4 * GiB, 3 * size + GiB)
    with loop_fs(ws, f"cu-{fstype}", fstype, img_size) as root:
        lower = os.path.join(root, "lower")
        os.makedirs(lower)
        write_file(os.path.join(lower, "big"), size)
        for rep in range(reps):
            for system in rotated(systems, rep):
                name = system.name
                upper, work = os.path.join(root, f"u-{rep}-{name}"), os.path.join(root, f"w-{rep}-{name}")
                mnt = os.path.join(ws.sub("cu-mnt"), f"{fstype}-{rep}-{name}")
                try:
                    read_file(os.path.join(lower, "big"))          # lower warm for every system
                    with system.mount(lower, upper, work, mnt) as m:
                        path = os.path.join(mnt, "big")
                        os.stat(path)                               # lookup outside the timing

                        def once():
                            with timer() as t:
                                fd = os.open(path, os.O_RDWR)
                            os.close(fd)
                            return t[0] * 1e3

                        step(metric, name, m, 600, once, redo=False)
                        st = m.stats()
                        if st is not None:
                            methods.setdefault(name, []).append(st.get("copy_ups"))
                    copied = os.path.join(upper, "big")
                    if not os.path.exists(copied) or os.path.getsize(copied) != size:
                        msg = "no complete copy in upper after open(O_RDWR)"
                        log(f"{name} copy-up {fstype}: {msg}")
                        metric.error(name, msg)
                except Exception as e:  # noqa: BLE001
                    log(f"{name} copy-up {fstype} rep {rep}: {e}")
                    metric.error(name, str(e))
                finally:
                    for d in (upper, work):
                        run(["rm", "-rf", "--one-file-system", d], check=False, timeout=300)
    for name, lst in methods.items():
        kinds = sorted({k for d in lst if isinstance(d, dict) for k in d})
        metric.notes[name] = "+".join(kinds) if kinds else "method?"
    return methods


def new_metrics(cfg: dict) -> dict[str, Metric]:
    sz = f"{cfg['seq_size'] // MiB} MiB"
    cu = f"{cfg['copyup_size'] // MiB} MiB"
    n, nd, nc = cfg["tree_files"], cfg["tree_dirs"], cfg["create_files"]
    return {m.key: m for m in [
        Metric("seq_cold", f"seq read {sz}, cold", "MB/s"),
        Metric("seq_warm", f"seq read {sz}, warm", "MB/s"),
        Metric("fio_warm", "4k rand read, warm (fio psync)", "IOPS"),
        Metric("find_cold", f"find+stat {n} files/{nd} dirs, cold", "entries/s"),
        Metric("find_warm", f"find+stat {n} files/{nd} dirs, warm", "entries/s"),
        Metric("create", f"create+write 1K+close x{nc}", "ops/s"),
        Metric("unlink", f"unlink x{nc}", "ops/s"),
        Metric("unlink_raw", "(internal) unlink rate and error", ""),
        Metric("copyup_xfs", f"copy-up {cu}, XFS reflink", "ms", higher_is_better=False),
        Metric("copyup_ext4", f"copy-up {cu}, ext4", "ms", higher_is_better=False),
        Metric("untar", "untar source tree", "s", higher_is_better=False),
        Metric("grep", "grep -r over it (upper files)", "s", higher_is_better=False),
        Metric("grep_lower", f"grep -r over the lower tree ({n} files), cold", "s", higher_is_better=False),
        Metric("rm_rf", "rm -rf of it", "s", higher_is_better=False),
        Metric("chmod_r", f"chmod -R of the lower tree ({n} files, copy-up)", "s", higher_is_better=False),
        Metric("mount", "mount until visible", "ms", higher_is_better=False),
        Metric("mount_net", "mount until visible, overlaypc minus `python3 -I -c pass`", "ms",
               higher_is_better=False),
        Metric("mount_warm", "mount until visible, warm page cache", "ms", higher_is_better=False),
        Metric("mount_warm_net", "mount until visible, warm, overlaypc minus `python3 -I -c pass`",
               "ms", higher_is_better=False),
        Metric("shared_1", "cache=shared 4k rand read of a lower file, writable, 1 reader", "reads/s"),
        Metric("shared_2", "cache=shared 4k rand read of a lower file, writable, 2 readers", "reads/s"),
    ]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes; about 2 minutes")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated subset of "
                   + ",".join(ALL_SYSTEMS))
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    p.add_argument("--out", default="results.json", help="JSON output file")
    p.add_argument("--only", default="", help="comma-separated workload groups: main (all "
                   "per-mount workloads), small (main without the sequential and fio reads), "
                   "shared (cache=shared random reads), copyup")
    p.add_argument("--python", default=sys.executable, help="Python that runs overlaypc")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root (mounts, drop_caches, loop devices)")
    cfg = dict(QUICK if args.quick else FULL)
    if args.reps:
        cfg["reps"] = args.reps
    groups = set(filter(None, args.only.split(","))) or {"main", "shared", "copyup"}
    systems, skipped = select_systems([s.strip() for s in args.systems.split(",") if s.strip()], args.python)
    names = [s.name for s in systems]
    M = new_metrics(cfg)
    extra: dict = {}
    t_start = time.perf_counter()
    machine = machine_info()            # overlaypc commit and load at the start
    ws = Workspace(keep=args.keep)
    log(f"workspace {ws.path}; systems {names}; config {cfg}")
    # the interpreter's own start, subtracted from overlaypc's mount time (mount_net), and
    # the imports a mount needs (as the daemon runs: site, PYTHONPATH)
    for tree in sorted({s.tree for s in systems if s.kind == "overlaypc"} | {_pc_env()["PYTHONPATH"].split(os.pathsep)[0]}):
        run([args.python, "-c", MOUNT_IMPORTS], env=_pc_env(tree))  # bytecode compiled once, as installed
    py_pass = python_start(args.python)
    py_site = python_start(args.python, args=("-c", "pass"), env=_pc_env())
    py_import = python_start(args.python, args=("-c", MOUNT_IMPORTS), env=_pc_env())
    extra["python_start_ms"] = {"-I -c pass": py_pass * 1e3, "-c pass (site, PYTHONPATH)": py_site * 1e3,
                                "mount imports": (py_import - py_site) * 1e3}
    log(f"python start: {extra['python_start_ms']}")
    try:
        lower = ws.sub("lower")
        if groups & {"main", "shared"}:
            write_file(os.path.join(lower, "big"), cfg["seq_size"])
        if groups & {"main", "small"}:
            entries = make_tree(os.path.join(lower, "tree"), cfg["tree_dirs"], cfg["tree_files"])
            tarball = os.path.join(ws.path, "src.tar")
            tar_bytes, tar_files = make_tarball(tarball, cfg["tar_bytes"])
            data = {"tree_entries": entries, "tarball": tarball, "python_pass": py_pass,
                    "small_only": "main" not in groups}
            extra["tarball"] = {"bytes": tar_bytes, "files": tar_files}
            log(f"data ready: {entries} tree entries, tarball {tar_files} files {tar_bytes / MiB:.1f} MiB")
            for rep in range(cfg["reps"]):
                for system in rotated(systems, rep):
                    t0 = time.perf_counter()
                    main_workloads(system, rep, ws, lower, data, cfg, M, extra)
                    log(f"rep {rep + 1}/{cfg['reps']} {system.name}: {time.perf_counter() - t0:.1f} s")
        if "shared" in groups:
            t0 = time.perf_counter()
            shared_reads(ws, lower, cfg, M, args.python, extra)
            log(f"shared reads: {time.perf_counter() - t0:.1f} s")
        if "copyup" in groups:
            for fstype in ("xfs", "ext4"):
                t0 = time.perf_counter()
                extra.setdefault("copyup_methods", {})[fstype] = copyup_bench(
                    ws, systems, fstype, cfg["copyup_size"], cfg["reps"], M[f"copyup_{fstype}"])
                log(f"copy-up on {fstype}: {time.perf_counter() - t0:.1f} s")
    finally:
        ws.cleanup()
    elapsed = time.perf_counter() - t_start
    raw = M.pop("unlink_raw")
    for sysname, errs in raw.errors.items():
        M["unlink"].errors.setdefault(sysname, []).extend(errs)
    M["unlink"].disturbed.update(raw.disturbed)
    used = [m for m in M.values() if m.values or m.errors]
    shown = names + sorted({s for m in used for s in m.values} - set(names))
    table = markdown_table(used, shown)
    print(f"\n{'QUICK run (--quick): reduced sizes' if args.quick else 'Full run'}; "
          f"{cfg['reps']} reps; median (min–max) **ratio to fuse-overlayfs** (ratio of medians; "
          f">1 is better for rates, worse for times); took {elapsed:.0f} s\n")
    print(table)
    errs = {m.key: m.errors for m in M.values() if m.errors}
    if errs:
        print("\nErrors:")
        for k, e in errs.items():
            for s, lst in e.items():
                print(f"- {k} / {s}: {lst[0]}" + (f" (x{len(lst)})" if len(lst) > 1 else ""))
    write_json(args.out, {"suite": "run.py", "quick": args.quick, "config": cfg,
                          "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                          "machine": dict(machine, loadavg_at_end=loadavg()),
                          "systems": names, "skipped": skipped,
                          "elapsed_s": round(elapsed, 1), "metrics": {k: m.to_json() for k, m in M.items()},
                          "extra": extra, "table_markdown": table})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
