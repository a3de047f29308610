"""Node-style operations on the overlaypc core, for tests that drive it without FUSE.

Owns two small layers between a test and ``overlaypc.overlay_ops.OverlayOps`` (the
engine's operations over ``overlaypc.core.OverlayFS``):

- ``CoreDriver``: the calls a FUSE kernel makes — look a name up in a directory node,
  then act on the nodeid it got (``getattr``, ``open``, ``setattr``...) or on a name in
  it (``create``, ``mkdir``, ``unlink``, ``rename``...), and file-handle I/O. It counts
  the references every entry gives it and hands them back (``settle``, the kernel's
  FORGET), except for nodes with open files, and then checks that the node table holds
  nothing else: a leaked reference fails the test.
- ``Walker``: what the kernel's VFS does before it calls a filesystem — walk a path one
  lookup at a time and apply the checks the VFS makes itself (``EEXIST`` for a name that
  exists, ``ENOTDIR``/``EISDIR`` from the looked-up type, ``EINVAL`` for a directory moved
  into itself). The core is then called only as the kernel would call it. Each outermost
  ``Walker`` call first settles the references of the previous one.

Caveats: a ``NodeRef`` is valid until the next ``Walker`` call (its nodeid may be
forgotten then; a test looks a name up again rather than keep a node across steps).
Listings are READDIRPLUS: each entry with attributes is taken and must be the node a
lookup of its name gives.
"""
from __future__ import annotations

import errno
import functools
import os
import stat
import threading
from collections import Counter
from dataclasses import dataclass

from overlaypc import faults
from overlaypc.config import MountConfig, validate
from overlaypc.core import OverlayFS
from overlaypc.engine import protocol as p
from overlaypc.engine.ops import Entry, Request
from overlaypc.engine.protocol import FileAttr, SetAttr
from overlaypc.nodes import ROOT_ID
from overlaypc.overlay_ops import OverlayOps

REQ = Request(uid=0, gid=0, pid=os.getpid())


@dataclass(frozen=True)
class Stat:
    """What ``stat`` shows for a node (the fields a test compares)."""
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @classmethod
    def of(cls, attr: FileAttr) -> "Stat":
        return cls(attr.ino, attr.mode, attr.nlink, attr.uid, attr.gid, attr.size, attr.rdev)


@dataclass(frozen=True)
class NodeRef:
    """A looked-up object: its nodeid, and its attributes at lookup."""
    nodeid: int
    attr: Stat

    @property
    def is_dir(self) -> bool:
        return self.attr.is_dir


def _name(name: str) -> bytes:
    return os.fsencode(name)


