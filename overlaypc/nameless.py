"""Directories whose last name went while the kernel still holds their node.

Owns ``GoneDir``, what the node of such a directory keeps until FORGET
(``nodes.Node.gone``), and ``NamelessDirs``: its attributes, xattr reads and changes. The
kernel opens directories itself (no OPENDIR handle here), so an open directory whose name
went (``rmdir``, a rename over it) is reached by nodeid alone. Its node keeps the
attributes the removal found and the ``O_PATH`` fd of its top directory that the removal's
lookup held (``lookup.Entry.dirfd``: no system call at the removal), which keeps that
directory alive:

* with an upper part (upper-only, or merged): the removed upper directory, unlinked. GETATTR
  reads it afresh (inode number and link count as at the removal), and chmod, chown,
  utimens and xattr changes apply to it, as the kernel overlay applies them to the upper
  dentry it keeps.
* lower-only: the lower directory, still there under its whiteout: xattrs are read from it;
  changes answer ESTALE. (The kernel overlay copies it up then, into its workdir, where it
  stays: no name in the upper could take it.) Nothing here acts by path, so the directory
  that took the name is never touched.

Bound: the fds count as open files' (``OverlayFS.open_fds``), so they share that budget
(``fdbudget``), and they are at most ``SHARE`` of it (held removed directories never take
the fds open files need): a removal past that, or while open files hold their whole share,
keeps no fd, and then
the node answers GETATTR with the removal's attributes, xattr reads and changes with
ESTALE. A fd is held from the removal until FORGET; for a directory nothing holds (``rm
-rf``) the kernel sends that FORGET right after the RMDIR.
"""
from __future__ import annotations

import errno
import os
import threading

from .attrs import Attr, getxattr_at, listxattr_at, setxattr_fd
from .copyup import is_private_xattr
from .layer import DirFd, Layer
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from .core import OverlayFS
    from .lookup import Node

    T = TypeVar("T")


#: removed directories hold at most one in this many of the open files' fds
SHARE = 4


class GoneDir:
    """A removed directory as its node keeps it: ``attr`` as the removal found it (link
    count as shown then: 0 for an upper-only one), the held fd of its top directory
    (``dirfd``, in ``layer``; None past the bound) and whether that is its upper one
    (``upper``: changes apply there)."""
    __slots__ = ("attr", "layer", "dirfd", "upper", "_owner")

    def __init__(self, attr: Attr, layer: Layer | None, dirfd: DirFd | None, upper: bool,
                 owner: "NamelessDirs | None") -> None:
        self.attr = attr
        self.layer = layer
        self.dirfd = dirfd
        self.upper = upper
        self._owner = owner  # counts the held fd until this goes (the node's FORGET)

    def __del__(self) -> None:
        if self._owner is not None:
            self._owner._released()

    def __repr__(self) -> str:
        return f"GoneDir(ino={self.attr.ino}, upper={self.upper}, fd={self.dirfd is not None})"


