"""Test infrastructure shared by the whole suite: capability gating, mounting, layer building.

What this module owns:
- ``require()``: skip a test when the machine lacks a capability, or fail it under CI
  (``OVERLAYPC_REQUIRE_MOUNT=1``), so a CI run can never pass by silently skipping everything.
- ``Mount``: one overlaypc daemon started by us, waited for, unmounted and checked
  (exit status, and its log for unexpected ``ERROR``/``Traceback`` lines).
- ``build_layer()`` and the spec types (``File``, ``Dir``, ``Symlink``, ``Whiteout``,
  ``OciWhiteout``, ``Fifo``, ``Device``, ``HardLink``): layer trees, including both whiteout
  formats, all opaque-dir forms and hard links.
- ``kernel_overlay()``: the kernel's overlayfs as an oracle, with pinned options; it waits
  while another mount namespace holds its upper or work dir (``overlay_holders()``).
- ``tree_snapshot()``: a comparable picture of a merged tree.
- ``run_overlaypc()``: one CLI invocation that is expected to fail, cleaned up if it mounts.

Caveats:
- Only processes we started are ever killed, by PID. A daemonized overlaypc is found by
  scanning ``/proc/*/cmdline`` for our (unique, test-private) mountpoint path.
- Everything here runs as root in practice; the gating reports why when it is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import threading
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 20.0
EXIT_TIMEOUT = 15.0
FSTYPE = "fuse.overlaypc"

#: Overlay-private xattr namespaces: never listed, read or set through the mount.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


# --------------------------------------------------------------------------------------
# Capability gating
# --------------------------------------------------------------------------------------

def _read(path: str) -> str:
    """The text of ``path``; "" if unreadable. Bytes that are not UTF-8 (a mount point
    elsewhere on the machine named so, in mountinfo) are kept as surrogates, as
    ``os.fsdecode`` keeps them."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return ""


def _has_filesystem(name: str) -> bool:
    for line in _read("/proc/filesystems").splitlines():
        if line.split() and line.split()[-1] == name:
            return True
    return False


#: Each capability: name -> (check, what is missing when it fails).
CAPABILITIES: dict[str, tuple[Callable[[], bool], str]] = {
    "root": (lambda: os.geteuid() == 0, "needs root"),
    "dev_fuse": (lambda: os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK),
                 "needs a usable /dev/fuse"),
    "fusermount3": (lambda: shutil.which("fusermount3") is not None, "needs fusermount3 (fuse3)"),
    "kernel_overlay": (lambda: _has_filesystem("overlay"),
                       "needs kernel overlayfs (overlay missing from /proc/filesystems)"),
    "xfs": (lambda: (shutil.which("mkfs.xfs") is not None and shutil.which("losetup") is not None
                     and os.path.exists("/dev/loop-control")),
            "needs mkfs.xfs, losetup and loop devices"),
    "mount_fuse3": (lambda: any(os.access(p, os.X_OK) for p in
                                ("/sbin/mount.fuse3", "/usr/sbin/mount.fuse3")),
                    "needs /sbin/mount.fuse3"),
    "overlaypc_on_path": (lambda: shutil.which("overlaypc") is not None,
                          "needs an `overlaypc` executable on PATH"),
}


def strict_mode() -> bool:
    """CI sets OVERLAYPC_REQUIRE_MOUNT=1: a missing capability is then a failure."""
    return os.environ.get("OVERLAYPC_REQUIRE_MOUNT", "") == "1"


