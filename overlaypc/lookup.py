"""Lookup of merged paths across the layer stack.

Owns: turning a merged path into a ``Node``: which layers hold it (top first), its
type, whether it is opaque, and whether the upper holds a whiteout at its name.
Rules, as the kernel's ``namei.c``: the search goes top-down through the layers in
which the parent directory exists; a whiteout stops it; so does an opaque directory
(after including it) and any non-directory (a lower non-directory below a directory
is ignored). OCI whiteouts (``.wh.NAME``) and opaque markers (``.wh..wh..opq``,
``user.fuseoverlayfs.opaque``) count in every layer, the upper too: fuse-overlayfs writes
them where it cannot make 0/0 devices or set trusted.* xattrs, and so does overlaypc
(``whiteout.Format``).

System calls per name: a lower layer's directory names are held once read
(``dirnames.LowerNames``: from a listing, or read when a name is absent there and the
``.wh.NAME`` question would follow), so an absent name or marker there costs none; no
``.wh.NAME`` is looked for in the last layer the search reaches (it would hide nothing);
a directory's marks come from one ``listxattr``; a lower regular file's xattr names are
listed once (``xattrnames.LowerXattrs``), an upper one's at each lookup.

Caveats: the structure of directories (which layers hold them) is cached; a change to a
directory drops its entry and its subtree's (``invalidate``), and an epoch counter keeps a
lookup that raced with any change from storing what it read; stat data of the final
component is always read fresh (a cached directory's by one ``fstatat`` of its name per
layer, checked against the cached fd's inode; the layer roots, as parents, by none: only
their fds are used).

Kept files: the last lookups of regular files, and the regular files a READDIRPLUS listing
showed, are kept by merged path (``keep_listing``, ``recent``) so that a read-only open of a
name the kernel just looked up or listed need not look it up again (``files.Files.open``).
They are kept only for *which object to open* (the layer and path, stat for the identity):
attributes are always read fresh. What makes reuse safe is ``_epoch``, which counts every
change of the merged namespace: each namespace change and each copy-up (data copy-up of a
metacopy file included) calls ``changed`` at its end, failed or not, after the layers
changed and before the namespace lock is released (``Namespace._changing``,
``CopyUp._installing``); those are the only ways a merged name comes to resolve to another
object (private xattrs cannot be set through the mount, lower layers do not change under
it). A kept file counts only while ``_epoch`` is the one read *before* the lookup or listing
read the layers, and is used under the namespace lock: a change that ran during the lookup
voids it, and none can run between the check and the open. Changes to the upper layer behind
the mount's back are not seen (as with the kernel's own dentry cache); the open checks the
object it opened is the one kept, and looks the name up afresh when not. Names a lookup
found absent, with nothing in the upper there, are kept the same way for the creation the
kernel sends next (``absent``, taken once): it makes the object by a call that fails EEXIST
if the name was taken behind the mount's back, and looks afresh then.

Bound: a cached directory holds an ``O_PATH`` fd of itself in each layer that has it, so
the cache is bounded by the fds it holds (``max_fds``, from ``fdbudget``, less what open files
hold beyond their share: ``fd_room``; LRU), not by its entries, and it registers with ``fdbudget`` to be emptied when the process runs out
of fds. Eviction is always safe: a ``DirFd`` closes on its last reference, so an
operation holding a node keeps its fds. A directory missing from the cache is found by
walking down from its deepest cached ancestor one level at a time, holding only the
parent, so a path thousands of levels deep costs neither recursion nor more fds. Kept files
hold no fds (an ``Entry`` without ``parent``; a listing's names its directory's fd weakly,
``ListedDir``): at most ``RECENT_MAX``, oldest dropped first.
"""
from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
from _weakref import ref as _weakref  # (weakref.py itself adds import time: fdbudget)
from collections import OrderedDict
from collections.abc import Callable

from . import fdbudget, protattr, whiteout
from .dirnames import LowerNames
from .xattrnames import LowerXattrs
from .layer import DirFd, Layer, join, split
from .records import field, record
from .stack import LayerStack

NAME_MAX = 255
_S_IFDIR = stat.S_IFDIR
#: the most regular files ``Lookup`` keeps for a later open (``recent``)
RECENT_MAX = 4096
#: the most absent names ``Lookup`` keeps for a creation that follows (``absent``)
ABSENT_MAX = 64


#: a kept regular file: from a lookup, (layer, path there, stat, xattr names or None); from
#: a listing, (``ListedDir``, stat): its xattrs were not read, so a metacopy mark is not ruled
#: out (and the path is joined only if it is opened)
Kept = tuple


class ListedDir:
    """The directory a listing's kept files were read from, shared by all of them: its
    ``layer``, its path there (``head``) and, held *weakly*, the lookup's ``Entry`` of it
    whose ``dirfd`` the listing read it through (``entry()``: None once no one holds that
    entry any more: the lookup cache evicted, shed or replaced the directory's node; also
    None where the listing used an fd of its own). Kept files hold no fds: an open of one
    goes through that entry's fd while a cache (which counts it) or a request still holds
    it, else resolves the path as before (``files.Files.open_read``). (The entry, not the
    ``DirFd``: a ``DirFd`` closes its fd in ``__del__``, which CPython runs *before* it
    clears the weak references to it, so another thread could still reach one whose fd is
    closing; an ``Entry`` has no finalizer, its weak references are cleared before it lets
    go of its ``DirFd``, and a thread that reached it holds that ``DirFd`` open.)"""
    __slots__ = ("layer", "head", "entry")

    def __init__(self, layer: Layer, head: str, entry: "Entry | None") -> None:
        self.layer = layer
        self.head = head
        self.entry: Callable[[], Entry | None] = _gone if entry is None else _weakref(entry)

    def __eq__(self, other: object) -> bool:
        """The same directory of the same layer, through the same entry (references compare
        their entries while both live)."""
        return other.__class__ is ListedDir and self.layer is other.layer \
            and self.head == other.head and self.entry() is other.entry()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ListedDir({self.layer.name!r}, {self.head!r}, {self.entry()!r})"


def _gone() -> None:
    """``ListedDir.entry`` of a listing through an fd no entry holds."""
    return None


