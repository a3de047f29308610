"""The short OPEN (``OverlayOps._open_short``, the session's ``_open_short``) answers a
read-only open as the generic path (``Session._open``, ``OverlayOps.open``) and leaves the
same state; every case its guard tells apart: an open for writing, with O_TRUNC or with the
kill flag, a fault armed, a node with no name left (generic); a lower file copied up between
the OPEN and a READ through another handle, an immutable lower file, the open-file budget
full (ENFILE), the process's fd limit (EMFILE), an undelivered reply (its handle released),
an unknown node (ESTALE). Two cores over trees built alike, one session asking the short
path, the other with the hook unset; each ``OverlayOps.open`` call counted. Driven through
the fake kernel, without FUSE.
"""
from __future__ import annotations

import errno
import gc
import os
import subprocess

import pytest

from engine_support import FakeKernel
from overlaypc import faults, fdbudget
from overlaypc.engine import protocol as p
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import make_ops


def _tree(base) -> None:
    for d in ("lower/d", "upper/d", "work", "mnt"):
        (base / d).mkdir(parents=True)
    for name in ("a", "b", "c", "frozen"):
        (base / "lower" / "d" / name).write_bytes(b"lower " + name.encode())
    (base / "upper" / "d" / "up").write_bytes(b"upper file")


class Side:
    def __init__(self, base, short: bool, **options) -> None:
        self.base = base
        self.ops, self._close = make_ops(base, **options)
        if not short:
            self.ops.open_node = None  # (before the session binds its hooks)
        self.generic_opens = 0
        generic = self.ops.open

        def counted(*args):
            self.generic_opens += 1
            return generic(*args)
        self.ops.open = counted
        self.fk = FakeKernel(self.ops)
        self.fk.start()
        assert (p.OPEN in self.fk.session._shorts) is short

    def close(self) -> None:
        self.fk.close()
        self._close()

    def lookup(self, parent: int, name: bytes) -> int:
        return p.ENTRY_HEAD.unpack_from(self.fk.ok(p.LOOKUP, parent, name + b"\0"))[0]

    def open(self, nodeid: int, flags: int, fail: bool = False, open_flags: int = 0) -> tuple:
        """(errno, fh, open flags, passed through)."""
        r = self.fk.request(p.OPEN, nodeid, p.OPEN_IN.pack(flags, open_flags), fail=fail)
        if r.error or fail:
            return (r.error, None, None, None)
        fh, oflags, backing = p.OPEN_OUT.unpack(r.body)
        return (0, fh, oflags, backing != 0)

    def read(self, nodeid: int, fh: int, size: int = 4096) -> tuple:
        r = self.fk.request(p.READ, nodeid, p.READ_IN.pack(fh, 0, size, 0, 0, 0, 0))
        return r.error, r.body

    def write(self, nodeid: int, fh: int, data: bytes) -> int:
        r = self.fk.request(p.WRITE, nodeid, p.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0) + data)
        return r.error

    def release(self, nodeid: int, fh: int, flags: int) -> int:
        return self.fk.request(p.RELEASE, nodeid, p.RELEASE_IN.pack(fh, flags, 0, 0)).error

    def state(self) -> dict:
        nodes = self.ops.nodes
        with nodes._lock:
            table = {n.nodeid: (n.nlookup, sorted(n.names), len(n.fhs or ())) for n in nodes._nodes.values()}
        return {"nodes": table, "handles": len(self.ops.fs.handles), "fds": self.ops.fs.open_fds(),
                "upper": sorted(os.listdir(self.base / "upper" / "d"))}


@pytest.fixture
def sides(tmp_path):
    made = []

    def make(**options):
        for name in ("short", "generic"):
            _tree(tmp_path / name)  # (both before ``make_ops`` sets the umask 0)
        for name in ("short", "generic"):
            made.append(Side(tmp_path / name, name == "short", **options))
        return made[-2], made[-1]
    yield make
    for side in reversed(made):  # (the last made first: each puts back the umask it found)
        side.close()


def _both(sides_made, run) -> list:
    short, generic = sides_made
    got = [run(short), run(generic)]
    assert got[0] == got[1]
    return got


