"""The engine's operations over an ``OverlayFS``: nodeids in, merged paths to the core.

Owns: translating each FUSE operation (``engine.ops.Operations``, addressed by nodeid or
(parent nodeid, name)) into the core's path API through ``nodes.NodeTable``, and the
core's answers into the engine's result types. Policies: the caller's IDs and umask for creations, ``Attr``'s overrides in
every attribute reply, reads into the reply buffer, cached directory listings, one
timeout (``config.timeout``) for entries, attributes and negative entries.

References: every operation that answers an ``Entry`` takes the node's reference before
returning (see ``engine.ops``). A lookup reads the object's identity from disk and
registers it under the namespace lock; if a copy-up or a removed name moved identities
meanwhile (``NodeTable.epoch``), it looks again, so one object never gets two nodeids.

FLUSH is not defined: answered ENOSYS once, the kernel sends it no more (a round trip per
close(2) saved). Nothing needs it: writes reach the layer before their reply (no deferred
errors to report at close), and locks are the kernel's own (no POSIX_LOCKS).

Open, unlinked files: the kernel keeps using the nodeid after UNLINK. A node with no
name left is reached through one of its open handles (``Files.*_inode``); with none
open, ENOENT. OPEN of it (``open("/proc/self/fd/N")``) makes another handle of the same
inode through one of those handles' fd (``Files.open_inode``). So is a file made by TMPFILE (O_TMPFILE), which never had one until a LINK
names it through its fd (``_link_tmpfile``). A directory with no name left (handle 0, ``listings``: no
handle) through what its node kept at the removal (``nameless``). Errors are ``OSError``:
the session translates them.
"""
from __future__ import annotations

import errno
import itertools
import os
import stat
import _struct as struct  # (struct.py only re-exports _struct: ~0.15 ms of a start)
from collections.abc import Iterator

from . import acl, faults, logs, protattr, scopes, shortcreate, shortdirs, sysapi, whiteout
from .attrs import MERGED_DIR_NLINK, UTIME_NOW, UTIME_OMIT, Attr
from .copyup import CopyUpFirst
from .core import OverlayFS
from .engine import protocol as p
from .engine.ops import (AttrReply, ConnInfo, DirItem, Entry, Opened, Operations, Request,
                         fopen_flags)
from .engine.protocol import (DIRENTPLUS_BY_LEN, FileAttr, SetAttr, direntplus_layout,
                              pack_direntplus_entry, pack_direntplus_stat,
                              pack_stat_attr_out)
from .inodes import InodeKey, OverlayInode
from .killpriv import (CAP_FOWNER, CAP_SETFCAP, CAPABILITY_XATTR, Writer, has_capability,
                       has_fsetid, stripped_mode)
from .listings import KEY_BITS, OpenDirs, Snapshot, Snapshots, split_cookie
from .lookup import NAME_MAX, Node, UpperName
from .lookup import Entry as LayerEntry
from .mounting import raise_readahead
from .nameless import GoneDir
from .ownership import Caller
from .nodes import ROOT_ID, NodeTable
from .passthrough_opens import PassthroughOpens
from .pathguard import PathsMoved
from .sysapi import FS_ENCODING, FS_ERRORS
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from .layer import Layer
    from .readdir import DirEntry

    T = TypeVar("T")

log = logs.get("overlaypc.fuse")

#: what overlaypc asks of the kernel at INIT (ACLs added by ``_negotiate_acls``). No
#: WRITEBACK_CACHE (a hard link's other names would read stale data until writeback), no
#: AUTO_INVAL_DATA (every read then asks for attributes, and a newer mtime drops every
#: cached page, a page whose WRITE is in flight too: a read racing that write cached the
#: older bytes, and kept them after the write returned when both writes had one mtime;
#: every change goes through the mount, whose page cache holds it, and what changes under
#: it, the daemon invalidates: test_coherence's c9_write_in_flight),
#: no READDIRPLUS_AUTO (every listing chunk carries attributes), no EXPORT_SUPPORT
#: (nodeids are not stable across a FORGET). HANDLE_KILLPRIV_V2: the daemon strips
#: setuid/setgid/capabilities itself (``killpriv``: the kernel's own fallback ignores the
#: writer's groups, and direct-io writes skip it); SETXATTR_EXT carries the ACL's kill flag.
WANTED = (p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.BIG_WRITES | p.MAX_PAGES | p.PARALLEL_DIROPS
          | p.ASYNC_DIO | p.DO_READDIRPLUS | p.HANDLE_KILLPRIV_V2
          | p.SETXATTR_EXT)


def file_attr(attr: Attr) -> FileAttr:
    """The core's ``Attr`` (a backing stat with the overlay's overrides) as a reply's."""
    st, ino, nlink, blocks, uid, gid, mode = attr  # (per LOOKUP, GETATTR, listed entry)
    return _new_tuple(FileAttr, (ino, st.st_size, st.st_blocks if blocks is None else blocks,
                                 st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
                                 st.st_mode if mode is None else mode,
                                 st.st_nlink if nlink is None else nlink,
                                 st.st_uid if uid is None else uid,
                                 st.st_gid if gid is None else gid,
                                 st.st_rdev, st.st_blksize))


#: makes a named tuple from a tuple of its fields without its Python-level ``__new__``
_new_tuple = tuple.__new__
_S_IFDIR = stat.S_IFDIR
#: ``_take``'s answer when a directory was renamed after the path it read was made
_MOVED: Entry = Entry(0, None, 0.0, 0.0)
_PATH_SETATTRS = (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID | p.FATTR_ATIME | p.FATTR_MTIME
                  | p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW)
#: what a SETATTR can ask for; one asking for none of it is a ``chown(f, -1, -1)``
_REQUESTS = _PATH_SETATTRS | p.FATTR_SIZE | p.FATTR_KILL_SUIDGID | p.FATTR_CTIME
#: the SETATTR fields ``_setattr_short`` answers: no size (a truncate changes data, may
#: copy up, and is the one the kernel sends a handle with: ``fuse_setattr``'s ATTR_FILE
#: comes from ``do_truncate`` alone), no handle, no lock owner
_SHORT_SETATTRS = _PATH_SETATTRS | p.FATTR_KILL_SUIDGID | p.FATTR_CTIME
_FATTR_MODE, _FATTR_UID, _FATTR_GID = p.FATTR_MODE, p.FATTR_UID, p.FATTR_GID
_FATTR_IDS, _FATTR_KILL = p.FATTR_UID | p.FATTR_GID, p.FATTR_KILL_SUIDGID
_FATTR_ATIME, _FATTR_ATIME_NOW = p.FATTR_ATIME, p.FATTR_ATIME_NOW
_FATTR_MTIME, _FATTR_MTIME_NOW = p.FATTR_MTIME, p.FATTR_MTIME_NOW
_FATTR_TIMES = _FATTR_ATIME | _FATTR_ATIME_NOW | _FATTR_MTIME | _FATTR_MTIME_NOW


_FALLOC_FL_KEEP_SIZE = 0x01
#: a ``fuse_direntplus``'s size less its name, plus the 7 its padding may add
_DIRENTPLUS_ROOM = p.DIRENT.size + 7 + p.ENTRY_OUT_SIZE
#: an OPEN ``_open_short`` leaves to ``open`` (``files``' write intent)
_OPEN_WRITE_INTENT = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
#: the names of a listing's positions 0 and 1
_DOT_NAMES = (b".", b"..")
#: the SETATTRs an immutable or append-only node may refuse (``_refuse_setattr``)
_PROTECTED_SETATTRS = (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID | p.FATTR_SIZE
                       | p.FATTR_ATIME | p.FATTR_MTIME)


def _chown_ids(sa: SetAttr) -> tuple[int, int] | None:
    """The (uid, gid) a SETATTR sets, -1 for the one it leaves; None when it sets neither."""
    valid = sa.valid
    if not valid & (p.FATTR_UID | p.FATTR_GID):
        return None
    return (sa.uid if valid & p.FATTR_UID else -1, sa.gid if valid & p.FATTR_GID else -1)


class NoNameLeft(FileNotFoundError):
    """ENOENT for a request by nodeid whose node has no name left (``OverlayOps._path``):
    a removed directory's node answers through what it kept instead (``nameless``)."""


def _caller(req: Request) -> Caller:
    return Caller(req.uid, req.gid, req.pid, req.umask)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _plain_name(name: str) -> bool:
    """Whether a decoded name is one a short path may take as it is: not empty, no ``/``
    (EINVAL), not ``.`` or ``..`` (EINVAL), not an OCI marker's (never shown)."""
    return bool(name) and "/" not in name and name not in (".", "..") \
        and not whiteout.is_oci_name(name)


def _packed_taken(entry: Entry | None, name: bytes, e: DirEntry, off: int,
                  taken: list[int]) -> bytes:
    """A short READDIRPLUS's entry for ``e`` from the reference ``entry`` took (its nodeid
    added to ``taken``), or the name alone (no node: the kernel looks it up) without one."""
    if entry is None or not entry.nodeid:
        return pack_direntplus_entry(0, 0, None, 0.0, 0.0, name, e[2], off, e[1])
    taken.append(entry.nodeid)
    return pack_direntplus_entry(entry.nodeid, entry.generation, entry.attr, entry.entry_timeout,
                                 entry.attr_timeout, name, e[2], off, e[1])


def _load_request_modules() -> None:
    """Import the package's modules only requests use (left out of start-up)."""
    from . import extents, fileattrs, namespace, readdir
    del extents, fileattrs, namespace, readdir  # (loaded: that is all)


def _code_below(mountpoint: str) -> bool:
    """Whether this package's files, or the standard library's, lie below ``mountpoint``
    (a mount over a lower directory that holds the daemon's own code). Imports once
    mounted would read through the mount it serves: the first worker, answering the
    request that needs a module (an IOCTL's ``fileattrs``: Python asks ``isatty`` of every
    file it opens), waits for that import, which waits for a worker: the mount hung. Such
    a mount loads them before mount(2)."""
    top = os.path.realpath(mountpoint).rstrip("/") + "/"
    return any((os.path.realpath(os.path.dirname(os.path.abspath(f))) + "/").startswith(top)
               for f in (__file__, os.__file__))


def _changes(method):
    """An operation that may change a file's data or attributes without a namespace
    change (those move the lookup's epoch): once it has run (failed too, a part may be
    done), before its reply, ``OverlayOps._change`` takes a new value, which voids the
    stats of a listing read before (``_take_later``)."""
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self._changed()
    run.__name__, run.__qualname__ = method.__name__, method.__qualname__
    run.__doc__ = method.__doc__
    return run