@record(frozen=True)
class Entry:
    """One layer's object at a merged path (``rel`` is its path *in that layer*).
    Directories found by lookup carry an open ``dirfd``, so lookups below them cost one
    ``fstatat`` per layer instead of a path walk."""
    layer: Layer
    rel: str
    st: os.stat_result
    dirfd: DirFd | None = field(default=None, compare=False, repr=False)
    #: a non-directory found by name in an open directory: that directory, so its
    #: xattrs cost one ``lgetxattr`` of ``parent``/name instead of a path walk
    parent: DirFd | None = field(default=None, compare=False, repr=False)
    #: a regular file's xattr names as the lookup listed them (None: not listed), so
    #: absent ones (origin, metacopy, security.capability) cost no call
    xattrs: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def lacks(self, name: str) -> bool:
        """Whether the lookup's listing shows xattr ``name`` absent (False: unknown)."""
        return self.xattrs is not None and name not in self.xattrs

    @property
    def name(self) -> str:
        return split(self.rel)[1]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


@record(frozen=True)
class Node:
    """The merged object at ``rel``: its entries top first (empty when absent)."""
    rel: str
    entries: tuple[Entry, ...]
    opaque: bool = False
    upper_whiteout: bool = False
    #: metacopy: the lower entry holding the data of an upper metadata-only copy
    data: Entry | None = None
    #: the upper's whiteout is a ``.wh.NAME`` file: the name itself is free in the upper
    upper_marker: bool = False
    #: metacopy: the first lower entry below the upper metadata-only copy when it is a
    #: metacopy file itself (a former upper's; the kernel's ``ovl_dentry_lower``), else None
    #: (``data`` is the first lower then)
    meta_lower: Entry | None = None

    @property
    def first_lower(self) -> Entry | None:
        """The topmost lower entry (the kernel's ``ovl_dentry_lower``), a metacopy file's
        own metadata-only one included."""
        if self.meta_lower is not None:
            return self.meta_lower
        return self.lowers[0] if self.lowers else self.data

    @property
    def exists(self) -> bool:
        return bool(self.entries)

    @property
    def top(self) -> Entry:
        if not self.entries:
            raise OSError(errno.ENOENT, "no such file or directory", self.rel)
        return self.entries[0]

    @property
    def st(self) -> os.stat_result:
        return self.top.st

    @property
    def is_dir(self) -> bool:
        return bool(self.entries) and self.entries[0].is_dir

    @property
    def upper(self) -> Entry | None:
        """The entry in the upper layer itself (not an index entry in the workdir)."""
        if self.entries and self.entries[0].layer.writable and self.entries[0].layer.index == 0:
            return self.entries[0]
        return None

    @property
    def index(self) -> Entry | None:
        """index=on: the shared copy-up of a hard-linked lower file this name has not
        been linked to yet (its data and attributes)."""
        if self.entries and self.entries[0].layer.index < 0:
            return self.entries[0]
        return None

    @property
    def lowers(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if not e.layer.writable)

    def without_fds(self) -> "Node":
        """This node holding no fds (its entries' layers, paths, stat and xattr names
        alone): what a caller keeps of it while it looks another name up, which may wait
        for fds (``fdbudget.patiently``); a directory merged across many layers holds one
        in each, which the thread whose turn it is may need (limits23)."""
        return Node(self.rel, tuple(Entry(e.layer, e.rel, e.st, None, None, e.xattrs) for e in self.entries),
                    self.opaque, self.upper_whiteout,
                    None if self.data is None else Entry(self.data.layer, self.data.rel, self.data.st),
                    self.upper_marker,
                    None if self.meta_lower is None else
                    Entry(self.meta_lower.layer, self.meta_lower.rel, self.meta_lower.st))

    @property
    def merged_dir(self) -> bool:
        """A directory with parts in two layers or more (the root of a stack of two layers
        or more always): the kernel's merged directory (``OVL_TYPE_MERGE``)."""
        return len(self.entries) > 1 and self.entries[0].is_dir



def check_name(rel: str, *, last_only: bool = False) -> None:
    """ENAMETOOLONG for a name over 255 bytes (FUSE passes up to 1024). ``last_only``: the
    parents were checked when they were looked up."""
    for part in (rel.rpartition("/")[2],) if last_only else rel.split("/"):
        if len(part) > NAME_MAX // 4 and len(os.fsencode(part)) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "file name too long", rel)


def _never_there(name: str, rel: str) -> bool:
    """True for an OCI whiteout name (never shown); EINVAL for ``.`` and ``..``."""
    if name in (".", ".."):
        raise OSError(errno.EINVAL, "invalid name", rel)
    return whiteout.is_oci_name(name)


def _stat_listed(layer: Layer, dirfd: DirFd, name: str,
                 names: frozenset[str] | None) -> os.stat_result | None:
    """``name`` in the open directory ``dirfd`` of ``layer``: None without a system call
    when the directory's held names (``names``; None: not held) lack it, else its
    ``fstatat`` (fresh data; a name the set lists may still be absent, e.g. a mount point)."""
    if names is not None and name not in names:
        return None
    return layer.stat_at(dirfd, name)


class UpperName:
    """What ``Lookup.upper_name`` read of a name in an upper-only directory: the cached
    directory (``parent``), the lookup epoch read before, the name's stat (None: absent)."""
    __slots__ = ("parent", "epoch", "st")

    def __init__(self, parent: Node, epoch: int, st: os.stat_result | None) -> None:
        self.parent = parent
        self.epoch = epoch
        self.st = st


def _fds_of(node: Node) -> int:
    """The fds ``node``'s entries hold: each directory's, and its readable one if opened
    (``DirFd.readable``: an upper directory a copy-up went into)."""
    return sum(1 if e.dirfd.readable < 0 else 2 for e in node.entries if e.dirfd is not None)


