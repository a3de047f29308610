"""Directory listings served without a directory handle (handle 0).

Owns: the snapshots of merged listings that READDIR and READDIRPLUS serve, and the count of
open directories that decides which handle gets the kernel's listing cache (``OpenDirs``).
OPENDIR was answered ENOSYS once where the kernel offers ``NO_OPENDIR_SUPPORT`` (it then
opens every directory itself with KEEP_CACHE and CACHE_DIR, no RELEASEDIR: two round trips
less per directory opened), but a reader of the kernel's cache could then be cut short by
another's refill (``OpenDirs``); OPENDIR is answered since (dircache14), with handle 0, and
in every mode since fix15a: a plain user's ``allow_root`` mount (``deny_others``, which
refuses other users at OPENDIR) and a kernel without NO_OPENDIR_SUPPORT had real handles
whose listings kept positions as cookies and all got the cache, so both defects below stayed
there. Every listing request comes with handle 0. The listing's identity
travels in the cookies instead: a listing read at
offset 0 becomes a snapshot with an id, and each entry's cookie (the offset the kernel
sends back for the next chunk, and telldir(3) gives) is ``id << KEY_BITS | key``, where
the key comes from the entry's name alone (``ordered``; "." and ".." are 1 and 2) and a
snapshot lists its entries in key order. Every lister continues in its own snapshot, as
with a handle, and the snapshot carries the epochs read before the listing (READDIRPLUS
trusts a listed stat only while no identity moved and no name changed since).

Keys, not positions (soak13): a lister whose snapshot is gone continues in a fresh reading
of the directory after its cookie's key, so a name there all along is listed once, however
the directory changed before it. That happens without any seekdir(3): the kernel keeps a
directory's listing in its page cache (CACHE_DIR) with the cookies of the snapshot that
filled it, dropped at its end; when a change voids that cache, a lister reading from it
goes on with READDIR at such a cookie. With positions, every name removed (added) before
the position meanwhile made one name later on missed (listed twice): hundreds in a large
directory under change (stress_mount BIGDIR). Two names of one key (1 in 2**43 a pair) are
told apart in a snapshot (the second takes the next free key); a fresh reading may then
miss one of them at a chunk's boundary.

Bound: ``MAX_SNAPSHOTS`` listings and ``MAX_ENTRIES`` entries in all, least recently used
dropped first, but never the one just kept (its lister needs it for its next chunk, however
large: the kernel overlay keeps a directory's whole merged listing too); a snapshot is
dropped when its end has been served (the kernel reads until an empty reply). One entry
costs about 200 bytes, 790 with the attributes a READDIRPLUS listing keeps (every listing
here: no READDIRPLUS_AUTO), measured with tracemalloc (17-byte names).

Caveat: a lister whose snapshot is gone (more than ``MAX_SNAPSHOTS`` listings in progress,
or more than ``MAX_ENTRIES`` entries in them, or a cookie from the kernel's cache or
seekdir(3) after the end) gets the directory read again from its cookie's key, as above;
listers of large directories whose listings together pass ``MAX_ENTRIES`` each read the
directory again at each chunk while the others go on. A cookie naming another directory's
snapshot counts as gone. The keys come from Python's ``hash`` of the name, salted per
process: cookies mean nothing to another daemon (nor do snapshot ids).
"""
from __future__ import annotations

import itertools
import threading
from _bisect import bisect_right  # bisect.py itself adds ~0.06 ms to a mount's start
from collections import OrderedDict
from operator import itemgetter

from .records import record
from .typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    from .readdir import DirEntry

#: at most this many listings are kept between READDIR requests
MAX_SNAPSHOTS = 64
#: at most this many entries in all (about 200 MiB at READDIRPLUS), less the listing just
#: read, are kept by the snapshots between READDIR requests
MAX_ENTRIES = 1 << 18
#: a cookie's low bits: the key of its entry's name (0: the start of a listing)
KEY_BITS = 43
_KEY_MASK = (1 << KEY_BITS) - 1
#: the keys of "." and "..", then the first of the names'
_FIRST_KEY = 3
#: keys left free at the top, for names whose key an earlier one has (``ordered``)
_ROOM = 1 << 16
#: snapshot ids stay below this, so cookies stay positive as a signed 64-bit offset
_ID_LIMIT = 1 << (63 - KEY_BITS)


@record
class Snapshot:
    """One merged listing as read at offset 0."""
    nodeid: int
    #: ``OverlayOps._listing_epoch`` read before the listing
    epoch: tuple[int, int]
    entries: list[DirEntry]
    #: ``st_ino`` of the directory and of its parent (the "." and ".." entries)
    dots: tuple[int, int]
    #: the entries' keys, ascending (``ordered``)
    keys: list[int]

    @classmethod
    def of(cls, nodeid: int, epoch: tuple[int, int], entries: list[DirEntry],
           dots: tuple[int, int]) -> "Snapshot":
        """A snapshot of ``entries``, put in key order."""
        entries, keys = ordered(entries)
        return cls(nodeid, epoch, entries, dots, keys)

    def after(self, key: int) -> int:
        """Position (0, 1: the dots; 2 on: the entries) of the first item after ``key``."""
        if key < _FIRST_KEY:
            return key
        return 2 + bisect_right(self.keys, key)


