"""Open files: open/create, read, write, fsync, flush, fallocate, fstat, ftruncate, release,
lseek (SEEK_DATA/SEEK_HOLE) and copy_file_range.

Owns: the per-open-file flow. Opening for write (or with O_TRUNC) copies a lower file
up first; every later I/O asks its ``Handle`` for the real fd, which follows the inode
to its current backing (see ``handles``). In ``cache=kernel`` mode an open keeps the
kernel's page cache (``keep_cache``) only while the inode's data version is the one its
kernel node last saw. Every name of an overlay inode is one kernel node, so a change
through one name is in the page cache every other name reads.
In ``cache=shared`` mode every open is ``direct_io``.
"""
from __future__ import annotations

import errno
import os
import stat

from . import faults, killpriv, scopes, sysapi
from .attrs import Attr, getxattr_at, listxattr_at, resolve_times, setxattr_fd
from .copyup import is_private_xattr
from .handles import Handle
from .inodes import OPEN_FLAGS, InodeKey, MetaFile, OverlayInode, StaleBacking
from .layer import DirFd, Layer, same_file
from .lookup import Entry, Node
from .ownership import Caller
from .sharing import NOT_SHARED, Canonical, Piece, changing, map_file
from .typing_lite import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager
    from typing import TypeVar

    from .core import OverlayFS

    T = TypeVar("T")

_WRITE_INTENT = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
_S_IFREG = stat.S_IFREG
_ENODATA = errno.ENODATA
#: the most one COPY_FILE_RANGE copies when it has to go through the daemon
COPY_CHUNK = 1 << 20
#: a read-only open asks the backing filesystem for this much of the file's start
#: (``prefetch``): the kernel's first READ of a FUSE file asks for at least its
#: readahead window's start, and most backing devices read ahead 128 KiB
PREFETCH = 128 << 10
#: opens that prefetch nothing: a writer (its file was just copied up, or is written),
#: and O_DIRECT (its reads bypass the page cache the prefetch would fill)
_NO_PREFETCH = _WRITE_INTENT | os.O_DIRECT


