"""Page-cache sharing for reflinked data: one canonical copy per physical extent.

Owns: the extent map (DESIGN.md §5). Files whose extents FIEMAP reports as shared are
read, for those ranges, from one *canonical* file that references the same physical
blocks, so the kernel caches those pages once — for reflinked lower trees and for
upper files made by a reflink copy-up, until written.

Rules that keep it from ever serving wrong data:
  * the map is keyed by ``(st_dev, physical offset)``: offsets repeat across filesystems;
  * only plain extents (flags within SHARED|LAST|MERGED) are used;
  * canonical sources are read-only lower files, whose data never changes;
  * upper files are mapped with ``FIEMAP_FLAG_SYNC`` (XFS keeps a COW-fork write in the
    page cache while the data fork still points at the shared extent), and a write
    through the mount drops the written range from the file's map *before* it is
    written, so no later read can be redirected over it; truncate, fallocate and
    O_APPEND writes drop the file's whole map;
  * canonical intervals never overlap: the first lower file seen for an extent (or the
    copy-up origin of an upper file) owns it; FIEMAP's merged extents are handled by
    interval containment, so partial sharing is served piece by piece;
  * a read never returns bytes past the referencing file's own size.

Bounds: at most ``limit`` canonical intervals (the map is dropped and rebuilt lazily
when full), ``max_fds`` open canonical files (LRU), and ``LOWER_MAPS`` remembered
mappings of lower files (LRU; lower data never changes through the mount).
"""
from __future__ import annotations

import bisect
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from .extents import Extent, fiemap
from .layer import Layer

log = logging.getLogger("overlaypc.sharing")


#: How many lower files' mappings are remembered (each a few hundred bytes at most).
LOWER_MAPS = 16384

#: An inode's ``extents`` once mapped with nothing shared: reads take the plain path.
NOT_SHARED = object()


@dataclass(frozen=True)
class Canonical:
    """A read-only lower file that owns some physical extents."""
    layer: Layer
    rel: str
    dev: int
    ino: int


@dataclass
class FileExtents:
    """One backing file's mapping, replaced (never edited in place) when it changes."""
    dev: int
    ino: int
    size: int
    extents: list[Extent]
    starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.starts = [e.logical for e in self.extents]

    @property
    def has_shared(self) -> bool:
        return any(e.shared for e in self.extents)

    def without(self, start: int, end: int, new_size: int) -> "FileExtents":
        """This mapping minus the byte range [start, end) (which becomes private)."""
        kept: list[Extent] = []
        for e in self.extents:
            if e.end <= start or e.logical >= end:
                kept.append(e)
                continue
            if e.logical < start:
                kept.append(Extent(e.logical, e.physical, start - e.logical, e.flags))
            if e.end > end:
                cut = end - e.logical
                kept.append(Extent(end, e.physical + cut, e.end - end, e.flags))
        return FileExtents(self.dev, self.ino, new_size, kept)


@dataclass(frozen=True)
class Piece:
    """Part of a read: ``length`` bytes from ``fd`` at ``offset`` (fd None: own file)."""
    fd: int | None
    offset: int
    length: int