#: a name's key is ``_FIRST_KEY + hash(name) % _KEY_SPAN``
_KEY_SPAN = (1 << KEY_BITS) - _FIRST_KEY - _ROOM
_first, _third = itemgetter(0), itemgetter(2)


def ordered(entries: list[DirEntry]) -> tuple[list[DirEntry], list[int]]:
    """``entries`` in key order, and their keys: a name's from its hash alone, so any
    reading of the directory agrees (a name whose key an earlier one has takes the next
    free one: distinct within a snapshot). (Built with ``map`` and ``zip``, no Python
    code per entry: one listing's entries, every READDIR of a directory.)"""
    names = list(map(_first, entries))
    # (``_FIRST_KEY + hash(name) % _KEY_SPAN`` of each name)
    keyed = sorted(zip(map(_FIRST_KEY.__add__, map(_KEY_SPAN.__rmod__, map(hash, names))),
                       names, entries))
    keys = list(map(_first, keyed))
    if len(set(keys)) != len(keys):  # two names of one key: each later one takes the next free
        last = 0
        for i, key in enumerate(keys):
            last = keys[i] = key if key > last else last + 1
    return list(map(_third, keyed)), keys


def split_cookie(offset: int) -> tuple[int, int]:
    """(snapshot id, key) of a cookie; key 0 starts a listing."""
    return offset >> KEY_BITS, offset & _KEY_MASK


class Snapshots:
    def __init__(self, limit: int = MAX_SNAPSHOTS, max_entries: int | None = None) -> None:
        self.limit = limit
        self.max_entries = MAX_ENTRIES if max_entries is None else max_entries
        #: entries of the snapshots kept
        self.entries = 0
        self._kept: OrderedDict[int, Snapshot] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, snap: Snapshot) -> int:
        """Keep ``snap``; its id (the high bits of its entries' cookies)."""
        with self._lock:
            sid = next(self._ids)
            if sid >= _ID_LIMIT:  # (the ids kept are the last MAX_SNAPSHOTS made)
                self._ids = itertools.count(2)
                sid = 1
            self._kept[sid] = snap
            self.entries += len(snap.entries)
            while len(self._kept) > 1 and (len(self._kept) > self.limit
                                           or self.entries > self.max_entries):
                self.entries -= len(self._kept.popitem(last=False)[1].entries)
            return sid

    def get(self, sid: int, nodeid: int) -> Snapshot | None:
        """Snapshot ``sid`` if it is kept and lists directory ``nodeid``."""
        with self._lock:
            snap = self._kept.get(sid)
            if snap is None or snap.nodeid != nodeid:
                return None
            self._kept.move_to_end(sid)
            return snap

    def done(self, sid: int) -> None:
        """Its end was served."""
        with self._lock:
            snap = self._kept.pop(sid, None)
            if snap is not None:
                self.entries -= len(snap.entries)


class OpenDirs:
    """The directories open through the mount, counted per nodeid (OPENDIR less
    RELEASEDIR), to grant the kernel's listing cache (CACHE_DIR) to one handle at a time.

    Why (dircache14): a CACHE_DIR reader at offset 0 that sees the directory changed voids
    the kernel's cache and fills it anew; another CACHE_DIR reader in the middle of the old
    one then starts the new cache from its beginning, skipping entries until one has its
    cookie. If none has (its name went), the kernel asks the daemon from that cookie, except
    where the new cache ends exactly at a page's end: then it answers the end of the
    directory, and every name after the reader's position is missed. A handle without
    CACHE_DIR neither reads, voids nor fills the cache (its chunks come from the snapshots
    here), so with one CACHE_DIR handle per directory at a time no reader can be overtaken
    by a refill. A RELEASEDIR may come after the close(2) that caused it: the next open
    meanwhile goes without the cache, which is only slower."""

    def __init__(self) -> None:
        self._open: dict[int, int] = {}
        self._lock = threading.Lock()

    def open(self, nodeid: int) -> bool:
        """Count one more handle of ``nodeid``; whether it is the only one (may cache)."""
        with self._lock:
            n = self._open.get(nodeid, 0)
            self._open[nodeid] = n + 1
            return n == 0

    def release(self, nodeid: int) -> None:
        with self._lock:
            n = self._open.get(nodeid, 0) - 1
            if n > 0:
                self._open[nodeid] = n
            else:
                self._open.pop(nodeid, None)

    def __len__(self) -> int:
        return len(self._open)
