"""The xattr names of lower regular files, listed once.

Owns ``LowerXattrs``: what ``llistxattr`` gave for a regular file of a read-only layer, by
(``st_dev``, ``st_ino``, ``st_ctime_ns``) of the stat the lookup just read, so that the
lookups after the first (every LOOKUP and GETATTR of a lower file reads its names: the
metacopy mark, and which xattrs a GETXATTR may answer ENODATA for without a call) cost no
``llistxattr`` (~3.3 us through ``/proc/self/fd/N/NAME``).

Caveats: lower layers must not change under a live mount (``layer.py``); one that does
anyway changes the file's ctime with any xattr change, so a kept list is not used again
(unless two changes fall within one ctime tick). Never for writable layers: the upper
changes through the mount, and ctime is too coarse to tell two changes apart.

Bound: at most ``MAX_FILES`` files, least recently used dropped first (2.3 MiB measured with
tracemalloc at the bound, ``tests/test_kept_lookups.py``).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

from .layer import DirFd, Layer

#: files whose names are kept
MAX_FILES = 16384
_NONE: frozenset[str] = frozenset()


class LowerXattrs:
    def __init__(self, max_files: int = MAX_FILES) -> None:
        self.max_files = max_files
        self._names: OrderedDict[tuple[int, int, int], frozenset[str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._names)

    def of(self, layer: Layer, parent: DirFd, name: str, st: os.stat_result) -> frozenset[str] | None:
        """The xattr names of regular file ``name`` in the open directory ``parent`` of the
        read-only ``layer``, whose stat was just read (``st``); None when they cannot be
        listed (``Layer.xattr_names_at``), which is not kept."""
        key = (st.st_dev, st.st_ino, st.st_ctime_ns)
        names = self._names
        with self._lock:
            found = names.get(key)
            if found is not None:
                names.move_to_end(key)
                return found
        found = layer.xattr_names_at(parent, name)
        if found is not None:
            if not found:
                found = _NONE  # (the common case: one set for all, not ~200 bytes each)
            with self._lock:
                names[key] = found
                if len(names) > self.max_files:
                    names.popitem(last=False)
        return found