def require(capability: Union[str, bool], reason: Optional[str] = None) -> None:
    """Skip (or, under CI, fail) unless `capability` is present.

    `capability` is a name from CAPABILITIES or an already evaluated bool.
    """
    if isinstance(capability, str):
        check, default_reason = CAPABILITIES[capability]
        present = bool(check())
        reason = reason or default_reason
    else:
        present = bool(capability)
        reason = reason or "capability missing"
    if present:
        return
    if strict_mode():
        pytest.fail(f"OVERLAYPC_REQUIRE_MOUNT=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_fuse_mount() -> None:
    """Everything a real overlaypc mount needs."""
    for cap in ("root", "dev_fuse", "fusermount3"):
        require(cap)


# --------------------------------------------------------------------------------------
# /proc/self/mountinfo
# --------------------------------------------------------------------------------------

def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    mount_options: str
    super_options: str


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Every mount point in ``mountinfo``, unescaped; bytes that are not UTF-8 kept as
    surrogates (``os.fsdecode``'s form), so another mount named so never makes it raise."""
    fields = (line.split() for line in _read(mountinfo).splitlines())
    return [_unescape_mountinfo(f[4]) for f in fields if len(f) > 4]


def mounts_at(path: Union[str, os.PathLike]) -> list[MountEntry]:
    """All mounts stacked on `path` (resolved), bottom first."""
    target = os.path.realpath(path)
    found = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 6 or len(rfields) < 3:
            continue
        mnt = _unescape_mountinfo(fields[4])
        if mnt == target:
            found.append(MountEntry(mnt, rfields[0], _unescape_mountinfo(rfields[1]),
                                    fields[5], rfields[2]))
    return found


def is_mounted(path: Union[str, os.PathLike], fstype: Optional[str] = None) -> bool:
    return any(fstype is None or m.fstype == fstype for m in mounts_at(path))


def force_unmount(path: Union[str, os.PathLike]) -> None:
    """Best-effort cleanup: umount, then lazy fusermount3/umount. Never raises."""
    for cmd in (["umount", str(path)], ["fusermount3", "-u", "-z", str(path)],
                ["umount", "-l", str(path)]):
        if not mounts_at(path):
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------

def pids_with_arg(arg: Union[str, os.PathLike]) -> list[int]:
    """PIDs whose argv contains `arg` as one whole argument (or as a ``-o`` value part).

    Used to find a daemonized overlaypc: its argv holds our test-private mountpoint path,
    which no process but ours can have.
    """
    needle = os.fsencode(str(arg))
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if needle in argv:
            pids.append(int(entry))
    return sorted(pids)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def file_extents(path: Union[str, os.PathLike], sync: bool = True) -> list:
    """The extents of ``path`` (``overlaypc.extents.Extent``, logical order) by the FIEMAP
    ioctl, in-process (``overlaypc.extents.fiemap``); ``sync`` flushes dirty data first,
    as ``xfs_io -c fiemap`` does. Not xfs_io: it stats every mount on the machine at
    start and hangs on any stuck FUSE mount (another test's daemon stopped or hung)."""
    from overlaypc.extents import fiemap
    fd = os.open(path, os.O_RDONLY)
    try:
        return fiemap(fd, sync=sync)
    finally:
        os.close(fd)


def cache_shrinks() -> int:
    """A machine-wide count that moves whenever the kernel shrank its dentry and inode
    caches: /proc/vmstat's ``drop_slab`` (``echo 2 > /proc/sys/vm/drop_caches``, by any
    test or process on the machine) plus ``slabs_scanned`` (any shrinker run: memory
    pressure, a drop). It does not move on a quiet machine."""
    counts = dict(line.split() for line in _read("/proc/vmstat").splitlines()
                  if line.startswith(("drop_slab ", "slabs_scanned ")))
    return sum(int(v) for v in counts.values())


T = TypeVar("T")


def undisturbed(measure: Callable[[], T], attempts: int = 10) -> T:
    """``measure()``'s result from a run during which the kernel shrank no cache
    (``cache_shrinks``), tried up to ``attempts`` times. For a count of what the kernel
    asks the daemon (LOOKUPs after a listing): a drop meanwhile makes it FORGET entries and
    look them up again, more requests from the same code. ``measure`` starts from a cold
    kernel cache each time (a fresh mount). Raises if every attempt was disturbed."""
    for _ in range(attempts):
        before = cache_shrinks()
        result = measure()
        if cache_shrinks() == before:
            return result
    raise AssertionError(f"the kernel shrank its caches during each of {attempts} attempts "
                         "(drop_caches or memory pressure elsewhere on the machine)")


def evict(path: Union[str, os.PathLike]) -> None:
    """Write ``path``'s dirty pages, then drop its page-cache pages (the next read goes to
    the disk: a cold read of that one file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_threads(target: Callable[[int], None], count: int, timeout: Optional[float] = None) -> None:
    """Run ``target(i)`` for i in range(count) on as many threads, all started before any
    is joined (each join waits at most ``timeout``)."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def thread_report(pid: int) -> str:
    """Where each thread of a hung process waits: its kernel stack, and its Python stack
    where py-spy is installed (diagnostics for a daemon that does not exit)."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        stack = _read(str(task / "stack")).strip().splitlines()
        lines.append(f"thread {task.name}: " + " <- ".join(l.split("] ")[-1] for l in stack[:6]))
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if os.path.exists(spy):
        r = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                           timeout=30)
        lines.append(r.stdout[-4000:])
    return "\n".join(lines)


def overlaypc_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Environment for a daemon: the package from this checkout comes first."""
    env = dict(os.environ)
    # OVERLAYPC_TEST_PYTHONPATH lets the suite run against another copy of the package.
    first = os.environ.get("OVERLAYPC_TEST_PYTHONPATH") or str(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(
        [first] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def overlaypc_cmd(*args: Union[str, os.PathLike]) -> list[str]:
    return [sys.executable, "-m", "overlaypc", *map(str, args)]


def unexpected_log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]


# --------------------------------------------------------------------------------------
# Mount
# --------------------------------------------------------------------------------------

class MountError(AssertionError):
    """A mount did not come up, or did not go down cleanly."""


class Mount:
    """One overlaypc mount that we started, and will always take down.

    Forms:
    - foreground (default): ``python -m overlaypc -f [-o OPTS] [--stack FILE] MNT``; we own the
      Popen and check its exit status after unmount.
    - ``foreground=False``: the daemonizing form; the launcher must exit 0 once the mount is
      live. ``logfile=`` is added to the options so the daemon's log can be checked; the
      daemon's PID is found from /proc/*/cmdline.
    - ``source="overlaypc"``: the mount-helper form ``python -m overlaypc SOURCE MNT -o OPTS``.
    ``nofile=N`` starts the daemon with RLIMIT_NOFILE N (soft and hard, like ``ulimit -n N``).
    """

    def __init__(self, mountpoint: Union[str, os.PathLike], options: Union[str, Sequence[str]] = "",
                 *, foreground: bool = True, source: Optional[str] = None,
                 stack: Optional[Union[str, os.PathLike]] = None, debug: bool = False,
                 extra_args: Sequence[str] = (), log_dir: Optional[Union[str, os.PathLike]] = None,
                 allow_daemon_errors: bool = False, timeout: float = MOUNT_TIMEOUT,
                 env: Optional[Mapping[str, str]] = None, nofile: Optional[int] = None):
        self.mountpoint = Path(mountpoint)
        #: RLIMIT_NOFILE (soft and hard, as ``ulimit -n`` sets them) for the daemon
        self.nofile = nofile
        self.options = options if isinstance(options, str) else ",".join(options)
        self.foreground = foreground
        self.source = source
        self.stack = stack
        self.debug = debug
        self.extra_args = list(extra_args)
        self.allow_daemon_errors = allow_daemon_errors
        self.timeout = timeout
        self.env = overlaypc_env(env)
        log_dir = Path(log_dir) if log_dir else self.mountpoint.parent
        stem = self.mountpoint.name
        self.log_path = log_dir / f"{stem}.overlaypc.log"          # launcher/daemon stderr
        self.daemon_log_path = log_dir / f"{stem}.overlaypc.daemon.log"  # logfile= (daemonized)
        self.proc: Optional[subprocess.Popen] = None
        self.daemon_pid: Optional[int] = None
        self.launcher_rc: Optional[int] = None
        self.mounted_when_launcher_returned: Optional[bool] = None
        self.returncode: Optional[int] = None
        self.active = False

    # -- command line ------------------------------------------------------------------
    def command(self) -> list[str]:
        opts = self.options
        if not self.foreground:
            opts = ",".join(o for o in (opts, f"logfile={self.daemon_log_path}") if o)
        args: list[str] = []
        if self.debug:
            args.append("-d")
        if self.source is not None:
            args += [self.source, str(self.mountpoint)]
            if self.foreground:
                args.insert(0, "-f")
            if opts:
                args += ["-o", opts]
        else:
            if self.foreground:
                args.append("-f")
            if opts:
                args += ["-o", opts]
            if self.stack is not None:
                args += ["--stack", str(self.stack)]
            args.append(str(self.mountpoint))
        return overlaypc_cmd(*self.extra_args, *args)

    # -- logs ------------------------------------------------------------------------
    def log_text(self) -> str:
        parts = []
        for p in (self.log_path, self.daemon_log_path):
            with contextlib.suppress(OSError):
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    def _describe(self) -> str:
        return (f"command: {' '.join(self.command())}\n"
                f"--- log ({self.log_path}) ---\n{self.log_text()}")

    # -- start -----------------------------------------------------------------------
    def start(self) -> "Mount":
        assert not self.active, "already mounted"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        assert not is_mounted(self.mountpoint), f"{self.mountpoint} is already a mount point"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env,
                                         cwd=str(self.log_path.parent),  # not the checkout:
                                         start_new_session=True,  # PYTHONPATH decides
                                         preexec_fn=self._limits if self.nofile else None)
        try:
            if self.foreground:
                self._wait_foreground_mount()
            else:
                self._wait_daemonized_mount()
        except BaseException:  # whatever failed while waiting, nothing stays mounted
            self._kill_our_proc()
            self._cleanup_after_failure()
            raise
        self.active = True
        return self

    def _limits(self) -> None:
        """In the child, before exec: the daemon's fd limit."""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def _wait_foreground_mount(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise MountError(f"overlaypc exited with {self.proc.returncode} before "
                                 f"{self.mountpoint} was mounted\n{self._describe()}")
            if time.monotonic() > deadline:
                self._kill_our_proc()
                force_unmount(self.mountpoint)
                raise MountError(f"{self.mountpoint} not mounted within {self.timeout}s\n"
                                 f"{self._describe()}")
            time.sleep(0.02)

    def _wait_daemonized_mount(self) -> None:
        assert self.proc is not None
        try:
            self.launcher_rc = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._kill_our_proc()
            self._find_daemon()
            self._cleanup_after_failure()
            raise MountError(f"daemonizing overlaypc did not return within {self.timeout}s\n"
                             f"{self._describe()}")
        self.mounted_when_launcher_returned = is_mounted(self.mountpoint)
        if self.launcher_rc != 0:
            self._find_daemon()
            self._cleanup_after_failure()
            raise MountError(f"daemonizing overlaypc exited with {self.launcher_rc}\n"
                             f"{self._describe()}")
        # Lenient here (tests assert mounted_when_launcher_returned themselves).
        if not wait_until(lambda: is_mounted(self.mountpoint), self.timeout):
            self._find_daemon()
            self._cleanup_after_failure()
            raise MountError(f"overlaypc returned 0 but {self.mountpoint} never got mounted\n"
                             f"{self._describe()}")
        self._find_daemon()

    def _find_daemon(self) -> None:
        pids = [p for p in pids_with_arg(self.mountpoint) if pid_alive(p)]
        self.daemon_pid = pids[0] if len(pids) == 1 else None
        if len(pids) > 1:
            self._extra_pids = pids  # reported by unmount()

    def _kill_our_proc(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def _cleanup_after_failure(self) -> None:
        force_unmount(self.mountpoint)
        if self.daemon_pid and pid_alive(self.daemon_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.daemon_pid, signal.SIGKILL)

    # -- stop ------------------------------------------------------------------------
    def unmount(self, *, check: bool = True) -> list[str]:
        """Unmount (umount, falling back to fusermount3 -u -z), wait for the daemon to exit.

        Always cleans up completely. Returns the list of problems; with `check`, raises
        MountError if there were any (non-zero exit, timeout, unexpected log lines).
        """
        problems: list[str] = []
        if not self.active:
            return problems
        self.active = False
        if is_mounted(self.mountpoint):
            r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True)
            deadline = time.monotonic() + 3
            while r.returncode != 0 and "busy" in r.stderr and time.monotonic() < deadline:
                # another process walking the machine's /tmp (a find, a scan of the
                # mount table's paths) may hold the mount for a moment: look again
                time.sleep(0.1)
                r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True,
                                   text=True)
            if r.returncode != 0:
                problems.append(f"umount {self.mountpoint} failed: {r.stderr.strip()}")
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                               capture_output=True)
        self._wait_for_exit(problems)
        if is_mounted(self.mountpoint):
            problems.append(f"{self.mountpoint} still mounted after unmount")
            force_unmount(self.mountpoint)
        if not self.allow_daemon_errors:
            bad = unexpected_log_lines(self.log_text())
            if bad:
                problems.append("unexpected daemon errors in log:\n  " + "\n  ".join(bad[:20]))
        if problems and check:
            raise MountError("\n".join(problems) + "\n" + self._describe())
        return problems

    def _wait_for_exit(self, problems: list[str]) -> None:
        if self.foreground:
            assert self.proc is not None
            try:
                self.returncode = self.proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"daemon (pid {self.proc.pid}) still running {EXIT_TIMEOUT}s "
                                f"after unmount; killed\n{thread_report(self.proc.pid)}")
                self._kill_our_proc()
                self.returncode = self.proc.returncode
                return
            if self.returncode != 0:
                problems.append(f"daemon exited with status {self.returncode}")
        else:
            pid = self.daemon_pid
            if pid is None:
                problems.append("could not identify the daemonized overlaypc process "
                                f"(candidates: {getattr(self, '_extra_pids', [])})")
                return
            if not wait_until(lambda: not pid_alive(pid), EXIT_TIMEOUT):
                problems.append(f"daemon (pid {pid}) still running {EXIT_TIMEOUT}s after "
                                f"unmount; killed\n{thread_report(pid)}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> "Mount":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        # On a test failure, still unmount fully; report our own problems only if the body
        # succeeded (so the original failure is not masked).
        self.unmount(check=exc_type is None)

    # -- convenience -------------------------------------------------------------------
    def __truediv__(self, other: str) -> Path:
        return self.mountpoint / other

    @property
    def path(self) -> Path:
        return self.mountpoint

    def mount_entry(self) -> Optional[MountEntry]:
        entries = mounts_at(self.mountpoint)
        return entries[-1] if entries else None


# --------------------------------------------------------------------------------------
# CLI invocations expected to fail
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class CliResult:
    args: list[str]
    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool
    wrongly_mounted: bool


def run_overlaypc(args: Sequence[Union[str, os.PathLike]], mountpoint: Union[str, os.PathLike],
                  log_dir: Union[str, os.PathLike], timeout: float = MOUNT_TIMEOUT,
                  prefix: Sequence[str] = ()) -> CliResult:
    """Run the (daemonizing) CLI once; if it mounts anything new on `mountpoint`, undo it.
    `prefix`: a command that runs it (``prlimit --nofile=N:N --``).

    Output goes to files, not pipes: a wrongly detached daemon holding a pipe open would
    otherwise hang us until the timeout.
    """
    cmd = [*prefix, *overlaypc_cmd(*args)]
    log_dir = Path(log_dir)
    out_path, err_path = log_dir / "cli.stdout", log_dir / "cli.stderr"
    before = len(mounts_at(mountpoint))
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=overlaypc_env(), cwd=str(log_dir), start_new_session=True)
    timed_out = False
    try:
        rc: Optional[int] = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        rc = None
    wrongly_mounted = len(mounts_at(mountpoint)) > before
    if wrongly_mounted:
        stray = [p for p in pids_with_arg(mountpoint) if pid_alive(p)]
        subprocess.run(["umount", str(mountpoint)], capture_output=True)
        if len(mounts_at(mountpoint)) > before:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        wait_until(lambda: not any(pid_alive(p) for p in stray), 10)
        for p in stray:
            if pid_alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
    return CliResult(cmd, rc, out_path.read_text(errors="replace"),
                     err_path.read_text(errors="replace"), timed_out, wrongly_mounted)


