"""FUSE over io_uring without a kernel: the SQEs the queues submit, a request laid out from
a ring entry as read(2) gives it, a reply taken into the entry, and INIT's choice (the
flag accepted only with ``uring=auto`` and rings made; a failed setup stays classic)."""
from __future__ import annotations

import errno
import logging
import struct

import pytest

from engine_support import FakeKernel, MemoryOps
from overlaypc.engine import protocol as p
from overlaypc.engine import uring as ur


def test_sqe_layout():
    b = ur.sqe(7, ur.CMD_REGISTER, 0x1234_5678_9ABC, 3, 0, 1)
    assert len(b) == 128
    opcode, flags, _prio, fd = struct.unpack_from("<BBHi", b, 0)
    assert (opcode, flags, fd) == (46, 0, 7)
    assert struct.unpack_from("<I", b, 8)[0] == ur.CMD_REGISTER          # cmd_op
    assert struct.unpack_from("<QI", b, 16) == (0x1234_5678_9ABC, 2)    # the two iovecs
    assert struct.unpack_from("<Q", b, 32)[0] == 3                      # user_data
    # fuse_uring_cmd_req in the command area (offset 48): flags, commit_id, qid
    assert struct.unpack_from("<QQH", b, 48) == (0, 0, 1)
    c = ur.sqe(7, ur.CMD_COMMIT_AND_FETCH, 0, 0, 0xABCDEF, 0)
    assert struct.unpack_from("<QI", c, 16) == (0, 0)                   # no iovecs
    assert struct.unpack_from("<Q", c, ur._COMMIT_ID)[0] == 0xABCDEF


def _kernel_sends(e: ur.Entry, opcode: int, unique: int, op_arg: bytes, payload: bytes) -> bytes:
    """Fill ``e`` as fuse_uring_copy_to_ring does; returns the message read(2) would give."""
    length = 40 + len(op_arg) + len(payload)
    head = p.IN_HEADER.pack(length, opcode, unique, 5, 0, 0, 0, 0, 0)
    e.header[0:40] = head
    e.header[ur.OP_IN:ur.OP_IN + len(op_arg)] = op_arg
    struct.pack_into("<QQIIQ", e.header, ur.ENT_IN_OUT, 0, unique, len(payload), 0, 0)
    e.out[:len(payload)] = payload
    return head + op_arg + payload


def test_request_laid_out_as_read_gives_it():
    e = ur.Entry(0, 1 << 16)
    try:
        op = p.MKDIR_IN.pack(0o755, 0o022)
        want = _kernel_sends(e, p.MKDIR, 42, op, b"name\0")
        assert bytes(e.request()) == want and e.unique == 42
        # a WRITE's data stays where the kernel put it, page-aligned, after its header
        data = bytes(range(256)) * 16
        want = _kernel_sends(e, p.WRITE, 44, struct.pack("<QQIIIIQ", 1, 0, len(data), 0, 0, 0, 0)[:40], data)
        msg = e.request()
        assert bytes(msg) == want
        assert bytes(msg[p.WRITE_DATA:p.WRITE_DATA + len(data)]) == data
        # a request with no argument at all
        want = _kernel_sends(e, p.STATFS, 46, b"", b"")
        assert bytes(e.request()) == want
        del msg
    finally:
        e.close()


def test_request_with_a_wrong_length_is_refused():
    e = ur.Entry(0, 8192)
    try:
        _kernel_sends(e, p.LOOKUP, 2, b"", b"x\0")
        struct.pack_into("<I", e.header, 0, 20)  # shorter than its header
        with pytest.raises(ValueError):
            e.request()
    finally:
        e.close()


