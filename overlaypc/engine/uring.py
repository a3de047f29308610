"""FUSE over io_uring: one queue per possible CPU, each served by a thread pinned to it.

Owns the rings (``io_uring_setup``/``io_uring_enter`` through ``syscall``, the rings and
SQE array ``mmap``ed, SQEs written with ``struct.pack_into``), the ring entries (a header
buffer and a payload buffer each, registered with the kernel) and the queue threads. The
session hands each request it finds in an entry to ``Session.dispatch`` with the entry as
the reply's destination: ``Entry.commit`` copies the reply into the entry's buffers, and
the thread's next ``io_uring_enter`` commits it and waits for the next request in one call.

The protocol (kernel ``fs/fuse/dev_uring.c``, 6.14 and later; ``fuse.enable_uring=Y``):
INIT offers ``FUSE_OVER_IO_URING`` (flags2) only while the module parameter is set, and a
connection uses the ring only if the daemon accepts the flag in its INIT reply; from that
reply until every queue (``num_possible_cpus``) has a registered entry the kernel holds
new requests back (``fuse_block_alloc``), then sends each request to the queue of the CPU
its caller runs on. A ``IORING_OP_URING_CMD`` SQE (``IORING_SETUP_SQE128``: the command
is ``fuse_uring_cmd_req`` in the SQE's 80-byte tail) with ``cmd_op`` REGISTER carries two
iovecs, the header buffer (``fuse_uring_req_header``: ``fuse_in_header``, then at 128 the
op's fixed argument, then at 256 ``fuse_uring_ent_in_out``) and the payload (the op's
other arguments, at least the connection's ``max_write``); its completion means a request
is in the buffers. COMMIT_AND_FETCH with the request's ``unique`` as ``commit_id`` hands
back the reply (``fuse_out_header`` at the header's start, the reply's arguments in the
payload, their size in ``payload_sz``) and waits for the next request. FORGET, INTERRUPT
still come by read(2) on /dev/fuse (the session keeps one classic worker), notifications
are still written there. When the connection ends (unmount, abort, the daemon's exit) the
kernel completes every waiting command with ENOTCONN (or ECONNABORTED): the thread ends.

A prototype, off by default (``uring=auto`` turns it on): slower than /dev/fuse on the
machine measured (docs/DESIGN-NOTES.md, "FUSE over io_uring"). ``OVERLAYPC_URING_PIN=0``
(queue threads not pinned) and ``OVERLAYPC_URING_FLAGS`` (the setup flags) are for
measurements only.

Caveats: a queue's thread serves its entry's requests one at a time, so a request that
blocks (an fsync, a slow lower layer) holds up the requests made on that CPU meanwhile
(the classic pool adds workers; here the kernel queues them). Each ring holds three fds
(``mmap`` duplicates the fd it maps), outside the mount's fd budget. A reply the kernel no longer waits for
is only seen when the connection ends (a commit of an unknown ``unique`` fails ENOENT and
the entry is registered again), so the classic path's undo of an undelivered reply does
not apply. x86-64 memory ordering is assumed for the ring indices (loads and stores of
aligned 32-bit words, as on every architecture CPython runs this on with a coherent
cache; the kernel's side uses acquire/release).
"""
from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from _ctypes import addressof
from collections.abc import Callable

from . import protocol as p
from .. import cbind, logs
from ..records import field, record

log = logs.get("overlaypc.engine")

SYS_IO_URING_SETUP, SYS_IO_URING_ENTER, SYS_IO_URING_REGISTER = 425, 426, 427  # (every arch)
SETUP_R_DISABLED = 1 << 6
SETUP_COOP_TASKRUN = 1 << 8
SETUP_SQE128 = 1 << 10
SETUP_SINGLE_ISSUER = 1 << 12
SETUP_DEFER_TASKRUN = 1 << 13
REGISTER_ENABLE_RINGS = 12
#: each ring is made by the session's thread and used by its queue's thread alone: made
#: disabled, enabled by that thread (which becomes its single issuer), completions' task
#: work run only when it asks for completions (no interrupting signal)
SETUP_FLAGS = int(os.environ.get("OVERLAYPC_URING_FLAGS", SETUP_SQE128 | SETUP_R_DISABLED
                                 | SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN))
FEAT_SINGLE_MMAP = 1 << 0
ENTER_GETEVENTS = 1 << 0
OP_URING_CMD = 46
OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000
CMD_REGISTER, CMD_COMMIT_AND_FETCH = 1, 2
#: INIT flag (flags2 bit 9)
OVER_IO_URING = p.OVER_IO_URING