class Lookup:
    def __init__(self, stack: LayerStack, xattr_prefix: str, *, max_fds: int | None = None,
                 follow_redirects: bool = False, follow_metacopy: bool = False) -> None:
        self.stack = stack
        self.prefix = xattr_prefix
        #: the copy-up origin marks ``inumbers`` reads (kernel's, fuse-overlayfs's)
        self._origins = frozenset((xattr_prefix + "origin", whiteout.FOO_ORIGIN))
        self._protattr = xattr_prefix + protattr.XATTR
        self.follow_redirects = follow_redirects
        self.index = None  # an index.IndexDir under -o index=on
        self.follow_metacopy = follow_metacopy
        self._epoch = 0
        #: merged path -> (node, fds it holds), least recently used first
        self._dirs: OrderedDict[str, tuple[Node, int]] = OrderedDict()
        self._fds = 0
        #: merged path -> how many directories ``_dirs`` holds strictly below it (none:
        #: absent): ``invalidate`` of a directory with none below drops its entry alone,
        #: without looking at every key (one per RMDIR, and an rm -rf empties each
        #: directory before removing it: ~18 us a time with 300 directories cached)
        self._below: dict[str, int] = {}
        self.max_fds = fdbudget.FdBudget.for_process().lookup if max_fds is None else max_fds
        #: how many fds of their share the open files leave now (set by ``OverlayFS``): the
        #: cache holds no more than that and ``fdbudget.LOOKUP_FLOOR``, within ``max_fds``
        self.fd_room: Callable[[], int] | None = None
        self._lock = threading.Lock()
        self._root_node: Node | None = None
        #: kept files (``recent``): merged directory -> name -> ``Kept``, oldest first; all of
        #: the current ``_epoch`` (stored only at it, emptied when it moves: both under _lock)
        self._recent: OrderedDict[str, dict[str, Kept]] = OrderedDict()
        self._recent_count = 0
        #: names found absent (``absent``): merged path -> the lookup's node, oldest first;
        #: all of the current ``_epoch``, as ``_recent``
        self._absent: dict[str, Node] = {}
        #: names of lower-layer directories: absent names cost no system call
        self.names = LowerNames()
        #: xattr names of lower regular files: a lookup after the first lists none
        self.xattr_names = LowerXattrs()
        fdbudget.register(self)

    @property
    def cached_fds(self) -> int:
        return self._fds

    def __len__(self) -> int:
        return len(self._dirs)

    def invalidate(self, rel: str | None = None) -> None:
        """Forget the cached structure of directory ``rel`` and everything below it (all
        of it when ``rel`` is None or the root); call after a change to a directory."""
        with self._lock:
            self._moved()  # a lookup that raced with the change stores nothing
            if not rel:
                self._dirs.clear()
                self._below.clear()
                self._fds = 0
                return
            dirs = self._dirs
            if self._below.get(rel):
                prefix = rel + "/"
                keys = [k for k in dirs if k == rel or k.startswith(prefix)]
            else:
                keys = [rel] if rel in dirs else []
            for key in keys:
                self._fds -= dirs.pop(key)[1]
                self._count(key, -1)

    def _count(self, rel: str, delta: int) -> None:
        """Directory ``rel`` entered (``delta`` 1) or left (-1) ``_dirs``: its ancestors'
        ``_below`` counts follow (lock held)."""
        below = self._below
        head = rel.rpartition("/")[0]
        while head:
            n = below.get(head, 0) + delta
            if n:
                below[head] = n
            else:
                del below[head]
            head = head.rpartition("/")[0]

    @property
    def epoch(self) -> int:
        """Read before looking at the layers: what ``keep_listing`` is given."""
        return self._epoch

    def changed(self) -> None:
        """A change of the merged namespace is done (called at its end, under the namespace
        lock): no file kept before it is reused."""
        with self._lock:
            self._moved()

    def _moved(self) -> None:
        """A new epoch, and no kept file (lock held)."""
        self._epoch += 1
        self._recent.clear()
        self._recent_count = 0
        self._absent.clear()

    def _keep_in(self, parent: str, files: dict[str, Kept]) -> None:
        """Add ``files`` (at most ``RECENT_MAX``) to directory ``parent``'s (lock held)."""
        recent = self._recent
        held = recent.get(parent)
        if held is None:
            recent[parent] = held = files
            self._recent_count += len(files)
        else:
            recent.move_to_end(parent)
            before = len(held)
            held.update(files)
            self._recent_count += len(held) - before
        if self._recent_count > RECENT_MAX:
            self._trim()

    def _keep(self, parent: str, name: str, epoch: int, kept: Kept) -> None:
        """One file looked up at ``epoch`` (the ``_keep_in`` of a single name)."""
        with self._lock:
            if epoch != self._epoch:
                return
            held = self._recent.get(parent)
            if held is None:
                held = self._recent[parent] = {}
            if name not in held:
                held[name] = kept
                self._recent_count += 1
                if self._recent_count > RECENT_MAX:
                    self._trim()
            else:
                held[name] = kept

    def _trim(self) -> None:
        """Drop the oldest directories' files (lock held) down to ``RECENT_MAX`` (the one
        being added to as well, if it alone holds more)."""
        recent = self._recent
        while self._recent_count > RECENT_MAX and recent:
            self._recent_count -= len(recent.popitem(last=False)[1])

    def keep_listing(self, rel: str, epoch: int, files: dict[str, Kept]) -> None:
        """A listing of directory ``rel`` read at ``epoch`` (``self.epoch`` read before it)
        showed ``files`` (``Kept``, a listing's): regular files
        with one link that are the topmost object at their names. At most the first
        ``RECENT_MAX`` are kept (opens follow the listing's order)."""
        if len(files) > RECENT_MAX:
            files = dict(itertools.islice(files.items(), RECENT_MAX))
        with self._lock:
            if epoch == self._epoch:
                self._keep_in(rel, files)

    def recent(self, rel: str) -> tuple[Node, bool] | None:
        """The regular file last found at ``rel`` if no change of the namespace ran since
        (call under the namespace lock, which every change holds), and whether its xattrs
        were checked (False: the caller rules out a metacopy mark itself); else None."""
        parent, name = split(rel)
        kept = self.recent_kept(parent, name)
        if kept is None:
            return None
        if len(kept) == 2:  # a listing's
            where, st = kept
            head = where.head
            return Node(rel, (Entry(where.layer, f"{head}/{name}" if head else name, st),)), False
        layer, lrel, st, xattrs = kept
        return Node(rel, (Entry(layer, lrel, st, None, None, xattrs),)), True

    def recent_kept(self, parent: str, name: str) -> Kept | None:
        """``recent``'s kept file ``name`` of merged directory ``parent`` as kept (no
        ``Node``), the same rule: a listing's ``(ListedDir, stat)`` or a lookup's
        ``(layer, path, stat, xattr names)``; None."""
        held = self._recent.get(parent)
        return None if held is None else held.get(name)

    def absent(self, rel: str) -> Node | None:
        """The node of ``rel`` as the last lookup found it, absent with nothing in the upper
        at its name (no whiteout, no marker), if no change of the namespace ran since (call
        under the namespace lock, which every change holds); taken once. A creation after
        the kernel's negative LOOKUP of its name (one per file of an untar, a create) need
        not look again: it makes the object with a call that fails EEXIST if the name was
        taken behind the mount's back, and then looks afresh (``Namespace._place_new``)."""
        with self._lock:
            return self._absent.pop(rel, None)

    def absent_kept(self, rel: str) -> bool:
        """Whether ``absent`` would answer ``rel`` now (a peek: nothing taken; the lock-free
        read of one dict, which a lookup racing with it may change: ``absent`` decides)."""
        return rel in self._absent

    def _keep_absent(self, rel: str, epoch: int, node: Node) -> None:
        with self._lock:
            if epoch != self._epoch:
                return
            absent = self._absent
            if len(absent) >= ABSENT_MAX and rel not in absent:
                del absent[next(iter(absent))]
            absent[rel] = node

    def forget_recent(self, rel: str) -> None:
        """``rel`` did not open as kept (changed behind the mount's back)."""
        parent, name = split(rel)
        with self._lock:
            held = self._recent.get(parent)
            if held is not None and held.pop(name, None) is not None:
                self._recent_count -= 1

    def shed_fds(self) -> int:
        """Drop the whole cache (the process is out of fds); return the fds it held."""
        with self._lock:
            dropped = self._fds
            self._dirs.clear()
            self._below.clear()
            self._fds = 0
        return dropped

    def count_readable(self, rel: str, dirfd: DirFd) -> None:
        """``dirfd``, of directory ``rel`` (``Layer.readable_opened``), holds a readable fd
        now too: counted with the node holding it while this cache holds that, so its
        eviction, invalidation or shedding lets go of both, and the bound sees it."""
        with self._lock:
            hit = self._dirs.get(rel)
            if hit is None or not any(e.dirfd is dirfd for e in hit[0].entries):
                return  # (not cached: the fd goes with the DirFd, soon)
            self._dirs[rel] = (hit[0], hit[1] + 1)
            self._fds += 1
            self._bound()

    def _cached(self, rel: str) -> Node | None:
        # an entry stored before a later change is still good unless that change dropped
        # it: changes drop the subtrees they touch, and nothing else depends on them
        with self._lock:
            hit = self._dirs.get(rel)
            if hit is None:
                return None
            self._dirs.move_to_end(rel)
            return hit[0]

    def held_dir(self, layer: Layer, rel: str) -> DirFd | None:
        """The fd this cache holds of directory ``rel`` *of layer* ``layer`` (a layer
        path), or None. Found under the merged path of the same name; an entry reached
        through a redirect, whose layer path differs, does not count. ``Layer.parent``
        acts relative to it: the cache holds only directories that are where it says
        (every change through the mount drops the subtrees it touches, and lower layers
        do not change under a mount)."""
        node = self._cached(rel)
        if node is not None:
            for e in node.entries:
                if e.layer is layer:
                    return e.dirfd if e.rel == rel else None
        return None

    def _store(self, rel: str, epoch: int, node: Node) -> None:
        fds = _fds_of(node)
        with self._lock:
            if epoch != self._epoch:
                return
            old = self._dirs.pop(rel, None)
            if old is not None:
                self._fds -= old[1]
            else:
                self._count(rel, 1)
            self._dirs[rel] = (node, fds)
            self._fds += fds
            self._bound()

    def _bound(self) -> None:
        """Evict the least recently used directories past the bound (lock held)."""
        bound = self.max_fds
        if self.fd_room is not None:  # (a length and an int read: no lock taken)
            bound = max(fdbudget.LOOKUP_FLOOR, min(bound, fdbudget.LOOKUP_FLOOR + self.fd_room()))
        while self._fds > bound and self._dirs:
            key, (_, held) = self._dirs.popitem(last=False)
            self._fds -= held
            self._count(key, -1)

    def _root(self) -> Node:
        entries = []
        for layer in self.stack.layers:
            entries.append(Entry(layer, "", os.fstat(layer.root_fd), layer.root))
            # an opaque root is meaningless to the kernel too: all roots merge
        return Node("", tuple(entries))

    def _root_parent(self) -> Node:
        """The root as the parent of a lookup: its structure never changes, and a parent's
        stat data is not used, so it is read once."""
        root = self._root_node
        if root is None:
            root = self._root_node = self._root()
        return root

    @staticmethod
    def _still_there(node: Node, parent: Node, seen: os.stat_result | None = None) -> Node | None:
        """Cached directory ``node`` with fresh stat data, one ``fstatat`` of its name per
        layer holding it; None (look it up afresh) unless each is still the directory the
        cache holds an fd of (a layer changed behind the mount's back) at its plain name.
        ``seen``: a directory of one layer, its name's stat there read already."""
        name = node.rel.rpartition("/")[2]
        if len(node.entries) == 1:
            # a directory of one layer (an upper-only one: each GETATTR of a parent after
            # a change in it), as the loop below, without its table
            e = node.entries[0]
            for p in parent.entries:
                if p.layer is e.layer:
                    break
            else:
                return None
            if p.dirfd is None or e.dirfd is None or e.rel != join(p.rel, name):
                return None
            st = e.layer.stat_at(p.dirfd, name) if seen is None else seen
            if st is None or st.st_ino != e.st.st_ino or not stat.S_ISDIR(st.st_mode):
                return None
            return Node(node.rel, (Entry(e.layer, e.rel, st, e.dirfd),), node.opaque,
                        node.upper_whiteout, node.data, node.upper_marker)
        where = {id(p.layer): p for p in parent.entries if p.dirfd is not None}
        entries = []
        for e in node.entries:
            p = where.get(id(e.layer))
            if p is None or e.dirfd is None or e.rel != join(p.rel, name):
                return None
            st = e.layer.stat_at(p.dirfd, name)
            if st is None or st.st_ino != e.st.st_ino or not stat.S_ISDIR(st.st_mode):
                return None
            entries.append(Entry(e.layer, e.rel, st, e.dirfd))
        return Node(node.rel, tuple(entries), node.opaque, node.upper_whiteout, node.data,
                    node.upper_marker)

    def fresh_dir(self, rel: str) -> tuple[Node, os.stat_result] | None:
        """Directory ``rel`` (not the root) as ``lookup`` would find it when the cache holds
        it and its parent, without making a node: the cached node (its structure; its
        entries' stat data are the cached ones) and its top entry's fresh stat. The same
        checks as ``_still_there`` (one ``fstatat`` of its name per layer holding it, each
        still the directory the cache holds an fd of, at its plain name) and the same LRU
        moves as ``_lookup``'s; None where ``lookup`` would do more (a miss, a redirect, a
        change behind the mount's back): the caller looks it up then. A GETATTR of a
        directory after every change in it (the kernel drops its attributes) comes here."""
        parent_rel, _, name = rel.rpartition("/")
        dirs = self._dirs
        with self._lock:
            hit = dirs.get(rel)
            if hit is None:
                return None
            if parent_rel:
                above = dirs.get(parent_rel)
                if above is None:
                    return None
                dirs.move_to_end(parent_rel)
                parent = above[0]
            else:  # (set by the lookup that cached ``rel``)
                parent = self._root_node
                if parent is None:
                    return None
            dirs.move_to_end(rel)
        node = hit[0]
        entries = node.entries
        if len(entries) > 1:
            fresh = self._still_there(node, parent)
            return None if fresh is None else (node, fresh.entries[0].st)
        # one layer (an upper-only directory, the common case): ``_still_there``'s checks,
        # its layer path the merged one (a redirected one: ``lookup``)
        top = entries[0]
        layer = top.layer
        for p in parent.entries:
            if p.layer is layer:
                break
        else:
            return None
        if p.dirfd is None or top.dirfd is None or p.rel != parent_rel or top.rel != rel:
            return None
        st = layer.stat_at(p.dirfd, name)
        if st is None or st.st_ino != top.st.st_ino or st.st_mode & 0o170000 != _S_IFDIR:
            return None
        return node, st

    def upper_dir(self, rel: str) -> Node | None:
        """Directory ``rel`` (not the root) as the cache holds it, when that is one upper
        entry at its own path with its fd: an upper-only or an opaque directory, not one
        reached through a redirect. Only the upper holds names in it: ``_lookup_in`` stats
        a name there in that fd and nowhere else (no layer below holds the parent, so no
        whiteout is looked for either). None otherwise. The LRU move of ``_cached``; no
        freshness check, as ``_directory``'s (changes through the mount drop what they
        touch)."""
        with self._lock:
            hit = self._dirs.get(rel)
            if hit is None:
                return None
            self._dirs.move_to_end(rel)
        node = hit[0]
        entries = node.entries
        if len(entries) != 1:
            return None
        top = entries[0]
        layer = top.layer
        if not layer.writable or layer.index or top.rel != rel or top.dirfd is None:
            return None
        return node

    def upper_name(self, parent_rel: str, name: str) -> "UpperName | None":
        """``lookup`` of ``name`` in directory ``parent_rel`` when that is ``upper_dir``:
        one ``fstatat`` of the name in its upper fd. Absent, it is kept as ``_lookup``
        keeps it (``absent``, for the creation that follows: ``UpperName.st`` None); found,
        ``found_upper`` makes its node from that stat. None (nothing read) for any other
        parent. ``name`` is a plain one (neither empty, ``.``, ``..``, an OCI marker's nor
        over NAME_MAX bytes: the caller's checks)."""
        epoch = self._epoch  # read before the layers, so a racing change voids the store
        parent = self.upper_dir(parent_rel)
        if parent is None:
            return None
        top = parent.entries[0]
        st = top.layer.stat_at(top.dirfd, name)  # type: ignore[arg-type]
        if st is None:
            rel = f"{parent_rel}/{name}"
            self._keep_absent(rel, epoch, Node(rel, ()))
        return UpperName(parent, epoch, st)

    def found_upper(self, rel: str, found: "UpperName") -> Node:
        """``lookup(rel)`` of a name ``upper_name`` found (``found.st``, read at
        ``found.epoch`` in ``found.parent``'s upper fd), without reading it again: the
        same node, cached and kept as ``_lookup`` does. Where that stat may be stale or
        not the one ``lookup`` would use, ``lookup`` reads afresh: a change since (the
        epoch moved), the fd limit (``lookup`` waits). A directory the cache holds is
        checked by ``_still_there`` from that stat."""
        st = found.st
        if found.epoch != self._epoch:
            return self.lookup(rel)
        parent = found.parent
        if st.st_mode & 0o170000 == _S_IFDIR:
            cached = self._cached(rel)
            if cached is not None:  # (``_lookup``'s check, from that stat for one layer's)
                fresh = self._still_there(cached, parent, st if len(cached.entries) == 1 else None)
                if fresh is not None:
                    return fresh
        try:
            node = self._lookup_in(parent, rel, st)
        except OSError as e:
            if e.errno not in fdbudget.EXHAUSTED:
                raise
            return self.lookup(rel)
        parent_rel, name = split(rel)
        self._keep_found(rel, parent_rel, name, found.epoch, node, True)
        return node

    def found_dir(self, rel: str, found: "UpperName") -> Node | None:
        """``found_upper`` of a directory the cache holds (one upper entry: only the upper
        holds names in ``found.parent``), where ``_still_there``'s checks pass from
        ``found.st`` (its held fd's inode, a directory, at its plain name), without a new
        ``Node`` or ``Entry``: the cached node (its structure; its entries' stat the cached
        one: the caller answers ``found.st``, which ``found_upper``'s node would carry),
        with ``_cached``'s LRU move. None wherever ``found_upper`` would do more (a change
        since: the epoch moved; not cached; the checks failing: ``_lookup_in``)."""
        if found.epoch != self._epoch:
            return None
        cached = self._cached(rel)
        if cached is None or len(cached.entries) != 1:
            return None
        e = cached.entries[0]
        p = found.parent.entries[0]
        st = found.st
        if e.layer is not p.layer or p.dirfd is None or e.dirfd is None or e.rel != rel \
                or st.st_ino != e.st.st_ino or st.st_mode & 0o170000 != _S_IFDIR:
            return None
        return cached

    def made_dir(self, rel: str, st: os.stat_result) -> None:
        """The directory a MKDIR just made at ``rel`` (``st``: its stat, read after every
        change made to it), cached as the first ``lookup`` below it would cache it
        (``_lookup_in`` from that stat: its fd, the marks its xattr names show, the OCI
        opaque marker looked for), where its parent is ``upper_dir`` (only the upper holds
        it, so that lookup reads nothing else): the kernel's first LOOKUP and CREATE in it
        (an untar's, per directory) then take the short paths. Called in the creation's
        namespace lock hold, at the epoch read here (a change since voids the store, as
        every lookup's). Nothing is cached, and nothing raised, where that lookup fails (the
        fd limit: the next lookup does it) or finds another object."""
        parent_rel, name = split(rel)
        if not parent_rel:
            return
        epoch = self._epoch
        parent = self.upper_dir(parent_rel)
        if parent is None:
            return
        try:
            node = self._lookup_in(parent, rel, st)
        except OSError:
            return
        if node.entries and node.entries[0].dirfd is not None:
            self._store(rel, epoch, node)

    def directory(self, rel: str) -> Node:
        """The merged directory at ``rel``; ENOENT/ENOTDIR when it is not one. At the fd
        limit the walk waits for fds (``fdbudget.patiently``, inlined)."""
        try:
            return self._directory(rel)
        except OSError as e:
            if e.errno not in fdbudget.EXHAUSTED:
                raise
            # (the walk's frames, and the fds they held, go with the exception here)
        return fdbudget.waited(self._directory, rel)

    def _directory(self, rel: str) -> Node:
        if not rel:
            return self._root()
        epoch = self._epoch  # read before the layers, so a racing change voids the store
        node = self._cached(rel)
        if node is not None:
            return node
        # the uncached ancestors, deepest first; then down from the deepest cached one
        missing = [rel]
        head = split(rel)[0]
        parent = None
        while head:
            parent = self._cached(head)
            if parent is not None:
                break
            missing.append(head)
            head = split(head)[0]
        if parent is None:
            parent = self._root_parent()
        for path in reversed(missing):
            node = self._lookup_in(parent, path)
            if not node.exists:
                raise OSError(errno.ENOENT, "no such directory", rel)
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory", rel)
            self._store(path, epoch, node)
            parent = node
        return node

    def lookup(self, rel: str, *, keep: bool = True) -> Node:
        """The merged object at ``rel`` (``Node.exists`` is False when absent). At the fd
        limit the walk waits for fds (``fdbudget.patiently``, inlined). ``keep`` False: a
        regular file found is not kept for an open (``recent``): a removal's lookup, whose
        change voids it at once."""
        try:
            return self._lookup(rel, keep)
        except OSError as e:
            if e.errno not in fdbudget.EXHAUSTED:
                raise
        return fdbudget.waited(self._lookup, rel, keep)

    def _lookup(self, rel: str, keep: bool = True) -> Node:
        if not rel:
            return self._root()
        parent_rel, name = split(rel)
        if _never_there(name, rel):
            return Node(rel, ())
        epoch = self._epoch  # read before the layers, so a racing change voids the store
        parent = self._root_parent() if not parent_rel else self._directory(parent_rel)
        cached = self._cached(rel)
        if cached is not None:
            # a directory whose structure is known (changes through the mount drop it)
            fresh = self._still_there(cached, parent)
            if fresh is not None:
                return fresh
        node = self._lookup_in(parent, rel)
        self._keep_found(rel, parent_rel, name, epoch, node, keep)
        return node

    def _keep_found(self, rel: str, parent_rel: str, name: str, epoch: int, node: Node,
                    keep: bool) -> None:
        """What a lookup read at ``epoch`` found at ``rel`` (``node``), kept for the next
        requests: a directory's structure, a regular file for an open, an absence for a
        creation (unless ``keep`` is False: a removal's lookup)."""
        entries = node.entries
        if entries:
            top = entries[0]
            mode = top.st.st_mode
            if stat.S_ISDIR(mode):
                # kept: a lookup below it (the kernel's next request, often) needs its structure
                self._store(rel, epoch, node)
            elif keep and stat.S_ISREG(mode) and len(entries) == 1 and node.data is None:
                # kept for an open that follows (``recent``; no fd: not the entry's ``parent``)
                self._keep(parent_rel, name, epoch, (top.layer, top.rel, top.st, top.xattrs))
        elif keep and not node.upper_whiteout and not node.upper_marker:
            self._keep_absent(rel, epoch, node)  # for a creation that follows (``absent``)

    def lower_exists(self, rel: str) -> bool:
        """Whether a lower layer shows something at ``rel`` (below whatever the upper has):
        the first lower layer holding its parent that has the name or a whiteout of it
        decides."""
        parent_rel, name = split(rel)
        lowers = self.directory(parent_rel).lowers
        for k, pentry in enumerate(lowers):
            layer = pentry.layer
            lrel = join(pentry.rel, name)
            names = None
            if pentry.dirfd is None:
                st = layer.lstat(lrel)
            else:
                names = self.names.known(layer, pentry.rel)
                st = _stat_listed(layer, pentry.dirfd, name, names)
            if st is None:
                if k < len(lowers) - 1 and self._oci_whiteout(layer, pentry, lrel, name, names):
                    return False
                continue
            return not whiteout.is_whiteout(st)
        return False

    def _lookup_in(self, parent: Node, rel: str, seen: os.stat_result | None = None) -> Node:
        """The merged object at ``rel`` inside the merged directory ``parent``. ``seen``:
        the name's stat in the parent's first layer, read through its fd already
        (``found_upper``)."""
        name = split(rel)[1]
        if _never_there(name, rel):
            return Node(rel, ())
        # where the parent lives in each layer (its path there may differ: redirects)
        parent_in = {id(p.layer): p for p in parent.entries if p.is_dir}
        layers = self.stack.layers
        # the last layer the search reaches unless a redirect is followed: a whiteout
        # there would hide nothing, so none is looked for
        last = max((i for i, layer in enumerate(layers) if id(layer) in parent_in), default=-1)
        entries: list[Entry] = []
        opaque = upper_whiteout = upper_marker = False
        data: Entry | None = None
        meta_lower: Entry | None = None  # the first lower one below a metacopy file, itself one
        redirect: str | None = None  # layer path to use in the layers below, once redirected
        merged_name = name  # (``name`` is a relative redirect's once one is followed)
        metacopy = False
        stop_at: int | None = None  # the last layer searched, when a redirect's walk ends it
        # the bottom layer's redirects are never read (the kernel's d->last): nothing is
        # searched below it, and a malformed one there fails no lookup
        bottom = len(layers) - 1
        for i, layer in enumerate(layers):
            if stop_at is not None and i > stop_at:
                break
            pentry = None
            names = None  # the parent's names in this layer, when held (lower layers)
            if redirect is not None:
                lrel = redirect
                walked = self._redirect_walk(layer, lrel) if "/" in lrel else _Walked(lrel)
                if walked is None:
                    break  # a whiteout or non-directory on the way: the kernel stops there
                redirect = walked.below
                if walked.last:
                    stop_at = i  # (an opaque directory on the way: the kernel's d->stop)
                there = walked.there and _redirected_name(split(lrel)[1], rel)
                st = layer.lstat(lrel) if there else None
            elif id(layer) in parent_in:
                pentry = parent_in[id(layer)]
                lrel = join(pentry.rel, name)
                if name != merged_name and not _redirected_name(name, rel):
                    st = None
                elif seen is not None:
                    st, seen = seen, None
                elif pentry.dirfd is None:
                    st = layer.lstat(lrel)
                else:
                    names = self.names.known(layer, pentry.rel)
                    st = _stat_listed(layer, pentry.dirfd, name, names)
            else:
                continue
            if st is None:
                below = i < len(layers) - 1 if redirect is not None else i < last
                if below and self._oci_whiteout(layer, pentry, lrel, name, names):
                    # in the upper too: fuse-overlayfs writes them where it cannot mknod,
                    # and so does overlaypc (whiteout.Format.devices)
                    upper_whiteout = upper_marker = layer.writable
                    break
                continue
            if whiteout.is_whiteout(st):
                upper_whiteout = upper_whiteout or layer.writable
                break
            is_dir = stat.S_ISDIR(st.st_mode)
            if metacopy:
                if not stat.S_ISREG(st.st_mode):
                    break
                found = self._below_metacopy(layer, lrel, st, pentry, name)
                if not self._metacopy(found, pentry, name):
                    data = found
                    break
                meta_lower = meta_lower or found
                # metadata only here too (a former upper used as a lower): the data is
                # further down, through this one's redirect if it has one, as the kernel's
                # lookup goes on past each metacopy layer (before, this sparse file was
                # taken for the data: zeros)
                target = self._redirect(found) if self.follow_redirects and i < bottom else None
                if target is not None:
                    redirect, name = _followed(target, redirect, name)
                    stop_at = None if target.startswith("/") else stop_at
                continue
            if entries and not is_dir:
                break  # a lower non-directory below a directory is not merged
            dirfd = None
            if is_dir:
                dirfd = layer.dir_at(pentry.dirfd, name) if pentry and pentry.dirfd else layer.dir_fd(lrel)
                if dirfd is None:
                    continue  # removed underneath us
            parent_fd = pentry.dirfd if pentry is not None and not is_dir else None
            xattrs = None
            if parent_fd is not None and stat.S_ISREG(st.st_mode):
                xattrs = self.xattr_names.of(layer, parent_fd, name, st) if not layer.writable \
                    else layer.xattr_names_at(parent_fd, name)
            entry = Entry(layer, lrel, st, dirfd, parent_fd, xattrs)
            entries.append(entry)
            if is_dir:
                # its xattr names, listed once here: absent marks cost no call (not kept
                # in the entry: a cached directory's xattrs may change through the mount)
                xattrs = layer.xattr_names_of(dirfd) if dirfd is not None else None
                if xattrs is not None and layer.writable and self._origins.isdisjoint(xattrs):
                    # no copy-up origin: what ``inumbers`` would read of it, known now
                    # (one pinned by the fd; a new upper dir, e.g. one MKDIR made)
                    dirfd.origin_ino = None  # type: ignore[union-attr]
                if xattrs is not None and layer.writable and self._protattr not in xattrs:
                    dirfd.prot = 0  # type: ignore[union-attr]  # (``protection``: no flags)
                if self._opaque(entry, xattrs):
                    opaque = True
                    break
            elif not (stat.S_ISREG(st.st_mode) and self._metacopy(entry, pentry, name)):
                break
            else:
                # attributes here, data further down (without metacopy=on: refused once its
                # redirect is read, below)
                metacopy = True
            # (not following redirects, the kernel reads them where a layer below holds the
            # parent, its d->last: and refuses the lookup then, "refusing to follow redirect")
            target = self._redirect(entry, xattrs) \
                if i < (bottom if self.follow_redirects else last) else None
            if metacopy and not self.follow_metacopy:
                # its data is below, and nothing here may follow it (the kernel: EPERM,
                # "refusing to follow metacopy origin", before it searches the next layer or
                # after the last, so this layer's malformed redirect fails first: EINVAL);
                # reading the sparse copy would serve zeros, and a write would make them
                # permanent
                raise OSError(errno.EPERM, "metacopy file in a mount without metacopy=on", rel)
            if target is not None and not self.follow_redirects:
                raise OSError(errno.EPERM, "redirect not followed (redirect_dir=nofollow)", rel)
            if target is not None:
                redirect, name = _followed(target, redirect, name)
                stop_at = None if target.startswith("/") else stop_at
        if self.index is not None and entries and not entries[0].layer.writable \
                and self.index.eligible(entries[0]):
            shared = self.index.find(entries[0])
            if shared is not None:
                if data is None and stat.S_ISREG(shared.st.st_mode) and self._metacopy(shared, None, name):
                    # the kernel's metadata copy-up with index and metacopy: the entry is
                    # sparse, its data is the lower file it is the index of
                    if not self.follow_metacopy:
                        raise OSError(errno.EPERM, "metacopy index entry in a mount without metacopy=on", rel)
                    data = entries[0]
                entries.insert(0, shared)
        if metacopy and data is None:
            raise OSError(errno.EIO, "data of metacopy file not found in lower layers", rel)
        return Node(rel, tuple(entries), opaque, upper_whiteout, data, upper_marker, meta_lower)

    def _redirect_walk(self, layer: Layer, path: str) -> "_Walked | None":
        """The directories on a redirected ``path`` (one the lookup follows from each lower
        layer's root) in ``layer``, as the kernel's ``ovl_lookup_layer`` walks them: a
        directory's own redirect rewrites the path for the layers below (the kernel's
        ``ovl_check_redirect``; the walk here goes on by name), an opaque one ends the
        search below this layer (an absolute redirect after it resumes it). None where a
        whiteout (either format: a lower layer's OCI ``.wh.NAME`` hides as the kernel's
        device does) or a non-directory on the way stops the lookup. The bottom layer's
        directories' marks are not read (the kernel's d->last). A ``.``, ``..`` or empty
        name on the way fails (``_redirected_name``) once the walk reaches it."""
        parts = path.split("/")
        walked = _Walked(path)
        bottom = layer is self.stack.layers[-1]
        for k in range(1, len(parts)):
            rel = "/".join(parts[:k])
            if not _redirected_name(parts[k - 1], path):
                walked.there = False
                return walked
            st = layer.lstat(rel)
            if st is None:
                if whiteout.has_oci_whiteout(layer, rel):
                    return None  # (a ``.wh.NAME`` beside it: a whiteout, as a 0/0 device)
                walked.there = False
                return walked
            if not stat.S_ISDIR(st.st_mode):
                return None  # (a whiteout too)
            if layer.writable or bottom:
                continue
            if whiteout.is_opaque(layer, rel, self.prefix):
                walked.last = True  # (its own redirect not followed, as the kernel's)
                continue
            target = redirect_target(layer.getxattr(rel, self.prefix + "redirect")) \
                if self.follow_redirects else None
            if target is None:
                continue
            # (``below`` ends with the same names after this directory as ``path``: a
            # redirect replaces what leads to them, the directory's own name at most)
            # (by components: an empty name a relative one may give stays one)
            kept = walked.below.split("/")
            if target.startswith("/"):
                head, walked.last = target[1:].split("/"), False
            else:
                head = kept[:len(kept) - (len(parts) - k) - 1] + [target]
            walked.below = "/".join(head + parts[k:])
        return walked

    def _oci_whiteout(self, layer: Layer, pentry: Entry | None, lrel: str, name: str,
                      names: frozenset[str] | None) -> bool:
        """Whether ``.wh.NAME`` marks NAME deleted in ``layer``. In a lower layer the
        directory's names answer (read now if not held: the lookups of its other names
        need them too); a marker they list is ``fstatat``-ed all the same."""
        if pentry is None or pentry.dirfd is None:
            return whiteout.has_oci_whiteout(layer, lrel)
        marker = whiteout.OCI_PREFIX + name
        if len(marker) > NAME_MAX // 4 and len(os.fsencode(marker)) > NAME_MAX:
            return False
        if names is None:
            names = self.names.fill(layer, pentry.rel, pentry.dirfd)
        return _stat_listed(layer, pentry.dirfd, marker, names) is not None

    def _opaque(self, entry: Entry, xattrs: frozenset[str] | None = None) -> bool:
        """Whether directory ``entry`` is opaque; ``xattrs``: its xattr names, if listed."""
        layer = entry.layer
        if entry.dirfd is None:
            return whiteout.is_opaque(layer, entry.rel, self.prefix)
        for attr in (self.prefix + "opaque", whiteout.FOO_OPAQUE):
            if xattrs is not None and attr not in xattrs:
                continue
            if layer.getxattr_at(entry.dirfd, attr) == b"y":
                return True
        names = self.names.known(layer, entry.rel)  # held only once listed or looked in
        return _stat_listed(layer, entry.dirfd, whiteout.OCI_OPAQUE, names) is not None

    def _below_metacopy(self, layer: Layer, lrel: str, st: os.stat_result, pentry: Entry | None,
                        name: str) -> Entry:
        """The regular file found below a metacopy file, with its xattr names where the
        lookup of a lower file would list them (so ``_metacopy`` of it costs no call)."""
        xattrs = None
        if pentry is not None and pentry.dirfd is not None and not layer.writable:
            xattrs = self.xattr_names.of(layer, pentry.dirfd, name, st)
        return Entry(layer, lrel, st, None, None, xattrs)

    def _metacopy(self, entry: Entry, pentry: Entry | None, name: str) -> bool:
        """Whether the regular file ``entry`` is a metadata-only copy (kernel format)."""
        attr = self.prefix + "metacopy"
        if entry.xattrs is not None:
            return attr in entry.xattrs
        if pentry is not None and pentry.dirfd is not None:
            return entry.layer.getxattr_name(pentry.dirfd, name, attr) is not None
        return entry.layer.getxattr(entry.rel, attr) is not None

    def _redirect(self, entry: Entry, xattrs: frozenset[str] | None = None) -> str | None:
        attr = self.prefix + "redirect"
        if (xattrs is not None and attr not in xattrs) or entry.lacks(attr):
            return None
        if entry.dirfd is not None:
            raw = entry.layer.getxattr_at(entry.dirfd, attr)
        else:
            raw = entry.layer.getxattr(entry.rel, attr)
        return redirect_target(raw)


