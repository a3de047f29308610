"""The names in lower-layer directories, read once per directory.

Owns ``LowerNames``: for a directory of a read-only layer, the set of its entry names, so
a lookup answers "NAME is absent from this layer", "``.wh.NAME`` is absent" and
"``.wh..wh..opq`` is absent" by set membership instead of one ``fstatat`` each. A name
that *is* in the set is still ``fstatat``-ed by the caller (fresh stat data, and a mount
point of another filesystem counts as absent, as ``Layer.stat_at`` says), so a set never
makes anything appear that a stat would not show.

Where the names come from: a merged listing that read the directory anyway
(``offer``, no extra system call), or a lookup that found a name absent in a layer and
would otherwise ask for ``.wh.NAME`` too (``fill``: one ``getdents`` pass).

Caveats: lower layers must not change under a live mount (``layer.py``); this cache
relies on it: a name added to a lower directory behind the mount's back stays invisible
in directories already read (as it may with the kernel's overlay). Writable layers (the
upper, the workdir) are never held: they change through the mount.

Bound: at most ``max_names`` names in all, least recently used directories dropped first;
a directory with more than ``max_dir`` names is not held (its lookups use ``fstatat``) and
is remembered as too big (counted as one name), so it is not read again.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from .layer import DirFd, Layer

#: names held in all (9 MiB with tracemalloc at the bound, for 20-byte names)
MAX_NAMES = 65536
#: names of one directory; a bigger one is looked up with ``fstatat`` per name
MAX_DIR = 4096


class _TooBig:
    """The marker of a directory with more than ``max_dir`` names."""
    __slots__ = ()


TOO_BIG = _TooBig()


def _weight(names: frozenset[str] | _TooBig) -> int:
    """What a held directory counts against ``max_names`` (at least 1)."""
    return 1 if names is TOO_BIG else max(1, len(names))  # type: ignore[arg-type]


class LowerNames:
    def __init__(self, max_names: int = MAX_NAMES, max_dir: int = MAX_DIR) -> None:
        self.max_names = max_names
        self.max_dir = max_dir
        #: (layer index, directory path in the layer) -> its names, or TOO_BIG
        self._dirs: OrderedDict[tuple[int, str], frozenset[str] | _TooBig] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()

    @property
    def names_held(self) -> int:
        return self._count

    def __len__(self) -> int:
        return len(self._dirs)

    def known(self, layer: Layer, rel: str) -> frozenset[str] | None:
        """The names of directory ``rel`` of ``layer`` if held (None: unknown, too big, or
        a writable layer)."""
        if layer.writable:
            return None
        key = (layer.index, rel)
        with self._lock:
            names = self._dirs.get(key)
            if names is None:
                return None
            self._dirs.move_to_end(key)
        return None if names is TOO_BIG else names  # type: ignore[return-value]

    def fill(self, layer: Layer, rel: str, dirfd: DirFd) -> frozenset[str] | None:
        """The names of directory ``rel`` of ``layer`` (open as ``dirfd``), read now if not
        held; None for a writable layer, a directory too big to hold, or one that cannot
        be read (the caller then uses ``fstatat``)."""
        if layer.writable:
            return None
        key = (layer.index, rel)
        with self._lock:
            names = self._dirs.get(key)
            if names is not None:
                self._dirs.move_to_end(key)
                return None if names is TOO_BIG else names  # type: ignore[return-value]
        try:
            listed = layer.names_at(dirfd, self.max_dir)
        except OSError:
            return None  # e.g. no read permission: fstatat still works
        self._put(key, TOO_BIG if listed is None else frozenset(listed))
        return None if listed is None else self.known(layer, rel)

    def offer(self, layer: Layer, rel: str, names: list[str]) -> None:
        """All the names of directory ``rel`` of ``layer``, as a listing just read them."""
        if layer.writable:
            return
        key = (layer.index, rel)
        with self._lock:
            if key in self._dirs:
                self._dirs.move_to_end(key)
                return
        self._put(key, TOO_BIG if len(names) > self.max_dir else frozenset(names))

    def _put(self, key: tuple[int, str], names: frozenset[str] | _TooBig) -> None:
        with self._lock:
            old = self._dirs.pop(key, None)
            if old is not None:
                self._count -= _weight(old)
            self._dirs[key] = names
            self._count += _weight(names)
            while self._count > self.max_names and self._dirs:
                self._count -= _weight(self._dirs.popitem(last=False)[1])

    def clear(self) -> None:
        with self._lock:
            self._dirs.clear()
            self._count = 0
