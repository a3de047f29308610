"""Kernel idmapped mounts for tests: ``idmapped_bind(source, target, "0:100000:65536")``.

util-linux 2.38 (Debian 12) has no ``X-mount.idmap=``, so the mount is made with the new
mount API through ctypes: ``open_tree(OPEN_TREE_CLONE)`` of ``source`` (a detached bind
mount), ``mount_setattr(MOUNT_ATTR_IDMAP)`` with the user namespace of a helper process
whose ``uid_map``/``gid_map`` we write, ``move_mount`` onto ``target``. The helper is ours
(started here, waited for here); the mount is always taken down on the way out, even when
the body fails. Needs root and a filesystem that supports idmapped mounts (ext4, tmpfs,
xfs on this kernel).

An idmapped mount with map ``C H N`` shows an ID stored on disk in ``[C, C+N)`` as
``H + (id - C)``, and stores a written ID the other way.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import helpers

# x86_64/aarch64 (asm-generic) numbers: the new mount API has the same numbers everywhere
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
AT_EMPTY_PATH, AT_FDCWD = 0x1000, -100
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _call(what: str, *args) -> int:
    r = _libc.syscall(*args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return r


# a child that enters a new user namespace, says so, and waits for its stdin to close
_USERNS_CHILD = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.read()
"""


@contextlib.contextmanager
def userns_fd(mapping: str) -> Iterator[int]:
    """An fd of a user namespace with ``uid_map`` and ``gid_map`` ``C H N`` (``mapping``
    given as ``C:H:N``)."""
    line = " ".join(mapping.split(":")) + "\n"
    proc = subprocess.Popen([sys.executable, "-c", _USERNS_CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = proc.stdout.readline()
        if ready != b"ready\n":
            raise AssertionError(f"userns helper: {ready!r} {proc.stderr.read()!r}")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{proc.pid}/{name}", "w") as f:
                f.write(line)
        fd = os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def idmapped_bind(source: Path, target: Path, mapping: str) -> Iterator[Path]:
    """``source`` bind-mounted on ``target`` with idmapping ``mapping`` (``C:H:N``);
    unmounted on the way out."""
    helpers.require("root")
    tree = _call("open_tree", SYS_OPEN_TREE, AT_FDCWD, os.fsencode(str(source)),
                 OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    try:
        with userns_fd(mapping) as ns:
            attr = MountAttr(MOUNT_ATTR_IDMAP, 0, 0, ns)
            _call("mount_setattr", SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH,
                  ctypes.byref(attr), ctypes.sizeof(attr))
        _call("move_mount", SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(str(target)),
              MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(tree)  # a detached tree that was never moved goes with its last fd
    try:
        yield target
    finally:
        helpers.force_unmount(target)
