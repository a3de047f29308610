"""Names of multiply-linked files, so a change through one name reaches the others.

Owns: a bounded registry from a backing inode ``(st_dev, st_ino)`` to the merged names
seen for it. libfuse's high-level API makes each *name* its own FUSE node with its own
cached attributes and pages (DESIGN.md §6 trap 9); when one name changes the file (data,
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
        self._names: OrderedDict[tuple[int, int], set[str]] = OrderedDict()
        self._limit = limit
        self._per_inode = per_inode
        self._lock = threading.Lock()

    @staticmethod
    def key(st: os.stat_result) -> tuple[int, int] | None:
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            return (st.st_dev, st.st_ino)
        return None

    def note(self, st: os.stat_result, rel: str) -> None:
        key = self.key(st)
        if key is None:
            return
        with self._lock:
            names = self._names.get(key)
            if names is None:
                names = self._names[key] = set()
                if len(self._names) > self._limit:
                    self._names.popitem(last=False)
            if len(names) < self._per_inode:
                names.add(rel)

    def alias(self, old: os.stat_result, new: os.stat_result) -> None:
        """Names recorded for ``old`` (a copied-up lower file) now also belong to ``new``."""
        old_key, new_key = self.key(old), self.key(new)
        if old_key is None or new_key is None or old_key == new_key:
            return
        with self._lock:
            names = self._names.get(old_key)
            if names:
                merged = self._names.setdefault(new_key, set())
                merged.update(list(names)[: self._per_inode - len(merged)])

    def others(self, backing: tuple[int, int], rel: str | None) -> list[str]:
        with self._lock:
            return [n for n in self._names.get(backing, ()) if n != rel]
