"""The short READDIRPLUS (``OverlayOps._readdirplus_short``, the session's
``_readdirplus_short``) answers as the generic path (``readdir`` items, ``take_entries``,
``Session._listing``) and leaves the same node table: two cores over trees built alike,
one session asking the short path, the other with the hook unset, the same requests
(chunk sizes from one entry to all, a change between chunks, a reply that never reaches
the kernel); the replies compared entry by entry (all but inode numbers and times, which
differ between the trees: checked equal between an entry's attribute and its dirent),
and the kernel references each node holds. The packing itself is compared exactly
(``pack_direntplus_stat`` against ``pack_direntplus_entry`` of ``file_attr``). Driven
through the fake kernel, without FUSE.
"""
from __future__ import annotations

import os
import stat

import pytest

from engine_support import FakeKernel
from overlaypc.attrs import Attr
from overlaypc.engine import protocol as p
from overlaypc.listings import KEY_BITS
from overlaypc.overlay_ops import file_attr
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import REQ, make_ops

_KEY_MASK = (1 << KEY_BITS) - 1


def _tree(base) -> None:
    for d in ("lower/d/sub", "lower/solo", "upper/d", "work", "mnt"):
        (base / d).mkdir(parents=True)
    low = base / "lower" / "d"
    for i in range(40):
        (low / ("f%d" % i + "x" * (i % 9))).write_bytes(b"y" * i)
    (low / "hard1").write_text("h")
    os.link(low / "hard1", low / "hard2")  # (hard links: listed without attributes)
    os.symlink("f1", low / "link")
    os.mkfifo(low / "fifo")
    (low / "gone").write_text("whited out")
    os.mknod(base / "upper" / "d" / "gone", stat.S_IFCHR | 0o600, 0)  # a whiteout
    (base / "upper" / "d" / "up").write_text("upper")
    (base / "lower" / "solo" / "only").write_text("o")


class Side:
    def __init__(self, base, short: bool) -> None:
        self.ops, self._close = make_ops(base)
        if not short:
            self.ops.readdirplus_node = None  # (before the session binds its hooks)
        self.fk = FakeKernel(self.ops)
        self.fk.start()
        assert (p.READDIRPLUS in self.fk.session._shorts) is short

    def close(self) -> None:
        self.fk.close()
        self._close()

    def lookup(self, parent: int, name: bytes) -> int:
        return p.ENTRY_HEAD.unpack_from(self.fk.ok(p.LOOKUP, parent, name + b"\0"))[0]

    def readdirplus(self, nodeid: int, offset: int, size: int, fail: bool = False):
        r = self.fk.request(p.READDIRPLUS, nodeid, p.READ_IN.pack(0, offset, size, 0, 0, 0, 0),
                            fail=fail)
        if fail:
            return None
        assert r.error == 0, r.error
        return r.body

    def references(self) -> dict:
        nodes = self.ops.nodes
        with nodes._lock:
            return {n.nodeid: (n.nlookup, sorted(n.names), nodes._by_key.get(n.key) == n.nodeid)
                    for n in nodes._nodes.values()}


def _entries(body: bytes) -> list[tuple]:
    """Each entry of a READDIRPLUS reply without what differs between the two trees:
    inode numbers (checked equal between attribute and dirent), times; the cookie's key."""
    out, pos = [], 0
    while pos < len(body):
        head = p.ENTRY_HEAD.unpack_from(body, pos)
        attr = p.unpack_attr(body, pos + p.ENTRY_HEAD.size)
        ino, off, namelen, typ = p.DIRENT.unpack_from(body, pos + p.ENTRY_OUT_SIZE)
        start = pos + p.ENTRY_OUT_SIZE + p.DIRENT.size
        name = body[start:start + namelen]
        if head[0]:
            assert attr.ino == ino, name
        else:
            assert head == (0,) * len(head) and attr == p.FileAttr(*[0] * 12), name
        out.append((name, head, attr._replace(ino=0, atime_ns=0, mtime_ns=0, ctime_ns=0),
                    off & _KEY_MASK, typ, ino != 0))
        pos = start + ((namelen + 7) & ~7)
    assert pos == len(body)
    return out


@pytest.fixture
def sides(tmp_path):
    made = []

    def make():
        _tree(tmp_path / "short")  # (both before ``make_ops`` sets the umask 0)
        _tree(tmp_path / "generic")
        short = Side(tmp_path / "short", True)
        made.append(short)
        generic = Side(tmp_path / "generic", False)
        made.append(generic)
        return short, generic
    yield make
    for side in reversed(made):  # (the last made first: each puts back the umask it found)
        side.close()


