"""Whether the paths a request made from the node table still name what they named.

Owns ``PathGuard`` (the count of renames and removals, ``moves``) and ``PathsMoved``. The
adapter makes a request's layer paths from its node table (``a/b/name`` from a nodeid),
but the kernel holds only the locks of the parent directory (or of the node itself) for a
request: a rename of a directory further up may run between the path being made and the
layers being read or changed with it, which then act on nothing (a spurious ENOENT) or on
whatever took the old path meanwhile (another file chmodded, opened, truncated...).

The count, a sequence lock: a rename (``Namespace.rename``) makes it odd, under the
namespace lock, before it moves anything on disk, and even again once the move is done
and the adapter's node table followed (``moving``). Every rename counts, not only a
directory's (which makes the paths below it stale): the kernel holds no lock of a node
for its GETATTR or OPEN, so the node's own name may be renamed over meanwhile, and its
path then names the object that took it (an OPEN would open a file the kernel checked
no permission on: it checked the caller's on the node). So a request that read an even
count before making its paths and reads the same count after acting used paths
that named what they named when made, for the whole time; otherwise it may have acted on
a stale path. Three ways to use it (``OverlayOps``):

- namespace changes say at which count they made their paths (``expect``: a plain call, a
  context manager's cost showed per request); their first change checks the count once it
  holds the namespace lock, before changing anything (``check``), and raises
  ``PathsMoved``: the request makes its paths again and starts over (``_at_paths``), as
  after an error before that hold with the count moved (a lookup or copy-up of a stale
  path); the second time with its paths made and its change run in one namespace lock
  hold (the lock is reentrant), where a copy-up it needs runs if its stripe lock is free,
  else is refused (``CopyUp.refusing``: never waited for under the namespace lock) and run
  without the lock first;
- other changes by nodeid (SETATTR, SETXATTR, REMOVEXATTR, OPEN, OPENDIR) compare the count
  under the namespace lock themselves and act in that hold (``_at_node``); a copy-up they
  need runs first, without the lock (a copy-up takes its own lock, then the namespace lock),
  of whatever the path names then, and the request starts over; once a move landed, in
  the hold where the path is made if its stripe lock is free (``CopyUp.refusing``);
- reads (GETATTR, GETXATTR, LISTXATTR, READLINK, ACCESS, a listing) compare the count
  before and after, without a lock, and are redone when it moved (``_moved``: after waiting
  out a rename in progress); LOOKUP and the entry a change answers with register under the
  namespace lock and compare there (``_take``). A request redone once is redone under the
  namespace lock, where no rename can land: renames that keep coming, one in each
  attempt, would otherwise redo it for as long as they come.

Removals (unlink, rmdir) count too, from before their change on disk until the node
table dropped the name, in the same lock hold (as a rename's table update): a request
whose path was made from the table after the count went even again names what is there.
A copy-up started on a stale path copies up whatever
took it (the object that path names then): that changes no merged content, and the
request then starts over on its new path.
"""
from __future__ import annotations

import threading


class PathsMoved(Exception):
    """A directory above the request's paths was renamed after they were made: nothing
    was changed; make the paths again."""


class PathGuard:
    def __init__(self) -> None:
        #: renames and removals, twice each: odd while one is in progress (module doc);
        #: changed only under the namespace lock
        self.moves = 0
        self._local = threading.local()
        self._moving = _Moving(self)

    def moving(self) -> "_Moving":
        """Around a rename or a removal, under the namespace lock: from before anything
        moves on disk until the node table followed (a failed move counts as well). (A
        plain object, not a generator's context manager: one per UNLINK of an ``rm -rf``;
        one serves all, as it holds no state and the lock orders its users.)"""
        return self._moving

    def expect(self, count: int | None) -> None:
        """This thread's next ``check`` compares against ``count`` (None: none; a caller
        sets it back to None when its change is over, in a ``finally``)."""
        self._local.count = count

    def unchecked(self) -> bool:
        """Whether this thread's ``expect`` was not ``check``ed yet: a change that failed
        then failed before its namespace lock hold, on paths that may have been stale."""
        return getattr(self._local, "count", None) is not None

    def check(self) -> None:
        """Under the namespace lock, before a change: ``PathsMoved`` if a directory was
        renamed since this thread's ``expect`` (or was being renamed then). Once per
        ``expect`` (a change's own later steps, which may rename, are not checked again)."""
        count = getattr(self._local, "count", None)
        if count is None:
            return
        self._local.count = None
        if self.moves != count:
            raise PathsMoved


class _Moving:
    """``PathGuard.moving``'s context manager."""
    __slots__ = ("guard",)

    def __init__(self, guard: PathGuard) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        self.guard.moves += 1

    def __exit__(self, *exc: object) -> None:
        self.guard.moves += 1
