"""Open-file handles that follow their inode across copy-up.

Owns: the ``fh`` table and ``Handle.fd()``, the single place where a handle gets a
real fd. Nothing binds a backing fd for good at open time: each read, write, fsync,
fstat, fallocate and flush calls ``fd()``, which reopens on the inode's current
backing when its generation moved since the handle's fd was opened.

``-o handles=bind-at-open`` turns the check off, reproducing the classic stale-read
bug on purpose (for the demo and for tests that prove the fix).

Caveats: a replaced fd is closed only at release, because another thread may still be
in a ``pread`` on it; that is at most one extra fd per copy-up of an open file.
"""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field

from .inodes import OverlayInode

#: Flags that only mean something at creation, never on a reopen.
_CREATION_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


@dataclass(eq=False)
class Handle:
    fh: int
    inode: OverlayInode
    flags: int
    path: str
    _fd: int
    _generation: int
    follow: bool = True
    _retired: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) != os.O_RDONLY

    def fd(self) -> tuple[int, bool]:
        """The real fd for the next I/O, and whether it had to switch backing."""
        if not self.follow or self._generation == self.inode.generation:
            return self._fd, False
        with self._lock:
            if self._generation == self.inode.generation:
                return self._fd, False
            fd, gen = self.inode.reopen(self.flags & ~_CREATION_FLAGS)
            self._retired.append(self._fd)
            self._fd, self._generation = fd, gen
            return fd, True

    def close(self) -> None:
        for fd in [self._fd, *self._retired]:
            os.close(fd)
        self._retired.clear()


class HandleTable:
    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, inode: OverlayInode, flags: int, path: str, fd: int, generation: int,
            follow: bool) -> Handle:
        with self._lock:
            fh = next(self._next)
            handle = Handle(fh, inode, flags, path, fd, generation, follow)
            self._handles[fh] = handle
            return handle

    def get(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise OSError(9, "bad file handle")  # EBADF
        return handle

    def pop(self, fh: int) -> Handle:
        with self._lock:
            return self._handles.pop(fh)

    def for_inode(self, inode: OverlayInode) -> list[Handle]:
        with self._lock:
            return [h for h in self._handles.values() if h.inode is inode]

    def __len__(self) -> int:
        return len(self._handles)
