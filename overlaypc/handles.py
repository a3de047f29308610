"""Open-file handles that follow their inode across copy-up.

Owns: the ``fh`` table and ``Handle.fd()``, the single place where a handle gets a
real fd. Nothing binds a backing fd for good at open time: each read, write, fsync,
fstat, fallocate and flush calls ``fd()``, which reopens on the inode's current
backing when its generation moved since the handle's fd was opened.

A copy-up switches each open handle of the inode to the new backing right away
(``offer``), while the new path is known to be right; a handle it could not switch (its
reopen failed) reopens through ``OverlayInode.open_backing`` at its next I/O.

``-o handles=bind-at-open`` turns the check off, reproducing the classic stale-read
bug on purpose (for the demo and for tests that prove the fix).

A switch puts the new file at the handle's own fd number (``dup2``): another thread may
still be in a ``pread`` on the old file, which finishes on it, and the number is never
free meanwhile; so a handle holds one fd, however many copy-ups it follows (it kept each
replaced fd until its release: at the fd limit, ``ulimit -n 1024``, 900 open files whose
names were renamed, so copied up, ran the daemon out of fds: hunt7).
"""
from __future__ import annotations

import errno
import itertools
import os
import threading

from .inodes import OverlayInode
from .layer import moved
from .records import field, record
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    T = TypeVar("T")

#: Flags that only mean something at creation, never on a reopen.
_CREATION_FLAGS = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY


@record(eq=False)
class Handle:
    fh: int
    inode: OverlayInode
    flags: int
    path: str
    #: the fd the handle reads through, and the generation of the backing it is on. Read
    #: without the lock by the read fast path (``Files.readinto``); a switch keeps the fd
    #: number (``_switch``) and stores the generation after the new file is behind it, so
    #: a matching generation is never seen with the older file.
    bound_fd: int
    bound_generation: int
    follow: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: set by ``close``, under ``_lock`` (see ``with_fd``)
    closed: bool = False

    @property
    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) != os.O_RDONLY

    def fd(self) -> tuple[int, bool]:
        """The real fd for the next I/O, and whether it had to switch backing."""
        if not self.follow or self.bound_generation == self.inode.generation:
            return self.bound_fd, False
        with self._lock:
            if self.closed:  # (a request by node that found it open: a switch would leak)
                raise OSError(errno.EBADF, "handle closed")
            if self.bound_generation == self.inode.generation:
                return self.bound_fd, False
            self._switch(*self.inode.open_backing(self.flags & ~_CREATION_FLAGS))
            return self.bound_fd, True

    def offer(self) -> bool:
        """A copy-up rebound the inode: switch to the new backing now, while its path is
        known to be right (else at the next I/O). True if it switched."""
        if not self.follow:
            return False
        try:
            fd, gen = self.inode.open_backing(self.flags & ~_CREATION_FLAGS)
        except OSError:
            return False  # reopened at the next I/O instead
        with self._lock:
            if self.closed or self.bound_generation >= gen:
                os.close(fd)
                return False
            self._switch(fd, gen)
            return True

    def _switch(self, fd: int, generation: int) -> None:
        """Put the new backing ``fd`` at the handle's fd number, then take its generation
        (lock held). ``dup2`` replaces the file behind the number at once: a read in flight
        on the old file finishes on it (it holds its own reference), one after reads the
        new one, and the number is never free for another open to take meanwhile; so the
        handle keeps one fd whatever number of copy-ups it follows."""
        try:
            os.dup2(fd, self.bound_fd, inheritable=False)
        finally:
            os.close(fd)
        self.bound_generation = generation

    def current_fd(self) -> int:
        """The fd as it is, without following a copy-up (fstat of a nameless file)."""
        return self.bound_fd

    def with_fd(self, action: Callable[[int], T], current: bool = True) -> T | None:
        """``action(fd)`` on the handle's fd, for a request other than the ones the kernel
        sends with this handle (a SETATTR or GETXATTR by node, whose handle's RELEASE may
        run meanwhile): held against ``close``, so the fd number is never one reused by
        another open. None, nothing run, when the handle is closed or (``current``) its fd
        is not on the inode's current backing (it does not switch here)."""
        with self._lock:
            if self.closed or current and self.bound_generation != self.inode.generation:
                return None
            return action(self.bound_fd)

    def with_fd_call(self, action: Callable[..., T], *args) -> T | None:
        """``with_fd`` (current backing) of ``action(fd, *args)``: no closure is made (the
        short SETATTR of an open file, three per file of an untar)."""
        with self._lock:
            if self.closed or self.bound_generation != self.inode.generation:
                return None
            return action(self.bound_fd, *args)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            os.close(self.bound_fd)


class HandleTable:
    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next = itertools.count(1)
        self._lock = threading.Lock()
        #: fh -> Handle, or None (the read fast path's lookup: no method in between)
        self.find = self._handles.get

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

    def renamed(self, old: str, new: str) -> None:
        """Names moved: each handle keeps the name it was opened by current (for messages)."""
        with self._lock:
            for handle in self._handles.values():
                path = moved(handle.path, old, new)
                if path is not None:
                    handle.path = path

    def for_inode(self, inode: OverlayInode) -> list[Handle]:
        with self._lock:
            return [h for h in self._handles.values() if h.inode is inode]

    def __len__(self) -> int:
        return len(self._handles)