class CoreDriver:
    """Node-style operations over one ``OverlayFS`` (started on construction)."""

    def __init__(self, config: MountConfig) -> None:
        # as in the daemon (cli.py): the core applies each caller's umask itself, so the
        # process's own must be 0 while it runs
        self._umask = os.umask(0)
        self.fs = OverlayFS(config)
        try:
            self.fs.start()
            self.ops = OverlayOps(self.fs)
        except BaseException:
            self.fs.close()
            os.umask(self._umask)
            raise
        self._refs: Counter[int] = Counter()   # references taken, not yet forgotten
        self._open: dict[int, int] = {}        # fh -> nodeid

    @classmethod
    def in_dir(cls, base, **options) -> "CoreDriver":
        """A driver over ``base``/lower (made if absent), with a fresh upper, workdir and
        mount point there; ``options`` are ``MountConfig``'s."""
        for d in ("lower", "upper", "work", "mnt"):
            os.makedirs(os.path.join(base, d), exist_ok=d == "lower")
        cfg = MountConfig(lowers=[os.path.join(base, "lower")], upper=os.path.join(base, "upper"),
                          work=os.path.join(base, "work"), mountpoint=os.path.join(base, "mnt"),
                          **options)
        validate(cfg)
        return cls(cfg)

    def close(self) -> None:
        os.umask(self._umask)
        self.fs.close()
        # The core's objects reference each other, so without this the directory fds its
        # lookup cache holds would wait for the garbage collector; thousands of runs (a
        # Hypothesis shrink) then exhaust the fd table.
        self.fs.lookup.invalidate()

    # -- references ------------------------------------------------------------------------
    def _ref(self, entry: Entry) -> NodeRef:
        self._refs[entry.nodeid] += 1
        return NodeRef(entry.nodeid, Stat.of(entry.attr))

    def settle(self) -> None:
        """FORGET every reference taken, but those of nodes with open files and of their
        parents; then the table must hold only the root and those nodes."""
        table = self.ops.nodes
        # the kernel's dentry of an open file holds its parents' (and so on up)
        pinned, todo = set(), list(self._open.values())
        while todo:
            nodeid = todo.pop()
            if nodeid not in pinned and nodeid in table:
                pinned.add(nodeid)
                todo.extend(parent for parent, _ in table.names(nodeid))
        for nodeid in [n for n in self._refs if n not in pinned]:
            self.ops.forget(nodeid, self._refs.pop(nodeid))
        held = {ROOT_ID} | pinned
        assert len(table) == len(held) and all(n in table for n in held), \
            f"node table holds {len(table)} nodes, the kernel {sorted(held)}"

    # -- names ----------------------------------------------------------------------------
    def root(self) -> NodeRef:
        return NodeRef(ROOT_ID, Stat.of(self.ops.getattr(REQ, ROOT_ID).attr))

    def lookup(self, parent: NodeRef, name: str) -> NodeRef | None:
        """The node called ``name`` in directory ``parent``; None when there is none (the
        kernel's negative entry). Other errors (EPERM, EIO...) raise."""
        entry = self.ops.lookup(REQ, parent.nodeid, _name(name))
        return None if entry.nodeid == 0 else self._ref(entry)

    def getattr(self, node: NodeRef) -> Stat:
        return Stat.of(self.ops.getattr(REQ, node.nodeid).attr)

    def readlink(self, node: NodeRef) -> str:
        return os.fsdecode(self.ops.readlink(REQ, node.nodeid))

    def readdir(self, node: NodeRef) -> list[str]:
        fh = self.ops.opendir(REQ, node.nodeid).fh
        try:
            items = list(self.ops.readdir(REQ, node.nodeid, fh, 0, True))
        finally:
            self.ops.releasedir(REQ, node.nodeid, fh)
        names = []
        for item in items:
            if item.name in (b".", b".."):
                assert item.take is None, "READDIRPLUS offered a reference to . or .."
                continue
            names.append(os.fsdecode(item.name))
            if item.take is not None:
                taken = item.take()
                if taken is not None:
                    self._ref(taken)
                    try:
                        again = self.lookup(node, os.fsdecode(item.name))
                    except OSError as e:
                        # known gap: a metacopy upper file in a mount without metacopy=on
                        # is listed with attributes but refused (EPERM) by a lookup
                        assert e.errno == errno.EPERM, e
                        continue
                    assert again is not None and again.nodeid == taken.nodeid, \
                        f"READDIRPLUS gave {item.name!r} node {taken.nodeid}, a lookup {again}"
        return names

    # -- namespace changes ------------------------------------------------------------------
    def create(self, parent: NodeRef, name: str, flags: int, mode: int) -> tuple[NodeRef, int]:
        entry, opened = self.ops.create(REQ, parent.nodeid, _name(name), flags | os.O_CREAT,
                                        stat.S_IFREG | mode)
        self._open[opened.fh] = entry.nodeid
        return self._ref(entry), opened.fh

    def tmpfile(self, parent: NodeRef, flags: int, mode: int,
                req: Request = REQ) -> tuple[NodeRef, int]:
        """TMPFILE (``open(dir, O_TMPFILE)``): the unnamed file's node and open handle."""
        entry, opened = self.ops.tmpfile(req, parent.nodeid, flags, stat.S_IFREG | mode)
        self._open[opened.fh] = entry.nodeid
        return self._ref(entry), opened.fh

    def mkdir(self, parent: NodeRef, name: str, mode: int) -> NodeRef:
        return self._ref(self.ops.mkdir(REQ, parent.nodeid, _name(name), mode))

    def mknod(self, parent: NodeRef, name: str, mode: int, rdev: int = 0) -> NodeRef:
        return self._ref(self.ops.mknod(REQ, parent.nodeid, _name(name), mode, rdev))

    def symlink(self, parent: NodeRef, name: str, target: str) -> NodeRef:
        return self._ref(self.ops.symlink(REQ, parent.nodeid, _name(name), _name(target)))

    def link(self, node: NodeRef, parent: NodeRef, name: str) -> NodeRef:
        return self._ref(self.ops.link(REQ, node.nodeid, parent.nodeid, _name(name)))

    def unlink(self, parent: NodeRef, name: str) -> None:
        self.ops.unlink(REQ, parent.nodeid, _name(name))

    def rmdir(self, parent: NodeRef, name: str) -> None:
        self.ops.rmdir(REQ, parent.nodeid, _name(name))

    def rename(self, parent: NodeRef, name: str, new_parent: NodeRef, new_name: str,
               flags: int = 0) -> None:
        self.ops.rename(REQ, parent.nodeid, _name(name), new_parent.nodeid, _name(new_name), flags)

    def setattr(self, node: NodeRef, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None) -> Stat:
        """One SETATTR request."""
        valid = ((p.FATTR_MODE if mode is not None else 0) | (p.FATTR_UID if uid is not None else 0)
                 | (p.FATTR_GID if gid is not None else 0) | (p.FATTR_SIZE if size is not None else 0))
        sa = SetAttr(valid, None, size or 0, 0, 0, mode or 0, uid or 0, gid or 0)
        return Stat.of(self.ops.setattr(REQ, node.nodeid, sa).attr)

    # -- open files ------------------------------------------------------------------------
    def open(self, node: NodeRef, flags: int) -> int:
        fh = self.ops.open(REQ, node.nodeid, flags).fh
        self._open[fh] = node.nodeid
        return fh

    def read(self, fh: int, size: int, off: int) -> bytes:
        buf = bytearray(size)
        n = self.ops.read(REQ, self._open[fh], fh, memoryview(buf), off)
        return bytes(buf[:n])

    def write(self, fh: int, data: bytes, off: int) -> int:
        return self.ops.write(REQ, self._open[fh], fh, memoryview(data), off)

    def ftruncate(self, fh: int, size: int) -> None:
        sa = SetAttr(p.FATTR_SIZE | p.FATTR_FH, fh, size, 0, 0, 0, 0, 0)
        self.ops.setattr(REQ, self._open[fh], sa)

    def fstat(self, fh: int) -> Stat:
        return Stat.of(self.ops.getattr(REQ, self._open[fh], fh).attr)

    def release(self, fh: int) -> None:
        """close(2): FLUSH (an ENOSYS answer is the kernel's cue to stop sending it), then
        RELEASE."""
        nodeid = self._open.pop(fh)
        try:
            self.ops.flush(REQ, nodeid, fh)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
        finally:
            self.ops.release(REQ, nodeid, fh)


