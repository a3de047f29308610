"""Overlay inodes: stable identity and *current* backing of each open object.

Owns: the table from overlay ``st_ino`` to ``OverlayInode``. An overlay inode holds an
``O_PATH`` fd of its current backing object and a ``generation`` that copy-up bumps;
open handles compare generations at every I/O and reopen through that fd when it moved
(DESIGN.md §4, the kernel's ``ovl_real_fdget``). Reopening through the ``O_PATH`` fd
(``/proc/self/fd/N``) needs no path, so it survives renames and unlinks of the file.

Lifetime (the high-level FUSE API has no ``forget``): an entry lives while a handle
holds it; released entries keep only their data version, in an LRU of at most
``retain`` entries, so ``keep_cache`` can be granted again on the next open. Evicting
one is always safe: a missing entry means "grant no keep_cache".
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from .layer import Layer
from .lookup import Entry


@dataclass(eq=False)
class OverlayInode:
    ino: int
    layer: Layer
    rel: str
    path_fd: int
    generation: int = 0
    refs: int = 0
    data_version: int = 0
    unlinked: bool = False
    #: merged path of a metacopy file whose data is read from below
    meta_rel: str | None = None
    #: extent mapping of the current backing for page-cache sharing: None = not mapped
    #: yet; ``sharing.NOT_SHARED`` = mapped, nothing shared (the fast path)
    extents: object = None
    extents_epoch: int = 0
    #: data changes in flight (``sharing.changing``): no mapping is stored meanwhile
    extents_busy: int = 0
    #: merged path -> data version the kernel's page cache of that FUSE node holds
    seen: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def backing(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the current backing object."""
        return self._backing

    def __post_init__(self) -> None:
        st = os.fstat(self.path_fd)
        self._backing = (st.st_dev, st.st_ino)

    @property
    def in_upper(self) -> bool:
        return self.layer.writable

    def rebind(self, entry: Entry) -> None:
        """Point at a new backing (after copy-up); open handles reopen on next I/O."""
        new_fd = entry.layer.path_fd(entry.rel)
        st = os.fstat(new_fd)
        with self.lock:
            self._backing = (st.st_dev, st.st_ino)
            old = self.path_fd
            self.layer, self.rel, self.path_fd = entry.layer, entry.rel, new_fd
            self.generation += 1
            self.extents = None
            self.extents_epoch += 1
        os.close(old)

    def moved(self, rel: str) -> None:
        self.rel = rel

    def reopen(self, flags: int) -> tuple[int, int]:
        """A new fd on the current backing and the generation it belongs to."""
        with self.lock:
            gen, fd = self.generation, self.path_fd
            # O_NOFOLLOW would refuse the magic link itself; the backing is never a symlink
            flags &= ~(os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL)
            return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC), gen


class InodeTable:
    def __init__(self, retain: int = 4096) -> None:
        self._live: dict[int, OverlayInode] = {}
        self._versions: OrderedDict[int, tuple[int, dict[str, int]]] = OrderedDict()
        self._retain = retain
        self._lock = threading.Lock()

    def get(self, ino: int) -> OverlayInode | None:
        return self._live.get(ino)

    def acquire(self, ino: int, entry: Entry) -> OverlayInode:
        """Take a reference on the inode ``ino``, creating it on ``entry`` if new."""
        with self._lock:
            inode = self._live.get(ino)
            if inode is None:
                inode = OverlayInode(ino, entry.layer, entry.rel, entry.layer.path_fd(entry.rel))
                kept = self._versions.pop(ino, None)
                if kept is not None:
                    inode.data_version, inode.seen = kept[0], kept[1]
                self._live[ino] = inode
            inode.refs += 1
            return inode

    def hold(self, inode: OverlayInode) -> bool:
        """One more reference on a live inode (a hidden name of an open, unlinked file);
        False if its last reference went meanwhile."""
        with self._lock:
            if self._live.get(inode.ino) is not inode:
                return False
            inode.refs += 1
            return True

    def release(self, inode: OverlayInode) -> None:
        with self._lock:
            inode.refs -= 1
            if inode.refs > 0:
                return
            del self._live[inode.ino]
            self._versions[inode.ino] = (inode.data_version, inode.seen)
            if len(self._versions) > self._retain:
                self._versions.popitem(last=False)
        os.close(inode.path_fd)

    def forget_version(self, ino: int) -> None:
        with self._lock:
            self._versions.pop(ino, None)

    def live(self) -> list[OverlayInode]:
        with self._lock:
            return list(self._live.values())

    def __len__(self) -> int:
        return len(self._live)
