"""Mount-time helpers shared by every FUSE front end (no binding imported here).

Owns: raising the FUSE bdi's readahead after the mount appears (docs/DESIGN-NOTES.md,
"Readahead raised only after INIT"), and the mount options that depend on who mounts
(``mount_mode``, ``user_allow_other`` from /etc/fuse.conf).
"""
from __future__ import annotations

from . import logs
from .engine.autounmount import fuse_device

log = logs.get("overlaypc.fuse")


READAHEAD_KB = 1024


def raise_readahead(mountpoint: str, kb: int = READAHEAD_KB) -> None:
    """Set the FUSE bdi's ``read_ahead_kb`` (default 128; the INIT reply can only lower it):
    8x fewer read requests in kernel cache mode (docs/ARCHITECTURE.md §7).

    Call it once the INIT reply is written: the kernel applies that reply inside our write,
    so nothing it sets can come later. It touches no file on the mount (the workers may not
    run yet, and a path walk in flight would make an early ``umount`` fail with EBUSY)."""
    dev = fuse_device(mountpoint)
    if dev is None:
        log.debug("no FUSE mount at %s in mountinfo; read_ahead_kb left alone", mountpoint)
        return
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        log.debug("read_ahead_kb of %s (bdi %s) set to %d", mountpoint, dev, kb)
    except OSError as e:
        log.debug("cannot raise read_ahead_kb of %s: %s", mountpoint, e)


FUSE_CONF = "/etc/fuse.conf"


def user_allow_other(path: str = FUSE_CONF) -> bool:
    """Whether fusermount3 lets unprivileged users ask for ``allow_other``
    (a ``user_allow_other`` line in /etc/fuse.conf)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def mount_mode(euid: int, fuse_conf: str = FUSE_CONF) -> dict[str, bool]:
    """The libfuse options that depend on who mounts. libfuse tries mount(2) first, which
    works for uid 0, also inside a user namespace (rootless podman runs its mount program
    there), and falls back to the setuid fusermount3 for everyone else. Root (of any
    namespace) shares the mount with every user, as the kernel's overlay does; a plain
    user only where /etc/fuse.conf allows it (fusermount3 refuses the mount otherwise),
    and asks for ``auto_unmount``: fusermount3 then stays behind and unmounts if the
    daemon dies, so a killed daemon leaves no dead mount (unmount with ``fusermount3 -u``).
    Without ``allow_other`` that watcher cannot see the daemon die: ``autounmount``."""
    if euid == 0:
        return {"allow_other": True}
    mode = {"auto_unmount": True}
    if user_allow_other(fuse_conf):
        mode["allow_other"] = True
    return mode