# --------------------------------------------------------------------------------------
# Layer trees
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class File:
    content: Union[bytes, str] = b""
    mode: int = 0o644
    xattrs: Mapping[str, bytes] = dataclasses.field(default_factory=dict)
    mtime_ns: Optional[int] = None


@dataclasses.dataclass
class Dir:
    """A directory. `opaque`: False, "trusted" (trusted.overlay.opaque=y), "user"
    (user.overlay.opaque=y, for -o userxattr) or "oci" (a .wh..wh..opq file inside)."""
    children: Mapping[str, "Spec"] = dataclasses.field(default_factory=dict)
    mode: int = 0o755
    opaque: Union[bool, str] = False
    xattrs: Mapping[str, bytes] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Symlink:
    target: str


@dataclasses.dataclass
class Whiteout:
    """Kernel whiteout: character device 0/0."""


@dataclasses.dataclass
class OciWhiteout:
    """OCI whiteout: an empty ``.wh.NAME`` file next to where NAME would be."""


@dataclasses.dataclass
class Fifo:
    mode: int = 0o644


@dataclasses.dataclass
class Device:
    """A device node: ``kind`` "chr" or "blk". 0/0 character devices are whiteouts: use
    ``WHITEOUT`` for those."""
    kind: str
    major: int
    minor: int
    mode: int = 0o644


