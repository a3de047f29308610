"""The engine's ``Session`` driven by a fake kernel (``engine_support.FakeKernel``) over
SOCK_SEQPACKET socket pairs, without root or a mount: INIT negotiation, request and reply
encoding, the undo of undelivered replies (the one seam: ``Session._writev`` fails a
chosen reply with ENOENT, as the kernel answers the reply to an interrupted request),
exact reference counts under concurrent FORGETs, READDIRPLUS references, errors."""
from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading

import pytest

import helpers

from engine_support import KERNEL_FLAGS, FakeKernel, MemoryOps, entry_of, parse_dirents
from overlaypc.engine import protocol as p
from overlaypc.engine.ops import Operations
from overlaypc.engine.pool import in_io
from overlaypc.engine.session import ProtocolError


@pytest.fixture
def kernel():
    """Factory: ``kernel(ops=None, workers=1, **init)`` -> a started FakeKernel."""
    made: list[FakeKernel] = []

    def make(ops=None, *, workers: int = 1, session_kw=None, **init_kw) -> FakeKernel:
        fk = FakeKernel(ops or MemoryOps(p.ASYNC_READ | p.DO_READDIRPLUS), workers=workers,
                        **(session_kw or {}))
        made.append(fk)
        fk.start(**init_kw)
        return fk

    yield make
    for fk in made:
        assert fk.close(), "the session's loop did not end when the connection closed"


def _mkdir(name: bytes, mode: int = 0o755, umask: int = 0o022) -> bytes:
    return p.MKDIR_IN.pack(mode, umask) + name + b"\0"


def _create(name: bytes, flags: int = os.O_RDWR, mode: int = 0o644) -> bytes:
    return p.CREATE_IN.pack(flags, mode, 0o022, 0) + name + b"\0"


def _readdir(fh: int, offset: int, size: int) -> bytes:
    return p.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)


# ==========================================================================================
# INIT
# ==========================================================================================
def test_init_grants_only_offered_flags():
    wanted = p.ASYNC_READ | p.MAX_PAGES | p.DO_READDIRPLUS | p.WRITEBACK_CACHE | p.CREATE_SUPP_GROUP
    offered = p.ASYNC_READ | p.MAX_PAGES | p.DO_READDIRPLUS | p.BIG_WRITES | p.INIT_EXT
    fk = FakeKernel(MemoryOps(wanted))
    r = fk.init(flags=offered, max_readahead=1 << 16)
    assert r.error == 0 and len(r.body) == 64
    out = p.InitOut.decode(r.body)
    assert out.flags == p.ASYNC_READ | p.MAX_PAGES | p.DO_READDIRPLUS
    assert struct.unpack_from("<I", r.body, 32)[0] == 0   # no flags2 asked: none granted
    assert (out.major, out.minor) == (7, 44)
    assert out.max_write == 1 << 20 and out.max_pages == 256
    assert out.max_readahead == 1 << 16          # never more than the kernel's
    assert out.congestion_threshold <= out.max_background
    assert fk.session.conn.wanted == out.flags
    assert fk.close()


def test_init_ext_for_flags_above_31():
    wanted = p.ASYNC_READ | p.CREATE_SUPP_GROUP | p.SECURITY_CTX
    fk = FakeKernel(MemoryOps(wanted))
    out = p.InitOut.decode(fk.init(flags=p.ASYNC_READ | p.INIT_EXT | p.CREATE_SUPP_GROUP).body)
    assert out.flags == p.ASYNC_READ | p.INIT_EXT | p.CREATE_SUPP_GROUP
    # the same flags offered by a kernel without INIT_EXT (flags2 not read): not granted
    fk2 = FakeKernel(MemoryOps(wanted))
    body = p.INIT_IN_EXT.pack(7, 44, 4096, p.ASYNC_READ, p.CREATE_SUPP_GROUP >> 32) + bytes(44)
    r = fk2.init(body=body)
    assert p.InitOut.decode(r.body).flags == p.ASYNC_READ
    assert struct.unpack_from("<II", r.body, 12)[0] & p.INIT_EXT == 0
    assert fk.close() and fk2.close()


def test_init_max_pages_only_when_granted():
    fk = FakeKernel(MemoryOps(p.ASYNC_READ), max_write=128 << 10)
    out = p.InitOut.decode(fk.init().body)
    assert out.max_write == 128 << 10 and out.max_pages == 0
    fk2 = FakeKernel(MemoryOps(p.MAX_PAGES), max_write=128 << 10)
    out = p.InitOut.decode(fk2.init().body)
    assert out.max_pages == 32
    assert fk.close() and fk2.close()


def test_init_older_minor():
    fk = FakeKernel(MemoryOps(p.ASYNC_READ | p.SETXATTR_EXT))
    out = p.InitOut.decode(fk.init(minor=31, flags=p.ASYNC_READ).body)
    assert (out.major, out.minor) == (7, 31)
    assert out.flags == p.ASYNC_READ
    assert fk.session._setxattr_ext is False   # the kernel sends the old SETXATTR layout
    assert fk.close()


def test_init_newer_major_answers_our_major_then_retries():
    fk = FakeKernel(MemoryOps(p.ASYNC_READ))
    first = fk.send(p.INIT, 0, p.InitIn(8, 0, 4096, p.ASYNC_READ).encode())
    second = fk.send(p.INIT, 0, p.InitIn(7, 40, 4096, p.ASYNC_READ).encode())
    conn = fk.session.handshake()
    r = fk.receive()
    assert r.unique == first and r.error == 0
    assert struct.unpack_from("<II", r.body) == (7, p.KERNEL_MINOR)
    r = fk.receive()
    assert r.unique == second and r.error == 0
    assert p.InitOut.decode(r.body).minor == 40 and conn.minor == 40
    assert fk.close()


@pytest.mark.parametrize("major,minor", [(7, 30), (7, 9), (6, 50)])
def test_init_too_old_is_eproto(major, minor):
    fk = FakeKernel(MemoryOps())
    unique = fk.send(p.INIT, 0, p.InitIn(major, minor, 4096, 0).encode())
    with pytest.raises(ProtocolError):
        fk.session.handshake()
    r = fk.receive()
    assert (r.unique, r.error) == (unique, -errno.EPROTO)
    assert fk.close()


def test_request_before_init_is_eio():
    fk = FakeKernel(MemoryOps())
    early = fk.send(p.GETATTR, 1, p.GETATTR_IN.pack(0, 0, 0))
    init = fk.send(p.INIT, 0, p.InitIn(7, 44, 4096, p.ASYNC_READ).encode())
    fk.session.handshake()
    r = fk.receive()
    assert (r.unique, r.error) == (early, -errno.EIO)
    r = fk.receive()
    assert (r.unique, r.error) == (init, 0)
    assert fk.close()


