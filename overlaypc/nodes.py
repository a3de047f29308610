"""The kernel's view of overlay inodes: one nodeid per overlay inode it references.

Owns ``NodeTable``: nodeids (from a counter, never reused; the root is
``protocol.ROOT_ID``), each node's identity (``inodes.InodeKey``, which already applies
the kernel's hard-link rule: each name of a lower hard link is its own inode in a
writable mount without index, one inode otherwise), its lookup count (the kernel's
``nlookup``), whether it is a directory, its current names as (parent nodeid, name), and
the open handles of it. Two indexes: key -> nodeid and (parent nodeid, name) -> nodeid.

A node's merged path is its first remaining name joined to its parent's path, up to the
root (``""``). A directory keeps the path it was last given (``Node.dir_path``) while no
directory's name changed since (``_dirs_gen``: bumped when a directory loses or changes
a name or leaves the table with one): every LOOKUP, GETATTR and OPEN asks for a path, and the walk
up to the root cost 0.6-1.2 us at depths 1-8. A file's name change moves no other path.
A name removed (unlink, rmdir, renamed over) leaves the node; a node with no names left
(names in directories the kernel forgot count as none) also leaves the key index (a later
object reusing the backing inode must not get its nodeid), unless the caller says other
names of the object remain, but the node itself stays until the kernel forgets it: an
open, unlinked file is still used by nodeid. A file made by O_TMPFILE starts with none
(``take_unnamed``: in the key index only, so a LINK's ``take`` finds it) and leaves the
key index when its last fd closes unlinked (``dying``, before the close frees the number). A directory has one name (the kernel's
``d_splice_alias`` moves its dentry): one found at a new name loses the others. Copy-up changes an object's key (``rekey``).

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
from collections.abc import Hashable, Iterable

from .engine.protocol import ROOT_ID

Name = tuple[int, str]
#: the longest directory path a node keeps (``Node.dir_path``); longer ones are walked
_KEPT_PATH = 4096


class Node:
    """One node of the table (``__slots__``: there may be hundreds of thousands)."""
    __slots__ = ("nodeid", "key", "nlookup", "is_dir", "names", "fhs", "dir_path", "gone", "prot")

    def __init__(self, nodeid: int, key: Hashable, is_dir: bool, names: "list[Name]",
                 nlookup: int) -> None:
        self.nodeid = nodeid
        self.key = key
        self.nlookup = nlookup
        self.is_dir = is_dir
        #: current names, the first one giving the path
        self.names = names
        #: open file handles of this node (None: none, the common case)
        self.fhs: set[int] | None = None
        #: a directory's path as last walked: (``NodeTable._dirs_gen`` then, path)
        self.dir_path: tuple[int, str] | None = None
        #: a directory whose last name went (rmdir, a rename over it): what it keeps while
        #: the kernel still holds it (opaque here; ``nameless.GoneDir``: its attributes then
        #: and the fd its changes go through), released at FORGET; None otherwise
        self.gone: object | None = None
        #: the immutable/append-only flags (``protattr``) the adapter enforces on changes of
        #: the node itself (SETATTR, SETXATTR, REMOVEXATTR, OPEN for writing): -1 until a
        #: change asks (``OverlayOps._protected``), 0 for what a creation made; a short path
        #: of those requests must check it too (and fall back while it is -1)
        self.prot = -1

    def __repr__(self) -> str:
        return f"Node({self.nodeid}, {self.key!r}, nlookup={self.nlookup}, names={self.names})"


class NodeTable:
    def __init__(self, root_key: Hashable) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(ROOT_ID + 1)
        root = Node(ROOT_ID, root_key, True, [], 1)  # (the mount's reference: never dropped)
        self._nodes: dict[int, Node] = {ROOT_ID: root}
        self._by_key: dict[Hashable, int] = {root_key: ROOT_ID}
        self._by_name: dict[Name, int] = {}
        self.epoch = 0
        #: moves when a directory's name goes or changes or a directory leaves the table:
        #: the directories' kept paths (``Node.dir_path``) from before are void
        self._dirs_gen = 0

    # -- references ------------------------------------------------------------------------
    def take(self, key: Hashable, parent: int, name: str, is_dir: bool,
             linked: int | None = None, prot: int = -1) -> int:
        """The node of the object ``key`` found at (``parent``, ``name``), created if new,
        with one more kernel reference and that name recorded. ``linked``: the node a
        LINK of a node with no name names (its file held open by the LINK), taken back
        into the key index if ``dying`` took it out (its last handle's RELEASE racing the
        LINK, review27): the kernel links that inode, not a new one. ``prot``: its
        immutable/append-only flags where the caller knows them (``Node.prot``), kept if
        the node had none known."""
        with self._lock:
            nodeid = self._by_key.get(key)
            if nodeid is None and linked is not None:
                node = self._nodes.get(linked)
                if node is not None and node.key == key:
                    nodeid = self._by_key[key] = linked
            if nodeid is None:
                nodeid = next(self._ids)
                node = Node(nodeid, key, is_dir, [], 0)
                self._nodes[nodeid] = node
                self._by_key[key] = nodeid
            else:
                node = self._nodes[nodeid]
            where = (parent, name)
            holder = self._by_name.get(where)
            if holder != nodeid:
                if holder is not None:  # the name now names another object
                    self._drop_name(self._nodes[holder], where, keep_key=False)
                if is_dir and node.names:
                    self._one_dir_name(node)
                node.names.append(where)
                self._by_name[where] = nodeid
            node.nlookup += 1
            if node.prot < 0:
                node.prot = prot
            return nodeid

    def take_unnamed(self, key: Hashable) -> int:
        """A new node for the file ``key`` made without a name (O_TMPFILE), with one kernel
        reference: reached by nodeid only (through its open handles) until a LINK names
        it, whose ``take`` of the key then gives this node. A node the key index held
        (one left behind by a change outside the mount) gives up the key: the object
        with that identity is this new file."""
        with self._lock:
            nodeid = next(self._ids)
            self._nodes[nodeid] = Node(nodeid, key, False, [], 1)
            self._by_key[key] = nodeid
            return nodeid

    def _one_dir_name(self, node: Node) -> None:
        """Directory ``node``, found at a new name, loses its others (lock held): the
        kernel keeps one dentry of a directory (``d_splice_alias`` moves it). The other is
        stale: in a directory node the kernel forgot (its FORGET ran before the child's, on
        another worker thread, and it was looked up again under a new nodeid), or changed
        behind the mount's back. Kept, it would keep the key when the current name goes, and
        a directory made next on the same inode number would get this nodeid (hunt9)."""
        for old in node.names:
            if self._by_name.get(old) == node.nodeid:
                del self._by_name[old]
        node.names.clear()
        self._dirs_gen += 1  # (no key moved: ``epoch`` stays)

    def take_listed(self, parent: int, listed: list[tuple[str, Hashable, bool]],
                    epoch: int | None) -> list[int]:
        """READDIRPLUS, one reply's entries under one lock hold: for each (name, key,
        is_dir) listed in directory ``parent``, one more reference to the node the name
        names already, else, if the table's epoch is still ``epoch``, ``take``'s; 0 where
        neither (the key may be stale: the caller looks the name up)."""
        out: list[int] = []
        append = out.append
        nodes, by_name, by_key, new_id = self._nodes, self._by_name, self._by_key, self._ids.__next__
        with self._lock:
            fresh = self.epoch == epoch  # (nothing below moves it)
            for name, key, is_dir in listed:
                where = (parent, name)
                holder = by_name.get(where)
                if holder is not None:
                    node = nodes.get(holder)
                    if node is not None:
                        node.nlookup += 1
                        append(holder)
                        continue
                if not fresh:
                    append(0)
                    continue
                nodeid = by_key.get(key)
                if nodeid is None:  # (a new node: its one name and reference)
                    nodeid = new_id()
                    nodes[nodeid] = Node(nodeid, key, is_dir, [where], 1)
                    by_key[key] = nodeid
                    by_name[where] = nodeid
                    append(nodeid)
                    continue
                node = nodes[nodeid]
                if holder != nodeid:  # (``forget`` leaves no name of a node gone)
                    if is_dir and node.names:
                        self._one_dir_name(node)
                    node.names.append(where)
                    by_name[where] = nodeid
                node.nlookup += 1
                append(nodeid)
        return out

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
            if node.nlookup <= 0:
                self._leave(nodeid, node)

    def forget_all(self, pairs: "Iterable[tuple[int, int]]") -> None:
        """``forget`` of each (nodeid, count), in order, under one lock hold (a
        BATCH_FORGET: the kernel's queued forgets, thousands after a cache drop); each
        node that leaves, as ``_leave`` (inlined: one per pair after a cache drop)."""
        nodes, by_name, by_key = self._nodes, self._by_name, self._by_key
        with self._lock:
            for nodeid, count in pairs:
                node = nodes.get(nodeid)
                if node is None or nodeid == ROOT_ID:
                    continue
                node.nlookup -= count
                if node.nlookup > 0:
                    continue
                del nodes[nodeid]
                names = node.names
                if names:
                    if node.is_dir:
                        self._dirs_gen += 1
                    for where in names:
                        if by_name.get(where) == nodeid:
                            del by_name[where]
                if by_key.get(node.key) == nodeid:
                    del by_key[node.key]

    def _leave(self, nodeid: int, node: Node) -> None:
        """A node the kernel no longer references leaves the table (lock held). A
        directory's leaving voids the kept paths (``_dirs_gen``) only while it has a name:
        one that lost its last (an ``rm -rf``'s RMDIR before its FORGET) is on no kept path
        since, as that loss moved ``_dirs_gen`` and a walk through a nameless directory
        keeps nothing (``forget_all`` inlines this)."""
        del self._nodes[nodeid]
        names = node.names
        if names:
            if node.is_dir:  # the names below it no longer resolve
                self._dirs_gen += 1
            for where in names:
                if self._by_name.get(where) == nodeid:
                    del self._by_name[where]
        if self._by_key.get(node.key) == nodeid:
            del self._by_key[node.key]

    # -- names -------------------------------------------------------------------------------
    def _drop_name(self, node: Node, where: Name, *, keep_key: bool,
                   gone: object | None = None) -> None:
        names, nodeid, by_name = node.names, node.nodeid, self._by_name
        if len(names) == 1 and names[0] == where:  # (its one name: an unlink's common case)
            del names[0]
        else:
            try:
                names.remove(where)
            except ValueError:
                pass
            if names:  # names in directories the kernel forgot are no names (see ``path``)
                for stale in [n for n in names if n[0] not in self._nodes]:
                    names.remove(stale)
                    if by_name.get(stale) == nodeid:
                        del by_name[stale]
        if not names and node.is_dir and gone is not None:
            node.gone = gone
        if by_name.get(where) == nodeid:
            del by_name[where]
        if not names and not keep_key and nodeid != ROOT_ID \
                and self._by_key.get(node.key) == nodeid:
            del self._by_key[node.key]
        if node.is_dir:
            self._dirs_gen += 1
        self.epoch += 1

    def unlink(self, parent: int, name: str, *, keep_key: bool = False,
               gone: object | None = None) -> int | None:
        """The name (``parent``, ``name``) is gone (unlink, rmdir). ``keep_key``: other
        names of the object remain on disk (a hard link), so it keeps its nodeid even
        with no name known. ``gone``: what a removed directory keeps (``Node.gone``).
        Returns the node that had the name, if any."""
        with self._lock:
            nodeid = self._by_name.get((parent, name))
            if nodeid is not None:
                self._drop_name(self._nodes[nodeid], (parent, name), keep_key=keep_key,
                                gone=gone)
            return nodeid

    def rename(self, parent: int, name: str, new_parent: int, new_name: str, *,
               keep_key: bool = False, gone: object | None = None) -> None:
        """A plain rename: the node at the new name (if any) loses it (``keep_key`` and
        ``gone`` as in ``unlink``), the moved node's name changes in place."""
        old, new = (parent, name), (new_parent, new_name)
        if old == new:
            return
        with self._lock:
            target = self._by_name.get(new)
            moved = self._by_name.get(old)
            if target is not None and target != moved:
                self._drop_name(self._nodes[target], new, keep_key=keep_key, gone=gone)
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
            if node.is_dir:  # (paths below it made before are stale: ``pathguard``)
                self._dirs_gen += 1
            self.epoch += 1

    def rekey(self, old: Hashable, new: Hashable) -> int | None:
        """Copy-up: the object that was ``old`` is now ``new``; its nodeid, if the
        kernel holds one."""
        if old == new:
            with self._lock:
                return self._by_key.get(old)
        with self._lock:
            # the epoch moves even when no node has ``old``: a lookup that read the layers
            # before the copy-up may be about to register one under it, and must look again
            self.epoch += 1
            nodeid = self._by_key.get(old)
            if nodeid is None:
                return None
            del self._by_key[old]
            self._nodes[nodeid].key = new
            self._by_key.setdefault(new, nodeid)
            return nodeid

    def dying(self, nodeid: int) -> None:
        """The file of a node with no name is about to be freed (its last fd closes:
        an O_TMPFILE file never linked): the node leaves the key index now, not at its
        FORGET, or a file made meanwhile on the freed inode number would get its nodeid."""
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None or node.names or nodeid == ROOT_ID:
                return
            if self._by_key.get(node.key) == nodeid:
                del self._by_key[node.key]
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
            node = self._nodes.get(nodeid)
            if node is None:
                raise OSError(errno.ESTALE, f"unknown nodeid {nodeid}")
            if nodeid == ROOT_ID:
                return ""
            names = node.names
            for where in names if len(names) == 1 else list(names):  # (a copy: may drop)
                up = self._dir_path(where[0])
                if up is not None:
                    return f"{up}/{where[1]}" if up else where[1]
                if self._nodes.get(where[0]) is None:
                    node.names.remove(where)
                    if self._by_name.get(where) == nodeid:
                        del self._by_name[where]
                    if node.is_dir:
                        self._dirs_gen += 1
            return None

    def dir_path(self, nodeid: int) -> str | None:
        """``path`` of a directory's node, when its one name and the directories above are
        known (its kept path, else walked and kept: ``_dir_path``); None otherwise, and for
        a node not a directory (ask ``path``, which also drops names the kernel forgot)."""
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None or not node.is_dir:
                return None
            kept = node.dir_path
            if kept is not None and kept[0] == self._dirs_gen:
                return kept[1]
            return self._dir_path(nodeid)

    def file_path(self, nodeid: int) -> str | None:
        """``path`` of a node, first for its common case without the walk's call: one name,
        in a directory whose path is kept (``_dir_path``'s ``dir_path``) or in the root;
        anything else is ``path``'s (the same answer, ESTALE for an unknown node)."""
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is not None and nodeid != ROOT_ID and len(node.names) == 1:
                up, name = node.names[0]
                if up == ROOT_ID:
                    return name
                parent = self._nodes.get(up)
                kept = None if parent is None else parent.dir_path
                if kept is not None and kept[0] == self._dirs_gen:
                    return f"{kept[1]}/{name}" if kept[1] else name
        return self.path(nodeid)

    def _dir_path(self, nodeid: int) -> str | None:
        """The path of the directory ``nodeid`` (lock held) by first names up to the root
        (directories have one name each), or None if it or a directory on the way is gone
        or nameless. Kept on the node while ``_dirs_gen`` stays (not for a path longer
        than ``_KEPT_PATH``: a tree thousands of levels deep would keep O(depth²) bytes)."""
        node = self._nodes.get(nodeid)
        if node is None:
            return None
        if nodeid == ROOT_ID:
            return ""
        kept = node.dir_path
        if kept is not None and kept[0] == self._dirs_gen:
            return kept[1]
        parts = []
        keep = node.is_dir
        walked = node
        while walked.nodeid != ROOT_ID:
            if not walked.names or len(parts) > 1 << 20:
                return None
            up, name = walked.names[0]
            parts.append(name)
            keep = keep and walked.is_dir
            walked = self._nodes.get(up)
            if walked is None:
                return None
        path = "/".join(reversed(parts))
        if keep and len(path) <= _KEPT_PATH:  # (only directories' names move _dirs_gen)
            node.dir_path = (self._dirs_gen, path)
        return path

    def named_elsewhere(self, nodeid: int) -> bool:
        """Whether the object has names on disk that the table may not know (its key
        was kept when its last known name went, see ``unlink``)."""
        with self._lock:
            node = self.node(nodeid)
            return bool(node.names) or self._by_key.get(node.key) == nodeid

    def gone(self, nodeid: int) -> object | None:
        """What a removed directory keeps (``Node.gone``), else None."""
        return self.node(nodeid).gone

    def has_names(self, nodeid: int) -> bool:
        """Whether a node has a name (True for an unknown one: nothing to do for it)."""
        node = self._nodes.get(nodeid)
        return node is None or bool(node.names)

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

    def first_handle(self, nodeid: int) -> int | None:
        """``handles(nodeid)[0]`` (the one a request by node tries first), None for none."""
        with self._lock:
            node = self._nodes.get(nodeid)
            return min(node.fhs) if node is not None and node.fhs else None

    def named_open(self, nodeid: int) -> tuple[int, Hashable] | None:
        """``first_handle`` and the key of a node that also has a name (the short SETATTR
        of an open file); None for a node without a name or without a handle, and for one
        whose immutable/append-only flags are set or not known yet (``Node.prot``: the
        generic SETATTR checks them)."""
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None or not node.names or not node.fhs or node.prot:
                return None
            return min(node.fhs), node.key
