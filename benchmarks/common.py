"""Shared helpers for the overlaypc benchmarks (not part of the test suite).

Systems under test, mount/unmount context managers, loop-device filesystems, cache dropping,
timing, summary statistics, markdown tables and JSON output.

Rules kept here so that every script follows them:
- everything lives under one private temporary directory (``Workspace``);
- every mount is undone in a ``finally`` block, and only mounts and processes we made are
  touched (by mount path and PID, never by name);
- loop devices are attached with ``--direct-io=on`` (docs/ARCHITECTURE.md section 7: otherwise the image
  file's pages are cached on the host filesystem as well) and detached by their own name;
- a FUSE daemon that stops answering is killed by PID after a timeout (``Watchdog``), so a hang
  turns into an error in the results instead of a stuck benchmark.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import mmap
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
GiB = 1 << 30
REFERENCE = "fuse-overlayfs"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes and mounts -------------------------------------------------------------------------

def run(cmd: list[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, timeout=timeout, check=check, stdout=kw.pop("stdout", subprocess.PIPE),
                          stderr=kw.pop("stderr", subprocess.PIPE), text=kw.pop("text", True), **kw)


def _unescape_mountinfo(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return {_unescape_mountinfo(line.split()[4]) for line in f}


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mount_points()


def fs_dev(path: str) -> str | None:
    """major:minor of the filesystem mounted exactly at ``path`` (for /sys/class/bdi)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if _unescape_mountinfo(parts[4]) == real:
                return parts[2]
    return None


def unmount(path: str, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    """``umount PATH`` (retrying while busy, lazily as a last resort), then reap ``proc``."""
    try:
        if is_mounted(path):
            for attempt in range(10):
                r = run(["umount", path], check=False, timeout=timeout)
                if r.returncode == 0 or not is_mounted(path):
                    break
                time.sleep(0.3)
            else:
                log(f"umount {path} kept failing ({r.stderr.strip()}); lazy unmount")
                run(["umount", "-l", path], check=False, timeout=timeout)
    finally:
        if proc is not None:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"daemon PID {proc.pid} did not exit after umount; killing it")
                kill_proc(proc)


