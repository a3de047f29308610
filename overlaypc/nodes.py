"""The kernel's view of overlay inodes: one nodeid per overlay inode it references.

Owns ``NodeTable``: nodeids (from a counter, never reused; the root is
``protocol.ROOT_ID``), each node's identity (``inodes.InodeKey``, which already applies
the kernel's hard-link rule: each name of a lower hard link is its own inode in a
writable mount without index, one inode otherwise), its lookup count (the kernel's
``nlookup``), whether it is a directory, its current names as (parent nodeid, name), and
the open handles of it. Two indexes: key -> nodeid and (parent nodeid, name) -> nodeid.

A node's merged path is its first remaining name joined to its parent's path, up to the
root (``""``). A name removed (unlink, rmdir, renamed over) leaves the node; a node with
no names left also leaves the key index (a later object reusing the backing inode must
not get its nodeid), unless the caller says other names of the object remain, but the
node itself stays until the kernel forgets it: an open, unlinked file is still used by
nodeid. Copy-up changes an object's key (``rekey``).

Bound: nodes live exactly as long as the kernel references them (``forget``); the
memory per node is measured in ``tests/test_nodes_unit.py``. One lock; every method is
safe from several worker threads. ``epoch`` counts the changes after which a key read
from disk earlier may name the wrong node (rekeys and removed names): a lookup that saw
it move retries.
"""
from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Hashable

from .engine.protocol import ROOT_ID

Name = tuple[int, str]


class Node:
    """One node of the table (``__slots__``: there may be hundreds of thousands)."""
    __slots__ = ("nodeid", "key", "nlookup", "is_dir", "names", "fhs")

    def __init__(self, nodeid: int, key: Hashable, is_dir: bool) -> None:
        self.nodeid = nodeid
        self.key = key
        self.nlookup = 0
        self.is_dir = is_dir
        #: current names, the first one giving the path
        self.names: list[Name] = []
        #: open file handles of this node (None: none, the common case)
        self.fhs: set[int] | None = None

    def __repr__(self) -> str:
        return f"Node({self.nodeid}, {self.key!r}, nlookup={self.nlookup}, names={self.names})"


