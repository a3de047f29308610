"""Unmount the mount of a daemon that died, for mounts made by a plain user.

Owns: a small watcher process started by the daemon of a non-root mount. libfuse's own
``auto_unmount`` (fusermount3 left behind) checks that the daemon is gone by opening the
mountpoint as root and waiting for ENOTCONN, but the kernel refuses root any access to
a FUSE mount without ``allow_other`` (EACCES), which a plain user may ask for only with
``user_allow_other`` in /etc/fuse.conf: a killed daemon then leaves a dead mount
(libfuse 3.14). The watcher needs no privilege: it holds the read end of a pipe whose
write end only the daemon holds, learns the mountpoint from it (never from its argv, so
nothing that looks for the daemon by its mountpoint finds the watcher), and when the
pipe closes, the daemon has exited; if the same mount (same device number) is still
there, it runs ``fusermount3 -u -z``. After a normal unmount there is nothing left to do.
"""
from __future__ import annotations

import os
import sys
import time

from .. import logs

log = logs.get("overlaypc.autounmount")

#: how long the watcher waits for the mount to show in mountinfo
APPEAR_TIMEOUT = 30.0


def start(mountpoint: str) -> None:
    """Start the watcher for ``mountpoint`` (in the daemon, once mounted)."""
    import subprocess  # only plain users' mounts need it: a start-up cost otherwise
    r, w = os.pipe()
    try:
        subprocess.Popen([sys.executable, "-m", "overlaypc.engine.autounmount"], stdin=r,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    os.write(w, os.fsencode(mountpoint) + b"\n")
    # ``w`` stays open, close-on-exec, for the daemon's lifetime: its closing is the signal


def fuse_device(mountpoint: str) -> str | None:
    """``major:minor`` of the FUSE mount at ``mountpoint`` (the topmost), or None."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == mountpoint and " - fuse" in line:
                found = fields[2]
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    if "\\" not in field:  # most paths: no regex (the mount's start reads every line)
        return field
    import re  # only here: importing it costs a mount's start ~1 ms
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def watch(pipe_fd: int) -> int:
    with os.fdopen(pipe_fd, "rb", buffering=0) as pipe:
        line = b""
        while not line.endswith(b"\n"):
            chunk = pipe.read(4096)
            if not chunk:
                return 0
            line += chunk
        mountpoint = os.fsdecode(line[:-1])
        deadline = time.monotonic() + APPEAR_TIMEOUT
        dev = fuse_device(mountpoint)
        while dev is None and time.monotonic() < deadline:
            time.sleep(0.05)
            dev = fuse_device(mountpoint)
        while pipe.read(4096):
            pass  # nothing more is ever written: this returns when the daemon is gone
    if dev is not None and fuse_device(mountpoint) == dev:
        import subprocess
        subprocess.run(["fusermount3", "-u", "-z", "-q", mountpoint],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(watch(sys.stdin.fileno()))
