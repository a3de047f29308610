"""Page-cache sharing for reflinked data: one canonical copy per physical extent.

Owns: the extent map (docs/ARCHITECTURE.md §5). Files whose extents FIEMAP reports as shared are
read, for those ranges, from one *canonical* file that references the same physical
blocks, so the kernel caches those pages once — for reflinked lower trees and for
upper files made by a reflink copy-up, until written.

Rules that keep it from ever serving wrong data:
  * the map is keyed by ``(st_dev, physical offset)``: offsets repeat across filesystems;
  * only plain extents (flags within SHARED|LAST|MERGED) are used;
  * canonical sources are read-only lower files, whose data never changes through the
    mount; their *blocks* may change behind it without a change of data (deduplication by
    duperemove or bees, defragmentation), and the freed blocks may then hold another file's
    data. So each new mapping with shared extents is checked (``verify``): every canonical
    its reads would be redirected to must still reference those physical blocks now (one
    range FIEMAP per canonical); an owner that does not is forgotten. Once checked, a
    mapping stays right while its file keeps it: the file holds those blocks, so they are
    not reused, and a canonical's bytes never change;
  * every file with shared extents, lower or upper, is mapped with ``FIEMAP_FLAG_SYNC``:
    XFS keeps a COW-fork write in the page cache while the data fork still points at the
    shared extent, also for a lower file written (without fsync) before the mount;
  * every change of a file's data through the mount runs inside ``changing``: a write
    drops the written range from the file's mapping, a size change (truncate, O_TRUNC,
    fallocate) the whole mapping, *before* the file changes, so no later read can be
    redirected over it; a mapping made while a change runs is never kept;
  * canonical intervals never overlap: the first lower file seen for an extent (or the
    copy-up origin of an upper file) owns it; FIEMAP's merged extents are handled by
    interval containment, so partial sharing is served piece by piece. Owners are
    resolved under the map's lock, which ``register`` holds while it edits the table;
  * a read never returns bytes past the referencing file's own (mapped) size;
  * a plan holds its canonical files open (``SharedFd``): evicting one from the LRU
    never closes an fd a read is about to use, so a reused fd number is never read.

Filesystems that cannot share extents (ext2/3/4: no reflink; tmpfs: no FIEMAP) are known
by their ``statfs`` magic number, once per device: their files are never FIEMAP-mapped, and
their reads take the plain path at once (a cold ``grep -r`` of an ext4 lower paid one FIEMAP
per file for nothing). Skipping a mapping never serves wrong data: a file read unmapped is
read from itself.

Bounds: at most ``limit`` canonical intervals (the map is dropped and rebuilt lazily
when full), ``max_fds`` canonical files kept open (LRU, plus evicted ones that reads
in flight still hold), and remembered mappings of lower files (LRU; lower data never
changes through the mount): at most ``LOWER_MAPS`` files and ``LOWER_MAP_EXTENTS`` extents
in all (17 MiB at the bound, measured with tracemalloc).
"""
from __future__ import annotations

import os
import threading
from _bisect import bisect_right  # bisect.py itself adds ~0.06 ms to a mount's start
from collections import OrderedDict

from . import logs, sysapi
from .layer import Layer
from .records import field, record
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from .extents import Extent
    from .inodes import OverlayInode

log = logs.get("overlaypc.sharing")


def _first_fiemap(fd: int, **kw) -> "list[Extent]":
    """``fiemap`` until the first mapping: ``extents`` is imported then, not at start-up
    (no mount maps a file before a request opens one; a mount over ext4 or tmpfs never
    does), and its function takes this name (unless something else was put there), so
    later calls cost nothing."""
    global fiemap
    from .extents import fiemap as real
    if fiemap is _first_fiemap:
        fiemap = real
    return real(fd, **kw)


fiemap = _first_fiemap
#: (``extents.FIEMAP_EXTENT_SHARED``)
FIEMAP_EXTENT_SHARED = 0x2000


#: How many lower files' mappings are remembered (each a few hundred bytes at most).
LOWER_MAPS = 16384
#: ... holding at most this many extents in all (a fragmented file has thousands).
LOWER_MAP_EXTENTS = 65536

#: An inode's ``extents`` once mapped with nothing shared: reads take the plain path.
NOT_SHARED = object()