@pytest.mark.parametrize("options", [{}, {"passthrough": False}, {"cache": "shared"}])
def test_read_only_opens_answer_as_open(sides, options):
    """A lower file after a LOOKUP and after a listing, an upper file, O_DIRECT, O_APPEND
    without write access, a directory; the writing ones go the generic way."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_LARGEFILE

    def run(side):
        d = side.lookup(ROOT_ID, b"d")
        side.fk.ok(p.READDIRPLUS, d, p.READ_IN.pack(0, 0, 32768, 0, 0, 0, 0))
        out = []
        for name, fl in ((b"a", flags), (b"b", flags | os.O_DIRECT), (b"up", flags),
                         (b"c", flags | os.O_APPEND)):
            node = side.lookup(d, name)
            got = side.open(node, fl)
            out.append((name, got[0], got[2:], side.read(node, got[1])))
            assert side.release(node, got[1], fl) == 0
        out.append(("dir", side.open(d, flags)[0]))
        reads = side.generic_opens
        node = side.lookup(d, b"a")
        for fl in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            got = side.open(node, fl)
            out.append((fl, got[0], got[2:]))
            side.release(node, got[1], fl)
        return out, reads, side.generic_opens - reads, side.state()

    short, generic = sides(**options)
    got = [run(short), run(generic)]
    assert (got[0][0], got[0][3]) == (got[1][0], got[1][3])  # (the answers, the state)
    assert (got[0][1], got[0][2]) == (0, 3)  # (the short path answered every read-only open)
    assert (got[1][1], got[1][2]) == (5, 3)
    assert got[0][0][0][1] == 0 and got[0][0][0][3] == (0, b"lower a")


def test_the_short_path_answers_reads_and_leaves_writes(sides):
    short, generic = sides()
    for side, reads in ((short, 0), (generic, 2)):
        d = side.lookup(ROOT_ID, b"d")
        node = side.lookup(d, b"a")
        for fl in (os.O_RDONLY, os.O_RDONLY | os.O_NONBLOCK):
            _, fh, _, _ = side.open(node, fl)
            side.release(node, fh, fl)
        assert side.generic_opens == reads
        _, fh, _, _ = side.open(node, os.O_WRONLY)
        side.release(node, fh, os.O_WRONLY)
        assert side.generic_opens == reads + 1
        # (a kill flag comes with O_TRUNC alone; one without is the generic path's too)
        _, fh, _, _ = side.open(node, os.O_RDONLY, open_flags=p.OPEN_KILL_SUIDGID)
        side.release(node, fh, os.O_RDONLY)
        assert side.generic_opens == reads + 2


@pytest.mark.parametrize("handles", ["reopen", "bind-at-open"])
def test_a_lower_file_copied_up_between_open_and_read(sides, handles):
    """Open read-only (on the lower file), then another handle opens it for writing
    (its copy-up) and writes: the first handle's READ as the generic path answers it."""
    def run(side):
        d = side.lookup(ROOT_ID, b"d")
        node = side.lookup(d, b"a")
        _, ro, _, _ = side.open(node, os.O_RDONLY)
        _, rw, _, _ = side.open(node, os.O_RDWR)
        assert side.write(node, rw, b"UPPER") == 0
        got = side.read(node, ro), side.read(node, rw)
        side.release(node, rw, os.O_RDWR)
        got += (side.read(node, ro),)
        side.release(node, ro, os.O_RDONLY)
        return got, side.state()
    short, generic = sides(handles=handles)
    got = _both((short, generic), run)
    assert short.generic_opens == 1  # (the O_RDWR one)
    assert "a" in got[0][1]["upper"]


def test_an_immutable_lower_file_opens_for_reading_only(sides, tmp_path):
    short, generic = sides()
    frozen = [tmp_path / n / "lower" / "d" / "frozen" for n in ("short", "generic")]
    try:
        for f in frozen:
            subprocess.run(["chattr", "+i", str(f)], check=True, capture_output=True)

        def run(side):
            d = side.lookup(ROOT_ID, b"d")
            node = side.lookup(d, b"frozen")
            got = side.open(node, os.O_RDONLY)
            data = side.read(node, got[1])
            side.release(node, got[1], os.O_RDONLY)
            return got[0], data, side.open(node, os.O_WRONLY)[0], side.state()
        got = _both((short, generic), run)
        assert got[0][0] == 0 and got[0][2] == -errno.EPERM
    finally:
        for f in frozen:
            subprocess.run(["chattr", "-i", str(f)], capture_output=True)


