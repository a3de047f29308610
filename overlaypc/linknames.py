"""Names of multiply-linked files, so a change through one name reaches the others.

Owns: a bounded registry from a backing inode ``(st_dev, st_ino)`` to the merged names
seen for it. libfuse's high-level API makes each *name* its own FUSE node with its own
cached attributes and pages (docs/ARCHITECTURE.md §6 trap 9); when one name changes the file (data,
mode, owner, times, xattrs, link count), every other known name is invalidated with
``fuse_invalidate_path``. This is what makes long attribute timeouts safe.

Non-directories of every type (regular files, fifos, sockets, devices, symlinks) with
``st_nlink > 1`` are recorded. Stale names (renamed or unlinked since) are harmless:
invalidating a missing path is a no-op.
"""
from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict


class LinkNames:
    def __init__(self, limit: int = 65536, per_inode: int = 64) -> None:
        # per inode: names in the order last seen (a dict as an ordered set)
        self._names: OrderedDict[tuple[int, int], dict[str, None]] = OrderedDict()
        self._limit = limit
        self._per_inode = per_inode
        self._lock = threading.Lock()

    @staticmethod
    def key(st: os.stat_result) -> tuple[int, int] | None:
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            return (st.st_dev, st.st_ino)
        return None

    def _add(self, key: tuple[int, int], rels) -> None:
        """Record ``rels`` for ``key`` as the most recent names (lock held): the oldest
        names and inodes go first, so stale names never crowd out a live one."""
        names = self._names.get(key)
        if names is None:
            names = self._names[key] = {}
            if len(self._names) > self._limit:
                self._names.popitem(last=False)
        else:
            self._names.move_to_end(key)
        for rel in rels:
            names.pop(rel, None)
            names[rel] = None
            if len(names) > self._per_inode:
                del names[next(iter(names))]

    def note(self, st: os.stat_result, rel: str) -> None:
        key = self.key(st)
        if key is not None:
            with self._lock:
                self._add(key, (rel,))

    def alias(self, old: os.stat_result, new: os.stat_result) -> None:
        """Names recorded for ``old`` (a copied-up lower file) now also belong to ``new``."""
        old_key, new_key = self.key(old), self.key(new)
        if old_key is None or new_key is None or old_key == new_key:
            return
        with self._lock:
            names = self._names.get(old_key)
            if names:
                self._add(new_key, list(names))

    def others(self, backing: tuple[int, int], rel: str | None) -> list[str]:
        with self._lock:
            return [n for n in self._names.get(backing, ()) if n != rel]
