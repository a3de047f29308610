"""``chattr``/``lsattr`` through the mount: file attribute flags, as the kernel overlay's
``ovl_fileattr_get``/``ovl_fileattr_set``.

Owns: the answers to FS_IOC_GETFLAGS/SETFLAGS and FS_IOC_FSGETXATTR/FSSETXATTR (the
kernel's FUSE sends them as FUSE_IOCTL, on regular files and directories, after its VFS
checked the caller: the owner or CAP_FOWNER, and CAP_LINUX_IMMUTABLE to change the
immutable or append-only flag). A get reads the real top object's flags and adds the
overlay's immutable/append-only ones (``protection``). A set copies the object up (its
metadata only under metacopy=on, as the kernel's ``ovl_copy_up``), puts
immutable/append-only in the upper's ``overlay.protattr`` (``protattr``; removed when
both are cleared) and the other flags on the real upper object itself, in that order; an
xattr the upper cannot hold refuses the set (EPERM, as the kernel's
``ovl_check_setxattr``).

An object with no name left (an open file unlinked, a removed directory the kernel still
holds) is answered from the real object the mount keeps open for it (``*_fd``: an fd of it
and its layer, as ``files``/``nameless`` reach it), as the kernel overlay answers from the
real file its open file keeps: its flags, and in the upper its ``protattr``; a set goes
to an upper one (a lower one cannot be copied up without a name: EEXIST, ``files``).

Caveats: the real object is opened to be asked (``O_NOATIME`` where allowed); flags the
upper filesystem does not know fail there (EOPNOTSUPP), as on the kernel overlay.
"""
from __future__ import annotations

import errno
import os
import stat

from . import protattr, sysapi
from .protection import forget_dir
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from .core import OverlayFS
    from .layer import Layer
    from .lookup import Entry


def _open_real(entry: "Entry") -> int:
    """A read-only fd of a real regular file or directory, to ask or set its flags."""
    mode = entry.st.st_mode
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise OSError(errno.ENOTTY, "flags of a regular file or directory only", entry.rel)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC \
        | (os.O_DIRECTORY if stat.S_ISDIR(mode) else 0)
    try:
        return entry.layer.open(entry.rel, flags | os.O_NOATIME)
    except PermissionError:  # (O_NOATIME: the owner or CAP_FOWNER only)
        return entry.layer.open(entry.rel, flags)


def _on_real(entry: "Entry", call, *args):
    """``call(fd, *args)`` on the real object (``_open_real``), its fd closed after."""
    fd = _open_real(entry)
    try:
        return call(fd, *args)
    finally:
        os.close(fd)


