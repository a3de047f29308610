"""Overlay inode numbers for merged objects (docs/ARCHITECTURE.md §4).

Owns: ``ino_of(node)``, the ``st_ino`` shown. Rules, the kernel's (``ovl_getattr``):
  * a copied-up object shows the number of its copy-up origin, so copy-up and remount
    change nothing (fuse-overlayfs's ``user.fuseoverlayfs.origin``, a lower path, is
    read where no kernel origin is recorded): the upper's ``trusted.overlay.origin`` file handle is decoded on the
    lower filesystem with the same UUID (``open_by_handle_at``, an ``O_PATH`` fd used
    only to ``fstat`` it: a decoded handle is never used to read data, since it cannot be
    proven to lie beneath a layer root). A handle that does not decode (a stale origin,
    an upper copied with ``cp -a`` onto other lowers) is ignored;
  * a non-directory whose origin has ``st_nlink > 1`` shows the origin's number only
    where it is indexed (``index=on``, the upper object a hard link of its index entry,
    the kernel's ``OVL_INDEX``): without an index, copy-up broke the hard link (overlaypc
    then records no origin, as the kernel), and the copy shows its own upper number; so
    does a copy made with ``index=off`` from a file that gained lower links later, whose
    origin's index entry, if any, is another file (fstests overlay/042);
  * a directory present in upper and a lower without an origin takes the topmost
    lower's number; not the root, which shows its top layer's root's own number (with an
    upper, the upper root's: the kernel gives the root no copy-up identity, even where
    ``index=on`` recorded the lower root as the upper root's origin);
  * two upper objects naming one origin (an upper copied with ``cp -a`` while unmounted:
    two files, or two directories redirected to one lower directory) never show one
    number: the first the mount answers for shows the origin's, any other its own upper
    number (the kernel fails the lookup of the other, ``ESTALE``: fstests overlay/049,
    059), so ``diff`` and ``cmp`` never take them for one file. Which one is first may
    differ between mounts;
  * anything else takes its own layer's real inode number;
  * each real number is mapped through the stack's ``xino`` scheme, so layers on
    different filesystems never collide.
Decoding costs syscalls; results are cached by (dev, ino, ctime) of the upper object,
which changes whenever the object does. An object the mount makes (a creation: ``made``; a
copy-up: ``copied``) sets its own entry, so a reused inode number whose new object has the
old one's ctime to the nanosecond (coarse timestamps before Linux 6.13's multigrain ones, a
number reused within one tick) cannot hit the old entry; only an object made behind the
mount's back could (a documented caveat).
A change of the object (a chmod, a name made or removed in a directory) changes its ctime
but rarely its origin: on such a miss the origin xattr is read again (one call) and a
decoded origin is taken from a second cache keyed by the xattr's bytes and the object's
type, the only inputs of the result besides the lower layers, which do not change under
a mount (a documented caveat). A decode that found nothing is not kept there (it may have
failed for want of fds), only under the object's (dev, ino, ctime).
The ``trusted.overlay.overlaypc.ino`` xattr older versions wrote is not trusted: a
copied xattr would show a number the file's own origin does not vouch for.
"""
from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict

from . import sysapi, whiteout
from .layer import UNKNOWN, DirFd, Layer, Listed, join
from .lookup import Entry, Node
from .stack import LayerStack
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from .index import IndexDir


def _xattr(entry: Entry, name: str) -> bytes | None:
    """xattr ``name`` of a layer object: one call through the fd a lookup holds (its own
    for a directory, its directory's for anything else), else through a path walk."""
    if entry.lacks(name):
        return None
    if entry.dirfd is not None:
        return entry.layer.getxattr_at(entry.dirfd, name)
    if entry.parent is not None:
        return entry.layer.getxattr_name(entry.parent, entry.name, name)
    return entry.layer.getxattr(entry.rel, name)


#: makes a named tuple from a tuple of its fields without its Python-level ``__new__``
_new_tuple = tuple.__new__