def kill_proc(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, one process by its PID (one we started)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Mount:
    """A live mount: its path, the system that made it and (for FUSE) the daemon process."""
    system: "System"
    path: str
    proc: subprocess.Popen | None = None
    logfile: str | None = None
    #: seconds from starting the mount: "mounted" (the mount point's st_dev changed: a
    #: FUSE mount answers that stat only after INIT), "init" (overlaypc's "mounted" log
    #: line: written once the first request is answered, so after INIT; ms resolution),
    #: "visible" (another stat answered)
    timings: dict = field(default_factory=dict)

    def threads(self) -> int | None:
        """How many threads the daemon runs now (None without a daemon, or when it is gone)."""
        if self.proc is None:
            return None
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/task"))
        except OSError:
            return None

    def disk_read_bytes(self) -> int | None:
        """Bytes the daemon has had read from storage so far (``read_bytes`` of /proc/PID/io,
        all its threads; page-cache hits do not count); None without a daemon."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/io") as f:
                for line in f:
                    if line.startswith("read_bytes:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def cpu_ticks(self) -> int | None:
        """CPU time the daemon has used so far, all its threads (clock ticks); None without a
        daemon, or when it is gone."""
        if self.proc is None:
            return None
        return proc_cpu_ticks(self.proc.pid)

    def stats(self) -> dict | None:
        """overlaypc's counters (the virtual xattr on the mount root), else None."""
        if not self.system.name.startswith("overlaypc"):
            return None
        try:
            return json.loads(os.getxattr(self.path, "user.overlaypc.stats"))
        except OSError as e:
            return {"error": str(e)}

    def kill_daemon(self) -> None:
        """For the watchdog: a hung daemon is killed; its requests then fail with ENOTCONN."""
        if self.proc is not None:
            log(f"watchdog: killing {self.system.name} daemon PID {self.proc.pid} ({self.path})")
            kill_proc(self.proc)

    def log_tail(self, n: int = 20) -> str:
        if not self.logfile or not os.path.exists(self.logfile):
            return ""
        with open(self.logfile, errors="replace") as f:
            return "".join(f.readlines()[-n:])


@dataclass
class System:
    """One union filesystem to measure; ``mount`` is a context manager yielding a ``Mount``."""
    name: str
    kind: str                      # overlaypc | kernel | fuse-overlayfs | unionfs-fuse
    option: str = ""               # overlaypc: extra -o options (e.g. cache=shared)
    python: str = sys.executable
    tree: str = REPO               # overlaypc: the checkout the daemon runs
    env: dict = field(default_factory=dict)  # overlaypc: more environment for the daemon

    def available(self) -> tuple[bool, str]:
        if self.kind == "overlaypc":
            r = run([self.python, "-c", "import overlaypc.cli, overlaypc.engine.session"], check=False,
                    env=_pc_env(self.tree))
            return (r.returncode == 0, r.stderr.strip()[-200:])
        if self.kind == "kernel":
            with open("/proc/filesystems") as f:
                if "overlay" in f.read():
                    return True, ""
            r = run(["modprobe", "overlay"], check=False)
            return (r.returncode == 0, "no overlay in /proc/filesystems")
        exe = {"fuse-overlayfs": "fuse-overlayfs", "unionfs-fuse": "unionfs-fuse"}[self.kind]
        return (shutil.which(exe) is not None, f"{exe} not installed")

    @contextlib.contextmanager
    def mount(self, lower: str, upper: str, work: str, mnt: str, timeout: float = 30) -> Iterator[Mount]:
        """Mount ``lower`` (a single dir or ``A:B`` top first) with ``upper``/``work`` at ``mnt``."""
        for d in (upper, work, mnt):
            os.makedirs(d, exist_ok=True)
        if is_mounted(mnt):
            raise RuntimeError(f"{mnt} is already a mount point")
        logfile = os.path.join(os.path.dirname(mnt), f".{os.path.basename(mnt)}.{self.name}.log")
        proc = None
        m = Mount(self, mnt, None, logfile)
        t0, wall0 = time.perf_counter(), time.time()
        try:
            if self.kind == "kernel":
                run(["mount", "-t", "overlay", "overlay", "-o",
                     f"lowerdir={lower},upperdir={upper},workdir={work}", mnt], timeout=timeout)
            else:
                if self.kind == "overlaypc":
                    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
                    if self.option:
                        opts += "," + self.option
                    cmd = [self.python, *_pc_command(self.tree), "-f", "-o", opts, mnt]
                    env = {**_pc_env(self.tree), **self.env}
                elif self.kind == "fuse-overlayfs":
                    cmd = ["fuse-overlayfs", "-f", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mnt]
                    env = None
                elif self.kind == "unionfs-fuse":
                    branches = f"{upper}=RW:" + ":".join(f"{d}=RO" for d in lower.split(":"))
                    cmd = ["unionfs-fuse", "-f", "-o", "cow,allow_other", branches, mnt]
                    env = None
                else:
                    raise ValueError(self.kind)
                # the mount point's device before the daemon starts: taken after, a daemon
                # that mounted meanwhile (fuse-overlayfs, on a loaded machine) was never seen
                below = os.stat(mnt).st_dev
                with open(logfile, "ab") as lf:
                    proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                m.proc = proc
                deadline = time.monotonic() + timeout
                # one stat per millisecond (parsing mountinfo this often took CPU from the
                # starting daemon on 2 vCPUs); the mount point's device changes at mount(2)
                while os.stat(mnt).st_dev == below:
                    if proc.poll() is not None:
                        raise RuntimeError(f"{self.name} exited with {proc.returncode} before mounting:\n"
                                           + m.log_tail())
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name} did not mount {mnt} within {timeout} s")
                    time.sleep(0.001)
            m.timings["mounted"] = time.perf_counter() - t0
            os.stat(mnt)  # blocks until the daemon has answered INIT and this GETATTR
            m.timings["visible"] = time.perf_counter() - t0
            if self.kind == "overlaypc":
                init = _logged_init(logfile)
                if init is not None:
                    m.timings["init"] = init - wall0
            yield m
        finally:
            unmount(mnt, proc)


