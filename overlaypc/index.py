"""Hard links across copy-up (``-o index=on``): the index directory ``workdir/index``.

Owns: finding and keeping the one upper inode that all names of a hard-linked lower
file share once any of them is copied up. As the kernel does, the copy goes to
``workdir/index/<hex of the lower file's origin handle>`` and each name copied up after
it is a hard link to that file; a name not copied up yet finds its data, attributes and
``st_ino`` through the index entry, so every name shows the new data at once.

The overlay's ``st_nlink`` of an indexed inode is kept in the kernel's own
``trusted.overlay.nlink`` on the index file ("U%+d", relative to the index inode's link
count: initially the lower file's nlink, +1 per link and -1 per unlink through the mount),
rewritten after every change of either count, so a kernel mounting the upper with
``index=on`` shows the same count, and overlaypc the count after the kernel's changes. It
is read before ``trusted.overlay.overlaypc.nlink`` (the same count, absolute), which only
stands in when the kernel's is missing or unreadable (and ``trusted.overlaypc.nlink``, where
overlaypc before d71628d kept it, when that one is missing too). Each change is recorded from the
count before it, read with the index inode's link count before it (``links``). Around a
link-up (another name copied up: the index inode gains a link, the count stays) the
kernel's count is written relative to the lower file's links ("L%+d", which the link does
not move) and then as "U" again, so a kill -9 at any point leaves it right.

Bounds: index names of lower files are remembered for at most ``KEYS_LIMIT`` files (LRU,
4.4 MiB at the bound, measured with tracemalloc). Every name of an indexed inode is one
kernel node, so no name needs remembering for a link count change.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict

from . import faults, sysapi, whiteout
from .layer import Layer, same_file
from .lookup import Entry

INDEX_DIR = "index"
KEYS_LIMIT = 16384


class IndexDir:
    def __init__(self, work: Layer, xattr_prefix: str) -> None:
        self.work = work
        self.nlink_xattr = whiteout.own_xattr(xattr_prefix, "nlink")
        #: where overlaypc before d71628d kept its count (outside the kernel's namespace)
        self.legacy_nlink_xattr = xattr_prefix.replace("overlay.", "overlaypc.") + "nlink"
        self.origin_xattr = xattr_prefix + "origin"
        self.kernel_nlink_xattr = xattr_prefix + "nlink"
        self._keys: OrderedDict[tuple[int, int], str | None] = OrderedDict()
        #: (dev, ino) of an upper file -> (its ctime, its origin xattr): ``_origin``
        self._origins: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        #: (dev, ino) of an index entry -> ((ctime, nlink), its two counts): ``_counts``
        self._nlinks: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        #: how many times counts were written (``_counts`` keeps none read across one)
        self._written = 0
        self._lock = threading.Lock()

    def prepare(self) -> None:
        if self.work.lstat(INDEX_DIR) is None:
            self.work.do_mkdir(INDEX_DIR, 0o700)

    @staticmethod
    def eligible(entry: Entry) -> bool:
        return not stat.S_ISDIR(entry.st.st_mode) and entry.st.st_nlink > 1

    def key(self, lower: Entry) -> str | None:
        """Index name of a lower file: hex of its origin file handle (as the kernel)."""
        ident = (lower.st.st_dev, lower.st.st_ino)
        with self._lock:
            if ident in self._keys:
                return self._keys[ident]
        fd = lower.layer.path_fd(lower.rel)
        try:
            origin = sysapi.ovl_origin_xattr(fd, lower.layer.uuid)
        finally:
            os.close(fd)
        key = origin.hex() if origin else None
        with self._lock:
            self._keys[ident] = key
            if len(self._keys) > KEYS_LIMIT:
                self._keys.popitem(last=False)
        return key

    def rel(self, key: str) -> str:
        return f"{INDEX_DIR}/{key}"

    def find(self, lower: Entry) -> Entry | None:
        """The index entry of a hard-linked lower file, if one of its names was copied up.
        One that is a whiteout (the kernel leaves one for a file whose names all went,
        under ``nfs_export``) or of another type than the lower file is never served in
        its place: EIO, as the kernel's ``ovl_lookup_index`` ("bad index found")."""
        key = self.key(lower)
        if key is None:
            return None
        rel = self.rel(key)
        st = self.work.lstat(rel)
        if st is None:
            return None
        if whiteout.is_whiteout(st) or stat.S_IFMT(st.st_mode) != stat.S_IFMT(lower.st.st_mode):
            raise OSError(errno.EIO, f"bad index entry {self.work.path}/{rel} (type "
                          f"{stat.S_IFMT(st.st_mode):o}, the lower file's "
                          f"{stat.S_IFMT(lower.st.st_mode):o})", lower.rel)
        return Entry(self.work, rel, st)

    def of_upper(self, upper: Entry, fd: int | None = None) -> Entry | None:
        """The index entry an upper file is a hard link of, if any. Its origin is read
        from the file open as ``fd`` if given (the name an open file was found by may be
        gone or name another file by now), else through the directory fd its lookup held
        (a directory above may have been renamed since: its path names nothing, or
        another object), by path only for an entry found without one. An open file (``fd``,
        an ``O_PATH`` one too) with one link may be an index entry whose upper names are all
        gone."""
        if stat.S_ISDIR(upper.st.st_mode) or upper.st.st_nlink < 2 and fd is None:
            return None
        origin = self._origin(upper, fd)
        if not origin:
            return None
        st = self.work.lstat(self.rel(origin.hex()))
        if st is None or not same_file(st, upper.st):
            return None
        return Entry(self.work, self.rel(origin.hex()), st)

    def holds(self, upper: os.stat_result, origin: bytes) -> bool:
        """Whether the upper object of stat ``upper``, whose ``origin`` xattr is ``origin``,
        is the index entry of that origin (a hard link of it): an indexed inode."""
        st = self.work.lstat(self.rel(origin.hex()))
        return st is not None and same_file(st, upper)

    def _origin(self, upper: Entry, fd: int | None) -> bytes | None:
        """The ``origin`` xattr of the upper file ``upper``, kept per inode while its
        ``st_ctime`` stays (a copy-up sets it before the file gets its name; any xattr
        change moves the ctime). Only one found is kept: ``of_upper`` then checks that the
        entry it names is this very inode, which a new file on a freed number is not."""
        st = upper.st
        ident = (st.st_dev, st.st_ino)
        with self._lock:
            kept = self._origins.get(ident)
        if kept is not None and kept[0] == st.st_ctime_ns:
            return kept[1]
        if fd is not None:  # (any fd, ``O_PATH`` too: a nameless metacopy file's ``MetaFile``)
            origin = upper.layer.getxattr_fd(fd, self.origin_xattr)
        elif upper.parent is None:
            origin = upper.layer.getxattr(upper.rel, self.origin_xattr)
        else:
            # (a name gone since its lookup raises, as a path would: nothing to show)
            # (by name: ``entry_xattr_path``, no read through a mount on the name)
            where, follow, held = upper.layer.entry_xattr_path(upper.parent.fd, upper.name)
            try:
                origin = os.getxattr(where, self.origin_xattr, follow_symlinks=follow)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
                origin = None
            finally:
                if held is not None:
                    os.close(held)
        if origin:
            self._keep(self._origins, ident, (st.st_ctime_ns, origin))
        return origin

    def _counts(self, index: Entry) -> tuple[bytes | None, bytes | None]:
        """The kernel's and overlaypc's count xattrs of the index entry ``index``, kept per
        inode while its ``st_ctime`` and link count stay (a link, an unlink and an xattr
        change move them), and dropped after every count this mount writes (``_forget``: a
        filesystem with coarse timestamps may give a change the ctime it had). Not kept
        when a count was written while they were read (``_written``)."""
        st = index.st
        ident = (st.st_dev, st.st_ino)
        with self._lock:
            kept = self._nlinks.get(ident)
            written = self._written
        if kept is not None and kept[0] == (st.st_ctime_ns, st.st_nlink):
            return kept[1]
        kernel = self.work.getxattr(index.rel, self.kernel_nlink_xattr)
        # (the pre-d71628d name is read only where no count of today is: never on an entry
        # the kernel made)
        own = self.work.getxattr(index.rel, self.nlink_xattr) if kernel is not None \
            else self.own_count(index.rel)
        counts = (kernel, own)
        self._keep(self._nlinks, ident, ((st.st_ctime_ns, st.st_nlink), counts), written)
        return counts

    def own_count(self, rel: str) -> bytes | None:
        """overlaypc's own count of index entry ``rel`` (absolute), where it is now or where
        overlaypc before d71628d kept it; None when neither is there."""
        own = self.work.getxattr(rel, self.nlink_xattr)
        return own if own is not None else self.work.getxattr(rel, self.legacy_nlink_xattr)

    def _keep(self, cache: OrderedDict, ident: tuple[int, int], value: tuple,
              written: int | None = None) -> None:
        with self._lock:
            if written is not None and written != self._written:
                return
            cache[ident] = value
            cache.move_to_end(ident)
            if len(cache) > KEYS_LIMIT:
                cache.popitem(last=False)

    def _forget(self, rel: str) -> None:
        """The counts of index entry ``rel`` were just written: not kept any more."""
        st = self.work.lstat(rel)
        with self._lock:
            self._written += 1
            if st is not None:
                self._nlinks.pop((st.st_dev, st.st_ino), None)

    def nlink(self, index: Entry, lower: os.stat_result | None = None, *, links: int = 0) -> int:
        """The overlay's link count: the kernel's relative one, which a kernel mounting the
        upper keeps current (it does not know ours), else ours, else the index inode's
        links less its own. ``links``: by how much the index inode's link count changed
        since the count was last written (a change made, whose count is being recorded)."""
        kernel, raw = self._counts(index)
        if kernel and kernel[:1] in (b"U", b"L"):
            try:
                delta = int(kernel[1:])
            except ValueError:
                delta = None
            if delta is not None:
                base = (index.st.st_nlink - links if kernel[:1] == b"U"
                        else lower.st_nlink if lower else None)
                if base is not None and base + delta > 0:
                    return base + delta
        if raw is not None and raw.isdigit():
            return int(raw)
        return max(index.st.st_nlink - links - 1, 1)

    def set_nlink(self, rel: str, value: int) -> None:
        """Record the overlay link count: ours (absolute) and the kernel's ("U%+d": relative
        to the index inode's own link count, which therefore must be current)."""
        value = max(value, 0)
        try:
            self.work.do_setxattr(rel, self.nlink_xattr, str(value).encode())
            st = self.work.lstat(rel)
            if st is not None:
                self.work.do_setxattr(rel, self.kernel_nlink_xattr,
                                      f"U{value - st.st_nlink:+d}".encode())
        finally:
            self._forget(rel)

    def before_link_up(self, rel: str, lower: os.stat_result) -> None:
        """Before a name is linked to index entry ``rel`` with the overlay count unchanged
        (the copy-up of another name of the file): the kernel's count made relative to the
        lower file's links ("L%+d", its other form), which that link does not move, so a
        kill between the link and ``sync`` leaves the count right (relative to the index
        inode's links it would be one too high until the next change)."""
        st = self.work.lstat(rel)
        if st is None:
            return
        count = self.nlink(Entry(self.work, rel, st), lower)
        try:
            self.work.do_setxattr(rel, self.nlink_xattr, str(count).encode())
            self.work.do_setxattr(rel, self.kernel_nlink_xattr, f"L{count - lower.st_nlink:+d}".encode())
        finally:
            self._forget(rel)

    def sync(self, rel: str, lower: os.stat_result | None = None) -> None:
        """A name was just linked to the index inode with the overlay count unchanged (the
        copy-up of another name of the file; ``lower``: its lower file's stat, which a
        count ``before_link_up`` wrote is relative to): written relative to the index
        inode's links again."""
        self._record(rel, 0, links=1, lower=lower)

    def adjust(self, index: Entry, delta: int, *, links: int | None = None) -> None:
        """A change just made moved the overlay count by ``delta`` and the index inode's own
        links by ``links`` (default ``delta``: a name linked to it or unlinked from the
        upper; 0 for a whiteout over a lower name not linked up)."""
        faults.hit("index.adjust", index.rel)  # test-only (faults.py)
        self._record(index.rel, delta, links=delta if links is None else links)

    def drop_orphan(self, rel: str) -> bool:
        """The index entry ``rel`` removed if no name of its file is left: no upper name
        (one link, its own) and an overlay count of 0, as the kernel's
        ``ovl_cleanup_index`` after the last unlink. Whether it went."""
        st = self.work.lstat(rel)
        if st is None or stat.S_ISDIR(st.st_mode) or st.st_nlink != 1:
            return False
        if self.nlink(Entry(self.work, rel, st)) > 0:
            return False
        self.work.do_unlink(rel)
        return True

    def _record(self, rel: str, delta: int, *, links: int, lower: os.stat_result | None = None) -> None:
        # the count before the change, read with the index inode's links before it (the
        # caller's entry may predate the change: stat again)
        st = self.work.lstat(rel)
        if st is None:
            return
        self.set_nlink(rel, self.nlink(Entry(self.work, rel, st), lower, links=links) + delta)
