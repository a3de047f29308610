"""Which opens of the mount pass through, to which backing file, and what they leave behind.

Owns the policy around ``passthrough.Passthrough`` (the kernel's per-inode open modes):

- **Offered** exactly where no copy-up can happen under the open file: a file whose data
  is in the upper layer (not a metacopy upper whose data is still below: its backing is
  the lower file) and every file of a read-only mount; not to an ``O_APPEND`` open (the
  kernel's backing file keeps the flag when ``fcntl`` clears it; such an open made while
  the inode passes through must pass through too: it is DIRECT_IO as well, which the
  kernel serves through the daemon before passthrough). Never under ``handles=bind-at-open``
  (that debug mode exists to show the daemon's own handle binding; passthrough would
  hide it) nor with ``passthrough=off``.
- **cache=shared with sharing=on** (one cached copy of reflinked data): a file with
  extents shared with another file keeps the daemon path, whose reads ``sharing``
  redirects to the canonical file, unless it is a file of a read-only mount whose
  logical→physical map (FIEMAP with SYNC, holes included) and size equal its canonical
  file's: then it passes through *to the canonical file*, so N reflinked copies cost ~1x
  either way. In a writable mount an upper file never passes through to a canonical
  (lower) file: a later writable open of that inode would have to pass through to the
  same backing, and write the lower layer.
- **Data versions**: passthrough I/O bypasses the daemon. A passthrough open claims no
  FUSE page cache (the kernel drops it at every open without KEEP_CACHE), so the inode's
  ``cached_version`` is forgotten; when the last passthrough open that could write ends, the
  inode's data version moves and its cache is not kept, and a cached open that raced with that
  end gets no KEEP_CACHE. While a writable passthrough open is live the inode's sharing
  map is held as by a write (``sharing.changing``), so no stale map outlives it.

Keys are nodeids: the kernel's rules are per FUSE inode, and a nodeid survives copy-up.
Caveat: the stats count no passthrough I/O (``bytes_read``/``bytes_written`` are what the
daemon served); ``passthrough_opens`` counts opens the kernel serves itself.
"""
from __future__ import annotations

import os
import threading

from .engine.ops import Opened
from .files import OpenResult
from .handles import Handle
from .inodes import OverlayInode
from .passthrough import Passthrough
from .sharing import Canonical, ExtentMap, FileExtents, changing, map_file
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import OverlayFS


#: one open handle as counted by ``Passthrough``: (nodeid, backing id, inode, and for a
#: writable passthrough open the held ``sharing.changing`` of the inode's map, else None).
#: A tuple: one is made per OPEN.
_Open = tuple


#: a named tuple made from all its fields without its ``__new__`` (``Opened``: one per OPEN)
_tuple_new = tuple.__new__

#: ``_choose``: pass through to the handle's own backing file
_OWN = object()


def _no_fd() -> int:
    raise AssertionError("a backing file was asked for an open that offers none")