def _offsets(body: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(body):
        _, off, namelen, _ = p.DIRENT.unpack_from(body, pos + p.ENTRY_OUT_SIZE)
        out.append(off)
        pos += (p.ENTRY_OUT_SIZE + p.DIRENT.size + namelen + 7) & ~7
    return out


def _whole(side: Side, nodeid: int, size: int, between=None) -> list:
    got, offset, first = [], 0, True
    for _ in range(200):
        body = side.readdirplus(nodeid, offset, size)
        if not body:
            return got
        got.append(_entries(body))
        offset = _offsets(body)[-1]
        if between is not None and first:
            between(side)
        first = False
    raise AssertionError("the listing never ended")


@pytest.mark.parametrize("size", [4096, 32768, 400, 160, 100])
def test_the_short_listing_answers_as_the_generic_one(sides, size):
    """Every chunk size: a merged directory (a whiteout, an upper file, hard links without
    attributes, a symlink, a fifo, a subdirectory), then the same listing again (names the
    kernel holds), then a lower-only one; references as the generic path takes them."""
    short, generic = sides()
    answers = []
    for side in (short, generic):
        d = side.lookup(ROOT_ID, b"d")
        solo = side.lookup(ROOT_ID, b"solo")
        first = _whole(side, d, size) if size >= 160 else [_entries(side.readdirplus(d, 0, size))]
        again = _whole(side, d, size) if size >= 160 else []
        answers.append((first, again, _whole(side, solo, max(size, 160)), side.references()))
    assert answers[0] == answers[1]
    names = {e[0] for chunk in answers[0][0] for e in chunk}
    if size >= 400:  # (160: a chunk of one short name; a longer one ends the listing)
        assert {b".", b"..", b"up", b"hard1", b"link", b"fifo", b"sub"} <= names
        assert b"gone" not in names


def test_a_change_between_chunks_is_answered_as_the_generic_path(sides):
    """A later chunk after a chmod (the listing's stats void: looked up afresh) and after a
    name made meanwhile, and one whose names the kernel took meanwhile (no attributes)."""
    short, generic = sides()

    def chmod(side):
        f = side.lookup(side.lookup(ROOT_ID, b"d"), b"f39xxx")
        side.ops.setattr(REQ, f, p.SetAttr(p.FATTR_MODE, None, 0, 0, 0, 0o600, 0, 0))

    def make(side):
        d = side.lookup(ROOT_ID, b"d")
        side.ops.mkdir(REQ, d, b"newdir", 0o755)
        side.lookup(d, b"f20xx")

    answers = []
    for side in (short, generic):
        d = side.lookup(ROOT_ID, b"d")
        answers.append((_whole(side, d, 1024, chmod), _whole(side, d, 1024, make),
                        side.references()))
    assert answers[0] == answers[1]


def test_an_undelivered_reply_takes_no_reference(sides):
    short, generic = sides()
    states = []
    for side in (short, generic):
        d = side.lookup(ROOT_ID, b"d")
        before = side.references()
        side.readdirplus(d, 0, 32768, fail=True)
        assert side.references() == before
        side.readdirplus(d, 0, 8192)
        states.append(side.references())
    assert states[0] == states[1]


@pytest.mark.parametrize("ns", [0, 1_700_000_000_123_456_789, -1_500_000_001, -1])
@pytest.mark.parametrize("nlink", [None, 1, 7])
@pytest.mark.parametrize("owner", [0, 4294967294])  # (the highest valid uid_t/gid_t: no mask)
def test_the_stat_packing_is_the_generic_packing(tmp_path, ns, nlink, owner):
    f = tmp_path / "f"
    f.write_bytes(b"z" * 5000)
    os.chown(f, owner, owner)
    os.utime(f, ns=(ns, ns + 7))
    st = os.lstat(f)
    attr = Attr(st, 99, nlink, None, None, None, None)
    timeouts = p.split_timeout(1.5)
    for name in (b"n", b"name", b"x" * 8, b"y" * 9, b"z" * 255):
        layout = p.direntplus_layout(len(name))
        packed = p.pack_direntplus_stat(layout, 12,
                                        (timeouts[0], timeouts[0], timeouts[1], timeouts[1]), st,
                                        99, nlink, name, 98, 1 << 50, stat.S_IFREG)
        assert len(packed) == layout.size == p.dirent_size(name, True)
        assert packed == p.pack_direntplus_entry(12, 0, file_attr(attr), 1.5, 1.5, name, 98,
                                                 1 << 50, stat.S_IFREG)
