"""Overlay inodes: identity and *current* backing of each open object.

Owns: ``InodeKey`` (what makes two names one overlay inode), the ``OverlayInode`` record
(current backing layer and path, a ``generation`` that copy-up bumps) and the table of
live inodes keyed by identity.

Identity comes from the data, never from a displayed number (docs/ARCHITECTURE.md §4, the kernel's
``ovl_hash_bylower``): two names are one inode when they resolve to the same backing
object. One exception, as in the kernel: in a writable mount without ``index``, each
*name* of a lower non-directory with ``st_nlink > 1`` is its own inode, since copying up
one name breaks the link (the other names keep the lower data). Read-only mounts and
``index=on`` merge those names. ``st_ino`` is only displayed (``OverlayInode.ino``); it
may change when a hard-linked name is copied up and is never a key.

An inode holds no fd, but for one exception: a metacopy file whose data is still below
keeps an ``O_PATH`` fd of its upper file (``MetaFile``), where its attributes live, until
its last reference goes: that file may lose its name (a rename over it, an unlink) while
the file is open, and its open file still shows its attributes (the kernel's overlay inode
keeps its upper dentry). At most one per live inode, so bounded by the open handles. Open
handles hold one fd each; a copy-up (``rebind``) bumps the
generation, and handles reopen on the new backing (eagerly, while its path is known to
be right, see ``core._copied``; else at their next I/O through ``open_backing``), the
kernel's ``ovl_real_fdget`` idea. ``open_backing`` opens the backing by its layer path
and checks the result is the backing object, so a racing rename never yields another
file.

Lifetime: an entry lives while a handle holds it (a kernel node without an open file
needs none); released entries keep only their data versions, in an LRU of at most
``retain`` entries, so ``keep_cache`` can be granted again on the next open. Evicting
one is always safe: a missing entry means "grant no keep_cache".
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict

from .layer import DirFd, Layer, same_file
from .lookup import Entry, Node
from .records import field, record
from .sharing import NOT_SHARED
from .typing_lite import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable

#: The flags a backing fd is opened with: those ``openat2`` accepts (its
#: ``VALID_OPEN_FLAGS``; it refuses any other bit with EINVAL where open(2) ignores it, and
#: FUSE passes the kernel's own ``__FMODE_EXEC`` (0x20) in the flags of the open that
#: ``execve`` makes), less ``O_APPEND``: that is the open file's state, which
#: ``fcntl(F_SETFL)`` changes without telling the daemon, and the kernel gives every write
#: its offset itself (the size, while the flag is set; a passthrough write carries the
#: flag to the backing file), so an ``O_APPEND`` backing fd would append after the flag
#: was cleared.
OPEN_FLAGS = (os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC
              | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC | os.O_ASYNC | os.O_DIRECT | os.O_LARGEFILE
              | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC | os.O_PATH
              | os.O_TMPFILE)


class InodeKey(NamedTuple):
    """Identity of an overlay inode: its backing object, plus, for one name of a lower
    hard link that copy-up would split off, the layer and path of that name. A named
    tuple: it is hashed and compared in C (every LOOKUP, listed entry, open and release
    looks one up in the node and inode tables, 4-6 times per request; a frozen record's
    ``__hash__``/``__eq__`` cost ~0.4 us each). Keys are only ever compared with keys."""
    dev: int
    ino: int
    name: tuple[int, str] | None = None


def key_of(node: Node, *, split_links: bool) -> InodeKey:
    """The identity of the existing merged object ``node``. ``split_links``: a writable
    mount without index, where each name of a lower hard link is its own inode."""
    return key_of_top(node.top, split_links=split_links)  # (the upper, an index entry, or the topmost lower)


def key_of_top(top: Entry, *, split_links: bool) -> InodeKey:
    """``key_of`` a merged object from its top entry alone (all the identity needs)."""
    st = top.st
    if split_links and not top.layer.writable and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
        return InodeKey(st.st_dev, st.st_ino, (top.layer.index, top.rel))
    return InodeKey(st.st_dev, st.st_ino)


class StaleBacking(OSError):
    """The backing path no longer names the backing object (a racing rename)."""


@record(frozen=True)
class MetaFile:
    """A metacopy file's upper object (its attributes): ``fd`` is ``O_PATH``."""
    layer: Layer
    fd: int


