"""Overlay inode numbers for merged objects (DESIGN.md §4).

Owns: ``ino_of(node)``. Rules, mirroring the kernel's:
  * a copied-up object keeps the number it had on the lower layer, so copy-up and
    remount change nothing: overlaypc records it at copy-up in
    ``trusted.overlay.overlaypc.ino``; an object copied up by the kernel's overlay has only
    ``trusted.overlay.origin``, whose file handle is opened (``open_by_handle_at``, only
    to ``fstat`` it) on the lower filesystem with the same UUID;
  * a directory present in upper and a lower without either xattr takes the topmost
    lower's number;
  * anything else takes its own layer's real inode number;
  * each real number is mapped through the stack's ``xino`` scheme, so layers on
    different filesystems never collide.
Reading the xattrs costs syscalls; results are cached by (dev, ino, ctime), which
changes whenever the object does, so a reused inode number can never hit a stale entry.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

from . import sysapi, whiteout
from .lookup import Entry, Node
from .stack import LayerStack


class InodeNumbers:
    def __init__(self, stack: LayerStack, prefix: str, limit: int = 65536) -> None:
        self.xino = stack.xino
        self.xattr = whiteout.own_xattr(prefix, "ino")
        self.origin_xattr = prefix + "origin"
        self._by_uuid: dict[bytes, list] = {}
        for layer in stack.lowers:  # a null UUID (as the kernel writes on some filesystems) too
            self._by_uuid.setdefault(layer.uuid, []).append(layer)
        self._cache: OrderedDict[tuple[int, int, int], int | None] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def recorded(self, entry: Entry) -> int | None:
        """The number an upper object had before copy-up, if it records one."""
        st = entry.st
        key = (st.st_dev, st.st_ino, st.st_ctime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        raw = entry.layer.getxattr(entry.rel, self.xattr)
        value = int(raw) if raw and raw.isdigit() else self._from_origin(entry)
        with self._lock:
            self._cache[key] = value
            if len(self._cache) > self._limit:
                self._cache.popitem(last=False)
        return value

    def _from_origin(self, entry: Entry) -> int | None:
        raw = entry.layer.getxattr(entry.rel, self.origin_xattr)
        parsed = sysapi.parse_ovl_origin(raw) if raw else None
        if parsed is None:
            return None
        uuid, handle_type, fid = parsed
        seen_devs = set()
        for layer in self._by_uuid.get(uuid, ()):
            if layer.dev in seen_devs:
                continue
            seen_devs.add(layer.dev)
            try:
                fd = sysapi.open_by_handle(layer.mount_fd, handle_type, fid)
            except OSError:
                continue  # stale or foreign handle: the kernel ignores it too
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            return self.xino.ino(st.st_dev, st.st_ino)
        return None

    def of_entry(self, entry: Entry) -> int:
        return self.xino.ino(entry.st.st_dev, entry.st.st_ino)

    def ino_of(self, node: Node, lower_dir: Entry | None = None) -> int:
        """``st_ino`` of ``node``; ``lower_dir`` stands in for ``node.lowers[0]`` when known."""
        top = node.top
        if top.layer.writable:
            recorded = self.recorded(top)
            if recorded is not None:
                return recorded
            if top.is_dir:
                lower = lower_dir or next(iter(node.lowers), None)
                if lower is not None:
                    return self.of_entry(lower)
        return self.of_entry(top)