def prefetch(fd: int, st: os.stat_result) -> None:
    """Start reading the first ``PREFETCH`` bytes of a regular file just opened for
    reading (``POSIX_FADV_WILLNEED``: the I/O is queued, not waited for), so that a cold
    file's disk read runs while the OPEN reply and the kernel's first READ travel, instead
    of after them (a cold ``grep -r`` of lower files waits for one disk read per file:
    benchmarks/RESULTS.md). ``st`` is the backing's lookup stat (a hint: a size changed
    since only reads a little more or less). Empty and non-regular files are left alone
    (a FIFO or device has no page cache to fill); a filesystem that refuses the advice
    loses nothing but the hint."""
    if st.st_size and stat.S_ISREG(st.st_mode):
        try:
            os.posix_fadvise(fd, 0, min(st.st_size, PREFETCH), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


#: a named tuple made from all its fields without its ``__new__`` (``OpenResult``: one per OPEN)
_tuple_new = tuple.__new__


class OpenResult(NamedTuple):
    """A core open's handle and how the kernel may cache its data (a named tuple: one is
    made per OPEN)."""
    fh: int
    keep_cache: bool
    direct_io: bool


class Files:
    def __init__(self, fs: "OverlayFS") -> None:
        self.fs = fs
        # for ``readinto``: set up before Files, never replaced
        self._find = fs.handles.find
        self._sharing = fs.sharing
        self._served = fs.stats.served

    def copy_up_for_open(self, rel: str, flags: int, node: Node | None = None,
                         check: "Callable[[int], None] | None" = None) -> "Callable[[], Entry] | None":
        """The copy-up ``open`` makes first (``Attributes.copy_up_for_setattr``'s kind): the
        file with its data, for an open that may change it (write access or ``O_TRUNC``) of
        a file not in the upper or whose data is still below (metacopy); None otherwise (a
        read-only open, a read-only mount, an absent object or a directory: the open fails
        first). ``node``: ``rel`` as the open just looked it up. ``check``: the open's flags
        check, made by the copy-up (``CopyUp.ensure_upper``'s)."""
        fs = self.fs
        if not flags & _WRITE_INTENT or not fs.writable or fs.copyup is None:
            return None
        if node is None:
            if fs.attrs.known_upper(rel, True):
                return None
            node = fs.lookup.lookup(rel)
        if not node.exists or node.is_dir or node.upper is not None and node.data is None:
            return None
        copyup = fs.copyup
        if flags & os.O_TRUNC and node.upper is None and stat.S_ISREG(node.st.st_mode):
            # the open empties it: a copy without the data the truncate would drop (the
            # kernel overlay's copy-up for O_TRUNC too)
            return lambda: copyup.ensure_data(rel, empty=True, check=check)
        return lambda: copyup.ensure_data(rel, check=check)

    def open(self, rel: str, flags: int, *, admitted: bool = False,
             check: "Callable[[int], None] | None" = None) -> OpenResult:
        """Open ``rel``. Every check that needs no upper copy comes before the copy-up an
        open for writing makes (an ``O_TRUNC`` one copies no data: failing after it would
        lose the lower data for an open that failed). ``admitted``: the open-file budget
        (``room_for_open``) was checked for this request already (``OverlayOps.open``,
        which runs this again after a copy-up it ran first: not refused then). ``check(the
        object's immutable/append-only flags)`` before any copy-up (may refuse; an open for
        writing only)."""
        fs = self.fs
        if not admitted:
            fs.room_for_open(rel)
        if flags & _WRITE_INTENT:  # (a read-only open needs only the lookup below)
            node = fs.lookup.lookup(rel)
            if not node.exists:
                raise OSError(errno.ENOENT, "no such file", rel)
            fs.require_writable()
            if node.is_dir:
                raise OSError(errno.EISDIR, "is a directory", rel)
            if check is not None and (node.upper is not None or not stat.S_ISREG(node.st.st_mode)):
                check(fs.protection.of_node(node))
                check = None
            # (a lower regular file's flags read by its copy-up, which copies them: copyup53)
            copy = self.copy_up_for_open(rel, flags, node, check)
            if copy is None and check is not None:
                check(fs.protection.of_node(node))
            node = None  # (not held while the copy-up may wait for fds: limits23)
            if copy is not None:  # (under the namespace lock: ``CopyUpFirst``, nothing done)
                # (a copy-up that breaks a lower hard link changes this name's st_nlink and
                # st_ino with no reply carrying them: such names are never cached by the
                # kernel's attributes, see ``OverlayOps._attr_timeout``)
                copy()
        # Under the namespace lock, a copy-up is either not installed yet or installed
        # *and* its live inode rebound to the upper (never a second inode for the upper
        # copy beside the old one being rebound), and no rename or unlink can move the
        # name between the lookup and the open.
        with fs.ns_lock:
            # a read-only open of a name the kernel just looked up or listed: that lookup's
            # object, if no change of the namespace ran since (``Lookup.recent``)
            kept = None if flags & _WRITE_INTENT else fs.lookup.recent(rel)
            opened = None if kept is None else self._open_kept(rel, flags, *kept)
            if opened is None:
                node = fs.lookup.lookup(rel)
                if not node.exists:
                    raise OSError(errno.ENOENT, "no such file", rel)
                if flags & _WRITE_INTENT and (node.upper is None or node.data is not None):
                    raise OSError(errno.EIO, "open for write found no upper copy", rel)
                if faults.armed and flags & _WRITE_INTENT:
                    faults.hit("files.opening", rel)  # test-only (faults.py)
                # (the window left: a failure opening the upper copy, after an O_TRUNC
                # open's empty copy-up, answers the error with the lower data hidden)
                opened = self._open_node(node, rel, flags)
            else:
                node = kept[0]
        inode, fd, generation = opened
        if not flags & _NO_PREFETCH:
            self._prefetch(inode, fd, (node.data or node.top).st)
        return self._register(inode, flags, rel, fd, generation)

    def open_read(self, rel: str, flags: int) -> tuple[OpenResult, OverlayInode]:
        """``open`` of a read-only open (no ``O_WRONLY``, ``O_RDWR``, ``O_TRUNC``: the
        caller's guard) whose budget was checked (``admitted``), called under the namespace
        lock, and the handle's inode: the kept object of the kernel's last lookup or
        listing of ``rel`` (``Lookup.recent_kept``) opened without ``open``'s branches for
        writers (a lower one without a ``Node``: ``_open_lower_kept``, and a listed one
        relative to its directory's fd, without an ``Entry``: ``_open_listed``); else
        ``open`` itself. The same prefetch rule and handle as ``open``'s, and an inode on a
        filesystem that never shares extents is marked so (``_unshared``): its first READ
        then maps nothing (``_map`` would store the same)."""
        fs = self.fs
        parent, _, name = rel.rpartition("/")  # (``split``)
        kept = fs.lookup.recent_kept(parent, name)
        opened = None
        if kept is not None:
            if len(kept) == 2:  # a listing's: (``ListedDir``, stat)
                where, st = kept
                layer = where.layer
                head = where.head
                lrel = f"{head}/{name}" if head else name
                if not layer.writable:
                    held = where.entry()  # (held here: its ``dirfd`` stays open for the open)
                    opened = self._open_listed(rel, flags, layer, lrel, st,
                                               None if held is None else held.dirfd, name)
                else:
                    opened = self._open_kept(rel, flags, Node(rel, (Entry(layer, lrel, st),)), False)
            else:  # a lookup's: (layer, path, stat, xattr names)
                entry = Entry(kept[0], kept[1], kept[2], None, None, kept[3])
                st = entry.st
                if entry.layer.writable:
                    opened = self._open_kept(rel, flags, Node(rel, (entry,)), True)
                else:
                    opened = self._open_lower_kept(rel, flags, entry, True)
        if opened is None:
            result = self.open(rel, flags, admitted=True)
            return result, fs.handles.get(result.fh).inode
        inode, fd, generation = opened
        if inode.extents is None:  # (first: ``_prefetch`` then needs no device look-up)
            self._unshared(inode)  # (a listed one's was asked in its open's hold)
        if not flags & os.O_DIRECT:  # (``open``'s ``(node.data or node.top).st``)
            if inode.extents is NOT_SHARED:  # (``_prefetch``'s first answer)
                prefetch(fd, st)
            else:
                self._prefetch(inode, fd, st)
        return self._register_read(inode, flags, rel, fd, generation), inode

    def _open_listed(self, rel: str, flags: int, layer: Layer, lrel: str, st: os.stat_result,
                     dirfd: DirFd | None, name: str) -> tuple[OverlayInode, int, int] | None:
        """``_open_lower_kept`` of a lower file a listing kept (``lrel`` in ``layer``, its
        stat ``st``) without an ``Entry``: its identity is ``key_of_top``'s for a file of
        one link (a listing keeps no other), its number ``of_entry``'s; opened as ``name``
        in its directory's fd ``dirfd`` where that is still held (``ListedDir.dirfd``), else
        by its path (``_open_lower_kept`` itself). The same checks: the object opened is
        the one listed (else ENOENT/ESTALE: looked up afresh), no metacopy mark (read
        through the new fd)."""
        if dirfd is None:  # (no fd held of the directory any more: by its path)
            return self._open_lower_kept(rel, flags, Entry(layer, lrel, st), False)
        fs = self.fs
        dev, ino = st.st_dev, st.st_ino
        inode = fs.inodes.acquire_listed(_tuple_new(InodeKey, (dev, ino, None)),
                                         fs.inos.xino.ino(dev, ino), layer, lrel, st)
        try:
            sharing = self._sharing
            fd, generation = inode.open_listed(flags, layer, lrel, dirfd, name,
                                               None if sharing is None else sharing.never_shares)
        except OSError as e:
            fs.inodes.release(inode)
            if e.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            fs.lookup.forget_recent(rel)
            return None
        except BaseException:
            fs.inodes.release(inode)
            raise
        if self._metacopy_marked(fd):
            fs.inodes.release(inode)  # (before its fd closes: ``release``)
            os.close(fd)
            fs.lookup.forget_recent(rel)
            return None
        return inode, fd, generation

    def _open_lower_kept(self, rel: str, flags: int, entry: Entry,
                         checked: bool) -> tuple[OverlayInode, int, int] | None:
        """``_open_kept`` of a kept lower file, ``entry``, without its ``Node``: the node's
        one entry is its top, whose identity and number (``InodeNumbers.ino_of`` of a
        lower top: ``of_entry``) are the node's; no metacopy data entry (a kept node has
        none), no truncation (a read-only open). None, nothing left open, as
        ``_open_kept``'s."""
        fs = self.fs
        inode = fs.inodes.acquire(fs.identity_top(entry), fs.inos.of_entry(entry), entry)
        try:
            fd, generation = inode.open_backing(flags, via=entry)
        except OSError as e:
            fs.inodes.release(inode)
            if e.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            fs.lookup.forget_recent(rel)
            return None
        except BaseException:
            fs.inodes.release(inode)
            raise
        if not checked and self._metacopy_marked(fd):
            fs.inodes.release(inode)  # (before its fd closes: ``release``)
            os.close(fd)
            fs.lookup.forget_recent(rel)
            return None
        return inode, fd, generation

    def _metacopy_marked(self, fd: int) -> bool:
        """Whether the file just opened as ``fd`` has a metacopy mark, or its names could
        not be listed (``_open_kept``'s check of a listed file)."""
        try:
            names = os.listxattr(fd)  # (of the fd just opened: no path walk)
        except OSError as e:
            names = () if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) else None
        return names is None or self.fs.prefix + "metacopy" in names

    def _register_read(self, inode: OverlayInode, flags: int, rel: str, fd: int,
                       generation: int) -> OpenResult:
        """``_register`` of a read-only open (no ``O_TRUNC``): the same handle and the same
        KEEP_CACHE rule, in one lock hold of the inode."""
        fs = self.fs
        config = fs.config
        cache = config.cache
        handle = fs.handles.add(inode, flags, rel, fd, generation, follow=config.handles == "reopen")
        with inode.lock:  # (one hold: the version compared is the one recorded)
            keep = cache == "kernel" and inode.cached_version == inode.data_version
            inode.cached_version = inode.data_version
        return _tuple_new(OpenResult, (handle.fh, keep, cache == "shared"))

    def _unshared(self, inode: OverlayInode) -> None:
        """Mark ``inode``'s backing as mapped, nothing shared, when its filesystem is known
        never to share extents (``ExtentMap.never_shares``): what ``_map`` stores at the
        first READ, under the same rule (no data change in flight; the backing read in the
        same lock hold, so a copy-up's rebind, which clears ``extents``, is seen)."""
        sharing = self._sharing
        if sharing is None:
            return
        with inode.lock:
            if inode.extents is None and not inode.extents_busy \
                    and sharing.never_shares(inode.dev):
                inode.extents = NOT_SHARED

    def _prefetch(self, inode: OverlayInode, fd: int, st: os.stat_result) -> None:
        """``prefetch`` a file opened for reading whose reads come from its own pages: not
        one whose extents may be shared with another file (page-cache sharing serves those
        from the canonical file, and reading its own pages would cache the data twice);
        known from the filesystem type (ext4, tmpfs never share), the inode's map, or the
        map a lower file's first READ left (``ExtentMap.lower_mapping``)."""
        sharing = self._sharing
        if sharing is None or inode.extents is NOT_SHARED or not sharing.shares_on(st.st_dev, fd) \
                or not inode.in_upper and sharing.lower_mapping((st.st_dev, st.st_ino)) is NOT_SHARED:
            prefetch(fd, st)

    def _open_node(self, node: Node, rel: str, flags: int) -> tuple[OverlayInode, int, int]:
        """The live inode of ``node`` (a reference taken) and a new fd on its backing, with
        the generation; under the namespace lock."""
        fs = self.fs
        backing = node.data or node.top  # metacopy: data from below until written
        inode = fs.inodes.acquire(fs.identity(node), fs.inos.ino_of(node), backing)
        try:
            if node.data is not None:
                fs.inodes.metacopy_at(inode, rel, node.top)
            with self._truncating(inode, flags):
                fd, generation = inode.open_backing(flags, via=backing)
        except BaseException:
            fs.inodes.release(inode)
            raise
        return inode, fd, generation

    def _open_kept(self, rel: str, flags: int, node: Node,
                   checked: bool) -> tuple[OverlayInode, int, int] | None:
        """A read-only open of the kept ``node`` (``Lookup.recent``); None, nothing left open,
        when it is not what a lookup would find now: the file at its layer path is another
        one or gone (a change behind the mount's back), or, for a listed file (``checked``
        False), it has a metacopy mark (its data is below, or the lookup refuses it)."""
        try:
            inode, fd, generation = self._open_node(node, rel, flags)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            self.fs.lookup.forget_recent(rel)
            return None
        if not checked and self._metacopy_marked(fd):
            self.fs.inodes.release(inode)  # (before its fd closes: ``release``)
            os.close(fd)
            self.fs.lookup.forget_recent(rel)
            return None
        return inode, fd, generation

    def create(self, rel: str, flags: int, mode: int, caller: Caller,
               then: "Callable[[OpenResult, Node], T] | None" = None
               ) -> "tuple[OpenResult, Node, T | None]":
        """A new regular file, opened; its node as made (``Namespace.create``), and
        ``then(the open, the node)``. The handle and ``then`` are made in the creation's
        lock hold: if either fails, the file goes again (nothing made, nothing open)."""
        self.fs.room_for_open(rel)
        return self.fs.namespace.create(rel, flags, mode, caller, self._opened_new(flags, then))

    def tmpfile(self, rel: str, flags: int, mode: int, caller: Caller,
                then: "Callable[[OpenResult, Node], T] | None" = None
                ) -> "tuple[OpenResult, Node, T | None]":
        """``O_TMPFILE`` in the directory ``rel``: a new regular file with no name, opened
        (``Namespace.tmpfile``; counted in the open-file budget as any open), its node as
        made (its path names nothing), and ``then(the open, the node)``. Its inode is
        marked ``tmpfile``: LINK gives it names through its fd (``link_open``)."""
        self.fs.room_for_open(rel)
        # (no O_TMPFILE in the handle's flags: a reopen must never make another file)
        return self.fs.namespace.tmpfile(rel, flags, mode, caller,
                                         self._opened_new(flags & ~os.O_TMPFILE, then, tmpfile=True))

    def _opened_new(self, flags: int, then: "Callable[[OpenResult, Node], T] | None", *,
                    tmpfile: bool = False):
        """The ``then`` of a creation that opens (``create``, ``tmpfile``): the new file's
        handle, then ``then(the open, the node)``, made in the creation's lock hold; a
        failure closes what was opened (and the creation undoes the file)."""
        fs = self.fs

        def opened(fd: int, node: Node):
            try:
                key = fs.identity(node)
                # (before ``acquire``, which would take it: a former file of this inode
                # number left its versions, never this new file's)
                fs.inodes.forget_version(key)
                inode = fs.inodes.acquire(key, fs.inos.ino_of(node), node.top)
            except BaseException:
                os.close(fd)
                raise
            try:
                if tmpfile:
                    inode.tmpfile = True
                self.made_clean(inode, node.top.st, node.top.xattrs)
                result = self._register(inode, flags, node.rel, fd, inode.generation)
            except BaseException:
                fs.inodes.release(inode)  # (before its fd closes: ``release``)
                os.close(fd)
                raise
            try:
                return result, node, None if then is None else then(result, node)
            except BaseException:
                fs.release(result.fh)  # (closes the fd)
                raise
        return opened

    def dup_fd(self, inode: OverlayInode) -> int:
        """A new fd of an open file (one of its handles', on its current backing): for a
        change that takes the namespace lock, which a handle's lock is never held around
        (a copy-up takes that inside it); else of the upper file a metacopy file's inode
        holds, its data copied in (``_on_held_upper``). ENOENT when none is open there."""
        def reopened(fd: int) -> int:  # (the held upper file's fd is O_PATH)
            return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        return self._with_handle_fd(inode, os.dup, current=True,
                                    fallback=lambda: self._on_held_upper(inode, reopened))

    def _register(self, inode: OverlayInode, flags: int, rel: str, fd: int, generation: int) -> OpenResult:
        fs = self.fs
        handle = fs.handles.add(inode, flags, rel, fd, generation, follow=fs.config.handles == "reopen")
        if flags & os.O_TRUNC:
            self.changed(handle)
        with inode.lock:  # (one hold: the version compared is the one recorded)
            keep = not flags & os.O_TRUNC and fs.config.cache == "kernel" \
                and inode.cached_version == inode.data_version
            inode.cached_version = inode.data_version
        return OpenResult(handle.fh, keep, fs.config.cache == "shared")

    # -- I/O ------------------------------------------------------------------------------------
    def _fd(self, handle: Handle) -> int:
        # ``Handle.fd()`` inlined for the case that needs no switch (see ``Handle.bound_fd``)
        if handle.bound_generation == handle.inode.generation or not handle.follow:
            return handle.bound_fd
        fd, switched = handle.fd()
        if switched:
            self.fs.stats.add("handle_switches")
        return fd

    def read(self, fh: int, size: int, offset: int) -> bytes:
        handle = self.fs.handles.get(fh)
        data = os.pread(self._fd(handle), size, offset)
        self.fs.stats.served(len(data), (handle.inode.layer.index, handle.inode.ino))
        return data

    def readinto(self, fh: int, buf: memoryview, offset: int) -> int:
        """READ into the engine's reply buffer: the hot path of ``cache=shared`` and of every
        direct-io file, so the common case (the handle on its inode's current backing,
        nothing shared, no fault armed) takes no lock and calls no helper but ``preadv``
        and the stats."""
        handle = self._find(fh)
        if handle is None:
            raise OSError(errno.EBADF, "bad file handle")
        inode = handle.inode
        # ``Handle.fd()`` inlined for the case that needs no switch (see ``Handle.bound_fd``)
        if handle.bound_generation == inode.generation or not handle.follow:
            fd = handle.bound_fd
        else:
            fd = self._fd(handle)
        if faults.armed:
            faults.hit("file.read", inode.rel)
        sharing = self._sharing
        if sharing is not None and handle.follow:
            fx = inode.extents
            if fx is not NOT_SHARED:
                if fx is None:
                    fx = self._map(inode, fd)
                if fx is not NOT_SHARED:
                    plan = sharing.plan(fx, offset, len(buf))
                    if plan is not None:
                        return self._read_plan(inode, fd, plan, buf, offset)
        n = os.preadv(fd, [buf], offset)
        self._served(n, (inode.layer.index, inode.ino))
        return n

    def extents_of(self, handle: Handle):
        """The sharing map of the handle's current backing, mapped now if not yet (needs
        ``fs.sharing``): ``FileExtents``, ``NOT_SHARED``, or None without FIEMAP."""
        fd = self._fd(handle)
        fx = handle.inode.extents
        return fx if fx is not None else self._map(handle.inode, fd)

    def _map(self, inode: OverlayInode, fd: int):
        """Map ``fd`` (the inode's backing) with FIEMAP; register canonical owners of its
        extents. The result serves this read; it is kept for later reads only if it is
        current: no data change ran or started meanwhile (``sharing.changing``) and ``fd``
        is still the inode's backing (a copy-up may have rebound it since). A backing on a
        filesystem that never shares extents (``ExtentMap.shares_on``) is not mapped."""
        with inode.lock:
            epoch, busy = inode.extents_epoch, inode.extents_busy
            layer, rel, backing = inode.layer, inode.rel, inode.backing
        sharing = self.fs.sharing
        if sharing.never_shares(backing[0]):
            # (whatever ``fd`` is, a plain read of it is right; what is kept below is said
            # of ``backing``, kept only while that is still the inode's backing)
            key: tuple[int, int] = backing
            result: object = NOT_SHARED
        else:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            result = self._map_fd(fd, st, layer, rel) if sharing.shares_on(key[0], fd) else NOT_SHARED
        with inode.lock:
            if not busy and inode.extents_epoch == epoch and inode.backing == key:
                inode.extents = result
        return result

    def _map_fd(self, fd: int, st: os.stat_result, layer, rel: str) -> object:
        """FIEMAP ``fd`` (``layer``'s ``rel``, ``st`` its fstat just taken) unless a lower
        file's mapping is remembered; register what it shares. ``FileExtents`` or NOT_SHARED."""
        sharing = self.fs.sharing
        upper = layer.writable
        key = (st.st_dev, st.st_ino)
        known = None if upper else sharing.lower_mapping(key)
        fx = map_file(fd, st) if known is None else known
        result: object = NOT_SHARED
        if fx is not None and fx is not NOT_SHARED and fx.has_shared:
            if not upper:  # a no-op when already registered; redone if the map was dropped
                sharing.register(Canonical(layer, rel, fx.dev, fx.ino), fx.extents)
            elif layer is self.fs.stack.upper:  # (not an index=on entry in workdir/index,
                self.fs.register_origin(rel)   # which has no merged path to find it by)
            # (owners whose blocks changed behind the mount are forgotten: reads never go to
            # blocks another file may hold by now; if they keep changing, read the own file)
            result = fx if sharing.verify(fx) else NOT_SHARED
        if known is None and not upper:
            sharing.remember_lower(key, result)
        return result

    def _read_plan(self, inode: OverlayInode, fd: int, plan: list[Piece], buf: memoryview,
                   offset: int) -> int:
        done = shared = 0
        for piece in plan:
            view = buf[done:done + piece.length]
            n = 0
            if piece.fd is not None:
                n = os.preadv(piece.fd, [view], piece.offset)
                shared += n
            if n < piece.length:  # own data, or the canonical file ended early
                n += os.preadv(fd, [view[n:]], offset + done + n)
            done += n
            if n < piece.length:
                break
        self.fs.stats.served(done, (inode.layer.index, inode.ino), shared)
        return done

    def write(self, fh: int, data: bytes, offset: int) -> int:
        handle = self.fs.handles.get(fh)
        fd = self._fd(handle)
        if faults.armed:
            faults.hit("file.write", handle.inode.rel, progress=offset)
        with self._unshare(handle, offset, len(data)):
            n = os.pwrite(fd, data, offset)
        self.fs.stats.add("bytes_written", n)
        self.changed(handle)
        return n

    def privileges_known_clean(self, fh: int) -> bool:
        """Whether the handle's file is known to have nothing a write would strip."""
        inode = self.fs.handles.get(fh).inode
        with inode.lock:
            return inode.privs_clean == inode.privs_epoch

    def made_clean(self, inode: OverlayInode, st: os.stat_result,
                   names: frozenset[str] | None) -> None:
        """The file a creation just made (its stat ``st`` and xattr names ``names`` read
        through its fd after every change made to it, in the creation's lock hold) is
        known clean, as ``_capability_fd`` marks it at its first GETXATTR of
        ``security.capability`` (which then reads nothing: untar asks before the write and
        again before the chown), when neither shows anything a write would strip (no
        capability, no setuid/setgid bit) and ``inode`` is the new one: its only reference,
        so no handle of another object shares it and no chmod or setxattr moved its
        ``privs_epoch`` since those reads (changes by name wait for the lock; a new file
        has no other handle). Not under an ownership mapping or override (the stored mode
        decides: ``_capability_fd``'s rule). A later chmod, setxattr or copy-up voids the
        mark as any (``privs_may_grow``, ``rebind``)."""
        if names is None or killpriv.CAPABILITY_XATTR in names \
                or st.st_mode & killpriv.PRIVILEGED_BITS or self.fs.ownership.active:
            return
        with inode.lock:
            if inode.refs == 1:
                inode.privs_clean = inode.privs_epoch

    def capability(self, fh: int) -> bytes | None:
        """``security.capability`` of the file open as ``fh``, read through the handle's
        fd (ENODATA when absent) rather than by a lookup of a name: the kernel asks for it
        before every write and chown of an open file (``file_remove_privs``,
        ``notify_change``). None when the handle cannot answer for its inode: a backing
        not in the upper (a lower or metacopy file: the name's top entry decides), a
        handle left on an older backing (``handles=`` other than reopen) or closed
        meanwhile. An upper backing never moves again, and a file known to have nothing
        a write would strip (``kill_privs``) has no capability until a chmod or setxattr
        says otherwise."""
        handle = self.fs.handles.get(fh)
        inode = handle.inode
        if not inode.in_upper:
            return None
        with inode.lock:
            epoch = inode.privs_epoch
            if inode.privs_clean == epoch:
                raise OSError(errno.ENODATA, "no such attribute", killpriv.CAPABILITY_XATTR)
        return handle.with_fd(lambda fd: self._capability_fd(inode, fd, epoch))

    def capability_short(self, fh: int) -> bytes | int | None:
        """``capability`` for the engine's short GETXATTR (``OverlayOps._capability_short``):
        ENODATA as an int where ``capability`` raises it, None where it answers None or
        raises anything else (a handle released meanwhile: the caller asks ``capability``
        of each handle then)."""
        handle = self._find(fh)
        if handle is None:
            return None
        inode = handle.inode
        if not inode.layer.writable:  # (``in_upper``)
            return None
        with inode.lock:
            epoch = inode.privs_epoch
            if inode.privs_clean == epoch:
                return _ENODATA
        try:
            return handle.with_fd(lambda fd: self._capability_fd(inode, fd, epoch))
        except OSError as e:
            return _ENODATA if e.errno == _ENODATA else None

    def _capability_fd(self, inode: OverlayInode, fd: int, epoch: int) -> bytes:
        """``capability`` read through ``fd``; when absent and the file has no setuid/setgid
        bit either, the file is known clean (``kill_privs``) from then on, so the next
        question (untar: the kernel asks before the write and again before the chown) and
        a killing write or chown read nothing. ``epoch``: ``privs_epoch`` read before the
        file, as in ``_kill``: a chmod or setxattr meanwhile voids the mark (the handle is
        open, so its inode is the one they bump). Not under an ownership mapping or
        override, where the stored mode decides (``killpriv.kill_fd``)."""
        try:
            return os.getxattr(fd, killpriv.CAPABILITY_XATTR)
        except OSError as e:
            if e.errno == errno.ENODATA and not self.fs.ownership.active \
                    and not os.fstat(fd).st_mode & killpriv.PRIVILEGED_BITS:
                with inode.lock:
                    if inode.privs_epoch == epoch:
                        inode.privs_clean = epoch
            raise

    def setattr_open(self, fh: int, *, mode: int | None, ids: tuple[int, int] | None,
                     times: tuple[int, int] | None,
                     writer: killpriv.Writer | None) -> tuple[Attr, bool] | None:
        """``Attributes.setattr`` of a named file done through its open handle ``fh``
        instead of a lookup of the name (untar's utimens, chown and chmod of each file come
        before its close): the same steps in the same order, then the attributes after
        the change and whether anything was stripped. None, nothing done, unless the
        handle is open on its inode's current upper backing, a regular file with one
        link, and owners and modes are shown as stored (no mapping, squashing or override
        xattr): those take the name's path, which computes link counts and shown owners."""
        if self.fs.ownership.active:
            return None
        handle = self.fs.handles.get(fh)
        inode = handle.inode
        if not inode.in_upper or inode.meta_rel is not None:
            return None
        return handle.with_fd(lambda fd: self._setattr_fd(inode, fd, mode, ids, times, writer))

    def _setattr_fd(self, inode: OverlayInode, fd: int, mode: int | None,
                    ids: tuple[int, int] | None, times: tuple[int, int] | None,
                    writer: killpriv.Writer | None) -> tuple[Attr, bool] | None:
        fs = self.fs
        st = os.fstat(fd)
        if st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
            return None
        if writer is not None or mode is not None or ids is not None or times is not None:
            fs.require_writable()
        if ids is not None:
            ids = fs.ownership.chown_ids(*ids)  # EOVERFLOW before anything is stripped
        after, killed = self._setattr_steps_fd(inode, fd, st, mode, ids, times, writer)
        return Attr(after, inode.ino), killed

    def setattr_short(self, fh: int, mode: int | None, ids: tuple[int, int] | None,
                      times: tuple[int, int] | None, writer: killpriv.Writer | None
                      ) -> tuple[os.stat_result, int, bool] | None:
        """``setattr_open`` for the engine's short SETATTR (``OverlayOps._setattr_short``,
        never set where owners are shown mapped, nor on a read-only mount): the same checks
        and steps, answering the file's stat after them, its inode number and whether
        anything was stripped, with no ``Attr``; None, nothing done, wherever
        ``setattr_open`` would go by name (or the handle was released meanwhile)."""
        handle = self._find(fh)
        if handle is None:
            return None
        inode = handle.inode
        if not inode.layer.writable or inode.meta_rel is not None:
            return None
        return handle.with_fd_call(self._setattr_fd_short, inode, mode, ids, times, writer)

    def _setattr_fd_short(self, fd: int, inode: OverlayInode, mode: int | None,
                          ids: tuple[int, int] | None, times: tuple[int, int] | None,
                          writer: killpriv.Writer | None) -> tuple[os.stat_result, int, bool] | None:
        st = os.fstat(fd)
        if st.st_nlink != 1 or st.st_mode & 0o170000 != _S_IFREG:
            return None
        after, killed = self._setattr_steps_fd(inode, fd, st, mode, ids, times, writer)
        return after, inode.ino, killed

    def _setattr_steps_fd(self, inode: OverlayInode, fd: int, st: os.stat_result,
                          mode: int | None, ids: tuple[int, int] | None,
                          times: tuple[int, int] | None,
                          writer: killpriv.Writer | None) -> tuple[os.stat_result, bool]:
        """The steps of ``_setattr_fd`` and ``_setattr_fd_short`` once checked (``ids``
        stored-side, ``st`` the file's stat before): the stat after, whether anything was
        stripped."""
        killed = False
        if writer is not None:
            killed = self._kill(inode, lambda: fd, writer)
        if mode is not None:
            os.chmod(fd, mode & 0o7777)
            inode.privs_may_grow()
        if ids is not None:
            os.chown(fd, *ids)
        if times is not None:
            # (the stat before the chmod and chown: they change neither time)
            os.utime(fd, ns=resolve_times(times, st))
        after = os.fstat(fd)
        if not self.fs.inos.carry(st, after):  # (the number's answer, under the new ctime)
            self._numbered_afresh(inode, fd, after)
        return after, killed

    def _numbered_afresh(self, inode: OverlayInode, fd: int, after: os.stat_result) -> None:
        """Keep the inode-number answer of the changed upper file under its new ctime (as
        a change by name does when it answers with ``of_node``) where none was kept under
        the stat before (``InodeNumbers.carry``, asked first): read afresh through ``fd``,
        its xattr names listed first (absent origin marks then cost no call). Never by
        ``inode.rel``: the name the file was opened by may be gone, or another file's by
        now, whose origin would be kept as this file's."""
        try:
            names: frozenset[str] | None = frozenset(os.listxattr(fd))
        except OSError as e:
            names = frozenset() if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) else None
        own = DirFd(fd, owned=False)  # (the file's own fd, read as ``Entry.dirfd`` is)
        self.fs.inos.recorded(Entry(inode.layer, inode.rel, after, own, None, names))

    def kill_privs(self, fh: int, writer: killpriv.Writer) -> bool:
        """A write, truncate or ``O_TRUNC`` open by ``writer`` without CAP_FSETID (the
        request's kill flag): strip setuid/setgid and the capability (``killpriv``).
        Cheap for a burst of writes: once the file has nothing left to strip, the inode
        remembers it until a chmod or setxattr. True if something was stripped."""
        handle = self.fs.handles.get(fh)
        return self._kill(handle.inode, lambda: self._fd(handle), writer)

    def kill_privs_open(self, inode: OverlayInode, writer: killpriv.Writer) -> bool:
        """``kill_privs`` of an open file by node (no name left, no fh in the request),
        through one of its handles held against that handle's close."""
        return self._with_handle_fd(inode, lambda fd: self._kill(inode, lambda: fd, writer),
                                    current=True)

    def _kill(self, inode: OverlayInode, fd_of: Callable[[], int], writer: killpriv.Writer) -> bool:
        """``kill_privs`` of ``inode`` through the fd ``fd_of()`` gives (asked only if the
        file is not known clean)."""
        if not inode.in_upper:  # (a write handle always is; a lower file is never changed)
            return False
        with inode.lock:
            epoch = inode.privs_epoch
            if inode.privs_clean == epoch:
                return False
        done = killpriv.kill_fd(self.fs.ownership, inode.layer, fd_of(), writer)
        if done.clean:
            with inode.lock:
                if inode.privs_epoch == epoch:  # no chmod/setxattr came in between
                    inode.privs_clean = epoch
        if done.changed:
            self.fs.stats.add("privileges_cleared")
        return done.changed

    @staticmethod
    def _unshare(handle: Handle, offset: int, length: int) -> AbstractContextManager:
        """Around a write: [offset, offset+length) leaves the sharing map *before* the file
        changes (the whole map for O_APPEND, whose offset the backing file decides)."""
        if handle.flags & os.O_APPEND:
            return changing(handle.inode)
        return changing(handle.inode, offset, offset + length)

    @staticmethod
    def _truncating(inode: OverlayInode, flags: int) -> AbstractContextManager:
        """Around the reopen of an open(O_TRUNC): the sharing map goes before the backing
        file is truncated, so no read is redirected to the old data in between."""
        return changing(inode) if flags & os.O_TRUNC else scopes.nullcontext()

    def changed(self, handle: Handle) -> None:
        self.fs.data_changed(handle.inode)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE (the kernel answers the others itself) on the handle's
        *current* backing, so a handle opened before a copy-up sees the copy's holes.
        The position moved is the daemon's fd's, which no I/O uses (all of it is pread/
        pwrite at the kernel's offsets)."""
        return os.lseek(self._fd(self.fs.handles.get(fh)), offset, whence)

    def copy_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int) -> int:
        """COPY_FILE_RANGE between two open files of the mount: ``os.copy_file_range``
        between their current backings (a reflink where the filesystem can: XFS, btrfs,
        same filesystem), else a copy through the daemon of at most ``COPY_CHUNK`` bytes
        (a short count: callers loop). The destination follows every rule of a write:
        its sharing map loses the range before the data changes, the whole map if the
        copy may grow the file, and its data version moves."""
        src, dst = self.fs.handles.get(fh_in), self.fs.handles.get(fh_out)
        fd_in, fd_out = self._fd(src), self._fd(dst)
        faults.hit("file.write", dst.inode.rel, progress=off_out)
        grows = off_out + length > os.fstat(fd_out).st_size
        with changing(dst.inode) if grows else changing(dst.inode, off_out, off_out + length):
            try:
                n = os.copy_file_range(fd_in, fd_out, length, off_in, off_out)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                n = self._copy_through(fd_in, off_in, fd_out, off_out, min(length, COPY_CHUNK))
        self.fs.stats.add("bytes_copied", n)
        if n:
            self.changed(dst)
        return n

    @staticmethod
    def _copy_through(fd_in: int, off_in: int, fd_out: int, off_out: int, length: int) -> int:
        """Layers on different filesystems: read and write (at most ``length`` bytes)."""
        data = os.pread(fd_in, length, off_in)
        done = 0
        while done < len(data):
            done += os.pwrite(fd_out, memoryview(data)[done:], off_out + done)
        return done

    def truncate(self, fh: int, length: int) -> None:
        handle = self.fs.handles.get(fh)
        fd = self._fd(handle)
        with changing(handle.inode):  # a size change: the whole sharing map goes first
            os.ftruncate(fd, length)
        self.changed(handle)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        handle = self.fs.handles.get(fh)
        fd = self._fd(handle)
        with changing(handle.inode):  # punch, zero, collapse, insert: any of them remaps
            sysapi.fallocate(fd, mode, offset, length)
        self.changed(handle)

    def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._fd(self.fs.handles.get(fh))
        if not self.fs.config.fsync:
            return  # fsync=0 (fuse-overlayfs): the data reaches the disk at writeback
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def flush(self, fh: int) -> None:
        self._fd(self.fs.handles.get(fh))

    # -- an open file with no name left (unlinked): reached through an open handle's fd --
    def _with_handle_fd(self, inode: OverlayInode, action: Callable[[int], T],
                        current: bool = False, fallback: Callable[[], T] | None = None) -> T:
        """``action(fd)`` on the fd of one of the inode's open handles (moved to the current
        backing first where handles follow copy-ups), held against that handle's close: its
        RELEASE, running meanwhile, cannot free the fd number for another open to take
        before ``action`` is done (which would then change that file). ENOENT when none is
        open. ``current``: only a handle on the inode's current backing, for a change (a
        ``bind-at-open`` handle opened before a copy-up stays on the lower file, which a
        change must never reach: review18, a chmod or LINK of a nameless copied-up file);
        ENOENT when none is. Else (a read) one on the current backing too where one is open,
        any other only where none is (review18: a GETATTR by node showed the lower file's
        size through a bind-at-open handle while the writer's handle was on the upper copy).
        ``fallback()`` is answered instead of ENOENT when one is given."""
        handles = self.fs.handles.for_inode(inode)
        for on_current in (True,) if current else (True, False):
            for handle in handles:
                try:
                    self._fd(handle)
                except OSError:
                    continue  # closed meanwhile
                done = handle.with_fd(lambda fd: (action(fd),), current=on_current)
                if done is not None:
                    return done[0]
        if fallback is not None:
            return fallback()
        raise OSError(errno.ENOENT, "file no longer open")

    def _shown(self, attr: Attr, inode: OverlayInode, fd: int) -> Attr:
        own = self.fs.ownership
        return own.show(attr, own.stored_fd(inode.layer, attr.st, fd)) if own.active else attr

    def getattr_inode(self, inode: OverlayInode) -> Attr:
        """Attributes of an open file that has no name left: an upper file's with no links
        (whatever a bind-at-open handle's lower file says), a lower file's with the count
        ``_nameless_lower_nlink`` gives."""
        if inode.meta_file is not None and not inode.in_upper:
            return self._nameless_metacopy_attr(inode)

        def attr(fd: int) -> Attr:
            st = os.fstat(fd)
            nlink = 0 if inode.in_upper else self._nameless_lower_nlink(st)
            return self._shown(Attr(st, inode.ino, nlink), inode, fd)
        if inode.meta_file is not None and not self._on_current(inode):
            # (its data copied in, every handle bound to the lower data: as ``_on_nameless``)
            return self._with_meta_file(inode, lambda meta: attr(meta.fd))
        return self._with_handle_fd(inode, attr)

    def _nameless_lower_nlink(self, st: os.stat_result) -> int | None:
        """The link count of a lower file (``st``: its stat) whose names in the mount went,
        never copied up: the lower file's own (None), as the kernel overlay shows it (its
        names below are hidden by whiteouts, not gone; the overlay's on-disk format is the
        kernel's, and tools on it see this count there already); a lower hard link under
        index=on, whose count is the index's names left, all gone: 0."""
        return 0 if self.fs.index is not None and st.st_nlink > 1 else None

    def _nameless_metacopy_attr(self, inode: OverlayInode) -> Attr:
        def attr(meta: MetaFile) -> Attr:
            data = inode.layer.lstat(inode.rel)  # a lower file: its path never changes
            return self._metacopy_attr(inode, meta, 0 if data is None else data.st_blocks)
        return self._with_meta_file(inode, attr)

    def _with_meta_file(self, inode: OverlayInode, action: Callable[[MetaFile], T]) -> T:
        """``action(meta)`` with the upper file of an open metacopy file (data still below)
        held against the inode's last release, which, in another thread, closes it."""
        if not self.fs.inodes.hold(inode):
            raise OSError(errno.ENOENT, "file no longer open")
        try:
            meta = inode.meta_file
            if meta is None:
                raise OSError(errno.ENOENT, "file no longer open")
            return action(meta)
        finally:
            self.fs.inodes.release(inode)

    def _metacopy_attr(self, inode: OverlayInode, meta: MetaFile, blocks: int) -> Attr:
        """A metacopy file's attributes, from its upper file, whatever happened to its name
        (nlink 0 when it has none left; under index=on the index's count, when it is an
        index entry: a lower hard link copied up metadata-only); ``blocks`` are its data's."""
        st = os.fstat(meta.fd)
        nlink = 0 if st.st_nlink == 0 else None
        index = self.fs.index
        if nlink is None and index is not None and stat.S_ISREG(st.st_mode):
            shared = index.of_upper(Entry(meta.layer, inode.meta_rel or inode.rel, st), meta.fd)
            if shared is not None:
                nlink = index.nlink(shared)
        attr = Attr(st, inode.ino, nlink, blocks)
        own = self.fs.ownership
        return own.show(attr, own.stored_fd(meta.layer, st, meta.fd)) if own.active else attr

    def _on_nameless(self, inode: OverlayInode, action, flags: int = os.O_RDONLY) -> None:
        """Run ``action(fd, layer)`` on a new fd (``flags``) of the nameless file's backing
        in ``layer``; for a metacopy file whose data is still below, on its upper file
        (its attributes; a change of its data, ``O_WRONLY``, copies the data in first:
        ``copy_data_nameless``). A lower file: EEXIST, as the kernel overlay answers (its
        copy-up finds the name taken by the whiteout or the file renamed over it). EROFS
        first on a read-only mount (every caller changes the file)."""
        self.fs.require_writable()
        if not inode.in_upper:
            if not inode.upper_meta:  # (a lower file, or a lower layer's metacopy file)
                raise _not_copied_up(inode)
            if flags == os.O_RDONLY:
                return self._with_meta_file(
                    inode, lambda meta: _reopened(meta.fd, flags, action, meta.layer))
            self.copy_data_nameless(inode)

        def run(handle_fd: int) -> None:
            faults.hit("files.nameless", inode.rel)  # test-only (faults.py)
            _reopened(handle_fd, flags, action, inode.layer)

        self._with_handle_fd(inode, run, current=True,
                             fallback=lambda: self._on_held_upper(inode, run))

    def _on_held_upper(self, inode: OverlayInode, action: Callable[[int], T]) -> T:
        """``action(fd)`` on the upper file a metacopy file's inode holds (``MetaFile``, an
        ``O_PATH`` fd), its data copied in since, where no handle is on it (each bound to
        the lower data, ``handles=bind-at-open``): as ``_reopen_current`` reopens it.
        ENOENT for any other inode."""
        def on(meta: MetaFile) -> T:
            if not inode.in_upper or meta.layer is not inode.layer:
                raise OSError(errno.ENOENT, "file no longer open")
            return action(meta.fd)
        return self._with_meta_file(inode, on)

    def _on_current(self, inode: OverlayInode) -> bool:
        """Whether one of the inode's open handles is on its current backing (or follows
        copy-ups, and so moves there)."""
        return any(h.follow or h.bound_generation == inode.generation
                   for h in self.fs.handles.for_inode(inode))

    def chmod_inode(self, inode: OverlayInode, mode: int) -> None:
        self._on_nameless(inode, lambda fd, layer: self.fs.ownership.chmod_fd(layer, fd, mode))
        inode.privs_may_grow()

    def chown_inode(self, inode: OverlayInode, uid: int, gid: int) -> None:
        """``uid``/``gid`` as the kernel gives them (shown side, -1: unchanged)."""
        uid, gid = self.fs.ownership.chown_ids(uid, gid)
        self._on_nameless(inode,
                          lambda fd, layer: self.fs.ownership.chown_fd(layer, fd, uid, gid))

    def utimens_inode(self, inode: OverlayInode, times: tuple[int, int] | None) -> None:
        self._on_nameless(inode, lambda fd, layer: self.fs.attrs.utime_fd(fd, times))

    # -- xattrs of an open file with no name left (FUSE sends them by node, without a handle)
    def _nameless_xattr_read(self, inode: OverlayInode, read: Callable[[str], T]) -> T:
        """``read(magic link)`` of the file whose xattrs the nameless file shows: its upper
        file (a metacopy one's whose data is still below too), else its lower file."""
        if self.fs.config.noxattrs:
            raise OSError(errno.ENOTSUP, "extended attributes are off (noxattrs=1)")
        if not inode.in_upper and inode.meta_file is not None:
            return self._with_meta_file(inode, lambda meta: read(f"/proc/self/fd/{meta.fd}"))
        return self._with_handle_fd(inode, lambda fd: read(f"/proc/self/fd/{fd}"))

    def read_real_inode(self, inode: OverlayInode, action: Callable[[int, Layer], T]) -> T:
        """``action(fd, layer)`` on a new read-only fd of the real file a nameless file
        shows (as ``_nameless_xattr_read``: its upper file, a metacopy one's whose data is
        still below too, else its lower file): its flags, for lsattr."""
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
        if not inode.in_upper and inode.meta_file is not None:
            return self._with_meta_file(inode, lambda meta: _reopened(meta.fd, flags, action, meta.layer))
        return self._with_handle_fd(inode, lambda fd: _reopened(fd, flags, action, inode.layer))

    def change_real_inode(self, inode: OverlayInode, action: Callable[[int, Layer], None]) -> None:
        """``action(fd, layer)`` on a new read-only fd of a nameless file's upper file (EEXIST
        for a lower one, as the kernel overlay's copy-up answers: ``_on_nameless``): chattr."""
        self._on_nameless(inode, action)

    def getxattr_inode(self, inode: OverlayInode, name: str) -> bytes:
        if is_private_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute", name)
        return self._nameless_xattr_read(inode, lambda link: getxattr_at(link, name))

    def listxattr_inode(self, inode: OverlayInode) -> list[str]:
        return self._nameless_xattr_read(inode, listxattr_at)

    def setxattr_inode(self, inode: OverlayInode, name: str, value: bytes, flags: int,
                       kill_sgid: bool = False) -> None:
        """As ``Attributes.setxattr`` (``kill_sgid``: ``Attributes.kill_sgid``'s case), on
        the upper file; EEXIST for a lower one (``_on_nameless``)."""
        self._nameless_change(name)

        self._on_nameless(inode, lambda fd, layer: setxattr_fd(
            self.fs.ownership, layer, fd, name, value, flags, kill_sgid))
        inode.privs_may_grow()

    def removexattr_inode(self, inode: OverlayInode, name: str) -> None:
        self._nameless_change(name)
        self._on_nameless(inode, lambda fd, layer: os.removexattr(fd, name))

    def _nameless_change(self, name: str) -> None:
        self.fs.require_writable()
        if self.fs.config.noxattrs:
            raise OSError(errno.ENOTSUP, "extended attributes are off (noxattrs=1)")
        if is_private_xattr(name):
            raise OSError(errno.EPERM, "overlay-private attribute", name)

    def truncate_inode(self, inode: OverlayInode, length: int) -> None:
        def cut(fd: int, layer) -> None:
            with changing(inode):
                os.ftruncate(fd, length)
        self._on_nameless(inode, cut, os.O_WRONLY)
        with inode.lock:
            inode.data_version += 1

    def copy_data_nameless(self, inode: OverlayInode, *, keep_times: bool = False) -> None:
        """The data copy-up of an open metacopy file whose name went, before a change of its
        data (an open for writing, a truncate): the lower data into its upper file, which
        the inode holds (``MetaFile``), as the kernel overlay copies it into the unlinked
        upper file; the inode and its handles move there (``OverlayFS.nameless_data_copied``),
        so every handle reads what is written after. ENOENT when no handle holds it.
        ``keep_times``: ``CopyUp._fill_metacopy``'s (the copy before a hard link,
        ``copy_data_to_link``)."""
        fs = self.fs
        if not fs.inodes.hold(inode):
            raise OSError(errno.ENOENT, "file no longer open")
        try:
            fs.copyup.copy_data_nameless(
                inode, lambda entry: fs.nameless_data_copied(inode, entry), keep_times=keep_times)
        finally:
            fs.inodes.release(inode)

    def copy_data_to_link(self, inode: OverlayInode) -> bool:
        """Before LINK of an open metacopy file whose data is below and whose names the mount
        knows all went: whether it can be linked, that is whether its upper file has a name
        left (an upper hard link the kernel's ``ln`` of a metacopy file made, never looked
        up); with none left the link fails anyway (ENOENT, the kernel's answer too). Its
        upper file is then linked as it is (``link_fd``), metadata only as the kernel
        overlay's, where it has an absolute redirect (its data found from any name: the
        kernel's ``ovl_set_link_redirect`` writes nothing then), as every link of a
        metacopy file leaves one; else (one made otherwise: the kernel would write the
        redirect of the name it was opened by, which the inode does not keep) its data is
        copied in first (``copy_data_nameless``)."""
        name = self.fs.prefix + "redirect"
        linked, redirect = self._with_meta_file(inode, lambda meta: (
            os.fstat(meta.fd).st_nlink > 0, meta.layer.getxattr_fd(meta.fd, name)))
        if not linked:
            return False
        if not (redirect or b"").startswith(b"/"):
            self.copy_data_nameless(inode, keep_times=True)
        return True

    def link_fd(self, inode: OverlayInode) -> int:
        """A new fd of the open file ``inode`` for a LINK of it (``Namespace.link_open``): of
        its upper file as it is (``O_PATH``) where that is a metacopy file's, its data below
        (``copy_data_to_link``: never a handle's, which is on the lower data), else
        ``dup_fd``'s."""
        if not inode.in_upper and inode.upper_meta:
            return self._with_meta_file(inode, lambda meta: os.dup(meta.fd))
        return self.dup_fd(inode)

    def open_inode(self, inode: OverlayInode, flags: int) -> OpenResult:
        """OPEN of a file with no name left (``open("/proc/self/fd/N")`` of an unlinked,
        renamed-over or unnamed ``O_TMPFILE`` file): a new handle of ``inode`` on a new fd
        of its *current* backing, opened through the magic link of one of its handles' fd
        that is on that backing (never by path, never an older backing a handle kept under
        ``handles=bind-at-open``; ENOENT when none is). ``O_TRUNC`` empties it (an upper
        file). Write access to a file whose data is still below needs a copy-up: EEXIST
        for a lower file, as the kernel overlay answers (its copy-up needs the name, taken
        by the whiteout or the file renamed over it); a metacopy one has its data copied
        into its upper file first, as the kernel overlay does (``copy_data_nameless``).
        The open-file budget was checked by the caller (``OverlayOps.open``)."""
        fs = self.fs
        if flags & _WRITE_INTENT:
            fs.require_writable()
            if not inode.in_upper and not inode.upper_meta:
                raise _not_copied_up(inode)
        # creation flags mean nothing here (the file exists; O_TMPFILE would make another),
        # and O_NOFOLLOW would refuse the magic link itself
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_TMPFILE | os.O_NOFOLLOW)
        if not fs.inodes.hold(inode):  # (the reference the new handle keeps)
            raise OSError(errno.ENOENT, "file no longer open")
        try:
            if flags & _WRITE_INTENT and not inode.in_upper:
                self.copy_data_nameless(inode)  # (a metacopy file: its data in first)
            with self._truncating(inode, flags):
                fd, generation, path = self._reopen_current(inode, flags)
            try:
                return self._register(inode, flags, path, fd, generation)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            fs.inodes.release(inode)
            raise

    def _reopen_current(self, inode: OverlayInode, flags: int) -> tuple[int, int, str]:
        """A new fd (``flags``, filtered as any backing fd's) of the inode's current backing
        through one of its handles on it, the generation it belongs to, and the name that
        handle was opened by (for messages). The new fd is checked to be that backing: a
        copy-up through another name of the object (index=on) may rebind the inode between
        the generation read and the open (then again, through a handle moved to the new
        backing), or after the check (the new handle then follows it as any other)."""
        flags = flags & OPEN_FLAGS | os.O_CLOEXEC

        def reopen(fd: int) -> tuple[int, int]:
            generation = inode.generation  # (the handle is on it: ``with_fd(current=True)``)
            new = os.open(f"/proc/self/fd/{fd}", flags)
            st = os.fstat(new)
            if (st.st_dev, st.st_ino) != inode.backing:
                os.close(new)
                raise StaleBacking(errno.ESTALE, "backing file moved", inode.rel)
            return new, generation

        for attempt in (1, 2, 3):
            for handle in self.fs.handles.for_inode(inode):
                if handle.follow:
                    try:
                        self._fd(handle)  # (a following handle moves to the current backing)
                    except OSError:
                        continue  # closed meanwhile
                try:
                    done = handle.with_fd(reopen, current=True)
                except StaleBacking:
                    if attempt == 3:
                        raise
                    break  # (rebound meanwhile: all over again)
                if done is not None:
                    return (*done, handle.path)
            else:
                break
        if inode.meta_file is not None and inode.in_upper and inode.meta_rel is not None:
            # a metacopy file's upper file, its data copied in, no handle on it (all bound
            # to the lower data, ``handles=bind-at-open``): through the fd the inode holds
            return (*inode.open_backing(flags), inode.meta_rel)
        raise OSError(errno.ENOENT, "no open handle on the file's current backing")

    def getattr(self, fh: int) -> Attr:
        handle = self.fs.handles.get(fh)
        return self._getattr(handle.inode, self._fd(handle))

    def getattr_open(self, inode: OverlayInode) -> Attr:
        """``getattr`` of an open file by node (its kernel node has no name the table
        knows), through one of its handles held against that handle's close."""
        return self._with_handle_fd(inode, lambda fd: self._getattr(inode, fd))

    def _getattr(self, inode: OverlayInode, fd: int) -> Attr:
        """Attributes of the file open as ``fd`` (a handle's of ``inode``)."""
        rel, meta = inode.meta_rel, inode.meta_file
        if rel is not None and not inode.in_upper:  # attributes live in the upper
            node = self.fs.lookup.lookup(rel)
            # by its name while that still shows this file (a merged hard link's count
            # is the name's); a name replaced, moved or removed: by the held upper file
            same = node.exists and node.data is not None and (
                meta is None or same_file(node.st, os.fstat(meta.fd)))
            if same:
                return self.fs.attrs.of_node(node, rel)
            if meta is not None:
                return self._metacopy_attr(inode, meta, os.fstat(fd).st_blocks)
        st = os.fstat(fd)
        nlink = self._nameless_lower_nlink(st) if inode.unlinked and not inode.in_upper else None
        index = self.fs.index
        # (an index entry whose upper names are all gone has one link: its count is the
        # names left below, 0 when none is)
        if index is not None and inode.in_upper and (st.st_nlink > 1 or inode.linked) \
                and stat.S_ISREG(st.st_mode):
            inode.linked = True
            entry = Entry(inode.layer, inode.rel, st)
            shared = entry if inode.layer is index.work else index.of_upper(entry, fd)
            if shared is not None:
                nlink = index.nlink(shared)
        return self._shown(Attr(st, inode.ino, nlink), inode, fd)

    def release(self, fh: int, dying: "Callable[[], None] | None" = None) -> None:
        """Close the handle ``fh``. ``dying``: called before its fd closes when that fd is
        the last reference of an upper file with no link left (an O_TMPFILE file never
        linked, an unlinked one), which the close frees."""
        handle = self.fs.handles.pop(fh)
        # the inode leaves the table first: the handle's fd may be the last reference of
        # an unlinked file, whose inode number the upper filesystem may give a file made
        # meanwhile (another worker's create) as soon as it closes; the table is keyed by
        # that number, and the new file must not find the dying inode there (nor the
        # kernel's node table its node: ``dying``)
        try:
            inode = handle.inode
            self.fs.inodes.release(inode)
            if dying is not None and inode.refs <= 0 and inode.in_upper \
                    and _links(handle.current_fd()) == 0:
                dying()
        finally:
            handle.close()


def _not_copied_up(inode: OverlayInode) -> OSError:
    """The error of a change of a lower file with no name left, which needs a copy-up: the
    kernel overlay's answers, EEXIST (its copy-up finds the name taken: the whiteout, or
    the file renamed over it), ENOENT when its directory was removed too (the copy-up of
    that parent fails first)."""
    return OSError(errno.ENOENT if inode.parent_gone else errno.EEXIST,
                   "a lower file with no name left cannot be copied up")


def _links(fd: int) -> int | None:
    """The link count of the file open as ``fd``; None when unknown."""
    try:
        return os.fstat(fd).st_nlink
    except OSError:
        return None


def _reopened(fd: int, flags: int, action, layer):
    """``action(new_fd, layer)`` on a new fd (``flags``) of the file open as ``fd`` (or
    held as an ``O_PATH`` fd): through the /proc magic link, which also reaches a file
    with no name left. Its result."""
    new = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    try:
        return action(new, layer)
    finally:
        os.close(new)