@record(eq=False)
class OverlayInode:
    key: InodeKey
    ino: int
    layer: Layer
    rel: str
    dev: int
    backing_ino: int
    generation: int = 0
    refs: int = 0
    data_version: int = 0
    unlinked: bool = False
    #: a lower file with no name left (``unlinked``): the merged path of the directory its
    #: last name was in (moved by renames, ``OverlayFS.renamed``), and whether that
    #: directory was removed since (a change through its fd answers ENOENT then, as the
    #: kernel overlay's copy-up of the removed parent does, else EEXIST)
    unlinked_from: str | None = None
    parent_gone: bool = False
    #: its backing had more than one link once (index=on: an upper hard link of an index
    #: entry keeps being one when its names are gone and the entry has one link left)
    linked: bool = False
    #: made with O_TMPFILE (``Files.tmpfile``): an upper file made without a name, which
    #: LINK names through its fd
    tmpfile: bool = False
    #: merged path of a metacopy file whose data is read from below
    meta_rel: str | None = None
    #: ... and its upper file, held while the inode lives (see the module docstring)
    meta_file: MetaFile | None = None
    #: extent mapping of the current backing for page-cache sharing: None = not mapped
    #: yet; ``sharing.NOT_SHARED`` = mapped, nothing shared (the fast path)
    extents: object = None
    extents_epoch: int = 0
    #: data changes in flight (``sharing.changing``): no mapping is stored meanwhile
    extents_busy: int = 0
    #: ``killpriv``: a write has nothing to strip while ``privs_clean == privs_epoch``
    #: (no setuid/setgid bit, no capability); chmod and setxattr bump the epoch
    privs_epoch: int = 0
    privs_clean: int = -1
    #: the data version the page cache of the inode's kernel node holds (one node for
    #: every name of the inode); ``keep_cache`` only while it is ``data_version`` (-1:
    #: unknown, a new entry)
    cached_version: int = -1
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def backing(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the current backing object."""
        return self.dev, self.backing_ino

    @property
    def in_upper(self) -> bool:
        return self.layer.writable

    @property
    def upper_meta(self) -> bool:
        """A metacopy file whose held file (``meta_file``) is the upper layer's: one in a
        lower layer (a former upper's metacopy file, its data further down) is read-only
        as any lower file, never changed, filled or linked through that fd."""
        meta = self.meta_file
        return meta is not None and meta.layer.writable

    def rebind(self, entry: Entry, key: InodeKey, ino: int) -> int:
        """Point at a new backing (after copy-up); return the new generation."""
        with self.lock:
            self.layer, self.rel = entry.layer, entry.rel
            self.dev, self.backing_ino = entry.st.st_dev, entry.st.st_ino
            self.linked = self.linked or entry.st.st_nlink > 1
            self.key, self.ino = key, ino
            self.generation += 1
            self.extents = None
            self.extents_epoch += 1
            self.privs_epoch += 1
            return self.generation

    def privs_may_grow(self) -> None:
        """A chmod or setxattr: the next killing write checks the file again."""
        with self.lock:
            self.privs_epoch += 1

    def metacopy_at(self, rel: str, upper: Entry) -> bool:
        """The inode is the metacopy file at ``rel`` whose attributes are in ``upper`` (just
        looked up, under the namespace lock). Its fd is kept until the last release;
        never replaced before: another thread may be using it. Whether it opened the fd
        (``InodeTable.metacopy_at`` counts them)."""
        with self.lock:
            self.meta_rel = rel
            if self.meta_file is not None:
                return False
            fd = upper.layer.path_fd(upper.rel)
            st = os.fstat(fd)
            if not same_file(st, upper.st):
                os.close(fd)
                raise StaleBacking(errno.ESTALE, "metacopy file moved", upper.rel)
            self.meta_file = MetaFile(upper.layer, fd)
            return True

    def moved(self, rel: str) -> None:
        with self.lock:
            self.rel = rel

    def open_backing(self, flags: int, via: Entry | None = None) -> tuple[int, int]:
        """A new fd on the current backing and the generation it belongs to. ``via``: a
        name of the backing just looked up (under the namespace lock), which becomes the
        path later reopens use. Raises ``StaleBacking`` when the path names another
        object (a rename raced with a reopen outside the namespace lock)."""
        # creation flags mean nothing here: the backing exists
        flags &= OPEN_FLAGS & ~(os.O_CREAT | os.O_EXCL)
        with self.lock:
            layer, rel = (via.layer, via.rel) if via is not None else (self.layer, self.rel)
            meta = self.meta_file
            if via is None and meta is not None and meta.layer is layer:
                # a metacopy file's upper file, its data copied in since: through the fd
                # held of it (``Files.open_inode``: its name may be gone, or another's);
                # O_NOFOLLOW would refuse the magic link itself
                fd = os.open(f"/proc/self/fd/{meta.fd}",
                             flags & ~os.O_NOFOLLOW | os.O_CLOEXEC)
            else:
                fd = layer.open(rel, flags | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self.backing:
                os.close(fd)
                raise StaleBacking(errno.ESTALE, "backing file moved", rel)
            if via is not None:
                self.layer, self.rel = layer, rel
            return fd, self.generation

    def open_listed(self, flags: int, layer: Layer, rel: str, dirfd: DirFd, name: str,
                    never_shares: "Callable[[int], bool] | None") -> tuple[int, int]:
        """``open_backing`` via a listed file (``rel`` in ``layer``), opened as entry ``name``
        of its directory's open fd ``dirfd`` (``Layer.open_at``: confined and not followed,
        as ``Layer.open`` relative to a held parent): no look-up of that directory by path.
        The same identity check (``StaleBacking``) and the path kept for later reopens. In
        the same hold, ``files.Files._unshared``'s mark where ``never_shares`` (the extent
        map's) knows the backing's device shares nothing: ``NOT_SHARED`` stored under its
        rule (not mapped yet, no data change in flight)."""
        with self.lock:
            fd = layer.open_at(dirfd, name, rel, flags & _REOPEN_FLAGS | os.O_CLOEXEC)
            st = os.fstat(fd)
            if st.st_ino != self.backing_ino or st.st_dev != self.dev:
                os.close(fd)
                raise StaleBacking(errno.ESTALE, "backing file moved", rel)
            self.layer, self.rel = layer, rel
            if self.extents is None and never_shares is not None and not self.extents_busy \
                    and never_shares(self.dev):
                self.extents = NOT_SHARED
            return fd, self.generation


#: ``open_backing``'s mask of the flags an open passes (creation flags mean nothing there)
_REOPEN_FLAGS = OPEN_FLAGS & ~(os.O_CREAT | os.O_EXCL)


class InodeTable:
    def __init__(self, retain: int = 4096) -> None:
        self._live: dict[InodeKey, OverlayInode] = {}
        self._versions: OrderedDict[InodeKey, tuple[int, int]] = OrderedDict()
        self._retain = retain
        self._lock = threading.Lock()
        #: how many live inodes hold a metacopy upper file's fd (``fdbudget``'s open files)
        self.meta_fds = 0

    def get(self, key: InodeKey) -> OverlayInode | None:
        return self._live.get(key)

    def acquire(self, key: InodeKey, ino: int, entry: Entry) -> OverlayInode:
        """Take a reference on the inode ``key``, creating it on ``entry`` if new."""
        st = entry.st
        return self.acquire_listed(key, ino, entry.layer, entry.rel, st, st.st_nlink > 1)

    def acquire_listed(self, key: InodeKey, ino: int, layer: Layer, rel: str,
                       st: os.stat_result, linked: bool = False) -> OverlayInode:
        """``acquire`` without an ``Entry``: of ``rel`` in ``layer``, its stat ``st``
        (a file a listing kept: one link, a listing keeps no other)."""
        with self._lock:
            inode = self._live.get(key)
            if inode is None:
                inode = OverlayInode(key, ino, layer, rel, st.st_dev, st.st_ino, linked=linked)
                kept = self._versions.pop(key, None)
                if kept is not None:
                    inode.data_version, inode.cached_version = kept
                self._live[key] = inode
            inode.refs += 1
            return inode

    def metacopy_at(self, inode: OverlayInode, rel: str, upper: Entry) -> None:
        """``inode.metacopy_at(rel, upper)``, counting the fd it opens; the caller holds a
        reference, so ``release`` cannot close that fd before it is counted."""
        if inode.metacopy_at(rel, upper):
            with self._lock:
                self.meta_fds += 1

    def hold(self, inode: OverlayInode) -> bool:
        """One more reference on a live inode; False if its last reference went meanwhile.
        Judged by its count, not by the table's entry for ``inode.key``: a copy-up sets the
        new key before ``rekey`` moves the entry (it holds the inode meanwhile)."""
        with self._lock:
            if inode.refs <= 0:
                return False
            inode.refs += 1
            return True

    def rekey(self, inode: OverlayInode, old: InodeKey) -> None:
        """``inode`` was rebound from identity ``old`` to ``inode.key`` (copy-up)."""
        with self._lock:
            if self._live.get(old) is inode:
                del self._live[old]
            if inode.key not in self._live:  # else: found under its new identity already
                self._live[inode.key] = inode
            self._versions.pop(inode.key, None)

    def release(self, inode: OverlayInode) -> None:
        with self._lock:
            inode.refs -= 1
            if inode.refs > 0:
                return
            if inode.meta_file is not None:  # no handle left that could use it
                os.close(inode.meta_file.fd)
                inode.meta_file = None
                self.meta_fds -= 1
            if self._live.get(inode.key) is inode:
                del self._live[inode.key]
            self._versions[inode.key] = (inode.data_version, inode.cached_version)
            if len(self._versions) > self._retain:
                self._versions.popitem(last=False)

    def forget_version(self, key: InodeKey) -> None:
        with self._lock:
            self._versions.pop(key, None)

    def live(self) -> list[OverlayInode]:
        with self._lock:
            return list(self._live.values())

    def __len__(self) -> int:
        return len(self._live)