def _logged_init(logfile: str) -> float | None:
    """Wall time of the last "mounted" line of an overlaypc log (written once INIT is
    answered), millisecond resolution; None if there is none."""
    try:
        with open(logfile, errors="replace") as f:
            lines = [ln for ln in f if " overlaypc.fuse: mounted " in ln]
    except OSError:
        return None
    if not lines:
        return None
    stamp = lines[-1][:23]  # logging's asctime: "YYYY-mm-dd HH:MM:SS,mmm"
    try:
        t = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
        return t + int(stamp[20:23]) / 1000
    except ValueError:
        return None


def python_start(python: str, reps: int = 7, args: tuple[str, ...] = ("-I", "-c", "pass"),
                 env: dict | None = None) -> float:
    """Median wall time (s) of ``python ARGS``."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([python, *args], check=True, env=env)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: where the daemons keep their bytecode: an installed package has its .pyc files, and a
#: mount that compiles every module from source (PYTHONDONTWRITEBYTECODE=1 here) spends
#: ~60 ms more starting; kept out of the checkout
PYCACHE = os.path.join(tempfile.gettempdir(), "overlaypc-bench-pycache")


def _pc_command(tree: str) -> list[str]:
    """How a tree's overlaypc is started: its ``bin/overlaypc``, the command podman and
    mount(8) run (installed, it is this script with the interpreter on its first line);
    ``-m overlaypc`` for a tree from before it existed (runpy costs ~4 ms more a start)."""
    script = os.path.join(tree, "bin", "overlaypc")
    return [script] if os.path.isfile(script) else ["-m", "overlaypc"]


def _pc_env(tree: str = REPO) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # `python -m overlaypc` (and -c) put the working directory first on sys.path: run from
    # a checkout, every tree would import that checkout's package instead of ``tree``'s
    env["PYTHONSAFEPATH"] = "1"
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    env.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    return env


ALL_SYSTEMS = ["overlaypc-kernel", "overlaypc-shared", "kernel-overlay", "fuse-overlayfs", "unionfs-fuse"]


def make_system(name: str, python: str = sys.executable) -> System:
    table = {
        "overlaypc-kernel": System("overlaypc-kernel", "overlaypc", "", python),
        "overlaypc-shared": System("overlaypc-shared", "overlaypc", "cache=shared", python),
        # Read-only mounts (the upper is then one more read-only layer): every file passes
        # through (FUSE passthrough, kernel >= 6.9), in either cache mode.
        "overlaypc-ro": System("overlaypc-ro", "overlaypc", "ro", python),
        "overlaypc-ro-shared": System("overlaypc-ro-shared", "overlaypc", "ro,cache=shared", python),
        # The daemon path everywhere, for comparison.
        "overlaypc-nopt": System("overlaypc-nopt", "overlaypc", "passthrough=off", python),
        # Not in the default set: copy-up without fsyncs, as fuse-overlayfs 1.10 does (strace:
        # its copy-up is one sendfile, no fsync), for a like-for-like copy-up comparison.
        "overlaypc-volatile": System("overlaypc-volatile", "overlaypc", "volatile", python),
        "kernel-overlay": System("kernel-overlay", "kernel"),
        "fuse-overlayfs": System("fuse-overlayfs", "fuse-overlayfs"),
        "unionfs-fuse": System("unionfs-fuse", "unionfs-fuse"),
    }
    base = os.environ.get("OVERLAYPC_BENCH_BASE")
    if base:  # another checkout (e.g. `git archive BASE overlaypc`), measured in the same run
        table["overlaypc-base"] = System("overlaypc-base", "overlaypc", "", python, os.path.abspath(base))
    if name not in table:
        raise SystemExit(f"unknown system {name!r}; choose from {', '.join(table)}")
    return table[name]


def select_systems(names: list[str], python: str = sys.executable) -> tuple[list[System], dict[str, str]]:
    """The named systems that are present here, and why the others were skipped."""
    found, skipped = [], {}
    for name in names:
        s = make_system(name, python)
        ok, why = s.available()
        if ok:
            found.append(s)
        else:
            skipped[name] = why
            log(f"skipping {name}: {why}")
    return found, skipped


def rotated(items: list, rep: int) -> list:
    """Interleave: repetition ``rep`` starts with a different system each time."""
    if not items:
        return items
    k = rep % len(items)
    return items[k:] + items[:k]


class Watchdog:
    """Kill a mount's daemon if the body takes longer than ``seconds`` (hang protection)."""

    def __init__(self, mount: Mount, seconds: float) -> None:
        self.mount, self.seconds, self.fired = mount, seconds, False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self.mount.kill_daemon()
        run(["umount", "-l", self.mount.path], check=False)

    def __enter__(self) -> "Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


