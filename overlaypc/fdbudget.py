"""The daemon's file-descriptor budget.

Owns: raising ``RLIMIT_NOFILE``'s soft limit to its hard limit at start (``raise_limit``),
one split of that limit between the caches that hold fds (``FdBudget``), and the fallback
when the limit is met anyway (``retrying``): every registered cache drops the fds it holds
and the open is tried once more, so an operation fails with EMFILE only when what no cache
can give back (open files, operations in flight, the extent map's canonical files, which a
read may be using and are bounded instead) uses up the limit. Lookups and listings, which
need an fd per layer a directory is merged across, then wait for other operations' fds
instead (``patiently``): one walk always fits (``mount_needs`` counts it, and open files
leave it room), several at once may not.

The budget, for a soft limit L (1024 by default on most systems, the hard limit after
``raise_limit``):
  * the lookup cache's directory fds: L/2, at most ``LOOKUP_CAP``;
  * the extent map's canonical files: L/16, at most ``SHARING_CAP``; it may keep as many
    again retired (an evicted fd may still be in a read), so it counts twice;
  * the rest, at least 3/8 of L, for what no cache holds: one fd per open file, the few
    fds an operation holds while it runs (a parent directory, a file being copied), the
    layer roots, the workers' cloned /dev/fuse fds (one per CPU, 8 more while requests
    block: ``engine/pool.py``), Python's own.
Inodes and handles hold fds only while a file is open (they are not caches), so they
count against the rest; and they are bounded (``FdBudget.open_files``): past
``limit - held - workers * (PER_REQUEST + 1) - LOOKUP_FLOOR`` fds for open files and the
extent map's canonical files (``held``: what the daemon had open when it started, the
layer roots and Python's own; ``workers``: the most worker threads, each with its cloned
``/dev/fuse`` fd), an OPEN or CREATE fails
with ENFILE (the file server's table is full) before it does anything. So a client that
holds as many files as the daemon's limit allows leaves every other request its fds: a
lookup, listing, rename or copy-up of another client never fails with EMFILE (hunt8a:
1,009 files held open through a daemon at ``ulimit -n 1024`` made every other client's
chmod, rename, mkdir and listing fail with EMFILE). The lookup cache then holds only what
the open files leave (``Lookup.fd_room``).

Caveats: a cache's fds close on the last reference to them, so the fds of operations in
flight outlive an eviction (a few per running operation). ENFILE (the system-wide limit)
gets the same fallback, though there the fds may be other processes'.
"""
from __future__ import annotations

import errno
import os
import resource
import threading
import time
from _weakrefset import WeakSet  # weakref.WeakSet itself: weakref.py adds ~0.7 ms to a start
from collections.abc import Callable

from . import logs
from .records import record
from .typing_lite import TYPE_CHECKING, Protocol

log = logs.get("overlaypc.fdbudget")

#: The lookup cache never holds more directory fds than this, whatever the limit: each
#: cached directory also costs memory (its stat results), about 1 KiB.
LOOKUP_CAP = 16384
#: Canonical files of the extent map (reads of shared extents), whatever the limit.
SHARING_CAP = 256
#: fds one running request may hold beside the open files and the caches: a copy-up's
#: source and target, their parents, a step of a path longer than PATH_MAX
PER_REQUEST = 6
#: the lookup cache keeps this many directory fds however many files are open
LOOKUP_FLOOR = 16
#: open files always get this many fds, however few the limit leaves (``open_files``)
OPEN_FILES_FLOOR = 16
#: fds a layer root holds for the life of the mount (``layer.Layer``: an O_PATH fd and a
#: normal one); upper and workdir hold one more each, their mount-exclusion lock
FDS_PER_LAYER = 2
#: fds a lookup holds in each layer it searches (lowers and upper) while it walks down a
#: directory merged across all of them (``lookup``): the directory's ``O_PATH`` fd and
#: its parent's, which the walk holds until the child is found. Counted for one walk:
#: walks that do not fit at once wait for each other's fds (``patiently``)
WALK_FDS_PER_LAYER = 2
#: worker threads ``OverlayFS`` reserves fds for when its caller does not say: the
#: engine's bound on 2 CPUs (one worker per CPU and 8 more, ``engine/pool.py``); a mount
#: passes the engine's own bound (``cli``), a core driven without the engine runs its
#: requests in its own threads
DEFAULT_WORKERS = 10

#: how long an operation that needs many fds at once (``patiently``: a lookup walking down a
#: directory merged across many layers, a listing of one) waits at the fd limit for other
#: operations to let theirs go before it fails with EMFILE
WAIT_SECONDS = 10.0
#: the longest sleep between two tries of a waiting operation
WAIT_STEP = 0.05

#: the errors of a process (or system) out of fds
EXHAUSTED = (errno.EMFILE, errno.ENFILE)
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")


