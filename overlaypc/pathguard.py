"""Whether the paths a request made from the node table still name what they named.

Owns ``PathGuard`` and ``PathsMoved``. The adapter makes a request's layer paths from
its node table (``a/b/name`` from a parent nodeid), but the kernel holds only the
parent directory's lock for a request in it: a rename of a directory further up may run
between the path being made and the change being made with it, which would then act on
nothing (a spurious ENOENT) or on whatever took the old path meanwhile. Renames of
directories are counted (``moves``: the adapter's ``NodeTable.moves``, moved under the
namespace lock hold that moved the directory on disk). A request says at which count it
made its paths (``expect``: a plain call, a context manager's cost showed per request);
its first namespace change checks the count once it holds the namespace lock, before
changing anything, and raises ``PathsMoved`` if it moved: the request then makes its
paths again and starts over.

Caveat: only namespace changes check (``namespace.Namespace._changing``); LOOKUP checks
the count itself (``OverlayOps.lookup``), other requests (OPEN, SETATTR, GETATTR,
xattrs) still use their path unchecked.
"""
from __future__ import annotations

import threading
from collections.abc import Callable


class PathsMoved(Exception):
    """A directory above the request's paths was renamed after they were made: nothing
    was changed; make the paths again."""


class PathGuard:
    def __init__(self) -> None:
        #: the count of directory renames (set by the adapter); None: nothing checked
        self.moves: Callable[[], int] | None = None
        self._local = threading.local()

    def expect(self, count: int | None) -> None:
        """This thread's next ``check`` compares against ``count`` (None: none; a caller
        sets it back to None when its change is over, in a ``finally``)."""
        self._local.count = count

    def check(self) -> None:
        """Under the namespace lock, before a change: ``PathsMoved`` if a directory was
        renamed since this thread's ``expect``. Once per ``expect`` (a change's own later
        steps, which may rename, are not checked again)."""
        count = getattr(self._local, "count", None)
        if count is None or self.moves is None:
            return
        self._local.count = None
        if self.moves() != count:
            raise PathsMoved