#: ``statfs`` magic numbers of filesystems whose files never have shared extents: ext2/3/4
#: (no reflink or dedupe), tmpfs (no FIEMAP at all). Any other type is mapped.
NEVER_SHARED_FS = frozenset((0xEF53, 0x01021994))
#: How many devices' answers ``ExtentMap.shares_on`` keeps (forgotten all at once beyond).
MAX_DEVICES = 1024


@record(frozen=True)
class Canonical:
    """A read-only lower file that owns some physical extents."""
    layer: Layer
    rel: str
    dev: int
    ino: int


@record
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
                kept.append(type(e)(e.logical, e.physical, start - e.logical, e.flags))
            if e.end > end:
                cut = end - e.logical
                kept.append(type(e)(end, e.physical + cut, e.end - end, e.flags))
        return FileExtents(self.dev, self.ino, new_size, kept)


class SharedFd:
    """An open canonical file, closed when the last reference to it goes: the LRU holds
    one, and so does every ``Piece`` planned from it (CPython frees on the last reference,
    as with ``layer.DirFd``), so an evicted fd stays open until no read uses it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


@record(frozen=True)
class Piece:
    """Part of a read: ``length`` bytes at ``offset`` of ``source`` (None: the own file)."""
    source: SharedFd | None
    offset: int
    length: int

    @property
    def fd(self) -> int | None:
        return None if self.source is None else self.source.fd


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
        self._lower_extents = 0
        self._fds: OrderedDict[Canonical, SharedFd] = OrderedDict()
        self._max_fds = max_fds
        #: st_dev -> whether files there can have shared extents (``shares_on``)
        self._devices: dict[int, bool] = {}

    def __len__(self) -> int:
        return self._count

    @property
    def open_fds(self) -> int:
        """The canonical files held open (as many again may still be in reads in flight)."""
        return len(self._fds)

    def never_shares(self, dev: int) -> bool:
        """Whether ``dev`` is known (from an earlier ``shares_on``) to hold no shared extents."""
        return self._devices.get(dev) is False

    def shares_on(self, dev: int, fd: int) -> bool:
        """Whether files on ``dev`` (that of ``fd``) can have shared extents; decided from
        the filesystem type once per device. An ``fstatfs`` that fails says "can".
        (A device number is not reused under a mount: layer paths never cross into another
        filesystem, ``RESOLVE_NO_XDEV``, and each layer's root is held open. Devices are few,
        one per layer at most; the bound is a backstop.)"""
        known = self._devices.get(dev)
        if known is None:
            try:
                known = sysapi.fs_type(fd) not in NEVER_SHARED_FS
            except OSError:
                return True
            devices = self._devices
            if len(devices) >= MAX_DEVICES:
                devices.clear()  # (a dict item set or clear is atomic under the GIL)
            devices[dev] = known
        return known

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
        i = bisect_right(starts, pos) - 1
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
        with self._lock:
            return self._owner(dev, physical)

    def _owner(self, dev: int, physical: int) -> tuple[Canonical, int, int] | None:
        # under self._lock: register() inserts into both lists, and may clear them
        starts = self._starts.get(dev)
        if not starts:
            return None
        i = bisect_right(starts, physical) - 1
        if i < 0:
            return None
        end, logical, canon = self._owners[dev][i]
        if physical >= end:
            return None
        return canon, logical + (physical - starts[i]), end - physical

    def lower_mapping(self, key: tuple[int, int]) -> object | None:
        with self._lock:
            found = self._lower.get(key)
            if found is not None:
                self._lower.move_to_end(key)
            return found

    @staticmethod
    def _weight(mapping: object) -> int:
        return len(mapping.extents) if isinstance(mapping, FileExtents) else 0

    def remember_lower(self, key: tuple[int, int], mapping: object) -> None:
        with self._lock:
            old = self._lower.pop(key, None)
            self._lower_extents -= self._weight(old)
            self._lower[key] = mapping
            self._lower_extents += self._weight(mapping)
            while self._lower and (len(self._lower) > LOWER_MAPS
                                   or self._lower_extents > LOWER_MAP_EXTENTS):
                _, dropped = self._lower.popitem(last=False)
                self._lower_extents -= self._weight(dropped)

    # -- checking owners against their files now -------------------------------------------
    def claims(self, fx: FileExtents) -> dict[tuple[int, int], tuple[Canonical, list[tuple[int, int, int]]]]:
        """What reads of ``fx`` would take from other files now: per canonical (by device
        and inode), the canonical and its ``(logical, physical, length)`` runs."""
        out: dict[tuple[int, int], tuple[Canonical, list[tuple[int, int, int]]]] = {}
        with self._lock:
            starts = self._starts.get(fx.dev)
            if not starts:
                return out
            owners = self._owners[fx.dev]
            for e in fx.extents:
                if not e.shared:
                    continue
                lo, hi = e.physical, e.physical + e.length
                i = max(bisect_right(starts, lo) - 1, 0)
                while i < len(starts) and starts[i] < hi:
                    end, logical, canon = owners[i]
                    a, b = max(lo, starts[i]), min(hi, end)
                    key = (canon.dev, canon.ino)
                    if a < b and key != (fx.dev, fx.ino):
                        out.setdefault(key, (canon, []))[1].append((logical + (a - starts[i]), a, b - a))
                    i += 1
        return out

    def _holds(self, canon: Canonical, runs: list[tuple[int, int, int]]) -> bool:
        """Whether ``canon`` references each run's physical bytes at its logical offset now."""
        source = self._source(canon)
        if source is None:
            return False
        lo = min(logical for logical, _, _ in runs)
        hi = max(logical + length for logical, _, length in runs)
        try:
            extents = fiemap(source.fd, sync=False, start=lo, end=hi)
        except OSError:
            return False
        return all(_covers(extents, *run) for run in runs)

    def verify(self, fx: FileExtents) -> bool:
        """Whether every canonical file that reads of ``fx`` (just mapped) would be redirected
        to still references those physical blocks; an owner found not to is forgotten, and
        the owners are looked at again. False if they keep changing (then read ``fx``'s file
        itself)."""
        for _ in range(3):
            stale = [canon for canon, runs in self.claims(fx).values() if not self._holds(canon, runs)]
            if not stale:
                return True
            for canon in stale:
                self.forget(canon)
        return False

    def forget(self, canon: Canonical) -> None:
        """``canon``'s blocks changed behind the mount: it owns nothing any more (until it is
        registered again from a new mapping), and no remembered lower mapping is trusted."""
        key = (canon.dev, canon.ino)
        with self._lock:
            starts, owners = self._starts.get(canon.dev, []), self._owners.get(canon.dev, [])
            kept = [(start, owner) for start, owner in zip(starts, owners)
                    if (owner[2].dev, owner[2].ino) != key]
            self._count -= len(starts) - len(kept)
            self._starts[canon.dev] = [start for start, _ in kept]
            self._owners[canon.dev] = [owner for _, owner in kept]
            self._registered.discard(key)
            source = self._fds.pop(canon, None)
            self._lower.clear()
            self._lower_extents = 0
        del source  # closed (if no read holds it) outside the lock
        log.info("canonical %s no longer holds its extents (changed behind the mount): forgotten",
                 canon.rel)

    # -- reading ---------------------------------------------------------------------------
    def plan(self, fx: FileExtents, offset: int, length: int) -> list[Piece] | None:
        """How to read [offset, offset+length) of the file mapped by ``fx``; None: all own.
        Never past ``fx.size``. The pieces hold their canonical files open."""
        end = min(offset + length, fx.size)
        if offset >= end:
            return None
        spans: list[tuple[int, int, Canonical | None, int]] = []  # (pos, length, canon, canon_off)
        with self._lock:  # one consistent view of the owners for the whole read
            pos = offset
            i = max(bisect_right(fx.starts, pos) - 1, 0)
            while pos < end:
                e = fx.extents[i] if i < len(fx.extents) else None
                if e is None or pos < e.logical:
                    stop = end if e is None else min(e.logical, end)
                    spans.append((pos, stop - pos, None, 0))
                    pos = stop
                    continue
                if pos >= e.end:
                    i += 1
                    continue
                stop = min(e.end, end)
                found = self._owner(fx.dev, e.physical + (pos - e.logical)) if e.shared else None
                if found is None or (found[0].dev, found[0].ino) == (fx.dev, fx.ino):
                    spans.append((pos, stop - pos, None, 0))
                    pos = stop
                    continue
                canon, canon_off, avail = found
                n = min(stop - pos, avail)
                spans.append((pos, n, canon, canon_off))
                pos += n
        if all(canon is None for _, _, canon, _ in spans):
            return None
        pieces: list[Piece] = []
        redirected = False
        for pos, n, canon, canon_off in spans:
            source = self._source(canon) if canon is not None else None
            if source is None:
                pieces.append(Piece(None, pos, n))
            else:
                pieces.append(Piece(source, canon_off, n))
                redirected = True
        return pieces if redirected else None

    def _source(self, canon: Canonical) -> SharedFd | None:
        """The canonical file, open (from the LRU, or opened now); None if it is gone."""
        with self._lock:
            source = self._fds.get(canon)
            if source is not None:
                self._fds.move_to_end(canon)
                return source
        try:
            fd = canon.layer.open(canon.rel, os.O_RDONLY)
        except OSError:
            return None
        source = SharedFd(fd)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (canon.dev, canon.ino):
            return None  # the lower file was replaced underneath: never read from it
        evicted = None
        with self._lock:
            old = self._fds.get(canon)
            if old is not None:  # another thread opened it meanwhile
                return old
            self._fds[canon] = source
            if len(self._fds) > self._max_fds:
                # plans in flight keep their reference: the fd closes when the last goes
                _, evicted = self._fds.popitem(last=False)
        del evicted  # closed (if unused) outside the lock
        return source

    def close(self) -> None:
        """Let go of the LRU; fds still held by reads in flight close when those end."""
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
        del fds