@record(frozen=True)
class FdBudget:
    """How a process's fd limit is split: ``lookup`` + 2 * ``sharing`` + ``reserve``."""
    limit: int
    lookup: int
    sharing: int
    reserve: int

    @classmethod
    def from_limit(cls, limit: int) -> "FdBudget":
        lookup = max(1, min(limit // 2, LOOKUP_CAP))
        sharing = max(1, min(limit // 16, SHARING_CAP))
        return cls(limit, lookup, sharing, limit - lookup - 2 * sharing)

    def open_files(self, *, held: int, workers: int, walk: int = 0) -> int:
        """How many fds open files (handles, metacopy upper files, and the extent map's
        canonical files, counted twice) may hold: what is left when ``held`` fds are open,
        ``workers`` threads run a request each, a lookup walks down a directory merged
        across every layer (``walk``: ``WALK_FDS_PER_LAYER`` per searched layer) and the
        lookup cache keeps its floor; at least ``OPEN_FILES_FLOOR``. Without ``walk``,
        open files at their bound left no room for such a walk at a limit the mount check
        admits, and every lookup of such a directory failed with EMFILE (walk17)."""
        return max(OPEN_FILES_FLOOR,
                   self.limit - held - walk - workers * (PER_REQUEST + 1) - LOOKUP_FLOOR)

    @classmethod
    def for_process(cls) -> "FdBudget":
        """The budget of this process's current soft limit."""
        return cls.from_limit(soft_limit())


def mount_needs(layers: int, searched: int, locks: int, workers: int) -> int:
    """The fewest fds a mount of ``layers`` layer roots (upper and workdir included),
    ``searched`` of them searched by lookups (lowers and upper), and ``locks`` lock fds
    can work with: those, a lookup's walk down a directory merged across every searched
    layer (``WALK_FDS_PER_LAYER``), what this process has open now, and the least
    ``FdBudget.open_files`` works with (each worker's request, the lookup cache's floor,
    ``OPEN_FILES_FLOOR`` open files). A limit below it fails at start (EMFILE opening a
    layer), or later: a lookup of such a directory with EMFILE (review16: 100 lowers were
    admitted at 318 fds, and needed about 420). One walk is counted: lookups of such
    directories running at once need a walk's fds each, and past the limit they wait for
    each other (``patiently``: walk17, they answered EMFILE); open files leave a walk its
    fds (``FdBudget.open_files``). Requests hold no node across a lookup or copy-up that may
    wait (a rename keeps the old name's node without its fds, ``Node.without_fds``, while
    it looks the new name up; a link, an open for writing, a kill of privileges by path
    and a copy-up let go of theirs: stall20, limits23), so a rename between two such
    directories no longer holds one while it walks down the other. Caveat: a rename *over*
    such a directory holds it while it looks the source's parent up under the namespace
    lock (``lower_exists``), and may fail with EMFILE at the lowest admitted limit (at
    once: nothing waits for fds under that lock, ``unwaited_under``)."""
    return (FDS_PER_LAYER * layers + WALK_FDS_PER_LAYER * searched + locks + open_count()
            + workers * (PER_REQUEST + 1) + LOOKUP_FLOOR + OPEN_FILES_FLOOR)


def open_count() -> int:
    """How many fds this process has open now (one listing of /proc/self/fd)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # (less the listing's own)
    except OSError:
        return 16


def soft_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:  # not on Linux (fs.nr_open caps it), but be safe
        soft = hard if hard != resource.RLIM_INFINITY else 1 << 20
    return soft


def raise_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit now in force.
    The default soft limit (1024) exists for ``select(2)``, which the daemon never uses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:  # e.g. a hard limit above fs.nr_open
            log.warning("cannot raise the fd limit from %d to %d: %s", soft, hard, e)
    return soft_limit()


# -- the fallback -------------------------------------------------------------------------------
class FdCache(Protocol):
    def shed_fds(self) -> int:
        """Drop every cached fd (closed once no operation uses it); return how many."""


_caches: "WeakSet[FdCache]" = WeakSet()
_caches_lock = threading.Lock()
_warned = False


def register(cache: FdCache) -> None:
    """Let ``cache`` be emptied when the process runs out of fds (held weakly)."""
    with _caches_lock:
        _caches.add(cache)


def shed() -> int:
    """Empty every registered cache; return the number of fds they dropped."""
    with _caches_lock:
        caches = list(_caches)
    return sum(cache.shed_fds() for cache in caches)


def retrying(open_fn: Callable[..., T], *args: object) -> T:
    """``open_fn(*args)``; on EMFILE/ENFILE, empty the caches and try once more.
    ``open_fn`` must have done nothing when it fails (a plain open)."""
    try:
        return open_fn(*args)
    except OSError as e:
        if e.errno not in EXHAUSTED:
            raise
        code = e.errno  # not the exception: its traceback would keep the callers' frames,
        # and with them the fds of their nodes, alive in a reference cycle
    dropped = shed()
    global _warned
    if not _warned:
        _warned = True
        log.warning("out of file descriptors (%s, soft limit %d): dropped %d cached fds; "
                    "raise the limit (ulimit -n) if this repeats", errno.errorcode[code],
                    soft_limit(), dropped)
    else:
        log.info("out of file descriptors: dropped %d cached fds", dropped)
    return open_fn(*args)


# -- operations that need many fds at once ------------------------------------------------------
#: held by the one operation that waits for fds (``patiently``): the fds the others let go of
#: go to it, not to whichever operation of those waiting tries first
_waiting = threading.Lock()
#: locks whose holder never waits for fds (``unwaited_under``): held weakly
_unwaited: "WeakSet" = WeakSet()


def unwaited_under(lock: "threading.RLock") -> None:
    """An operation holding ``lock`` (an ``RLock``: the namespace lock) fails with EMFILE
    at the fd limit instead of waiting (``patiently``): a thread waiting for the lock may
    hold the fds it waits for (a copy-up of a directory merged across many layers holds
    one in each until it installs the copy under the lock), and every other operation
    that needs the lock would wait with it (review19)."""
    with _caches_lock:
        _unwaited.add(lock)


def _under_unwaited() -> bool:
    with _caches_lock:
        locks = list(_unwaited)
    return any(lock._is_owned() for lock in locks)  # (RLock's, as threading.Condition's)


#: ``patient``: whether this thread runs a try of a ``patiently`` operation, which waits
#: itself if it fails (its tries may meet the wait again: a listing's look its directory up)
_turn = threading.local()


def patiently(fn: Callable[..., T], *args: object, seconds: float | None = None,
              letting_go: Callable[[], object] | None = None) -> T:
    """``fn(*args)``, which may need many fds at once (one per layer a directory is merged
    across, and its parent's) and holds them only while it runs or in caches that
    ``shed`` empties; ``fn`` must have changed nothing when it fails (a lookup, a listing).
    At the fd limit (EMFILE/ENFILE, after ``retrying``'s shed) it lets go of what it held
    (its frames are gone once the exception is) and waits its turn: one waiting operation
    at a time empties the caches and tries again, sleeping between tries while other
    operations run and let go of their fds, for at most ``seconds`` (``WAIT_SECONDS``), and
    only then fails with EMFILE. So lookups that each fit the limit alone but not all at
    once wait for each other instead of failing (walk17: three ``ls`` of directories
    merged across 200 lowers at once answered EMFILE at a limit the mount check admits).
    Caveat: fds the caller itself holds (a parent it looked up first) are not let go, unless
    ``letting_go`` lets go of them: it is called once, before the wait (stall20: a copy-up
    queued for the wait holding a node the thread whose turn it was needed the fds of)."""
    if getattr(_turn, "patient", False):
        return fn(*args)  # (a try of a patient operation: that one waits)
    _turn.patient = True
    try:
        try:
            return fn(*args)
        except OSError as e:
            if e.errno not in EXHAUSTED:
                raise
            # (the exception, and with it the frames that held the fds, goes at the block's end)
    finally:
        _turn.patient = False
    if letting_go is not None:
        letting_go()
    return waited(fn, *args, seconds=seconds)


def waited(fn: Callable[..., T], *args: object, seconds: float | None = None) -> T:
    """``patiently`` after its first try failed with EMFILE/ENFILE (for a caller that made
    that try itself, without the call ``patiently`` costs, and let the exception go)."""
    seconds = WAIT_SECONDS if seconds is None else seconds
    if getattr(_turn, "patient", False) or _under_unwaited():
        # a try of a patient operation: that one tries again, within its own time (a wait
        # here too made a listing wait twice as long: review19); or a holder of a lock
        # that must not wait (``unwaited_under``)
        raise OSError(errno.EMFILE, "out of file descriptors")
    end = time.monotonic() + seconds
    if not _waiting.acquire(timeout=seconds):
        raise OSError(errno.EMFILE, f"out of file descriptors for {seconds:g} s")
    _turn.patient = True
    try:
        step = 0.001
        while True:
            shed()
            try:
                return fn(*args)
            except OSError as e:
                if e.errno not in EXHAUSTED:
                    raise
            if time.monotonic() >= end:
                break
            time.sleep(step)
            step = min(2 * step, WAIT_STEP)
    finally:
        _turn.patient = False
        _waiting.release()
    # (raised out of the except block: the last try's frames, and their fds, are gone)
    log.warning("out of file descriptors for %g s (soft limit %d): raise the limit (ulimit -n)",
                seconds, soft_limit())
    raise OSError(errno.EMFILE, f"out of file descriptors for {seconds:g} s")