class PassthroughOpens:
    def __init__(self, fs: "OverlayFS") -> None:
        self.fs = fs
        self.modes = Passthrough(None)  # replaced once INIT negotiated passthrough
        self._opens: dict[int, _Open] = {}
        self._lock = threading.Lock()
        #: whether opens are counted at all: passthrough negotiated and possible (``start``)
        self._counting = False
        #: ends of writing passthrough eras; a cached open that saw one begin gets no keep
        self._era_ends = 0
        self._own_backing = False  # (``start``)

    def start(self, backing) -> None:
        """After INIT: ``backing`` registers files (None: passthrough not negotiated)."""
        cfg = self.fs.config
        self.modes = Passthrough(backing if cfg.passthrough else None)
        # (``_choose`` offers nothing under bind-at-open; a refusal found later, EPERM,
        # still counts: opens counted before it are released as counted)
        self._counting = self.modes.enabled and cfg.handles == "reopen"
        #: ``_choose`` answers ``_OWN`` for an upper file not opened ``O_APPEND`` without
        #: asking for its extents (``open_made``)
        self._own_backing = self.fs.sharing is None or cfg.cache != "shared"

    @property
    def era(self) -> int:
        """Read before the core's open: ``open`` compares it to decide KEEP_CACHE."""
        return self._era_ends

    def open_made(self, nodeid: int, result: OpenResult) -> Opened:
        """``open`` (``era`` None) of the file a short CREATE just made and registered
        (``OverlayOps._create_name``; one per file of an untar, a create+write), with what
        such a file is known to be taken as known: an upper file whose handle is on its
        current backing (``_choose``'s ``_OWN`` but for the checks kept below), the node's
        first open (``Passthrough.open_first``: its own fd registered, no callable, the
        handle table not asked twice). The same counts, records and answer as ``open``,
        which answers itself wherever any of that is not so: nothing counted
        (``_counting``), an ``O_APPEND`` open, a map of shared extents to ask
        (``cache=shared`` with ``sharing``), a file not in the upper or a handle not on its
        inode's current backing, opens of the node counted already, passthrough off."""
        handle = self.fs.handles.find(result.fh)
        if not self._counting or handle is None or handle.flags & os.O_APPEND \
                or not self._own_backing:
            return self.open(nodeid, result, None)
        inode = handle.inode
        if not inode.in_upper or handle.bound_generation != inode.generation:
            return self.open(nodeid, result, None)
        writable = handle.flags & os.O_ACCMODE != os.O_RDONLY
        with self._lock:
            backing_id = self.modes.open_first(nodeid, inode.dev, handle.bound_fd, writable)
            if backing_id is not None:
                writing = changing(inode) if backing_id and writable else None
                if writing is not None:
                    writing.__enter__()
                self._opens[result.fh] = (nodeid, backing_id, inode, writing)
        if backing_id is None:
            return self.open(nodeid, result, None)
        return self._answer(result, backing_id, result.keep_cache and not backing_id, inode)

    def open(self, nodeid: int, result: OpenResult, era: int | None) -> Opened:
        """Count the core's new open ``result`` of ``nodeid`` and say how the kernel
        serves it. ``era``: ``self.era`` read before the core opened (None: a new file)."""
        modes = self.modes
        if not self._counting:
            # no open of this mount can pass through: nothing to count, and the era moves
            # only when a passthrough open ends
            return Opened(result.fh, direct_io=result.direct_io, keep_cache=result.keep_cache)
        fs = self.fs
        handle = fs.handles.get(result.fh)
        inode = handle.inode
        target = self._choose(handle) if modes.possible(nodeid, inode.dev) else None
        if target is None:  # (the common case for a lower file: no fd to offer)
            with self._lock:
                backing_id = modes.open(nodeid, offer=False, dev=inode.dev, fd=_no_fd,
                                        writable=handle.writable)
                keep = result.keep_cache and not backing_id and (era is None or era == self._era_ends)
                writing = changing(inode) if backing_id and handle.writable else None
                if writing is not None:
                    writing.__enter__()
                self._opens[result.fh] = (nodeid, backing_id, inode, writing)
            return self._answer(result, backing_id, keep, inode, handle.flags & os.O_APPEND)
        temp: list[int] = []
        if isinstance(target, Canonical):
            try:
                temp.append(_open_canonical(target))
            except OSError:
                target = None

        def backing_fd() -> int:
            return handle.fd()[0] if target is _OWN else temp[0]

        try:
            with self._lock:
                backing_id = modes.open(nodeid, offer=target is not None, dev=inode.dev,
                                        fd=backing_fd, writable=handle.writable)
                keep = result.keep_cache and not backing_id and (era is None or era == self._era_ends)
                writing = changing(inode) if backing_id and handle.writable else None
                if writing is not None:
                    writing.__enter__()
                self._opens[result.fh] = (nodeid, backing_id, inode, writing)
        finally:
            for fd in temp:
                os.close(fd)  # the kernel holds its own reference to a registered file
        return self._answer(result, backing_id, keep, inode)

    def open_lower(self, nodeid: int, result: OpenResult, era: int | None,
                   inode: OverlayInode, flags: int) -> Opened:
        """``open`` of a read-only open ``result`` (the open's ``flags``) of ``inode``, for
        the engine's short OPEN: where ``_choose`` offers nothing, a file not in the upper
        layer of a writable mount (a copy-up may come under it), counted as ``open``
        counts an open it offered nothing (the inode's modes: a cached open, or one more
        of a passthrough in use), without looking the handle up; anything else is
        ``open``'s."""
        if not self._counting:
            return _tuple_new(Opened, (result.fh, result.direct_io, result.keep_cache,
                                       False, False, False, False, 0))
        if not self.fs.writable or inode.layer.writable:
            return self.open(nodeid, result, era)
        with self._lock:
            backing_id = self.modes.open_unoffered(nodeid)
            keep = result.keep_cache and not backing_id and (era is None or era == self._era_ends)
            self._opens[result.fh] = (nodeid, backing_id, inode, None)  # (not writable)
        if backing_id:
            return self._answer(result, backing_id, keep, inode, flags & os.O_APPEND)
        return _tuple_new(Opened, (result.fh, result.direct_io, keep, False, False, False, False, 0))

    def _answer(self, result: OpenResult, backing_id: int, keep: bool, inode: OverlayInode,
                append: int = 0) -> Opened:
        """``append``: an ``O_APPEND`` open, passing through only because its inode does
        (``_choose`` offers none): the kernel's backing file for it would keep
        ``O_APPEND`` after a ``fcntl`` cleared it, so it is DIRECT_IO too, which the kernel
        serves before passthrough (its reads and writes come to the daemon, each write at
        the offset the kernel gives it; mmap still maps the backing file)."""
        if not backing_id:
            return Opened(result.fh, direct_io=result.direct_io, keep_cache=keep)
        with inode.lock:  # the kernel dropped this node's cache: nothing is known kept
            inode.cached_version = -1
        if append:
            return Opened(result.fh, direct_io=True, backing_id=backing_id)
        self.fs.stats.add("passthrough_opens")
        return Opened(result.fh, backing_id=backing_id)

    def release(self, fh: int) -> None:
        """Uncount an open (before the core releases its handle)."""
        with self._lock:
            o = self._opens.pop(fh, None)
            if o is None:
                return
            nodeid, backing_id, inode, writing = o
            if not backing_id:  # a cached open (every daemon handle): nothing changed unseen
                self.modes.release_unoffered(nodeid)
                return  # (``writing`` is None: held for a passthrough open only)
            changed = self.modes.release(nodeid, backing_id)
            if changed:  # the data may have changed without the daemon seeing it
                self._era_ends += 1
                with inode.lock:
                    inode.data_version += 1
                    inode.cached_version = -1
        if writing is not None:
            writing.__exit__(None, None, None)

    def __len__(self) -> int:
        return len(self._opens)

    # -- the choice ---------------------------------------------------------------------------
    def _choose(self, handle: Handle) -> object | None:
        """``_OWN``, a ``Canonical`` to pass through to, or None (the daemon path)."""
        fs = self.fs
        if fs.config.handles != "reopen":
            return None
        if fs.writable and not handle.inode.in_upper:
            return None  # a lower (or metacopy) file: a copy-up may come under the open
        if handle.flags & os.O_APPEND:
            # the kernel opens the passthrough's own backing file with the open's flags and
            # never follows a later fcntl(F_SETFL) that clears O_APPEND (its writes would
            # go on appending); through the daemon the kernel gives each write its offset
            return None
        if fs.sharing is None or fs.config.cache != "shared":
            return _OWN
        fx = fs.files.extents_of(handle)
        if not isinstance(fx, FileExtents) or not fx.has_shared:
            return _OWN
        if fs.writable:
            return None
        return equal_canonical(fs.sharing, fx)


