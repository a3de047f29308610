"""Open files: open/create, read, write, fsync, flush, fallocate, fstat, ftruncate, release.

Owns: the per-open-file flow. Opening for write (or with O_TRUNC) copies a lower file
up first; every later I/O asks its ``Handle`` for the real fd, which follows the inode
to its current backing (see ``handles``). In ``cache=kernel`` mode an open keeps the
kernel's page cache (``keep_cache``) only while the inode's data version is the one this
name's FUSE node last saw; a write through one name invalidates the cache of the
inode's other names (hard links are separate FUSE nodes: DESIGN.md §6 trap 9).
In ``cache=shared`` mode every open is ``direct_io``.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import sysapi
from .attrs import stat_dict
from .handles import Handle
from .inodes import OverlayInode
from .namespace import Caller

if TYPE_CHECKING:
    from .core import OverlayFS

_WRITE_INTENT = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


@dataclass(frozen=True)
class OpenResult:
    fh: int
    keep_cache: bool
    direct_io: bool


class Files:
    def __init__(self, fs: "OverlayFS") -> None:
        self.fs = fs

    def open(self, rel: str, flags: int) -> OpenResult:
        fs = self.fs
        node = fs.lookup.lookup(rel)
        if not node.exists:
            raise OSError(errno.ENOENT, "no such file", rel)
        if flags & _WRITE_INTENT:
            fs.require_writable()
            if node.is_dir:
                raise OSError(errno.EISDIR, "is a directory", rel)
            if node.upper is None:
                fs.copyup.ensure_upper(rel)
                node = fs.lookup.lookup(rel)
        inode = fs.inodes.acquire(fs.inos.ino_of(node), node.top)
        try:
            fd, generation = inode.reopen(flags & ~(os.O_CREAT | os.O_EXCL))
        except BaseException:
            fs.inodes.release(inode)
            raise
        return self._register(inode, flags, rel, fd, generation)

    def create(self, rel: str, flags: int, mode: int, caller: Caller) -> OpenResult:
        fs = self.fs
        fd = fs.namespace.create(rel, flags, mode, caller)
        try:
            node = fs.lookup.lookup(rel)
            inode = fs.inodes.acquire(fs.inos.ino_of(node), node.top)
        except BaseException:
            os.close(fd)
            raise
        fs.inodes.forget_version(inode.ino)
        return self._register(inode, flags, rel, fd, inode.generation)

    def _register(self, inode: OverlayInode, flags: int, rel: str, fd: int, generation: int) -> OpenResult:
        fs = self.fs
        handle = fs.handles.add(inode, flags, rel, fd, generation, follow=fs.config.handles == "reopen")
        keep = fs.config.cache == "kernel" and inode.seen.get(rel) == inode.data_version
        if flags & os.O_TRUNC:
            keep = False
            self.changed(handle)
        inode.seen[rel] = inode.data_version
        return OpenResult(handle.fh, keep, fs.config.cache == "shared")

    # -- I/O ------------------------------------------------------------------------------------
    def _fd(self, handle: Handle) -> int:
        fd, switched = handle.fd()
        if switched:
            self.fs.stats.add("handle_switches")
        return fd

    def read(self, fh: int, size: int, offset: int) -> bytes:
        handle = self.fs.handles.get(fh)
        data = os.pread(self._fd(handle), size, offset)
        self.fs.stats.served(len(data), (handle.inode.layer.index, handle.inode.ino))
        return data

    def readinto(self, fh: int, buf: memoryview, offset: int) -> int:
        handle = self.fs.handles.get(fh)
        n = os.preadv(self._fd(handle), [buf], offset)
        self.fs.stats.served(n, (handle.inode.layer.index, handle.inode.ino))
        return n

    def write(self, fh: int, data: bytes, offset: int) -> int:
        handle = self.fs.handles.get(fh)
        n = os.pwrite(self._fd(handle), data, offset)
        self.fs.stats.add("bytes_written", n)
        self.changed(handle)
        return n

    def changed(self, handle: Handle) -> None:
        self.fs.data_changed(handle.inode, handle.path)

    def truncate(self, fh: int, length: int) -> None:
        handle = self.fs.handles.get(fh)
        os.ftruncate(self._fd(handle), length)
        self.changed(handle)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        handle = self.fs.handles.get(fh)
        sysapi.fallocate(self._fd(handle), mode, offset, length)
        self.changed(handle)

    def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._fd(self.fs.handles.get(fh))
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def flush(self, fh: int) -> None:
        self._fd(self.fs.handles.get(fh))

    def getattr(self, fh: int) -> dict:
        handle = self.fs.handles.get(fh)
        st = os.fstat(self._fd(handle))
        nlink = 0 if handle.inode.unlinked and not handle.inode.in_upper else None
        return stat_dict(st, handle.inode.ino, nlink)

    def release(self, fh: int) -> None:
        handle = self.fs.handles.pop(fh)
        handle.close()
        self.fs.inodes.release(handle.inode)