@record
class _Walked:
    """``Lookup._redirect_walk``'s answer: the redirected path for the layers below
    (``below``), whether the walk reached the last name's directory in this layer
    (``there``), whether an opaque directory on the way ends the search here (``last``)."""
    below: str
    there: bool = True
    last: bool = False


def redirect_target(raw: bytes | None) -> str | None:
    """A ``redirect`` xattr's value as the kernel reads it (``ovl_get_redirect_xattr``):
    None when absent; the value up to its first NUL; EINVAL (the lookup fails) for an
    empty value, an absolute one with an empty component (``//``, a trailing ``/``, ``/``
    alone), a relative one with a ``/``. Its names are looked up in lower layers as they
    are: a ``.``, ``..`` or empty one fails there (``_redirected_name``), and none climbs
    out of a layer (``Layer`` resolves beneath its root, and never ``..``)."""
    if raw is None:
        return None
    if not raw:
        raise OSError(errno.EINVAL, "invalid redirect: empty")
    target = os.fsdecode(raw.split(b"\0", 1)[0])
    if "/" in target and (not target.startswith("/") or "" in target[1:].split("/")):
        raise OSError(errno.EINVAL, f"invalid redirect {target!r}")
    return target


def _redirected_name(name: str, rel: str) -> bool:
    """Whether ``name``, which a redirect gave, is looked up in a lower layer: EACCES for
    ``.``, ``..`` and an empty name (the kernel's ``lookup_one`` refuses them, and the
    lookup of ``rel`` fails), False for one longer than NAME_MAX (ENAMETOOLONG: absent
    there, as the kernel's ``ovl_lookup_single`` takes it)."""
    if name in ("", ".", ".."):
        raise OSError(errno.EACCES, f"redirect to {name!r}", rel)
    return len(name) <= NAME_MAX // 4 or len(os.fsencode(name)) <= NAME_MAX


def _followed(target: str, redirect: str | None, name: str) -> tuple[str | None, str]:
    """The lookup's (``redirect``, ``name``) after a redirect ``target`` (``_redirect``)."""
    if target.startswith("/"):
        return target.strip("/"), name  # absolute: from each lower layer's root
    if redirect is not None:
        # relative, met after an absolute one (a former upper used as a lower): same
        # parent as the path followed so far, other name (the kernel's ovl_check_redirect
        # prepends the parent path)
        return join(split(redirect)[0], target), name
    return None, target  # relative: same merged parent, other name