def _covers(extents: list[Extent], logical: int, physical: int, length: int) -> bool:
    """Whether ``extents`` (logical order) map [logical, logical+length) plainly onto
    [physical, physical+length)."""
    pos, end = logical, logical + length
    for e in extents:
        if e.end <= pos:
            continue
        if e.logical > pos or not e.plain or e.physical - e.logical != physical - logical:
            return False
        pos = e.end
        if pos >= end:
            return True
    return False


def map_file(fd: int, st: os.stat_result | None = None) -> FileExtents | None:
    """FIEMAP ``fd`` into a ``FileExtents``; None where the filesystem has no FIEMAP.
    ``st``: ``fd``'s stat if the caller just took it (before the mapping, as here).

    A file with any shared extent is mapped (again) with ``FIEMAP_FLAG_SYNC``, lower files
    too: unwritten-back writes over a shared extent (XFS: in the COW fork) are otherwise
    reported at the shared location. A file with none needs no flush: writeback never
    makes an extent shared (reflink and dedupe flush both files first)."""
    if st is None:
        st = os.fstat(fd)
    try:
        extents = fiemap(fd, sync=False)
        if any(e.flags & FIEMAP_EXTENT_SHARED for e in extents):
            extents = fiemap(fd, sync=True)
    except OSError:
        return None
    return FileExtents(st.st_dev, st.st_ino, st.st_size, extents)