def test_commit_takes_the_reply():
    e = ur.Entry(0, 8192)
    try:
        _kernel_sends(e, p.GETATTR, 8, bytes(16), b"")
        e.request()
        body = b"A" * 104
        e.commit([p.OUT_HEADER.pack(16 + len(body), 0, 8), body[:50], memoryview(body)[50:]])
        assert p.OUT_HEADER.unpack_from(e.header, 0) == (16 + 104, 0, 8)
        assert bytes(e.out[:104]) == body
        assert struct.unpack_from("<QQI", e.header, ur.ENT_IN_OUT) == (0, 8, 104)
        # an error: the header alone, no payload
        _kernel_sends(e, p.LOOKUP, 10, b"", b"n\0")
        e.request()
        e.commit([p.OUT_HEADER.pack(16, -errno.ENOENT, 10)])
        assert p.OUT_HEADER.unpack_from(e.header, 0) == (16, -errno.ENOENT, 10)
        assert struct.unpack_from("<I", e.header, ur.ENT_IN_OUT + 16)[0] == 0
        # READ data read into the payload itself (``out``) is not copied onto itself
        _kernel_sends(e, p.READ, 12, bytes(40), b"")
        e.request()
        e.out[:5] = b"hello"
        e.commit([p.OUT_HEADER.pack(21, 0, 12), e.out[:5]])
        assert bytes(e.out[:5]) == b"hello"
        assert struct.unpack_from("<I", e.header, ur.ENT_IN_OUT + 16)[0] == 5
    finally:
        e.close()