class OverlayOps(Operations):
    def __init__(self, fs: OverlayFS) -> None:
        self.fs = fs
        self.timeout = fs.config.timeout
        if _code_below(fs.config.mountpoint):
            _load_request_modules()  # now, before mount(2): see ``served``
        self.nodes = NodeTable(fs.identity(fs.lookup.lookup("")))
        #: listings, served with handle 0 from snapshots (``listings``)
        self._snapshots = Snapshots()
        #: handles of each directory (``listings.OpenDirs``)
        self._open_dirs = OpenDirs()
        #: moved by every change of data or attributes (``_changes``)
        self._change_ids = itertools.count(1)
        self._change = 0
        fs.on_rekey = self._copied_up
        #: the count of directory moves (``pathguard``): paths made before one may be stale
        self._paths = fs.paths
        fs.node_count = lambda: len(self.nodes)
        self.passthrough = PassthroughOpens(fs)
        #: FORGET: the node table's own (``Operations.forget``; a node's kept state goes
        #: with it), and BATCH_FORGET's pairs under one lock hold (``forget_nodes``)
        self.forget = self.nodes.forget
        self.forget_nodes = self.nodes.forget_all
        #: READ: the engine calls the core directly (a read needs only the handle)
        self.read_fh = fs.files.readinto
        #: OPENDIR and RELEASEDIR (handle 0 in every mode): the engine's short path, the
        #: count of open handles alone (``listings.OpenDirs``), as ``opendir``/``releasedir``
        self.opendir_zero = self._open_dirs.open
        self.releasedir_zero = self._open_dirs.release
        #: GETATTR without a handle: the engine's short path for cached directories (not
        #: where IDs are shown mapped: ``Ownership`` then has its say in every stat)
        self.getattr_node = None if fs.ownership.active else self._cached_dir_attr
        #: SETATTR without a size of a named file open here (untar's utimens, chown and
        #: chmod of each file): the engine's short path (``_setattr_short``), not where
        #: ``Files.setattr_open`` never answers (IDs shown mapped) nor on a read-only mount
        self.setattr_node = None if fs.ownership.active or not fs.writable \
            or fs.copyup is None else self._setattr_short
        #: GETXATTR of security.capability (before each write and chown of a file): the
        #: engine's short path through an open handle (``_capability_short``); not with
        #: noxattrs (the name then decides, ``_xattr``)
        self.capability_node = None if fs.config.noxattrs else self._capability_short
        #: RELEASE: the engine calls ``_release`` directly (a release needs no caller)
        self.release_fh = self._release
        #: a LOOKUP and an UNLINK in an upper-only directory: the engine's short paths
        #: (``_lookup_name``, ``_unlink_name``)
        self.lookup_name = self._lookup_name
        self.unlink_name = self._unlink_name if fs.writable and fs.index is None else None
        #: a CREATE in an upper-only directory: the engine's short path (``_create_name``);
        #: not on a read-only mount, nor where IDs are mapped or owners kept in xattrs
        #: (``Ownership.active``: ``Namespace._owner_in`` and ``_owned_after`` have their say)
        self.create_name = None if not fs.writable or fs.copyup is None or fs.ownership.active \
            else self._create_name
        #: a MKDIR and an RMDIR in an upper-only directory: the engine's short paths
        #: (``_mkdir_name``, ``_rmdir_name``); MKDIR's not where ``create_name`` is not set
        #: (the same reasons), RMDIR's not where ``unlink_name`` is not
        self.mkdir_name = None if self.create_name is None else self._mkdir_name
        self.rmdir_name = None if self.unlink_name is None else self._rmdir_name
        #: a negative entry (``lookup``'s), packed
        self._negative_entry = p.pack_entry(0, 0, None, self.timeout, self.timeout)
        #: the marks that make an upper file's lookup more than its stat (``_unlink_name``)
        #: (and ``protattr``: an immutable or append-only file is refused by ``unlink``)
        self._upper_file_marks = (fs.lookup.prefix + "metacopy", fs.lookup.prefix + "redirect",
                                  fs.protection.xattr)
        #: ``fuse_attr_out``'s timeout fields for ``timeout``
        self._attr_valid = p.split_timeout(self.timeout)
        #: ``fuse_entry_out``'s four timeout fields, ``timeout`` for both (a listed entry's)
        self._entry_timeouts = (self._attr_valid[0], self._attr_valid[0], self._attr_valid[1],
                                self._attr_valid[1])
        #: a LOOKUP finding a directory the lookup cache holds answers packed
        #: (``_found_dir``), not where IDs are shown mapped (``Ownership.show_entry``)
        self._found_dirs = not fs.ownership.active
        #: OPEN for reading: the engine's short path (``_open_short``)
        self.open_node = self._open_short
        #: READDIRPLUS: the engine's short path (``_readdirplus_short``), not where IDs are
        #: shown mapped (a listed attribute then carries ``Ownership.show``'s overrides)
        self.readdirplus_node = None if fs.ownership.active else self._readdirplus_short

    def _copied_up(self, old: InodeKey, new: InodeKey, attrs: bool) -> None:
        """A copy-up (``OverlayFS.on_rekey``, under the namespace lock): the node follows
        its new identity. ``attrs``: its attributes change with it, though nothing the
        kernel sent for it did: a directory's (a lower-only one is merged now: ``st_nlink``
        1; a copy-up of a file below, or a chmod, copies its ancestors up), a metacopy
        file's at its data copy-up (an open for writing: its mtime is the copy's, as in
        the kernel, even with no write after). Its cached attributes go (attributes only:
        written by the request's worker before its reply, ``Notifications.inval_inode``)."""
        nodeid = self.nodes.rekey(old, new)
        if attrs and nodeid is not None:
            self.notifier.inval_inode(nodeid, -1)

    # -- lifecycle ---------------------------------------------------------------------------
    def init(self, conn: ConnInfo) -> None:
        conn.wanted = WANTED
        cfg = self.fs.config
        if cfg.noacl or cfg.noxattrs:  # fuse-overlayfs's options: mode bits alone decide
            log.info("POSIX ACLs not enforced (%s)", "noacl" if cfg.noacl else "noxattrs=1")
        else:
            _negotiate_acls(conn)
        _negotiate_io(conn, cfg.cache, cfg.passthrough)

    def initialized(self, conn: ConnInfo) -> None:
        self.passthrough.start(conn.backing)
        raise_readahead(self.fs.config.mountpoint)  # the INIT reply is applied by now

    def served(self) -> None:
        # the package's modules only requests need, left out of start-up (the first reply
        # did not wait for them): imported now, not at the first request of their kind
        # (maybe hours later, when the package's files may be gone or another version's:
        # that import would fail its request with EIO, or mix two versions' code)
        # (a package below its own mount point was loaded before mount(2): ``_code_below``)
        _load_request_modules()
        # not in ``initialized``: the first record imports ``logging`` (~5 ms, ``logs``),
        # which the mount's first reply (the caller's stat that waited for INIT) need not wait for
        log.info("mounted %s", self.fs.config.mountpoint)
        for note in self.fs.format.notes:
            log.info("%s", note)

    def destroy(self) -> None:
        log.info("unmounting %s", self.fs.config.mountpoint)

    def count_error(self) -> None:
        self.fs.stats.add("errors")

    # -- nodes and names ---------------------------------------------------------------------
    def _path(self, nodeid: int) -> str:
        """The node's merged path; ENOENT for a node with no name left."""
        rel = self.nodes.path(nodeid)
        if rel is None:
            raise NoNameLeft(errno.ENOENT, f"node {nodeid} has no name left")
        return rel

    def _gone(self, nodeid: int, error: NoNameLeft) -> GoneDir:
        """What the node of a removed directory kept (``nameless``); ``error`` (the
        node has no name left) re-raised for any other node."""
        gone = self.nodes.gone(nodeid)
        if not isinstance(gone, GoneDir):
            raise error
        return gone

    def _node_path(self, nodeid: int) -> str:
        """``_path`` of the node a request by nodeid acts on."""
        rel = self._path(nodeid)
        if faults.armed:
            faults.hit("ops.path", rel)  # test-only (faults.py)
        return rel

    def _child(self, parent: int, name: bytes) -> tuple[str, str]:
        """(merged path, decoded name) of ``name`` in directory ``parent``."""
        decoded = os.fsdecode(name)
        if "/" in decoded or not decoded:
            raise OSError(errno.EINVAL, "invalid name", decoded)
        return _join(self._path(parent), decoded), decoded

    def _take(self, parent: int, name: str, rel: str, moves: int | None = None,
              found: UpperName | None = None, table_epoch: int = 0) -> Entry | None:
        """Look ``rel`` up and take one reference to its node; None if it does not exist.
        ``moves``: ``PathGuard.moves`` read before ``rel`` was made; if a directory was
        renamed since (or was being renamed then), ``rel`` may be stale: ``_MOVED``,
        nothing taken. ``found``: the first look as ``Lookup.upper_name`` read it, with
        ``table_epoch`` read before it (``_lookup_name``). (What a creation made: ``_made``.)"""
        fs = self.fs
        while True:
            epoch = self.nodes.epoch if found is None else table_epoch
            seen, found = found, None
            try:
                node, attr = fs.lookup_attr(rel, seen)
            except OSError as e:
                # (ENOTDIR: a stale path whose component is no directory now, as a
                # whiteout left at the old place of a moved directory, a file made there)
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
                if moves is None:
                    if e.errno == errno.ENOENT:
                        return None
                    raise
                # a rename of a directory above moves it on disk and in the table under
                # one lock hold: under it, an unchanged count says the path was right when
                # the lookup read the layers
                with fs.ns_lock:
                    if self._paths.moves != moves:
                        return _MOVED
                if e.errno == errno.ENOENT:
                    return None
                raise
            key, is_dir = fs.identity(node), node.is_dir
            prot = fs.protection.known(node)
            # not held while waiting for the lock: a directory's node holds an fd in each
            # layer, and the lock's holder may be a change waiting at the fd limit for
            # those (``fdbudget.patiently``: it would wait in vain, all others behind it)
            del node
            # copy-ups rekey under the namespace lock: registering under it too, a key
            # read before a copy-up is caught by the epoch, one read after it finds the
            # node already rekeyed
            with fs.ns_lock:
                if moves is not None and self._paths.moves != moves:
                    return _MOVED
                if self.nodes.epoch == epoch:
                    nodeid = self.nodes.take(key, parent, name, is_dir, prot=prot)
                    return Entry(nodeid, file_attr(attr), self.timeout,
                                 self._attr_timeout(key))

    def _attr_timeout(self, key: InodeKey) -> float:
        """How long the kernel may cache a node's attributes. A name of
        a lower hard link that copy-up would split off (a writable mount without index)
        changes its link count and inode number when an open for writing copies it up,
        with no request that returns attributes and no invalidation: the kernel must ask
        every time until then. A metacopy file's data copy-up (an open for writing)
        changes its mtime, blocks and ctime too, but invalidates its cached attributes
        before the copy-up's reply (``_copied_up``, since notify49): the mount's timeout
        (it was 0 while that invalidation was queued and could come after the next
        ``stat``: review45c; fix50)."""
        if key.name is not None:
            return 0.0
        return self.timeout

    def _node_attr_timeout(self, nodeid: int) -> float:
        key = self.nodes.node(nodeid).key
        return self._attr_timeout(key) if isinstance(key, InodeKey) else self.timeout

    def _at_paths(self, change):
        """``change()``, which makes its paths from the node table and then one namespace
        change with them, again when they went stale meanwhile (``pathguard``: a rename or
        removal landed before its lock hold; nothing was changed): then with its paths made
        under the namespace lock, where none lands (renames that keep coming would redo it
        for as long as they come). A copy-up the change needs runs there only if its stripe
        lock is free (``CopyUp.refusing``): else all over again without the lock, which
        copies it up."""
        fs, paths = self.fs, self._paths
        locked = False
        while True:
            if not locked:
                moves = paths.moves
                paths.expect(moves)
                try:
                    return change()
                except PathsMoved:
                    pass
                except OSError:
                    # failed before its lock hold (a lookup, a copy-up), with paths that
                    # went stale meanwhile: not the change's own answer
                    if not paths.unchecked() or not self._moved(moves):
                        raise
                finally:
                    paths.expect(None)
                locked = True
                continue
            refusing = fs.copyup.refusing() if fs.copyup is not None else scopes.nullcontext()
            with fs.ns_lock, refusing:  # (reentrant: the change takes it again)
                paths.expect(paths.moves)
                try:
                    return change()
                except CopyUpFirst:
                    locked = False
                finally:
                    paths.expect(None)

    def _moved(self, moves: int) -> bool:
        """Whether a directory moved since ``moves`` was read (``pathguard``), or was being
        moved then: a path made since may have been stale while it was used. Waits out a
        move in progress (it holds the namespace lock), so a caller that starts over does
        not spin."""
        now = self._paths.moves
        if now == moves and not moves & 1:
            return False
        if now & 1:
            with self.fs.ns_lock:
                pass
        return True

    def _read_at(self, nodeid: int, read: "Callable[[str], T]") -> "T":
        """``read(path of the node)``, again if a rename or removal ran meanwhile (a read of
        a stale path answered for nothing, or for what took it: nothing changed); then
        under the namespace lock, where none runs (``pathguard``: renames that keep
        coming would redo it for as long as they come)."""
        moves = self._paths.moves
        try:
            result = read(self._node_path(nodeid))
        except OSError:
            if not self._moved(moves):
                raise
        else:
            if not self._moved(moves):
                return result
        with self.fs.ns_lock:
            return read(self._node_path(nodeid))

    def _at_node(self, nodeid: int, act: "Callable[[str], T]") -> "T":
        """``act(path of the node)`` in a namespace lock hold under which that path is
        current (the count of directory moves is the one read before it was made): no move
        lands between the path and the act. A copy-up ``act`` needs is never waited for
        under that lock (a copy-up takes its own lock, then the namespace lock): the core's
        change decides which one it needs (``Attributes.copy_up_for_setattr``,
        ``Files.copy_up_for_open``...) and asks for it before it changes anything; refused
        in this hold (``CopyUp.refusing``), it comes back as ``CopyUpFirst`` with that
        copy-up, run here without the lock; then all over again. Nothing here decides
        whether one is needed. Once a move landed (before the lock, or during a copy-up,
        whose install it fails), the copy-up runs in the hold where the path is made if its
        stripe lock is free (``refusing()``). A read-only mount moves nothing.

        The copy-up run without the lock hands the hold its install put the copy in place
        under over to the next try (``CopyUp.handing_over``): that try starts in it, with
        no other request's change between the install and ``act`` (each holds the lock),
        and ``act`` may take the copy as its lookup (``CopyUp.handed``, ``offer``ed for
        this hold only). The path is checked as in any hold (a move before the install).
        A copy handed over with the change made (``Seen.mode``: a one-pass chmod,
        ``Attributes.one_pass``) is answered by the refused change's ``answer`` in that hold
        instead of ``act``: once a move landed, ``act`` runs again (the chmod again: the
        same mode)."""
        fs = self.fs
        if not fs.writable:
            return act(self._node_path(nodeid))
        paths = self._paths
        copyup = fs.copyup
        lock = fs.ns_lock
        stale = False
        handed = None  # (with one, this thread holds ``lock`` already: the install's hold)
        done = None  # (the refused change's ``answer`` once its copy-up made it, with ``handed``)
        while True:
            if handed is None:
                moves = paths.moves
                # (after a move landed between the path and the lock: the path made under
                # it, so renames that keep coming cannot redo the request for as long as
                # they come)
                rel = None if stale else self._node_path(nodeid)
                lock.acquire()
            try:
                if rel is None:
                    moves, rel = paths.moves, self._node_path(nodeid)
                elif paths.moves != moves:
                    stale = True
                    continue
                if done is not None:
                    return done(handed)
                copyup.offer(handed)
                try:
                    with copyup.refusing(here=stale):
                        return act(rel)
                except CopyUpFirst as first:
                    if first.copy is None:  # (refused outside the ``ensure_*`` calls: a bug)
                        raise OSError(errno.EDEADLK, "copy-up refused under the namespace "
                                      "lock with nothing to run first", rel) from first
                    copy, answer = first.copy, first.answer
            finally:
                if handed is not None:
                    handed = done = None
                    copyup.offer(None)
                lock.release()
            # (of what ``rel`` names now: if a move lands first, another object's copy-up,
            # which changes no merged content)
            try:
                handed = copyup.handing_over(copy, rel)
            except OSError:
                if not self._moved(moves):
                    raise
                stale = True  # (a rename during the copy-up failed it: where none lands)
            else:
                if answer is not None and handed is not None and handed.mode is not None:
                    done = answer

    def _changed(self) -> None:
        """A change of data or attributes is done (``_changes``): ``_change`` takes a new
        value (unique values: no lost update between threads hides one)."""
        self._change = next(self._change_ids)

    def _open_inode(self, nodeid: int) -> tuple[int, OverlayInode]:
        """An open handle of a node with no name left, and its inode (ENOENT: none)."""
        for fh in self.nodes.handles(nodeid):
            try:
                return fh, self.fs.handles.get(fh).inode
            except (OSError, KeyError):
                continue
        raise OSError(errno.ENOENT, "no name left and not open")

    def _keeps_key(self, node: Node | None) -> bool:
        """``_links_elsewhere`` for the table update of a removal or a rename over a name,
        which runs after the change on disk (in its lock hold): it never raises, or the
        request would answer an error for a change that happened (and the table would not
        follow it). A failed read (the index's count: EMFILE, EIO, ENOENT) keeps no key:
        a node without names then leaves the key index, and a later lookup of another
        name of the object gives it a new nodeid (a second inode for the kernel, no wrong
        object)."""
        try:
            return self._links_elsewhere(node)
        except OSError as e:
            log.debug("other links of %s unknown (%s): its node keeps no key",
                      node.rel if node is not None else "?", e)
            return False

    def _links_elsewhere(self, node: Node | None) -> bool:
        """Whether the non-directory ``node`` (as a removal found it, just before) has
        other names on disk: its node then keeps its identity even when no name of it is
        known. index=on: a lower name of an indexed hard link (its index entry has one
        link of its own) has others while the index counts any (read after the removal,
        which, a whiteout, left the entry's links as they were)."""
        if node is None or not node.exists or node.is_dir:
            return False
        if faults.armed:
            faults.hit("ops.keep_key", node.rel)  # test-only (faults.py)
        if node.st.st_nlink > 1:
            return True
        return node.index is not None and (self.fs.overlay_nlink(node) or 0) > 0

    def lookup(self, req: Request, parent: int, name: bytes) -> Entry:
        entry = self._take_current(parent, name)
        if entry is None:  # a negative entry, cached as long as a positive one
            return Entry(0, None, self.timeout, self.timeout)
        return entry

    def _take_current(self, parent: int, name: bytes) -> Entry | None:
        """``_take`` of ``name`` in ``parent`` with its path made again while a directory
        above was renamed meanwhile (the kernel lets such a rename run: a path made before
        it names nothing, or another object, by the time the layers are read)."""
        moves = self._paths.moves
        rel, decoded = self._child(parent, name)
        if faults.armed:
            faults.hit("ops.lookup", rel)  # test-only (faults.py)
        entry = self._take(parent, decoded, rel, moves=moves)
        if entry is not _MOVED:
            return entry
        # again under the namespace lock, where no move lands (``pathguard``)
        with self.fs.ns_lock:
            rel, decoded = self._child(parent, name)
            return self._take(parent, decoded, rel)

    def _short_named(self, parent: int, name: bytes, moves: int) -> tuple[str, str] | None:
        """The parent's path and the decoded name for a short path in a directory
        (``_lookup_name``, ``_unlink_name``): None where the generic request must decide:
        a move in progress (``pathguard``'s odd count), a name over NAME_MAX or one it
        refuses or never shows (``_plain_name``), a parent without a directory path."""
        if moves & 1 or len(name) > NAME_MAX:
            return None
        prel = self.nodes.dir_path(parent)
        if not prel:
            return None
        decoded = name.decode(FS_ENCODING, FS_ERRORS)  # (``os.fsdecode``'s, no Python frame)
        if not _plain_name(decoded):
            return None
        return prel, decoded

    def _lookup_name(self, parent: int, name: bytes) -> bytes | Entry | None:
        """LOOKUP of a name in an upper-only directory (``Lookup.upper_name``: one
        ``fstatat`` in the directory's upper fd), as ``lookup`` answers it: absent (the
        kernel's LOOKUP before each creation, one per file of an untar), the negative entry
        packed, the absence kept for the creation as ``lookup`` keeps it; found, ``_take``
        of the node made from that stat (``Lookup.found_upper``: not read again). The same
        path (``NodeTable.dir_path``, the directory's path ``_path`` makes), the same
        ``pathguard`` rule (a move since the path was made: again under the namespace
        lock). None, with nothing taken, wherever ``lookup`` might answer otherwise or do
        more: fault points armed, a move in progress, a name ``lookup`` refuses or never
        shows (over NAME_MAX, empty, ``/``, dots, an OCI marker's), a parent not a
        directory with a path (the root: merged), not cached, not upper-only (a layer
        below may hold the name), an error of that ``fstatat``."""
        if faults.armed:
            return None
        paths = self._paths
        moves = paths.moves
        named = self._short_named(parent, name, moves)
        if named is None:
            return None
        prel, decoded = named
        table_epoch = self.nodes.epoch  # (``_take``'s, read before the layers)
        try:
            found = self.fs.lookup.upper_name(prel, decoded)
        except OSError:
            return None
        if found is None:
            return None
        st = found.st
        if st is None:
            return self._negative_entry if paths.moves == moves else None
        if st.st_mode & 0o170000 == _S_IFDIR and self._found_dirs:
            known = self._found_dir(parent, decoded, f"{prel}/{decoded}", moves, found,
                                    table_epoch)
            if known is not None:
                return known
        entry = self._take(parent, decoded, f"{prel}/{decoded}", moves, found, table_epoch)
        if entry is _MOVED:  # (``_take_current``'s second try)
            with self.fs.ns_lock:
                rel, decoded = self._child(parent, name)
                entry = self._take(parent, decoded, rel)
        return self._negative_entry if entry is None else entry

    def _found_dir(self, parent: int, name: str, rel: str, moves: int, found: UpperName,
                   table_epoch: int) -> tuple[int, bytes] | None:
        """``_take`` of a directory ``Lookup.upper_name`` found (``found``), when the lookup
        cache holds it (``Lookup.found_dir``: ``_still_there``'s checks from that stat), as
        ``_take`` answers it, packed: (its nodeid, ``fuse_entry_out``), without the fresh
        ``Node`` and ``Entry``, ``Attr``, ``FileAttr`` and the engine's ``Entry``: the
        kernel's LOOKUP of each directory on the path of a new one (``mkdirat`` of every
        ancestor tar makes, each revalidated with ``LOOKUP_EXCL``: ~0.85 per file of an
        untar). The same key (an upper object's: ``identity``), flags known
        (``Protection.known``, from the held fd), number (``InodeNumbers.dir_ino``, as the
        short GETATTR answers it), link count (its own: one layer), timeouts (a directory's
        key names no link; no metacopy blocks) and the node table's reference under the
        namespace lock with ``_take``'s epoch and ``pathguard`` checks. None, nothing
        taken, wherever ``_take`` might answer otherwise or do more: ``found_dir``'s
        cases, an origin not read yet through the fd, a move or a node-table change since
        the path was made (``_take`` reads afresh then)."""
        fs = self.fs
        node = fs.lookup.found_dir(rel, found)
        if node is None:
            return None
        ino = fs.inos.dir_ino(node)
        if ino is None:
            return None
        st = found.st
        key = InodeKey(st.st_dev, st.st_ino)  # (``identity`` of an upper directory)
        prot = fs.protection.known(node)
        del node  # (``_take``'s: no fd of it held while waiting for the lock)
        with fs.ns_lock:
            if self._paths.moves != moves or self.nodes.epoch != table_epoch:
                return None
            nodeid = self.nodes.take(key, parent, name, True, prot=prot)
        return nodeid, p.pack_stat_entry(nodeid, self._entry_timeouts, st, ino)

    # -- attributes ---------------------------------------------------------------------------
    def _attr(self, nodeid: int, fh: int | None) -> Attr:
        rel = self.nodes.path(nodeid)
        if faults.armed and rel is not None:
            faults.hit("ops.path", rel)  # test-only (faults.py)
        if rel is None and not self.nodes.named_elsewhere(nodeid):
            # its last name is gone: through a handle (``Files.getattr_inode``: an upper
            # file's st_nlink 0, whatever a bind-at-open handle's lower file says); a
            # directory (opened by the kernel itself, no handle here) as it was at its removal
            gone = self.nodes.gone(nodeid)
            if isinstance(gone, GoneDir):
                return self.fs.nameless.attr(gone)
            _, inode = self._open_inode(nodeid)
            return self.fs.files.getattr_inode(inode)
        if fh is not None:
            return self.fs.getattr("", fh)
        if rel is None:  # (no fh: a handle's RELEASE may run meanwhile, see ``getattr_open``)
            _, inode = self._open_inode(nodeid)
            return self.fs.files.getattr_open(inode)
        # what ``rel`` names may be another object, or nothing, by the time it is read: a
        # rename over, or a removal of, the node's own name (or a directory's above) landed
        # in between. Every one counts in ``pathguard`` until the table followed, in its
        # lock hold, and ``getattr`` then reads again under the namespace lock (no check of
        # the object's identity here: tests/test_getattr_renamed_name.py, test_moved_paths.py
        # and test_removal_table.py fail without the count, pass without such a check)
        return self.fs.lookup_attr(rel)[1]

    def getattr(self, req: Request, nodeid: int, fh: int | None = None) -> AttrReply:
        paths = self._paths
        moves = paths.moves  # (``_read_at`` inlined: the hot path of find+stat)
        try:
            attr = self._attr(nodeid, fh)
        except OSError:
            if not self._moved(moves):
                raise
        else:
            if paths.moves == moves and not moves & 1 or not self._moved(moves):
                return AttrReply(file_attr(attr), self._node_attr_timeout(nodeid))
        with self.fs.ns_lock:  # (again where no move lands)
            attr = self._attr(nodeid, fh)
            return AttrReply(file_attr(attr), self._node_attr_timeout(nodeid))

    def _cached_dir_attr(self, nodeid: int) -> bytes | None:
        """GETATTR (no handle) of a directory the lookup cache holds with its parent, as
        ``getattr`` answers it, packed (``fuse_attr_out``): one per file of an untar or an
        ``rm -rf``, the kernel having dropped the parent's attributes at the change. The
        same path (the node table's, ``NodeTable.dir_path``), the same fresh ``fstatat``
        checked against the held fds (``Lookup.fresh_dir``), the same ``pathguard`` rule,
        the same number (``InodeNumbers.dir_ino``), link count (1 for a merged one) and
        timeout (a directory's key never names a link), without the lookup's new node and
        entry, ``Attr``, ``FileAttr`` and ``AttrReply``. None wherever ``getattr`` might
        answer otherwise or do more, so that it answers: a node not a directory or without
        a path, a directory not cached or changed behind the mount's back, an origin not
        read yet, IDs shown mapped (``Ownership``), fault points armed, an error, or a move
        since the path was made (then under the namespace lock). Not set where IDs are
        shown mapped (``__init__``)."""
        paths = self._paths
        moves = paths.moves
        if moves & 1 or faults.armed:
            return None
        rel = self.nodes.dir_path(nodeid)
        if not rel:  # (the root's attributes come from every layer's root: ``getattr``)
            return None
        fs = self.fs
        try:
            found = fs.lookup.fresh_dir(rel)
        except OSError:
            return None
        if found is None:
            return None
        node, st = found
        ino = fs.inos.dir_ino(node)
        if ino is None or paths.moves != moves:
            return None
        return pack_stat_attr_out(self._attr_valid, st, ino,
                                  MERGED_DIR_NLINK if len(node.entries) > 1 else None)

    @_changes
    def setattr(self, req: Request, nodeid: int, sa: SetAttr) -> AttrReply:
        """chmod, chown, truncate, utimens, in that order (libfuse's), then fresh attributes.
        By path in a namespace lock hold where the path is current (``_at_node``). EPERM
        first for what the node's immutable/append-only flags refuse (``_refuse_setattr``)."""
        check = None
        if sa.valid & _PROTECTED_SETATTRS:
            node = self.nodes.node(nodeid)
            if node.prot > 0:
                self._refuse_setattr(node.prot, nodeid, sa)
            elif node.prot < 0:  # (asked of the lookup the change makes: ``_setattr_check``)
                check = self._setattr_check(node, sa)
        try:
            if not sa.valid & _REQUESTS:
                sa = self._chown_unchanged(req, nodeid, sa)
            return self._setattr(req, nodeid, sa, check)
        except NoNameLeft as e:  # (before any step: the name went since it was looked at)
            return self._setattr_gone(nodeid, self._gone(nodeid, e), sa)

    def _setattr_short(self, uid: int, gid: int, pid: int, nodeid: int,
                       fields: tuple) -> bytes | None:
        """``setattr`` of a named, open, upper regular file with one link (untar's utimens,
        chown and chmod of each file, before its close), packed (``fuse_attr_out``), from
        the request's fields (``SETATTR_IN`` unpacked; the caller's IDs and pid): what
        ``_setattr_named`` does through the handle (``Files.setattr_open``), with no
        ``Request``, ``SetAttr``, path, ``Attr``, ``FileAttr`` nor ``AttrReply``. None, nothing
        done, wherever ``setattr`` might answer otherwise or do more: a size, a handle or
        a lock owner in the request, or nothing asked (a ``chown(f, -1, -1)``:
        ``_may_strip``); a node without a name (unlinked: its inode's steps) or without an
        open handle (by name: copy-up, lower files), a key that gives it no attribute
        timeout (a lower hard link's name), fault points armed; and, as
        ``Files.setattr_short`` checks under the handle's lock, a handle released or not on
        its inode's current upper backing, a metacopy file, a file not regular or with
        other links (their counts come from the name or the index)."""
        valid = fields[0]
        if valid & ~_SHORT_SETATTRS or not valid & _REQUESTS or faults.armed:
            return None
        found = self.nodes.named_open(nodeid)
        if found is None:
            return None
        fh, key = found
        if isinstance(key, InodeKey) and key.name is not None:
            return None
        # the request's values as ``SetAttr.decode``, ``_chown_ids`` and ``_time`` read them
        mode = fields[11] if valid & _FATTR_MODE else None
        ids = None
        if valid & _FATTR_IDS:
            ids = (fields[13] if valid & _FATTR_UID else -1, fields[14] if valid & _FATTR_GID else -1)
        writer = None
        if valid & _FATTR_KILL:  # any chown (see ``_kill_privs``)
            writer = Writer(uid, gid, pid, may_be_capable=ids is not None)
        times = None
        if valid & _FATTR_TIMES:
            times = (UTIME_OMIT if not valid & (_FATTR_ATIME | _FATTR_ATIME_NOW) else UTIME_NOW
                     if valid & _FATTR_ATIME_NOW else fields[5] * 1_000_000_000 + fields[8],
                     UTIME_OMIT if not valid & (_FATTR_MTIME | _FATTR_MTIME_NOW) else UTIME_NOW
                     if valid & _FATTR_MTIME_NOW else fields[6] * 1_000_000_000 + fields[9])
        try:
            done = self.fs.files.setattr_short(fh, mode, ids, times, writer)
        except BaseException:
            self._changed()  # (as ``_changes``: a step may be done)
            raise
        if done is None:
            return None
        after, ino, killed = done
        if killed:
            self.notifier.inval_inode(nodeid, -1)
        self._changed()
        return pack_stat_attr_out(self._attr_valid, after, ino, None)

    def _protected(self, nodeid: int) -> int:
        """The node's immutable/append-only flags (``protattr``), read at the first change
        that asks and kept on the node (``nodes.Node.prot``: the kernel overlay keeps them
        on its inode). 0 for a node with no name left (not read: a caveat)."""
        node = self.nodes.node(nodeid)
        flags = node.prot
        if flags >= 0:
            return flags
        rel = self.nodes.path(nodeid)
        if rel is None:
            return 0
        flags = self.fs.protection_at(rel, node.is_dir)
        if flags is not None:
            node.prot = flags
        return flags or 0

    @staticmethod
    def _kept_check(node, refuse: "Callable[[int], None]") -> "Callable[[int], None]":
        """For a node whose flags are not known yet: what a change's own lookup calls with
        them before any copy-up (``Attributes.copy_up_for_setattr``/``copy_up_for_xattr``'s,
        ``Files.open``'s ``check``), keeping them on the node, then ``refuse(flags)`` when
        there are any; so a lower object's cost no second lookup."""
        def check(flags: int) -> None:
            node.prot = flags
            if flags:
                refuse(flags)
        return check

    def _setattr_check(self, node, sa: SetAttr) -> "Callable[[int], None]":
        """``_kept_check`` of a SETATTR (``_refuse_setattr``)."""
        return self._kept_check(node, lambda flags: self._refuse_setattr(flags, node.nodeid, sa))

    def _refuse_setattr(self, flags: int, nodeid: int, sa: SetAttr) -> None:
        """EPERM for a SETATTR the node's flags refuse (``protattr.check_setattr``): a
        mode, owner, size or explicit times, or (immutable) times set to now; through a
        handle (an ftruncate) only a size, and only when append-only. An empty one (a
        chown(f, -1, -1), a writer's privilege removal) goes on, as the kernel's."""
        valid = sa.valid
        if flags:
            explicit = bool(valid & p.FATTR_ATIME and not valid & p.FATTR_ATIME_NOW
                            or valid & p.FATTR_MTIME and not valid & p.FATTR_MTIME_NOW)
            protattr.check_setattr(
                flags, self.nodes.path(nodeid) or "",
                owner_mode_or_times=bool(valid & (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID)) or explicit,
                size=bool(valid & p.FATTR_SIZE),
                touch=bool(valid & (p.FATTR_ATIME | p.FATTR_MTIME)),
                by_fd=sa.fh is not None)

    def _xattr_check(self, nodeid: int) -> "Callable[[int], None] | None":
        """EPERM for a change of the node's xattrs when it is immutable or append-only;
        where its flags are not known yet, what the change's lookup calls with them
        (``Attributes.copy_up_for_xattr``'s ``check``; None: nothing to check)."""
        node = self.nodes.node(nodeid)
        if node.prot == 0:
            return None
        check = self._kept_check(
            node, lambda flags: protattr.check_changed(flags, self.nodes.path(nodeid) or ""))
        if node.prot > 0:
            check(node.prot)
        return check

    def _chown_unchanged(self, req: Request, nodeid: int, sa: SetAttr) -> SetAttr:
        """A SETATTR asking for nothing: what ``fuse_setattr`` leaves of a ``chown(f, -1,
        -1)`` (its ctime, and a non-directory's kill flags, dropped) and of a writer's
        privilege removal (``file_remove_privs``, before a FALLOCATE: the kill flags, which
        it may set whoever owns the file). Done as a chown to -1, -1 (copy-up and ctime, as
        the kernel overlay's) with a regular file's kill where ``_may_strip`` allows it."""
        valid = sa.valid | p.FATTR_UID | p.FATTR_GID
        if self._may_strip(req, nodeid, sa.fh):
            valid |= p.FATTR_KILL_SUIDGID
        return SetAttr(valid, sa.fh, sa.size, sa.atime_ns, sa.mtime_ns, sa.mode, -1, -1)

    def _may_strip(self, req: Request, nodeid: int, fh: int | None = None) -> bool:
        """Whether a chown(f, -1, -1) by ``req``'s caller strips the node (``killpriv``): a
        regular file whose caller owns it, has CAP_FOWNER or may write it (its access ACL,
        else the mode bits) or (``_open_for_writing``) may have been let write; EPERM, before
        anything, where it may not and the strip would change the mode (``setattr_prepare``'s
        check of a chown's kill); else False."""
        attr = self._attr(nodeid, fh)
        mode, uid, gid = attr.st_mode, attr.st_uid, attr.st_gid
        if not stat.S_ISREG(mode):
            return False
        writer = Writer(req.uid, req.gid, req.pid, may_be_capable=True)
        if req.uid == uid or has_capability(req.pid, CAP_FOWNER) \
                or writer.may_write(mode, uid, gid, self._access_acl(nodeid)):
            return True
        if stripped_mode(mode, gid, writer) == mode:
            return False
        if self._open_for_writing(nodeid):  # (a writer's, which must not fail: below)
            return True
        raise PermissionError(errno.EPERM, "operation not permitted")

    def _open_for_writing(self, nodeid: int) -> bool:
        """Whether a handle of the node is open for writing: a writer that opened it while
        it might keeps writing after a chmod takes that away, and its ``file_remove_privs``
        (the empty SETATTR, the REMOVEXATTR before it) is then told from a chown(f, -1, -1)
        by no more than that (the kernel overlay strips, the write goes on)."""
        for fh in self.nodes.handles(nodeid):
            try:
                if self.fs.handles.get(fh).writable:
                    return True
            except OSError:  # (released meanwhile)
                continue
        return False

    def _access_acl(self, nodeid: int) -> bytes | None:
        """The node's access ACL as shown; None without one (or where ACLs are off)."""
        try:
            return self._xattr(nodeid, acl.ACCESS)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                return None
            raise

    def _setattr(self, req: Request, nodeid: int, sa: SetAttr,
                 check: "Callable[[int], None] | None" = None) -> AttrReply:
        """``check``: the flags check the change's lookup makes (``_setattr_check``)."""
        valid = sa.valid
        rel = self.nodes.path(nodeid)
        if rel is None:  # no name left: through one of its handles
            gone = self.nodes.gone(nodeid)
            if isinstance(gone, GoneDir):
                return self._setattr_gone(nodeid, gone, sa)
            return self._setattr_steps(req, nodeid, None, sa, self._open_inode(nodeid)[1])
        if sa.fh is None and not valid & p.FATTR_SIZE:
            return self._setattr_named(req, nodeid, sa, check)
        if sa.fh is not None and not valid & (_PATH_SETATTRS | p.FATTR_KILL_SUIDGID):
            # an ftruncate: no path
            return self._setattr_steps(req, nodeid, rel, sa, None, check)
        return self._at_node(nodeid, lambda rel: self._setattr_steps(req, nodeid, rel, sa, None, check))

    def _setattr_gone(self, nodeid: int, gone: GoneDir, sa: SetAttr) -> AttrReply:
        """``setattr`` of a removed directory the kernel still holds (``nameless``): the
        same steps on its removed upper directory (ESTALE for a lower one)."""
        valid, nameless = sa.valid, self.fs.nameless
        if valid & p.FATTR_SIZE:
            raise OSError(errno.EISDIR, "is a directory")
        if valid & p.FATTR_MODE:
            nameless.chmod(gone, sa.mode)
        ids = _chown_ids(sa)
        if ids is not None:
            nameless.chown(gone, *ids)
        if valid & (p.FATTR_ATIME | p.FATTR_MTIME | p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW):
            nameless.utimens(gone, (_time(valid, p.FATTR_ATIME, p.FATTR_ATIME_NOW, sa.atime_ns),
                                    _time(valid, p.FATTR_MTIME, p.FATTR_MTIME_NOW, sa.mtime_ns)))
        return AttrReply(file_attr(nameless.attr(gone)), self._node_attr_timeout(nodeid))

    def _setattr_steps(self, req: Request, nodeid: int, rel: str | None, sa: SetAttr,
                       inode: OverlayInode | None,
                       check: "Callable[[int], None] | None" = None) -> AttrReply:
        """``setattr``'s steps, by ``rel`` or (no name left) on ``inode``. By ``rel``, the
        copy-up all of them need comes first (``Attributes.copy_up_for_setattr``): the
        steps then find the object in the upper (a step's own copy-up would come between
        the steps before it and the rest, done again when the request starts over)."""
        fs, valid = self.fs, sa.valid
        seen = None
        if rel is not None and inode is None:
            data = sa.fh is None and bool(valid & p.FATTR_SIZE)  # a truncate by path
            # (the copy its copy-up handed over to this hold: the lookup of the steps, a
            # truncate's and the reply's; ``_at_node``)
            seen = fs.copyup.handed(rel) if fs.copyup is not None else None
            copy = fs.attrs.copy_up_for_setattr(
                rel, changes=bool(valid & _PATH_SETATTRS) or data,
                kill=bool(valid & p.FATTR_KILL_SUIDGID), ids=_chown_ids(sa), data=data,
                seen=seen, check=check)
            if copy is not None:  # (in ``_at_node``: ``CopyUpFirst``, nothing done)
                seen = None
                copy()
        if valid & p.FATTR_KILL_SUIDGID:  # truncate without CAP_FSETID, or any chown
            # no name, no fh: one of the inode's handles, held against its RELEASE
            self._kill_privs(req, nodeid, rel, sa.fh, _chown_ids(sa), inode)
        if valid & p.FATTR_MODE:
            if inode is None:
                fs.chmod(rel, sa.mode)
            else:
                fs.files.chmod_inode(inode, sa.mode)
        ids = _chown_ids(sa)
        if ids is not None:
            uid, gid = ids
            if inode is None:
                fs.chown(rel, uid, gid)
            else:
                fs.files.chown_inode(inode, uid, gid)
        if valid & p.FATTR_SIZE:
            if sa.fh is not None:
                fs.truncate(rel or "", sa.size, sa.fh)
            elif inode is None:
                fs.truncate(rel, sa.size, seen=seen)
            else:
                fs.files.truncate_inode(inode, sa.size)
        if valid & (p.FATTR_ATIME | p.FATTR_MTIME | p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW):
            times = (_time(valid, p.FATTR_ATIME, p.FATTR_ATIME_NOW, sa.atime_ns),
                     _time(valid, p.FATTR_MTIME, p.FATTR_MTIME_NOW, sa.mtime_ns))
            if inode is None:
                fs.utimens(rel, times)
            else:
                fs.files.utimens_inode(inode, times)
        attr = None
        if seen is not None and sa.fh is None:
            attr = fs.attrs.refreshed(seen, rel)
        if attr is None:
            attr = self._attr(nodeid, sa.fh)
        return AttrReply(file_attr(attr), self._node_attr_timeout(nodeid))

    def _setattr_named(self, req: Request, nodeid: int, sa: SetAttr,
                       check: "Callable[[int], None] | None" = None) -> AttrReply:
        """``setattr`` of a named node without a size nor a handle (untar's utimens, chown
        and chmod of every file): the same steps in the same order, from one lookup."""
        valid = sa.valid
        ids = _chown_ids(sa)
        writer = None
        if valid & p.FATTR_KILL_SUIDGID:  # any chown (see ``_kill_privs``)
            writer = Writer(req.uid, req.gid, req.pid, may_be_capable=ids is not None)
        times = None
        if valid & (p.FATTR_ATIME | p.FATTR_MTIME | p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW):
            times = (_time(valid, p.FATTR_ATIME, p.FATTR_ATIME_NOW, sa.atime_ns),
                     _time(valid, p.FATTR_MTIME, p.FATTR_MTIME_NOW, sa.mtime_ns))
        mode = sa.mode if valid & p.FATTR_MODE else None
        done = None
        fhs = self.nodes.handles(nodeid)
        if fhs:  # an open file: through its handle, no lookup (``Files.setattr_open``)
            if check is not None:
                check(self._protected(nodeid))
                check = None
            try:
                done = self.fs.files.setattr_open(fhs[0], mode=mode, ids=ids, times=times,
                                                  writer=writer)
            except OSError as e:
                if e.errno != errno.EBADF:  # (released meanwhile: by name)
                    raise
        if done is None:
            def by_path(rel: str) -> tuple[Attr, bool]:
                attr, killed = self.fs.setattr(rel, mode=mode, ids=ids, times=times,
                                               writer=writer, check=check)
                return (self._attr(nodeid, None) if attr is None else attr), killed
            done = self._at_node(nodeid, by_path)
        attr, killed = done
        if killed:
            self.notifier.inval_inode(nodeid, -1)
        return AttrReply(file_attr(attr), self._node_attr_timeout(nodeid))

    def readlink(self, req: Request, nodeid: int) -> bytes:
        return os.fsencode(self._read_at(nodeid, self.fs.readlink))

    def statfs(self, req: Request, nodeid: int) -> dict:
        return self.fs.statfs()

    def access(self, req: Request, nodeid: int, mask: int) -> None:
        self._read_at(nodeid, lambda rel: self.fs.access(rel, mask))

    def _nameless(self, nodeid: int, error: NoNameLeft, on_dir: "Callable[[GoneDir], T]",
                  on_file: "Callable[[OverlayInode], T]") -> "T":
        """A request by nodeid for a node with no name left: a removed directory through
        what its node kept (``nameless``), an open file through one of its handles
        (``files``, as its SETATTR); ``error`` re-raised for any other node."""
        gone = self.nodes.gone(nodeid)
        if isinstance(gone, GoneDir):
            return on_dir(gone)
        try:
            _, inode = self._open_inode(nodeid)
        except OSError:
            raise error from None
        return on_file(inode)

    def getxattr(self, req: Request, nodeid: int, name: str) -> bytes:
        if name == CAPABILITY_XATTR and not self.fs.config.noxattrs:
            # asked before each write and chown of an open file (untar: twice per file):
            # its open handle answers for its inode, named or not, so before any path is
            # made (a path, and the rename check around its use, would serve nothing)
            value = self._capability_open(nodeid)
            if value is not None:
                return value
        return self._xattr(nodeid, name)

    def _xattr(self, nodeid: int, name: str) -> bytes:
        """xattr ``name`` of the node, by name, else (no name left) as ``_nameless`` finds it."""
        try:
            return self._read_at(nodeid, lambda rel: self.fs.getxattr(rel, name))
        except NoNameLeft as e:
            return self._nameless(nodeid, e, lambda gone: self.fs.nameless.getxattr(gone, name),
                                  lambda inode: self.fs.files.getxattr_inode(inode, name))

    def _capability_open(self, nodeid: int) -> bytes | None:
        """``security.capability`` of an open node through one of its handles (ENODATA
        when absent: ``Files.capability``); None when none of them can answer (no handle,
        or each on a backing that is not the inode's upper file): the name decides."""
        for fh in self.nodes.handles(nodeid):
            try:
                value = self.fs.files.capability(fh)
            except OSError as e:
                if e.errno == errno.EBADF:  # released meanwhile
                    continue
                raise
            if value is not None:
                return value
        return None

    def _capability_short(self, nodeid: int) -> bytes | int | None:
        """``getxattr`` of ``security.capability`` as ``_capability_open`` answers it through
        the node's first handle: the value, or ENODATA (an int) when absent; None where
        that handle cannot answer (``Files.capability_short``: not on the inode's upper
        backing, released meanwhile) or another error came (``getxattr`` then tries the
        others and answers any error itself)."""
        fh = self.nodes.first_handle(nodeid)
        return None if fh is None else self.fs.files.capability_short(fh)

    def listxattr(self, req: Request, nodeid: int) -> list[str]:
        try:
            return self._read_at(nodeid, self.fs.listxattr)
        except NoNameLeft as e:
            return self._nameless(nodeid, e, self.fs.nameless.listxattr,
                                  self.fs.files.listxattr_inode)

    @_changes
    def setxattr(self, req: Request, nodeid: int, name: str, value: bytes, flags: int,
                 setxattr_flags: int = 0) -> None:
        check = self._xattr_check(nodeid)

        def act(rel: str) -> None:
            self.fs.setxattr(rel, name, value, flags, check)
            if setxattr_flags & p.SETXATTR_ACL_KILL_SGID:
                self.fs.attrs.kill_sgid(rel)
        try:
            self._at_node(nodeid, act)
        except NoNameLeft as e:
            kill = bool(setxattr_flags & p.SETXATTR_ACL_KILL_SGID)
            self._nameless(nodeid, e, lambda gone: self.fs.nameless.setxattr(
                gone, name, value, flags, kill_sgid=kill), lambda inode: self.fs.files.setxattr_inode(
                inode, name, value, flags, kill_sgid=kill))

    @_changes
    def removexattr(self, req: Request, nodeid: int, name: str) -> None:
        if name == CAPABILITY_XATTR and not has_capability(req.pid, CAP_SETFCAP):
            # the kernel's own kill (``setattr_prepare``'s ``security_inode_killpriv``: a
            # removexattr(2) of it needs CAP_SETFCAP), sent ahead of a chown(f, -1, -1)'s
            # empty SETATTR: refused where that SETATTR will be (``_may_strip``), before
            # anything, as the kernel overlay's chown refuses it
            self._may_strip(req, nodeid)
        check = self._xattr_check(nodeid)
        try:
            self._at_node(nodeid, lambda rel: self.fs.removexattr(rel, name, check))
        except NoNameLeft as e:
            self._nameless(nodeid, e, lambda gone: self.fs.nameless.removexattr(gone, name),
                           lambda inode: self.fs.files.removexattr_inode(inode, name))

    # -- file attribute flags (chattr, lsattr) ---------------------------------------------------
    def ioctl(self, req: Request, nodeid: int, fh: int, flags: int, cmd: int, arg: int,
              data: bytes, out_size: int) -> bytes:
        """FS_IOC_GETFLAGS/SETFLAGS and FS_IOC_FSGETXATTR/FSSETXATTR (``fileattrs``), by
        the node's name; any other ioctl answers ENOTTY, as before. A set only as the
        kernel's fileattr operation sends it (``fuse_priv_ioctl``: ``arg`` 0, the flags as
        4 bytes), after its VFS checked the caller (owner, CAP_LINUX_IMMUTABLE): a kernel
        without them (before 5.13) hands a caller's own ioctl over unchecked, with its
        buffer's address and FS_IOC_SETFLAGS's 8 bytes."""
        attrs = self.fs.fileattrs
        if cmd == sysapi.FS_IOC_GETFLAGS and out_size >= 4:
            flags = self._fileattr_read(nodeid, attrs.get_flags, attrs.get_flags_fd)
            return struct.pack("<I", flags & 0xFFFFFFFF)[:out_size]
        if cmd == sysapi.FS_IOC_FSGETXATTR and out_size >= sysapi.FSXATTR.size:
            return self._fileattr_read(nodeid, attrs.get_fsxattr, attrs.get_fsxattr_fd)
        if arg:
            raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} from a caller, not the kernel's")
        if cmd == sysapi.FS_IOC_SETFLAGS and len(data) == 4:
            value = struct.unpack_from("<I", data)[0]
            return self._set_fileattr(nodeid, lambda rel: attrs.set_flags(rel, value),
                                      attrs.set_flags_fd(value), value & protattr.PROTECTED)
        if cmd == sysapi.FS_IOC_FSSETXATTR and len(data) == sysapi.FSXATTR.size:
            raw = data[:sysapi.FSXATTR.size]
            return self._set_fileattr(nodeid, lambda rel: attrs.set_fsxattr(rel, raw),
                                      attrs.set_fsxattr_fd(raw),
                                      protattr.from_xflags(sysapi.FSXATTR.unpack(raw)[0]))
        raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} not supported")

    def _fileattr_read(self, nodeid: int, named: "Callable[[str], T]",
                       on_fd: "Callable[[int, Layer], T]") -> "T":
        """A get by the node's name; with no name left, ``on_fd`` of the real object the
        mount keeps for it (``_nameless``), as the kernel overlay answers from its file."""
        try:
            return self._read_at(nodeid, named)
        except NoNameLeft as e:
            return self._nameless(nodeid, e, lambda gone: self.fs.nameless.read_real(gone, on_fd),
                                  lambda inode: self.fs.files.read_real_inode(inode, on_fd))

    @_changes
    def _set_fileattr(self, nodeid: int, act: "Callable[[str], int]",
                      on_fd: "Callable[[int, Layer], None]", prot: int) -> bytes:
        """A set (``act(path)``, returning the enforced flags then; with no name left,
        ``on_fd`` on the real upper object, setting ``prot``), kept on the node
        (``_protected``); the kernel drops its cached attributes (ctime moved). Unknown
        meanwhile: a set failing after it wrote ``protattr`` (the upper refused the other
        flags) keeps the flags written, as the kernel's inode keeps those it was given (by
        name the next change reads them; with no name left they are read back here through
        the real object: ``_protected`` has no path to read them by)."""
        node = self.nodes.node(nodeid)
        node.prot = -1
        try:
            prot = self._at_node(nodeid, act)
        except NoNameLeft as e:
            try:
                self._nameless(nodeid, e, lambda gone: self.fs.nameless.change_real(gone, on_fd),
                               lambda inode: self.fs.files.change_real_inode(inode, on_fd))
            except BaseException:
                node.prot = self._nameless_protected(nodeid, e)
                raise
        node.prot = prot
        self.notifier.inval_inode(nodeid, -1)
        return b""

    def _nameless_protected(self, nodeid: int, error: NoNameLeft) -> int:
        """The immutable/append-only flags of a node with no name left as its real object
        holds them now (an upper one's ``protattr``, a lower one's own), -1 where they
        cannot be read."""
        attrs = self.fs.fileattrs
        try:
            flags = self._nameless(nodeid, error,
                                   lambda gone: self.fs.nameless.read_real(gone, attrs.get_flags_fd),
                                   lambda inode: self.fs.files.read_real_inode(inode, attrs.get_flags_fd))
        except OSError:
            return -1
        return flags & protattr.PROTECTED

    # -- namespace ------------------------------------------------------------------------------
    def mknod(self, req: Request, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        return self._new(parent, name, lambda rel, then: self.fs.mknod(rel, mode, rdev, _caller(req),
                                                                      then))

    def mkdir(self, req: Request, parent: int, name: bytes, mode: int) -> Entry:
        return self._new(parent, name, lambda rel, then: self.fs.mkdir(rel, mode, _caller(req), then))

    def symlink(self, req: Request, parent: int, name: bytes, target: bytes) -> Entry:
        return self._new(parent, name, lambda rel, then: self.fs.symlink(
            os.fsdecode(target), rel, _caller(req), then))

    def link(self, req: Request, nodeid: int, new_parent: int, new_name: bytes) -> Entry:
        if self.nodes.path(nodeid) is None:
            inode = self._linkable_inode(nodeid)
            if inode is not None:
                return self._link_tmpfile(inode, nodeid, new_parent, new_name)
        return self._new(new_parent, new_name,
                         lambda rel, then: self.fs.link(self._path(nodeid), rel, then))

    def _linkable_inode(self, nodeid: int) -> OverlayInode | None:
        """The inode of a node with no name that LINK names through its fd, through its
        open handles: one made by TMPFILE (``Files.tmpfile``), or one whose data is in the
        upper (no metacopy) that may have names the table never held (soak15: a file
        opened by one name of two, that name unlinked; the kernel still sees a link and
        asks), an index entry too (index=on: a lower hard link whose unlinked name was
        copied up into the index, its other lower names left; the kernel overlay links
        its index inode, ``Namespace.link_open`` moves the shared count), and a metacopy
        file whose upper file has a name left, linked as it is where it has an absolute
        redirect, as the kernel overlay's, else its data copied in first
        (``Files.copy_data_to_link``). None for any
        other node (ENOENT then: a lower file, a lower layer's metacopy file too, whose
        copy-up needs a name, as the kernel's), or one with none open."""
        for fh in self.nodes.handles(nodeid):
            try:
                inode = self.fs.handles.get(fh).inode
            except OSError:
                continue  # released meanwhile
            if inode.tmpfile or self.fs.writable and inode.in_upper:
                return inode
            if self.fs.writable and inode.upper_meta \
                    and self.fs.files.copy_data_to_link(inode):
                return inode
            return None
        return None

    def _link_tmpfile(self, inode: OverlayInode, nodeid: int, new_parent: int,
                      new_name: bytes) -> Entry:
        """LINK of a node with no name (``_linkable_inode``; ``linkat`` of its fd, by
        ``AT_EMPTY_PATH`` or ``/proc/self/fd``): its upper file linked through an fd of it
        (``Namespace.link_open``); the new name's entry is the node's own (its key).
        The kernel refuses to link an ``O_EXCL`` one itself (ENOENT), and so does the
        upper filesystem, as one whose last link is gone."""
        fd = self.fs.files.link_fd(inode)  # (keeps the file: a RELEASE meanwhile frees nothing)
        try:
            return self._new(new_parent, new_name,
                             lambda rel, then: self.fs.link_open(fd, rel, then), linked=nodeid)
        finally:
            os.close(fd)

    def _new(self, parent: int, name: bytes,
             make: "Callable[[str, Callable[[Node], Entry]], Entry]",
             linked: int | None = None) -> Entry:
        """MKNOD, MKDIR, SYMLINK, LINK: ``make(path, then)`` makes ``name`` in ``parent``
        and answers ``then(the new object's node)``, the reply's entry, made in the lock
        hold that made the object (``_made``; if it fails, the object goes again).
        ``linked``: the node with no name a LINK names (``NodeTable.take``)."""
        def change() -> Entry:
            rel, decoded = self._child(parent, name)
            return make(rel, lambda node: self._made(parent, decoded, rel, node, linked))
        entry = self._at_paths(change)
        if faults.armed:
            faults.hit("ops.created", os.fsdecode(name))  # test-only (faults.py)
        return entry

    def _made(self, parent: int, name: str, rel: str, node: Node,
              linked: int | None = None) -> Entry:
        """The entry of what a creation just made as ``name`` in ``parent`` (``node``, at
        ``rel``), with one reference taken: in the namespace lock hold that made it, where
        no copy-up rekeys and no rename or removal lands (no table epoch nor count of moves
        to check). Built from the node the creation holds (its stat read after every
        change; MKDIR, MKNOD, SYMLINK and CREATE look nothing up). Every call that
        can fail comes before the reference: a failure here undoes the creation
        (``Namespace._named``), which then must leave nothing in the table. A rename of
        the new name after the hold is the table's to follow, as any rename."""
        if faults.armed:
            faults.hit("ops.made", rel)  # test-only (faults.py)
        shown = self.fs.attrs.of_node(node, rel)
        attr = file_attr(shown)
        key = self.fs.identity(node)
        timeout = self._attr_timeout(key)
        # (no flags: a new object, or a hard link of one whose flags allowed the link)
        nodeid = self.nodes.take(key, parent, name, node.is_dir, linked, prot=0)
        return Entry(nodeid, attr, self.timeout, timeout)

    def unlink(self, req: Request, parent: int, name: bytes) -> None:
        self._removal(parent, name, self.fs.unlink)

    def rmdir(self, req: Request, parent: int, name: bytes) -> None:
        self._removal(parent, name, self.fs.rmdir)

    def _unlink_name(self, parent: int, name: bytes) -> bool:
        """UNLINK of a non-directory in an upper-only directory (one per file of an ``rm
        -rf``), as ``unlink`` does it: in one namespace lock hold, the lookup of the name
        (``Lookup.upper_dir``: only the upper holds it; its ``fstatat`` and, for a regular
        file, its xattr names: a metacopy or redirect mark makes it more than its upper
        file), the ``unlinkat`` in that directory's held fd (``Layer.unlink_at``, what
        ``Namespace._remove`` does with no lower name to hide), counted in ``pathguard``
        until the node table dropped the name (``keep_key`` for a file with other links),
        an open file's inode told (``OverlayFS.unlinked``), and the lookup's epoch moved
        at the end. False, with nothing changed and the lock released, wherever
        ``unlink`` might do otherwise or more: fault points armed, a read-only mount or
        index=on (not set then), a move in progress or since the path was made, a name
        ``unlink`` refuses (over NAME_MAX, empty, ``/``, dots, an OCI marker's), a parent
        not a directory with a path, not cached, not upper-only (a lower may hold the name:
        a whiteout, a copy-up of the parent), the name absent, a directory, a whiteout, a
        file with those marks or whose xattrs cannot be listed, an error before the
        change. The change's own error (``unlinkat``'s) is the answer."""
        fs = self.fs
        if faults.armed or fs.index is not None or fs.copyup is None:
            return False
        paths = self._paths
        moves = paths.moves
        named = self._short_named(parent, name, moves)
        if named is None:
            return False
        prel, decoded = named
        lookup = fs.lookup
        with fs.ns_lock:
            if paths.moves != moves:
                return False
            pnode = lookup.upper_dir(prel)
            if pnode is None or fs.protection.of_node(pnode):
                return False  # (a flagged parent: ``unlink``'s EPERM)
            top = pnode.entries[0]
            layer, dirfd = top.layer, top.dirfd
            rel = f"{prel}/{decoded}"
            try:
                st = layer.stat_at(dirfd, decoded)
                if st is None:
                    return False
                mode = st.st_mode
                if stat.S_ISDIR(mode) or whiteout.is_whiteout(st):
                    return False
                if stat.S_ISREG(mode):
                    names = layer.xattr_names_at(dirfd, decoded)
                    if names is None or not names.isdisjoint(self._upper_file_marks):
                        return False
                elif fs.protection.of_entry(LayerEntry(layer, rel, st)):
                    return False  # (another kind's flags, read as ``unlink`` reads them)
            except OSError:
                return False
            # (``identity`` of an upper object; a named tuple without its ``__new__``)
            key = _new_tuple(InodeKey, (st.st_dev, st.st_ino, None))
            try:
                with paths.moving():
                    layer.unlink_at(dirfd, decoded, rel)
                    if fs.inodes.get(key) is not None:  # (open: ``unlinked`` has its say)
                        fs.unlinked(Node(rel, (LayerEntry(layer, rel, st),)), key)
                    self.nodes.unlink(parent, decoded, keep_key=st.st_nlink > 1)
            finally:
                lookup.changed()
        return True

    def _mkdir_name(self, uid: int, gid: int, parent: int, name: bytes, mode: int,
                    umask: int) -> "tuple[int, bytes] | None":
        """MKDIR in an upper-only directory (one per new directory of an untar), as ``mkdir``
        does it, from the request's fields (the caller's IDs, ``MKDIR_IN``'s): (the new
        nodeid, the packed ``fuse_entry_out``), with no ``Request``, ``Caller``, closures,
        path checks of ``_at_paths``, ``Attr``, ``FileAttr`` nor ``Entry``. In one namespace
        lock hold with the ``pathguard`` count compared there (``Namespace._changing``'s
        check): the parent as ``Lookup.upper_dir`` holds it, the directory made and cached
        (``shortdirs.made_dir_in``: the generic steps where they make it in place), its node
        taken (``_made``'s reference, ``prot`` 0) with ``Attrs.of_node``'s answer for one
        upper directory (its own link count, ``ino_of``'s number, no overrides: not set
        where ``Ownership`` is active), the lookup's epoch moved at the end. None, with
        nothing done, wherever ``mkdir`` might answer otherwise or do more: fault points
        armed, a move in progress or since the path was made, a name ``mkdir`` refuses
        (over NAME_MAX, empty, ``/``, dots, an OCI marker's), a parent not a directory with a
        path, not cached or not upper-only, special mode bits, a caller with other IDs than
        the daemon's (``_owned_after``: built in ``workdir/work``), and ``made_dir_in``'s: a
        flagged, default-ACL or setgid parent, no kept absence, the name taken behind the
        mount's back. A failure once the directory is made removes it and is the answer."""
        if faults.armed:
            return None
        mode = stat.S_IMODE(mode) & ~(umask & 0o777)  # (``acl.inherit``'s)
        fs = self.fs
        paths = self._paths
        moves = paths.moves
        named = self._short_named(parent, name, moves)
        if named is None or mode & 0o7000 or (uid, gid) != fs.namespace._own_ids:
            return None
        prel, decoded = named
        rel = f"{prel}/{decoded}"
        lookup = fs.lookup
        with fs.ns_lock:
            if paths.moves != moves:
                return None
            pnode = lookup.upper_dir(prel)
            if pnode is None:
                return None
            try:
                made = shortdirs.made_dir_in(fs, pnode, decoded, rel, mode)
            except BaseException:
                lookup.changed()
                raise
            if made is None:
                return None
            try:
                node = made[0]
                st = node.entries[0].st
                ino = fs.inos.ino_of(node)
                key = InodeKey(st.st_dev, st.st_ino)  # (``identity`` of an upper directory)
                # (``_made``'s: no flags, a new object)
                nodeid = self.nodes.take(key, parent, decoded, True, prot=0)
            except BaseException:
                shortdirs.unmade_dir(fs, rel, made)
                raise
            finally:
                lookup.changed()
        return nodeid, p.pack_stat_entry(nodeid, self._entry_timeouts, st, ino)

    def _rmdir_name(self, parent: int, name: bytes) -> bool:
        """RMDIR of a directory in an upper-only directory (one per directory of an ``rm
        -rf``), as ``rmdir`` does it: in one namespace lock hold with the ``pathguard``
        count compared there, the parent as ``Lookup.upper_dir`` holds it, its flags
        (``_parent_in_upper``'s ``check_dir_remove``), the directory removed
        (``shortdirs.removed_dir_in``: cached as ``upper_dir`` too, found again with one
        ``fstatat``, its flags, the ``rmdir`` in the parent's held fd, the merged listing
        where that finds it not empty) and the node table's name dropped with what its node
        keeps (``_gone_dir``; a directory's key is never kept: ``_keeps_key``). False, with
        nothing changed and the lock released, wherever ``rmdir`` might do otherwise or
        more: fault points armed, a read-only mount or index=on (not set then), a move in
        progress or since the path was made, a name ``rmdir`` refuses, a parent not a
        directory with a path, not cached, not upper-only, flagged, and ``removed_dir_in``'s
        cases. The removal's own error is the answer."""
        fs = self.fs
        if faults.armed or fs.copyup is None:
            return False
        paths = self._paths
        moves = paths.moves
        named = self._short_named(parent, name, moves)
        if named is None:
            return False
        prel, decoded = named
        nodes, gone_dir = self.nodes, self._gone_dir
        with fs.ns_lock:
            if paths.moves != moves:
                return False
            pnode = fs.lookup.upper_dir(prel)
            if pnode is None:
                return False
            try:
                if fs.protection.of_node(pnode):
                    return False  # (a flagged parent: ``rmdir``'s EPERM)
            except OSError:
                return False
            return shortdirs.removed_dir_in(
                fs, pnode, decoded, f"{prel}/{decoded}",
                lambda node: nodes.unlink(parent, decoded, keep_key=False, gone=gone_dir(node)))

    def _removal(self, parent: int, name: bytes,
                 remove: "Callable[[str, Callable[[Node], None]], object]") -> None:
        """UNLINK or RMDIR (``remove``: ``fs.unlink`` or ``fs.rmdir``). The table drops the
        name under the namespace lock hold that removed it (as a rename's): a request by
        nodeid made in between would use a name that names nothing, or what took it."""
        def change() -> None:
            rel, decoded = self._child(parent, name)
            remove(rel, lambda removed: self.nodes.unlink(
                parent, decoded, keep_key=self._keeps_key(removed),
                gone=self._gone_dir(removed)))
        self._at_paths(change)
        if faults.armed:
            faults.hit("ops.removed", os.fsdecode(name))  # test-only (faults.py)

    def rename(self, req: Request, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        def change() -> None:
            old, decoded = self._child(parent, name)
            new, new_decoded = self._child(new_parent, new_name)
            # the table follows under the namespace lock hold that moved the object (see
            # lookup)
            self.fs.rename(old, new, flags, lambda replaced: self.nodes.rename(
                parent, decoded, new_parent, new_decoded,
                keep_key=self._keeps_key(replaced), gone=self._gone_dir(replaced)))
        self._at_paths(change)

    def _gone_dir(self, node: Node | None) -> GoneDir | None:
        """What the node of a directory a removal (or a rename over it) just took away
        keeps while the kernel holds it (the kernel opens directories itself, so no handle
        here keeps it; ``nameless``): its attributes as the removal found them, with no
        links, as a plain directory's and the kernel overlay's (hunt8d), and the fd of its
        top directory, through which its changes go (an upper one's) and its xattrs are
        read. A directory with a lower part keeps its link count: the kernel overlay's
        answer comes from the lower directory (still there under the whiteout), or is a
        merged directory's."""
        if node is None or not node.exists or not node.is_dir:
            return None
        try:
            attr = self.fs.attrs.of_node(node, node.rel)
        except OSError:
            return None
        upper_only = len(node.entries) == 1 and node.upper is not None
        return self.fs.nameless.keep(node, attr._replace(nlink=0) if upper_only else attr)

    # -- files ------------------------------------------------------------------------------------
    def open(self, req: Request, nodeid: int, flags: int, open_flags: int = 0) -> Opened:
        era = self.passthrough.era
        check = None
        if flags & (os.O_ACCMODE | os.O_TRUNC):  # (a read-only open asks nothing)
            node = self.nodes.node(nodeid)
            if node.prot > 0:
                protattr.check_open(node.prot, flags, self.nodes.path(nodeid) or "")
            elif node.prot < 0:  # (from the lookup the open makes: as ``_setattr_check``)
                check = self._open_check(node, flags)
        # admitted once, before anything is done: ``_at_node`` runs the open again after
        # a copy-up it ran first, and an O_TRUNC open's copy-up holds no data, so a refusal
        # then would lose the lower data for an open that failed
        self.fs.room_for_open(None)
        try:
            try:
                result = self._at_node(nodeid, lambda rel: self.fs.open(rel, flags, admitted=True,
                                                                        check=check))
            except NoNameLeft:  # (raised before anything was done)
                result = self._open_nameless(nodeid, flags)
            if open_flags & p.OPEN_KILL_SUIDGID:  # O_TRUNC without CAP_FSETID
                try:
                    self._kill_privs(req, nodeid, None, result.fh)
                except BaseException:
                    self.fs.release(result.fh)
                    raise
        finally:
            # a change of size, and of mode, without a namespace change (``_changes``):
            # counted once both are done, so a listing read in between is voided as well
            if flags & os.O_TRUNC:
                self._changed()
        self.nodes.opened(nodeid, result.fh)
        return self._opened(nodeid, result, era, req, flags)

    def _open_short(self, nodeid: int, flags: int, open_flags: int) -> Opened | None:
        """OPEN for reading (no O_WRONLY, O_RDWR, O_TRUNC: no flags of the node to check,
        no copy-up, no kill flag, no change) as ``open`` answers it, without its closure and
        ``_at_node``'s copy-up hand-over: the engine's short path (``Operations.open_node``).
        The same budget check first (``room_for_open``: ENFILE), then the node's path
        (ESTALE for an unknown node) and the core's read-only open under the namespace
        lock, where that path is current (``Files.open_read``: the kept object of the last
        lookup or listing, else ``Files.open``); the node's handle, and the passthrough's
        say as ``open``'s (``PassthroughOpens.open_lower``: a lower file of a writable mount
        is counted without looking for a backing file to offer, which ``_choose`` never
        offers there).
        None, nothing done, for a node with no name left (``_open_nameless``), a directory
        moved between the path and the lock (``_at_node`` then makes it under the lock),
        or while a fault is armed (the generic path's hooks)."""
        if flags & _OPEN_WRITE_INTENT or open_flags & p.OPEN_KILL_SUIDGID or faults.armed:
            return None  # (the kernel asks the kill with O_TRUNC alone)
        fs = self.fs
        era = self.passthrough.era
        fs.room_for_open(None)
        paths = self._paths
        moves = paths.moves
        rel = self.nodes.file_path(nodeid)
        if rel is None:
            return None
        with fs.ns_lock:
            if paths.moves != moves:
                return None
            result, inode = fs.files.open_read(rel, flags)
        self.nodes.opened(nodeid, result.fh)
        try:  # (``_opened``'s, through the lean count of a handle offered nothing)
            return self.passthrough.open_lower(nodeid, result, era, inode, flags)
        except BaseException:
            self.release(None, nodeid, result.fh)
            raise

    def _open_check(self, node, flags: int) -> "Callable[[int], None]":
        """``_kept_check`` of an open for writing (``protattr.check_open``)."""
        return self._kept_check(
            node, lambda prot: protattr.check_open(prot, flags, self.nodes.path(node.nodeid) or ""))

    def _open_nameless(self, nodeid: int, flags: int):
        """OPEN of a node with no name left (``open("/proc/self/fd/N")``): a new handle of
        the inode one of its open handles holds (``Files.open_inode``); ENOENT with none."""
        _, inode = self._open_inode(nodeid)
        return self.fs.files.open_inode(inode, flags)

    def _opened(self, nodeid: int, result, era: int | None, req: Request | None = None,
                flags: int = os.O_RDONLY) -> Opened:
        """How the kernel serves a new handle (passthrough or not); a failure releases it."""
        try:
            opened = self.passthrough.open(nodeid, result, era)
            if opened.backing_id and req is not None and flags & os.O_ACCMODE != os.O_RDONLY:
                self._strip_for_passthrough(req, nodeid, result.fh)
            return opened
        except BaseException:
            self.release(None, nodeid, result.fh)
            raise

    def _strip_for_passthrough(self, req: Request, nodeid: int, fh: int) -> None:
        """A passthrough write never reaches the daemon (nor carries a kill flag), so what
        the first write by a caller without CAP_FSETID would strip (setuid, setgid,
        ``security.capability``) goes at its writable open instead: earlier than the
        kernel overlay, never later."""
        if self.fs.files.privileges_known_clean(fh) or has_fsetid(req.pid):
            return
        self._kill_privs(req, nodeid, None, fh)

    def create(self, req: Request, parent: int, name: bytes, flags: int, mode: int,
               open_flags: int = 0) -> tuple[Entry, Opened]:
        def change():
            rel, decoded = self._child(parent, name)
            return self.fs.create_node(rel, flags, mode, _caller(req),
                                       lambda result, node: self._made(parent, decoded, rel, node))
        result, _, entry = self._at_paths(change)
        if faults.armed:
            faults.hit("ops.created", os.fsdecode(name))  # test-only (faults.py)
        self.nodes.opened(entry.nodeid, result.fh)
        try:
            opened = self._opened(entry.nodeid, result, None)
        except BaseException:
            self.forget(entry.nodeid, 1)
            raise
        return entry, opened

    def _create_name(self, uid: int, gid: int, parent: int, name: bytes, flags: int, mode: int,
                     umask: int) -> "tuple[int, int, bytes] | None":
        """CREATE of a regular file in an upper-only directory (one per file of an untar, a
        create+write), as ``create`` does it, from the request's fields (the caller's IDs,
        ``CREATE_IN``'s): (the new nodeid, its handle, the packed ``fuse_entry_out`` and
        ``fuse_open_out``), with no ``Request``, ``Caller``, closures, path checks of
        ``_at_paths``, ``Attr``, ``FileAttr`` nor ``Entry``. In one namespace lock hold with
        the ``pathguard`` count compared there (``Namespace._changing``'s check): the
        parent as ``Lookup.upper_dir`` holds it, the file made and opened
        (``shortcreate.made_in``: the generic steps where they make it in place), its node
        taken (``_made``'s reference, ``prot`` 0), the lookup's epoch moved at the end; then
        the handle recorded on the node and offered to passthrough (``_opened``), as
        ``create``. None, with nothing done, wherever ``create`` might answer otherwise or do
        more: fault points armed, a move in progress or since the path was made, a name
        ``create`` refuses (over NAME_MAX, empty, ``/``, dots, an OCI marker's), a parent
        not a directory with a path, not cached or not upper-only, special mode bits, a
        caller with other IDs than the daemon's (``_owned_after``: built in
        ``workdir/work``), open files at their share of fds (``room_for_open``: ENFILE), and
        ``made_in``'s: a flagged, default-ACL or setgid parent, no kept absence, the name
        taken behind the mount's back. A failure once the file is made removes it and is
        the answer."""
        if faults.armed:
            return None
        mode = (stat.S_IFREG | stat.S_IMODE(mode)) & ~(umask & 0o777)  # (``acl.inherit``'s)
        fs = self.fs
        paths = self._paths
        moves = paths.moves
        named = self._short_named(parent, name, moves)
        if named is None or mode & 0o7000 or (uid, gid) != fs.namespace._own_ids \
                or fs.open_fds() >= fs.open_file_fds:
            return None
        prel, decoded = named
        rel = f"{prel}/{decoded}"
        lookup = fs.lookup
        with fs.ns_lock:
            if paths.moves != moves:
                return None
            pnode = lookup.upper_dir(prel)
            if pnode is None:
                return None
            try:
                made = shortcreate.made_in(fs, pnode, decoded, rel, flags, mode)
            except BaseException:
                lookup.changed()
                raise
            if made is None:
                return None
            result, st, ino, key = made
            try:
                # (``_made``'s: no flags, a new object)
                nodeid = self.nodes.take(key, parent, decoded, False, prot=0)
            except BaseException:
                shortcreate.unmade(fs, rel, result, st)
                raise
            finally:
                lookup.changed()
        fh = result.fh
        self.nodes.opened(nodeid, fh)
        try:
            try:  # (``_opened``, for a file just made: ``PassthroughOpens.open_made``)
                opened = self.passthrough.open_made(nodeid, result)
            except BaseException:
                self.release(None, nodeid, fh)
                raise
        except BaseException:
            self.forget(nodeid, 1)
            raise
        return nodeid, fh, p.pack_stat_created(nodeid, self._attr_valid, st, ino, fh,
                                               fopen_flags(opened), opened.backing_id)

    def tmpfile(self, req: Request, parent: int, flags: int, mode: int,
                open_flags: int = 0) -> tuple[Entry, Opened]:
        """TMPFILE (``open(dir, O_TMPFILE)``): an open file with no name in directory
        ``parent`` (``Files.tmpfile``), a node the table knows by its key only (no name:
        reached by its handles, as an unlinked open file's; ``NodeTable.take_unnamed``),
        with its entry's reference; LINK names it later (``_link_tmpfile``)."""
        def change():
            return self.fs.tmpfile(self._path(parent), flags, mode, _caller(req),
                                   lambda result, node: self._made_unnamed(result, node))
        result, _, entry = self._at_paths(change)
        self.nodes.opened(entry.nodeid, result.fh)
        try:
            opened = self._opened(entry.nodeid, result, None)
        except BaseException:
            self.forget(entry.nodeid, 1)
            raise
        return entry, opened

    def _made_unnamed(self, result, node: Node) -> Entry:
        """``_made`` of a file made without a name: its attributes through its new handle
        (its node's path names nothing), a node under its key alone."""
        attr = file_attr(self.fs.files.getattr(result.fh))
        nodeid = self.nodes.take_unnamed(self.fs.identity(node))
        return Entry(nodeid, attr, self.timeout, self.timeout)

    def read(self, req: Request, nodeid: int, fh: int, buf: memoryview, offset: int) -> int:
        return self.fs.files.readinto(fh, buf, offset)

    @_changes
    def write(self, req: Request, nodeid: int, fh: int, data: memoryview, offset: int,
              write_flags: int = 0) -> int:
        if write_flags & p.WRITE_KILL_SUIDGID:  # (a no-op once the file has nothing to strip)
            self._kill_privs(req, nodeid, None, fh)
        return self.fs.write(fh, data, offset)

    def _kill_privs(self, req: Request, nodeid: int, rel: str | None, fh: int | None,
                    chown: tuple[int, int] | None = None,
                    inode: OverlayInode | None = None) -> None:
        """``killpriv``; the kernel's cached mode goes when a bit went (attributes only).
        A chown sets the kill flag whatever the caller's capabilities: they are read."""
        writer = Writer(req.uid, req.gid, req.pid, may_be_capable=chown is not None)
        if self.fs.kill_privs(rel, fh, writer, chown, inode):
            self.notifier.inval_inode(nodeid, -1)

    def release(self, req: Request | None, nodeid: int, fh: int, flags: int = 0) -> None:
        self._release(nodeid, fh, flags)

    def _release(self, nodeid: int, fh: int, flags: int = 0) -> None:
        """RELEASE (also the engine's ``release_fh``: no caller is needed)."""
        try:
            self.passthrough.release(fh)  # first: its bookkeeping reads the core's handle
            # a node with no name (O_TMPFILE, never linked) whose file this close frees
            # leaves the key index before the fd closes (``NodeTable.dying``)
            dying = None if self.nodes.has_names(nodeid) else lambda: self.nodes.dying(nodeid)
            self.fs.release(fh, dying)
        finally:
            self.nodes.closed(nodeid, fh)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                # (a passthrough open's writes bypassed the daemon: they count as of now)
                self._changed()

    def fsync(self, req: Request, nodeid: int, fh: int, datasync: bool) -> None:
        self.fs.fsync(fh, bool(datasync))

    @_changes
    def fallocate(self, req: Request, nodeid: int, fh: int, offset: int, length: int,
                  mode: int) -> None:
        if self.nodes.node(nodeid).prot:  # (-1: unknown)
            # none on an immutable file, even through an fd opened before its chattr; an
            # append-only file's fd (O_APPEND) may only grow it (``vfs_fallocate``)
            prot = self._protected(nodeid)
            if prot & protattr.FS_IMMUTABLE_FL \
                    or mode & ~_FALLOC_FL_KEEP_SIZE and prot & protattr.FS_APPEND_FL:
                raise OSError(errno.EPERM, "operation not permitted (immutable or append-only)",
                              self.nodes.path(nodeid) or "")
        self.fs.fallocate(fh, mode, offset, length)

    def lseek(self, req: Request, nodeid: int, fh: int, offset: int, whence: int) -> int:
        return self.fs.files.lseek(fh, offset, whence)

    @_changes
    def copy_file_range(self, req: Request, node_in: int, fh_in: int, off_in: int,
                        node_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range flags must be 0")
        self.fs.require_writable()
        if self.nodes.node(node_out).prot and self._protected(node_out) & protattr.FS_IMMUTABLE_FL:
            # (the kernel's ``generic_copy_file_checks``: an fd opened before its chattr)
            raise OSError(errno.EPERM, "operation not permitted (immutable)",
                          self.nodes.path(node_out) or "")
        # the kernel sends no kill flag with a copy (its file_remove_privs leaves it to
        # the daemon under handle_killpriv_v2): strip as a write by this caller would
        if not has_fsetid(req.pid):
            self._kill_privs(req, node_out, None, fh_out)
        return self.fs.files.copy_range(fh_in, off_in, fh_out, off_out, length)

    # -- directories ------------------------------------------------------------------------------
    def opendir(self, req: Request, nodeid: int, flags: int = 0) -> Opened:
        """Handle 0, in every mode (``listings``): the listing is served from snapshots
        named by the cookies, as the kernel would open the directory itself after an ENOSYS
        (where it offers NO_OPENDIR_SUPPORT); but OPENDIR is answered, so that the kernel's
        listing cache goes only to a handle opened while no other of the directory is
        (``listings.OpenDirs``), and so that ``deny_others`` refuses other users here (the
        session's check: their READDIR would come with handle 0, exempt from it, but the
        kernel sends none for a file whose OPENDIR failed). The kernel may keep listings
        across opens (KEEP_CACHE): it drops them itself whenever the directory changes
        through the mount, and layers change only through the mount."""
        return Opened(0, cache_dir=self._open_dirs.open(nodeid), keep_cache=True)

    def releasedir(self, req: Request, nodeid: int, fh: int) -> None:
        self._open_dirs.release(nodeid)

    def readdir(self, req: Request, nodeid: int, fh: int, offset: int,
                plus: bool = False) -> Iterator[DirItem]:
        """Entries after cookie ``offset`` (``listings``; ``fh`` is 0, ``opendir``). The
        listing is read now (errors raise here); items are made lazily. READDIRPLUS
        entries of a later chunk than the one that read the listing: ``_take_later``."""
        return self._unopened_items(nodeid, offset, plus)

    def _readdirplus_short(self, nodeid: int, fh: int, offset: int,
                           size: int) -> tuple[bytes, list[int]]:
        """READDIRPLUS as ``readdir`` (``plus``), ``take_entries`` and the session's
        ``_listing`` answer it, without their objects per entry (``DirItem``, ``_Take``,
        ``Entry``, ``FileAttr``): the engine's short path (``Operations.readdirplus_node``).
        The same snapshot and position (``_snapshot_at``), the same items that fit in
        ``size`` bytes, references taken for the fitting entries with attributes only (never
        for the dots) under one lock hold (``_take_ids``; later chunks:
        ``_take_later``), each packed from the listing's stat (``pack_direntplus_stat``:
        no overrides but ``st_nlink`` where IDs are not shown mapped, the only case this is
        bound for). The packed entries and the nodeids taken (forgotten again by the
        session if the reply never reaches the kernel, here if anything fails)."""
        snap, first, pos, base = self._snapshot_at(nodeid, offset, True)
        entries, keys = snap.entries, snap.keys
        parts: list[bytes] = []
        room = size
        for i in range(pos, min(2, len(entries) + 2)):  # the dots, never taken
            name = _DOT_NAMES[i]
            need = (_DIRENTPLUS_ROOM + len(name)) & ~7
            if need > room:
                return b"".join(parts), []
            room -= need
            parts.append(pack_direntplus_entry(0, 0, None, 0.0, 0.0, name, snap.dots[i],
                                               base | (i + 1), _S_IFDIR))
        encoding, errors = FS_ENCODING, FS_ERRORS
        fit: list[tuple[DirEntry, bytes, int, struct.Struct]] = []  # (entry, name, cookie, layout)
        #: (name, identity, is_dir) of each fitting entry with attributes (``_take_ids``'s)
        listed: list[tuple[str, InodeKey, bool]] = []
        start = max(pos, 2) - 2
        layout_of = DIRENTPLUS_BY_LEN.get
        for e, key in zip(entries[start:], keys[start:]):
            name = e[0].encode(encoding, errors)
            layout = layout_of(len(name))
            if layout is None:
                layout = direntplus_layout(len(name))
            need = layout.size  # (the entry's room, padded)
            if need > room:
                break
            room -= need
            fit.append((e, name, base | key, layout))
            attr = e[3]
            if attr is not None:  # (its ``mode``: the listed stat's type bits)
                st = attr[0]
                listed.append((e[0], _new_tuple(InodeKey, (st.st_dev, st.st_ino, None)),
                               e[1] == _S_IFDIR))
        if not listed:
            for e, name, off, _layout in fit:
                parts.append(pack_direntplus_entry(0, 0, None, 0.0, 0.0, name, e[2], off, e[1]))
            return b"".join(parts), []
        if not first:
            return self._pack_later(nodeid, snap.epoch, parts, fit,
                                    [e for e, _name, _off, _layout in fit if e[3] is not None])
        ids = self._take_ids(nodeid, snap.epoch, listed)
        next_id = iter(ids).__next__
        timeouts = self._entry_timeouts
        afresh: list[int] | None = None  # (the references ``_take_afresh`` took)
        try:
            for e, name, off, layout in fit:
                attr = e[3]
                if attr is None:
                    parts.append(pack_direntplus_entry(0, 0, None, 0.0, 0.0, name, e[2], off, e[1]))
                    continue
                child = next_id()
                if child:
                    parts.append(pack_direntplus_stat(layout, child, timeouts, attr[0], attr[1],
                                                      attr[2], name, e[2], off, e[1]))
                    continue
                entry = self._take_afresh(nodeid, e[0])  # rare: identities moved since
                if afresh is None:
                    afresh = []
                parts.append(_packed_taken(entry, name, e, off, afresh))
        except BaseException:
            self._forget_taken(ids + (afresh or []))  # (0: none taken there)
            raise
        if afresh is None:  # (every one of ``ids`` taken)
            return b"".join(parts), ids
        return b"".join(parts), [child for child in ids if child] + afresh

    def _pack_later(self, nodeid: int, epoch: tuple[int, int, int] | None, parts: list[bytes],
                    fit: "list[tuple[DirEntry, bytes, int, struct.Struct]]",
                    takes: "list[DirEntry]") -> tuple[bytes, list[int]]:
        """``_readdirplus_short``'s entries of a later chunk (``_take_later``)."""
        got = iter(self._take_later(nodeid, epoch, takes))
        taken: list[int] = []
        try:
            for e, name, off, _layout in fit:
                entry = None if e[3] is None else next(got)
                parts.append(_packed_taken(entry, name, e, off, taken))
        except BaseException:
            self._forget_taken(taken + [e.nodeid for e in got if e is not None])
            raise
        return b"".join(parts), taken

    def _unopened_items(self, nodeid: int, offset: int, plus: bool) -> Iterator[DirItem]:
        """Items after cookie ``offset`` (``listings``): of its snapshot, or of a fresh
        reading after its key when that snapshot is gone."""
        snap, first, pos, base = self._snapshot_at(nodeid, offset, plus)
        return self._items(nodeid, snap.epoch, first, snap.entries, snap.dots, pos, plus,
                           base, snap.keys)

    def _snapshot_at(self, nodeid: int, offset: int, plus: bool) -> tuple[Snapshot, bool, int, int]:
        """(snapshot, read by this request, position, cookie base) of a listing request at
        cookie ``offset``: its kept snapshot, or a fresh reading after its key when that
        snapshot is gone (then ``first``); the position of the first item after the key
        (0, 1: the dots; 2 on: the entries); a snapshot whose end is reached is dropped."""
        sid, key = split_cookie(offset)
        snap = self._snapshots.get(sid, nodeid) if key else None
        first = snap is None  # (else a snapshot read by an earlier request)
        if first:
            snap = self._read_at(nodeid, lambda rel: Snapshot.of(
                nodeid, self._listing_epoch(), self.fs.readdir(rel, plus=plus),
                self.fs.dot_inos_at(rel)))
            sid = self._snapshots.add(snap)
        pos = snap.after(key)
        if pos >= len(snap.entries) + 2:
            self._snapshots.done(sid)
        return snap, first, pos, sid << KEY_BITS

    def _items(self, nodeid: int, listed: tuple[int, int, int] | None, first: bool, entries,
               dots, offset: int, plus: bool, base: int, keys: list[int]) -> Iterator[DirItem]:
        """Items from position ``offset`` (0, 1: the dots; 2 on: ``entries``); cookies are
        ``base`` ORed with the dots' keys 1 and 2, then the entries' ``keys``
        (``Snapshot.keys``). ``listed``: the ``_listing_epoch`` before the listing was
        read, ``first``: read by this request."""
        for pos in range(offset, min(2, len(entries) + 2)):
            yield DirItem(b"." * (pos + 1), dots[pos], stat.S_IFDIR, base | (pos + 1))
        encoding, errors = FS_ENCODING, FS_ERRORS
        start = max(offset, 2) - 2
        if not plus:
            for (name, mode, ino, _attr), key in zip(entries[start:], keys[start:]):
                yield DirItem(name.encode(encoding, errors), ino, mode, base | key)
            return
        listing = _Listing(self, nodeid, listed, first)  # (one for all its items' ``take``)
        for (name, mode, ino, attr), key in zip(entries[start:], keys[start:]):
            yield DirItem(name.encode(encoding, errors), ino, mode, base | key,
                          None if attr is None else _Take(listing, name, attr))

    def take_entries(self, req: Request, parent: int, items: list[DirItem]) -> list[Entry | None]:
        """READDIRPLUS: one reply's items taken at once (``_take_listed``), when they are one
        listing's of directory ``parent``; else each by its own ``take``."""
        takes = [item.take for item in items]
        listing = takes[0].listing if takes and type(takes[0]) is _Take else None
        if listing is None or listing.ops is not self or listing.parent != parent:
            return super().take_entries(req, parent, items)
        for t in takes:
            if type(t) is not _Take or t.listing is not listing:
                return super().take_entries(req, parent, items)  # (not one listing's items)
        return self._take_chunk(parent, listing.epoch, listing.first, takes)

    def _take_chunk(self, parent: int, epoch: tuple[int, int, int] | None, first: bool,
                    takes: list["_Take"]) -> list[Entry | None]:
        """A reply's listed entries: of the listing read by this request (``first``) or
        by an earlier one (``_take_later``)."""
        if first:
            return self._take_listed(parent, epoch, takes)
        return self._take_later(parent, epoch, takes)

    def _listing_epoch(self) -> tuple[int, int, int]:
        """Read before a listing: (the node table's epoch, the lookup's, ``_change``), see
        ``_table_epoch`` and ``_take_later``."""
        return self.nodes.epoch, self.fs.lookup.epoch, self._change

    def _table_epoch(self, listed: tuple[int, int] | None) -> int | None:
        """The table epoch under which a listing's stats give identities, or None when a
        change of the namespace or a copy-up ran since it was read: a name the table did not
        hold may name another object now (a rename over it moves no table epoch; the
        lookup's moves at every change). Under the namespace lock."""
        if listed is None or listed[1] != self.fs.lookup.epoch:
            return None
        return listed[0]

    def _take_listed(self, parent: int, epoch: tuple[int, int, int] | None,
                     takes: list["_Take"]) -> list[Entry | None]:
        """One reference to the node of each listed entry of directory ``parent``, under
        one hold of the namespace lock and one of the node table's. A name the kernel holds
        already names its node; otherwise the listing's stat gives the identity (hard links
        and metacopy files come without attributes), unless identities moved or the
        namespace changed since the listing was read (``epoch``: ``_listing_epoch`` then;
        None: not known): then the name is looked up afresh. For a listing read by this
        request: a later chunk's go through ``_take_later``."""
        out: list[Entry | None] = []
        nodeids = [0] * len(takes)
        try:
            nodeids = self._take_listed_ids(parent, epoch, takes)
            timeout = self.timeout
            for t, nodeid in zip(takes, nodeids):
                if nodeid:
                    out.append(_new_tuple(Entry, (nodeid, file_attr(t.attr), timeout, timeout, 0)))
                else:  # rare: identities moved since the listing
                    out.append(self._take_afresh(parent, t.name))
        except BaseException:
            self._forget_taken([e.nodeid for e in out if e is not None] + nodeids[len(out):])
            raise
        return out

    def _take_listed_ids(self, parent: int, epoch: tuple[int, int, int] | None,
                         takes: "list[_Take] | list[DirEntry]") -> list[int]:
        """``_take_listed``'s references (``_take_ids``) of ``takes`` (a ``_Take`` or the
        listing's own ``DirEntry``), each by its ``name`` and the identity and type its
        listed stat (``attr``) gives."""
        listed = []
        for t in takes:
            st = t.attr.st
            # (a named tuple from its fields, without its Python-level ``__new__``)
            listed.append((t.name, _new_tuple(InodeKey, (st.st_dev, st.st_ino, None)),
                           st.st_mode & 0o170000 == _S_IFDIR))
        return self._take_ids(parent, epoch, listed)

    def _take_ids(self, parent: int, epoch: tuple[int, int, int] | None,
                  listed: "list[tuple[str, InodeKey, bool]]") -> list[int]:
        """One reference each to the node of the (name, identity, is_dir) ``listed`` in
        directory ``parent``, under one hold of the namespace lock and one of the node
        table's (``NodeTable.take_listed``): the nodeid of each, 0 where the listing's stat
        may name another object now (the caller looks the name up afresh)."""
        with self.fs.ns_lock:  # (epoch None: names the table holds only)
            return self.nodes.take_listed(parent, listed, self._table_epoch(epoch))

    def _forget_taken(self, nodeids: list[int]) -> None:
        """The references a failed READDIRPLUS took (0: none taken there) are given back."""
        for nodeid in nodeids:
            if nodeid:
                self.forget(nodeid, 1)

    def _take_later(self, parent: int, epoch: tuple[int, int, int] | None,
                    takes: list["_Take"]) -> list[Entry | None]:
        """A later chunk's entries: the listing was read by an earlier request. The kernel
        takes a reply's attributes as newer than any change of its own made before it
        sent the request (its attr_version), so a stat read before that request for a file
        written or chmodded since would become its view for the attribute timeout (a stale
        size, and reads stop at it). So a name the kernel holds gets no attributes (None:
        it keeps its own, which every change kept current, passthrough writes included);
        the others get the listing's stats while nothing changed since it was read
        (``_listing_epoch``: namespace, copy-ups, data and attributes), else are looked up
        afresh. (A name the kernel takes meanwhile was looked up since the listing: with
        nothing changed, the listing's stat is still what that lookup saw.)"""
        child = self.nodes.child
        rest = [t for t in takes if child(parent, t.name) is None]
        if not rest:
            return [None] * len(takes)
        if epoch is not None and epoch == self._listing_epoch():
            taken = self._take_listed(parent, epoch, rest)
        else:
            taken = []
            try:
                for t in rest:
                    taken.append(self._take_afresh(parent, t.name))
            except BaseException:
                self._forget_taken([e.nodeid for e in taken if e is not None])
                raise
        got = dict(zip([t.name for t in rest], taken))
        return [got.get(t.name) for t in takes]

    def _take_afresh(self, parent: int, name: str) -> Entry | None:
        """A listed name looked up again, with one reference taken; None on an error, or
        when a directory above moved meanwhile (``rel`` may have named another object)."""
        moves = self._paths.moves
        rel = self.nodes.path(parent)
        if rel is None:
            return None
        try:
            entry = self._take(parent, name, _join(rel, name), moves=moves)
        except OSError:
            return None  # the kernel looks the name up itself, and gets the error then
        return None if entry is _MOVED else entry


class _Listing:
    """What the ``take`` of every READDIRPLUS item of one request shares: the directory,
    the ``_listing_epoch`` before its listing was read, and whether this request read it."""
    __slots__ = ("ops", "parent", "epoch", "first")

    def __init__(self, ops: OverlayOps, parent: int, epoch: tuple[int, int, int] | None,
                 first: bool) -> None:
        self.ops, self.parent, self.epoch, self.first = ops, parent, epoch, first


class _Take:
    """A READDIRPLUS item's ``take`` (a small object rather than a closure per entry)."""
    __slots__ = ("listing", "name", "attr")

    def __init__(self, listing: _Listing, name: str, attr: Attr) -> None:
        self.listing, self.name, self.attr = listing, name, attr

    def __call__(self) -> Entry | None:
        listing = self.listing
        return listing.ops._take_chunk(listing.parent, listing.epoch, listing.first, [self])[0]


def _time(valid: int, flag: int, now_flag: int, ns: int | None) -> int:
    """One SETATTR time: UTIME_OMIT when not set, UTIME_NOW for the kernel's "now"."""
    if not valid & (flag | now_flag):
        return UTIME_OMIT
    if valid & now_flag or ns is None:
        return UTIME_NOW
    return ns


def _negotiate_io(conn: ConnInfo, cache: str, passthrough: bool) -> None:
    """FUSE passthrough (``passthrough_opens``), and MAP_SHARED on direct-io files in
    cache=shared. Passthrough needs max_stack_depth 1 or 2 and no WRITEBACK_CACHE (else the
    kernel turns it off silently). 1: a layer on a stacked filesystem (an overlay) then
    answers ELOOP and its files fall back to the daemon path (logged once); 2 would make
    this mount's own stacking depth 2, so no overlayfs could use it as a layer."""
    if passthrough:
        conn.wanted |= p.PASSTHROUGH
        conn.max_stack_depth = 1
    if cache == "shared":
        conn.wanted |= p.DIRECT_IO_ALLOW_MMAP


def _negotiate_acls(conn: ConnInfo) -> None:
    """POSIX ACLs enforced by the kernel: its permission checks then read
    ``system.posix_acl_access`` through getxattr. The kernel then applies the umask itself
    even under a parent with a default ACL; DONT_MASK stops that, and ``namespace``
    applies the caller's umask only where Linux does."""
    if conn.offered & p.POSIX_ACL and conn.offered & p.DONT_MASK:
        conn.wanted |= p.POSIX_ACL | p.DONT_MASK
    else:
        log.warning("the kernel offers no FUSE POSIX ACL support: ACLs are not enforced")


__all__ = ["OverlayOps", "file_attr", "WANTED", "ROOT_ID"]
