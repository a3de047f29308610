"""The session: INIT, the request loop on worker threads, replies, notifications.

Owns one FUSE connection's conversation. ``handshake`` answers INIT with what both the
kernel and the filesystem want; ``serve`` then runs worker threads, each reading requests
from its own fd (the first from the channel's fd, the others from clones) and writing
every reply to the fd its request came from (cloned fds have their own reply queues).
How many workers run is ``pool``'s rule: one per usable CPU, more while requests block;
a worker added for that retires later and closes its clone.
Each request is decoded here, handed to the ``Operations`` method by nodeid or
(parent, name), and its result encoded; ``OSError`` becomes its errno, anything else is
logged and answered EIO, so no operation ends the daemon.

Protocol rules kept here (the filesystem keeps the rest, see ``ops``): a reply whose write
fails with ENOENT was to an interrupted request, and the kernel took nothing: the entry's
reference is forgotten and an opened handle released, since no FORGET or RELEASE will
come. READDIRPLUS takes references only for the entries that fit in the reply, never for
``.``/``..``, all in one ``Operations.take_entries`` call per reply. INTERRUPT is ignored
(every operation runs to completion, so no EINTR is ever answered after a side effect).
An attribute-only INVAL_INODE is written by the request's worker before its reply; other
notifications go through a queue to their own thread: written from inside a request they
could wait on a lock the kernel holds for that request. The loop ends when reads fail
with ENODEV (unmounted, or the connection aborted).

Caveat: with ``deny_others`` (libfuse's ``allow_root`` for a plain user's mount) requests
from anyone but the owner and root are refused EACCES, except those libfuse lets through.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import _struct as struct  # (struct.py only re-exports _struct: ~0.15 ms of a start)
import threading
import time
from collections.abc import Callable
from _queue import SimpleQueue  # queue.SimpleQueue itself: queue.py (and heapq) add ~0.25 ms to a start

from . import protocol as p
from .. import faults, logs
from ..records import field, record
from .ops import ConnInfo, DirItem, Entry, Opened, Operations, Request, fopen_flags
from .pool import MAX_EXTRA, Pool, Slot, usable_cpus

log = logs.get("overlaypc.engine")

#: default request size for READ and WRITE (256 pages)
MAX_WRITE = 1 << 20
#: how long ``serve`` waits for the first request's answer before starting the clones
CLONE_DELAY = 0.05

_DENY_EXEMPT = frozenset((p.INIT, p.READ, p.WRITE, p.FSYNC, p.RELEASE, p.READDIR, p.FSYNCDIR,
                          p.RELEASEDIR, p.NOTIFY_REPLY, p.READDIRPLUS, p.FORGET, p.BATCH_FORGET,
                          p.INTERRUPT, p.DESTROY))


_READ, _WRITE, _FORGET, _OPENDIR, _RELEASEDIR = p.READ, p.WRITE, p.FORGET, p.OPENDIR, p.RELEASEDIR
_GETATTR, _GETATTR_FH = p.GETATTR, p.GETATTR_FH
_LOOKUP, _UNLINK = p.LOOKUP, p.UNLINK
_MKDIR, _RMDIR = p.MKDIR, p.RMDIR
_unpack_mkdir = p.MKDIR_IN.unpack_from
#: where a MKDIR's name starts
_MKDIR_NAME = p.IN_HEADER.size + p.MKDIR_IN.size
#: a LOOKUP's reply, its header included
_ENTRY_REPLY_SIZE = p.OUT_HEADER.size + p.ENTRY_OUT.size
_unpack_getattr = p.GETATTR_IN.unpack_from
#: a GETATTR's reply, its header included
_ATTR_REPLY_SIZE = p.OUT_HEADER.size + p.ATTR_OUT.size
_unpack_header = p.IN_HEADER.unpack_from
_pack_out = p.OUT_HEADER.pack
_OUT_SIZE = p.OUT_HEADER.size
_BODY = p.IN_HEADER.size
#: fh, offset, size: the head of ``fuse_read_in``
_unpack_read = struct.Struct("<QQI").unpack_from
#: fh, offset, size, write_flags: the head of ``fuse_write_in``
_unpack_write = struct.Struct("<QQII").unpack_from
#: fh: the head of ``fuse_release_in``; nlookup: ``fuse_forget_in``
_unpack_fh = _unpack_nlookup = struct.Struct("<Q").unpack_from
#: a reply with no body (its header only)
_EMPTY_SIZE = p.OUT_HEADER.size
_SETATTR, _GETXATTR, _RELEASE, _READDIRPLUS = p.SETATTR, p.GETXATTR, p.RELEASE, p.READDIRPLUS
_OPEN = p.OPEN
_BATCH_FORGET = p.BATCH_FORGET
_unpack_batch_count = p.BATCH_FORGET_IN.unpack_from
#: where a BATCH_FORGET's (nodeid, nlookup) pairs start, and each one's size
_BATCH_PAIRS = _BODY + p.BATCH_FORGET_IN.size
_FORGET_ONE_SIZE = p.FORGET_ONE.size
_iter_forget_one = p.FORGET_ONE.iter_unpack
_unpack_open = p.OPEN_IN.unpack_from
_pack_open = p.OPEN_OUT.pack
#: an OPEN's reply, its header included
_OPEN_REPLY_SIZE = p.OUT_HEADER.size + p.OPEN_OUT.size
#: ``fopen_flags`` by ``Opened``'s six booleans (``Session._short_open_flags``; filled as met)
_OPEN_FLAGS_BY_BOOLS: dict[tuple, int] = {}
_FOPEN_PASSTHROUGH = p.FOPEN_PASSTHROUGH
_CREATE = p.CREATE
_unpack_create = p.CREATE_IN.unpack_from
#: where a CREATE's name starts; its reply's size, the header included
_CREATE_NAME = _BODY + p.CREATE_IN.size
_CREATE_REPLY_SIZE = p.OUT_HEADER.size + p.CREATE_OUT_SIZE
_unpack_setattr = p.SETATTR_IN.unpack_from
#: fh, flags: the head of ``fuse_release_in``
_unpack_release = struct.Struct("<QI").unpack_from
#: where a GETXATTR's name starts, and the one ``Operations.capability_node`` answers
_XATTR_NAME = _BODY + p.GETXATTR_IN.size
_CAPABILITY = b"security.capability\0"
_unpack_getxattr = p.GETXATTR_IN.unpack_from
_pack_getxattr_out = p.GETXATTR_OUT.pack
_GETXATTR_SIZE = p.OUT_HEADER.size + p.GETXATTR_OUT.size
#: the replies to an OPENDIR through ``Operations.opendir_zero`` (handle 0): without and
#: with the kernel's listing cache, and their length with the header
_OPEN_ZERO = (p.pack_open(0, p.FOPEN_KEEP_CACHE),
              p.pack_open(0, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR))
_OPEN_ZERO_SIZE = p.OUT_HEADER.size + p.OPEN_OUT.size
#: a named tuple made from a tuple of its fields without its ``__new__`` (half the cost;
#: one header and one ``Request`` per request)
_tuple_new = tuple.__new__
_InHeader = p.InHeader


class ProtocolError(Exception):
    """The kernel's INIT cannot be served (an incompatible protocol version)."""


@record
class _Reply:
    """What a handler answers: buffers to write after the header, and what to undo if
    the kernel never receives it."""
    parts: list = field(default_factory=list)
    undo: Callable[[], None] | None = None


_EMPTY = _Reply()
#: the names of the entries READDIRPLUS never takes a reference for
_DOTS = (b".", b"..")


