"""Reading the immutable/append-only flags of overlay objects, for the changes they refuse.

Owns ``Protection``: the flags (``protattr.PROTECTED`` bits) of a lookup's entry, as the
kernel overlay's inode carries them: a lower object's are its real inode's (one ``statx``:
an ``fstatat`` does not report them), an upper object's are what its
``overlay.protattr`` xattr names (``protattr``). An upper object's own real flags are
not read: the upper filesystem refuses the change itself, with the same EPERM.

Cost: nothing on the read path. A change reads the flags of the objects it changes: an
upper regular file's from the xattr names its lookup listed (none: no call), a
directory's once per cached directory fd (``DirFd.prot``; the short paths of a change
in a cached directory read them there too), a lower object's by one ``statx`` (it is
then copied up or whited out, which costs far more); a lower regular file a change copies
up, by none here: its copy-up reads them (``real_all``, once, through the source's fd) and
makes the change's check with them (``CopyUp.ensure_upper``'s ``check``, copyup53).

Caveats: the cached flags of a directory change only through ``set_dir`` (a ``chattr``
through the mount); an upper changed behind the mount's back is not seen while the
directory stays cached (as the kernel's inode flags). A malformed ``protattr`` counts as
none, logged once per object read, as the kernel warns and ignores it.
"""
from __future__ import annotations

import os
import stat

from . import logs, protattr, sysapi
from .layer import UNKNOWN

log = logs.get("overlaypc.protection")


class Protection:
    """The flags of lookup entries (``lookup.Entry``) of a mount whose overlay xattrs are
    named with ``prefix`` (``trusted.overlay.`` or ``user.overlay.``)."""

    def __init__(self, prefix: str) -> None:
        self.xattr = prefix + protattr.XATTR

    def of_node(self, node) -> int:
        """The flags of a lookup's node (0: absent). Inlined here: the common answers, a
        directory's kept flags and an upper regular file without ``protattr`` (every
        namespace change asks, untar's and ``rm -rf``'s of every file)."""
        entries = node.entries
        if not entries:
            return 0
        entry = entries[0]
        dirfd = entry.dirfd
        if dirfd is not None:
            flags = dirfd.prot
            if flags is not UNKNOWN:
                return flags  # type: ignore[return-value]
        elif entry.xattrs is not None and self.xattr not in entry.xattrs and entry.layer.writable:
            return 0
        return self.of_entry(entry)

    def of_copy(self, node, private: tuple[str, ...]) -> int:
        """``of_node`` of a copy this mount just made (a copy-up's, handed over), whose
        overlay-private xattr names are ``private`` (what its copy-up wrote): without
        ``protattr`` none, known without a call."""
        if self.xattr not in private:
            return 0
        return self.of_node(node)

    def known(self, node) -> int:
        """The flags of a lookup's node where known without a system call (a directory's
        read before, an upper regular file whose listed xattr names lack ``protattr``),
        else -1: what a LOOKUP's node starts with (``nodes.Node.prot``)."""
        if not node.entries:
            return -1
        entry = node.entries[0]
        if entry.dirfd is not None:
            flags = entry.dirfd.prot
            return -1 if flags is UNKNOWN else flags  # type: ignore[return-value]
        if entry.layer.writable and entry.lacks(self.xattr):
            return 0
        return -1

    def of_upper_path(self, upper, rel: str) -> int:
        """The flags of the upper object at ``rel`` (known there), its ``protattr`` read
        by path (one ``lgetxattr`` through the held parent fd)."""
        return self._parsed(upper.getxattr_entry(rel, self.xattr), upper, rel)

    def of_upper_fd(self, upper, fd: int) -> int:
        """The flags of the upper object open as ``fd`` (one with no name the mount knows:
        LINK of an open file), its ``protattr`` read through the fd."""
        return self._parsed(upper.getxattr_fd(fd, self.xattr), upper, "(an open file)")

    def of_entry(self, entry) -> int:
        """The flags of one layer's object (the top entry of a node)."""
        dirfd = entry.dirfd
        if dirfd is not None:
            cached = dirfd.prot
            if cached is not UNKNOWN:
                return cached
        flags = self._read(entry)
        if dirfd is not None:
            dirfd.prot = flags
        return flags

    def _read(self, entry) -> int:
        try:
            if entry.layer.writable:
                return self._stored(entry)
            return self._real(entry)
        except OSError as e:
            # gone meanwhile, or a layer that cannot say: the change goes on and fails
            # (or not) as it would have
            log.debug("flags of %s/%s not read: %s", entry.layer.path, entry.rel, e)
            return 0

    def _stored(self, entry) -> int:
        """An upper object's: its ``protattr`` xattr."""
        if entry.lacks(self.xattr):
            return 0
        layer = entry.layer
        if entry.dirfd is not None:
            raw = layer.getxattr_at(entry.dirfd, self.xattr)
        elif entry.parent is not None:
            raw = layer.getxattr_name(entry.parent, entry.name, self.xattr)
        else:
            raw = layer.getxattr(entry.rel, self.xattr)
        return self._parsed(raw, layer, entry.rel)

    def _parsed(self, raw: bytes | None, layer, rel: str) -> int:
        """The flags a ``protattr`` value read from ``layer``'s object at ``rel`` names: 0
        for none, and for a malformed one, warned about and ignored as the kernel does."""
        flags = protattr.parse(raw)
        if flags is None:
            log.warning("incompatible %s of %s/%s (%r): ignored", self.xattr, layer.path, rel,
                        raw[:protattr.MAX_LEN + 1] if raw else raw)
            return 0
        return flags

    @staticmethod
    def _real(entry) -> int:
        """A lower object's: its real inode's, by ``statx``."""
        if not stat.S_ISREG(entry.st.st_mode) and not stat.S_ISDIR(entry.st.st_mode):
            return 0  # (flags are set through an open fd: files and directories only)
        if entry.dirfd is not None:
            return protattr.from_statx(sysapi.statx_attributes(entry.dirfd.fd, ""))
        if entry.parent is not None:
            return protattr.from_statx(sysapi.statx_attributes(entry.parent.fd, entry.name))
        with entry.layer.parent(entry.rel) as (fd, name):
            return protattr.from_statx(sysapi.statx_attributes(fd, name))

    @staticmethod
    def real_fd(fd: int) -> int:
        """The flags of the real object an fd (``O_PATH`` will do) refers to."""
        return protattr.from_statx(sysapi.statx_attributes(fd, ""))

    def real_all(self, entry, fd: int | None = None) -> int:
        """All ``FS_*_FL`` flags of one layer's regular file or directory (a copy-up's
        source): FS_IOC_GETFLAGS through ``fd`` (an ``O_PATH`` one will not do), or through
        an fd opened read-only for it. Where that fails (a filesystem without the ioctl, an
        object the daemon may not open), the immutable/append-only flags as ``of_entry``
        reads them (``statx``): the kernel reads its inode's flags, which it has either way."""
        try:
            if fd is not None:
                return sysapi.get_flags(fd)
            mode = entry.st.st_mode
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC \
                | (os.O_DIRECTORY if stat.S_ISDIR(mode) else 0)
            own = entry.layer.open(entry.rel, flags)
            try:
                return sysapi.get_flags(own)
            finally:
                os.close(own)
        except OSError as e:
            log.debug("flags of %s/%s not asked: %s", entry.layer.path, entry.rel, e)
        if fd is not None:
            return self.real_fd(fd)
        return self.of_entry(entry)


def forget_dir(dirfd) -> None:
    """A cached directory fd whose flags changed: read them again at the next change."""
    if dirfd is not None:
        dirfd.prot = UNKNOWN

