"""``OverlayFS``: the overlay as an object, driven by the FUSE adapter or by tests.

Owns: the mount's shared state (layer stack, lookup, inode and handle tables, copy-up,
stats, the namespace lock) and a flat API of operations on *merged relative paths*
(no leading slash; ``""`` is the root). Each concern lives in its own module
(``namespace``, ``attrs``, ``files``, ``readdir``, ``copyup``); this class wires them
together and keeps the few cross-cutting rules: read-only mounts answer EROFS, data
changes bump an inode's data version, unlinks and renames update live inodes.

Nothing here knows about FUSE: errors are ``OSError`` with an errno, translated by the
adapter at one boundary.

Caveat: the process umask must be 0 while an ``OverlayFS`` runs (``cli`` sets it): new
objects get the caller's mode with the caller's umask applied here, not the daemon's.
"""
from __future__ import annotations

import functools
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator

from . import fdbudget, impure, logs, scopes, whiteout
from .attrs import Attr, Attributes
from .config import MountConfig
from .copyup import WORK_DIR, CopyUp, Seen, check_incompat, clean_workdir, mark_volatile
from .fdbudget import DEFAULT_WORKERS, WALK_FDS_PER_LAYER, FdBudget, open_count
from .files import Files, OpenResult
from .handles import HandleTable
from .inodes import InodeKey, InodeTable, OverlayInode, key_of_top
from .inumbers import InodeNumbers
from .layer import Layer, join, moved, split
from .lookup import Entry, Lookup, Node, UpperName, check_name
from .nameless import NamelessDirs
from .once import made_once
from .protection import Protection
from .ownership import ROOT, Caller, Ownership
from .pathguard import PathGuard
from .stack import LayerStack
from .sharing import Canonical, ExtentMap, changing, map_file
from .stats import Stats
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from . import killpriv
    from .fileattrs import FileAttrs
    from .index import IndexDir
    from .namespace import Namespace
    from .layer import DirFd
    from .readdir import DirEntry
    from typing import TypeVar

    T = TypeVar("T")

log = logs.get("overlaypc.core")


def _first_listing(*args, **kwargs) -> "list[DirEntry]":
    """``merged_listing`` until the first listing: ``readdir`` is imported then, not at
    start-up (no mount needs it before a request lists a directory), and its function
    takes this name (unless something else was put there), so later calls cost nothing."""
    global merged_listing
    from .readdir import merged_listing as listing
    if merged_listing is _first_listing:
        merged_listing = listing
    return listing(*args, **kwargs)


merged_listing = _first_listing


@scopes.contextmanager
def _naming(layer: Layer) -> Iterator[None]:
    """Errors of the layer's relative paths told with the layer's path (the CLI prints
    them: 'workdir /w/work: Not a directory', not "[Errno 20] ...: 'work'")."""
    try:
        yield
    except OSError as e:
        if not isinstance(e.filename, str) or os.path.isabs(e.filename):
            raise
        where = os.path.join(layer.path, e.filename) if e.filename else layer.path
        raise OSError(e.errno, f"{layer.name}dir {where}: {e.strerror}") from None


