"""Copy-up: making a lower object (and its ancestors) exist in the upper layer.

Owns the ladder of steps, each a small method sharing one ``CopyUpContext``:
``ensure_upper`` (find what is missing, ancestors first) -> ``_copy_one`` (under the
object's lock) -> ``_build`` in ``workdir/work``: ``_build_file`` (``_copy_data``:
reflink, else ``copy_file_range`` over data segments only, so sparse files stay sparse,
else a chunked copy; ``_copy_metadata`` through the same fd; fsync of data and metadata)
or ``_create_other`` and ``_copy_metadata`` by path -> ``_install`` (atomic rename into
the upper, fsync of the parent; the fsyncs are skipped under ``-o volatile``), the parent
marked ``impure`` first, as the kernel marks it (``impure.py``).

Order matters: data, then owner, then xattrs (writing data and chown(2) both clear
``security.capability``), mode after owner (chown clears setuid/setgid), times last.
A crash at any point leaves the lower view or the complete upper copy; leftovers in
``workdir/work`` are removed at the next mount (``clean_workdir``).

Durability: the reply to a request that copied up comes after the copy's data, metadata
and name are durable. That takes two barriers on any filesystem that does not order its
writes (ext4 without a journal, where the benchmarks' layers live): the copy's fsync
*before* the rename (else the name could reach the disk before the inode it names), and
the parent's fsync after it. Each is one device flush there, and the copy's fsync also
writes ``workdir/work``'s block and inode (ext4's ``ext4_sync_parent``: the copy is a
new entry there). Measured and not taken (chmod8 helper, docs/DESIGN-NOTES.md): one
fsync after the rename (the name may land before the data); a parent fsync per N
copy-ups (replies before their names are durable); ``sync_file_range`` of the data
before the rename and only the parent's fsync after it, which is one journal commit
instead of two on ext4 with a journal and on XFS (their logs commit in order, and the
commit's flush covers data written before) but leaves the copy's inode unwritten on
ext4 without one.

Locking: one copy-up per path at a time (striped locks), taken *without* the
namespace lock; the final rename takes the namespace lock and re-checks that the
object is still the same, so a racing unlink or rename is never undone. A thread that
holds the namespace lock while it runs code that may ask for a copy-up says so
(``refusing``): a copy-up asked for then never waits for its stripe lock (under the
namespace lock that would be the other order: a deadlock). ``refusing(here=False)``: it
raises ``CopyUpFirst`` before taking any lock, carrying the ``ensure_*`` call it refused,
for the caller to run once it let go of the lock (a change's first try: the namespace
lock is not held for a copy's length). ``refusing()``: it runs, under the namespace lock,
if its stripe lock is free, else raises ``CopyUpFirst`` the same way. Run there, it
cannot be made stale by a rename of a directory above, which otherwise fails its install
("changed during copy-up") and has the request start over: renames that keep coming, one
per copy-up, would do that for as long as they come.

Handover (``handing_over``): a request that ran a refused copy-up unlocked then takes the
namespace lock again to make its change, and would look the name up again to find the
copy. Instead the install of that copy keeps the namespace lock it put the copy in place
under (one more level of the reentrant lock, taken before its hold ends) and hands it, with
the copy's node, to the request: between the copy's install and the change no other
request's change of the namespace or of the copy (every change by path holds that lock)
can land, so the node is what a lookup would find, stat and all. Order: the stripe lock,
then the namespace lock (as every copy-up); the stripe lock is let go of while the
namespace lock is held, which waits for nothing. Changes through an open handle take
neither lock (as before: they could land between a lookup and the change just as well);
the kernel holds the inode's lock over a SETATTR, which keeps its own node's writes and
changes out meanwhile. Handed over: a regular file, symlink or special file copied
whole by plain rename (a directory merges layers; a metadata-only copy has its data
below; an ``index=on`` copy is linked, and may take another name's copy).

One pass (copyup50): a chmod alone of a lower regular file gives its mode to the refused call
(``ensure_upper``'s ``mode``), which puts it in the ``fchmod`` every copy gets, after the ACL
copy (the mask follows the group bits, as a later chmod sets it) and before the times and the
fsync; the handed copy says so (``Seen.mode``) and the request answers from it
(``CopyUpFirst.answer``) with no second try. Only where the copy is made of the request's own
lookup at an unmoved epoch, without an override xattr, a hard-linked source or a source flagged
immutable/append-only: elsewhere the change chmods after the copy-up as before. A kill -9
before the rename leaves the lower file (the chmod unanswered); after it, the copy with the
new mode (the chmod made, unanswered: as a kill between a generic chmod and its reply). A step
after the rename that fails the copy-up (the parent's fsync) gives the copy the source's mode
back first (``_mode_back``): the chmod's error comes with no chmod made (review50a).
"""
from __future__ import annotations

import errno
import functools
import itertools
import os
import stat
import threading
import time

from . import faults, fdbudget, impure, logs, protattr, scopes, sysapi
from .acl import ACCESS as ACL_ACCESS, DEFAULT as ACL_DEFAULT
from .layer import DirFd, Layer, debugging, do_link, do_rename, join, rename_at, same_file, split
from .inodes import InodeKey, OverlayInode
from .killpriv import CAPABILITY_XATTR
from .lookup import Entry, Lookup, Node
from .ownership import Ownership, is_override_xattr
from .protection import Protection
from .records import field, record
from .stack import LayerStack
from .stats import Stats
from .typing_lite import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable

log = logs.get("overlaypc.copyup")

WORK_DIR = "work"
#: where a copy's name starts in its path in the workdir (``WORK_DIR/name``)
_WORK_PREFIX = len(WORK_DIR) + 1
_CHUNK = 8 << 20


class _Pid:
    """This process's id for the names of copies in ``workdir/work``, read once and again
    in a forked child (daemonizing forks after the mount is set up): not a ``getpid``
    system call per copy-up."""
    value = os.getpid()

    @classmethod
    def reread(cls) -> None:
        cls.value = os.getpid()


os.register_at_fork(after_in_child=_Pid.reread)


def is_private_xattr(name: str) -> bool:
    """Overlay-private xattrs: never shown, set, or copied through the mount. The override
    xattrs of fuse-overlayfs and containers/storage (``ownership``) count: a copy-up
    applies the owner and mode they hold instead of copying them; so do fuse-overlayfs's
    own rootless markers (``user.fuseoverlayfs.*``)."""
    return name.startswith(("trusted.overlay.", "user.overlay.", "trusted.overlaypc.", "user.overlaypc.",
                            "user.fuseoverlayfs.")) or is_override_xattr(name)


INCOMPAT_DIR = join(WORK_DIR, "incompat")
VOLATILE_MARKER = join(INCOMPAT_DIR, "volatile")


def check_incompat(work: Layer) -> None:
    """Refuse a workdir marked by a feature this mount cannot take, as the kernel does:
    ``work/incompat/volatile`` stays after a ``-o volatile`` mount, whose upper may be
    incomplete after a crash. An empty ``incompat`` dir is removed."""
    if work.lstat(INCOMPAT_DIR) is None:
        return
    names = sorted(name for name, _ in work.listdir(INCOMPAT_DIR))
    if "volatile" in names:
        raise OSError(errno.EINVAL,
                      f"workdir {work.path} was used by a volatile mount ({VOLATILE_MARKER} exists): "
                      f"after a crash its upper may be incomplete, so recreate upperdir and workdir; "
                      f"if the system has not crashed since, remove {work.path}/{VOLATILE_MARKER}")
    if names:
        raise OSError(errno.EINVAL, f"workdir {work.path} has incompatible features: "
                      f"{', '.join(names)} in {work.path}/{INCOMPAT_DIR}")
    work.do_rmdir(INCOMPAT_DIR)


def mark_volatile(work: Layer) -> None:
    """Leave the kernel's marker, ``work/incompat/volatile/dirty`` (directories, as its
    ``ovl_create_volatile_dirty`` makes them): every later mount refuses this workdir until
    the user removes ``work/incompat/volatile``."""
    for rel in (INCOMPAT_DIR, VOLATILE_MARKER, join(VOLATILE_MARKER, "dirty")):  # the kernel's
        if work.lstat(rel) is None:
            work.do_mkdir(rel, 0o700)