# -- workspace, loop filesystems, caches ----------------------------------------------------------

class Workspace:
    """A private temporary directory, removed at the end unless ``keep``."""

    def __init__(self, prefix: str = "overlaypc-bench-", base: str | None = None, keep: bool = False):
        self.path = tempfile.mkdtemp(prefix=prefix, dir=base)
        self.keep = keep

    def sub(self, *parts: str) -> str:
        p = os.path.join(self.path, *parts)
        os.makedirs(p, exist_ok=True)
        return p

    def cleanup(self) -> None:
        # Never delete through a mount left behind: refuse if anything is still mounted below.
        below = [m for m in mount_points() if m == self.path or m.startswith(self.path + "/")]
        for m in sorted(below, key=len, reverse=True):
            log(f"cleanup: {m} still mounted; unmounting")
            run(["umount", "-l", m], check=False)
        if not self.keep:
            run(["rm", "-rf", "--one-file-system", self.path], check=False, timeout=600)


@contextlib.contextmanager
def loop_fs(ws: Workspace, name: str, fstype: str, size: int) -> Iterator[str]:
    """A fresh ``fstype`` ('xfs' with reflink, or 'ext4') on a sparse image attached with
    ``losetup --direct-io=on``; yields its mount point. Device detached afterwards."""
    img = os.path.join(ws.path, f"{name}.img")
    mnt = ws.sub(name)
    with open(img, "wb") as f:
        f.truncate(size)
    if fstype == "xfs":
        run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", img])
    elif fstype == "ext4":
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img])
    else:
        raise ValueError(fstype)
    dev = run(["losetup", "--direct-io=on", "--find", "--show", img]).stdout.strip()
    try:
        run(["mount", dev, mnt])
        try:
            yield mnt
        finally:
            unmount(mnt)
    finally:
        r = run(["losetup", "-d", dev], check=False)
        if r.returncode:
            log(f"losetup -d {dev}: {r.stderr.strip()}")
        with contextlib.suppress(OSError):
            os.unlink(img)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value
_LOW_BIT = bytes(b & 1 for b in range(256))  # mincore: bit 0 of each byte


def resident(path: str) -> int:
    """Bytes of ``path``'s own page cache that are resident (mmap + mincore, nothing faulted
    in). Through a FUSE mount this is the FUSE inode's cache; MAP_PRIVATE is the fallback where
    MAP_SHARED is refused (direct_io files give ENODEV)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = None
        for flags in (mmap.MAP_SHARED, mmap.MAP_PRIVATE):
            a = _libc.mmap(None, size, mmap.PROT_READ, flags, fd, 0)
            if a not in (None, MAP_FAILED):
                addr = a
                break
        if addr is None:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return bytes(vec).translate(_LOW_BIT).count(1) * mmap.PAGESIZE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drops() -> int:
    """How many times anyone on this machine has dropped the page cache (/proc/vmstat).
    Other work on a shared machine does so too, which turns a warm measurement cold."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("drop_pagecache "):
                return int(line.split()[1])
    return -1


def meminfo(field_name: str = "Cached") -> int:
    """A /proc/meminfo field in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k == field_name:
                return int(v.split()[0]) * 1024
    raise KeyError(field_name)


def write_file(path: str, size: int, chunk: int = 4 * MiB) -> None:
    """A file of ``size`` bytes of incompressible data, fsynced."""
    block = os.urandom(chunk)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, chunk)
            f.write(block[:n] if n < chunk else block)
            left -= n
        f.flush()
        os.fsync(f.fileno())


def read_file(path: str, bufsize: int = MiB) -> int:
    """Read a whole file with ``bufsize`` reads into one buffer; returns bytes read."""
    buf = bytearray(bufsize)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [buf])
            if n <= 0:
                break
            total += n
    finally:
        os.close(fd)
    return total


# -- timing and statistics ------------------------------------------------------------------------

@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the elapsed wall time in seconds."""
    out: list[float] = []
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - t0)