@dataclasses.dataclass
class HardLink:
    """Another name of an object of the same layer (``target``: its path from the layer
    root). Links are made after everything else in the layer, in spec order."""
    target: str


Spec = Union[bytes, str, dict, File, Dir, Symlink, Whiteout, OciWhiteout, Fifo, Device, HardLink]
LayerSpec = Mapping[str, Spec]

WHITEOUT = Whiteout()
OCI_WHITEOUT = OciWhiteout()
OCI_OPAQUE_NAME = ".wh..wh..opq"


def _as_bytes(content: Union[bytes, str]) -> bytes:
    return content.encode() if isinstance(content, str) else content


def build_layer(root: Union[str, os.PathLike], spec: LayerSpec) -> Path:
    """Create `spec` under `root` (created if needed). Keys may contain slashes; parent
    directories are created 0755. Nested dicts are directories."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    links: list[tuple[Path, str]] = []
    for rel, item in spec.items():
        _build_entry(root, rel, item, links)
    for path, target in links:
        os.link(root / target.strip("/"), path, follow_symlinks=False)
    return root


def _build_entry(root: Path, rel: str, item: Spec, links: list[tuple[Path, str]]) -> None:
    path = root / rel.strip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(item, (bytes, str)):
        item = File(item)
    elif isinstance(item, dict):
        item = Dir(children=item)
    if isinstance(item, File):
        path.write_bytes(_as_bytes(item.content))
        os.chmod(path, item.mode)
        for k, v in item.xattrs.items():
            os.setxattr(path, k, _as_bytes(v))
        if item.mtime_ns is not None:
            os.utime(path, ns=(item.mtime_ns, item.mtime_ns))
    elif isinstance(item, Dir):
        path.mkdir(exist_ok=True)
        for name, child in item.children.items():
            _build_entry(path, name, child, links)
        if item.opaque in (True, "trusted"):
            os.setxattr(path, "trusted.overlay.opaque", b"y")
        elif item.opaque == "user":
            os.setxattr(path, "user.overlay.opaque", b"y")
        elif item.opaque == "oci":
            (path / OCI_OPAQUE_NAME).write_bytes(b"")
        elif item.opaque:
            raise ValueError(f"unknown opaque form {item.opaque!r}")
        for k, v in item.xattrs.items():
            os.setxattr(path, k, _as_bytes(v))
        os.chmod(path, item.mode)
    elif isinstance(item, Symlink):
        os.symlink(item.target, path)
    elif isinstance(item, Whiteout):
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    elif isinstance(item, OciWhiteout):
        (path.parent / (".wh." + path.name)).write_bytes(b"")
    elif isinstance(item, Fifo):
        os.mkfifo(path)
        os.chmod(path, item.mode)
    elif isinstance(item, Device):
        kind = {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK}[item.kind]
        os.mknod(path, kind | item.mode, os.makedev(item.major, item.minor))
        os.chmod(path, item.mode)  # mknod's mode went through the umask
    elif isinstance(item, HardLink):
        links.append((path, item.target))
    else:
        raise TypeError(f"bad layer spec item for {rel}: {item!r}")


@dataclasses.dataclass
class Layers:
    """Built layers, top first (the order of lowerdir=)."""
    dirs: dict[str, Path]

    @property
    def paths(self) -> list[Path]:
        return list(self.dirs.values())

    @property
    def lowerdir(self) -> str:
        return ":".join(str(p) for p in self.paths)

    def __getitem__(self, name: str) -> Path:
        return self.dirs[name]


# --------------------------------------------------------------------------------------
# Kernel overlayfs oracle
# --------------------------------------------------------------------------------------

KERNEL_PINNED_OPTIONS = "redirect_dir=off,index=off,metacopy=off,xino=off"


#: How long ``kernel_overlay`` waits for another mount namespace to let go of the upper
#: and work dirs (``KERNEL_BUSY_WAIT`` overrides, seconds): a podman test's holder
#: namespace lives for minutes
KERNEL_BUSY_WAIT = 150.0
#: After the last holder is gone the kernel may still hold the superblock a moment (a
#: dead namespace's mounts are put asynchronously): busy with no holder seen is retried
#: this long before it fails
KERNEL_BUSY_GRACE = 2.0

#: The texts of EBUSY from ``mount -t overlay``: util-linux's for mount(2)'s EBUSY (2.38:
#: "overlay already mounted on M" when any mount of source "overlay" is in our mount
#: table, M the first such, seldom the holder; "overlay already mounted or mount point
#: busy" otherwise), strerror's, and the kernel's own (util-linux >= 2.39 shows the
#: fsconfig message; dmesg has it otherwise)
_BUSY_TEXTS = ("device or resource busy", "already mounted on ",
               "already mounted or mount point busy", "in-use as upperdir/workdir",
               "upperdir in use", "workdir in use")


def overlay_mount_busy(stderr: str) -> bool:
    """Whether a failed ``mount -t overlay``'s message says EBUSY (another mount holds
    the upper or work dir, or the mount point is busy), as opposed to any other error."""
    text = stderr.lower()
    return any(t in text for t in _BUSY_TEXTS)


@dataclasses.dataclass(frozen=True)
class OverlayHolder:
    """A kernel overlay mount, in one mount namespace, whose upperdir or workdir is one
    of the dirs asked about (the kernel locks both: "in-use as upperdir/workdir")."""
    ns: str                  # readlink of /proc/PID/ns/mnt, "mnt:[4026531841]"
    pids: tuple[int, ...]    # processes in that namespace (the first few)
    mountpoint: str          # as that namespace sees it
    ours: bool               # this process's own namespace

    def __str__(self) -> str:
        where = "this mount namespace" if self.ours else \
            f"{self.ns} (pids {', '.join(map(str, self.pids))})"
        return f"overlay on {self.mountpoint} in {where}"


def _super_option_dirs(super_options: str) -> set[str]:
    """The upperdir and workdir values of an overlay's super options (mountinfo's last
    field: the kernel escapes ',', '=', whitespace and '\\' in them as \\ooo)."""
    found = set()
    for opt in super_options.split(","):
        key, _, value = opt.partition("=")
        if key in ("upperdir", "workdir") and value:
            found.add(os.path.normpath(_unescape_mountinfo(value)))
    return found


def _namespaces() -> dict[str, list[int]]:
    """Every mount namespace with a process in it: its pids, in /proc order."""
    spaces: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                spaces.setdefault(os.readlink(f"/proc/{entry}/ns/mnt"), []).append(int(entry))
    return spaces


def overlay_holders(upper: Union[str, os.PathLike],
                    work: Optional[Union[str, os.PathLike]] = None) -> list[OverlayHolder]:
    """The overlay mounts using ``upper`` or ``work`` as their upperdir or workdir, in every
    mount namespace that has a process (``/proc/*/mountinfo``, one read per namespace).

    Caveats: a namespace kept only by a bind mount of its nsfs file, or an overlay
    detached by ``umount -l`` but still in use, holds the dirs unseen. Paths are compared
    as strings after ``realpath`` of ours (the kernel shows the paths it was given)."""
    wanted = {os.path.realpath(d) for d in (upper, work) if d is not None}
    try:
        mine = os.readlink("/proc/self/ns/mnt")
    except OSError:
        mine = ""
    holders = []
    for ns, pids in _namespaces().items():
        for pid in pids:  # the first whose mountinfo reads (a process may exit meanwhile)
            text = _read(f"/proc/{pid}/mountinfo")
            if text:
                break
        for line in text.splitlines():
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3 or rfields[0] != "overlay":
                continue
            if _super_option_dirs(rfields[2]) & wanted:
                holders.append(OverlayHolder(ns, tuple(pids[:5]), _unescape_mountinfo(fields[4]),
                                             ns == mine))
    return holders


def _busy_wait() -> float:
    return float(os.environ.get("KERNEL_BUSY_WAIT", KERNEL_BUSY_WAIT))


def _mount_kernel_overlay(mnt: Path, opts: list[str], upper, work) -> None:
    """``mount -t overlay``; on EBUSY, waits while only other mount namespaces hold the
    upper or work dir (``overlay_holders``: a podman test's holder namespace, a namespace
    copied while another test's overlay was up), polling up to ``KERNEL_BUSY_WAIT``
    seconds. A holder in our own namespace (a leftover mount) fails at once, named."""
    cmd = ["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(mnt)]
    start = last_held = time.monotonic()
    seen: list[OverlayHolder] = []
    while True:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return
        failed = f"kernel overlay mount failed: {r.stderr.strip()} (options {opts})"
        if upper is None or not overlay_mount_busy(r.stderr):
            raise AssertionError(failed)
        holders = overlay_holders(upper, work)
        own = [h for h in holders if h.ours]
        if own:
            raise AssertionError(f"{failed}; held in this mount namespace by "
                                 f"{'; '.join(map(str, own))}")
        now = time.monotonic()
        waited = now - start
        if holders:
            seen, last_held = holders, now
        elif now - last_held >= KERNEL_BUSY_GRACE:
            raise AssertionError(f"{failed}; no overlay in any mount namespace holds "
                                 f"{upper} or {work}" + (f" any more (held before by "
                                 f"{'; '.join(map(str, seen))})" if seen else ""))
        if waited >= _busy_wait():
            raise AssertionError(f"{failed}; still held after {waited:.0f} s by "
                                 f"{'; '.join(map(str, holders))}")
        time.sleep(0.5)


@contextlib.contextmanager
def kernel_overlay(mountpoint: Union[str, os.PathLike], lowers: Sequence[Union[str, os.PathLike]],
                   upper: Optional[Union[str, os.PathLike]] = None,
                   work: Optional[Union[str, os.PathLike]] = None,
                   extra_options: Sequence[str] = ()) -> Iterator[Path]:
    """Mount the kernel's overlayfs with pinned options; always unmount. Waits while
    another mount namespace holds the upper or work dir (``_mount_kernel_overlay``)."""
    require("root")
    require("kernel_overlay")
    mnt = Path(mountpoint)
    mnt.mkdir(parents=True, exist_ok=True)
    opts = ["lowerdir=" + ":".join(str(p) for p in lowers)]
    if upper is not None:
        opts += [f"upperdir={upper}", f"workdir={work}"]
    opts += [KERNEL_PINNED_OPTIONS, *extra_options]
    _mount_kernel_overlay(mnt, opts, upper, work)
    try:
        yield mnt
    finally:
        force_unmount(mnt)


# --------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------

SMALL_CONTENT = 4096


@dataclasses.dataclass(frozen=True)
class Entry:
    type: str                 # "file", "dir", "symlink", "chr", "blk", "fifo", "sock"
    mode: int                 # permission bits (S_IMODE)
    uid: int
    gid: int
    size: Optional[int]       # files and symlinks only (directory sizes vary by filesystem)
    content: Optional[Union[bytes, str]]  # bytes if small, else "sha256:..."
    target: Optional[str]     # symlink text
    rdev: Optional[tuple[int, int]]
    xattrs: tuple[tuple[str, bytes], ...]
    mtime_ns: Optional[int]


def _type_of(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "sock")):
        if test(mode):
            return name
    return "unknown"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError as e:
            out.append((n, f"<{e.strerror}>".encode()))
    return tuple(out)


def _file_content(path: str) -> Union[bytes, str]:
    with open(path, "rb") as f:
        head = f.read(SMALL_CONTENT + 1)
        if len(head) <= SMALL_CONTENT:
            return head
        h = hashlib.sha256(head)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def tree_snapshot(root: Union[str, os.PathLike], *, times: bool = False, xattrs: bool = True,
                  owners: bool = True, ignore_vanished: bool = False) -> dict[str, Entry]:
    """Relative path -> Entry for everything under `root` ("." is the root itself).

    Skips nothing: a whiteout that leaks through a merged view shows up as a "chr" entry or a
    ``.wh.*`` name. Never follows symlinks.

    `ignore_vanished` is for the kernel oracle only: kernel overlayfs lists a 0/0 whiteout
    that sits in a directory it does not merge (nothing below it), yet its lookup says
    ENOENT; such listed-but-missing names are then left out instead of raising.
    """
    root = os.fspath(root)
    out: dict[str, Entry] = {}

    def visit(path: str, rel: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if ignore_vanished and rel != ".":
                return
            raise
        kind = _type_of(st.st_mode)
        size = content = target = rdev = None
        if kind == "file":
            size, content = st.st_size, _file_content(path)
        elif kind == "symlink":
            target = os.readlink(path)
            size = st.st_size
        elif kind in ("chr", "blk"):
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        out[rel] = Entry(kind, stat.S_IMODE(st.st_mode),
                         st.st_uid if owners else -1, st.st_gid if owners else -1,
                         size, content, target, rdev,
                         _xattrs(path) if xattrs else (),
                         st.st_mtime_ns if times else None)
        if kind == "dir":
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), name if rel == "." else f"{rel}/{name}")

    visit(root, ".")
    return out


def diff_snapshots(a: Mapping[str, Entry], b: Mapping[str, Entry], names=("a", "b")) -> str:
    """Human-readable difference, for assertion messages."""
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{k}:\n   {names[0]}: {a.get(k)}\n   {names[1]}: {b.get(k)}")
    return "\n".join(lines)


def dir_state(root: Union[str, os.PathLike]) -> Optional[dict[str, tuple]]:
    """Everything about a directory tree that a write could change (None if it is missing).

    Used to prove that a refused invocation wrote nothing."""
    root = os.fspath(root)
    if not os.path.lexists(root):
        return None
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None] + dirnames + filenames:
            p = dirpath if name is None else os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                              st.st_mtime_ns, st.st_ctime_ns, _xattrs(p))
    return out


def merged_names(root: Union[str, os.PathLike]) -> set[str]:
    """Relative paths of everything under root (not root itself)."""
    return {k for k in tree_snapshot(root, xattrs=False) if k != "."}


def make_socket(path) -> Path:
    """A unix socket file at ``path``, bound through ``/proc/self/fd`` of its directory, so
    that a deep path (a long basetemp, a long test name) never passes ``sun_path``'s 108
    bytes. The socket is closed; its file stays."""
    import socket
    path = Path(path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(f"/proc/self/fd/{dfd}/{path.name}")
    finally:
        s.close()
        os.close(dfd)
    return path