class OverlayFS:
    def __init__(self, config: MountConfig, *, workers: int = DEFAULT_WORKERS) -> None:
        """``workers``: the most threads that run requests at once (each keeps a few fds
        beside the open files, ``fdbudget``): the engine's bound, passed in by the mount
        (the core knows no engine)."""
        self.config = config
        self.stack = LayerStack(config.lowers, config.upper, config.work, checked=config.checked)
        try:
            #: what this mount writes (whiteout.Format): user.overlay.* where trusted.* cannot
            #: be set, .wh.NAME files where 0/0 devices cannot be made (decided in start)
            self.format = whiteout.probe_xattrs(self.stack.work if config.writable else None,
                                                userxattr=config.userxattr)
            if self.format.userxattr and not config.userxattr:
                if config.metacopy:
                    raise OSError(errno.EPERM, "metacopy=on needs trusted.* xattrs, which this "
                                  "process cannot set", config.work)
                config.userxattr = True  # as if given: everything else follows the format
            if config.index and self.stack.work is not None:
                # as the kernel: index needs file handles of every layer, else it is off
                # (index and indexroots are imported only for an index: mounts without
                # one spare their ~0.3 ms of start-up)
                from . import indexroots
                lacking = indexroots.without_handles(self.stack)
                if lacking is not None:
                    log.warning("index=on: %s cannot encode file handles; falling back to "
                                "index=off, as the kernel does", lacking)
                    config.index = False
        except BaseException:
            self.stack.close()
            raise
        self.prefix = self.format.prefix
        self.writable = config.writable
        self.ns_lock = threading.RLock()
        fdbudget.unwaited_under(self.ns_lock)  # (its holder fails at the fd limit, never waits)
        #: whether a request's paths are still right when its change holds ``ns_lock``
        self.paths = PathGuard()
        self.stats = Stats()
        # fd budget (fdbudget.py): every fd cache gets its share of the process's limit
        self.fd_budget = FdBudget.for_process()
        self.lookup = Lookup(self.stack, self.prefix, max_fds=self.fd_budget.lookup,
                             follow_redirects=(config.redirect_dir or "off") != "nofollow",
                             follow_metacopy=config.metacopy)
        for layer in self.stack.layers:  # changes act relative to the cache's directory fds
            layer.dirs = functools.partial(self.lookup.held_dir, layer)
            layer.readable_opened = self.lookup.count_readable
        self.inos = InodeNumbers(self.stack, self.prefix, index=config.index)
        self.inodes = InodeTable()
        self.handles = HandleTable()
        #: the lower files with no name left that were live when their name went
        #: (``unlinked``), while a change may still reach them (pruned as they are released)
        self._nameless_lowers: set[OverlayInode] = set()
        #: removed directories the kernel still holds (``nameless``): their held fds
        self.nameless = NamelessDirs(self)
        #: the most fds open files may hold (``fdbudget``): an OPEN or CREATE beyond fails
        #: with ENFILE, so that other requests keep the fds they need (a lookup's walk down a
        #: directory merged across every layer too)
        self.open_file_fds = self.fd_budget.open_files(
            held=open_count(), workers=workers,
            walk=WALK_FDS_PER_LAYER * len(self.stack.layers))
        #: owner and mode shown and written (ID mapping, squashing, override xattrs)
        self.ownership = Ownership.for_mount(
            config, self.stack.layers + ([self.stack.work] if self.stack.work else []))
        self.copyup: CopyUp | None = None
        if self.stack.upper is not None:
            # fsync=0 (fuse-overlayfs): copy-ups skip their fsyncs as under volatile
            self.copyup = CopyUp(self.stack, self.lookup, self.ns_lock, self.stats,
                                 xattr_prefix=self.prefix,
                                 volatile=config.volatile or not config.fsync,
                                 key_of=self.identity, on_copied=self._copied,
                                 metacopy=config.metacopy, ownership=self.ownership)
        if self.copyup is not None:
            self.copyup.inos = self.inos
        self.index: IndexDir | None = None
        if config.index and self.stack.work is not None:
            from . import index  # (only with index=on: not imported at a default mount)
            self.index = index.IndexDir(self.stack.work, self.prefix)
            self.lookup.index = self.index
            self.inos.index_dir = self.index
            assert self.copyup is not None
            self.copyup.index = self.index
        self.sharing: ExtentMap | None = ExtentMap(max_fds=self.fd_budget.sharing) if config.sharing else None
        self.lookup.fd_room = lambda: self.open_file_fds - self.open_fds()
        #: immutable/append-only flags of the objects a change changes
        self.protection = Protection(self.prefix)
        if self.stack.upper is not None:
            # the root starts with none: the kernel overlay's root inode is not made where
            # ``protattr`` is read (``ovl_get_inode``); a chattr through the mount sets them
            # for this mount (``fileattrs``: then read from the xattr it wrote)
            self.stack.upper.root.prot = 0
        self.attrs = Attributes(self)
        self.files = Files(self)
        #: set by the node-based adapter: a copy-up changed an object's identity (old, new,
        #: whether its attributes changed with it: a directory's, a metacopy file's data
        #: copy-up); called under the namespace lock
        self.on_rekey: Callable[[InodeKey, InodeKey, bool], None] = lambda old, new, attrs: None
        #: set by the node-based adapter: how many nodes the kernel references
        self.node_count: Callable[[], int] = lambda: 0

    @made_once
    def namespace(self) -> Namespace:
        """Creations, removals, links and renames (``namespace``), made at the first: the
        module is the package's largest to import (~1 ms), and no mount needs it before a
        request changes a name."""
        from .namespace import Namespace
        return Namespace(self)

    @made_once
    def fileattrs(self) -> FileAttrs:
        """The file-flag requests (``fileattrs``: lsattr/chattr's ioctls), made at the
        first: no mount needs the module before one."""
        from .fileattrs import FileAttrs
        return FileAttrs(self)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Lock upper/workdir against a second mount, check that an index belongs to this
        stack (``indexroots``) and its entries (``indexclean``), refused before anything is
        written, clean leftovers in workdir/work and stale index entries, and give a new
        upper its uuid (``impure.first_mount_uuid``)."""
        self.stack.lock()
        roots = cleanup = None
        held: dict[str, DirFd | None] = {}  # workdir's directories held open (``Layer.dirs``)
        if self.index is not None:
            from . import indexclean, indexroots, inuse
            inuse.refuse_held(self.stack)  # (a live kernel mount's: as the kernel, EBUSY)
            roots = indexroots.verify(self.stack, self.prefix)
            cleanup = indexclean.scan(self.stack, self.index)  # (refuses before any write too)
        if self.stack.work is not None:
            check_incompat(self.stack.work)
            with _naming(self.stack.work):
                clean_workdir(self.stack.work)
                # copy-ups and new objects are built in workdir/work: its fd, held, spares
                # them the walk from the workdir's root (nothing replaces it while mounted)
                held[WORK_DIR] = self.stack.work.dir_fd(WORK_DIR)
                self.stack.work.dirs = held.get
                if self.writable:
                    whiteout.probe_devices(self.format, self.stack.work, WORK_DIR)
                if self.config.volatile:
                    mark_volatile(self.stack.work)
        if self.writable and self.stack.upper is not None:
            impure.first_mount_uuid(self.stack.upper, self.prefix)  # (before any copy-up)
        if self.index is not None:
            self.index.prepare()
            # index entries are found, counted and linked by name in workdir/index: its fd,
            # held as workdir/work's, spares each the walk from the workdir's root
            from .index import INDEX_DIR
            held[INDEX_DIR] = self.stack.work.dir_fd(INDEX_DIR)
        if roots is not None:
            roots.record()
        if cleanup is not None:
            cleanup.clean()

    def close(self) -> None:
        if self.sharing is not None:
            self.sharing.close()
        self.stack.close()

    # -- cross-cutting rules ----------------------------------------------------------------------
    def open_fds(self) -> int:
        """The fds open files hold: one per handle, one per metacopy file being read, one
        per removed directory the kernel still holds (``nameless``), and the extent map's
        canonical files twice (as many may still be in reads)."""
        shared = 0 if self.sharing is None else 2 * self.sharing.open_fds
        return len(self.handles) + self.inodes.meta_fds + self.nameless.fds + shared

    def room_for_open(self, rel: str | None) -> None:
        """Raise ENFILE when open files hold their whole share of the fd limit (checked
        once per OPEN or CREATE, before it does anything: never after an open's copy-up;
        a few racing opens may pass at once, which the per-request reserve absorbs)."""
        if self.open_fds() >= self.open_file_fds:
            raise OSError(errno.ENFILE, f"{self.open_file_fds} fds held by open files "
                          "(raise the daemon's ulimit -n)", *(() if rel is None else (rel,)))

    def require_writable(self) -> None:
        if not self.writable or self.copyup is None:
            raise OSError(errno.EROFS, "read-only overlay")

    def identity(self, node: Node) -> InodeKey:
        """Which overlay inode the existing ``node`` is (see ``inodes``): each name of a
        lower hard link is its own inode in a writable mount without index."""
        return self.identity_top(node.top)

    def identity_top(self, top: Entry) -> InodeKey:
        """``identity`` of an existing object from its top entry (``key_of_top``)."""
        return key_of_top(top, split_links=self.writable and self.index is None)

    def _copied(self, key: InodeKey, entry: Entry, *, metadata_only: bool = False,
                filled: bool = False) -> None:
        """A copy-up installed ``entry`` for the object that was ``key``. Called under the
        namespace lock, so ``entry.rel`` names the new backing while handles reopen.
        ``metadata_only`` (metacopy): the inode is now the upper one, but its data, and so
        its open handles, stay below until the data copy-up; ``filled``: that data copy-up
        (its mtime, ctime and blocks the copy's)."""
        copied = Node(entry.rel, (entry,))
        new_key = self.identity(copied)
        # every copy-up (directories too) changes the identity the kernel's node has
        self.on_rekey(key, new_key, entry.is_dir or filled)
        inode = self.inodes.get(key)
        if inode is not None and self.inodes.hold(inode):
            try:
                if metadata_only:
                    with inode.lock:
                        inode.key = new_key
                    try:
                        self.inodes.metacopy_at(inode, entry.rel, entry)
                    except OSError:
                        pass  # the copy-up is done; only a rename of the name loses its attributes
                    self.inodes.rekey(inode, key)
                    return
                inode.rebind(entry, new_key, self.inos.ino_of(copied))
                self.inodes.rekey(inode, key)
                for handle in self.handles.for_inode(inode):
                    if handle.offer():
                        self.stats.add("handle_switches")
            finally:
                self.inodes.release(inode)

    def nameless_data_copied(self, inode: OverlayInode, entry: Entry) -> None:
        """The data copy-up of the nameless metacopy file ``inode`` (held by the caller)
        put its data into its upper file ``entry`` (``CopyUp.copy_data_nameless``, under
        the namespace lock): the inode moves there, its identity and shown inode number
        as they were (its key was the upper file's since the metadata copy-up), and its
        handles follow it now, through the upper file's held fd (``open_backing``). Its
        attributes changed (``_copied``'s ``filled``)."""
        self.on_rekey(inode.key, inode.key, True)
        inode.rebind(entry, inode.key, inode.ino)
        for handle in self.handles.for_inode(inode):
            if handle.offer():
                self.stats.add("handle_switches")

    def data_changed(self, inode: OverlayInode) -> None:
        """The inode's data changed through its kernel node (a write, a truncate): a new
        data version, which that node's page cache holds. Every name of an overlay inode
        is one kernel node, so no other node has pages to drop."""
        with inode.lock:
            inode.data_version += 1
            inode.cached_version = inode.data_version

    def index_of(self, node: Node) -> Entry | None:
        """index=on: the index entry behind ``node`` (a lower name or an upper link)."""
        if self.index is None or not node.exists:
            return None
        if node.index is not None:
            return node.index
        return self.index.of_upper(node.upper) if node.upper is not None else None

    def overlay_nlink(self, node: Node) -> int | None:
        entry = self.index_of(node)
        if entry is None:
            return None
        lower = next(iter(node.lowers), None)
        return self.index.nlink(entry, lower.st if lower else None)

    def adjust_nlink(self, entry: Entry, delta: int, links: int | None = None) -> None:
        """index=on: a name of an indexed inode came or went (``links``: see
        ``IndexDir.adjust``). Every name is one kernel node, whose count the kernel changes
        itself on LINK, UNLINK and RENAME over it."""
        assert self.index is not None
        self.index.adjust(entry, delta, links=links)

    def live_inode_of(self, entry: Entry) -> OverlayInode | None:
        """The live inode of the upper object ``entry`` (its identity is its own stat's)."""
        return self.inodes.get(self.identity(Node(entry.rel, (entry,))))

    def _live_inode(self, rel: str, node: Node | None = None) -> OverlayInode | None:
        if node is None:
            node = self.lookup.lookup(rel)
        return self.inodes.get(self.identity(node)) if node.exists else None

    @scopes.contextmanager
    def drop_extents(self, rel: str, node: Node | None = None) -> Iterator[None]:
        """Around a size change of ``rel`` by path (truncate): its live inode's sharing map
        goes before the change (``sharing.changing``); an inode that came alive during the
        change may have mapped the old file, so its map goes after it. ``node``: ``rel`` as
        looked up in this lock hold (a size change keeps its identity), else looked up."""
        inode = self._live_inode(rel, node)
        with changing(inode) if inode is not None else scopes.nullcontext():
            yield
        later = self._live_inode(rel, node)
        if later is not None and later is not inode:
            with changing(later):
                pass

    def register_origin(self, rel: str) -> None:
        """Make the lower file at ``rel`` (an upper file's copy-up origin) canonical for
        the extents it shares with it."""
        if self.sharing is None or not rel:
            return
        node = self.lookup.lookup(rel)
        if node.data is not None:  # metacopy: the data entry is the origin
            candidates = [node.data]
        else:
            parent_rel, name = split(rel)
            candidates = []
            for pentry in self.lookup.directory(parent_rel).lowers:
                lrel = join(pentry.rel, name)
                st = pentry.layer.lstat(lrel)
                if st is not None:
                    candidates.append(Entry(pentry.layer, lrel, st))
                    break
        for entry in candidates:
            if not stat.S_ISREG(entry.st.st_mode):
                return
            fd = entry.layer.open(entry.rel, os.O_RDONLY)
            try:
                fx = map_file(fd)
            finally:
                os.close(fd)
            if fx is not None:
                self.sharing.register(Canonical(entry.layer, entry.rel, fx.dev, fx.ino), fx.extents)
            return

    def data_changed_by_path(self, rel: str, node: Node | None = None) -> None:
        """The data of ``rel`` changed by path; ``node``: as ``drop_extents``'s."""
        if node is None:
            node = self.lookup.lookup(rel)
        key = self.identity(node)
        inode = self.inodes.get(key)
        if inode is not None:
            self.data_changed(inode)
        else:
            self.inodes.forget_version(key)

    def unlinked(self, node: Node, key: InodeKey | None = None) -> None:
        """``node`` lost its name (unlink, rmdir, a rename over it). Callers pass its
        ``key``, taken *before* the change. A directory: the lower files with no name
        left that were in it have their directory gone (``OverlayInode.parent_gone``)."""
        if not node.exists:
            return
        if node.is_dir:
            for inode in self._live_nameless_lowers() if self._nameless_lowers else ():
                if moved(inode.unlinked_from, node.rel, node.rel) is not None:
                    inode.parent_gone = True
            return
        inode = self.inodes.get(self.identity(node) if key is None else key)
        if inode is not None:
            if not inode.in_upper:
                inode.unlinked = True
                inode.unlinked_from = split(node.rel)[0]
                self._nameless_lowers.add(inode)

    def _live_nameless_lowers(self) -> list[OverlayInode]:
        """The lower files with no name left whose directory may still go or move (under
        the namespace lock, as every change that calls this); the released ones leave."""
        kept = self._nameless_lowers
        gone = [i for i in kept if i.refs <= 0 or i.parent_gone or i.in_upper]
        kept.difference_update(gone)
        return list(kept)

    def renamed(self, old: str, new: str) -> None:
        self.handles.renamed(old, new)
        for inode in self.inodes.live():
            path = moved(inode.rel, old, new) if inode.in_upper else None
            if path is not None:
                inode.moved(path)
        for inode in self._live_nameless_lowers() if self._nameless_lowers else ():
            path = moved(inode.unlinked_from, old, new)
            if path is not None:
                inode.unlinked_from = path

    def stats_json(self) -> bytes:
        return self.stats.to_json(open_handles=len(self.handles), live_inodes=len(self.inodes),
                                  nodes=self.node_count(),
                                  extent_map_intervals=len(self.sharing) if self.sharing else 0,
                                  cache_mode=self.config.cache)

    # -- the operations ---------------------------------------------------------------------------
    def protection_at(self, rel: str, is_dir: bool) -> int | None:
        """The immutable/append-only flags of the object at ``rel`` (``protection``); None
        where it cannot be looked up (the change then fails, or not, as it would)."""
        try:
            node = self.lookup.directory(rel) if is_dir else self.lookup.lookup(rel)
        except OSError:
            return None
        return self.protection.of_node(node)

    def getattr(self, rel: str, fh: int | None = None) -> Attr:
        if fh is not None:
            return self.files.getattr(fh)
        check_name(rel, last_only=True)
        return self.attrs.getattr(rel)

    def lookup_attr(self, rel: str, found: "UpperName | None" = None) -> tuple[Node, Attr]:
        """The merged object at ``rel`` and its attributes (``getattr``'s), one lookup;
        ENOENT when absent. ``found``: its name as ``Lookup.upper_name`` found it."""
        check_name(rel, last_only=True)
        return self.attrs.lookup_attr(rel, found)

    def readlink(self, rel: str) -> str:
        top = self.lookup.lookup(rel).top
        return top.layer.readlink(top.rel)

    def readdir(self, rel: str, *, plus: bool = False) -> list[DirEntry]:
        """The merged listing. ``plus`` also gives each entry's attributes where they are
        exactly what ``getattr`` would show; entries without (``attr`` None) are looked up
        by the kernel as usual. (A listing read in several chunks is one snapshot:
        ``listings``.) At the fd limit it waits for fds (``fdbudget.patiently``): a listing
        holds one of the directory in each layer and reads one at a time."""
        return fdbudget.patiently(self._readdir, rel, plus)

    def _readdir(self, rel: str, plus: bool) -> list[DirEntry]:
        epoch = self.lookup.epoch  # before the layers: a change during the listing voids it
        files: dict | None = {} if plus else None
        # (hard links come without attributes: the name must be known for later invalidations)
        entries = merged_listing(self.lookup.directory(rel), self.inos, self.prefix, plus=plus,
                                 ownership=self.ownership if self.ownership.active else None,
                                 names=self.lookup.names, files=files, metacopy=self.config.metacopy)
        if files:  # kept for the opens that follow (``Lookup.recent``)
            self.lookup.keep_listing(rel, epoch, files)
        return entries

    def dot_inos_at(self, rel: str) -> tuple[int, int]:
        """``st_ino`` of the directory at ``rel`` and of its parent (the root's parent is
        the root), for the ``.`` and ``..`` entries: glibc drops entries whose d_ino is 0."""
        own = self.inos.ino_of(self.lookup.directory(rel))
        parent = self.inos.ino_of(self.lookup.directory(split(rel)[0])) if rel else own
        return own, parent

    def statfs(self) -> dict:
        return self.attrs.statfs()

    def access(self, rel: str, mode: int) -> None:
        self.attrs.access(rel, mode)

    def open(self, rel: str, flags: int, *, admitted: bool = False,
             check: "Callable[[int], None] | None" = None) -> OpenResult:
        return self.files.open(rel, flags, admitted=admitted, check=check)

    def create(self, rel: str, flags: int, mode: int, caller: Caller = ROOT) -> OpenResult:
        return self.files.create(rel, flags, mode, caller)[0]

    def create_node(self, rel: str, flags: int, mode: int, caller: Caller = ROOT,
                    then: "Callable[[OpenResult, Node], T] | None" = None
                    ) -> "tuple[OpenResult, Node, T | None]":
        """``create``, the new file's node as made (its stat read after the change), and
        ``then(the open, the node)`` in the creation's lock hold (if it fails, the file
        goes again: ``Files.create``)."""
        return self.files.create(rel, flags, mode, caller, then)

    def tmpfile(self, rel: str, flags: int, mode: int, caller: Caller = ROOT,
                then: "Callable[[OpenResult, Node], T] | None" = None
                ) -> "tuple[OpenResult, Node, T | None]":
        """``O_TMPFILE`` in the directory ``rel``: an open regular file with no name
        (``Files.tmpfile``), its node, and ``then(the open, the node)`` in the lock hold
        that made it."""
        return self.files.tmpfile(rel, flags, mode, caller, then)

    def link_open(self, fd: int, dst: str, then: "Callable[[Node], T] | None" = None) -> "T | None":
        """A name ``dst`` for the open upper file ``fd`` that has none (``tmpfile``'s)."""
        return self.namespace.link_open(fd, dst, then)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        return self.files.read(fh, size, offset)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        return self.files.write(fh, data, offset)

    def truncate(self, rel: str, length: int, fh: int | None = None,
                 seen: Seen | None = None) -> None:
        """``seen``: ``rel`` as looked up in this lock hold (``Attributes.truncate``)."""
        if fh is not None:
            self.files.truncate(fh, length)
        else:
            self.attrs.truncate(rel, length, seen)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self.files.fallocate(fh, mode, offset, length)

    def fsync(self, fh: int, datasync: bool) -> None:
        self.files.fsync(fh, datasync)

    def flush(self, fh: int) -> None:
        self.files.flush(fh)

    def release(self, fh: int, dying: "Callable[[], None] | None" = None) -> None:
        self.files.release(fh, dying)

    def chmod(self, rel: str, mode: int) -> None:
        self.attrs.chmod(rel, mode)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        self.attrs.chown(rel, uid, gid)

    def kill_privs(self, rel: str | None, fh: int | None, writer: killpriv.Writer,
                   chown: tuple[int, int] | None = None,
                   inode: OverlayInode | None = None) -> bool:
        """Strip setuid/setgid/capability as ``writer``'s write does (``killpriv``),
        by path if given (a SETATTR's handle may be a read-only one of a metacopy file
        whose data is still below), else through the open handle ``fh`` (a WRITE's, or a
        SETATTR's of a file with no name left), else through one of ``inode``'s (a
        request by node: held against that handle's RELEASE). True if anything went:
        the caller drops the kernel's cached mode. Before a chown (``chown``: its IDs),
        which the group test must see the old group for: an ID the chown will refuse
        (EOVERFLOW) fails here first, before anything is copied up or stripped."""
        self.require_writable()
        if chown is not None:
            self.ownership.chown_ids(*chown)
        if rel is not None:
            return self.attrs.kill_privs(rel, writer)
        if fh is None:
            assert inode is not None
            return self.files.kill_privs_open(inode, writer)
        return self.files.kill_privs(fh, writer)

    def setattr(self, rel: str, *, mode: int | None = None, ids: tuple[int, int] | None = None,
                times: tuple[int, int] | None = None,
                writer: killpriv.Writer | None = None,
                check: "Callable[[int], None] | None" = None) -> tuple[Attr | None, bool]:
        """``kill_privs`` (``writer`` given; ``ids`` its chown's), ``chmod``, ``chown``,
        ``utimens`` of ``rel`` in that order, from one lookup; the attributes after them
        (None: ask ``getattr``) and whether privileges were stripped (``Attributes.setattr``).
        ``check(the object's immutable/append-only flags)`` first (may refuse)."""
        check_name(rel, last_only=True)
        return self.attrs.setattr(rel, mode=mode, ids=ids, times=times, writer=writer, check=check)

    def utimens(self, rel: str, times: tuple[int, int] | None) -> None:
        self.attrs.utimens(rel, times)

    def getxattr(self, rel: str, name: str) -> bytes:
        return self.attrs.getxattr(rel, name)

    def listxattr(self, rel: str) -> list[str]:
        return self.attrs.listxattr(rel)

    def setxattr(self, rel: str, name: str, value: bytes, flags: int = 0,
                 check: "Callable[[int], None] | None" = None) -> None:
        self.attrs.setxattr(rel, name, value, flags, check)

    def removexattr(self, rel: str, name: str, check: "Callable[[int], None] | None" = None) -> None:
        self.attrs.removexattr(rel, name, check)

    # a creation answers ``then(the new object's node)``, run in the lock hold that made
    # it; if ``then`` fails, the object goes again (``Namespace._named``)
    def mkdir(self, rel: str, mode: int, caller: Caller = ROOT,
              then: "Callable[[Node], T] | None" = None) -> "T | None":
        return self.namespace.mkdir(rel, mode, caller, then)

    def mknod(self, rel: str, mode: int, device: int, caller: Caller = ROOT,
              then: "Callable[[Node], T] | None" = None) -> "T | None":
        return self.namespace.mknod(rel, mode, device, caller, then)

    def symlink(self, target: str, rel: str, caller: Caller = ROOT,
                then: "Callable[[Node], T] | None" = None) -> "T | None":
        return self.namespace.symlink(target, rel, caller, then)

    def link(self, src: str, dst: str, then: "Callable[[Node], T] | None" = None) -> "T | None":
        return self.namespace.link(src, dst, then)

    def unlink(self, rel: str, then: Callable[[Node], None] | None = None) -> Node:
        """Remove ``rel``; return its node as it was just before (its link count).
        ``then(that node)`` runs after the removal under the same namespace lock hold."""
        return self.namespace.unlink(rel, then)

    def rmdir(self, rel: str, then: Callable[[Node], None] | None = None) -> None:
        """Remove the directory ``rel``; ``then(its node)`` as ``unlink``'s."""
        self.namespace.rmdir(rel, then)

    def rename(self, old: str, new: str, flags: int = 0,
               then: Callable[[Node | None], None] | None = None) -> Node | None:
        """Move ``old`` to ``new``; return what was at ``new`` just before. ``then(that)``
        runs after the move under the same namespace lock hold."""
        return self.namespace.rename(old, new, flags, then)