def must_copy_xattr(name: str) -> bool:
    """Xattrs a copy-up must not lose, even where the upper does not support them."""
    return name in (ACL_ACCESS, ACL_DEFAULT) \
        or name.startswith("security.")


@functools.lru_cache(maxsize=1)
def lsm_owned_xattrs() -> frozenset[str]:
    """Xattrs the kernel's LSM hooks drop at copy-up (``security_inode_copy_up_xattr``):
    EVM's always, SELinux's label where SELinux is enabled (it labels the copy itself)."""
    owned = {"security.evm"}
    if os.path.exists("/sys/fs/selinux/enforce"):
        owned.add("security.selinux")
    return frozenset(owned)


def clean_workdir(work: Layer) -> int:
    """Create ``workdir/work`` and remove leftovers of interrupted copy-ups; return count.
    Call ``check_incompat`` first: markers of incompatible features are never removed.

    Its POSIX ACLs go too (as the kernel's ``ovl_workdir_create`` does): objects built
    there must not inherit a default ACL of the workdir."""
    if work.lstat(WORK_DIR) is None:
        work.do_mkdir(WORK_DIR, 0o700)
    for name in (ACL_DEFAULT, ACL_ACCESS):
        try:
            work.do_removexattr(WORK_DIR, name)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
    leftovers = [name for name, _ in work.listdir(WORK_DIR) if join(WORK_DIR, name) != INCOMPAT_DIR]
    for name in leftovers:
        work.do_remove_tree(join(WORK_DIR, name))
    if leftovers:
        log.warning("removed %d leftover(s) of interrupted operations from %s/%s",
                    len(leftovers), work.path, WORK_DIR)
    return len(leftovers)


def _without_fds(entry: Entry) -> Entry:
    """``entry`` holding no fd (its layer, path, stat and xattr names alone)."""
    if entry.dirfd is None and entry.parent is None:
        return entry
    return Entry(entry.layer, entry.rel, entry.st, None, None, entry.xattrs)


class Seen(NamedTuple):
    """A caller's lookup of a name: its node, and ``Lookup.epoch`` read before it. While
    the epoch has not moved, no change of the namespace or copy-up ran since (lower
    layers do not change under a mount), so a lookup now would find the same object."""
    node: Node
    epoch: int
    #: the overlay-private xattr names of ``node``'s top entry where known: a copy handed
    #: over (``CopyUp.handing_over``), the names its copy-up wrote; None: unknown (only
    #: private names: an LSM may label a new file, and copied names are not kept)
    private: tuple[str, ...] | None = None
    #: a copy handed over: the mode its copy-up gave it for the request (a one-pass chmod,
    #: ``CopyUpContext.mode``), the change then done; None: the source's (none asked, or
    #: not applied)
    mode: int | None = None


class _Held:
    """A caller's ``Seen``, passed down a copy-up in this box so the copy-up can let go of
    its node (an ``O_PATH`` fd per layer a directory is found in) before a lookup that may
    wait for fds (``fdbudget.patiently``): once the epoch moved it is of no use, and a
    thread that queued for the wait holding it kept those fds from the thread whose turn
    it was, which answered EMFILE after the whole wait (stall20: the refused call of a
    ``CopyUpFirst``, run after the namespace lock, kept it). Only a holder that keeps no
    other reference lets go of it this way (the refused call: the box alone)."""
    __slots__ = ("seen",)

    def __init__(self, seen: Seen | None) -> None:
        self.seen = seen

    def take(self) -> Seen | None:
        seen, self.seen = self.seen, None
        return seen


@record
class CopyUpContext:
    node: Node
    src: Entry
    key: InodeKey
    tmp: str
    #: ``Lookup.epoch`` read before the lookup that found ``node`` (``Seen``); -1: unknown
    epoch: int = -1
    method: str = "none"
    metadata_only: bool = False
    #: a regular file copied without its data (size 0): an open with ``O_TRUNC`` empties it
    empty: bool = False
    index_key: str | None = None
    #: the number ``inumbers`` shows for the copy because of the origin written
    #: (``InodeNumbers.copied``), None when none is known that way
    origin_ino: int | None = None
    #: ``layer.debugging()`` read once for the copy-up's changes (``Layer._change``)
    debug: bool = True
    #: the overlay-private xattr names written to the copy (``_set_private``); None: not
    #: known (an override xattr's, ``ownership``)
    private: tuple[str, ...] | None = ()
    #: a chmod's mode for the copy in place of the source's (``ensure_upper``'s ``mode``:
    #: a one-pass chmod), None once ``_copy_metadata`` finds it may not apply it there
    mode: int | None = None
    #: the change's flags check (``ensure_upper``'s ``check``), made by ``_build_file`` with
    #: the source's flags before the copy is created; None: none asked, or made already
    check: "Callable[[int], None] | None" = None
    #: the source's FS_IOC_GETFLAGS flags, read once (``_build_file``) for the check and
    #: for ``_copy_fileattr``; None: not read yet
    flags: int | None = None
    #: the owner (uid, gid) the copy was left with, its chown not made (created so:
    #: ``CopyUp._created``); None: chowned (or an override xattr holds it)
    owned: tuple[int, int] | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.src.st.st_mode)


class CopyUpFirst(Exception):
    """A copy-up was asked for in a thread that holds the namespace lock (``refusing``),
    and refused (``here`` False, or its stripe lock held): nothing was copied. ``copy``:
    the refused ``ensure_*`` call, for the caller to run without the lock before it runs
    its change again. ``answer``: set by a change that gave ``copy`` a chmod to make
    (``ensure_upper``'s ``mode``): its answer from the copy handed over made so
    (``Seen.mode``), given instead of running the change again."""

    def __init__(self, rel: str, copy: "Callable[[], Entry] | None" = None) -> None:
        super().__init__(rel)
        self.copy = copy
        self.answer: "Callable[[Seen], object] | None" = None


class _Refused(threading.local):
    """``CopyUp.refusing``'s per-thread state: the ``here`` of each hold, innermost last
    (holds nest: the namespace lock is reentrant). Empty: copy-ups run as asked."""
    def __init__(self) -> None:
        self.holds: list[bool] = []


class _Handover(threading.local):
    """``CopyUp.handing_over``'s per-thread state: the merged path whose install hands
    its namespace lock hold over (None: none asked), and once one did, the copy's entry
    and the epoch after its install (``held``: the extra lock level is this thread's)."""
    def __init__(self) -> None:
        self.rel: str | None = None
        self.held = False
        self.entry: Entry | None = None
        self.epoch = -1
        #: the copy handed over, offered to the change the request makes in that hold
        self.offered: Seen | None = None
        #: the copy's overlay-private xattr names (``Seen.private``)
        self.private: tuple[str, ...] | None = None
        #: the mode the copy-up gave the copy for the request (``Seen.mode``)
        self.mode: int | None = None


class _Refusing:
    """``CopyUp.refusing``'s context manager: one object per mode for every use (its state
    is the thread's ``_Refused``), cheaper than a generator's per request."""
    __slots__ = ("_refused", "_here")

    def __init__(self, refused: _Refused, here: bool) -> None:
        self._refused, self._here = refused, here

    def __enter__(self) -> None:
        self._refused.holds.append(self._here)

    def __exit__(self, *exc) -> None:
        self._refused.holds.pop()