# ==========================================================================================
# Requests and replies
# ==========================================================================================
def test_entry_ops_and_attrs(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    nodeid, attr = entry_of(fk.ok(p.MKDIR, 1, _mkdir(b"d", 0o750, 0o027)))
    assert stat.S_ISDIR(attr.mode) and attr.ino == nodeid
    assert ops.called("mkdir") == [(1, b"d", 0o750, 0o027)]
    body = fk.ok(p.LOOKUP, 1, b"d\0")
    assert len(body) == 128 and entry_of(body)[0] == nodeid
    # timeouts: MemoryOps answers 1.0 s
    assert struct.unpack_from("<QQQQII", body)[2:] == (1, 1, 0, 0)
    body = fk.ok(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0))
    assert len(body) == 104 and p.unpack_attr(body, 16) == ops.attr(nodeid)
    assert ops.called("getattr") == [(nodeid, None)]
    fk.ok(p.GETATTR, nodeid, p.GETATTR_IN.pack(p.GETATTR_FH, 0, 55))
    assert ops.called("getattr")[-1] == (nodeid, 55)
    # negative entry: nodeid 0, its timeout, no reference
    body = fk.ok(p.LOOKUP, 1, b"negative\0")
    assert struct.unpack_from("<QQQ", body) == (0, 0, 5)
    assert fk.request(p.LOOKUP, 1, b"missing\0").error == -errno.ENOENT
    # symlink, link, rename, unlink
    link_id, _ = entry_of(fk.ok(p.SYMLINK, nodeid, b"ln\0target/path\0"))
    assert ops.called("symlink") == [(nodeid, b"ln", b"target/path")]
    assert fk.ok(p.READLINK, link_id) == b"target/path"
    fk.ok(p.LINK, nodeid, p.LINK_IN.pack(link_id) + b"ln2\0")
    assert ops.called("link") == [(link_id, nodeid, b"ln2")]
    assert fk.ok(p.RENAME, nodeid, p.RENAME_IN.pack(1) + b"ln2\0moved\0") == b""
    fk.ok(p.RENAME2, 1, p.RENAME2_IN.pack(nodeid, 1, 0) + b"moved\0back\0")
    assert ops.called("rename") == [(nodeid, b"ln2", 1, b"moved", 0), (1, b"moved", nodeid, b"back", 1)]
    assert fk.ok(p.UNLINK, nodeid, b"back\0") == b""
    fk.ok(p.MKNOD, 1, p.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0o002, 0) + b"fifo\0")
    assert ops.called("mknod") == [(1, b"fifo", stat.S_IFIFO | 0o600, 0, 0o002)]
    # every reference the kernel got is counted exactly once
    assert ops.nlookups() == {nodeid: 2, link_id: 2, ops.nodes[1].children[b"fifo"]: 1}


def test_file_io_and_setattr(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    body = fk.ok(p.CREATE, 1, _create(b"f", os.O_RDWR | os.O_CREAT, 0o640))
    assert len(body) == 128 + 16
    nodeid, _ = entry_of(body)
    fh, open_flags, backing = p.OPEN_OUT.unpack_from(body, 128)
    assert open_flags == p.FOPEN_DIRECT_IO and backing == 0
    data = os.urandom(5000)
    r = fk.ok(p.WRITE, nodeid, p.WRITE_IN.pack(fh, 10, len(data), p.WRITE_CACHE, 0, 0, 0) + data)
    assert p.WRITE_OUT.unpack(r) == (5000, 0)
    assert ops.called("write")[0][1:] == (fh, data, 10, p.WRITE_CACHE)
    assert fk.ok(p.READ, nodeid, p.READ_IN.pack(fh, 8, 100, 0, 0, 0, 0)) == bytes(2) + data[:98]
    assert fk.ok(p.READ, nodeid, p.READ_IN.pack(fh, 5000, 4096, 0, 0, 0, 0)) == data[4990:]
    # a read larger than the session's scratch buffer still answers
    big = fk.ok(p.READ, nodeid, p.READ_IN.pack(fh, 0, (1 << 20) + 4096, 0, 0, 0, 0))
    assert big == bytes(10) + data
    sa = p.SetAttr(p.FATTR_SIZE | p.FATTR_FH | p.FATTR_MTIME_NOW | p.FATTR_MTIME, fh, 7, None,
                   None, 0, 0, 0)
    body = fk.ok(p.SETATTR, nodeid, sa.encode())
    assert p.unpack_attr(body, 16).size == 7
    assert ops.called("setattr")[0][1].mtime_ns is None and ops.called("setattr")[0][1].fh == fh
    fk.ok(p.FLUSH, nodeid, p.FLUSH_IN.pack(fh, 0, 0, 0))
    fk.ok(p.FSYNC, nodeid, p.FSYNC_IN.pack(fh, p.FSYNC_FDATASYNC, 0))
    assert ops.called("fsync") == [(nodeid, fh, True)]
    fk.ok(p.RELEASE, nodeid, p.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0))
    assert ops.handles == {}
    fh2, flags, _ = p.OPEN_OUT.unpack(fk.ok(p.OPEN, nodeid, p.OPEN_IN.pack(os.O_RDONLY, 0)))
    assert flags == p.FOPEN_KEEP_CACHE
    fk.ok(p.RELEASE, nodeid, p.RELEASE_IN.pack(fh2, 0, 0, 0))
    st = fk.ok(p.STATFS, 1)
    assert struct.unpack_from("<QQQQQIII", st) == (1000, 500, 400, 100, 50, 4096, 255, 4096)


