"""Overlay inode numbers for merged objects (DESIGN.md §4).

Owns: ``ino_of(node)``. Rules, mirroring the kernel's:
  * a copied-up object carries ``trusted.overlaypc.ino`` (written by copy-up) and keeps
    the number it had on the lower layer, so copy-up and remount change nothing;
  * a directory present in upper and a lower without that xattr takes the topmost
    lower's number (directories made by the kernel's overlay);
  * anything else takes its own layer's real inode number;
  * each real number is mapped through the stack's ``xino`` scheme, so layers on
    different filesystems never collide.
Reading the xattr costs a syscall; results are cached by (dev, ino, ctime), which
changes whenever the object does, so a reused inode number can never hit a stale entry.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from .lookup import Entry, Node
from .stack import Xino


class InodeNumbers:
    def __init__(self, xino: Xino, xattr_name: str, limit: int = 65536) -> None:
        self.xino = xino
        self.xattr = xattr_name
        self._cache: OrderedDict[tuple[int, int, int], int | None] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def recorded(self, entry: Entry) -> int | None:
        """The number recorded on an upper object at copy-up, if any."""
        st = entry.st
        key = (st.st_dev, st.st_ino, st.st_ctime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        raw = entry.layer.getxattr(entry.rel, self.xattr)
        value = int(raw) if raw and raw.isdigit() else None
        with self._lock:
            self._cache[key] = value
            if len(self._cache) > self._limit:
                self._cache.popitem(last=False)
        return value

    def of_entry(self, entry: Entry) -> int:
        return self.xino.ino(entry.st.st_dev, entry.st.st_ino)

    def ino_of(self, node: Node, lower_dir: Entry | None = None) -> int:
        """``st_ino`` of ``node``; ``lower_dir`` stands in for ``node.lowers[0]`` when known."""
        top = node.top
        if top.layer.writable:
            recorded = self.recorded(top)
            if recorded is not None:
                return recorded
            if top.is_dir:
                lower = lower_dir or next(iter(node.lowers), None)
                if lower is not None:
                    return self.of_entry(lower)
        return self.of_entry(top)