def test_at_the_open_file_budget_the_open_fails_enfile_with_nothing_open(sides):
    def run(side):
        d = side.lookup(ROOT_ID, b"d")
        node = side.lookup(d, b"a")
        _, held, _, _ = side.open(node, os.O_RDONLY)
        fs = side.ops.fs
        budget = fs.open_file_fds
        fs.open_file_fds = fs.open_fds()
        try:
            before = side.state()
            refused = side.open(node, os.O_RDONLY)[0]
            assert side.state() == before
        finally:
            fs.open_file_fds = budget
        side.release(node, held, os.O_RDONLY)
        return refused, side.state()
    got = _both(sides(), run)
    assert got[0][0] == -errno.ENFILE


def test_an_undelivered_reply_releases_its_handle(sides):
    def run(side):
        d = side.lookup(ROOT_ID, b"d")
        node = side.lookup(d, b"a")
        before = side.state()
        side.open(node, os.O_RDONLY, fail=True)
        assert side.state() == before
        return side.open(99999, os.O_RDONLY)[0], side.state()  # (an unknown node: ESTALE)
    got = _both(sides(), run)
    assert got[0][0] == -errno.ESTALE


def test_a_fault_armed_or_no_name_left_goes_the_generic_way(sides):
    short, generic = sides()

    def run(side):
        d = side.lookup(ROOT_ID, b"d")
        node = side.lookup(d, b"b")
        seen = []
        faults.install("ops.path", lambda point, rel: seen.append(rel))
        try:
            _, fh, _, _ = side.open(node, os.O_RDONLY)
        finally:
            faults.configure(None)
        armed = side.generic_opens
        assert side.fk.request(p.UNLINK, d, b"b\0").error == 0  # (open: the node stays)
        again = side.open(node, os.O_RDONLY)  # (``open("/proc/self/fd/N")``)
        data = side.read(node, again[1])
        side.release(node, again[1], os.O_RDONLY)
        side.release(node, fh, os.O_RDONLY)
        return seen, armed, side.generic_opens - armed, again[0], data, side.state()
    got = _both((short, generic), run)
    assert got[0][:3] == (["d/b"], 1, 1) and got[0][4] == (0, b"lower b")


def test_at_the_process_fd_limit_the_open_answers_as_open(sides):
    """EMFILE from the system (the soft fd limit at the lowest free fd number: no new fd):
    the core's open sheds its cached fds and tries once more (``fdbudget.retrying``), in
    the short path as in the generic one; the same answers, nothing left open by a failed
    one (the node table, handles and fds compared)."""
    import resource

    def run(side):
        # every cache in the process shed first (the other side's, and earlier tests' not
        # yet collected: the retry's ``fdbudget.shed`` frees theirs too, which made the
        # first open's answer depend on what ran before), then this side's lookups; and
        # before that earlier tests' garbage collected: an fd object in a reference cycle
        # closes only when a collection runs, which could happen inside the open's retry
        # and free the fd it was short of (a short-side 0 in one full run, 2026-12-02)
        gc.collect()
        fdbudget.shed()
        d = side.lookup(ROOT_ID, b"d")
        nodes = [side.lookup(d, name) for name in (b"a", b"b", b"c")]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        got = []
        try:
            for node in nodes:
                free = os.open(os.devnull, os.O_RDONLY)  # (the lowest free fd number)
                os.close(free)
                resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))  # (no new fd)
                try:
                    answer = side.open(node, os.O_RDONLY)
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                got.append(answer[0])
                if answer[0] == 0:
                    assert side.read(node, answer[1]) == (0, b"lower " + b"abc"[len(got) - 1:len(got)])
                    side.release(node, answer[1], os.O_RDONLY)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        return got, side.state()
    short, generic = sides()
    got = _both((short, generic), run)
    assert -errno.EMFILE in got[0][0]  # (here: the first opens once the caches are shed)
    assert short.generic_opens == 0


def _listed(side, d: int) -> dict[bytes, int]:
    """The nodeid of each entry READDIRPLUS of directory ``d`` gave (a reference each)."""
    r = side.fk.ok(p.READDIRPLUS, d, p.READ_IN.pack(0, 0, 32768, 0, 0, 0, 0))
    listed, pos = {}, 0
    while pos < len(r):
        nodeid = p.ENTRY_OUT.unpack_from(r, pos)[0]
        _ino, _off, namelen, _type = p.DIRENT.unpack_from(r, pos + p.ENTRY_OUT.size)
        start = pos + p.ENTRY_OUT.size + p.DIRENT.size
        if nodeid:
            listed[bytes(r[start:start + namelen])] = nodeid
        pos = start + ((namelen + 7) & ~7)
    return listed