class changing:
    """Run a change of ``inode``'s backing data through the mount (docs/ARCHITECTURE.md §5),
    as ``with changing(inode, start, end):``.

    Before the change: the inode's mapping loses the byte range [start, end), growing its
    size to ``end`` if that is larger; ``start`` None (any size change: truncate, O_TRUNC,
    fallocate, an O_APPEND write) drops the whole mapping. So no read planned from then on
    is redirected over the new data. While it runs ``extents_busy`` is non-zero and each
    end bumps ``extents_epoch``: a mapping made from the file as it was is never stored
    (see ``Files._map``), whatever the interleaving. (A class, not a generator: every
    WRITE runs one.)"""

    __slots__ = ("_inode", "_start", "_end")

    def __init__(self, inode: "OverlayInode", start: int | None = None, end: int = 0) -> None:
        self._inode, self._start, self._end = inode, start, end

    def __enter__(self) -> None:
        inode, start, end = self._inode, self._start, self._end
        with inode.lock:
            inode.extents_epoch += 1
            inode.extents_busy += 1
            fx = inode.extents
            if start is None:
                inode.extents = None
            elif isinstance(fx, FileExtents):
                inode.extents = fx.without(start, end, max(fx.size, end))

    def __exit__(self, *exc: object) -> None:
        inode = self._inode
        with inode.lock:
            inode.extents_busy -= 1
            inode.extents_epoch += 1
