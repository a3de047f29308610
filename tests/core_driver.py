"""Node-style operations on the overlaypc core, for tests that drive it without FUSE.

Owns two small layers between a test and ``overlaypc.core.OverlayFS``:

- ``CoreDriver``: the operations a node-based FUSE engine calls — look up a name in a
  directory node, then act on the node it got (``getattr``, ``open``, ``setattr``...) or
  on a name in it (``create``, ``mkdir``, ``unlink``, ``rename``...), and file-handle
  I/O. Today each one maps onto the core's path API; when an engine with its own node
  table replaces that API, only this class changes, and the tests written against it
  stay as they are.
- ``Walker``: what the kernel's VFS does before it calls a filesystem — walk a path one
  lookup at a time and apply the checks the VFS makes itself (``EEXIST`` for a name that
  exists, ``ENOTDIR``/``EISDIR`` from the looked-up type, ``EINVAL`` for a directory moved
  into itself). The core is then called only as the kernel would call it.

Caveats: a ``NodeRef`` is valid until the next namespace change (today it is a merged
path; a test must look a name up again rather than keep a node across steps). Reads go
through the adapter's read path (``Files.readinto``), which is where page-cache sharing
redirects reads; ``OverlayFS.read`` would bypass it.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from overlaypc.config import MountConfig
from overlaypc.core import OverlayFS


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
    def of(cls, attr) -> "Stat":
        d = attr.as_dict()
        return cls(d["st_ino"], d["st_mode"], d["st_nlink"], d["st_uid"], d["st_gid"],
                   d["st_size"], d["st_rdev"])


@dataclass(frozen=True)
class NodeRef:
    """A looked-up object: how the driver finds it again, and its attributes at lookup."""
    rel: str
    attr: Stat

    @property
    def is_dir(self) -> bool:
        return self.attr.is_dir


def _join(parent: NodeRef, name: str) -> str:
    return f"{parent.rel}/{name}" if parent.rel else name


class CoreDriver:
    """Node-style operations over one ``OverlayFS`` (started on construction)."""

    def __init__(self, config: MountConfig) -> None:
        # as in the daemon (cli.py): the core applies each caller's umask itself, so the
        # process's own must be 0 while it runs
        self._umask = os.umask(0)
        self.fs = OverlayFS(config)
        try:
            self.fs.start()
        except BaseException:
            self.fs.close()
            os.umask(self._umask)
            raise

    def close(self) -> None:
        os.umask(self._umask)
        self.fs.close()
        # The core's objects reference each other, so without this the directory fds its
        # lookup cache holds would wait for the garbage collector; thousands of runs (a
        # Hypothesis shrink) then exhaust the fd table.
        self.fs.lookup.invalidate()

    # -- names ----------------------------------------------------------------------------
    def root(self) -> NodeRef:
        return NodeRef("", Stat.of(self.fs.getattr("")))

    def lookup(self, parent: NodeRef, name: str) -> NodeRef | None:
        """The node called ``name`` in directory ``parent``; None when there is none (the
        kernel's negative entry). Other errors (EPERM, EIO...) raise."""
        rel = _join(parent, name)
        try:
            return NodeRef(rel, Stat.of(self.fs.getattr(rel)))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def getattr(self, node: NodeRef) -> Stat:
        return Stat.of(self.fs.getattr(node.rel))

    def readlink(self, node: NodeRef) -> str:
        return self.fs.readlink(node.rel)

    def readdir(self, node: NodeRef) -> list[str]:
        fh = self.fs.opendir(node.rel)
        try:
            return [e.name for e in self.fs.readdir(fh=fh) if e.name not in (".", "..")]
        finally:
            self.fs.releasedir(fh)

    # -- namespace changes ------------------------------------------------------------------
    def create(self, parent: NodeRef, name: str, flags: int, mode: int) -> tuple[NodeRef, int]:
        rel = _join(parent, name)
        fh = self.fs.create(rel, flags | os.O_CREAT, stat.S_IFREG | mode).fh
        return NodeRef(rel, Stat.of(self.fs.getattr(rel))), fh

    def mkdir(self, parent: NodeRef, name: str, mode: int) -> NodeRef:
        rel = _join(parent, name)
        self.fs.mkdir(rel, mode)
        return NodeRef(rel, Stat.of(self.fs.getattr(rel)))

    def mknod(self, parent: NodeRef, name: str, mode: int, rdev: int = 0) -> NodeRef:
        rel = _join(parent, name)
        self.fs.mknod(rel, mode, rdev)
        return NodeRef(rel, Stat.of(self.fs.getattr(rel)))

    def symlink(self, parent: NodeRef, name: str, target: str) -> NodeRef:
        rel = _join(parent, name)
        self.fs.symlink(target, rel)
        return NodeRef(rel, Stat.of(self.fs.getattr(rel)))

    def link(self, node: NodeRef, parent: NodeRef, name: str) -> NodeRef:
        rel = _join(parent, name)
        self.fs.link(node.rel, rel)
        return NodeRef(rel, Stat.of(self.fs.getattr(rel)))

    def unlink(self, parent: NodeRef, name: str) -> None:
        self.fs.unlink(_join(parent, name))

    def rmdir(self, parent: NodeRef, name: str) -> None:
        self.fs.rmdir(_join(parent, name))

    def rename(self, parent: NodeRef, name: str, new_parent: NodeRef, new_name: str,
               flags: int = 0) -> None:
        self.fs.rename(_join(parent, name), _join(new_parent, new_name), flags)

    def setattr(self, node: NodeRef, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None) -> Stat:
        """One SETATTR request; the fields are applied in the order libfuse applies them."""
        if mode is not None:
            self.fs.chmod(node.rel, mode)
        if uid is not None or gid is not None:
            self.fs.chown(node.rel, -1 if uid is None else uid, -1 if gid is None else gid)
        if size is not None:
            self.fs.truncate(node.rel, size)
        return self.getattr(node)

    # -- open files ------------------------------------------------------------------------
    def open(self, node: NodeRef, flags: int) -> int:
        return self.fs.open(node.rel, flags).fh

    def read(self, fh: int, size: int, off: int) -> bytes:
        buf = bytearray(size)
        n = self.fs.files.readinto(fh, memoryview(buf), off)
        return bytes(buf[:n])

    def write(self, fh: int, data: bytes, off: int) -> int:
        return self.fs.write(fh, data, off)

    def ftruncate(self, fh: int, size: int) -> None:
        self.fs.truncate("", size, fh)

    def fstat(self, fh: int) -> Stat:
        return Stat.of(self.fs.getattr("", fh))

    def release(self, fh: int) -> None:
        """close(2): FLUSH, then RELEASE."""
        try:
            self.fs.flush(fh)
        finally:
            self.fs.release(fh)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


class Walker:
    """Path operations as the kernel's VFS performs them on a ``CoreDriver``: one lookup
    per component, the VFS's own checks, then one driver call. Errors are ``OSError``."""

    def __init__(self, driver: CoreDriver) -> None:
        self.drv = driver

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

    def create(self, path: str, flags: int, mode: int) -> tuple[NodeRef, int]:
        parent, name = self._new(path)
        return self.drv.create(parent, name, flags, mode)

    def mkdir(self, path: str, mode: int) -> NodeRef:
        parent, name = self._new(path)
        return self.drv.mkdir(parent, name, mode)

    def mknod(self, path: str, mode: int, rdev: int = 0) -> NodeRef:
        parent, name = self._new(path)
        return self.drv.mknod(parent, name, mode, rdev)

    def symlink(self, path: str, target: str) -> NodeRef:
        parent, name = self._new(path)
        return self.drv.symlink(parent, name, target)

    def link(self, src: str, dst: str) -> NodeRef:
        node = self.node(src)
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory", src)
        parent, name = self._new(dst)
        return self.drv.link(node, parent, name)

    def unlink(self, path: str) -> None:
        parent, name, node = self.parent(path)
        if node is None:
            raise OSError(errno.ENOENT, "no such file", path)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory", path)
        self.drv.unlink(parent, name)

    def rmdir(self, path: str) -> None:
        parent, name, node = self.parent(path)
        if node is None:
            raise OSError(errno.ENOENT, "no such directory", path)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", path)
        self.drv.rmdir(parent, name)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """The kernel's checks of rename(2) that need no knowledge of the filesystem;
        ``same_inode`` renames (two names of one inode: a no-op in the VFS) are the
        caller's to avoid, since a path API cannot tell."""
        oparent, oname, onode = self.parent(old)
        if onode is None:
            raise OSError(errno.ENOENT, "no such file", old)
        nparent, nname, nnode = self.parent(new)
        if _parts(new) == _parts(old):
            return  # one dentry: the VFS does nothing
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

    def open(self, path: str, flags: int) -> int:
        node = self.node(path)
        if node.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EISDIR, "is a directory", path)
        return self.drv.open(node, flags)

    def setattr(self, path: str, **fields) -> Stat:
        return self.drv.setattr(self.node(path), **fields)

    def stat(self, path: str) -> Stat:
        return self.node(path).attr

    def readlink(self, path: str) -> str:
        return self.drv.readlink(self.node(path))

    def listdir(self, path: str) -> list[str]:
        node = self.node(path)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", path)
        return self.drv.readdir(node)