@pytest.mark.parametrize("options", [{}, {"passthrough": False}, {"cache": "shared"},
                                     {"handles": "bind-at-open"}])
def test_a_listed_lower_file_opens_as_open(sides, options):
    """grep -r's case: OPEN of a lower file the listing gave (no LOOKUP: its xattrs not read,
    ``Files._open_lower_kept``), also one with a metacopy mark (the kept object is not
    used: generic lookup), one replaced and one removed behind the mount's back after the
    listing (the kept object is stale: looked up afresh), an upper one: the same answers,
    data and state as the generic path, every one answered by the short path."""
    short, generic = sides(**options)
    for side in (short, generic):
        lower = side.base / "lower" / "d"
        os.setxattr(lower / "c", side.ops.fs.prefix + "metacopy", b"")

    def run(side):
        d = side.lookup(ROOT_ID, b"d")
        listed = _listed(side, d)
        lower = side.base / "lower" / "d"
        (lower / "b").unlink()
        (lower / "b").write_bytes(b"new b")  # (another inode: the kept stat is stale)
        (lower / "frozen").unlink()
        out = []
        for name in (b"a", b"b", b"c", b"frozen", b"up"):
            got = side.open(listed[name], os.O_RDONLY | os.O_LARGEFILE)
            pt = side.ops.passthrough  # (what it counts: as ``open`` counts it)
            counted = ({fh: o[:2] for fh, o in pt._opens.items()},
                       {k: repr(m) for k, m in pt.modes._modes.items()})
            out.append((name, got[0], got[2:],
                        side.read(listed[name], got[1]) if got[0] == 0 else None, counted))
            if got[0] == 0:
                assert side.release(listed[name], got[1], os.O_RDONLY) == 0
        return out, side.state()
    got = _both((short, generic), run)
    answers = {name: (err, data) for name, err, _, data, _ in got[0][0]}
    if options.get("passthrough", True) and short.ops.passthrough._counting:
        assert got[0][0][0][4][1]  # (the lower file's open was counted, as a cached one)
    assert answers[b"a"] == (0, (0, b"lower a")) and answers[b"b"] == (0, (0, b"new b"))
    assert answers[b"frozen"][0] == -errno.ENOENT and answers[b"up"] == (0, (0, b"upper file"))
    assert short.generic_opens == 0


def test_a_listed_lower_file_is_marked_unshared_where_nothing_shares(sides):
    """``Files._unshared``: the short OPEN of a lower file on a filesystem that never shares
    extents (here /tmp's, once the device is known) stores what its first READ's ``_map``
    would (``NOT_SHARED``); where the device may share, nothing (the READ maps it)."""
    from overlaypc.sharing import NOT_SHARED
    short, _ = sides()
    d = short.lookup(ROOT_ID, b"d")
    listed = _listed(short, d)
    fs = short.ops.fs
    if fs.sharing is None:
        pytest.fail("no extent map in the default configuration: nothing to check")
    _, fh, _, _ = short.open(listed[b"a"], os.O_RDONLY)
    inode = fs.handles.get(fh).inode
    if not fs.sharing.never_shares(inode.dev):
        pytest.fail(f"the test's filesystem may share extents (device {inode.dev})")
    _, fh2, _, _ = short.open(listed[b"b"], os.O_RDONLY)  # (the device is known by now)
    assert fs.handles.get(fh2).inode.extents is NOT_SHARED
    fs.sharing.never_shares = lambda dev: False  # (a device that may share: left to the READ)
    _, fh3, _, _ = short.open(listed[b"frozen"], os.O_RDONLY)
    assert fs.handles.get(fh3).inode.extents is None
    assert short.read(listed[b"frozen"], fh3) == (0, b"lower frozen")
    for node, fh in ((listed[b"a"], fh), (listed[b"b"], fh2), (listed[b"frozen"], fh3)):
        assert short.release(node, fh, os.O_RDONLY) == 0
    assert short.generic_opens == 0


def test_the_short_open_flags_are_fopen_flags():
    """``Session._short_open_flags`` (a table by ``Opened``'s booleans) answers
    ``fopen_flags`` for every combination, with and without a backing id, twice (the table
    filled, then read)."""
    import itertools

    from overlaypc.engine.ops import Opened, fopen_flags
    from overlaypc.engine.session import Session
    for _ in range(2):
        for bools in itertools.product((False, True), repeat=6):
            for backing in (0, 7):
                o = Opened(3, *bools, backing_id=backing)
                assert Session._short_open_flags(None, o) == fopen_flags(o), o