class NamelessDirs:
    def __init__(self, fs: "OverlayFS") -> None:
        self.fs = fs
        self._lock = threading.Lock()
        #: fds held by ``GoneDir``s now (``OverlayFS.open_fds`` counts them)
        self.fds = 0

    def _released(self) -> None:
        with self._lock:
            self.fds -= 1

    def keep(self, node: "Node", attr: Attr) -> GoneDir:
        """What the node of the directory ``node`` (as its removal found it) keeps."""
        top = node.top
        upper = node.upper is not None
        fs = self.fs
        if top.dirfd is None or fs.open_fds() >= fs.open_file_fds:
            return GoneDir(attr, None, None, upper, None)
        with self._lock:
            if self.fds >= fs.open_file_fds // SHARE:
                return GoneDir(attr, None, None, upper, None)
            self.fds += 1
        return GoneDir(attr, top.layer, top.dirfd, upper, self)

    # -- reads ----------------------------------------------------------------------------------
    def attr(self, gone: GoneDir) -> Attr:
        """GETATTR: an upper directory's stat read afresh (changes of it show), with the
        removal's inode number and link count; else the removal's attributes."""
        if not gone.upper or gone.dirfd is None:
            return gone.attr
        fd, layer = gone.dirfd.fd, gone.layer
        st = os.fstat(fd)
        attr = Attr(st, gone.attr.ino)
        own = self.fs.ownership
        if own.active:
            attr = own.show(attr, own.stored_fd(layer, st, fd))
        return attr._replace(nlink=gone.attr.st_nlink)

    def _held(self, gone: GoneDir) -> DirFd:
        if gone.dirfd is None:
            raise OSError(errno.ESTALE, "a removed directory whose fd was not kept (fd bound)")
        return gone.dirfd

    def getxattr(self, gone: GoneDir, name: str) -> bytes:
        self._xattrs_allowed()
        if is_private_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute", name)
        return getxattr_at(f"/proc/self/fd/{self._held(gone).fd}", name)

    def listxattr(self, gone: GoneDir) -> list[str]:
        self._xattrs_allowed()
        return listxattr_at(f"/proc/self/fd/{self._held(gone).fd}")

    def read_real(self, gone: GoneDir, action: "Callable[[int, Layer], T]") -> "T":
        """``action(fd, layer)`` on a new read-only fd of the removed directory's top
        directory (upper or lower), opened through the held one: its flags, for lsattr."""
        held = self._held(gone)
        assert gone.layer is not None
        fd = os.open(f"/proc/self/fd/{held.fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return action(fd, gone.layer)
        finally:
            os.close(fd)

    def change_real(self, gone: GoneDir, action: "Callable[[int, Layer], None]") -> None:
        """``action(fd, layer)`` on the removed upper directory (``_change``): chattr."""
        self._change(gone, action)

    def _xattrs_allowed(self) -> None:
        if self.fs.config.noxattrs:
            raise OSError(errno.ENOTSUP, "extended attributes are off (noxattrs=1)")

    # -- changes (of an upper directory only) ----------------------------------------------------
    def _change(self, gone: GoneDir, action: "Callable[[int, Layer], None]") -> None:
        """``action(fd, layer)`` on a new read-only fd of the removed upper directory,
        opened through the held one's /proc magic link (which reaches it unlinked)."""
        self.fs.require_writable()
        if not gone.upper:
            raise OSError(errno.ESTALE, "a removed lower directory cannot be changed")
        held = self._held(gone)
        assert gone.layer is not None
        fd = os.open(f"/proc/self/fd/{held.fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            action(fd, gone.layer)
        finally:
            os.close(fd)

    def chmod(self, gone: GoneDir, mode: int) -> None:
        own = self.fs.ownership
        self._change(gone, lambda fd, layer: own.chmod_fd(layer, fd, mode))

    def chown(self, gone: GoneDir, uid: int, gid: int) -> None:
        """``uid``/``gid`` shown-side, as the kernel gives them (-1: unchanged)."""
        own = self.fs.ownership
        uid, gid = own.chown_ids(uid, gid)
        self._change(gone, lambda fd, layer: own.chown_fd(layer, fd, uid, gid))

    def utimens(self, gone: GoneDir, times: tuple[int, int] | None) -> None:
        self._change(gone, lambda fd, layer: self.fs.attrs.utime_fd(fd, times))

    def setxattr(self, gone: GoneDir, name: str, value: bytes, flags: int,
                 kill_sgid: bool = False) -> None:
        """``kill_sgid``: an access ACL set by a caller outside the group without
        CAP_FSETID (``Attributes.kill_sgid``)."""
        self._xattrs_allowed()
        if is_private_xattr(name):
            raise OSError(errno.EPERM, "overlay-private attribute", name)

        self._change(gone, lambda fd, layer: setxattr_fd(
            self.fs.ownership, layer, fd, name, value, flags, kill_sgid))

    def removexattr(self, gone: GoneDir, name: str) -> None:
        self._xattrs_allowed()
        if is_private_xattr(name):
            raise OSError(errno.EPERM, "overlay-private attribute", name)
        self._change(gone, lambda fd, layer: os.removexattr(fd, name))
