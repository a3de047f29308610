"""Lookup of merged paths across the layer stack.

Owns: turning a merged path into a ``Node``: which layers hold it (top first), its
type, whether it is opaque, and whether the upper holds a whiteout at its name.
Rules, as the kernel's ``namei.c``: the search goes top-down through the layers in
which the parent directory exists; a whiteout stops it; so does an opaque directory
(after including it) and any non-directory (a lower non-directory below a directory
is ignored). OCI whiteouts (``.wh.NAME``) and opaque markers count in lower layers.

Caveats: the structure of directories (which layers hold them) is cached and dropped
whenever the namespace changes (an epoch counter, so a lookup racing a change never
stores a stale entry); stat data of the final component is always read fresh.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass

from . import whiteout
from .layer import Layer, join, split
from .stack import LayerStack

NAME_MAX = 255


@dataclass(frozen=True)
class Entry:
    """One layer's object at a merged path."""
    layer: Layer
    rel: str
    st: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


@dataclass(frozen=True)
class Node:
    """The merged object at ``rel``: its entries top first (empty when absent)."""
    rel: str
    entries: tuple[Entry, ...]
    opaque: bool = False
    upper_whiteout: bool = False
    #: metacopy: the lower entry holding the data of an upper metadata-only copy
    data: Entry | None = None

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

    @property
    def has_lower(self) -> bool:
        """Whether any lower layer holds (or held, under a whiteout) something here."""
        return bool(self.lowers) or self.upper_whiteout

    @property
    def is_merged_dir(self) -> bool:
        return self.is_dir and len(self.entries) > 1


def check_name(rel: str) -> None:
    for part in rel.split("/"):
        if len(os.fsencode(part)) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "file name too long", rel)


class Lookup:
    def __init__(self, stack: LayerStack, xattr_prefix: str, cache_entries: int = 8192, *,
                 follow_redirects: bool = False, follow_metacopy: bool = False) -> None:
        self.stack = stack
        self.prefix = xattr_prefix
        self.follow_redirects = follow_redirects
        self.index = None  # an index.IndexDir under -o index=on
        self.follow_metacopy = follow_metacopy
        self._epoch = 0
        self._dirs: OrderedDict[str, tuple[int, Node]] = OrderedDict()
        self._limit = cache_entries
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """Forget cached directory structure; call after every namespace change."""
        with self._lock:
            self._epoch += 1
            self._dirs.clear()

    def _root(self) -> Node:
        entries = []
        for layer in self.stack.layers:
            st = layer.lstat("")
            assert st is not None
            entries.append(Entry(layer, "", st))
            # an opaque root is meaningless to the kernel too: all roots merge
        return Node("", tuple(entries))

    def directory(self, rel: str) -> Node:
        """The merged directory at ``rel``; ENOENT/ENOTDIR when it is not one."""
        if not rel:
            return self._root()
        with self._lock:
            hit = self._dirs.get(rel)
            epoch = self._epoch
        if hit is not None and hit[0] == epoch:
            return hit[1]
        node = self.lookup(rel)
        if not node.exists:
            raise OSError(errno.ENOENT, "no such directory", rel)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", rel)
        with self._lock:
            if epoch == self._epoch:
                self._dirs[rel] = (epoch, node)
                if len(self._dirs) > self._limit:
                    self._dirs.popitem(last=False)
        return node

    def lookup(self, rel: str) -> Node:
        """The merged object at ``rel`` (``Node.exists`` is False when absent)."""
        if not rel:
            return self._root()
        parent_rel, name = split(rel)
        if whiteout.is_oci_name(name):
            return Node(rel, ())
        parent = self.directory(parent_rel)
        # where the parent lives in each layer (its path there may differ: redirects)
        parent_in = {id(p.layer): p.rel for p in parent.entries if p.is_dir}
        entries: list[Entry] = []
        opaque = upper_whiteout = False
        data: Entry | None = None
        redirect: str | None = None  # layer path to use in the layers below, once redirected
        metacopy = False
        for layer in self.stack.layers:
            if redirect is not None:
                lrel = redirect
            elif id(layer) in parent_in:
                lrel = join(parent_in[id(layer)], name)
            else:
                continue
            st = layer.lstat(lrel)
            if st is None:
                if not layer.writable and whiteout.has_oci_whiteout(layer, lrel):
                    break
                continue
            if whiteout.is_whiteout(st):
                upper_whiteout = upper_whiteout or layer.writable
                break
            is_dir = stat.S_ISDIR(st.st_mode)
            if metacopy:
                if stat.S_ISREG(st.st_mode):
                    data = Entry(layer, lrel, st)
                break
            if entries and not is_dir:
                break  # a lower non-directory below a directory is not merged
            entries.append(Entry(layer, lrel, st))
            if is_dir:
                if whiteout.is_opaque(layer, lrel, self.prefix, oci=not layer.writable):
                    opaque = True
                    break
            elif not (self.follow_metacopy and stat.S_ISREG(st.st_mode)
                      and layer.getxattr(lrel, self.prefix + "metacopy") is not None):
                break
            else:
                metacopy = True  # attributes here, data further down
            target = self._redirect(layer, lrel) if self.follow_redirects else None
            if target is not None:
                if target.startswith("/"):
                    redirect = target.strip("/")  # absolute: from each lower layer's root
                else:
                    redirect, name = None, target  # relative: same parent, other name
        if self.index is not None and entries and not entries[0].layer.writable \
                and self.index.eligible(entries[0]):
            shared = self.index.find(entries[0])
            if shared is not None:
                entries.insert(0, shared)
        if metacopy and data is None:
            raise OSError(errno.EIO, "data of metacopy file not found in lower layers", rel)
        return Node(rel, tuple(entries), opaque, upper_whiteout, data)

    def _redirect(self, layer: Layer, lrel: str) -> str | None:
        raw = layer.getxattr(lrel, self.prefix + "redirect")
        if not raw:
            return None
        target = os.fsdecode(raw)
        parts = [p for p in target.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            return None  # never let a redirect climb out of the layer
        if not target.startswith("/") and len(parts) != 1:
            return None  # a relative redirect is one name
        return target