PAGE = 4096
#: ``io_uring_params``: sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle,
#: features, wq_fd, resv[3]; ``io_sqring_offsets``; ``io_cqring_offsets``
PARAMS = struct.Struct("<7I3I" "7IIQ" "8IQ")
SQE_SIZE = 128   # with SETUP_SQE128
CQE = struct.Struct("<QiI")
#: the head of an SQE: opcode, flags, ioprio, fd, cmd_op, pad, addr, len, rw_flags, user_data
SQE_HEAD = struct.Struct("<BBHiIIQIIQ")
#: ``fuse_uring_cmd_req`` at the SQE's offset 48: flags, commit_id, qid
CMD_REQ = struct.Struct("<QQH")
CMD_OFFSET = 48
#: ``fuse_uring_req_header``: the in/out header, the op's argument, ``fuse_uring_ent_in_out``
HEADER_SIZE = 288
OP_IN = 128
ENT_IN_OUT = 256
#: ``fuse_uring_ent_in_out``: flags, commit_id, payload_sz, padding, reserved
ENT = struct.Struct("<QQIIQ")
IN_HEADER_SIZE = 40
#: ``fuse_in_header.len``
_unpack_len = struct.Struct("<I").unpack_from
_unpack_ent = ENT.unpack_from
_pack_ent = ENT.pack_into
_pack_cmd = CMD_REQ.pack_into
_pack_head = SQE_HEAD.pack_into
_unpack_cqe = CQE.unpack_from
_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")
#: ``fuse_in_header``'s opcode; its unique and nodeid; ``fuse_read_in``'s head; the out header
_unpack_opcode = struct.Struct("<I").unpack_from
_unpack_ids = struct.Struct("<QQ").unpack_from
_unpack_read = struct.Struct("<QQI").unpack_from
_pack_out = struct.Struct("<IiQ").pack_into
_READ = p.READ
#: where an SQE holds ``fuse_uring_cmd_req.commit_id``
_COMMIT_ID = CMD_OFFSET + 8

_libc = cbind.Library()
#: for the calls that pass addresses (setup, register): every argument a C long
_syscall = _libc.syscall
_syscall.argtypes = [cbind.c_long] * 7
_syscall.restype = cbind.c_long
#: for io_uring_enter, once per request: small ints and NULL only, passed without argtypes
#: (converting seven declared arguments took ~3 us a call here, undeclared ones ~1 us;
#: libffi widens each int argument to the register's width)
_enter = cbind.Library().syscall
_enter.restype = cbind.c_long

#: the end of a connection, as a command's completion says it
_GONE = frozenset((errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV))