class ExtentMap:
    def __init__(self, limit: int = 1 << 20, max_fds: int = 256) -> None:
        self._lock = threading.Lock()
        # per device: sorted, non-overlapping physical intervals
        self._starts: dict[int, list[int]] = {}
        self._owners: dict[int, list[tuple[int, int, Canonical]]] = {}  # (phys_end, logical, canon)
        self._registered: set[tuple[int, int]] = set()
        self._count = 0
        self._limit = limit
        #: lower files' mappings (FileExtents or NOT_SHARED): lower data never changes
        #: through the mount, so each lower file is mapped once, not at every open
        self._lower: OrderedDict[tuple[int, int], object] = OrderedDict()
        self._fds: OrderedDict[Canonical, int] = OrderedDict()
        self._max_fds = max_fds
        self._retired: list[int] = []

    def __len__(self) -> int:
        return self._count

    # -- building --------------------------------------------------------------------------
    def register(self, canon: Canonical, extents: list[Extent]) -> None:
        """Make ``canon`` the owner of those of its plain extents nobody owns yet."""
        with self._lock:
            if (canon.dev, canon.ino) in self._registered:
                return
            if self._count >= self._limit:
                log.info("extent map full (%d intervals): dropped, rebuilding lazily", self._count)
                self._starts.clear()
                self._owners.clear()
                self._registered.clear()
                self._count = 0
            self._registered.add((canon.dev, canon.ino))
            starts = self._starts.setdefault(canon.dev, [])
            owners = self._owners.setdefault(canon.dev, [])
            for e in extents:
                if e.plain:
                    self._insert_uncovered(starts, owners, e.physical, e.physical + e.length, e.logical, canon)

    def _insert_uncovered(self, starts, owners, lo: int, hi: int, logical: int, canon: Canonical) -> None:
        """Add the parts of physical [lo, hi) that no interval covers yet."""
        pos = lo
        i = bisect.bisect_right(starts, pos) - 1
        if i < 0 or owners[i][0] <= pos:
            i += 1
        while pos < hi:
            while i < len(starts) and owners[i][0] <= pos:
                i += 1
            nxt = starts[i] if i < len(starts) else hi
            if nxt > pos:
                gap_end = min(nxt, hi)
                starts.insert(i, pos)
                owners.insert(i, (gap_end, logical + (pos - lo), canon))
                self._count += 1
                i += 1
                pos = gap_end
            else:
                pos = owners[i][0]
                i += 1

    def owner(self, dev: int, physical: int) -> tuple[Canonical, int, int] | None:
        """(canonical, its logical offset for ``physical``, bytes until the interval ends)."""
        starts = self._starts.get(dev)
        if not starts:
            return None
        i = bisect.bisect_right(starts, physical) - 1
        if i < 0:
            return None
        end, logical, canon = self._owners[dev][i]
        if physical >= end:
            return None
        return canon, logical + (physical - starts[i]), end - physical

    def lower_mapping(self, key: tuple[int, int]) -> object | None:
        with self._lock:
            return self._lower.get(key)

    def remember_lower(self, key: tuple[int, int], mapping: object) -> None:
        with self._lock:
            self._lower[key] = mapping
            if len(self._lower) > LOWER_MAPS:
                self._lower.popitem(last=False)

    # -- reading ---------------------------------------------------------------------------
    def plan(self, fx: FileExtents, offset: int, length: int) -> list[Piece] | None:
        """How to read [offset, offset+length) of the file mapped by ``fx``; None: all own."""
        end = min(offset + length, fx.size)
        if offset >= end:
            return None
        pieces: list[Piece] = []
        redirected = False
        pos = offset
        i = max(bisect.bisect_right(fx.starts, pos) - 1, 0)
        while pos < end:
            e = fx.extents[i] if i < len(fx.extents) else None
            if e is None or pos < e.logical:
                stop = end if e is None else min(e.logical, end)
                pieces.append(Piece(None, pos, stop - pos))
                pos = stop
                continue
            if pos >= e.end:
                i += 1
                continue
            stop = min(e.end, end)
            found = self.owner(fx.dev, e.physical + (pos - e.logical)) if e.shared else None
            if found is None or (found[0].dev, found[0].ino) == (fx.dev, fx.ino):
                pieces.append(Piece(None, pos, stop - pos))
                pos = stop
                continue
            canon, canon_off, avail = found
            n = min(stop - pos, avail)
            fd = self._fd(canon)
            if fd is None:
                pieces.append(Piece(None, pos, n))
            else:
                pieces.append(Piece(fd, canon_off, n))
                redirected = True
            pos += n
        return pieces if redirected else None

    def _fd(self, canon: Canonical) -> int | None:
        with self._lock:
            fd = self._fds.get(canon)
            if fd is not None:
                self._fds.move_to_end(canon)
                return fd
        try:
            fd = canon.layer.open(canon.rel, os.O_RDONLY)
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (canon.dev, canon.ino):
            os.close(fd)  # the lower file was replaced underneath: never read from it
            return None
        with self._lock:
            old = self._fds.get(canon)
            if old is not None:
                os.close(fd)
                return old
            self._fds[canon] = fd
            if len(self._fds) > self._max_fds:
                # an evicted fd may be in use by a concurrent read: retire, don't close
                _, victim = self._fds.popitem(last=False)
                self._retired.append(victim)
                if len(self._retired) > self._max_fds:
                    os.close(self._retired.pop(0))
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in list(self._fds.values()) + self._retired:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()


def map_file(fd: int, *, writable: bool) -> FileExtents | None:
    """FIEMAP ``fd`` into a ``FileExtents``; None where the filesystem has no FIEMAP."""
    st = os.fstat(fd)
    try:
        extents = fiemap(fd, sync=writable)
    except OSError:
        return None
    return FileExtents(st.st_dev, st.st_ino, st.st_size, extents)
