"""Small additions for the reliability, stress and security tests (issue 8), on top of
``helpers`` and ``upper_support``.

What this module owns:
- ``loop_fs()``: a small ext4 (or XFS) on a loop device of our own, for full-disk tests.
- ``kill_daemon()``: SIGKILL the foreground daemon of a ``helpers.Mount`` we started (by its
  PID, after checking its command line names our mountpoint), then lazily detach the dead
  mount and mark the ``Mount`` as down, so the fixture does not report the kill as a failure.
- ``wait_stopped()``: wait until a daemon paused itself (fault action ``pause`` = SIGSTOP).
- ``spawn_py()``: run a Python snippet in a child that may block on the mount (an open that
  triggers a paused copy-up), with a result we can read afterwards.
- ``kill_at_pause()``: both together: a child's request paused at a fault point, checks
  while it is paused, kill -9 of the daemon, the child's result.
- ``pattern()``: deterministic, position-dependent bytes (a shifted copy never matches).
- ``Sentinel``: a host directory outside every layer with known contents, times and
  xattrs, and ``assert_untouched()``.
- ``errno_name()`` / ``outcome()``: an operation's result as a short comparable string.

Caveats: everything runs as root; only processes, mounts and loop devices created here are
ever killed, unmounted or detached.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import helpers

MiB = 1 << 20


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def pattern(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes from ``seed``: every MiB differs, so a copy that is
    short, shifted or torn never compares equal."""
    return random.Random(seed).randbytes(size)