class InodeNumbers:
    def __init__(self, stack: LayerStack, prefix: str, limit: int = 65536, *,
                 index: bool = False) -> None:
        self.xino = stack.xino
        self.index = index
        self.origin_xattr = prefix + "origin"
        self.lowers = list(stack.lowers)
        self._by_uuid: dict[bytes, list] = {}
        for layer in stack.lowers:  # a null UUID (as the kernel writes on some filesystems) too
            self._by_uuid.setdefault(layer.uuid, []).append(layer)
        self._cache: OrderedDict[tuple[int, int, int], int | None] = OrderedDict()
        #: (which xattr, file type, its bytes) -> (number shown, whether only an indexed
        #: object shows it: a non-directory origin with more than one link), decoded only
        self._decoded: OrderedDict[tuple[str, int, bytes], tuple[int, bool]] = OrderedDict()
        #: number shown because of a copy-up origin -> (st_dev, st_ino) of the upper object
        #: that showed it first (``_unique``)
        self._claims: OrderedDict[int, tuple[int, int]] = OrderedDict()
        #: index=on: the index directory (``IndexDir.holds`` tells an indexed object)
        self.index_dir: IndexDir | None = None
        self._limit = limit
        self._lock = threading.Lock()

    def recorded(self, entry: Entry) -> int | None:
        """The number an upper object shows because of its copy-up origin, if any; its own
        upper number when another object showed that origin's first (``_unique``)."""
        return self._unique(entry, self._recorded(entry))

    def upper_listed(self, layer: Layer, dirfd: DirFd, rel: str,
                     items: "list[Listed]") -> "list[Listed]":
        """``items``, upper objects listed (stat'ed) in directory ``rel`` of ``layer``, each
        with the number it shows for ``ino``: as ``recorded``, else ``of_entry``, of its
        entry at ``join(rel, name)`` through the directory's fd ``dirfd`` would answer
        (``merged_listing``'s rule). The answers kept under the objects' stats with no
        origin (what the mount made, a change carried, an earlier listing read) in one lock
        hold, with the same LRU moves; an ``Entry`` and ``recorded`` for the others only (an
        origin: ``_unique`` decides; not kept: its xattrs are read)."""
        cache, missing = self._cache, UNKNOWN
        xino, xbits = self.xino.ino, self.xino.bits  # (0: real numbers as they are)
        out: list = []
        append = out.append
        rest = False
        with self._lock:
            for item in items:
                st = item[3]
                key = (st.st_dev, st.st_ino, st.st_ctime_ns)
                if cache.get(key, missing) is None:
                    cache.move_to_end(key)
                    append(_new_tuple(Listed, (item[0], item[1],
                                               xino(st.st_dev, st.st_ino) if xbits else st.st_ino, st)))
                else:
                    append(None)
                    rest = True
        if rest:  # (an origin's number, or nothing kept)
            for i, item in enumerate(items):
                if out[i] is None:
                    st = item[3]
                    value = self.recorded(Entry(layer, join(rel, item[0]), st, None, dirfd))
                    out[i] = _new_tuple(Listed, (item[0], item[1], xino(st.st_dev, st.st_ino)
                                                 if value is None else value, st))
        return out

    def _unique(self, entry: Entry, value: int | None) -> int | None:
        """``value``, the origin's number for the upper ``entry``, if no other upper object
        showed it yet, else ``entry``'s own number. An object keeps its (device, inode)
        pair across renames, and a copy of data into it (metacopy) is made in place, so
        the first object's claim stays its own; one whose object went is never taken
        over, since no other object may name that origin (the lower layers do not
        change under a mount, and its name is whited out)."""
        if value is None:
            return None
        me = (entry.st.st_dev, entry.st.st_ino)
        with self._lock:
            first = self._claims.setdefault(value, me)
            self._claims.move_to_end(value)
            if len(self._claims) > self._limit:
                self._claims.popitem(last=False)
        return value if first == me else self.of_entry(entry)

    def _recorded(self, entry: Entry) -> int | None:
        """The number an upper object's copy-up origin gives, if any. A
        directory's answer is kept on the fd the lookup holds of it (``DirFd.origin_ino``),
        unless it came from a decode that failed (it may have failed for want of fds): a
        name made or removed in it changes its ctime, not its origin."""
        dirfd = entry.dirfd
        if dirfd is not None:
            known = dirfd.origin_ino
            if known is not UNKNOWN:
                return known  # type: ignore[return-value]
        st = entry.st
        key = (st.st_dev, st.st_ino, st.st_ctime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                value = self._cache[key]
                if dirfd is not None and value is not None:
                    dirfd.origin_ino = value  # (a number is a decoded origin's: final)
                return value
        value, final = self._from_origin(entry)
        if dirfd is not None and final:
            dirfd.origin_ino = value
        with self._lock:
            self._keep(key, value)
        return value

    def _keep(self, key: tuple[int, int, int], value: int | None) -> None:
        """``value`` kept under stat key ``key``, the least recently used going past the
        bound (the caller holds ``_lock``)."""
        self._cache[key] = value
        if len(self._cache) > self._limit:
            self._cache.popitem(last=False)

    def made(self, st: os.stat_result) -> None:
        """The upper object of stat ``st`` was just made by the mount: it has no copy-up
        origin. Kept so under that stat, its reply and the GETATTRs until its next change
        read no xattrs for it."""
        self.known(st, None)

    def carry(self, before: os.stat_result, after: os.stat_result) -> bool:
        """An upper object changed only in mode, owner or times (``before`` -> ``after``):
        its ``recorded`` answer, if kept under the old stat, is kept under the new one
        too (its origin is unchanged), so a listing after the change reads no xattrs
        for it. False when nothing was kept under ``before``."""
        old = (before.st_dev, before.st_ino, before.st_ctime_ns)
        with self._lock:
            if old not in self._cache:
                return False
            self._keep((after.st_dev, after.st_ino, after.st_ctime_ns), self._cache[old])
        return True

    def copied(self, raw: bytes, source: os.stat_result, layer: Layer) -> int | None:
        """A copy-up recorded ``raw`` as the origin of a copy of ``source`` (its stat, in
        lower ``layer``): keep the number a decode of ``raw`` gives, so the copy's first
        GETATTR decodes nothing. Only where no other layer's filesystem shares the UUID
        (a decode tries each of them), and only for what ``_from_origin`` keeps. Returns
        that number (what ``recorded`` answers for the copy), None when not kept."""
        kind = stat.S_IFMT(source.st_mode)
        shared = kind != stat.S_IFDIR and source.st_nlink > 1
        if shared and not self.index:
            return None
        if any(other.dev != layer.dev for other in self._by_uuid.get(layer.uuid, ())) \
                or sysapi.parse_ovl_origin(raw) is None:
            return None
        vkey = (self.origin_xattr, kind, raw)
        value = self.xino.ino(source.st_dev, source.st_ino)
        with self._lock:
            self._decoded[vkey] = (value, shared)  # (a shared one: the copy is indexed)
            if len(self._decoded) > self._limit:
                self._decoded.popitem(last=False)
        return value

    def known(self, st: os.stat_result, value: int | None) -> None:
        """The upper object of stat ``st``, just made, shows ``value``: a copy-up that wrote
        its origin, ``copied``'s answer; None for one with no origin (``made``). Kept under
        that stat, so its first GETATTR reads no xattr, nor a change's reply (``carry``)."""
        with self._lock:
            self._keep((st.st_dev, st.st_ino, st.st_ctime_ns), value)

    def _from_origin(self, entry: Entry) -> tuple[int | None, bool]:
        """The number the upper ``entry``'s origin xattr gives (kernel file handle, else
        fuse-overlayfs's path), from the cache of decoded origins when it holds it; and
        whether that answer is final for the object (False: an origin that did not
        decode, which may decode later)."""
        kind = stat.S_IFMT(entry.st.st_mode)
        name = self.origin_xattr
        raw = _xattr(entry, name)
        parsed = sysapi.parse_ovl_origin(raw) if raw else None
        if parsed is None:
            name = whiteout.FOO_ORIGIN
            raw = _xattr(entry, name)
            if not raw:
                return None, True
        vkey = (name, kind, raw)
        with self._lock:
            kept = self._decoded.get(vkey)
            if kept is not None:
                self._decoded.move_to_end(vkey)
        if kept is None:
            origin = self._decode(parsed) if parsed is not None else self._path_origin(raw)
            if origin is None:
                return None, False
            if stat.S_IFMT(origin.st_mode) != kind:
                return None, True
            kept = (self.xino.ino(origin.st_dev, origin.st_ino),
                    kind != stat.S_IFDIR and origin.st_nlink > 1)
            with self._lock:
                self._decoded[vkey] = kept
                if len(self._decoded) > self._limit:
                    self._decoded.popitem(last=False)
        value, shared = kept
        # (fuse-overlayfs's path origins are never indexed)
        if shared and (parsed is None or not self._indexed(entry, raw)):
            return None, True
        return value, True

    def _indexed(self, entry: Entry, raw: bytes) -> bool:
        """Whether the upper non-directory ``entry``, whose origin (xattr ``raw``) has
        other links, is indexed: a hard link of the index entry of that origin. Two upper
        files may name one origin (one copied with ``index=off`` before the origin gained
        links, the other indexed); only the indexed one shows the origin's number, as the
        kernel's ``ovl_getattr`` (``OVL_INDEX``), so two files never show one."""
        if not self.index:
            return False
        if self.index_dir is None:  # (no workdir: nothing was indexed by this mount)
            return True
        return self.index_dir.holds(entry.st, raw)

    def _decode(self, parsed: tuple[bytes, int, bytes]) -> os.stat_result | None:
        """``fstat`` of the lower object a parsed origin file handle decodes to."""
        uuid, handle_type, fid = parsed
        seen_devs = set()
        for layer in self._by_uuid.get(uuid, ()):
            if layer.dev in seen_devs:
                continue
            seen_devs.add(layer.dev)
            try:
                fd = sysapi.open_by_handle(layer.mount_fd, handle_type, fid)
            except OSError:
                continue  # stale or foreign handle: the kernel ignores it too
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        return None

    def _path_origin(self, raw: bytes) -> os.stat_result | None:
        """``user.fuseoverlayfs.origin`` (``raw``): the path, in the lower layers, of the
        object this one was copied up from (fuse-overlayfs's format), looked up top first."""
        parts = [p for p in os.fsdecode(raw.rstrip(b"\0")).split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            return None
        rel = "/".join(parts)
        for layer in self.lowers:
            st = layer.lstat(rel)  # resolved beneath the layer root, like every layer path
            if st is not None:
                return None if whiteout.is_whiteout(st) else st
        return None

    def of_entry(self, entry: Entry) -> int:
        return self.xino.ino(entry.st.st_dev, entry.st.st_ino)

    def dir_ino(self, node: Node) -> int | None:
        """``ino_of`` a directory other than the root whose top entry holds an fd, when that
        needs no system call: a lower top, or an upper one whose copy-up origin was read
        through its fd already (``DirFd.origin_ino``, kept as long as the fd); else None
        (ask ``ino_of``). Kept on that fd (``DirFd.dir_ino``), except an origin's number:
        whether this directory shows it is ``_unique``'s say at each answer, as ``recorded``
        (two upper directories naming one origin: the second shows its own number)."""
        top = node.entries[0]
        dirfd = top.dirfd
        known = dirfd.dir_ino  # type: ignore[union-attr]
        if known is not UNKNOWN:
            return known  # type: ignore[return-value]
        if top.layer.writable:
            recorded = dirfd.origin_ino  # type: ignore[union-attr]
            if recorded is UNKNOWN:
                return None
            if recorded is not None:
                return self._unique(top, recorded)  # type: ignore[arg-type]
            for lower in node.entries:  # no origin: the topmost lower's, else its own
                if not lower.layer.writable:
                    top = lower
                    break
        ino = self.xino.ino(top.st.st_dev, top.st.st_ino)
        dirfd.dir_ino = ino  # type: ignore[union-attr]
        return ino

    def ino_of(self, node: Node, lower_dir: Entry | None = None) -> int:
        """``st_ino`` of ``node``; ``lower_dir`` stands in for ``node.lowers[0]`` when known.
        The root shows its top layer's root (the kernel's ``ovl_get_root``: the upper
        root's number, never a copy-up origin, the top lower root's without an upper)."""
        top = node.top
        if top.layer.writable and node.rel:
            recorded = self.recorded(top)
            if recorded is not None:
                return recorded
            if top.is_dir:
                lower = lower_dir or next(iter(node.lowers), None)
                if lower is not None:
                    return self.of_entry(lower)
        return self.of_entry(top)