class CopyUp:
    def __init__(self, stack: LayerStack, lookup: Lookup, ns_lock: threading.RLock, stats: Stats,
                 *, xattr_prefix: str, volatile: bool, key_of, on_copied, metacopy: bool = False,
                 ownership: Ownership | None = None) -> None:
        assert stack.upper is not None and stack.work is not None
        self.upper: Layer = stack.upper
        self.work: Layer = stack.work
        self.lookup = lookup
        self.ns_lock = ns_lock
        self.stats = stats
        self.prefix = xattr_prefix
        self.protection = Protection(xattr_prefix)
        self.volatile = volatile
        self._key_of = key_of
        self._on_copied = on_copied
        self.metacopy = metacopy
        self.ownership = ownership or Ownership()
        self.index = None  # an index.IndexDir under -o index=on
        self.inos = None  # the mount's inumbers.InodeNumbers, told of each origin written
        self._stripes = [threading.Lock() for _ in range(64)]
        #: one data copy-up of a metacopy upper file at a time, keyed by the file
        #: (``_filling``): its names take different stripes
        self._fills = [threading.Lock() for _ in range(64)]
        #: indices of source layers whose files cannot be reflinked to the upper
        self._no_reflink: set[int] = set()
        self._names = itertools.count()
        #: ``refusing``'s holds, per thread
        self._refused = _Refused()
        self._refusings = (_Refusing(self._refused, False), _Refusing(self._refused, True))
        #: ``handing_over``'s state, per thread
        self._handover = _Handover()
        #: the owner (uid, gid) a regular file this daemon creates in ``workdir/work`` gets,
        #: from the first copy's ``fstat`` (the daemon's fsuid and fsgid, or the group of a
        #: setgid ``work``: fixed for the mount); a copy whose source has that owner is not
        #: chowned (``_copy_metadata``; checked by the stat after its install, ``_in_place``)
        self._created: tuple[int, int] | None = None

    def refusing(self, here: bool = True) -> _Refusing:
        """A context: copy-ups asked for in this thread (which holds the namespace lock)
        meanwhile never wait for their stripe lock. ``here``: one runs if that lock is
        free, else raises ``CopyUpFirst``; False: every one raises it (module doc)."""
        return self._refusings[here]

    def _refuses(self) -> bool:
        """Whether a copy-up asked for now raises ``CopyUpFirst`` whatever its stripe lock."""
        holds = self._refused.holds
        return bool(holds) and not holds[-1]

    def handing_over(self, copy: "Callable[[], Entry]", rel: str) -> Seen | None:
        """Run ``copy`` (a refused ``ensure_*`` call of merged path ``rel``, the caller not
        holding the namespace lock). If it installed ``rel``'s copy itself, a regular file,
        symlink or special file copied whole, return that copy's node and the epoch after
        the install, with the namespace lock *held* by this thread (the install's hold,
        handed over: module doc); the caller releases it. Else None, the lock not held (a
        directory, a metadata-only copy, one another thread made, nothing to copy)."""
        h = self._handover
        h.rel, h.held, h.entry = rel, False, None
        try:
            copy()
        except BaseException:
            if h.held:  # (failed after the install handed its hold over: a late step)
                h.held = False
                self.ns_lock.release()
            raise
        finally:
            h.rel = None
            entry, h.entry = h.entry, None  # (no fd kept here past the call)
        if not h.held:
            return None
        h.held = False
        return Seen(Node(rel, (entry,)), h.epoch, h.private, h.mode)

    def offer(self, seen: Seen | None) -> None:
        """``handing_over``'s answer, offered (None: withdrawn) to the change this thread
        makes in the hold it was handed over in (``handed``)."""
        self._handover.offered = seen

    def handed(self, rel: str) -> Seen | None:
        """The copy of ``rel`` handed over to this thread's hold and offered to its change
        (``offer``), once; None when none is, or the epoch moved since (a change of the
        namespace in this hold: look it up)."""
        h = self._handover
        seen = h.offered
        if seen is None or seen.node.rel != rel or seen.epoch != self.lookup.epoch:
            return None
        h.offered = None
        return seen

    def _hand_over(self, ctx: CopyUpContext, entry: Entry, parent: DirFd | None) -> bool:
        """In ``_install``'s namespace lock hold, once the copy is in place: if this
        thread's request asked for ``ctx``'s path (``handing_over``) and the copy is what a
        lookup finds whole at the name (no directory, whose node merges layers; no
        metadata-only copy, whose data is below), one more level of the lock, kept past the
        hold's end, and the copy's entry as a lookup gives it: relative to the parent's fd
        the lookup holds (``parent``, found in this hold; its xattr names not listed:
        unknown, its private ones known: ``Seen.private``)."""
        h = self._handover
        if h.rel != ctx.node.rel or h.held or ctx.metadata_only or ctx.kind == stat.S_IFDIR:
            return False
        if parent is None:
            return False  # (not cached: the request looks it up)
        # (held by this thread already, in ``_installing``: one more level never waits. The
        # order is every copy-up's: this copy's stripe lock, taken first, is let go of on the
        # way out with the namespace lock still held, and a release waits for nothing)
        self.ns_lock.acquire()
        h.held = True
        h.entry = Entry(entry.layer, entry.rel, entry.st, None, parent)
        h.private, h.mode = ctx.private, ctx.mode
        return True

    @scopes.contextmanager
    def _stripe(self, rel: str, held: _Held | None = None, *, fill: tuple[int, int] | None = None):
        """Hold the lock of copy-ups of ``rel``; under ``refusing``, only if it is free
        (else ``CopyUpFirst``: module doc). ``held``: let go of before waiting for the lock,
        whose holder may be a copy-up waiting for fds (its lookup, at the limit); it moves
        the epoch anyway once it installs its copy (``_Held``). ``fill``: instead, the lock
        of data copy-ups of the metacopy upper file (st_dev, st_ino) (``_filling``)."""
        locks = self._stripes if fill is None else self._fills
        lock = locks[hash(rel if fill is None else fill) % len(locks)]
        if not self._refused.holds:
            if not lock.acquire(blocking=False):
                if held is not None:
                    held.take()
                lock.acquire()
            try:
                yield
            finally:
                lock.release()
            return
        if not self._refused.holds[-1] or not lock.acquire(blocking=False):
            raise CopyUpFirst(rel)
        try:
            yield
        finally:
            lock.release()

    # -- step 1: what is missing, ancestors first ----------------------------------------
    def holding(self, seen: Seen) -> "_Held":
        """``seen`` in a box, for a caller that keeps no other reference to it: passed as
        ``ensure_upper``'s ``seen``, its node is let go of before any wait for fds
        (``_Held``); a second call with the box looks the name up again."""
        return _Held(seen)

    def ensure_upper(self, rel: str, *, metadata_only: bool = False,
                     seen: "Seen | _Held | None" = None, mode: int | None = None,
                     check: "Callable[[int], None] | None" = None) -> Entry:
        """Return the upper entry of merged path ``rel``, copying it up if needed.

        ``metadata_only`` (``-o metacopy=on``, for attribute changes): a regular file gets
        a sparse upper copy marked ``trusted.overlay.metacopy`` whose data stays below;
        ``ensure_data`` completes it before anything writes data. ``seen``: ``rel`` as the
        caller just looked it up, not looked up again while no change ran since (``holding``:
        in a box). ``mode``: a chmod's (``Attributes.setattr``'s one pass), given to the copy
        in place of the source's where that is the chmod's whole effect (``_copy_one``,
        ``_copy_metadata``) and told to the change it is handed over to (``Seen.mode``);
        anywhere else the change makes its chmod itself, as without it. ``check``: the
        change's flags check (``Attributes.copy_up_for_setattr``'s), called once with the
        object's immutable/append-only flags before anything is copied for it (its ancestors
        neither: it may refuse the change); a lower regular file's are the copy-up's one
        FS_IOC_GETFLAGS of its source (``_build_file``), which it copies too (copyup53)."""
        if isinstance(seen, _Held):
            return self._ensure(rel, metadata_only=metadata_only, held=seen, mode=mode,
                                check=check)
        return self._ensure(rel, metadata_only=metadata_only, seen=seen, mode=mode, check=check)

    def _ensure(self, rel: str, *, metadata_only: bool = False, seen: Seen | None = None,
                empty: bool = False, held: _Held | None = None, mode: int | None = None,
                check: "Callable[[int], None] | None" = None) -> Entry:
        """``ensure_upper``; ``empty``: a regular file copied without its data; ``held``:
        ``seen`` in a box (the refused call of a ``CopyUpFirst``: ``_Held``)."""
        if held is None:
            held = _Held(seen)
        del seen  # (from here in ``held`` alone, which lets go of it before any wait)
        node = held.seen.node if held.seen is not None else self.lookup.lookup(rel)
        if not node.exists:
            raise OSError(errno.ENOENT, "no such file or directory", rel)
        if node.upper is not None:
            # (the box let go of: ``ensure_data`` looks the name up next, which may wait
            # for fds, and a refused call of it runs again with the box, after a change)
            held.take()
            if check is not None:
                check(self.protection.of_node(node))
            return node.upper
        try:
            if self._refuses():
                raise CopyUpFirst(rel)
            del node
            # the ancestors without an upper copy, found bottom-up and copied top-down (a
            # loop, not recursion: a path may be thousands of levels deep)
            missing = []
            parent = split(rel)[0]
            while parent and self._looked_up(self.lookup.directory, parent, held).upper is None:
                missing.append(parent)
                parent = split(parent)[0]
            if missing:
                if check is not None:  # (before any ancestor is copied: by ``statx``, as before)
                    found = held.seen.node if held.seen is not None else self.lookup.lookup(rel)
                    check(self.protection.of_node(found))
                    check = found = None
                held.take()  # (stale once an ancestor is copied: each copy moves the epoch)
            for path in reversed(missing):
                self._copy_one(path)
            return self._copy_one(rel, metadata_only and self.metacopy, held, empty=empty,
                                  mode=mode, check=check)
        except CopyUpFirst as first:  # (``refusing``) what the caller runs without the lock
            if first.copy is None:  # (the mode and the check ride in it: ``ensure_upper``)
                first.copy = functools.partial(self._ensure, rel, metadata_only=metadata_only,
                                               empty=empty, held=held, mode=mode, check=check)
            raise

    @staticmethod
    def _looked_up(find: "Callable[[str], Node]", rel: str, held: _Held | None) -> Node:
        """``find(rel)`` (``Lookup.lookup``, ``Lookup.directory``: at the fd limit they wait
        for fds), letting go of ``held``'s node before any wait (``_Held``)."""
        if held is None or held.seen is None:
            return find(rel)
        return fdbudget.patiently(find, rel, letting_go=held.take)

    def ensure_data(self, rel: str, *, empty: bool = False,
                    seen: "Seen | _Held | None" = None,
                    check: "Callable[[int], None] | None" = None) -> Entry:
        """Like ``ensure_upper``, and the upper holds the data (no metacopy left).
        ``empty``: for an open with ``O_TRUNC``, a regular file not in the upper yet is
        copied with no data (size 0), as the kernel overlay does; the open truncates it
        anyway (and marks its times). ``seen``, ``check``: as ``ensure_upper``'s."""
        try:
            entry = self._ensure(rel, empty=True, check=check) if empty \
                else self.ensure_upper(rel, seen=seen, check=check)
            check = None  # (made: by the copy-up, or of the upper found)
            h = self._handover
            if h.held and h.rel == rel:
                return entry  # (copied whole by this call, which hands its hold over)
            # kept without its parent's fd across the lookup below, which may wait for fds
            # (``fdbudget.patiently``): the thread whose turn it is may need that one (left26)
            entry = _without_fds(entry)
            node = self.lookup.lookup(rel)
            if node.data is None:  # (the lookup's entry, with its fds, if it is the same file)
                upper = node.upper
                return upper if upper is not None and same_file(upper.st, entry.st) else entry
            if self._refuses():
                raise CopyUpFirst(rel)
            node = None  # (not held while the lock or the lookup below may wait)
            with self._stripe(rel):
                node = self.lookup.lookup(rel)
                if node.data is None or node.upper is None:
                    return node.upper or entry
                return self._copy_data_in_place(node)
        except CopyUpFirst as first:  # (``refusing``) what the caller runs without the lock
            first.copy = functools.partial(self.ensure_data, rel, empty=empty,
                                           seen=seen if isinstance(seen, _Held) else None,
                                           check=check)
            raise

    def ensure_parent(self, rel: str) -> Entry:
        return self.ensure_upper(split(rel)[0])

    # -- step 2: one object, under its lock -----------------------------------------------
    def _copy_one(self, rel: str, metadata_only: bool = False, held: _Held | None = None,
                  empty: bool = False, mode: int | None = None,
                  check: "Callable[[int], None] | None" = None) -> Entry:
        """``mode``: ``ensure_upper``'s, given to the copy only where it is made of the
        caller's own lookup (``held``, the epoch unmoved): what the name resolves to then is
        the object the chmod is for; looked up again, it may be another (a rename landed).
        ``check``: ``ensure_upper``'s, of what the name resolves to under the lock."""
        with self._stripe(rel, held):
            # under the object's lock: a copy-up of it that finished meanwhile (or any other
            # change) moved the epoch, and then the name is looked up again, the node seen
            # let go of first (``_Held``: the lookup may wait for fds)
            seen = held.take() if held is not None else None
            if seen is not None and seen.epoch == self.lookup.epoch:
                node, epoch = seen.node, seen.epoch
            else:
                seen = mode = None
                epoch = self.lookup.epoch  # (read before the layers: ``Seen``)
                node = self.lookup.lookup(rel)
            if not node.exists:
                raise OSError(errno.ENOENT, "vanished during copy-up", rel)
            # (``check`` where no source of its own is read here: of what the name is now)
            upper = node.upper
            if upper is not None:
                if check is not None:
                    check(self.protection.of_node(node))
                return upper
            if node.index is not None:  # index=on: another name was copied up already
                if check is not None:
                    check(self.protection.of_node(node))
                return self._link_index(node, node.index.rel)
            ctx = CopyUpContext(node, node.top, self._key_of(node),
                                join(WORK_DIR, f"#ovlpc-{_Pid.value}-{next(self._names)}"), epoch,
                                metadata_only=metadata_only and stat.S_ISREG(node.st.st_mode),
                                empty=empty and stat.S_ISREG(node.st.st_mode), debug=debugging(),
                                mode=mode)
            if check is not None:
                if ctx.kind == stat.S_IFREG:
                    ctx.check = check  # (``_build_file``: with the flags it reads)
                else:
                    check(self.protection.of_node(node))
            if self.index is not None and self.index.eligible(node.top):
                # (a metadata-only copy too, as the kernel's: the index entry is the
                # metacopy file, its data the lower file it indexes)
                ctx.index_key = self.index.key(node.top)
                ctx.mode = None  # (linked, not handed over: the change chmods)
            try:
                self._build(ctx)
                return self._install(ctx)
            except BaseException:
                self._discard(ctx.tmp)
                raise

    # -- step 3: the temporary object ----------------------------------------------------
    def _build(self, ctx: CopyUpContext) -> None:
        """The complete temporary copy at ``ctx.tmp``: object, data, metadata."""
        if ctx.kind == stat.S_IFREG:
            self._build_file(ctx)
        else:
            self._create_other(ctx)
            self._copy_metadata(ctx)

    def _build_file(self, ctx: CopyUpContext) -> None:
        """A regular file, built through the fd it is created with and one fd of the
        source (its data, flags, xattrs and file handle): no path walk per step. The source
        is opened and its flags read first (one FS_IOC_GETFLAGS: ``ctx.flags``), for the
        change's check (``ctx.check``: it may refuse, nothing created yet) and the copy's
        flags. The fsync comes last, so it makes data and metadata durable together, before
        the rename."""
        src, work = ctx.src, self.work
        src_fd = self._open_source(src, ctx.metadata_only, ctx.check, self.protection)
        try:
            ctx.flags = self.protection.real_all(src, src_fd)
            if ctx.check is not None:
                ctx.check(ctx.flags & protattr.PROTECTED)
            held = work.held_dir(WORK_DIR)  # (held for the mount: ``OverlayFS``)
            if held is not None:
                dst_fd = work.create_at(held, ctx.tmp[_WORK_PREFIX:], ctx.tmp,
                                        os.O_WRONLY | os.O_EXCL, 0o600, ctx.debug)
            else:
                dst_fd = work.do_create(ctx.tmp, os.O_WRONLY | os.O_EXCL, 0o600, ctx.debug)
        except BaseException:
            os.close(src_fd)
            raise
        try:
            try:
                if self._created is None:  # (the mount's first copy: ``_created``)
                    st = os.fstat(dst_fd)
                    self._created = (st.st_uid, st.st_gid)
                if ctx.metadata_only:
                    os.ftruncate(dst_fd, src.st.st_size)  # sparse: the data stays below
                    ctx.method = "metacopy"
                elif ctx.empty:
                    ctx.method = "empty"  # (O_TRUNC: the open empties it)
                else:
                    self._copy_data(ctx, src_fd, dst_fd, src.st.st_size)
                self._copy_metadata(ctx, dst_fd, src_fd)
            finally:
                os.close(src_fd)
            if faults.armed:  # (test-only: no call per copy-up otherwise)
                faults.hit("copyup.fsync", ctx.tmp, ctx.node.rel)
            if not self.volatile:
                os.fsync(dst_fd)
        finally:
            os.close(dst_fd)

    @staticmethod
    def _open_source(src: Entry, metadata_only: bool, check: "Callable[[int], None] | None" = None,
                     protection: Protection | None = None) -> int:
        """The source's fd, read-only (its data; its flags, asked by ioctl); for a
        metadata-only copy, which reads no data, ``O_PATH`` where the daemon may not read
        the file (its flags are then what ``statx`` shows). Through the parent's fd the
        lookup found it in, where it has one. Where it cannot be opened, ``check`` (the
        change's: ``CopyUpContext.check``) is made first with the flags ``statx`` shows
        (``protection``), so a flag's EPERM comes before the open's error, as before the
        check was made in the copy-up."""
        try:
            if src.parent is not None:
                return src.layer.open_at(src.parent, src.name, src.rel, os.O_RDONLY)
            return src.layer.open(src.rel, os.O_RDONLY)
        except OSError as e:
            if check is not None and protection is not None:
                check(protection.of_entry(src))
            if not metadata_only or not isinstance(e, PermissionError):
                raise
            return src.layer.open(src.rel, os.O_PATH)

    def _create_other(self, ctx: CopyUpContext) -> None:
        src, kind = ctx.src, ctx.kind
        if kind == stat.S_IFDIR:
            self.work.do_mkdir(ctx.tmp, 0o700)
        elif kind == stat.S_IFLNK:
            self.work.do_symlink(src.layer.readlink(src.rel), ctx.tmp)
        else:
            self.work.do_mknod(ctx.tmp, kind | 0o600, src.st.st_rdev)

    # -- step 4: data ----------------------------------------------------------------------
    def _copy_from(self, ctx: CopyUpContext, src: Entry, dst_fd: int) -> None:
        src_fd = src.layer.open(src.rel, os.O_RDONLY)
        try:
            self._copy_data(ctx, src_fd, dst_fd, src.st.st_size)
        finally:
            os.close(src_fd)

    def _copy_data(self, ctx: CopyUpContext, src_fd: int, dst_fd: int, size: int) -> None:
        if faults.armed:
            faults.hit("copyup.data", ctx.tmp, ctx.node.rel, progress=0)
        layer = ctx.src.layer
        if size and layer.index not in self._no_reflink:
            try:
                sysapi.ficlone(dst_fd, src_fd)
                ctx.method = "reflink"
                return
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EXDEV):
                    # the filesystems' answer, not the file's: not asked again
                    self._no_reflink.add(layer.index)
        ctx.method = "copy_file_range"
        # a source with no room for a hole (as many bytes allocated as its size: every small
        # file written whole) is one data segment: no SEEK_DATA/SEEK_HOLE asked. A block
        # counted there that holds no data (an ext4 xattr block, a preallocated one) at most
        # has a hole copied as the zeros it reads as: the same content
        dense = size <= ctx.src.st.st_blocks * 512
        done = offset = written = 0
        while offset < size:
            if dense:
                start, end = offset, size
            else:
                try:
                    start = os.lseek(src_fd, offset, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        break  # only a hole remains
                    raise
                if start >= size:
                    break
                end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
            while start < end:
                n = self._copy_range(ctx, src_fd, dst_fd, start, min(end - start, _CHUNK))
                if n == 0:
                    break  # the source shrank underneath us
                start += n
                done += n
                written = start
                if faults.armed:
                    faults.hit("copyup.data", ctx.tmp, ctx.node.rel, progress=done)
            if start < end:
                break
            offset = end
        # a hole at the end, or the source shrank (a new copy is empty); not where the copy
        # has its size already (a metacopy file's upper file): a truncate moves the mtime
        # even to the same size, and the kernel's data copy-up writes nothing for holes
        if written != size and os.fstat(dst_fd).st_size != size:
            os.ftruncate(dst_fd, size)

    def _copy_range(self, ctx: CopyUpContext, src_fd: int, dst_fd: int, pos: int, count: int) -> int:
        if ctx.method == "copy_file_range":
            try:
                return os.copy_file_range(src_fd, dst_fd, count, pos, pos)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                ctx.method = "chunked"
        data = os.pread(src_fd, count, pos)
        done = 0
        while done < len(data):  # a short write (the upper filled up) is no copy: write on
            n = os.pwrite(dst_fd, memoryview(data)[done:], pos + done)
            if n == 0:
                raise OSError(errno.ENOSPC, "no progress writing the copy", ctx.node.rel)
            done += n
        return len(data)

    # -- step 5: metadata --------------------------------------------------------------------
    def _copy_metadata(self, ctx: CopyUpContext, fd: int | None = None, src_fd: int | None = None) -> None:
        """Owner, xattrs, origin (and metacopy marks), mode, times of the copy: through
        ``fd`` (the copy's, a regular file) when given, else by path; the source's xattrs
        and file handle through ``src_fd`` when given."""
        src, st, work, tmp = ctx.src, ctx.src.st, self.work, ctx.tmp
        # the owner and mode the source's layer holds (its override xattr, if it has one),
        # container-side (a layer on an idmapped mount shows host IDs); under
        # xattr_permissions they go to the copy's override xattr, not its inode
        owner = self.ownership.on_disk(self.ownership.stored_entry(src))
        override = self.ownership.writes_override(work, owner.mode)
        if override:
            ctx.private = None  # (names ``ownership`` chooses)
            self.ownership.set_override(work, tmp, owner.uid, owner.gid, owner.mode)
        elif fd is not None:
            ids = (owner.uid, owner.gid)
            if ids == self._created and ctx.index_key is None:
                # created so (``_created``): a chown to the same owner changes nothing but
                # the ctime (nothing to drop on a new 0600 file); the stat after the install
                # checks it (``_in_place``). Its fault point and debug line kept
                ctx.owned = ids
                if ctx.debug or faults.armed:
                    work.chown_kept(tmp, owner.uid, owner.gid, ctx.debug)
            else:
                # chown first: chown(2) drops security.capability (even for root), and the
                # kernel's copy-up keeps it
                work.do_fchown(fd, tmp, owner.uid, owner.gid, ctx.debug)
        else:
            work.do_chown(tmp, owner.uid, owner.gid, by_name=True)
        self._copy_xattrs(ctx, fd, src_fd)
        if src_fd is not None:
            origin = sysapi.ovl_origin_xattr(src_fd, src.layer.uuid)
        else:
            origin_fd = src.layer.path_fd(src.rel)
            try:
                origin = sysapi.ovl_origin_xattr(origin_fd, src.layer.uuid)
            finally:
                os.close(origin_fd)
        # The origin keeps st_ino across copy-up (``inumbers``); as the kernel, none for
        # one name of a lower hard link whose link this copy-up breaks (index off).
        breaks_link = ctx.kind != stat.S_IFDIR and st.st_nlink > 1 and ctx.index_key is None
        if origin is not None and not breaks_link:
            self._set_private(ctx, self.prefix + "origin", origin, fd)
            if self.inos is not None:  # what the copy's first GETATTR would decode
                ctx.origin_ino = self.inos.copied(origin, st, src.layer)
        flags = 0
        if ctx.kind in (stat.S_IFREG, stat.S_IFDIR):
            flags = self._copy_fileattr(ctx, fd, src_fd)
        if ctx.metadata_only:
            # (no redirect, as the kernel's: data found through a redirected parent is
            # found again through it; a rename sets one, ``namespace._mark_moved``)
            self._set_private(ctx, self.prefix + "metacopy", b"", fd)
        if ctx.kind != stat.S_IFLNK:
            # after the ACL (as in the kernel's copy-up): chmod sets the ACL mask to the
            # group bits, which for the lower's own mode are the lower's mask already
            mode = stat.S_IMODE(owner.mode) & (0o777 if override else 0o7777)
            if ctx.mode is not None:
                # a chmod's (one pass): its whole effect here, in the chmod the copy gets
                # anyway, where nothing else decides the mode (an override xattr), no other
                # name shares the source and no flag refuses the chmod (immutable,
                # append-only: the change's check answers EPERM); else the change chmods
                if override or fd is None or ctx.metadata_only or st.st_nlink != 1 \
                        or flags & protattr.PROTECTED:
                    ctx.mode = None
                else:
                    mode = stat.S_IMODE(ctx.mode)
            if fd is not None:
                work.do_fchmod(fd, tmp, mode, ctx.debug)
            else:
                work.do_chmod(tmp, mode, by_name=True)
        if fd is not None:
            work.do_futime(fd, tmp, (st.st_atime_ns, st.st_mtime_ns), ctx.debug)
        else:
            work.do_utime(tmp, (st.st_atime_ns, st.st_mtime_ns), by_name=True)

    def _copy_xattrs(self, ctx: CopyUpContext, fd: int | None = None, src_fd: int | None = None) -> None:
        """The kernel's rule (``ovl_copy_xattr``): any error fails the copy-up, except
        EOPNOTSUPP for an xattr that need not be copied (not a POSIX ACL, not
        ``security.*``): a lost ACL or security label could widen access. Xattrs owned by
        an LSM that labels the new object itself are not copied.

        The names are the lookup's listing where it has one (``Entry.xattrs``: a lower
        regular file's, read under the object's lock by ``_copy_one``); lower layers do
        not change under a mount (``xattrnames``)."""
        src = ctx.src
        names = src.xattrs if src.xattrs is not None else src.layer.listxattr(src.rel)
        for name in names:
            if is_private_xattr(name) or name in lsm_owned_xattrs():
                continue
            if src_fd is not None:
                value = src.layer.getxattr_fd(src_fd, name)
            else:
                value = src.layer.getxattr(src.rel, name)
            if value is None:
                continue  # removed meanwhile
            try:
                if fd is not None:
                    self.work.do_fsetxattr(fd, ctx.tmp, name, value)
                else:
                    self.work.do_setxattr(ctx.tmp, name, value)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP or must_copy_xattr(name):
                    raise OSError(e.errno, f"copy-up of {ctx.node.rel}: xattr {name} not copied: "
                                  f"{e.strerror}", ctx.node.rel) from None
                log.info("copy-up of %s: xattr %s not supported by the upper, not copied",
                         src.rel, name)

    def _copy_fileattr(self, ctx: CopyUpContext, fd: int | None, src_fd: int | None) -> int:
        """The source's file attribute flags, as the kernel's ``ovl_copy_fileattr``:
        immutable/append-only to the copy's ``protattr`` xattr (not onto the copy itself:
        it could then not be renamed into place, nor its xattrs set), so the mount keeps
        refusing what they refuse; sync/noatime onto the real copy (``protattr.COPIED``;
        nodump and the others stay behind). One FS_IOC_GETFLAGS of the source (through
        its fd, else one opened for it: a directory); the copy's flags are asked and set
        only for a source with sync or noatime. Returns the source's flags."""
        flags = ctx.flags
        if flags is None:  # (not a regular file's: ``_build_file`` read those)
            flags = self.protection.real_all(ctx.src, src_fd)
        if flags & protattr.PROTECTED:
            self._set_private(ctx, self.prefix + protattr.XATTR, protattr.value_of(flags), fd)
        if flags & protattr.COPIED:
            self._copy_real_flags(ctx, fd, flags & protattr.COPIED)
        return flags

    def _copy_real_flags(self, ctx: CopyUpContext, fd: int | None, copied: int) -> None:
        """The copy's own flags with its sync/noatime bits those of the source
        (``copied``), through ``fd`` (a regular file's) or an fd opened for it (a
        directory's). An upper without the flags ioctl leaves them (the kernel warns
        once, "no support on upper"); one refusing a flag fails the copy-up with its
        errno (tmpfs: EOPNOTSUPP for sync), as the kernel's ``ovl_real_fileattr_set``."""
        own = fd if fd is not None else self.work.open(
            ctx.tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            try:
                current = sysapi.get_flags(own)
            except OSError as e:
                if e.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                log.info("copy-up of %s: the upper has no file attribute flags, sync/noatime "
                         "not copied", ctx.node.rel)
                return
            wanted = current & ~protattr.COPIED | copied
            if wanted != current:
                log.debug("set_flags(%s, %#x)", ctx.tmp, wanted)
                sysapi.set_flags(own, wanted)
        finally:
            if own != fd:
                os.close(own)

    def _set_private(self, ctx: CopyUpContext, name: str, value: bytes, fd: int | None = None) -> None:
        """Set the overlay-private xattr ``name`` of the copy, counted in ``ctx.private``
        (first: one refused leaves the name counted, which only costs a read)."""
        if ctx.private is not None:
            ctx.private += (name,)
        try:
            if fd is not None:
                self.work.do_fsetxattr(fd, ctx.tmp, name, value)
            else:
                self.work.do_setxattr(ctx.tmp, name, value)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise  # symlinks refuse user.* xattrs; origin is then simply not recorded

    # -- step 6: install -----------------------------------------------------------------------
    @scopes.contextmanager
    def _installing(self):
        """The namespace lock, held to put a copy in place; at its end (a failed one too: a
        step may be done) ``Lookup.changed``: the name may resolve to the copy now, so no
        file found before is opened as kept."""
        with self.ns_lock:
            try:
                yield
            finally:
                self.lookup.changed()

    def _install(self, ctx: CopyUpContext) -> Entry:
        rel = ctx.node.rel
        if faults.armed:
            faults.hit("copyup.rename", ctx.tmp, ctx.node.rel)
        with self._installing():
            # what the name resolves to now, under the namespace lock: the node the copy was
            # made of while the epoch read before finding it has not moved (no change of the
            # namespace and no copy-up ran since: ``Seen``), else a lookup
            now = ctx.node if ctx.epoch == self.lookup.epoch else self.lookup.lookup(rel)
            if now.upper is not None or not now.exists or now.top.st.st_ino != ctx.src.st.st_ino \
                    or now.top.layer is not ctx.src.layer:
                self._discard(ctx.tmp)
                if now.upper is not None:
                    return now.upper
                raise OSError(errno.ENOENT, "changed during copy-up", rel)
            if ctx.index_key is not None:
                return self._install_indexed(ctx)
            parent, name = split(rel)
            # the parent's fd the lookup cache holds (in this hold: where it says), passed to
            # each step (no lookup of it per step); its readable one kept beside it for the
            # times and the fsync (``readable_dir``)
            held = self.upper.held_dir(parent)
            impure.mark(self.upper, parent, self.prefix, held)  # before the name: ``impure``
            work = self.work.held_dir(WORK_DIR) if held is not None else None
            placed = None
            try:
                with self._in_place(ctx.key, rel, metadata_only=ctx.metadata_only,
                                    held=held, name=name, ctx=ctx) as placed:
                    with self._parent_times_kept(rel, ctx.debug, held):
                        if work is not None:
                            rename_at(self.work, work, ctx.tmp[_WORK_PREFIX:], ctx.tmp, self.upper,
                                      held, name, rel, sysapi.RENAME_NOREPLACE, ctx.debug)
                        else:
                            do_rename(self.work, ctx.tmp, self.upper, rel, sysapi.RENAME_NOREPLACE,
                                      ctx.debug)
                        placed()
                    if not self.volatile:
                        if faults.armed:
                            faults.hit("copyup.parent_fsync", rel)
                        self.upper.fsync_dir(parent, held)
            except BaseException:
                if placed is not None and placed.done and ctx.mode is not None:
                    self._mode_back(ctx, rel)
                raise
            entry = placed.result()
            if ctx.origin_ino is not None and self.inos is not None:
                # the copy's number, kept under its stat: its first GETATTR (or a change's
                # reply, ``InodeNumbers.carry``) reads no origin xattr
                self.inos.known(entry.st, ctx.origin_ino)
            handed = self._hand_over(ctx, entry, held)
        if handed:  # (the epoch ``lookup.changed`` moved to as the hold ended)
            self._handover.epoch = self.lookup.epoch
        elapsed = time.monotonic() - ctx.started
        self.stats.copy_up(ctx.method if ctx.kind == stat.S_IFREG else "metadata")
        log.debug("copy-up %s: %d bytes by %s in %.3f s", rel, ctx.src.st.st_size, ctx.method, elapsed)
        return entry

    def _mode_back(self, ctx: CopyUpContext, rel: str) -> None:
        """A copy-up that made a chmod (``ctx.mode``: one pass) failed after its rename (the
        parent's fsync, its readable fd at the fd limit): the copy in place gets the source's
        mode back, so the error the chmod answers comes with no chmod made, as the generic
        path's (whose chmod never ran). Best effort: a failure here is logged, the copy-up's
        own error answered (the copy keeps the chmod's mode then, as after a kill -9)."""
        mode = stat.S_IMODE(self.ownership.on_disk(self.ownership.stored_entry(ctx.src)).mode)
        try:
            self.upper.do_chmod(rel, mode, by_name=True)
        except OSError as e:
            log.warning("copy-up of %s failed after its rename; the chmod made by it not undone: %s",
                        rel, e)

    @scopes.contextmanager
    def _in_place(self, key, rel: str, *, metadata_only: bool = False, filled: bool = False,
                  held: DirFd | None = None, name: str = "", ctx: CopyUpContext | None = None):
        """Yields ``placed``, to call once the copy is at ``rel`` (the point of no return).
        From then on the name resolves to the copy, so the object's inode and kernel node
        move to it (``on_copied``) at the end of the block even if a later step fails (a
        parent's fsync, its times): open handles must follow the name, or one opened
        before would keep reading the file below while writes go to the copy. ``filled``:
        the data copy-up of a metacopy file, which changed its attributes (``on_copied``'s).
        ``held``: the parent's fd (found in this lock hold), the copy's stat read through it
        as entry ``name``. ``ctx``: the copy-up's, whose copy's owner that stat checks where
        its chown was not made (``CopyUpContext.owned``: ``_owner_fixed``)."""
        placed = _Placed()
        try:
            yield placed
        finally:
            if not placed.done:
                st = None
            elif held is not None:
                st = self.upper.stat_at(held, name)
            else:
                st = self.upper.lstat(rel)
            if st is not None and ctx is not None and ctx.owned is not None \
                    and (st.st_uid, st.st_gid) != ctx.owned:
                st = self._owner_fixed(ctx, rel, st) or st
            if st is not None:
                if stat.S_ISDIR(st.st_mode):
                    self.lookup.invalidate(rel)  # its cached node misses the upper dir
                placed.entry = Entry(self.upper, rel, st)
                self._on_copied(key, placed.entry, metadata_only=metadata_only, filled=filled)

    def _owner_fixed(self, ctx: CopyUpContext, rel: str, st: os.stat_result) -> os.stat_result | None:
        """The copy at ``rel`` (stat ``st``), installed without its chown (``ctx.owned``), was
        not created with the owner the mount's first copy was (``workdir/work`` given another
        group or the setgid bit behind the mount's back): chowned now, with what a chown
        drops put back (the setuid/setgid bits, ``security.capability``), made durable, and
        the creation owner learnt again. Returns its stat; None where that failed (logged:
        the copy-up is in place, and its rename not undone)."""
        uid, gid = ctx.owned  # type: ignore[misc]
        log.warning("copy-up of %s: the copy was created owned by %d:%d, not %d:%d as before: "
                    "chowned after its install (%s/%s changed?)", rel, st.st_uid, st.st_gid,
                    uid, gid, self.work.path, WORK_DIR)
        self._created = (st.st_uid, st.st_gid)
        upper, src = self.upper, ctx.src
        try:
            upper.do_chown(rel, uid, gid, by_name=True)
            names = src.xattrs if src.xattrs is not None else src.layer.listxattr(src.rel)
            if CAPABILITY_XATTR in names:
                value = src.layer.getxattr(src.rel, CAPABILITY_XATTR)
                if value is not None:
                    upper.do_setxattr(rel, CAPABILITY_XATTR, value)
            upper.do_chmod(rel, stat.S_IMODE(st.st_mode), by_name=True)
            if not self.volatile:
                fd = upper.open(rel, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            return upper.lstat(rel)
        except OSError as e:
            log.error("copy-up of %s: its owner not set to %d:%d: %s", rel, uid, gid, e)
            return None

    @scopes.contextmanager
    def _parent_times_kept(self, rel: str, debug: bool = True, held: DirFd | None = None):
        """Copy-up is not a change of the parent directory: keep its atime and mtime
        (the kernel's ``ovl_set_timestamps``). ``debug``: ``Layer._change``'s; ``held``: the
        parent's fd a cache holds, found in this lock hold: its times read and set through
        it (``fstat``, ``futimens`` of its readable fd: ``Layer.readable_dir``). A plain
        user's daemon may not open its own upper directory of mode 0300 for reading (EACCES),
        nor any daemon one at the fd limit (EMFILE): then by name, as where no cache holds it
        (and no readable fd kept or counted).
        Setting them is best effort, as the kernel's (which ignores the error: a parent
        owned by another user, an append-only one, EIO): the copy is in place by then and
        the copy-up done; only the read of them before it fails it."""
        parent = split(rel)[0]
        upper = self.upper
        if held is not None:
            st = os.fstat(held.fd)
        else:
            st = upper.lstat(parent)
        yield
        if st is None:
            return
        ns = (st.st_atime_ns, st.st_mtime_ns)
        try:
            if held is not None:
                try:
                    fd = upper.readable_dir(held, parent)
                except OSError as e:  # (EACCES; EMFILE after ``retrying``: none needed by name)
                    log.debug("copy-up %s: the parent's times by name: %s", rel, e)
                else:
                    upper.do_futime(fd, parent, ns, debug)
                    return
            upper.do_utime(parent, ns, by_name=True, debug=debug)
        except OSError as e:
            log.debug("copy-up %s: the parent's times not kept: %s", rel, e)

    def _install_indexed(self, ctx: CopyUpContext) -> Entry:
        """index=on: the copy becomes ``index/<key>``, and the name a hard link to it.
        Called with the namespace lock held."""
        assert self.index is not None and ctx.index_key is not None
        index_rel = self.index.rel(ctx.index_key)
        self.index.set_nlink(ctx.tmp, ctx.src.st.st_nlink)  # synced again once linked
        try:
            do_rename(self.work, ctx.tmp, self.work, index_rel, sysapi.RENAME_NOREPLACE)
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
            self._discard(ctx.tmp)  # another name got there first: share its copy
        self.stats.copy_up(ctx.method)
        return self._link_index(ctx.node, index_rel)

    def _link_index(self, node: Node, index_rel: str) -> Entry:
        """The name ``node.rel`` a hard link to the index entry ``index_rel``. One still
        marked metacopy (a metadata-only copy-up's, overlaypc's or the kernel's) holds no
        data yet: the name's inode keeps reading below (``_in_place``'s
        ``metadata_only``) until its data copy-up, which drops the mark under this lock."""
        rel = node.rel
        with self._installing():
            now = self.lookup.lookup(rel)
            if now.upper is not None:
                return now.upper
            metadata_only = self.work.getxattr(index_rel, self.prefix + "metacopy") is not None
            # a name moved from lower to upper: the same overlay count, one more link of the
            # index inode; the count is relative to the lower file's links across the link
            lower = next(iter(node.lowers), None)
            impure.mark(self.upper, split(rel)[0], self.prefix)  # before the name: ``impure``
            if lower is not None:
                self.index.before_link_up(index_rel, lower.st)
            with self._in_place(self._key_of(node), rel, metadata_only=metadata_only) as placed:
                with self._parent_times_kept(rel):
                    do_link(self.work, index_rel, self.upper, rel)
                    placed()
                self.index.sync(index_rel, lower.st if lower is not None else None)
                if not self.volatile:
                    self.upper.fsync_dir(split(rel)[0])
            entry = placed.result()
        log.debug("copy-up %s: linked to %s", rel, index_rel)
        return entry

    def _copy_data_in_place(self, node: Node) -> Entry:
        """Complete a metacopy upper file: data in, fsync, then drop the metacopy mark.

        Until the mark is removed, lookups keep reading the lower data, which is the same,
        so a crash in between only leaves a metacopy file as before."""
        assert node.upper is not None and node.data is not None
        upper, data = node.upper, node.data
        ctx = CopyUpContext(node, data, self._key_of(node), upper.rel)
        dst_fd = self.upper.open(upper.rel, os.O_WRONLY)
        try:
            with self._filling(upper.rel, os.fstat(dst_fd)):
                # the mark, looked at under the file's lock: gone when the data came in
                # through another name of the file meanwhile (an upper hard link, the
                # kernel's ``ln`` of a metacopy file; a nameless one, ``copy_data_nameless``),
                # which may have been written since: not copied over again
                if self.upper.getxattr_fd(dst_fd, self.prefix + "metacopy") is not None:
                    self._fill_metacopy(ctx, dst_fd, durable=not self.volatile)
                with self._installing(), \
                        self._in_place(self._key_of(node), upper.rel, filled=True) as placed:
                    # the mark alone goes: a redirect (a renamed file's, to its data) stays,
                    # as the kernel's (never followed from a file without the mark)
                    try:
                        self.upper.do_removexattr(upper.rel, self.prefix + "metacopy")
                    except OSError as e:
                        if e.errno != errno.ENODATA:
                            raise
                    placed()  # without the mark, lookups read the data here
        finally:
            os.close(dst_fd)
        entry = placed.result()
        self.stats.copy_up(ctx.method)
        log.debug("metacopy data copy-up %s: %d bytes by %s", node.rel, data.st.st_size, ctx.method)
        return entry

    def _filling(self, rel: str, st: os.stat_result):
        """The lock of data copy-ups of the metacopy upper file ``st`` (at ``rel``), held
        from the look at its mark to the mark's removal: its names (an upper hard link
        the kernel's ``ln`` made, the name a nameless one had) take different stripes,
        and a second copy of the lower data, after the first one's mark went and a write
        came, would overwrite that write. Under ``refusing`` as a stripe lock is."""
        return self._stripe(rel, fill=(st.st_dev, st.st_ino))

    def _fill_metacopy(self, ctx: CopyUpContext, dst_fd: int, *, durable: bool,
                       keep_times: bool = False) -> None:
        """The data of ``ctx.src`` (a metacopy file's lower data) into its upper file, open
        as ``dst_fd``, its ``security.capability`` kept; fsynced if ``durable``. Its mtime
        is the copy's (a write of the file, the ctime's too), as the kernel's data copy-up
        (``ovl_copy_up_meta_inode_data``, at an open for writing or a truncate) leaves it,
        even if no byte is written after; ``keep_times``: set back (the data copy-up of a
        hard link, which overlaypc makes and the kernel does not: the kernel's link keeps
        the mtime). The metacopy mark stays: the caller drops it after (the crash argument
        above)."""
        rel = ctx.tmp  # (the upper file's name, for messages)
        kept = os.fstat(dst_fd) if keep_times else None
        # writing the data drops security.capability (a write kills privileges, even
        # the root daemon's): read before, set again after, as the kernel's
        # ``ovl_copy_up_meta_inode_data``, before the mark goes; after a failed copy
        # too, so the file stays the metacopy file it was (a kill -9 between the
        # copy and the setxattr loses it: the kernel has the same window)
        capability = self.upper.getxattr_fd(dst_fd, CAPABILITY_XATTR)
        try:
            self._copy_from(ctx, ctx.src, dst_fd)
        except BaseException:
            if capability is not None:
                with scopes.suppress(OSError):  # (the copy's own error is answered)
                    self.upper.do_fsetxattr(dst_fd, rel, CAPABILITY_XATTR, capability)
            raise
        if capability is not None:
            self.upper.do_fsetxattr(dst_fd, rel, CAPABILITY_XATTR, capability)
        if kept is not None:
            os.utime(dst_fd, ns=(kept.st_atime_ns, kept.st_mtime_ns))
        if durable:
            os.fsync(dst_fd)

    def copy_data_nameless(self, inode: OverlayInode, rebound: "Callable[[Entry], None]", *,
                           keep_times: bool = False) -> None:
        """The data copy-up of an open metacopy file whose name went (its data still below,
        ``inode.meta_file`` its upper file): the data into that upper file, reached
        through its held ``O_PATH`` fd (it has no name to open it by), then its metacopy
        mark dropped, as ``_copy_data_in_place``; then ``rebound(the upper file's entry)``
        under the namespace lock (the inode moves to it, its handles follow). Nothing to
        do when another thread did it first. Serialised with copy-ups of the name it had
        (the stripe of ``inode.meta_rel``) and with data copy-ups of the upper file through
        any name of it (``_filling``). Crash: the same order as a named file's; an
        upper file with no name left is freed by the upper filesystem anyway, and one that
        has one (a name the kernel never looked up) stays a metacopy file until the mark
        goes."""
        meta, rel = inode.meta_file, inode.meta_rel
        if meta is None or rel is None or not meta.layer.writable:  # (never a lower file)
            raise OSError(errno.EROFS, "a metacopy file whose upper file was not kept")
        with self._stripe(rel):
            if inode.in_upper:
                return  # (copied meanwhile)
            data_st = inode.layer.lstat(inode.rel)  # a lower file: its path never changes
            if data_st is None or (data_st.st_dev, data_st.st_ino) != inode.backing:
                raise OSError(errno.ESTALE, "the lower data of a metacopy file moved", rel)
            data = Entry(inode.layer, inode.rel, data_st)
            dst_fd = os.open(f"/proc/self/fd/{meta.fd}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(dst_fd)
                with self._filling(rel, st):
                    with self.ns_lock:  # (a data copy-up by a name of it rebinds under it)
                        if inode.in_upper:
                            return  # (done by a name the table never held, meanwhile)
                        if self.upper.getxattr_fd(dst_fd, self.prefix + "metacopy") is None:
                            raise OSError(errno.ESTALE, "the upper file of a metacopy file "
                                          "lost its mark behind the mount", rel)
                    ctx = CopyUpContext(Node(rel, (data,)), data, inode.key, rel)
                    self._fill_metacopy(ctx, dst_fd, keep_times=keep_times,
                                        durable=not self.volatile and st.st_nlink > 0)
                    with self._installing():
                        try:  # (the mark alone, as ``_copy_data_in_place``)
                            os.removexattr(dst_fd, self.prefix + "metacopy")
                        except OSError as e:
                            if e.errno != errno.ENODATA:
                                raise
                        rebound(Entry(meta.layer, rel, os.fstat(dst_fd)))
            finally:
                os.close(dst_fd)
        self.stats.copy_up(ctx.method)
        log.debug("metacopy data copy-up of nameless %s: %d bytes by %s", rel, data_st.st_size,
                  ctx.method)

    def _discard(self, tmp: str) -> None:
        try:
            self.work.do_remove_tree(tmp)
        except OSError as e:
            log.warning("could not remove %s/%s: %s", self.work.path, tmp, e)


class _Placed:
    """``CopyUp._in_place``'s flag: called once the copy is in place; ``entry`` is the
    copy's entry once the block ends."""
    __slots__ = ("done", "entry")

    def __init__(self) -> None:
        self.done = False
        self.entry: Entry | None = None

    def __call__(self) -> None:
        self.done = True

    def result(self) -> Entry:
        if self.entry is None:
            raise OSError(errno.EIO, "the copy left its place during copy-up")
        return self.entry