def sha256_file(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else repr(e)


def outcome(fn: Callable[[], object]) -> str:
    """``"ok"`` or the errno name an operation fails with."""
    try:
        fn()
    except OSError as e:
        return errno_name(e)
    return "ok"


# --------------------------------------------------------------------------------------
# Loop filesystems
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def loop_fs(base: Path, size_mib: int = 32, fstype: str = "ext4",
            mkfs_args: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh ``fstype`` of ``size_mib`` MiB on a loop device we attach (and detach);
    ``mkfs_args``: more options for its mkfs."""
    helpers.require("root")
    mkfs = f"mkfs.{fstype}"
    helpers.require(shutil.which(mkfs) is not None and shutil.which("losetup")
                    is not None and os.path.exists("/dev/loop-control"),
                    f"needs {mkfs}, losetup and loop devices")
    base.mkdir(parents=True, exist_ok=True)
    image, mnt = base / f"{fstype}.img", base / f"{fstype}-mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    r = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
    helpers.require(r.returncode == 0, f"losetup failed: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        args = ["-q", "-F", "-m", "0"] if fstype == "ext4" else ["-q", "-f"]
        subprocess.run([mkfs, *args, *mkfs_args, dev], check=True, capture_output=True)
        subprocess.run(["mount", "-t", fstype, dev, str(mnt)], check=True, capture_output=True)
        try:
            yield mnt
        finally:
            helpers.force_unmount(mnt)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)  # only our own device
        with contextlib.suppress(OSError):
            image.unlink()


def free_bytes(path: Union[str, os.PathLike]) -> int:
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize


# --------------------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------------------

def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _all_threads_stopped(pid: int) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return bool(tids) and all(_proc_state_path(f"/proc/{pid}/task/{t}/stat") in ("T", "t")
                              for t in tids)


def _proc_state_path(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def wait_stopped(pid: int, timeout: float = 20.0) -> bool:
    """True once every thread of ``pid`` is stopped (a ``pause`` fault sent it SIGSTOP)."""
    return helpers.wait_until(lambda: _all_threads_stopped(pid) or not helpers.pid_alive(pid),
                              timeout) and _all_threads_stopped(pid)


def daemon_pid(m: helpers.Mount) -> int:
    """The PID of a foreground daemon we started, checked against our mountpoint."""
    assert m.foreground and m.proc is not None, "kill_daemon needs a foreground Mount"
    pid = m.proc.pid
    assert pid in helpers.pids_with_arg(m.mountpoint), \
        f"pid {pid} does not carry our mountpoint {m.mountpoint}; refusing to signal it"
    return pid


def lazy_detach(mnt: Union[str, os.PathLike]) -> None:
    """Detach a (dead) FUSE mount of ours: ``umount -l``, else ``fusermount3 -u -z``."""
    for cmd in (["umount", "-l", str(mnt)], ["fusermount3", "-u", "-z", str(mnt)]):
        if not helpers.is_mounted(mnt):
            return
        subprocess.run(cmd, capture_output=True, timeout=30)
    assert not helpers.is_mounted(mnt), f"{mnt} still mounted after umount -l"


def kill_daemon(m: helpers.Mount, *, detach: bool = True) -> None:
    """SIGKILL our daemon (running or stopped), reap it, optionally detach the dead mount."""
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGKILL)
    assert m.proc is not None
    m.returncode = m.proc.wait(timeout=15)
    assert m.returncode == -signal.SIGKILL, m.returncode
    if detach:
        lazy_detach(m.mountpoint)
    m.active = False  # taken down by us; the fixture must not unmount or judge it again


def spawn_py(code: str, *, cwd: Optional[Union[str, os.PathLike]] = None) -> subprocess.Popen:
    """Start ``code`` in a child Python (which may block on the mount); its stdout/stderr are
    pipes, read with ``finish()``."""
    full = "import errno, os, sys\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", full], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_at_pause(m: helpers.Mount, code: str, point: str = "the pause",
                  while_paused: Optional[Callable[[], None]] = None) -> tuple[int, str, str]:
    """Run ``code`` in a child (``spawn_py``) whose request the daemon of ``m`` (mounted with
    a ``pause`` fault) stops at ``point``; once it is stopped, ``while_paused()``, then kill
    -9 of the daemon (also when a check failed). Returns the child's ``finish()``."""
    child = spawn_py(code)
    try:
        assert wait_stopped(daemon_pid(m)), f"daemon never reached {point}:\n{m.log_text()}"
        if while_paused is not None:
            while_paused()
    finally:
        if m.active:
            kill_daemon(m)
    return finish(child)


def finish(child: subprocess.Popen, timeout: float = 30.0) -> tuple[int, str, str]:
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate(timeout=10)
        raise AssertionError(f"child still blocked after {timeout}s:\n{err}")
    return child.returncode, out, err


# --------------------------------------------------------------------------------------
# A host directory that no operation through the mount may touch
# --------------------------------------------------------------------------------------

SENTINEL_FILES = {
    "secret.txt": b"host secret, never to be read or changed through the overlay\n",
    "sub/inner.txt": b"inner host file\n",
    "victim.txt": b"host victim\n",
}
SENTINEL_DIRS = ("sub", "emptydir")
SENTINEL_MTIME = 1_234_567_890_000_000_000


class Sentinel:
    """A host tree with known contents/modes/times/xattrs, and a check it stayed so."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        for d in SENTINEL_DIRS:
            (root / d).mkdir()
        for rel, data in SENTINEL_FILES.items():
            p = root / rel
            p.write_bytes(data)
            os.chmod(p, 0o644)
            os.setxattr(p, "user.sentinel", b"1")
        for p in sorted(root.rglob("*"), reverse=True) + [root]:
            os.utime(p, ns=(SENTINEL_MTIME, SENTINEL_MTIME), follow_symlinks=False)
        self.before = self.state()

    def state(self) -> dict:
        st = helpers.dir_state(self.root)
        contents = {rel: (self.root / rel).read_bytes()
                    for rel in (st or {}) if (self.root / rel).is_file()}
        return {"meta": st, "contents": contents}

    def assert_untouched(self) -> None:
        now = self.state()
        if now != self.before:
            diff = [k for k in set(now["meta"] or {}) | set(self.before["meta"] or {})
                    if (now["meta"] or {}).get(k) != (self.before["meta"] or {}).get(k)]
            raise AssertionError(f"host sentinel {self.root} was changed: {sorted(diff)}\n"
                                 f"contents now: {now['contents']}")


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    return helpers.wait_until(lambda: not helpers.pid_alive(pid), timeout)


def monotonic_deadline(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end