def summary(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt_num(v: float) -> str:
    a = abs(v)
    if a >= 1e5:
        return f"{v / 1e3:.0f}k"
    if a >= 1e4:
        return f"{v / 1e3:.1f}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


@dataclass
class Metric:
    """One row of a results table."""
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    values: dict[str, list[float]] = field(default_factory=dict)   # system -> per-rep values
    errors: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)             # system -> note (e.g. copy-up method)
    disturbed: dict[str, int] = field(default_factory=dict)         # system -> values kept although
                                                                    # someone else dropped caches meanwhile

    def add(self, system: str, value: float | None) -> None:
        self.values.setdefault(system, []).append(value)

    def error(self, system: str, msg: str) -> None:
        self.errors.setdefault(system, []).append(msg)

    def median(self, system: str) -> float | None:
        s = summary(self.values.get(system, []))
        return s["median"] if s else None

    def to_json(self) -> dict:
        return {"label": self.label, "unit": self.unit, "higher_is_better": self.higher_is_better,
                "values": self.values, "summary": {k: summary(v) for k, v in self.values.items()},
                "ratio_to_" + REFERENCE: {k: self.ratio(k) for k in self.values},
                "errors": self.errors, "notes": self.notes, "disturbed": self.disturbed}

    def ratio(self, system: str) -> float | None:
        """value / fuse-overlayfs's value (medians); >1 is better for rates, worse for times."""
        a, b = self.median(system), self.median(REFERENCE)
        if a is None or not b:
            return None
        return a / b

    def cell(self, system: str, with_ratio: bool = True) -> str:
        s = summary(self.values.get(system, []))
        err = self.errors.get(system)
        if s is None:
            return "error" if err else "–"
        text = f"{fmt_num(s['median'])} ({fmt_num(s['min'])}–{fmt_num(s['max'])})"
        r = self.ratio(system)
        if with_ratio and r is not None and system != REFERENCE:
            text += f" **{r:.2f}x**"
        if system in self.notes:
            text += f" [{self.notes[system]}]"
        if err:
            text += f" ({len(err)} err)"
        if self.disturbed.get(system):
            text += f" ({self.disturbed[system]} disturbed)"
        return text


def markdown_table(metrics: list[Metric], systems: list[str]) -> str:
    head = "| workload | unit | " + " | ".join(systems) + " |"
    sep = "|---|---|" + "---|" * len(systems)
    rows = [head, sep]
    for m in metrics:
        unit = m.unit + ("" if m.higher_is_better else ", lower is better")
        rows.append(f"| {m.label} | {unit} | " + " | ".join(m.cell(s) for s in systems) + " |")
    return "\n".join(rows)


def cpu_ticks() -> tuple[int, int, int]:
    """The machine's CPU time so far in clock ticks (/proc/stat, all CPUs): (run by tasks:
    user, nice and system; stolen by the hypervisor for other guests; all of it, idle too).
    Interrupt time is left out of the first: it is no task's, and a workload's wake-ups
    cause their own."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v + [0] * (8 - len(v))
    return user + nice + system, steal, sum(v)


def proc_cpu_ticks(pid: int) -> int | None:
    """User and system time of process ``pid``, all its threads (clock ticks); None when it
    is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return None
    fields = st[st.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def machine_info() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for exe, args in (("fuse-overlayfs", ["--version"]), ("unionfs-fuse", ["--version"]), ("fio", ["--version"])):
        if shutil.which(exe):
            r = run([exe] + args, check=False)
            lines = (r.stdout + r.stderr).splitlines()
            versions[exe] = next((ln.strip() for ln in lines if exe in ln and "version" in ln),
                                 lines[0].strip() if lines else "")
    commit = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    dirty = run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "overlaypc"],
                check=False).stdout.strip()
    return {"overlaypc_commit": commit + ("+uncommitted changes in overlaypc/" if dirty else ""),
            "nproc": os.cpu_count(), "mem_total_gib": round(meminfo("MemTotal") / GiB, 1),
            "kernel": platform.release(), "cpu": cpu, "python": sys.version.split()[0],
            "loadavg_at_start": loadavg(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": versions}


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