class NodeTable:
    def __init__(self, root_key: Hashable) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(ROOT_ID + 1)
        root = Node(ROOT_ID, root_key, True)
        root.nlookup = 1  # the kernel's reference from the mount; never dropped
        self._nodes: dict[int, Node] = {ROOT_ID: root}
        self._by_key: dict[Hashable, int] = {root_key: ROOT_ID}
        self._by_name: dict[Name, int] = {}
        self.epoch = 0

    # -- references ------------------------------------------------------------------------
    def take(self, key: Hashable, parent: int, name: str, is_dir: bool) -> int:
        """The node of the object ``key`` found at (``parent``, ``name``), created if new,
        with one more kernel reference and that name recorded."""
        with self._lock:
            nodeid = self._by_key.get(key)
            if nodeid is None:
                nodeid = next(self._ids)
                node = Node(nodeid, key, is_dir)
                self._nodes[nodeid] = node
                self._by_key[key] = nodeid
            else:
                node = self._nodes[nodeid]
            where = (parent, name)
            holder = self._by_name.get(where)
            if holder != nodeid:
                if holder is not None:  # the name now names another object
                    self._drop_name(self._nodes[holder], where, keep_key=False)
                node.names.append(where)
                self._by_name[where] = nodeid
            node.nlookup += 1
            return nodeid

    def ref(self, nodeid: int) -> bool:
        """One more kernel reference to a node the name index gave; False if it is gone."""
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None:
                return False
            node.nlookup += 1
            return True

    def forget(self, nodeid: int, count: int) -> None:
        """The kernel dropped ``count`` references; at 0 the node leaves (the root never)."""
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None or nodeid == ROOT_ID:
                return
            node.nlookup -= count
            if node.nlookup > 0:
                return
            del self._nodes[nodeid]
            for where in node.names:
                if self._by_name.get(where) == nodeid:
                    del self._by_name[where]
            if self._by_key.get(node.key) == nodeid:
                del self._by_key[node.key]

    # -- names -------------------------------------------------------------------------------
    def _drop_name(self, node: Node, where: Name, *, keep_key: bool) -> None:
        try:
            node.names.remove(where)
        except ValueError:
            pass
        if self._by_name.get(where) == node.nodeid:
            del self._by_name[where]
        if not node.names and not keep_key and self._by_key.get(node.key) == node.nodeid \
                and node.nodeid != ROOT_ID:
            del self._by_key[node.key]
        self.epoch += 1

    def unlink(self, parent: int, name: str, *, keep_key: bool = False) -> int | None:
        """The name (``parent``, ``name``) is gone (unlink, rmdir). ``keep_key``: other
        names of the object remain on disk (a hard link), so it keeps its nodeid even
        with no name known. Returns the node that had the name, if any."""
        with self._lock:
            nodeid = self._by_name.get((parent, name))
            if nodeid is not None:
                self._drop_name(self._nodes[nodeid], (parent, name), keep_key=keep_key)
            return nodeid

    def rename(self, parent: int, name: str, new_parent: int, new_name: str, *,
               keep_key: bool = False) -> None:
        """A plain rename: the node at the new name (if any) loses it (``keep_key`` as in
        ``unlink``), the moved node's name changes in place."""
        old, new = (parent, name), (new_parent, new_name)
        if old == new:
            return
        with self._lock:
            target = self._by_name.get(new)
            moved = self._by_name.get(old)
            if target is not None and target != moved:
                self._drop_name(self._nodes[target], new, keep_key=keep_key)
            if moved is None:
                self._by_name.pop(new, None)
                return
            node = self._nodes[moved]
            del self._by_name[old]
            if new in node.names:  # two names of one node: the VFS renames nothing, but be safe
                node.names.remove(old)
            else:
                node.names[node.names.index(old)] = new
            self._by_name[new] = moved
            self.epoch += 1

    def rekey(self, old: Hashable, new: Hashable) -> None:
        """Copy-up: the object that was ``old`` is now ``new``."""
        if old == new:
            return
        with self._lock:
            nodeid = self._by_key.get(old)
            if nodeid is None:
                return
            del self._by_key[old]
            self._nodes[nodeid].key = new
            self._by_key.setdefault(new, nodeid)
            self.epoch += 1

    # -- queries ----------------------------------------------------------------------------
    def node(self, nodeid: int) -> Node:
        node = self._nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, f"unknown nodeid {nodeid}")
        return node

    def path(self, nodeid: int) -> str | None:
        """The merged path of a node: its first name whose directories are all still
        known, up to the root; None when there is none. A name in a directory the
        kernel has forgotten (it evicts dentries without telling us) is dropped here.
        Raises ESTALE for an unknown nodeid."""
        with self._lock:
            node = self.node(nodeid)
            if nodeid == ROOT_ID:
                return ""
            for where in list(node.names):
                parts = self._walk(where)
                if parts is not None:
                    return "/".join(reversed(parts))
                if self._nodes.get(where[0]) is None:
                    node.names.remove(where)
                    if self._by_name.get(where) == nodeid:
                        del self._by_name[where]
            return None

    def _walk(self, where: Name) -> list[str] | None:
        """Names from ``where`` up to the root (lock held), or None if a directory on
        the way is gone or nameless. Directories have one name each."""
        parts = [where[1]]
        parent = self._nodes.get(where[0])
        while parent is not None and parent.nodeid != ROOT_ID:
            if not parent.names or len(parts) > 1 << 20:
                return None
            up, name = parent.names[0]
            parts.append(name)
            parent = self._nodes.get(up)
        return parts if parent is not None else None

    def named_elsewhere(self, nodeid: int) -> bool:
        """Whether the object has names on disk that the table may not know (its key
        was kept when its last known name went, see ``unlink``)."""
        with self._lock:
            node = self.node(nodeid)
            return bool(node.names) or self._by_key.get(node.key) == nodeid

    def names(self, nodeid: int) -> list[Name]:
        with self._lock:
            return list(self.node(nodeid).names)

    def child(self, parent: int, name: str) -> int | None:
        return self._by_name.get((parent, name))

    def by_key(self, key: Hashable) -> int | None:
        return self._by_key.get(key)

    def nlookup(self, nodeid: int) -> int:
        with self._lock:
            node = self._nodes.get(nodeid)
            return 0 if node is None else node.nlookup

    def __contains__(self, nodeid: int) -> bool:
        return nodeid in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    # -- open handles -------------------------------------------------------------------------
    def opened(self, nodeid: int, fh: int) -> None:
        with self._lock:
            node = self.node(nodeid)
            if node.fhs is None:
                node.fhs = set()
            node.fhs.add(fh)

    def closed(self, nodeid: int, fh: int) -> None:
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is not None and node.fhs is not None:
                node.fhs.discard(fh)
                if not node.fhs:
                    node.fhs = None

    def handles(self, nodeid: int) -> list[int]:
        with self._lock:
            node = self._nodes.get(nodeid)
            return sorted(node.fhs) if node is not None and node.fhs else []