def test_readdir_entries_and_offsets(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    for name in (b"a", b"bb", b"a-much-longer-name"):
        ops.add(1, name, stat.S_IFREG | 0o644)
    fh = p.OPEN_OUT.unpack(fk.ok(p.OPENDIR, 1, p.OPEN_IN.pack(os.O_RDONLY, 0)))[0]
    ents = parse_dirents(fk.ok(p.READDIR, 1, _readdir(fh, 0, 4096)), plus=False)
    assert [e[0] for e in ents] == [b".", b"..", b"a", b"a-much-longer-name", b"bb"]
    assert [e[2] for e in ents] == [1, 2, 3, 4, 5]
    assert [e[3] for e in ents] == [4, 4, 8, 8, 8]
    # from a cookie, and only what fits in the size asked (two entries of 32 bytes)
    ents = parse_dirents(fk.ok(p.READDIR, 1, _readdir(fh, 2, 64)), plus=False)
    assert [e[0] for e in ents] == [b"a"]  # "a-much-longer-name" needs 48 more bytes
    assert fk.ok(p.READDIR, 1, _readdir(fh, 5, 4096)) == b""
    fk.ok(p.RELEASEDIR, 1, p.RELEASE_IN.pack(fh, 0, 0, 0))
    assert ops.handles == {}


# ==========================================================================================
# Undelivered replies are undone (the seam: Session._writev)
# ==========================================================================================
def test_undo_lookup_and_entry_creators(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    d = ops.add(1, b"d", stat.S_IFDIR | 0o755)
    f = ops.add(1, b"f", stat.S_IFREG | 0o644)
    fk.request(p.LOOKUP, 1, b"d\0", fail=True)
    assert ops.called("forget") == [(d, 1)] and ops.nlookups() == {}
    fk.request(p.MKDIR, 1, _mkdir(b"m"), fail=True)
    m = ops.nodes[1].children[b"m"]
    fk.request(p.MKNOD, 1, p.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0, 0) + b"n\0", fail=True)
    fk.request(p.SYMLINK, 1, b"s\0t\0", fail=True)
    fk.request(p.LINK, d, p.LINK_IN.pack(f) + b"l\0", fail=True)
    assert ops.nlookups() == {}, "an undelivered entry kept its reference"
    assert (m, 1) in ops.called("forget") and (f, 1) in ops.called("forget")
    # a negative entry has no reference, so nothing to forget
    n = len(ops.called("forget"))
    fk.request(p.LOOKUP, 1, b"negative\0", fail=True)
    assert len(ops.called("forget")) == n
    # a delivered reply keeps it
    fk.ok(p.LOOKUP, 1, b"d\0")
    assert ops.nlookups() == {d: 1}


def test_undo_open_opendir_create(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    f = ops.add(1, b"f", stat.S_IFREG | 0o644)
    fk.request(p.OPEN, f, p.OPEN_IN.pack(os.O_WRONLY, 0), fail=True)
    assert ops.handles == {}
    assert [(n, flags) for n, _, flags in ops.called("release")] == [(f, os.O_WRONLY)]
    fk.request(p.OPENDIR, 1, p.OPEN_IN.pack(os.O_RDONLY, 0), fail=True)
    assert ops.handles == {} and [n for n, _ in ops.called("releasedir")] == [1]
    fk.request(p.CREATE, 1, _create(b"new", os.O_RDWR | os.O_CREAT), fail=True)
    new = ops.nodes[1].children[b"new"]
    assert ops.handles == {} and ops.nlookups() == {}
    assert ops.called("release")[-1][0] == new and (new, 1) in ops.called("forget")


def test_tmpfile_is_decoded_and_answered_as_create(kernel):
    """TMPFILE (``open(dir, O_TMPFILE)``, 7.37) carries ``fuse_create_in`` and the kernel's
    placeholder name "/" and is answered as CREATE: entry, then open. Its flags, mode and
    umask reach ``Operations.tmpfile``; an undelivered reply releases the handle and
    forgets the reference. A filesystem without ``tmpfile`` answers ENOSYS (the kernel
    then answers EOPNOTSUPP and asks no more)."""
    ops = MemoryOps()
    fk = kernel(ops)
    d = ops.add(1, b"d", stat.S_IFDIR | 0o755)
    flags = os.O_TMPFILE | os.O_RDWR | os.O_EXCL
    body = fk.ok(p.TMPFILE, d, p.CREATE_IN.pack(flags, stat.S_IFREG | 0o600, 0o027, 0) + b"/\0")
    assert len(body) == 128 + 16
    nodeid, attr = entry_of(body)
    fh, open_flags, backing = p.OPEN_OUT.unpack_from(body, 128)
    assert open_flags == p.FOPEN_KEEP_CACHE and backing == 0 and ops.handles == {fh: nodeid}
    assert stat.S_ISREG(attr.mode) and ops.nodes[d].children == {}
    assert ops.called("tmpfile") == [(d, stat.S_IFREG | 0o600, flags, 0o027, 0)]
    assert ops.nlookups() == {nodeid: 1}
    fk.request(p.TMPFILE, d, p.CREATE_IN.pack(os.O_TMPFILE | os.O_WRONLY, stat.S_IFREG | 0o644,
                                              0, 0) + b"/\0", fail=True)
    undone = ops.called("tmpfile")[-1]
    assert undone[2] == os.O_TMPFILE | os.O_WRONLY
    assert ops.handles == {fh: nodeid} and ops.nlookups() == {nodeid: 1}
    (released,) = ops.called("release")
    assert released[0] != nodeid and (released[0], 1) in ops.called("forget")
    plain_ops = MemoryOps()
    plain_ops.tmpfile = Operations.tmpfile.__get__(plain_ops)  # (the base class's: none)
    plain = kernel(plain_ops)
    assert plain.request(p.TMPFILE, 1, p.CREATE_IN.pack(flags, stat.S_IFREG | 0o600, 0, 0)
                         + b"/\0").error == -errno.ENOSYS


def test_undo_readdirplus(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    for name in (b"x", b"y"):
        ops.add(1, name, stat.S_IFREG)
    fh = p.OPEN_OUT.unpack(fk.ok(p.OPENDIR, 1, p.OPEN_IN.pack(0, 0)))[0]
    fk.request(p.READDIRPLUS, 1, _readdir(fh, 0, 4096), fail=True)
    assert ops.taken == [b"x", b"y"] and ops.nlookups() == {}


class HandleReads(MemoryOps):
    """MemoryOps whose READ goes through ``read_fh`` (the handle alone): fh 1 serves
    ``DATA``, fh 2 raises RuntimeError, any other fh is EBADF."""

    DATA = bytes(range(256)) * 40

    def read_fh(self, fh: int, buf: memoryview, offset: int) -> int:
        self._rec("read_fh", fh, len(buf), offset)
        if fh == 2:
            raise RuntimeError("boom")
        if fh != 1:
            raise OSError(errno.EBADF, "bad file handle")
        data = self.DATA[offset:offset + len(buf)]
        buf[:len(data)] = data
        return len(data)


@pytest.mark.filterwarnings("ignore")
def test_read_fh_serves_reads_and_its_failures_are_answered(kernel, caplog):
    ops = HandleReads()
    fk = kernel(ops)
    nid = ops.add(1, b"f", stat.S_IFREG, b"unused")
    data = HandleReads.DATA
    assert fk.ok(p.READ, nid, p.READ_IN.pack(1, 100, 300, 0, 0, 0, 0)) == data[100:400]
    assert fk.ok(p.READ, nid, p.READ_IN.pack(1, len(data) - 5, 4096, 0, 0, 0, 0)) == data[-5:]
    # larger than the session's scratch buffer
    big = fk.ok(p.READ, nid, p.READ_IN.pack(1, 0, (1 << 20) + 4096, 0, 0, 0, 0))
    assert big == data
    assert fk.request(p.READ, nid, p.READ_IN.pack(9, 0, 10, 0, 0, 0, 0)).error == -errno.EBADF
    with caplog.at_level(logging.ERROR, logger="overlaypc.engine"):
        r = fk.request(p.READ, nid, p.READ_IN.pack(2, 0, 10, 0, 0, 0, 0))
    assert r.error == -errno.EIO
    assert "unexpected error in READ" in caplog.text and ops.errors == 1
    # an interrupted READ's reply goes nowhere, and serving goes on
    fk.request(p.READ, nid, p.READ_IN.pack(1, 0, 10, 0, 0, 0, 0), fail=True)
    assert fk.ok(p.READ, nid, p.READ_IN.pack(1, 7, 3, 0, 0, 0, 0)) == data[7:10]
    assert ops.called("read") == []  # ``read`` is for filesystems without ``read_fh``
    assert ops.called("read_fh")[0] == (1, 300, 100)


def test_failed_error_reply_needs_no_undo(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    fk.request(p.LOOKUP, 1, b"missing\0", fail=True)
    assert ops.called("forget") == []


# ==========================================================================================
# READDIRPLUS references
# ==========================================================================================
def test_readdirplus_takes_only_what_fits_never_dots(kernel):
    """Before: the session called ``take`` for ``.`` and ``..`` when the filesystem offered
    it, and the kernel ignores those entries (``fuse_direntplus_link``): no FORGET ever
    came for the reference taken."""
    ops = MemoryOps()
    fk = kernel(ops)
    ids = {name: ops.add(1, name, stat.S_IFREG | 0o644) for name in (b"a", b"b", b"c", b"d")}
    fh = p.OPEN_OUT.unpack(fk.ok(p.OPENDIR, 1, p.OPEN_IN.pack(0, 0)))[0]
    one = p.dirent_size(b"a", True)                 # 160
    body = fk.ok(p.READDIRPLUS, 1, _readdir(fh, 0, 4 * one + one // 2))
    ents = parse_dirents(body, plus=True)
    assert [e[0] for e in ents] == [b".", b"..", b"a", b"b"]
    assert [e[4] for e in ents] == [0, 0, ids[b"a"], ids[b"b"]]
    assert ops.taken == [b"a", b"b"], "take ran for an entry not in the reply, or for . / .."
    assert ops.nlookups() == {ids[b"a"]: 1, ids[b"b"]: 1}
    # the rest, from the cookie of the last entry sent
    ents = parse_dirents(fk.ok(p.READDIRPLUS, 1, _readdir(fh, ents[-1][2], 4096)), plus=True)
    assert [e[0] for e in ents] == [b"c", b"d"]
    assert ops.nlookups() == {i: 1 for i in ids.values()}
    # an entry whose take fails mid-listing: nothing taken is kept
    fk.batch_forget([(i, 1) for i in ids.values()])
    fk.ok(p.STATFS, 1)
    assert ops.nlookups() == {}


def test_readdirplus_take_raising_forgets_what_was_taken(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    ops.add(1, b"a", stat.S_IFREG)
    ops.add(1, b"b", stat.S_IFREG)
    orig = ops.readdir

    def readdir(req, nodeid, fh, offset, plus):
        for item in orig(req, nodeid, fh, offset, plus):
            if item.name == b"b":
                def bad():
                    raise OSError(errno.EIO, "disk on fire")
                item.take = bad
            yield item

    ops.readdir = readdir
    fh = p.OPEN_OUT.unpack(fk.ok(p.OPENDIR, 1, p.OPEN_IN.pack(0, 0)))[0]
    assert fk.request(p.READDIRPLUS, 1, _readdir(fh, 0, 4096)).error == -errno.EIO
    assert ops.taken == [b"a"] and ops.nlookups() == {}


# ==========================================================================================
# Start: the first worker answers before the clones start
# ==========================================================================================
def test_clones_start_once_the_first_request_is_answered(kernel):
    """The mount's first request (the stat that waited for INIT) is not delayed by cloning
    and starting the other workers: they start once the first worker has answered it."""
    fk = kernel(MemoryOps(), workers=4, session_kw={"clone_delay": 60})
    assert len(fk.kernel_socks) == 1       # serving: the first worker only, no clone yet
    fk.ok(p.STATFS, 1)
    assert fk.all_cloned.wait(10) and len(fk.kernel_socks) == 4
    for via in range(4):
        fk.ok(p.STATFS, 1, via=via)


def test_unmount_before_any_request_clones_nothing(kernel):
    fk = kernel(MemoryOps(), workers=4, session_kw={"clone_delay": 60})
    assert fk.close()                      # the loop ends at once, without waiting for the delay
    assert len(fk.kernel_socks) == 1


class _NotifyingOps(MemoryOps):
    """STATFS queues a notification first, then (with ``hold``) waits until it is set."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        super().__init__()
        self.hold = hold

    def statfs(self, req, nodeid):
        self.notifier.inval_inode(5, 0, -1)
        if self.hold is not None:
            assert self.hold.wait(20)
        return super().statfs(req, nodeid)


def _next_notification(fk: FakeKernel) -> bytes:
    """The next notification on the channel's socket (its timeout, 20 s, fails the test)."""
    if fk.notifications:
        return fk.notifications.pop(0)
    return fk.kernel_socks[0].recv(4096)


def test_a_notification_the_first_request_queues_is_written_once_it_is_answered(kernel):
    """The notifier starts with the clones, after the first reply: a notification the
    first request queued before then waits in the queue and is written, not lost."""
    ops = _NotifyingOps()
    fk = kernel(ops, workers=2, session_kw={"clone_delay": 60})
    assert not fk.session.notifier._thread.is_alive()  # (not before the first reply)
    fk.ok(p.STATFS, 1)
    assert _next_notification(fk) == p.notify_inval_inode(5, 0, -1)


def test_a_first_request_that_blocks_holds_no_notification_back(kernel):
    """A first request that gets no reply (it blocks) does not keep the notifier from
    starting: after ``clone_delay`` it starts and writes what that request queued."""
    hold = threading.Event()
    fk = kernel(_NotifyingOps(hold), workers=2, session_kw={"clone_delay": 0.1})
    fk.send(p.STATFS, 1)
    try:
        assert _next_notification(fk) == p.notify_inval_inode(5, 0, -1)  # while it blocks
    finally:
        hold.set()
    assert fk.receive().error == 0


class _AttrInvalOps(MemoryOps):
    """STATFS drops node 5's cached attributes (attributes only: offset -1) first."""

    def statfs(self, req, nodeid):
        self.notifier.inval_inode(5, -1)
        return super().statfs(req, nodeid)


def test_an_attribute_invalidation_reaches_the_kernel_before_the_reply(kernel):
    """notify49: an attribute-only INVAL_INODE a request caused (a copy-up's, a chmod that
    killed a bit) was queued for the notifier's thread, so the request's reply could reach
    the kernel first, and the caller's next ``stat`` was answered from the attributes it
    should have dropped. It is written by the request's own worker, before the reply (the
    kernel takes no inode lock for one); the notifier here never starts (the first
    request's reply starts it, ``clone_delay`` is long), so nothing else could write it."""
    fk = kernel(_AttrInvalOps(), workers=2, session_kw={"clone_delay": 60})
    unique = fk.send(p.STATFS, 1)
    first = fk.kernel_socks[0].recv(1 << 16)
    assert first == p.notify_inval_inode(5, -1), p.OUT_HEADER.unpack_from(first)
    second = fk.kernel_socks[0].recv(1 << 16)
    assert p.OUT_HEADER.unpack_from(second)[1:] == (0, unique)


def test_a_first_worker_that_cannot_start_leaves_no_thread_running(monkeypatch):
    """Before: ``serve`` started the notifier and the pool's watch, then raised from the
    first worker's start without stopping them (two threads left per failed session)."""
    fk = FakeKernel(MemoryOps(), workers=2)
    fk.init()

    def no_thread(fd, slot):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(fk.session, "_start_worker", no_thread)
    with pytest.raises(RuntimeError):
        fk.session.serve()
    threads = [t for t in (fk.session.notifier._thread, fk.session._watcher) if t is not None]
    assert helpers.wait_until(lambda: not any(t.is_alive() for t in threads), 10), threads
    fk.close()


def test_a_clone_racing_the_end_of_the_connection_lets_serve_end():
    """The harness's own race (seen under load: ``test_a_failing_ready_callback...`` timed
    out in ``close``): a clone made after the connection ended gave a worker a socket
    nobody closed, and ``serve`` waited for it for ever. A clone of an ended connection
    fails, as the kernel's does (ENODEV), and ``serve`` ends."""
    fk = FakeKernel(MemoryOps(), workers=2, clone_delay=30)
    fk.init()
    make_pair, cloning, closed = fk._pair, threading.Event(), threading.Event()

    def late_pair() -> int:  # the session's clone, held until the connection has ended
        cloning.set()
        assert closed.wait(10)
        return make_pair()
    fk.session._clone = late_pair
    fk._thread = threading.Thread(target=fk.session.serve, daemon=True)
    fk._thread.start()
    fk.ok(p.STATFS, 1)  # the first answer: ``serve`` clones now
    assert cloning.wait(10)
    for s in fk.kernel_socks:  # ``close``'s first step, before the clone is made
        s.close()
    fk._ended = True
    closed.set()
    fk._thread.join(timeout=10)
    assert not fk._thread.is_alive(), "serve() did not end: a late clone's worker waits"
    assert fk.close()


def test_a_failing_ready_callback_leaves_the_mount_served(kernel):
    """``ready`` (the daemon's word to its waiting parent) failing is logged; the mount,
    live since the first worker started, is still answered and ends cleanly. Before:
    ``serve`` raised, and the daemon exited leaving a dead mount (ENOTCONN)."""
    fk = FakeKernel(MemoryOps(), workers=2)
    fk.init()
    called = threading.Event()
    raised: list[BaseException] = []

    def ready():
        called.set()
        raise BrokenPipeError("the parent is gone")

    def serve():
        try:
            fk.session.serve(ready)
        except BaseException as e:  # noqa: BLE001 (the test's finding)
            raised.append(e)
    fk._thread = threading.Thread(target=serve, daemon=True)
    fk._thread.start()
    assert called.wait(10)
    fk.ok(p.STATFS, 1)
    assert fk.close(), "serve() did not end with the connection"
    assert not raised, raised


# ==========================================================================================
# The pool: more workers while requests block, retired when nothing does (engine/pool.py)
# ==========================================================================================
def _blocked_lookup(fk: FakeKernel, ops: MemoryOps, via: int, count: int) -> int:
    """LOOKUP of ``gate`` on worker ``via``, which blocks until ``ops.gate_open``; returns
    once ``count`` lookups of it have begun."""
    unique = fk.send(p.LOOKUP, 1, b"gate\0", via=via)
    assert helpers.wait_until(lambda: len(ops.called("lookup")) >= count, 10)
    return unique


def _settled(fk: FakeKernel, ops: MemoryOps) -> None:
    """Wait until every worker not at the gate waits for a request (one that has just
    answered may not be back yet, and would count as busy)."""
    pool = fk.session.pool
    assert helpers.wait_until(
        lambda: all(not s.since or s.tid in ops.at_gate for s in pool.slots), 10)


@pytest.fixture
def pool_kernel(kernel):
    """Factory: ``pool_kernel(**session_kw)`` -> (FakeKernel with 2 workers, its MemoryOps
    with a ``gate`` file). The gate opens at teardown, before the connection closes."""
    made: list[MemoryOps] = []

    def make(**kw):
        ops = MemoryOps()
        ops.add(1, b"gate", stat.S_IFREG)
        made.append(ops)
        # the fake's handlers block on an event (a futex wait), which /proc would not show
        # as blocked: here a worker at the gate is the one blocked
        kw.setdefault("in_io", lambda tid: tid in ops.at_gate)
        kw.setdefault("blocked", 0.0)
        return kernel(ops, workers=2, session_kw=kw), ops

    yield make
    for ops in made:
        ops.gate_open.set()


def test_a_blocked_worker_makes_the_pool_grow(pool_kernel):
    """Worker 0 blocks; worker 1, picking up a request with no other worker waiting,
    starts a third on a new clone before answering, and that one serves."""
    fk, ops = pool_kernel()
    pool = fk.session.pool
    assert (pool.base, len(fk.kernel_socks)) == (2, 2)
    unique = _blocked_lookup(fk, ops, 0, 1)
    fk.ok(p.STATFS, 1, via=1)
    assert len(fk.kernel_socks) == 3 and pool.grown == 1
    _settled(fk, ops)
    fk.ok(p.STATFS, 1, via=2)              # the new worker serves its fd
    assert len(fk.kernel_socks) == 3       # ... and finds the third waiting: no growth
    ops.gate_open.set()
    assert fk.receive(0).unique == unique


def test_workers_that_all_block_at_once_get_a_spare(pool_kernel):
    """Both workers pick up a request while the other still waits (so neither sees the
    other blocked), then both block: the watch adds a third worker, which serves. Before:
    no worker was free to see them blocked, and nothing was answered until one returned.
    (A worker counts as blocked only once both are at the gate: the second picked up its
    request before the first had blocked.)"""
    ops_box: list = []
    fk, ops = pool_kernel(in_io=lambda tid: len(ops_box[0].at_gate) == 2
                          and tid in ops_box[0].at_gate)
    ops_box.append(ops)
    first = fk.send(p.LOOKUP, 1, b"gate\0", via=0)
    second = fk.send(p.LOOKUP, 1, b"gate\0", via=1)
    assert helpers.wait_until(lambda: len(ops.at_gate) == 2, 10)
    assert helpers.wait_until(lambda: len(fk.kernel_socks) == 3, 10), "no spare worker"
    assert fk.session.pool.grown == 1
    fk.ok(p.STATFS, 1, via=2)
    ops.gate_open.set()
    assert {fk.receive(0).unique, fk.receive(1).unique} == {first, second}


def test_a_busy_worker_that_is_not_blocked_grows_nothing(pool_kernel):
    """A long request that /proc does not show asleep in a system call (preempted, or
    waiting for the GIL or a lock) is no reason for another worker."""
    fk, ops = pool_kernel(in_io=lambda tid: False)
    unique = _blocked_lookup(fk, ops, 0, 1)
    for _ in range(3):
        _settled(fk, ops)
        fk.ok(p.STATFS, 1, via=1)
    assert len(fk.kernel_socks) == 2 and fk.session.pool.grown == 0
    ops.gate_open.set()
    assert fk.receive(0).unique == unique


def test_the_pool_grows_to_its_bound_only(pool_kernel):
    fk, ops = pool_kernel(max_extra=1)
    first = _blocked_lookup(fk, ops, 0, 1)
    fk.ok(p.STATFS, 1, via=1)
    assert len(fk.kernel_socks) == 3
    second = _blocked_lookup(fk, ops, 1, 2)
    _settled(fk, ops)
    fk.ok(p.STATFS, 1, via=2)              # every other worker blocked, but the pool is full
    assert len(fk.kernel_socks) == 3 and fk.session.pool.peak == 3
    ops.gate_open.set()
    assert {fk.receive(0).unique, fk.receive(1).unique} == {first, second}


def test_a_spare_retires_and_closes_its_fd_once_nothing_blocks(pool_kernel):
    fk, ops = pool_kernel(linger=0.0)
    unique = _blocked_lookup(fk, ops, 0, 1)
    fk.ok(p.STATFS, 1, via=1)
    assert len(fk.kernel_socks) == 3
    extra_fd = fk._session_socks[2].fileno()
    _settled(fk, ops)
    fk.ok(p.STATFS, 1, via=2)              # worker 0 still blocked: the spare stays
    _settled(fk, ops)                      # (its decision to stay made, before the gate opens)
    assert fk.closed == [] and len(fk.kernel_socks) == 3
    ops.gate_open.set()
    assert fk.receive(0).unique == unique
    _settled(fk, ops)
    fk.ok(p.STATFS, 1, via=2)              # answered, then nothing blocks: it retires
    assert helpers.wait_until(lambda: fk.closed == [extra_fd], 10), fk.closed
    assert fk.kernel_socks[2].recv(100) == b""   # its fd is closed: end of file
    pool = fk.session.pool
    assert (pool.retired, len(pool.slots)) == (1, 2)
    fk.ok(p.STATFS, 1, via=0)              # the base workers serve on
    fk.ok(p.STATFS, 1, via=1)


def test_the_connection_end_ends_the_workers_started_later(pool_kernel):
    """``serve`` returns only once every worker has ended, those started while it was
    already waiting for the first ones included."""
    fk, ops = pool_kernel()
    unique = _blocked_lookup(fk, ops, 0, 1)
    fk.ok(p.STATFS, 1, via=1)
    assert len(fk.kernel_socks) == 3
    threads = list(fk.session._threads)
    ops.gate_open.set()
    assert fk.receive(0).unique == unique
    assert fk.close()
    assert not [t.name for t in threads if t.is_alive()]
    assert ops.destroyed.is_set()


def test_in_io_tells_a_thread_blocked_in_the_kernel_from_one_waiting_for_a_lock():
    """The real test of ``pool.in_io`` on this process's own threads: a read of an empty
    pipe is blocked, a wait on an event (a futex) is not, nor is a thread that ended."""
    r, w = os.pipe()
    event = threading.Event()
    tids: dict[str, int] = {}
    started = threading.Barrier(3, timeout=10)

    def reader() -> None:
        tids["read"] = threading.get_native_id()
        started.wait()
        os.read(r, 1)

    def waiter() -> None:
        tids["wait"] = threading.get_native_id()
        started.wait()
        event.wait(20)

    threads = [threading.Thread(target=f, daemon=True) for f in (reader, waiter)]
    for t in threads:
        t.start()
    try:
        started.wait()
        # both are asleep once /proc shows a system call for them
        assert helpers.wait_until(lambda: in_io(tids["read"]), 10)
        assert helpers.wait_until(lambda: _syscall(tids["wait"])[:1].isdigit(), 10)
        assert not in_io(tids["wait"])
    finally:
        os.write(w, b"x")
        event.set()
        for t in threads:
            t.join(10)
        os.close(r)
        os.close(w)
    # ended: Python's join returns once the thread let go of its state, a moment before the
    # OS thread has exited (glibc still frees its stack, and /proc shows that system call)
    assert helpers.wait_until(lambda: not os.path.exists(f"/proc/self/task/{tids['read']}"), 10)
    assert not in_io(tids["read"])


def _syscall(tid: int) -> bytes:
    with open(f"/proc/self/task/{tid}/syscall", "rb") as f:
        return f.read()


# ==========================================================================================
# Concurrency: FORGETs interleaved with lookups on several workers
# ==========================================================================================
def test_forgets_interleaved_with_lookups_on_workers(kernel):
    ops = MemoryOps()
    fk = kernel(ops, workers=4)
    assert len(fk.kernel_socks) == 4
    names = [f"n{i}".encode() for i in range(8)]
    ids = {n: ops.add(1, n, stat.S_IFREG) for n in names}
    held = [dict.fromkeys(ids.values(), 0) for _ in range(4)]
    errors = []

    def run(via: int) -> None:
        try:
            for i in range(300):
                name = names[(i * 7 + via) % len(names)]
                nodeid = entry_of(fk.ok(p.LOOKUP, 1, name + b"\0", via=via))[0]
                held[via][nodeid] += 1
                if i % 3 == 2:   # give some back, singly or batched, on this worker's fd
                    back = [(n, c) for n, c in held[via].items() if c]
                    if i % 2:
                        fk.batch_forget(back, via=via)
                    else:
                        for n, c in back:
                            fk.forget(n, c, via=via)
                    for n, _ in back:
                        held[via][n] = 0
        except BaseException as e:  # reported below
            errors.append(e)

    helpers.run_threads(run, 4, 60)
    assert not errors, errors
    # a last round trip on every fd: every FORGET sent before it has been handled
    for via in range(4):
        fk.ok(p.STATFS, 1, via=via)
    expected = {}
    for h in held:
        for n, c in h.items():
            if c:
                expected[n] = expected.get(n, 0) + c
    assert ops.nlookups() == expected
    # replies came back on the fd of their request (``ok`` matched every unique)
    workers = {t.name for t in threading.enumerate() if t.name.startswith("fuse-worker-")}
    assert len(workers) >= 4


# ==========================================================================================
# Errors
# ==========================================================================================
@pytest.mark.filterwarnings("ignore")
def test_non_oserror_is_eio_and_serving_goes_on(kernel, caplog):
    ops = MemoryOps()
    fk = kernel(ops)
    ops.add(1, b"ok", stat.S_IFREG)
    with caplog.at_level(logging.ERROR, logger="overlaypc.engine"):
        r = fk.request(p.LOOKUP, 1, b"boom\0")
    assert r.error == -errno.EIO
    assert "unexpected error in LOOKUP" in caplog.text and ops.errors == 1
    assert entry_of(fk.ok(p.LOOKUP, 1, b"ok\0"))[0] == ops.nodes[1].children[b"ok"]
    # a request whose name lacks its NUL is refused, and the session goes on
    assert fk.request(p.LOOKUP, 1, b"ok").error != 0
    fk.ok(p.STATFS, 1)


def test_oserror_errno_is_answered(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    assert fk.request(p.UNLINK, 1, b"nothing\0").error == -errno.ENOENT
    assert fk.request(p.GETATTR, 12345, p.GETATTR_IN.pack(0, 0, 0)).error == -errno.ESTALE
    # READ and WRITE, answered in dispatch itself, too
    assert fk.request(p.READ, 12345, p.READ_IN.pack(1, 0, 10, 0, 0, 0, 0)).error == -errno.ESTALE
    write = p.WRITE_IN.pack(1, 0, 2, 0, 0, 0, 0) + b"hi"
    assert fk.request(p.WRITE, 12345, write).error == -errno.ESTALE


def test_interrupted_write_reply_goes_nowhere(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    nid = ops.add(1, b"f", stat.S_IFREG)
    fk.request(p.WRITE, nid, p.WRITE_IN.pack(1, 0, 3, 0, 0, 0, 0) + b"abc", fail=True)
    r = fk.ok(p.WRITE, nid, p.WRITE_IN.pack(1, 3, 2, 0, 0, 0, 0) + b"de")
    assert p.WRITE_OUT.unpack(r) == (2, 0)
    assert ops.nodes[nid].data == b"abcde"


def test_xattr_size_probe_and_erange(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    f = ops.add(1, b"f", stat.S_IFREG)
    fk.ok(p.SETXATTR, f, p.SETXATTR_IN.pack(5, 0) + b"user.a\0hello")
    fk.ok(p.SETXATTR, f, p.SETXATTR_IN.pack(0, 0) + b"user.empty\0")
    assert ops.called("setxattr") == [(f, "user.a", b"hello", 0), (f, "user.empty", b"", 0)]

    def get(name: bytes, size: int):
        return fk.request(p.GETXATTR, f, p.GETXATTR_IN.pack(size, 0) + name + b"\0")

    r = get(b"user.a", 0)
    assert r.error == 0 and p.GETXATTR_OUT.unpack(r.body) == (5, 0)
    assert get(b"user.a", 5).body == b"hello"
    assert get(b"user.a", 64).body == b"hello"
    assert get(b"user.a", 4).error == -errno.ERANGE
    assert get(b"user.nope", 0).error == -errno.ENODATA
    r = get(b"user.empty", 0)
    assert p.GETXATTR_OUT.unpack(r.body) == (0, 0)
    names = b"user.a\0user.empty\0"
    r = fk.request(p.LISTXATTR, f, p.GETXATTR_IN.pack(0, 0))
    assert p.GETXATTR_OUT.unpack(r.body) == (len(names), 0)
    assert fk.ok(p.LISTXATTR, f, p.GETXATTR_IN.pack(len(names), 0)) == names
    assert fk.request(p.LISTXATTR, f, p.GETXATTR_IN.pack(len(names) - 1, 0)).error == -errno.ERANGE
    fk.ok(p.REMOVEXATTR, f, b"user.a\0")
    assert fk.request(p.REMOVEXATTR, f, b"user.a\0").error == -errno.ENODATA


def test_setxattr_ext_layout(kernel):
    ops = MemoryOps(p.SETXATTR_EXT)
    fk = kernel(ops)
    f = ops.add(1, b"f", stat.S_IFREG)
    fk.ok(p.SETXATTR, f, p.SETXATTR_IN_EXT.pack(3, 1, 0, 0) + b"user.x\0abc")
    fk.ok(p.SETXATTR, f, p.SETXATTR_IN_EXT.pack(2, 0, p.SETXATTR_ACL_KILL_SGID, 0)
          + b"system.posix_acl_access\0de")
    # setxattr_flags reach the filesystem only with the extended layout
    assert ops.called("setxattr") == [(f, "user.x", b"abc", 1, 0),
                                      (f, "system.posix_acl_access", b"de", 0, 1)]


@pytest.mark.parametrize("opcode", [p.GETLK, p.IOCTL, p.POLL, p.BMAP, p.COPY_FILE_RANGE, p.SYNCFS,
                                    p.STATX, 99, 4096])
def test_unknown_opcodes_are_enosys(kernel, opcode):
    fk = kernel()
    assert fk.request(opcode, 1, bytes(64)).error == -errno.ENOSYS
    fk.ok(p.STATFS, 1)


def test_ioctl_reply_is_padded_to_its_size(kernel):
    """FUSE_IOCTL (restricted: the kernel's FS_IOC_GETFLAGS/SETFLAGS): the input after
    ``fuse_ioctl_in`` reaches the filesystem; the reply is ``fuse_ioctl_out`` and exactly
    ``out_size`` bytes (the kernel refuses another size), longer answers are EIO."""
    class Ops(MemoryOps):
        def ioctl(self, req, nodeid, fh, flags, cmd, arg, data, out_size):
            self._rec("ioctl", nodeid, fh, flags, cmd, arg, data, out_size)
            return {1: b"\x10", 2: b"", 3: b"toolong"}[cmd]
    ops = Ops()
    fk = kernel(ops)
    body = fk.ok(p.IOCTL, 1, p.IOCTL_IN.pack(7, p.IOCTL_DIR, 1, 0, 0, 4))
    assert body == p.IOCTL_OUT.pack(0, 0, 0, 0) + b"\x10\0\0\0"
    assert fk.ok(p.IOCTL, 1, p.IOCTL_IN.pack(7, 0, 2, 9, 4, 0) + b"abcd") == p.IOCTL_OUT.pack(0, 0, 0, 0)
    assert ops.called("ioctl") == [(1, 7, p.IOCTL_DIR, 1, 0, b"", 4), (1, 7, 0, 2, 9, b"abcd", 0)]
    assert fk.request(p.IOCTL, 1, p.IOCTL_IN.pack(7, 0, 3, 0, 0, 4)).error == -errno.EIO
    assert fk.request(p.IOCTL, 1, p.IOCTL_IN.pack(7, 0, 2, 0, 8, 0) + b"ab").error == -errno.EINVAL
    fk.ok(p.STATFS, 1)


def test_unimplemented_operation_is_enosys(kernel):
    fk = kernel()   # MemoryOps has no fallocate, lseek or access
    assert fk.request(p.FALLOCATE, 1, p.FALLOCATE_IN.pack(0, 0, 10, 0, 0)).error == -errno.ENOSYS
    assert fk.request(p.ACCESS, 1, p.ACCESS_IN.pack(4, 0)).error == -errno.ENOSYS


def test_no_reply_requests_get_none(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    f = ops.add(1, b"f", stat.S_IFREG)
    fk.ok(p.LOOKUP, 1, b"f\0")
    fk.send(p.INTERRUPT, 0, p.INTERRUPT_IN.pack(12345))
    fk.send(p.NOTIFY_REPLY, 0, bytes(32))
    fk.forget(f, 1)
    # the next answer is STATFS's: nothing was answered in between
    unique = fk.send(p.STATFS, 1)
    assert fk.receive().unique == unique
    assert ops.nlookups() == {}


def test_deny_others(kernel):
    ops = MemoryOps()
    fk = kernel(ops, session_kw={"deny_others": 1000})
    f = ops.add(1, b"f", stat.S_IFREG)
    assert fk.request(p.LOOKUP, 1, b"f\0", uid=2000).error == -errno.EACCES
    assert fk.request(p.GETATTR, f, p.GETATTR_IN.pack(0, 0, 0), uid=2000).error == -errno.EACCES
    assert ops.called("lookup") == []
    fk.ok(p.LOOKUP, 1, b"f\0", uid=1000)
    fk.ok(p.LOOKUP, 1, b"f\0", uid=0)
    # what libfuse lets through for anyone: I/O on handles the owner opened, releases
    fh = p.OPEN_OUT.unpack(fk.ok(p.OPEN, f, p.OPEN_IN.pack(os.O_RDWR, 0), uid=1000))[0]
    fk.ok(p.WRITE, f, p.WRITE_IN.pack(fh, 0, 2, 0, 0, 0, 0) + b"hi", uid=2000)
    assert fk.ok(p.READ, f, p.READ_IN.pack(fh, 0, 10, 0, 0, 0, 0), uid=2000) == b"hi"
    fk.ok(p.RELEASE, f, p.RELEASE_IN.pack(fh, 0, 0, 0), uid=2000)
    fk.send(p.FORGET, f, p.FORGET_IN.pack(2), uid=2000)
    fk.ok(p.STATFS, 1, uid=1000)
    assert ops.nlookups() == {} and ops.handles == {}


@pytest.mark.parametrize("deny", [None, 1000])
def test_zero_message_opendir_only_where_opendir_checks_nothing(kernel, deny):
    """A kernel that opens directories itself sends their listings with handle 0, exempt
    from ``deny_others`` like every listing: offered to the filesystem only without it."""
    ops = MemoryOps()
    kernel(ops, session_kw={"deny_others": deny}, flags=KERNEL_FLAGS | p.NO_OPENDIR_SUPPORT)
    [(offered,)] = ops.called("init")
    assert bool(offered & p.NO_OPENDIR_SUPPORT) == (deny is None)


def test_notifications_are_queued_to_the_channel_fd(kernel):
    ops = MemoryOps()
    fk = kernel(ops)
    ops.notifier.inval_inode(5, 0, -1)
    ops.notifier.inval_entry(1, b"x")
    ops.notifier.delete(1, 5, b"x")
    fk.send(p.STATFS, 1)
    fk.receive()
    got = list(fk.notifications)
    while len(got) < 3:
        msg = fk.kernel_socks[0].recv(4096)
        got.append(msg)
    assert got == [p.notify_inval_inode(5, 0, -1), p.notify_inval_entry(1, b"x"),
                   p.notify_delete(1, 5, b"x")]


def test_connection_end_ends_the_loop_and_destroys():
    """Before: a worker whose fd reached end of file (a read of 0 bytes) dispatched the
    empty message, failed, and read again forever: ``serve`` never returned."""
    ops = MemoryOps()
    fk = FakeKernel(ops, workers=2)
    fk.start()
    fk.ok(p.STATFS, 1)
    assert fk.close(), "serve() still runs after every fd of the connection closed"
    assert ops.destroyed.is_set()


class _ZeroOpendirOps(MemoryOps):
    """MemoryOps with ``opendir_zero``/``releasedir_zero`` set at INIT (OverlayOps sets
    them at its start, for every mode): the first open of a node may cache, the
    hooks' calls are recorded, node 99 fails."""

    def init(self, conn) -> None:
        super().init(conn)
        self.open_zero: dict[int, int] = {}
        self.opendir_zero = self._opendir_zero
        self.releasedir_zero = self._releasedir_zero

    def _opendir_zero(self, nodeid: int) -> bool:
        self._rec("opendir_zero", nodeid)
        if nodeid == 99:
            raise OSError(errno.ESTALE, "no such node")
        n = self.open_zero.get(nodeid, 0)
        self.open_zero[nodeid] = n + 1
        return n == 0

    def _releasedir_zero(self, nodeid: int) -> None:
        self._rec("releasedir_zero", nodeid)
        n = self.open_zero.pop(nodeid) - 1
        if n:
            self.open_zero[nodeid] = n


def test_opendir_zero_answers_handle_zero_without_opendir(kernel):
    """OPENDIR through ``opendir_zero``: handle 0, KEEP_CACHE, CACHE_DIR as the hook says;
    RELEASEDIR of handle 0 through ``releasedir_zero``, of another handle through
    ``releasedir``; a hook's OSError is its errno; an undelivered OPENDIR reply is released."""
    ops = _ZeroOpendirOps()
    fk = kernel(ops)
    d = ops.add(1, b"d", stat.S_IFDIR | 0o755)
    first = fk.ok(p.OPENDIR, d, p.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0))
    second = fk.ok(p.OPENDIR, d, p.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0))
    assert p.OPEN_OUT.unpack(first) == (0, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR, 0)
    assert p.OPEN_OUT.unpack(second) == (0, p.FOPEN_KEEP_CACHE, 0)
    assert ops.called("opendir") == [] and ops.open_zero == {d: 2}
    assert fk.ok(p.RELEASEDIR, d, p.RELEASE_IN.pack(0, 0, 0, 0)) == b""
    assert fk.ok(p.RELEASEDIR, d, p.RELEASE_IN.pack(0, 0, 0, 0)) == b""
    assert ops.open_zero == {} and ops.called("releasedir") == []
    assert ops.called("releasedir_zero") == [(d,), (d,)]
    # a handle the filesystem made (not 0) is still released through ``releasedir``
    fh = p.OPEN_OUT.unpack(fk.ok(p.OPEN, d, p.OPEN_IN.pack(os.O_RDONLY, 0)))[0]
    fk.ok(p.RELEASEDIR, d, p.RELEASE_IN.pack(fh, 0, 0, 0))
    assert ops.called("releasedir") == [(d, fh)] and len(ops.called("releasedir_zero")) == 2
    assert fk.request(p.OPENDIR, 99, p.OPEN_IN.pack(os.O_RDONLY, 0)).error == -errno.ESTALE
    # an OPENDIR reply the kernel never took: its handle is released (no RELEASEDIR comes)
    fk.request(p.OPENDIR, d, p.OPEN_IN.pack(os.O_RDONLY, 0), fail=True)
    assert ops.open_zero == {} and ops.called("releasedir_zero")[-1] == (d,)
    assert ops.handles == {}


def test_opendir_zero_not_used_with_deny_others(kernel):
    """``deny_others`` must see OPENDIR's caller: the hooks are not used with it."""
    ops = _ZeroOpendirOps()
    fk = kernel(ops, session_kw={"deny_others": 1000})
    d = ops.add(1, b"d", stat.S_IFDIR | 0o755)
    assert fk.request(p.OPENDIR, d, p.OPEN_IN.pack(os.O_RDONLY, 0), uid=2000).error == -errno.EACCES
    fh = p.OPEN_OUT.unpack(fk.ok(p.OPENDIR, d, p.OPEN_IN.pack(os.O_RDONLY, 0), uid=1000))[0]
    assert fh and ops.called("opendir") == [(d, os.O_RDONLY)]
    fk.ok(p.RELEASEDIR, d, p.RELEASE_IN.pack(fh, 0, 0, 0), uid=2000)
    assert ops.called("opendir_zero") == [] and ops.called("releasedir_zero") == []
    assert ops.handles == {}


def test_getattr_short_path_answers_as_the_generic_one(kernel):
    """GETATTR is answered in ``dispatch`` without the handler table (rm24: one per file of
    an rm -rf) where it carries no extensions and ``deny_others`` is off: the same reply
    bytes as the generic path (which a request with extensions still takes), the handle
    only with GETATTR_FH, an error answered with its errno, and a truncated body answered
    EIO with the session going on."""
    ops = MemoryOps()
    fk = kernel(ops)
    f = ops.add(1, b"f", stat.S_IFREG)
    short = fk.ok(p.GETATTR, f, p.GETATTR_IN.pack(0, 0, 77))
    assert ops.called("getattr")[-1] == (f, None)
    assert len(short) == p.ATTR_OUT.size and p.unpack_attr(short, 16) == ops.attr(f)
    # the generic path: a request with extensions (total_extlen 1: 8 bytes after the body)
    unique = fk.next_unique()
    body = p.GETATTR_IN.pack(p.GETATTR_FH, 0, 55)
    msg = p.IN_HEADER.pack(p.IN_HEADER.size + len(body) + 8, p.GETATTR, unique, f, 0, 0, 1, 1, 0)
    fk.kernel_socks[0].send(msg + body + bytes(8))
    r = fk.receive()
    assert (r.unique, r.error, r.body) == (unique, 0, short)
    assert ops.called("getattr")[-1] == (f, 55)
    assert fk.request(p.GETATTR, 12345, p.GETATTR_IN.pack(0, 0, 0)).error == -errno.ESTALE
    assert fk.request(p.GETATTR, f, b"\0\0\0").error == -errno.EIO
    assert fk.ok(p.GETATTR, f, p.GETATTR_IN.pack(0, 0, 0)) == short


class _NamedShortOps(MemoryOps):
    """``lookup_name`` and ``unlink_name`` set: a name starting ``gen`` is left to the
    generic handlers (None, False), ``bad`` raises OSError, ``bug`` RuntimeError, one
    starting ``pos`` is looked up as ``lookup`` does (an ``Entry``); any other name is
    answered short (a negative entry; removed)."""

    NEGATIVE = p.pack_entry(0, 0, None, 1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.lookup_name = self._named
        self.unlink_name = self._unlink_name

    def _named(self, parent: int, name: bytes):
        self._rec("lookup_name", parent, name)
        self._raise_for(name)
        if name.startswith(b"pos"):
            return super().lookup(None, parent, name)
        return None if name.startswith(b"gen") else self.NEGATIVE

    def _unlink_name(self, parent: int, name: bytes) -> bool:
        self._rec("unlink_name", parent, name)
        self._raise_for(name)
        if name.startswith(b"gen"):
            return False
        with self.lock:
            self._node(parent).children.pop(name)
        return True

    @staticmethod
    def _raise_for(name: bytes) -> None:
        if name == b"bad":
            raise OSError(errno.EACCES, "refused")
        if name == b"bug":
            raise RuntimeError("a bug in the short path")


def test_named_short_paths_answer_or_leave_the_request_to_the_handlers(kernel):
    """LOOKUP and UNLINK ask ``lookup_name`` / ``unlink_name`` first (speed47b: one per
    file of an untar, an rm -rf): their answer is the reply (the negative entry's bytes,
    an empty reply), None/False leaves the request to ``lookup``/``unlink`` with nothing
    sent, an OSError is answered with its errno, anything else EIO (counted); never with
    ``deny_others`` (the caller is checked) nor for a request with extensions."""
    ops = _NamedShortOps()
    fk = kernel(ops)
    d = ops.add(1, b"d", stat.S_IFDIR | 0o755)
    assert fk.ok(p.LOOKUP, d, b"x\0") == _NamedShortOps.NEGATIVE
    assert ops.called("lookup_name") == [(d, b"x")] and ops.called("lookup") == []
    f = ops.add(d, b"gen-f", stat.S_IFREG)
    entry = fk.ok(p.LOOKUP, d, b"gen-f\0")
    assert p.ENTRY_OUT.unpack_from(entry)[0] == f and ops.called("lookup") == [(d, b"gen-f")]
    assert fk.request(p.LOOKUP, d, b"bad\0").error == -errno.EACCES
    assert fk.request(p.LOOKUP, d, b"bug\0").error == -errno.EIO and ops.errors == 1
    assert ops.called("lookup") == [(d, b"gen-f")]
    # an entry answered short: its reference taken once, forgotten if never delivered
    g = ops.add(d, b"pos-g", stat.S_IFREG)
    assert p.ENTRY_OUT.unpack_from(fk.ok(p.LOOKUP, d, b"pos-g\0"))[0] == g
    assert ops.nodes[g].nlookup == 1
    fk.request(p.LOOKUP, d, b"pos-g\0", fail=True)
    assert ops.nodes[g].nlookup == 1
    ops.add(d, b"s", stat.S_IFREG)
    assert fk.ok(p.UNLINK, d, b"s\0") == b""
    assert ops.called("unlink_name")[-1] == (d, b"s") and ops.called("unlink") == []
    assert b"s" not in ops.nodes[d].children
    assert fk.ok(p.UNLINK, d, b"gen-f\0") == b"" and ops.called("unlink") == [(d, b"gen-f")]
    assert fk.request(p.UNLINK, d, b"bad\0").error == -errno.EACCES
    assert fk.request(p.UNLINK, d, b"gen-none\0").error == -errno.ENOENT  # (the handler's)
    # a request with extensions (total_extlen 1: 8 bytes after the body): the handlers
    before = len(ops.called("lookup_name"))
    unique = fk.next_unique()
    msg = p.IN_HEADER.pack(p.IN_HEADER.size + 2 + 8, p.LOOKUP, unique, d, 0, 0, 1, 1, 0)
    fk.kernel_socks[0].send(msg + b"y\0" + bytes(8))
    r = fk.receive()
    assert r.unique == unique and ops.called("lookup")[-1] == (d, b"y")
    assert len(ops.called("lookup_name")) == before


def test_named_short_paths_not_used_with_deny_others(kernel):
    ops = _NamedShortOps()
    fk = kernel(ops, session_kw={"deny_others": 1000})
    d = ops.add(1, b"d", stat.S_IFDIR | 0o755)
    ops.add(d, b"s", stat.S_IFREG)
    assert fk.request(p.LOOKUP, d, b"x\0", uid=2000).error == -errno.EACCES
    assert fk.request(p.UNLINK, d, b"s\0", uid=2000).error == -errno.EACCES
    fk.request(p.LOOKUP, d, b"x\0", uid=1000)
    assert fk.ok(p.UNLINK, d, b"s\0", uid=1000) == b""
    assert ops.called("lookup_name") == [] and ops.called("unlink_name") == []
    assert ops.called("lookup") == [(d, b"x")] and ops.called("unlink") == [(d, b"s")]
