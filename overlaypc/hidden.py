"""Open files whose last name was removed: libfuse's ``.fuse_hidden*`` renames, virtualized.

Owns: the names libfuse's high-level API gives to open files that are unlinked (or
renamed over). Without ``hard_remove`` libfuse renames such a file to
``DIR/.fuse_hiddenXXXXXXXXXXXXXXXX`` and unlinks that name at the last release; with
``hard_remove`` it forgets the path instead, and then ``fstat`` of the open file fails
with ESTALE, since the kernel's GETATTR carries no file handle (docs/ARCHITECTURE.md §6 trap 10 said
otherwise; the coherence tests showed this).

So overlaypc mounts without ``hard_remove`` and treats a rename to a name of exactly that
form as an unlink: the overlay name goes (whiteout and all, as for any unlink) and the
hidden name is only a key in this table, pointing at the overlay inode, which its open
handles keep alive. libfuse may hide a file whose last release is in flight (it counts
the file open until our release returns); then no inode is live and the key points at
nothing: ``fstat`` needs nothing then, and the name is never shown either way. Nothing named ``.fuse_hidden*`` is ever written
to a layer, listed, or left behind by a crash; ``fstat`` reports ``st_nlink`` 0.
"""
from __future__ import annotations

import re
import threading

from .inodes import OverlayInode
from .layer import split

_HIDDEN = re.compile(r"\.fuse_hidden[0-9a-f]{16}")


def is_hidden_name(rel: str) -> bool:
    return _HIDDEN.fullmatch(split(rel)[1]) is not None


class HiddenNames:
    def __init__(self) -> None:
        self._names: dict[str, OverlayInode | None] = {}
        self._lock = threading.Lock()

    def add(self, rel: str, inode: OverlayInode | None) -> None:
        with self._lock:
            self._names[rel] = inode

    def __contains__(self, rel: str) -> bool:
        return rel in self._names

    def get(self, rel: str) -> OverlayInode | None:
        return self._names.get(rel)

    def pop(self, rel: str) -> OverlayInode | None:
        with self._lock:
            return self._names.pop(rel, None)

    def moved(self, old: str, new: str) -> None:
        """A directory was renamed: hidden names below it move along."""
        with self._lock:
            for rel in [r for r in self._names if r.startswith(old + "/")]:
                self._names[new + rel[len(old):]] = self._names.pop(rel)