def possible_cpus() -> list[int]:
    """The kernel's possible CPUs (one queue each): /sys/devices/system/cpu/possible."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _address(buf: mmap.mmap) -> int:
    return addressof(cbind.c_ubyte.from_buffer(buf))


class Ring:
    """One io_uring (SQE128): its fd, the mmaped rings, submission and completion."""

    def __init__(self, entries: int) -> None:
        scratch = mmap.mmap(-1, PAGE)
        self._scratch = scratch  # (the params; kept: its address was handed out)
        _u32.pack_into(scratch, 8, SETUP_FLAGS)
        fd = _syscall(SYS_IO_URING_SETUP, entries, _address(scratch), 0, 0, 0, 0)
        if fd < 0:
            e = cbind.get_errno()
            raise OSError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        try:
            self._map(scratch)
        except BaseException:
            os.close(fd)
            raise

    def _map(self, scratch: mmap.mmap) -> None:
        v = PARAMS.unpack_from(scratch, 0)
        sq_entries, cq_entries, _flags, _cpu, _idle, features = v[:6]
        _sq_head, sq_tail, sq_mask, _sq_n, _sq_flags, _dropped, sq_array = v[10:17]
        cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes = v[19:25]
        sq_size = sq_array + sq_entries * 4
        cq_size = cqes + cq_entries * CQE.size
        if features & FEAT_SINGLE_MMAP:
            sq = cq = mmap.mmap(self.fd, max(sq_size, cq_size), offset=OFF_SQ_RING)
        else:
            sq = mmap.mmap(self.fd, sq_size, offset=OFF_SQ_RING)
            cq = mmap.mmap(self.fd, cq_size, offset=OFF_CQ_RING)
        self.sq, self.cq = sq, cq
        self.sqes = mmap.mmap(self.fd, sq_entries * SQE_SIZE, offset=OFF_SQES)
        self.sq_tail_off, self.sq_array = sq_tail, sq_array
        self.sq_mask = _u32.unpack_from(sq, sq_mask)[0]
        self.sq_entries = sq_entries
        self.cq_head_off, self.cq_tail_off, self.cqes = cq_head, cq_tail, cqes
        self.cq_mask = _u32.unpack_from(cq, cq_mask)[0]
        self.tail = _u32.unpack_from(sq, sq_tail)[0]
        self.pending = 0  # SQEs written, not yet submitted
        for idx in range(sq_entries):  # the SQE array maps each slot to its own SQE, for good
            _u32.pack_into(sq, sq_array + idx * 4, idx)

    def enable(self) -> None:
        """Enable a ring made disabled; the calling thread becomes its only submitter."""
        if _syscall(SYS_IO_URING_REGISTER, self.fd, REGISTER_ENABLE_RINGS, 0, 0, 0, 0) < 0:
            e = cbind.get_errno()
            raise OSError(e, f"io_uring_register(ENABLE_RINGS): {os.strerror(e)}")

    def put(self, sqe: bytes) -> None:
        """Queue an SQE made by ``sqe`` (submitted by ``enter``)."""
        tail = self.tail
        at = (tail & self.sq_mask) * SQE_SIZE
        self.sqes[at:at + SQE_SIZE] = sqe
        self.tail = tail = (tail + 1) & 0xFFFFFFFF
        _u32.pack_into(self.sq, self.sq_tail_off, tail)  # (x86: stores are not reordered)
        self.pending += 1

    def enter(self, wait: int = 1) -> None:
        """Submit what is queued and wait for ``wait`` completions; the GIL is released."""
        while True:
            n = _enter(SYS_IO_URING_ENTER, self.fd, self.pending, wait, ENTER_GETEVENTS, 0, 0)
            if n >= 0:
                self.pending -= min(n, self.pending)
                return
            e = cbind.get_errno()
            if e != errno.EINTR:
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")

    def completions(self) -> list[tuple[int, int]]:
        """The completions waiting: (user_data, result) each, consumed."""
        cq = self.cq
        head = _u32.unpack_from(cq, self.cq_head_off)[0]
        tail = _u32.unpack_from(cq, self.cq_tail_off)[0]
        out = []
        mask, base = self.cq_mask, self.cqes
        while head != tail:
            user_data, res, _flags = _unpack_cqe(cq, base + (head & mask) * CQE.size)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        _u32.pack_into(cq, self.cq_head_off, head)
        return out

    def close(self) -> None:
        for m in (self.sqes, self.sq, self.cq):
            try:
                m.close()
            except (BufferError, ValueError):
                pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def sqe(fd: int, cmd_op: int, iov_addr: int, user_data: int, commit_id: int, qid: int) -> bytes:
    """An ``IORING_OP_URING_CMD`` SQE (128 bytes) for /dev/fuse ``fd``: ``fuse_uring_cmd_req``
    in its command area; with ``iov_addr``, the two iovecs (REGISTER)."""
    b = bytearray(SQE_SIZE)
    _pack_head(b, 0, OP_URING_CMD, 0, 0, fd, cmd_op, 0, iov_addr, 2 if iov_addr else 0, 0,
               user_data)
    _pack_cmd(b, CMD_OFFSET, 0, commit_id, qid)
    return bytes(b)


class Entry:
    """One ring entry: its header buffer (the iovecs after it) and its payload, which
    starts a page into ``buf`` so that a request can be laid out before it as /dev/fuse
    gives it (header, op argument, payload) and a WRITE's data stays page-aligned."""

    def __init__(self, index: int, payload_size: int) -> None:
        self.index = index
        self.header = mmap.mmap(-1, PAGE)
        self.buf = mmap.mmap(-1, PAGE + payload_size)
        self.view = memoryview(self.buf)
        self.out = self.view[PAGE:]
        self.hview = memoryview(self.header)
        self.iov = HEADER_SIZE + 32  # (two iovecs, 16-byte aligned, after the header)
        struct.pack_into("<QQQQ", self.header, self.iov, _address(self.header), HEADER_SIZE,
                         _address(self.buf) + PAGE, payload_size)
        self.iov_addr = _address(self.header) + self.iov
        self.unique = 0
        self.committed = False

    def request(self) -> memoryview:
        """The request now in the entry, laid out as read(2) on /dev/fuse gives it."""
        header = self.header
        length = _unpack_len(header, 0)[0]
        _flags, unique, payload, _pad, _res = _unpack_ent(header, ENT_IN_OUT)
        op = length - IN_HEADER_SIZE - payload
        if op < 0 or op > 128:
            raise ValueError(f"ring entry: request length {length}, payload {payload}")
        start = PAGE - IN_HEADER_SIZE - op
        view = self.view
        view[start:start + IN_HEADER_SIZE] = self.hview[:IN_HEADER_SIZE]
        if op:
            view[PAGE - op:PAGE] = self.hview[OP_IN:OP_IN + op]
        self.unique = unique
        self.committed = False
        return view[start:PAGE + payload]

    def commit(self, parts) -> None:
        """Take a reply (``fuse_out_header`` first, then its arguments) into the buffers."""
        hview = self.hview
        hview[:16] = parts[0]
        at = 0
        out = self.out
        buf = self.buf
        for part in parts[1:]:
            n = len(part)
            if not (at == 0 and isinstance(part, memoryview) and part.obj is buf):
                out[at:at + n] = part  # (a READ's data is in the payload already)
            at += n
        _pack_ent(self.header, ENT_IN_OUT, 0, self.unique, at, 0, 0)
        self.committed = True

    def close(self) -> None:
        for v in (self.out, self.view, self.hview):
            v.release()