def _settling(method):
    """An outermost ``Walker`` call first hands back the previous call's references."""
    @functools.wraps(method)
    def wrapper(self: "Walker", *args, **kwargs):
        if self._depth == 0:
            self.drv.settle()
        self._depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth -= 1
    return wrapper


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


class Walker:
    """Path operations as the kernel's VFS performs them on a ``CoreDriver``: one lookup
    per component, the VFS's own checks, then one driver call. Errors are ``OSError``."""

    def __init__(self, driver: CoreDriver) -> None:
        self.drv = driver
        self._depth = 0

    @_settling
    def node(self, path: str) -> NodeRef:
        """The node at ``path``: ENOENT / ENOTDIR as path resolution gives them."""
        node = self.drv.root()
        for name in _parts(path):
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory", path)
            found = self.drv.lookup(node, name)
            if found is None:
                raise OSError(errno.ENOENT, "no such file or directory", path)
            node = found
        return node

    @_settling
    def parent(self, path: str) -> tuple[NodeRef, str, NodeRef | None]:
        """(parent node, last name, node at ``path`` or None)."""
        head, _, name = path.rpartition("/")
        parent = self.node(head)
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", head)
        return parent, name, self.drv.lookup(parent, name)

    def _new(self, path: str) -> tuple[NodeRef, str]:
        parent, name, existing = self.parent(path)
        if existing is not None:
            raise OSError(errno.EEXIST, "file exists", path)
        return parent, name

    @_settling
    def create(self, path: str, flags: int, mode: int) -> tuple[NodeRef, int]:
        parent, name = self._new(path)
        return self.drv.create(parent, name, flags, mode)

    @_settling
    def mkdir(self, path: str, mode: int) -> NodeRef:
        parent, name = self._new(path)
        return self.drv.mkdir(parent, name, mode)

    @_settling
    def mknod(self, path: str, mode: int, rdev: int = 0) -> NodeRef:
        parent, name = self._new(path)
        return self.drv.mknod(parent, name, mode, rdev)

    @_settling
    def symlink(self, path: str, target: str) -> NodeRef:
        parent, name = self._new(path)
        return self.drv.symlink(parent, name, target)

    @_settling
    def link(self, src: str, dst: str) -> NodeRef:
        node = self.node(src)
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory", src)
        parent, name = self._new(dst)
        return self.drv.link(node, parent, name)

    @_settling
    def unlink(self, path: str) -> None:
        parent, name, node = self.parent(path)
        if node is None:
            raise OSError(errno.ENOENT, "no such file", path)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory", path)
        self.drv.unlink(parent, name)

    @_settling
    def rmdir(self, path: str) -> None:
        parent, name, node = self.parent(path)
        if node is None:
            raise OSError(errno.ENOENT, "no such directory", path)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", path)
        self.drv.rmdir(parent, name)

    @_settling
    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """The kernel's checks of rename(2) that need no knowledge of the filesystem;
        ``same_inode`` renames (two names of one inode: a no-op in the VFS) are the
        caller's to avoid, since a path API cannot tell."""
        oparent, oname, onode = self.parent(old)
        if onode is None:
            raise OSError(errno.ENOENT, "no such file", old)
        nparent, nname, nnode = self.parent(new)
        if _parts(new) == _parts(old) or (nnode is not None and nnode.nodeid == onode.nodeid):
            return  # one dentry, or two names of one inode: the VFS does nothing
        if _parts(new)[:len(_parts(old))] == _parts(old):
            raise OSError(errno.EINVAL, "cannot move a directory into itself", new)
        if nnode is not None:
            if flags & 1:  # RENAME_NOREPLACE
                raise OSError(errno.EEXIST, "target exists", new)
            if onode.is_dir and not nnode.is_dir:
                raise OSError(errno.ENOTDIR, "target is not a directory", new)
            if not onode.is_dir and nnode.is_dir:
                raise OSError(errno.EISDIR, "target is a directory", new)
        if _parts(old)[:len(_parts(new))] == _parts(new) and nnode is not None:
            raise OSError(errno.ENOTEMPTY, "target is an ancestor of the source", new)
        self.drv.rename(oparent, oname, nparent, nname, flags)

    @_settling
    def open(self, path: str, flags: int) -> int:
        node = self.node(path)
        if node.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EISDIR, "is a directory", path)
        return self.drv.open(node, flags)

    @_settling
    def setattr(self, path: str, **fields) -> Stat:
        return self.drv.setattr(self.node(path), **fields)

    @_settling
    def stat(self, path: str) -> Stat:
        return self.node(path).attr

    @_settling
    def readlink(self, path: str) -> str:
        return self.drv.readlink(self.node(path))

    @_settling
    def listdir(self, path: str) -> list[str]:
        node = self.node(path)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", path)
        return self.drv.readdir(node)


def paused_at(point: str, request, meanwhile):
    """``request()`` in a thread, stopped at fault point ``point`` (its first hit there, in
    that thread) while ``meanwhile()`` runs in this one; then what ``request`` returned or
    raised. Removes every fault hook when done."""
    reached, go = threading.Event(), threading.Event()
    results: list[object] = []
    worker: list[threading.Thread] = []

    def hook(point, *args):
        if threading.current_thread() in worker and not reached.is_set():
            reached.set()
            go.wait(10)

    def run():
        try:
            results.append(request())
        except Exception as e:  # noqa: BLE001 (returned to the test)
            results.append(e)

    faults.install(point, hook)
    worker.append(threading.Thread(target=run))
    try:
        worker[0].start()
        assert reached.wait(10), f"the request never reached {point}"
        meanwhile()
    finally:
        go.set()
        worker[0].join(10)
        faults.configure(None)
    assert results, "the request did not end"
    return results[0]