class Notifications:
    """The ``ops.Notifier`` of a session. An attribute-only INVAL_INODE (``offset`` < 0) is
    written at once by the thread that asks, the request's worker, so it reaches the kernel
    before that request's reply: the kernel takes no inode lock for it (``killsb`` read,
    the inode's attribute version and validity, its cached ACLs), so it cannot wait on the
    lock the kernel holds for the very request. Every other notification (pages, entries,
    deletions: those take inode or directory locks) is queued, written by one thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: SimpleQueue[bytes | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fuse-notify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread.ident is not None:  # (a session that ended before starting it)
            self._thread.join(timeout=5)

    def inval_inode(self, nodeid: int, offset: int = 0, length: int = 0) -> None:
        if offset < 0:
            self._write(p.notify_inval_inode(nodeid, offset, length))
        else:
            self._queue.put(p.notify_inval_inode(nodeid, offset, length))

    def inval_entry(self, parent: int, name: bytes) -> None:
        self._queue.put(p.notify_inval_entry(parent, name))

    def delete(self, parent: int, child: int, name: bytes) -> None:
        self._queue.put(p.notify_delete(parent, child, name))

    def _run(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            try:
                if faults.armed:
                    faults.hit("notify.queued")
            except OSError as e:
                log.debug("notification failed: %s", e)
                continue
            if not self._write(msg):
                return

    def _write(self, msg: bytes) -> bool:
        """Write one notification; False once the connection has ended (ENODEV)."""
        try:
            os.write(self._fd, msg)
        except OSError as e:
            if e.errno == errno.ENODEV:
                return False
            # ENOENT: the kernel does not cache that inode or name; nothing to drop
            if e.errno != errno.ENOENT:
                log.debug("notification failed: %s", e)
        return True


def _buffer(size: int) -> memoryview:
    """A writable buffer whose pages the kernel supplies as they are first written (an
    anonymous mapping): a ``bytearray`` is zero-filled at once, ~0.9 ms for a worker's two
    (1 MiB each) before it could read its first request, and resident for good."""
    return memoryview(mmap.mmap(-1, size))


class Session:
    """One connection's request loop over ``ops``; ``fd`` is the channel's fd,
    ``clone`` makes another fd on the same connection and ``close_clone`` closes one
    (a retired worker's). ``workers``: how many always run (default: one per usable CPU);
    up to ``max_extra`` more run while requests block (see ``pool``)."""

    def __init__(self, ops: Operations, fd: int, *, clone: Callable[[], int] | None = None,
                 close_clone: Callable[[int], None] | None = None,
                 workers: int | None = None, max_extra: int = MAX_EXTRA,
                 max_write: int = MAX_WRITE, deny_others: int | None = None,
                 clone_delay: float = CLONE_DELAY, **pool_kw) -> None:
        self.ops = ops
        self.fd = fd
        self._clone = clone
        self._close_clone = close_clone if close_clone is not None else os.close
        base = usable_cpus() if workers is None else workers
        self.pool = Pool.sized(base if clone is not None else 1,
                               max_extra if clone is not None else 0, **pool_kw)
        self.max_write = max_write
        self.deny_others = deny_others
        self.conn: ConnInfo | None = None
        self.notifier = Notifications(fd)
        #: the worker threads started (those ended are dropped as new ones start)
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._names = iter(range(1 << 62))
        #: set once a worker has answered a request, or stopped (``serve`` then clones)
        self._first_done = threading.Event()
        self.clone_delay = clone_delay
        self._handlers = self._handler_table()
        self._read_fh = ops.read_fh
        self._getattr_node = ops.getattr_node
        self._opendir_zero: Callable[[int], bool] | None = None
        self._releasedir_zero: Callable[[int], None] | None = None
        self._bind_zero_opendir()
        self._setxattr_ext = False
        self._shorts: dict[int, Callable[[int, tuple, memoryview], bool]] = {}
        self._bind_shorts()
        #: set when the connection has ended (the watch ends)
        self._stopped = False
        self._watcher: threading.Thread | None = None  # the pool's watch, while it runs
        ops.notifier = self.notifier

    # -- INIT ---------------------------------------------------------------------------------
    def handshake(self) -> ConnInfo:
        """Read INIT and answer it. Returns what was negotiated."""
        buf = _buffer(max(p.MIN_BUFFER, p.WRITE_DATA + self.max_write) + p.PAGE)
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                raise
            hdr = p.decode_header(buf)
            body = buf[p.IN_HEADER.size:n]
            if hdr.opcode != p.INIT:
                log.warning("request %s before INIT; answering EIO", p.OPCODE_NAMES.get(hdr.opcode))
                self._write(self.fd, hdr.unique, -errno.EIO, ())
                continue
            init = p.InitIn.decode(body)
            if init.major > p.KERNEL_MAJOR:
                # the kernel retries INIT with our major
                out = p.InitOut(p.KERNEL_MAJOR, p.KERNEL_MINOR, 0, 0, 0, 0, 0, 0, 0)
                self._write(self.fd, hdr.unique, 0, (out.encode()[:8],))
                continue
            if init.major < p.KERNEL_MAJOR or init.minor < p.MIN_MINOR:
                self._write(self.fd, hdr.unique, -errno.EPROTO, ())
                raise ProtocolError(f"kernel FUSE protocol {init.major}.{init.minor} is older "
                                    f"than 7.{p.MIN_MINOR}")
            return self._negotiate(hdr.unique, init)

    def _negotiate(self, unique: int, init: p.InitIn) -> ConnInfo:
        conn = ConnInfo(init.major, init.minor, init.flags, max_write=self.max_write,
                        max_readahead=init.max_readahead)
        if self.deny_others is not None:
            # other users are refused at OPENDIR: a kernel that opened directories itself
            # would send their listings (handle 0, exempt below) with nothing checked
            conn.offered &= ~p.NO_OPENDIR_SUPPORT
        self.ops.init(conn)
        self._bind_zero_opendir()  # (the filesystem may set its hooks at ``init``)
        self._getattr_node = self.ops.getattr_node
        self._bind_shorts()
        wanted = conn.wanted & init.flags
        if wanted >> 32 and not init.flags & p.INIT_EXT:
            wanted &= 0xFFFFFFFF
        conn.wanted = wanted
        self._setxattr_ext = bool(wanted & p.SETXATTR_EXT)
        max_write = min(conn.max_write, self.max_write)
        out = p.InitOut(p.KERNEL_MAJOR, min(p.KERNEL_MINOR, init.minor),
                        min(conn.max_readahead, init.max_readahead), wanted,
                        conn.max_background, conn.max_background * 3 // 4, max_write,
                        conn.time_gran, max_write // p.PAGE if wanted & p.MAX_PAGES else 0,
                        conn.max_stack_depth)
        self._write(self.fd, unique, 0, (out.encode(),))
        if wanted & p.PASSTHROUGH:
            conn.backing = Backing(self.fd)  # the ioctls work only after the INIT reply
        self.conn = conn
        log.debug("INIT: kernel %d.%d, flags %#x of %#x", init.major, init.minor, wanted, init.flags)
        self.ops.initialized(conn)
        return conn

    def _bind_shorts(self) -> None:
        """The short handlers ``dispatch`` tries by opcode before the generic path (each
        True when it answered, False to go on): those of the filesystem's hooks that are
        set (``Operations.lookup_name``, ``unlink_name``, ``mkdir_name``, ``rmdir_name``,
        ``setattr_node``, ``capability_node``,
        ``release_fh``, ``forget_nodes``, ``open_node`` and ``create_name`` with ``release_fh``
        (which undoes an undelivered reply), ``readdirplus_node``); all but RELEASE's,
        BATCH_FORGET's and READDIRPLUS's not with ``deny_others``, which refuses some callers
        of the others."""
        ops, shorts = self.ops, {}
        self._setattr_node, self._capability_node = ops.setattr_node, ops.capability_node
        self._release_fh = ops.release_fh
        self._lookup_name, self._unlink_name = ops.lookup_name, ops.unlink_name
        self._create_name = ops.create_name
        self._mkdir_name, self._rmdir_name = ops.mkdir_name, ops.rmdir_name
        if self.deny_others is None:
            if self._create_name is not None and self._release_fh is not None:
                shorts[_CREATE] = self._create_short
            if self._lookup_name is not None:
                shorts[_LOOKUP] = self._lookup_short
            if self._unlink_name is not None:
                shorts[_UNLINK] = self._unlink_short
            if self._mkdir_name is not None:
                shorts[_MKDIR] = self._mkdir_short
            if self._rmdir_name is not None:
                shorts[_RMDIR] = self._rmdir_short
            if self._setattr_node is not None:
                shorts[_SETATTR] = self._setattr_short
            if self._capability_node is not None:
                shorts[_GETXATTR] = self._capability_short
        if self._release_fh is not None:  # (exempt from ``deny_others``)
            shorts[_RELEASE] = self._release_short
        self._forget_nodes = ops.forget_nodes
        if self._forget_nodes is not None:  # (exempt from ``deny_others``)
            shorts[_BATCH_FORGET] = self._batch_forget_short
        self._open_node = ops.open_node
        if self._open_node is not None and self._release_fh is not None \
                and self.deny_others is None:  # (its undo is ``release_fh``)
            shorts[_OPEN] = self._open_short
        self._readdirplus_node = ops.readdirplus_node
        if self._readdirplus_node is not None:  # (exempt from ``deny_others``)
            shorts[_READDIRPLUS] = self._readdirplus_short
        self._shorts = shorts

    def _bind_zero_opendir(self) -> None:
        """Take the filesystem's ``opendir_zero``/``releasedir_zero`` hooks (both or
        neither); never with ``deny_others``, which must see OPENDIR's caller."""
        opendir, releasedir = self.ops.opendir_zero, self.ops.releasedir_zero
        if opendir is None or releasedir is None or self.deny_others is not None:
            opendir = releasedir = None
        self._opendir_zero, self._releasedir_zero = opendir, releasedir

    # -- the loop -----------------------------------------------------------------------------
    def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Run until the connection ends. ``handshake`` must have run. ``ready`` is called
        once the first worker is started (the mount is served from then on)."""
        # the first worker serves the channel's fd at once: the mount's first requests
        # (the caller's stat that waited for INIT) need not wait for the clones, nor for
        # the notifier and the pool's watch: they start with the clones, below (a
        # notification queued meanwhile waits in the queue; a first request that blocks
        # gets the watch's extra worker after clone_delay at most)
        try:
            first = self._start_worker(self.fd, self.pool.join(extra=False))
        except BaseException:
            self._end_threads()  # no worker runs: nothing else to wait for
            raise
        if ready is not None:
            try:
                ready()
            except Exception:  # the mount is live and served: keep serving it
                log.exception("telling the mount command it is ready failed")
        # ... nor for the clones' threads to start: on 2 vCPUs cloning and starting three
        # threads while the first request waits delayed its answer by 1-2 ms. They start
        # once the first worker has answered a request (or stopped), or after clone_delay.
        self._first_done.wait(self.clone_delay)
        self.notifier.start()
        if self.pool.bound > self.pool.base:
            self._watcher = threading.Thread(target=self._watch, name="fuse-pool-watch",
                                             daemon=True)
            self._watcher.start()
        try:
            self.ops.served()
        except Exception:
            log.exception("served failed")
        try:
            for _ in range(self.pool.base - 1):
                if not first.is_alive():
                    break  # unmounted already: nothing to clone
                self._start_worker(self._clone(), self.pool.join(extra=False))
        except OSError as e:
            log.warning("cannot clone the FUSE fd (%s); serving with %d worker(s)", e,
                        len(self.pool.slots))
        try:
            # workers start later too (while others block): look again until none is alive.
            # A worker starts another before it can end, so the last look sees every one.
            while True:
                with self._threads_lock:
                    alive = [t for t in self._threads if t.is_alive()]
                if not alive:
                    break
                alive[0].join(timeout=0.5)  # short waits: signal handlers run in between
        finally:
            self._end_threads()
            try:
                self.ops.destroy()
            except Exception:
                log.exception("destroy failed")

    def _end_threads(self) -> None:
        """End the session's own threads: the pool's watch and the notifier."""
        self._stopped = True
        self.pool.all_busy.set()  # the watch ends
        self.notifier.stop()

    def _start_worker(self, fd: int, slot: Slot) -> threading.Thread:
        t = threading.Thread(target=self._worker, args=(fd, slot),
                             name=f"fuse-worker-{next(self._names)}", daemon=True)
        with self._threads_lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)  # before it runs: ``serve``'s join loop must see it
        try:
            t.start()
        except BaseException:
            with self._threads_lock:
                self._threads.remove(t)
            raise
        return t

    def _grow(self, now: float) -> None:
        """Start one more worker on a new clone (called by a worker that found every
        other one busy and one of them blocked)."""
        pool = self.pool
        slot = pool.join(extra=True)
        if slot is None:
            return  # another worker grew the pool first, or it is full
        try:
            fd = self._clone()
        except OSError as e:
            pool.leave(slot)
            pool.grow_after = now + pool.linger
            log.warning("cannot clone the FUSE fd for another worker (%s); %d serving", e,
                        len(pool.slots))
            return
        try:
            self._start_worker(fd, slot)
        except Exception as e:  # noqa: BLE001 (RuntimeError: can't start new thread)
            pool.leave(slot)
            pool.grow_after = now + pool.linger
            self._close_clone(fd)
            log.warning("cannot start another worker (%s); %d serving", e, len(pool.slots))
            return
        log.debug("a request blocks: %d workers", len(pool.slots))

    def _watch(self) -> None:
        """Add a worker when every worker has blocked since it picked up its request (none
        is free then to see it). Sleeps until a worker finds no other waiting, then looks
        every ``blocked`` seconds until one waits, the pool grew, or it is full."""
        pool = self.pool
        period = max(pool.blocked, 0.0005)
        monotonic = time.monotonic
        while True:
            pool.all_busy.wait()
            pool.all_busy.clear()  # (before looking: an arming from now on is not lost)
            while not self._stopped:
                time.sleep(period)
                now = monotonic()
                if pool.stalled(now):
                    self._grow(now)
                    break
                if pool.waiting() or pool.full() or not pool.slots:
                    break
            if self._stopped:
                return

    def _worker(self, fd: int, slot: Slot) -> None:
        try:
            self._serve_fd(fd, slot)
        finally:
            self.pool.leave(slot)  # (however it ended: a slot left behind would look busy)
            self._first_done.set()

    def _serve_fd(self, fd: int, slot: Slot) -> None:
        # requests are read to ``WRITE_DATA`` bytes before a page boundary, so a WRITE's
        # data starts page-aligned: a backing file opened with O_DIRECT takes it as it is
        # (from the header's end it failed with EINVAL), and copies from it are aligned
        view = _buffer(max(p.MIN_BUFFER, p.WRITE_DATA + self.max_write) + p.PAGE)[p.PAGE - p.WRITE_DATA:]
        bufs = [view]  # (one list for every read: this loop runs once per request)
        out = _buffer(self.max_write)
        first_done = self._first_done
        dispatch = self.dispatch
        pool = self.pool
        grows = pool.bound > pool.base
        monotonic = time.monotonic
        slot.tid = threading.get_native_id()
        answered = False  # (this worker's first answer sets ``first_done``)
        while True:
            slot.since = 0.0  # waiting: the others see a free worker
            try:
                n = os.readv(fd, bufs)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue  # ENOENT: the request was interrupted before we read it
                if e.errno == errno.ENODEV:
                    return  # unmounted
                log.error("reading /dev/fuse failed: %s; worker stops", e)
                return
            if n < _BODY:
                # end of file (0 bytes: a socket standing in for /dev/fuse was closed) or a
                # message too short to answer: the connection is gone, and reading again
                # would spin on it
                if n:
                    log.error("a %d-byte request: no FUSE connection; worker stops", n)
                return
            now = slot.since = monotonic()
            if grows:
                for other in pool.slots:
                    if not other.since:
                        break  # a worker waits: ``wants_more`` would say no, without a call
                else:
                    if pool.wants_more(now):
                        self._grow(now)  # before this request, which may block as well
            try:
                dispatch(fd, view[:n], out)
            except Exception:
                log.exception("request dispatch failed")
            if not answered:  # (a local: ``Event.is_set`` is a Python call per request)
                answered = True
                first_done.set()
            if slot.extra and pool.should_retire(slot, monotonic()):
                # answered, and nothing blocks: a spare no longer needed. Its fd holds no
                # request (each is answered before the next read), so closing it drops none.
                pool.leave(slot, retired=True)
                self._close_clone(fd)
                log.debug("nothing blocks: %d workers", len(pool.slots))
                return

    def dispatch(self, fd: int, msg: memoryview, out: memoryview) -> None:
        """Handle one request read from ``fd``; ``out`` is scratch space for READ data."""
        head = _unpack_header(msg)
        op = head[1]
        if op == _READ:
            # the hot path (cache=shared and direct-io files send every read here): no
            # handler table, no reply object, the header packed in place. READ is exempt
            # from ``deny_others`` and carries no extensions.
            fh, offset, size = _unpack_read(msg, _BODY)
            buf = out[:size] if size <= len(out) else memoryview(bytearray(size))
            try:
                if self._read_fh is not None:
                    n = self._read_fh(fh, buf, offset)
                else:
                    n = self.ops.read(Request(head[4], head[5], head[6], head[2]), head[3], fh,
                                      buf, offset)
            except Exception as e:  # noqa: BLE001 (answered, as every handler's failure)
                self._failed(fd, head[2], op, head[3], e)
                return
            try:
                self._writev(fd, [_pack_out(_OUT_SIZE + n, 0, head[2]), buf[:n]])
            except OSError as e:
                self._write_failed(e)
            return
        if op == _WRITE:  # the same for writes (WRITE too is exempt from ``deny_others``)
            fh, offset, size, wflags = _unpack_write(msg, _BODY)
            try:
                n = self.ops.write(Request(head[4], head[5], head[6], head[2]), head[3], fh,
                                   msg[p.WRITE_DATA:p.WRITE_DATA + size], offset, wflags)
            except Exception as e:  # noqa: BLE001
                self._failed(fd, head[2], op, head[3], e)
                return
            try:
                self._writev(fd, [_pack_out(_OUT_SIZE + p.WRITE_OUT.size, 0, head[2]),
                                  p.WRITE_OUT.pack(n, 0)])
            except OSError as e:
                self._write_failed(e)
            return
        # one per file an ``rm -rf`` removes, per entry a ``find`` listed (no reply, no extensions)
        if op == _FORGET:
            try:
                self.ops.forget(head[3], _unpack_nlookup(msg, _BODY)[0])
            except Exception:
                log.exception("FORGET failed")
            return
        # the parent's, after each change in a directory (one per file of an untar, an rm -rf)
        if op == _GETATTR and not head[7] and self.deny_others is None:
            self._getattr_short(fd, head, msg)
            return
        # a directory opened and released with handle 0 (``Operations.opendir_zero``): one
        # of each per directory a warm ``find`` lists from the kernel's cache, so answered
        # as READ is (neither carries extensions; RELEASEDIR is exempt from ``deny_others``,
        # the hooks are unset with it)
        if op == _OPENDIR and self._opendir_zero is not None:
            self._open_zero(fd, head)
            return
        if op == _RELEASEDIR and self._releasedir_zero is not None \
                and not _unpack_fh(msg, _BODY)[0]:
            try:
                self._releasedir_zero(head[3])
            except Exception as e:  # noqa: BLE001
                self._failed(fd, head[2], op, head[3], e)
                return
            try:
                self._writev(fd, [_pack_out(_EMPTY_SIZE, 0, head[2])])
            except OSError as e:
                self._write_failed(e)
            return
        # an open file's SETATTR, GETXATTR of its capability and RELEASE (six of an untar's
        # ten requests per file), a new name's negative LOOKUP (one per file of an untar),
        # an UNLINK (one per file of an rm -rf), a read-only OPEN (one per file of a grep
        # -r), READDIRPLUS and BATCH_FORGET (a cold find's, a cache drop's): the
        # filesystem's short answers (``_bind_shorts``), else the generic way below
        if op in self._shorts and self._shorts[op](fd, head, msg):
            return
        # extensions (total_extlen, in 8-byte units) come only with SECURITY_CTX or
        # CREATE_SUPP_GROUP, neither negotiated: the common header is taken as read
        hdr = _tuple_new(_InHeader, head[:8]) if not head[7] else _InHeader(*head[:7], head[7] * 8)
        end = len(msg) - hdr.extlen if hdr.extlen else len(msg)
        body = msg[_BODY:end]
        handler = self._handlers.get(op)
        if op in p.NO_REPLY:
            if handler is not None:
                try:
                    handler(hdr, body, out)
                except Exception:
                    log.exception("%s failed", p.OPCODE_NAMES.get(op, op))
            return
        if handler is None:
            self._write(fd, hdr.unique, -errno.ENOSYS, ())
            return
        if self.deny_others is not None and hdr.uid not in (0, self.deny_others) \
                and op not in _DENY_EXEMPT:
            self._write(fd, hdr.unique, -errno.EACCES, ())
            return
        try:
            reply = handler(hdr, body, out)
        except Exception as e:  # noqa: BLE001
            self._failed(fd, hdr.unique, op, hdr.nodeid, e)
            return
        if log.isEnabledFor(logs.DEBUG):
            log.debug("%s(%d) -> ok", p.OPCODE_NAMES.get(op, op), hdr.nodeid)
        if not self._write(fd, hdr.unique, 0, reply.parts) and reply.undo is not None:
            try:
                reply.undo()
            except Exception:
                log.exception("undoing an undelivered %s reply failed", p.OPCODE_NAMES.get(op, op))

    def _getattr_short(self, fd: int, head: tuple, msg: memoryview) -> None:
        """GETATTR as the generic path answers it, without its header object, handler
        table and reply object: one per file of an ``rm -rf`` or an untar (the parent's,
        whose attributes each change in it leaves stale in the kernel). Only for a request
        without extensions, where every caller may ask (no ``deny_others``). Without a
        handle, ``Operations.getattr_node`` first, if set."""
        unique, nodeid = head[2], head[3]
        fast = self._getattr_node
        try:
            # (getattr_flags is the body's first field: GETATTR_FH is its low bit)
            reply = None if fast is None or msg[_BODY] & _GETATTR_FH else fast(nodeid)
            if reply is None:
                flags, _, fh = _unpack_getattr(msg, _BODY)
                r = self.ops.getattr(_tuple_new(Request, (head[4], head[5], head[6], unique, 0)),
                                     nodeid, fh if flags & _GETATTR_FH else None)
                reply = p.pack_attr_out(r.attr, r.timeout)
        except Exception as e:  # noqa: BLE001 (answered, as every handler's failure)
            self._failed(fd, unique, _GETATTR, nodeid, e)
            return
        if log.isEnabledFor(logs.DEBUG):
            log.debug("GETATTR(%d) -> ok", nodeid)
        try:
            self._writev(fd, [_pack_out(_ATTR_REPLY_SIZE, 0, unique), reply])
        except OSError as e:
            self._write_failed(e)

    def _setattr_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """SETATTR through ``Operations.setattr_node`` (no header object, ``Request``,
        ``SetAttr`` nor reply object); False, nothing answered, for a request with
        extensions or one the hook leaves to ``setattr``."""
        if head[7]:
            return False
        unique, nodeid = head[2], head[3]
        try:
            reply = self._setattr_node(head[4], head[5], head[6], nodeid,
                                       _unpack_setattr(msg, _BODY))
        except Exception as e:  # noqa: BLE001 (answered, as every handler's failure)
            self._failed(fd, unique, _SETATTR, nodeid, e)
            return True
        if reply is None:
            return False
        if log.isEnabledFor(logs.DEBUG):
            log.debug("SETATTR(%d) -> ok", nodeid)
        try:
            self._writev(fd, [_pack_out(_ATTR_REPLY_SIZE, 0, unique), reply])
        except OSError as e:
            self._write_failed(e)
        return True

    def _capability_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """GETXATTR of ``security.capability`` through ``Operations.capability_node``,
        answered as ``_getxattr`` and ``_failed`` answer it (size 0 asks for the length, a
        short buffer is ERANGE); False, nothing answered, for another name, a request
        with extensions, or one the hook leaves to ``getxattr``."""
        if head[7] or msg[_XATTR_NAME:] != _CAPABILITY:
            return False
        unique, nodeid = head[2], head[3]
        try:
            value = self._capability_node(nodeid)
        except Exception as e:  # noqa: BLE001
            self._failed(fd, unique, _GETXATTR, nodeid, e)
            return True
        if value is None:
            return False
        if value.__class__ is int:  # (an errno: answered as ``_failed`` answers its OSError)
            if log.isEnabledFor(logs.DEBUG):
                log.debug("GETXATTR(%d) -> %s", nodeid, errno.errorcode.get(value, value))
            try:
                self._writev(fd, [_pack_out(_OUT_SIZE, -value, unique)])
            except OSError as e:
                self._write_failed(e)
            return True
        size = _unpack_getxattr(msg, _BODY)[0]
        if size and len(value) > size:
            self._failed(fd, unique, _GETXATTR, nodeid, OSError(errno.ERANGE, "buffer too small"))
            return True
        if log.isEnabledFor(logs.DEBUG):
            log.debug("GETXATTR(%d) -> ok", nodeid)
        try:
            if size:
                self._writev(fd, [_pack_out(_OUT_SIZE + len(value), 0, unique), value])
            else:
                self._writev(fd, [_pack_out(_GETXATTR_SIZE, 0, unique),
                                  _pack_getxattr_out(len(value), 0)])
        except OSError as e:
            self._write_failed(e)
        return True

    def _release_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """RELEASE through ``Operations.release_fh`` (no header object, ``Request`` nor
        reply object); always answers."""
        nodeid = head[3]
        try:
            fh, flags = _unpack_release(msg, _BODY)
            self._release_fh(nodeid, fh, flags)
        except Exception as e:  # noqa: BLE001
            self._failed(fd, head[2], _RELEASE, nodeid, e)
            return True
        if log.isEnabledFor(logs.DEBUG):
            log.debug("RELEASE(%d) -> ok", nodeid)
        try:
            self._writev(fd, [_pack_out(_EMPTY_SIZE, 0, head[2])])
        except OSError as e:
            self._write_failed(e)
        return True

    def _lookup_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """LOOKUP through ``Operations.lookup_name``: True when it answered (a negative
        entry, an entry, or its error), False to answer the generic way (nothing sent).
        An entry whose reply the kernel never takes is forgotten again, as ``_entry``'s."""
        if head[7] or self._lookup_name is None:
            return False
        unique, nodeid = head[2], head[3]
        try:  # (a name without its NUL: ``_name``'s error, answered as the generic way's)
            reply = self._lookup_name(nodeid, self._name(msg, _BODY))
        except Exception as e:  # noqa: BLE001 (answered, as every handler's failure)
            self._failed(fd, unique, _LOOKUP, nodeid, e)
            return True
        if reply is None:
            return False
        if log.isEnabledFor(logs.DEBUG):
            log.debug("LOOKUP(%d) -> ok", nodeid)
        if reply.__class__ is bytes:  # (a negative entry holds no reference: nothing to undo)
            try:
                self._writev(fd, [_pack_out(_ENTRY_REPLY_SIZE, 0, unique), reply])
            except OSError as e:
                self._write_failed(e)
            return True
        if reply.__class__ is tuple:  # (a node's entry, packed: (nodeid, ``fuse_entry_out``))
            try:
                self._writev(fd, [_pack_out(_ENTRY_REPLY_SIZE, 0, unique), reply[1]])
                return True
            except OSError as e:
                self._write_failed(e)
            try:  # (the kernel never took the reference: ``_entry``'s undo)
                self.ops.forget(reply[0], 1)
            except Exception:
                log.exception("undoing an undelivered LOOKUP reply failed")
            return True
        entry = self._entry(reply)
        if not self._write(fd, unique, 0, entry.parts) and entry.undo is not None:
            try:
                entry.undo()
            except Exception:
                log.exception("undoing an undelivered LOOKUP reply failed")
        return True

    def _unlink_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """UNLINK through ``Operations.unlink_name``: True when it answered (done, or its
        error), False to answer the generic way (nothing done, nothing sent)."""
        if head[7] or self._unlink_name is None:
            return False
        unique, nodeid = head[2], head[3]
        try:
            if not self._unlink_name(nodeid, self._name(msg, _BODY)):
                return False
        except Exception as e:  # noqa: BLE001
            self._failed(fd, unique, _UNLINK, nodeid, e)
            return True
        if log.isEnabledFor(logs.DEBUG):
            log.debug("UNLINK(%d) -> ok", nodeid)
        try:
            self._writev(fd, [_pack_out(_EMPTY_SIZE, 0, unique)])
        except OSError as e:
            self._write_failed(e)
        return True

    def _mkdir_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """MKDIR through ``Operations.mkdir_name``: True when it answered (the entry, or its
        error), False to answer the generic way (nothing done, nothing sent). An entry the
        kernel never takes is forgotten again, as ``_entry``'s undo."""
        if head[7]:
            return False
        unique, nodeid = head[2], head[3]
        try:
            mode, umask = _unpack_mkdir(msg, _BODY)
            made = self._mkdir_name(head[4], head[5], nodeid, self._name(msg, _MKDIR_NAME),
                                    mode, umask)
        except Exception as e:  # noqa: BLE001 (answered, as every handler's failure)
            self._failed(fd, unique, _MKDIR, nodeid, e)
            return True
        if made is None:
            return False
        if log.isEnabledFor(logs.DEBUG):
            log.debug("MKDIR(%d) -> ok", nodeid)
        try:
            self._writev(fd, [_pack_out(_ENTRY_REPLY_SIZE, 0, unique), made[1]])
            return True
        except OSError as e:
            self._write_failed(e)
        try:  # (the kernel never took the reference: ``_entry``'s undo)
            self.ops.forget(made[0], 1)
        except Exception:
            log.exception("undoing an undelivered MKDIR reply failed")
        return True

    def _rmdir_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """RMDIR through ``Operations.rmdir_name``, as ``_unlink_short``."""
        if head[7]:
            return False
        unique, nodeid = head[2], head[3]
        try:
            if not self._rmdir_name(nodeid, self._name(msg, _BODY)):
                return False
        except Exception as e:  # noqa: BLE001
            self._failed(fd, unique, _RMDIR, nodeid, e)
            return True
        if log.isEnabledFor(logs.DEBUG):
            log.debug("RMDIR(%d) -> ok", nodeid)
        try:
            self._writev(fd, [_pack_out(_EMPTY_SIZE, 0, unique)])
        except OSError as e:
            self._write_failed(e)
        return True

    def _batch_forget_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """BATCH_FORGET (the kernel's queued forgets: thousands after a cache drop) through
        ``Operations.forget_nodes``: its pairs read in place, no header object, no call per
        pair; no reply. False for a message shorter than its count says: the generic way
        (``_batch_forget``: the whole pairs, then its error logged)."""
        try:
            end = _BATCH_PAIRS + _unpack_batch_count(msg, _BODY)[0] * _FORGET_ONE_SIZE
            if end > len(msg):
                return False
            self._forget_nodes(_iter_forget_one(msg[_BATCH_PAIRS:end]))
        except Exception:
            log.exception("BATCH_FORGET failed")
        return True

    def _open_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """OPEN through ``Operations.open_node`` (no header object, ``Request`` nor reply
        object); False, nothing answered, for a request with extensions or one the hook
        leaves to ``open``. A handle whose reply never reaches the kernel is released
        again (``release_fh``), as ``_open``'s undo does."""
        if head[7]:
            return False
        unique, nodeid = head[2], head[3]
        try:
            flags, open_flags = _unpack_open(msg, _BODY)
            o = self._open_node(nodeid, flags, open_flags)
        except Exception as e:  # noqa: BLE001 (answered, as every handler's failure)
            self._failed(fd, unique, _OPEN, nodeid, e)
            return True
        if o is None:
            return False
        if log.isEnabledFor(logs.DEBUG):
            log.debug("OPEN(%d) -> ok", nodeid)
        try:
            self._writev(fd, [_pack_out(_OPEN_REPLY_SIZE, 0, unique),
                              _pack_open(o.fh, self._short_open_flags(o), o.backing_id)])
        except OSError as e:
            self._write_failed(e)
            try:
                self._release_fh(nodeid, o.fh, flags)
            except Exception:
                log.exception("undoing an undelivered OPEN reply failed")
        return True

    def _readdirplus_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """READDIRPLUS through ``Operations.readdirplus_node`` (no header object,
        ``Request``, items nor reply object); False, nothing answered, for a request with
        extensions or one the hook leaves to ``readdir``. The references the hook took are
        forgotten if the reply never reaches the kernel, as ``_listing``'s undo does."""
        if head[7]:
            return False
        unique, nodeid = head[2], head[3]
        try:
            fh, offset, size = _unpack_read(msg, _BODY)
            got = self._readdirplus_node(nodeid, fh, offset, size)
        except Exception as e:  # noqa: BLE001 (answered, as every handler's failure)
            self._failed(fd, unique, _READDIRPLUS, nodeid, e)
            return True
        if got is None:
            return False
        data, taken = got
        if log.isEnabledFor(logs.DEBUG):
            log.debug("READDIRPLUS(%d) -> ok", nodeid)
        try:
            self._writev(fd, [_pack_out(_OUT_SIZE + len(data), 0, unique), data])
        except OSError as e:
            self._write_failed(e)
            try:
                for child in taken:
                    self.ops.forget(child, 1)
            except Exception:
                log.exception("undoing an undelivered READDIRPLUS reply failed")
        return True

    def _create_short(self, fd: int, head: tuple, msg: memoryview) -> bool:
        """CREATE through ``Operations.create_name``: True when it answered (the entry and
        the open, or its error), False to answer the generic way (nothing done, nothing
        sent). A reply the kernel never takes is undone as ``_created``'s: the handle
        released (``release_fh``), the reference forgotten."""
        if head[7]:
            return False
        unique, nodeid = head[2], head[3]
        try:
            flags, mode, umask, _ = _unpack_create(msg, _BODY)
            made = self._create_name(head[4], head[5], nodeid, self._name(msg, _CREATE_NAME),
                                     flags, mode, umask)
        except Exception as e:  # noqa: BLE001 (answered, as every handler's failure)
            self._failed(fd, unique, _CREATE, nodeid, e)
            return True
        if made is None:
            return False
        new, fh, reply = made
        if log.isEnabledFor(logs.DEBUG):
            log.debug("CREATE(%d) -> ok", nodeid)
        try:
            self._writev(fd, [_pack_out(_CREATE_REPLY_SIZE, 0, unique), reply])
            return True
        except OSError as e:
            self._write_failed(e)
        try:
            try:
                self._release_fh(new, fh, flags)
            finally:
                self.ops.forget(new, 1)
        except Exception:
            log.exception("undoing an undelivered CREATE reply failed")
        return True

    def _open_zero(self, fd: int, head: tuple) -> None:
        """OPENDIR through ``opendir_zero``; released again if the reply never reaches
        the kernel (no RELEASEDIR will come for it)."""
        nodeid = head[3]
        try:
            cached = self._opendir_zero(nodeid)
        except Exception as e:  # noqa: BLE001
            self._failed(fd, head[2], _OPENDIR, nodeid, e)
            return
        try:
            self._writev(fd, [_pack_out(_OPEN_ZERO_SIZE, 0, head[2]), _OPEN_ZERO[bool(cached)]])
            return
        except OSError as e:
            self._write_failed(e)
        try:
            self._releasedir_zero(nodeid)
        except Exception:
            log.exception("undoing an undelivered OPENDIR reply failed")

    def _failed(self, fd: int, unique: int, op: int, nodeid: int, e: Exception) -> None:
        """A handler raised: ``OSError`` is answered with its errno, anything else is
        logged, counted and answered EIO."""
        if isinstance(e, OSError):
            code = e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO
            if log.isEnabledFor(logs.DEBUG):
                log.debug("%s(%d) -> %s", p.OPCODE_NAMES.get(op, op), nodeid,
                          errno.errorcode.get(code, code))
            self._write(fd, unique, -code, ())
            return
        log.error("unexpected error in %s (node %d); answering EIO", p.OPCODE_NAMES.get(op, op),
                  nodeid, exc_info=e)
        self.ops.count_error()
        self._write(fd, unique, -errno.EIO, ())

    #: how a reply is written; the tests' fake kernel replaces it to fail one reply with
    #: ENOENT, as the kernel does for an interrupted request
    _writev = staticmethod(os.writev)

    def _write(self, fd: int, unique: int, error: int, parts) -> bool:
        """Write a reply; False if the kernel no longer waits for it (interrupted)."""
        size = _OUT_SIZE
        for part in parts:
            size += len(part)
        try:
            self._writev(fd, [_pack_out(size, error, unique), *parts])
            return True
        except OSError as e:
            self._write_failed(e)
            return False

    @staticmethod
    def _write_failed(e: OSError) -> None:
        # ENOENT: the request was interrupted and the kernel took nothing; ENODEV: unmounted
        if e.errno not in (errno.ENOENT, errno.ENODEV):
            log.error("writing a reply failed: %s", e)

    # -- decoding and encoding per operation ---------------------------------------------------
    def _handler_table(self) -> dict[int, Callable]:
        # (READ and WRITE are answered in ``dispatch`` itself)
        return {
            p.LOOKUP: self._lookup, p.FORGET: self._forget, p.BATCH_FORGET: self._batch_forget,
            p.GETATTR: self._getattr, p.SETATTR: self._setattr, p.READLINK: self._readlink,
            p.SYMLINK: self._symlink, p.MKNOD: self._mknod, p.MKDIR: self._mkdir,
            p.UNLINK: self._unlink, p.RMDIR: self._rmdir, p.RENAME: self._rename,
            p.RENAME2: self._rename2, p.LINK: self._link, p.OPEN: self._open,
            p.STATFS: self._statfs, p.RELEASE: self._release,
            p.FSYNC: self._fsync, p.SETXATTR: self._setxattr, p.GETXATTR: self._getxattr,
            p.LISTXATTR: self._listxattr, p.REMOVEXATTR: self._removexattr, p.FLUSH: self._flush,
            p.OPENDIR: self._opendir, p.READDIR: self._readdir, p.READDIRPLUS: self._readdirplus,
            p.RELEASEDIR: self._releasedir, p.FSYNCDIR: self._fsyncdir, p.ACCESS: self._access,
            p.CREATE: self._create, p.INTERRUPT: lambda *a: None, p.FALLOCATE: self._fallocate,
            p.LSEEK: self._lseek, p.DESTROY: lambda *a: _EMPTY,
            p.COPY_FILE_RANGE: self._copy_file_range, p.TMPFILE: self._tmpfile,
            p.IOCTL: self._ioctl,
        }

    @staticmethod
    def _req(hdr: p.InHeader, umask: int = 0) -> Request:
        # Request(uid, gid, pid, unique, umask) from the header's fields 4, 5, 6 and 2
        return _tuple_new(Request, (hdr[4], hdr[5], hdr[6], hdr[2], umask))

    @staticmethod
    def _name(body, offset: int = 0) -> bytes:
        raw = bytes(body[offset:])
        end = raw.find(0)
        if end < 0:
            raise ValueError("truncated request: a string without its NUL")
        return raw[:end]

    def _entry(self, entry: Entry) -> _Reply:
        undo = (lambda: self.ops.forget(entry.nodeid, 1)) if entry.nodeid else None
        return _Reply([p.pack_entry(entry.nodeid, entry.generation, entry.attr,
                                    entry.entry_timeout, entry.attr_timeout)], undo)

    def _lookup(self, hdr, body, out):
        return self._entry(self.ops.lookup(self._req(hdr), hdr.nodeid, self._name(body)))

    def _forget(self, hdr, body, out):
        self.ops.forget(hdr.nodeid, p.FORGET_IN.unpack_from(body)[0])

    def _batch_forget(self, hdr, body, out):
        count = p.BATCH_FORGET_IN.unpack_from(body)[0]
        for i in range(count):
            nodeid, nlookup = p.FORGET_ONE.unpack_from(body, p.BATCH_FORGET_IN.size + i * 16)
            self.ops.forget(nodeid, nlookup)

    def _getattr(self, hdr, body, out):
        flags, _, fh = p.GETATTR_IN.unpack_from(body)
        r = self.ops.getattr(self._req(hdr), hdr.nodeid, fh if flags & p.GETATTR_FH else None)
        return _Reply([p.pack_attr_out(r.attr, r.timeout)])

    def _setattr(self, hdr, body, out):
        r = self.ops.setattr(self._req(hdr), hdr.nodeid, p.SetAttr.decode(body))
        return _Reply([p.pack_attr_out(r.attr, r.timeout)])

    def _readlink(self, hdr, body, out):
        return _Reply([self.ops.readlink(self._req(hdr), hdr.nodeid)])

    def _symlink(self, hdr, body, out):
        name, target = p.cstrings(body, 2)
        return self._entry(self.ops.symlink(self._req(hdr), hdr.nodeid, name, target))

    def _mknod(self, hdr, body, out):
        mode, rdev, umask, _ = p.MKNOD_IN.unpack_from(body)
        name = self._name(body, p.MKNOD_IN.size)
        return self._entry(self.ops.mknod(self._req(hdr, umask), hdr.nodeid, name, mode, rdev))

    def _mkdir(self, hdr, body, out):
        mode, umask = p.MKDIR_IN.unpack_from(body)
        name = self._name(body, p.MKDIR_IN.size)
        return self._entry(self.ops.mkdir(self._req(hdr, umask), hdr.nodeid, name, mode))

    def _unlink(self, hdr, body, out):
        self.ops.unlink(self._req(hdr), hdr.nodeid, self._name(body))
        return _EMPTY

    def _rmdir(self, hdr, body, out):
        self.ops.rmdir(self._req(hdr), hdr.nodeid, self._name(body))
        return _EMPTY

    def _rename(self, hdr, body, out):
        newdir = p.RENAME_IN.unpack_from(body)[0]
        old, new = p.cstrings(body[p.RENAME_IN.size:], 2)
        self.ops.rename(self._req(hdr), hdr.nodeid, old, newdir, new, 0)
        return _EMPTY

    def _rename2(self, hdr, body, out):
        newdir, flags, _ = p.RENAME2_IN.unpack_from(body)
        old, new = p.cstrings(body[p.RENAME2_IN.size:], 2)
        self.ops.rename(self._req(hdr), hdr.nodeid, old, newdir, new, flags)
        return _EMPTY

    def _link(self, hdr, body, out):
        oldnode = p.LINK_IN.unpack_from(body)[0]
        name = self._name(body, p.LINK_IN.size)
        return self._entry(self.ops.link(self._req(hdr), oldnode, hdr.nodeid, name))

    _open_flags = staticmethod(fopen_flags)

    def _short_open_flags(self, o: Opened) -> int:
        """``fopen_flags`` of the short OPEN's ``o``, from a table of the flags its six
        booleans make (at most 64 entries), and PASSTHROUGH for a backing id."""
        key = o[1:7]  # (direct_io ... parallel_direct_writes: ``Opened``'s booleans)
        flags = _OPEN_FLAGS_BY_BOOLS.get(key)
        if flags is None:
            flags = fopen_flags(o._replace(backing_id=0))
            if len(_OPEN_FLAGS_BY_BOOLS) < 64:  # (a bound, whatever values the fields hold)
                _OPEN_FLAGS_BY_BOOLS[key] = flags
        return flags | _FOPEN_PASSTHROUGH if o[7] else flags

    def _open(self, hdr, body, out):
        flags, open_flags = p.OPEN_IN.unpack_from(body)
        req = self._req(hdr)
        o = self.ops.open(req, hdr.nodeid, flags, open_flags)
        return _Reply([p.pack_open(o.fh, self._open_flags(o), o.backing_id)],
                      lambda: self.ops.release(req, hdr.nodeid, o.fh, flags))

    def _create(self, hdr, body, out):
        flags, mode, umask, open_flags = p.CREATE_IN.unpack_from(body)
        name = self._name(body, p.CREATE_IN.size)
        req = self._req(hdr, umask)
        return self._created(req, flags, *self.ops.create(req, hdr.nodeid, name, flags, mode,
                                                          open_flags))

    def _tmpfile(self, hdr, body, out):
        # CREATE's layout and reply; the name is the kernel's placeholder ("/"), unused
        flags, mode, umask, open_flags = p.CREATE_IN.unpack_from(body)
        req = self._req(hdr, umask)
        return self._created(req, flags, *self.ops.tmpfile(req, hdr.nodeid, flags, mode,
                                                           open_flags))

    def _created(self, req: Request, flags: int, entry: Entry, o: Opened) -> _Reply:
        """CREATE's and TMPFILE's reply: the entry, then the open; undone (the handle
        released, the reference forgotten) if the kernel never receives it."""
        def undo() -> None:
            try:
                self.ops.release(req, entry.nodeid, o.fh, flags)
            finally:
                self.ops.forget(entry.nodeid, 1)

        reply = self._entry(entry)
        reply.parts.append(p.pack_open(o.fh, self._open_flags(o), o.backing_id))
        reply.undo = undo
        return reply

    def _statfs(self, hdr, body, out):
        return _Reply([p.pack_statfs(self.ops.statfs(self._req(hdr), hdr.nodeid))])

    def _release(self, hdr, body, out):
        fh, flags, _rflags, _lock = p.RELEASE_IN.unpack_from(body)
        self.ops.release(self._req(hdr), hdr.nodeid, fh, flags)
        return _EMPTY

    def _releasedir(self, hdr, body, out):
        fh = p.RELEASE_IN.unpack_from(body)[0]
        self.ops.releasedir(self._req(hdr), hdr.nodeid, fh)
        return _EMPTY

    def _flush(self, hdr, body, out):
        self.ops.flush(self._req(hdr), hdr.nodeid, p.FLUSH_IN.unpack_from(body)[0])
        return _EMPTY

    def _fsync(self, hdr, body, out):
        fh, fflags, _ = p.FSYNC_IN.unpack_from(body)
        self.ops.fsync(self._req(hdr), hdr.nodeid, fh, bool(fflags & p.FSYNC_FDATASYNC))
        return _EMPTY

    def _fsyncdir(self, hdr, body, out):
        fh, fflags, _ = p.FSYNC_IN.unpack_from(body)
        self.ops.fsyncdir(self._req(hdr), hdr.nodeid, fh, bool(fflags & p.FSYNC_FDATASYNC))
        return _EMPTY

    def _setxattr(self, hdr, body, out):
        layout = p.SETXATTR_IN_EXT if self._setxattr_ext else p.SETXATTR_IN
        size, flags = layout.unpack_from(body)[:2]
        rest = bytes(body[layout.size:])
        name, _, value = rest.partition(b"\0")
        args = (self._req(hdr), hdr.nodeid, os.fsdecode(name), value[:size], flags)
        if self._setxattr_ext:  # setxattr_flags (SETXATTR_ACL_KILL_SGID) exist only then
            self.ops.setxattr(*args, p.SETXATTR_IN_EXT.unpack_from(body)[2])
        else:
            self.ops.setxattr(*args)
        return _EMPTY

    @staticmethod
    def _sized(value: bytes, size: int) -> _Reply:
        """GETXATTR/LISTXATTR: size 0 asks for the length; a short buffer is ERANGE."""
        if size == 0:
            return _Reply([p.GETXATTR_OUT.pack(len(value), 0)])
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return _Reply([value])

    def _getxattr(self, hdr, body, out):
        size, _ = p.GETXATTR_IN.unpack_from(body)
        name = os.fsdecode(self._name(body, p.GETXATTR_IN.size))
        return self._sized(self.ops.getxattr(self._req(hdr), hdr.nodeid, name), size)

    def _listxattr(self, hdr, body, out):
        size, _ = p.GETXATTR_IN.unpack_from(body)
        names = self.ops.listxattr(self._req(hdr), hdr.nodeid)
        return self._sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    def _removexattr(self, hdr, body, out):
        self.ops.removexattr(self._req(hdr), hdr.nodeid, os.fsdecode(self._name(body)))
        return _EMPTY

    def _access(self, hdr, body, out):
        self.ops.access(self._req(hdr), hdr.nodeid, p.ACCESS_IN.unpack_from(body)[0])
        return _EMPTY

    def _opendir(self, hdr, body, out):
        flags, _ = p.OPEN_IN.unpack_from(body)
        req = self._req(hdr)
        o = self.ops.opendir(req, hdr.nodeid, flags)
        return _Reply([p.pack_open(o.fh, self._open_flags(o))],
                      lambda: self.ops.releasedir(req, hdr.nodeid, o.fh))

    def _readdir(self, hdr, body, out):
        return self._listing(hdr, body, plus=False)

    def _readdirplus(self, hdr, body, out):
        return self._listing(hdr, body, plus=True)

    def _listing(self, hdr, body, *, plus: bool) -> _Reply:
        fh, offset, size, *_ = p.READ_IN.unpack_from(body)
        req = self._req(hdr)
        fitting: list[DirItem] = []
        room = size
        extra = p.DIRENT.size + 7 + (p.ENTRY_OUT_SIZE if plus else 0)  # (p.dirent_size inlined)
        for item in self.ops.readdir(req, hdr.nodeid, fh, offset, plus):
            need = (extra + len(item.name)) & ~7
            if need > room:
                break
            room -= need
            fitting.append(item)
        if not plus:
            return _Reply([b"".join([p.pack_dirent(item.name, item.ino, item.offset, item.mode)
                                     for item in fitting])])
        # the kernel ignores the entry of "." and ".." (fuse_direntplus_link): a reference
        # taken for them would never be forgotten. References are taken for the items that
        # fit only, all at once
        wanted = [item for item in fitting if item.take is not None and item.name not in _DOTS]
        entries = iter(self.ops.take_entries(req, hdr.nodeid, wanted) if wanted else ())
        taken: list[int] = []
        pack = p.pack_direntplus_entry
        parts: list[bytes] = []
        try:
            for item in fitting:
                entry = None
                if item.take is not None and item.name not in _DOTS:
                    entry = next(entries)
                if entry is None or not entry.nodeid:
                    parts.append(pack(0, 0, None, 0.0, 0.0, item.name, item.ino, item.offset, item.mode))
                    continue
                nodeid, attr, entry_timeout, attr_timeout, generation = entry
                taken.append(nodeid)
                parts.append(pack(nodeid, generation, attr, entry_timeout, attr_timeout, item.name,
                                  item.ino, item.offset, item.mode))
        except BaseException:
            for entry in [*entries]:  # (taken, not yet packed)
                if entry is not None and entry.nodeid:
                    taken.append(entry.nodeid)
            for nodeid in taken:
                self.ops.forget(nodeid, 1)
            raise

        def undo() -> None:
            for nodeid in taken:
                self.ops.forget(nodeid, 1)

        return _Reply([b"".join(parts)], undo if taken else None)

    def _fallocate(self, hdr, body, out):
        fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(body)
        self.ops.fallocate(self._req(hdr), hdr.nodeid, fh, offset, length, mode)
        return _EMPTY

    def _lseek(self, hdr, body, out):
        fh, offset, whence, _ = p.LSEEK_IN.unpack_from(body)
        return _Reply([p.LSEEK_OUT.pack(self.ops.lseek(self._req(hdr), hdr.nodeid, fh, offset, whence))])

    def _copy_file_range(self, hdr, body, out):
        fh_in, off_in, node_out, fh_out, off_out, length, flags = p.COPY_FILE_RANGE_IN.unpack_from(body)
        n = self.ops.copy_file_range(self._req(hdr), hdr.nodeid, fh_in, off_in, node_out, fh_out,
                                     off_out, length, flags)
        return _Reply([p.WRITE_OUT.pack(n, 0)])

    def _ioctl(self, hdr, body, out):
        fh, flags, cmd, arg, in_size, out_size = p.IOCTL_IN.unpack_from(body)
        data = bytes(body[p.IOCTL_IN.size:p.IOCTL_IN.size + in_size])
        if len(data) != in_size:
            raise OSError(errno.EINVAL, "short ioctl input")
        value = self.ops.ioctl(self._req(hdr), hdr.nodeid, fh, flags, cmd, arg, data, out_size)
        if len(value) > out_size:
            raise OSError(errno.EIO, f"ioctl {cmd:#x} answer longer than {out_size} bytes")
        # (a restricted ioctl's reply is exactly its size: the kernel refuses a shorter one)
        return _Reply([p.IOCTL_OUT.pack(0, 0, 0, 0), value + bytes(out_size - len(value))])


class Backing:
    """``ops.BackingFiles`` on a connection's fd."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def open(self, fd: int) -> int:
        # a bytearray argument makes ioctl return the call's result (the id), not a buffer
        return fcntl.ioctl(self._fd, p.DEV_IOC_BACKING_OPEN, bytearray(p.BACKING_MAP.pack(fd, 0, 0)))

    def close(self, backing_id: int) -> None:
        fcntl.ioctl(self._fd, p.DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("<I", backing_id)))