def equal_canonical(sharing: ExtentMap, fx: FileExtents) -> Canonical | None | object:
    """Where a read-only file mapped by ``fx`` may pass through to: ``_OWN`` when all its
    data is its own or owned by itself as canonical; the one canonical file that owns all
    of its data at the same offsets with the same size and map (holes included); None
    otherwise (partly shared, owned by several files, the canonical's map differs)."""
    me = (fx.dev, fx.ino)
    owners: dict[tuple[int, int], Canonical | None] = {}
    for e in fx.extents:
        if not e.plain:
            return None  # unwritten, delalloc...: nothing is trusted
        if not e.shared:
            owners[me] = None
            continue
        pos = 0
        while pos < e.length:
            found = sharing.owner(fx.dev, e.physical + pos)
            if found is None or found[1] != e.logical + pos:
                return None
            owners[(found[0].dev, found[0].ino)] = found[0]
            pos += found[2]
        if len(owners) > 1:
            return None
    if len(owners) != 1 or me in owners:
        return _OWN if owners.keys() <= {me} else None
    canon = next(iter(owners.values()))
    assert canon is not None
    try:
        fd = _open_canonical(canon)
    except OSError:
        return None
    try:
        other = map_file(fd)
    finally:
        os.close(fd)
    mine, theirs = _runs(fx), (None if other is None else _runs(other))
    if mine is None or theirs != mine or other.size != fx.size:
        return None
    return canon


def _runs(fx: FileExtents) -> list[tuple[int, int, int]] | None:
    """(logical, physical, length) runs, adjacent extents merged; None if any extent is not
    plain (unwritten, delalloc, ...: no equality is trusted then)."""
    runs: list[tuple[int, int, int]] = []
    for e in fx.extents:
        if not e.plain:
            return None
        if runs:
            lo, ph, n = runs[-1]
            if lo + n == e.logical and ph + n == e.physical:
                runs[-1] = (lo, ph, n + e.length)
                continue
        runs.append((e.logical, e.physical, e.length))
    return runs


def _open_canonical(canon: Canonical) -> int:
    """The canonical lower file, read-only, checked to be the file the map registered."""
    fd = canon.layer.open(canon.rel, os.O_RDONLY)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (canon.dev, canon.ino):
        os.close(fd)
        raise OSError(116, "canonical file replaced", canon.rel)  # ESTALE
    return fd


__all__ = ["PassthroughOpens", "equal_canonical"]
