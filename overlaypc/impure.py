"""The kernel overlay's ``impure`` mark on upper directories (``<prefix>impure`` = ``y``),
and the upper root's ``<prefix>uuid``, which the kernel writes by the same mark.

Owns ``mark``, ``has_origin`` and ``first_mount_uuid``. The kernel's readdir gives a listed object the inode
number ``stat`` shows (its copy-up origin's) as ``d_ino`` only in an upper directory so
marked (in a merged one too when it uses xino bits); elsewhere the upper file's own number
shows, and ``find``, ``du`` or ``ls -i`` see two inodes. overlaypc's own listings stat their
upper entries and need no mark: it is written for the kernel mounting the upper later.

Written where the kernel writes it: on the parent of every copy-up, before the copy takes
its name (a crash then leaves a mark with nothing behind it, which costs the kernel a
lookup per entry, never a missing one); on the new parent of a rename to another directory
and of a link, when the object has a copy-up origin. Never removed here (the kernel drops a
mark it finds unneeded while listing). An upper that takes no such xattr gets no mark, as
with the kernel.

The kernel's default ``uuid=auto`` gives an upper whose root has ``<prefix>uuid`` that
uuid (its ``f_fsid``, fanotify's file ids); it writes one at the first mount of a new upper,
known by its root not being marked impure yet; an upper without one whose root is marked
gets the null uuid (the upper filesystem's ``f_fsid``, shared by every overlay there).
overlaypc marks the root at its first copy-up, so it writes the uuid at mount as the kernel
does (``first_mount_uuid``), else the kernel would take its upper for an old one.
"""
from __future__ import annotations

import errno
import os

from . import logs
from .layer import DirFd, Layer

log = logs.get("overlaypc.impure")

IMPURE = "impure"
ORIGIN = "origin"
UUID = "uuid"


def mark(upper: Layer, dir_rel: str, prefix: str, held: DirFd | None = None) -> None:
    """Mark upper directory ``dir_rel`` impure unless it is already (one read, and one write
    the first time; no open where a cache holds its parent). Where a cache holds the
    directory's own fd, through that fd, and only once per fd (``DirFd.impure_settled``:
    the fd pins the inode the answer is about, and nothing removes the mark under a mount:
    a ``chmod -R`` of lower files read it once per copy-up). ``held``: that fd where the
    caller found it in this lock hold already (None: looked for here)."""
    name = prefix + IMPURE
    if held is None:
        held = upper.held_dir(dir_rel)
    if held is not None:
        if held.impure_settled:
            return
        # (the object the fd holds, not the name: a flag set on it says what it read)
        _mark(upper, dir_rel, name, lambda: upper.getxattr_fd(held.fd, name),
              lambda: upper.do_setxattr_held(held.fd, dir_rel, name, b"y"),
              lambda: os.listxattr(f"/proc/self/fd/{held.fd}"))
        held.impure_settled = True
        return
    _mark(upper, dir_rel, name, lambda: upper.getxattr_entry(dir_rel, name),
          lambda: upper.do_setxattr_entry(dir_rel, name, b"y"),
          lambda: upper.listxattr(dir_rel))


def _mark(upper: Layer, dir_rel: str, name: str, read, write, listed) -> None:
    """``mark``'s read, then its write if no mark was found (none where the upper takes
    no such xattr, as the kernel). A ``user.*`` xattr of a directory is read only with
    read permission on it, which a plain user's daemon lacks on an upper directory of
    its own of mode 0300 (it may still write one: write permission): there whether the
    mark is there is read from the directory's xattr names (``listed``), which need none."""
    try:
        if read() is not None:
            return
    except OSError as e:
        if e.errno != errno.EACCES:
            raise
        if name in listed():
            return
    try:
        write()
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EPERM):
            raise
        log.debug("%s/%s: no %s mark: %s", upper.path, dir_rel, name, e.strerror)


def has_origin(upper: Layer, rel: str, prefix: str) -> bool:
    """Whether upper object ``rel`` records a copy-up origin (its inode number is the
    origin's, so a directory it moves or is linked into needs the mark)."""
    return upper.getxattr_entry(rel, prefix + ORIGIN) is not None


def first_mount_uuid(upper: Layer, prefix: str) -> None:
    """At a writable mount: write a new random uuid on the upper root unless it has one or
    is marked impure (an upper that was mounted before: it keeps the null uuid, as with the
    kernel). Nothing, logged, where the upper takes no such xattr or refuses it."""
    if upper.getxattr_entry("", prefix + UUID) is not None \
            or upper.getxattr_entry("", prefix + IMPURE) is not None:
        return
    # a random (version 4) uuid, as the kernel's uuid_gen; not the ``uuid`` module, which
    # imports ``re`` and ``enum`` at start-up
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    try:
        upper.do_setxattr_entry("", prefix + UUID, bytes(raw))
    except OSError as e:  # (never a reason to refuse the mount: the kernel's is optional too)
        log.info("%s: no %s written: %s", upper.path, prefix + UUID, e.strerror)