def test_possible_cpus_parses_ranges(monkeypatch, tmp_path):
    f = tmp_path / "possible"
    f.write_text("0-2,5\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        f if path == "/sys/devices/system/cpu/possible" else path, *a, **k))
    assert ur.possible_cpus() == [0, 1, 2, 5]


def _offer(fk: FakeKernel) -> int:
    r = fk.init(flags=p.ASYNC_READ | p.INIT_EXT | ur.OVER_IO_URING)
    assert r.error == 0
    return p.InitOut.decode(r.body).flags


def test_init_declines_io_uring_when_off():
    fk = FakeKernel(MemoryOps(p.ASYNC_READ), uring="off")
    assert not _offer(fk) & ur.OVER_IO_URING
    assert fk.session.rings is None
    assert fk.close()


def test_init_declines_io_uring_when_the_rings_cannot_be_made(monkeypatch, caplog):
    def refuse(*_a, **_k):
        raise OSError(errno.EPERM, "io_uring_setup: Operation not permitted")
    monkeypatch.setattr(ur.Rings, "create", classmethod(refuse))
    fk = FakeKernel(MemoryOps(p.ASYNC_READ), uring="auto")
    with caplog.at_level(logging.WARNING, logger="overlaypc.engine"):
        flags = _offer(fk)
    assert not flags & ur.OVER_IO_URING and flags & p.ASYNC_READ
    assert fk.session.rings is None
    assert any("io_uring unavailable" in r.getMessage() for r in caplog.records)
    assert fk.close()


def test_init_accepts_io_uring_with_rings(monkeypatch):
    made = []

    def create(cls, fd, payload_size, **_k):
        made.append(payload_size)
        return ur.Rings(fd, [])
    monkeypatch.setattr(ur.Rings, "create", classmethod(create))
    fk = FakeKernel(MemoryOps(p.ASYNC_READ | p.MAX_PAGES), uring="auto")
    assert _offer(fk) & ur.OVER_IO_URING
    assert made == [1 << 20]  # the payload holds the largest WRITE
    assert fk.session.rings is not None and fk.session.pool.bound == 1
    fk.session.rings = None  # (no queue threads here: the fake has no ring)
    assert fk.close()


class _FakeRing:
    """A ring whose completions come from ``steps``: each fills the entry as the kernel
    would and returns the completions; the SQEs put are kept."""

    def __init__(self, steps) -> None:
        self.steps = list(steps)
        self.sqes: list[bytes] = []
        self.closed = False

    def enable(self) -> None:
        pass

    def put(self, sqe) -> None:
        self.sqes.append(bytes(sqe))

    def enter(self, wait: int = 1) -> None:
        pass

    def completions(self):
        return self.steps.pop(0)()

    def close(self) -> None:
        self.closed = True


def _serve(steps, dispatch, read, error_code) -> tuple[_FakeRing, ur.Entry]:
    """Run one queue's loop over ``steps`` in a thread of its own (it pins itself)."""
    import threading
    e = ur.Entry(0, 1 << 16)
    ring = _FakeRing([step(e) for step in steps])
    queue = ur.Queue(0, ring, [e])
    t = threading.Thread(target=ur.Rings(7, [queue]).run,
                         args=(queue, dispatch, read, error_code))
    t.start()
    t.join(10)
    assert not t.is_alive() and ring.closed
    return ring, e


def test_a_queue_answers_read_itself_and_the_rest_through_dispatch():
    seen: dict = {"dispatch": [], "reads": [], "codes": []}
    replies = []

    def read(fh, buf, offset):
        seen["reads"].append((fh, len(buf), offset))
        if offset == 1:
            raise OSError(errno.ENOENT, "gone")
        if offset == 2:
            raise ValueError("a bug")
        buf[:10] = b"0123456789"
        return 10

    def error_code(op, nodeid, err):
        seen["codes"].append((op, nodeid, type(err).__name__))
        return err.errno if isinstance(err, OSError) else errno.EIO

    def dispatch(dest, msg, out):
        seen["dispatch"].append(bytes(msg))
        dest.commit([p.OUT_HEADER.pack(16 + 4, 0, p.IN_HEADER.unpack_from(msg)[2]), b"attr"])

    def read_req(unique, offset):
        def fill(e):
            def step():
                _kernel_sends(e, p.READ, unique, p.READ_IN.pack(3, offset, 10, 0, 0, 0, 0), b"")
                return [(0, 0)]
            return step
        return fill

    def snapshot():
        def fill(e):
            def step():
                replies.append((p.OUT_HEADER.unpack_from(e.header, 0),
                                struct.unpack_from("<QQI", e.header, ur.ENT_IN_OUT),
                                bytes(e.out[:10])))
                return []
            return step
        return fill

    getattr_msg = []

    def getattr_req(e):
        def step():
            getattr_msg.append(_kernel_sends(e, p.GETATTR, 20, bytes(16), b""))
            return [(0, 0)]
        return step

    def gone(e):
        return lambda: [(0, -errno.ENOTCONN)]

    ring, e = _serve([read_req(8, 4096), snapshot(), read_req(10, 1), snapshot(),
                      read_req(12, 2), snapshot(), getattr_req, gone], dispatch, read, error_code)
    try:
        assert seen["reads"] == [(3, 10, 4096), (3, 10, 1), (3, 10, 2)]
        (h1, ent1, data1), (h2, ent2, _), (h3, ent3, _) = replies
        assert h1 == (26, 0, 8) and ent1 == (0, 8, 10) and data1 == b"0123456789"
        assert h2 == (16, -errno.ENOENT, 10) and ent2 == (0, 10, 0)
        assert h3 == (16, -errno.EIO, 12) and ent3 == (0, 12, 0)
        assert seen["codes"] == [(p.READ, 5, "FileNotFoundError"), (p.READ, 5, "ValueError")]
        # the GETATTR went to dispatch, laid out as read(2) gives it, its reply in the entry
        assert seen["dispatch"] == getattr_msg
        assert p.OUT_HEADER.unpack_from(e.header, 0) == (20, 0, 20) and bytes(e.out[:4]) == b"attr"
        # SQEs: the REGISTER, then a COMMIT_AND_FETCH per request with its unique
        ops = [(struct.unpack_from("<I", s, 8)[0], struct.unpack_from("<Q", s, ur._COMMIT_ID)[0])
               for s in ring.sqes]
        assert ops == [(ur.CMD_REGISTER, 0)] + [(ur.CMD_COMMIT_AND_FETCH, u) for u in (8, 10, 12, 20)]
    finally:
        e.close()