@record(eq=False)
class Queue:
    """One CPU's queue: its ring, its entries and what its thread has served."""
    qid: int
    ring: Ring
    entries: list
    served: int = 0
    thread: threading.Thread | None = None


@record(eq=False)
class Rings:
    """The queues of one connection. ``create`` makes the rings (before INIT is answered,
    so a failure leaves the connection on the classic path); ``start`` registers the
    entries, each queue from its own thread."""
    fd: int
    queues: list
    stopped: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, fd: int, payload_size: int, per_queue: int = 1,
               cpus: list[int] | None = None) -> "Rings":
        queues = []
        try:
            for qid in (possible_cpus() if cpus is None else cpus):
                ring = Ring(max(2, 2 * per_queue))
                queues.append(Queue(qid, ring, []))
                queues[-1].entries = [Entry(i, payload_size) for i in range(per_queue)]
        except BaseException:
            for q in queues:
                q.ring.close()
            raise
        return cls(fd, queues)

    def served(self) -> int:
        return sum(q.served for q in self.queues)

    def run(self, queue: Queue, dispatch: Callable, read: Callable | None = None,
            error_code: Callable[[int, int, Exception], int] | None = None) -> None:
        """A queue's thread: register the entries, then serve requests until the
        connection ends. Each request goes to ``dispatch`` (the session's) with its entry as
        the reply's destination; a READ, with ``read`` (the filesystem's ``read_fh``) and
        ``error_code`` (the session's), is answered here from the entry's header, its data
        read straight into the payload: rebuilding the message for ``dispatch`` and copying
        the reply cost a third of the ring's gain for one reader (DESIGN-NOTES)."""
        if read is None or error_code is None:
            read = None
        try:
            if os.environ.get("OVERLAYPC_URING_PIN", "1") == "1":
                os.sched_setaffinity(0, {queue.qid})
        except OSError:
            pass  # not allowed on that CPU: served from wherever the thread runs
        ring, fd, qid = queue.ring, self.fd, queue.qid
        entries = queue.entries
        try:
            if SETUP_FLAGS & SETUP_R_DISABLED:
                ring.enable()
            register = [sqe(fd, CMD_REGISTER, e.iov_addr, e.index, 0, qid) for e in entries]
            # a COMMIT_AND_FETCH per entry, its commit_id (the request's unique) set per request
            commits = [bytearray(sqe(fd, CMD_COMMIT_AND_FETCH, 0, e.index, 0, qid)) for e in entries]
            for s in register:
                ring.put(s)
            enter, completions, put = ring.enter, ring.completions, ring.put
            room = min((len(e.out) for e in entries), default=0)
            pack_id = _u64.pack_into
            while True:
                enter(1)
                for index, res in completions():
                    e = entries[index]
                    if res < 0:
                        if -res in _GONE:
                            return
                        if -res == errno.ENOENT:  # a reply to a request the kernel dropped
                            put(register[index])
                            continue
                        log.error("io_uring queue %d: %s; it stops", qid, os.strerror(-res))
                        return
                    header = e.header
                    if read is not None and _unpack_opcode(header, 4)[0] == _READ \
                            and _unpack_read(header, OP_IN)[2] <= room:
                        # READ carries no extensions and is exempt from deny_others, as
                        # in ``Session.dispatch``
                        unique, nodeid = _unpack_ids(header, 8)
                        fh, offset, size = _unpack_read(header, OP_IN)
                        try:
                            n = read(fh, e.out[:size], offset)
                            _pack_out(header, 0, 16 + n, 0, unique)
                        except Exception as err:  # noqa: BLE001 (answered, as in dispatch)
                            n = 0
                            _pack_out(header, 0, 16, -error_code(_READ, nodeid, err), unique)
                        _pack_ent(header, ENT_IN_OUT, 0, unique, n, 0, 0)
                        queue.served += 1
                        c = commits[index]
                        pack_id(c, _COMMIT_ID, unique)
                        put(c)
                        continue
                    try:
                        dispatch(e, e.request(), e.out)
                    except Exception:
                        log.exception("request dispatch failed (io_uring queue %d)", qid)
                    if not e.committed:  # (dispatch answers every request the ring sends)
                        e.commit([struct.pack("<IiQ", 16, -errno.EIO, e.unique)])
                    queue.served += 1
                    c = commits[index]
                    pack_id(c, _COMMIT_ID, e.unique)
                    put(c)
        except OSError as err:
            log.error("io_uring queue %d: %s; it stops", qid, err)
        finally:
            ring.close()