class FileAttrs:
    def __init__(self, fs: "OverlayFS") -> None:
        self.fs = fs

    def _top(self, rel: str):
        node = self.fs.lookup.lookup(rel)
        if not node.exists:
            raise OSError(errno.ENOENT, "no such file", rel)
        return node

    def get_flags(self, rel: str) -> int:
        """FS_IOC_GETFLAGS: the real top object's flags and the overlay's."""
        node = self._top(rel)
        return _on_real(node.top, sysapi.get_flags) | self.fs.protection.of_node(node)

    def get_fsxattr(self, rel: str) -> bytes:
        """FS_IOC_FSGETXATTR: the real top object's ``struct fsxattr``, its ``fsx_xflags``
        with the overlay's immutable/append-only."""
        node = self._top(rel)
        xflags, *rest = sysapi.FSXATTR.unpack(_on_real(node.top, sysapi.fsgetxattr))
        xflags |= protattr.to_xflags(self.fs.protection.of_node(node))
        return sysapi.FSXATTR.pack(xflags, *rest)

    def set_flags(self, rel: str, flags: int) -> int:
        """FS_IOC_SETFLAGS; returns the enforced flags now (``protattr.PROTECTED`` bits)."""
        entry, prot = self._set_protected(rel, flags & protattr.PROTECTED)
        _on_real(entry, sysapi.set_flags, flags & ~protattr.PROTECTED)
        return prot

    def set_fsxattr(self, rel: str, raw: bytes) -> int:
        """FS_IOC_FSSETXATTR (``raw``: a ``struct fsxattr``), as ``set_flags``."""
        xflags, *rest = sysapi.FSXATTR.unpack(raw)
        entry, prot = self._set_protected(rel, protattr.from_xflags(xflags))
        _on_real(entry, sysapi.fssetxattr, sysapi.FSXATTR.pack(xflags & ~protattr.XFLAGS_PROTECTED, *rest))
        return prot

    # -- through an fd of the real object (an object with no name left) ------------------
    def _stored(self, fd: int, layer: "Layer") -> int:
        """The overlay's immutable/append-only flags of the real object open as ``fd``:
        what its ``protattr`` names in the upper; none in a lower layer (its real flags
        are those). As ``Protection.of_upper_fd`` reads it (a malformed value warned about
        and counted as none)."""
        return self.fs.protection.of_upper_fd(layer, fd) if layer.writable else 0

    def get_flags_fd(self, fd: int, layer: "Layer") -> int:
        """``get_flags`` of the real object open as ``fd``."""
        return sysapi.get_flags(fd) | self._stored(fd, layer)

    def get_fsxattr_fd(self, fd: int, layer: "Layer") -> bytes:
        """``get_fsxattr`` of the real object open as ``fd``."""
        xflags, *rest = sysapi.FSXATTR.unpack(sysapi.fsgetxattr(fd))
        return sysapi.FSXATTR.pack(xflags | protattr.to_xflags(self._stored(fd, layer)), *rest)

    def set_flags_fd(self, flags: int) -> "Callable[[int, Layer], None]":
        """``set_flags`` on the real upper object an fd is open on (``act(fd, layer)``)."""
        def act(fd: int, layer: "Layer") -> None:
            self._protect_fd(fd, layer, flags & protattr.PROTECTED)
            sysapi.set_flags(fd, flags & ~protattr.PROTECTED)
        return act

    def set_fsxattr_fd(self, raw: bytes) -> "Callable[[int, Layer], None]":
        """``set_fsxattr`` on the real upper object an fd is open on."""
        xflags, *rest = sysapi.FSXATTR.unpack(raw)

        def act(fd: int, layer: "Layer") -> None:
            self._protect_fd(fd, layer, protattr.from_xflags(xflags))
            sysapi.fssetxattr(fd, sysapi.FSXATTR.pack(xflags & ~protattr.XFLAGS_PROTECTED, *rest))
        return act

    def _protect_fd(self, fd: int, layer: "Layer", prot: int) -> None:
        """``_set_protected``'s write or removal of ``protattr``, through ``fd``."""
        name = self.fs.protection.xattr
        if prot:
            try:
                layer.do_fsetxattr(fd, "(no name left)", name, protattr.value_of(prot))
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
                    raise OSError(errno.EPERM, "the upper cannot hold overlay xattrs") from None
                raise
        elif self._stored(fd, layer):
            os.removexattr(fd, name)

    def _set_protected(self, rel: str, prot: int) -> tuple["Entry", int]:
        """Copy ``rel`` up (under ``OverlayOps._at_node``: ``CopyUpFirst``), then write
        or remove its ``protattr``; the upper entry and ``prot``."""
        fs = self.fs
        fs.require_writable()
        assert fs.copyup is not None and fs.stack.upper is not None
        fs.copyup.ensure_upper(rel, metadata_only=True)  # (under metacopy=on, as the kernel's)
        node = self._top(rel)
        entry = node.upper
        if entry is None:
            raise OSError(errno.EIO, "no upper copy after a copy-up", rel)
        if not stat.S_ISREG(entry.st.st_mode) and not stat.S_ISDIR(entry.st.st_mode):
            raise OSError(errno.ENOTTY, "flags of a regular file or directory only", rel)
        upper, name = fs.stack.upper, fs.protection.xattr
        if prot:
            try:
                upper.do_setxattr(entry.rel, name, protattr.value_of(prot))
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
                    raise OSError(errno.EPERM, "the upper cannot hold overlay xattrs", rel) from None
                raise
        elif fs.protection.of_node(node):
            try:
                upper.do_removexattr(entry.rel, name)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
        if entry.dirfd is not None:
            forget_dir(entry.dirfd)
        if node.is_dir:
            forget_dir(fs.lookup.directory(rel).entries[0].dirfd)
        return entry, prot
