"""Unit tests of the extent map (``overlaypc.sharing``), no root and no FUSE needed.

Physical extents are made up; the canonical files are real files in a plain layer
directory, each holding the 8-byte little-endian *physical address* of every 8-byte word
it owns. So any byte a plan redirects to can be checked: reading a piece must give the
addresses the referencing file's extents say, whichever canonical serves them.
Issue 12 (defect 2c: owners resolved while ``register`` changes the table; 2d: canonical
fds closed while a plan still uses them).
"""

from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path

import pytest

from overlaypc.extents import FIEMAP_EXTENT_LAST, FIEMAP_EXTENT_SHARED, Extent
from overlaypc.layer import Layer
from overlaypc.sharing import Canonical, ExtentMap, FileExtents

SHARED = FIEMAP_EXTENT_SHARED
BLOCK = 16 << 10
REF_INO = 1 << 60  # the referencing file's inode number: nobody else's


def _words(physical: int, length: int) -> bytes:
    """What the canonical files hold at ``physical``: each 8-byte word's own address."""
    first = physical - physical % 8
    data = b"".join(p.to_bytes(8, "little") for p in range(first, physical + length, 8))
    return data[physical - first:physical - first + length]


class Lower:
    """Canonical files in a layer directory; file ``k`` owns physical ``phys(k)`` + BLOCK."""

    def __init__(self, root: Path, count: int) -> None:
        root.mkdir()
        self.canons: list[Canonical] = []
        for k in range(count):
            (root / f"c{k}").write_bytes(_words(self.phys(k), BLOCK))
        self.layer = Layer(str(root), 1, writable=False)
        for k in range(count):
            st = os.stat(root / f"c{k}")
            self.canons.append(Canonical(self.layer, f"c{k}", st.st_dev, st.st_ino))
        self.dev = self.canons[0].dev

    @staticmethod
    def phys(k: int) -> int:
        return (1 << 30) + 2 * k * BLOCK  # gaps between the files' extents

    def extents(self, k: int) -> list[Extent]:
        return [Extent(0, self.phys(k), BLOCK, SHARED | FIEMAP_EXTENT_LAST)]

    def referencing(self, ks: list[int]) -> FileExtents:
        """A file whose block ``i`` is a reflink of canonical ``ks[i]``."""
        ext = [Extent(i * BLOCK, self.phys(k), BLOCK, SHARED) for i, k in enumerate(ks)]
        return FileExtents(self.dev, REF_INO, len(ks) * BLOCK, ext)


@pytest.fixture
def lower(tmp_path: Path):
    made = Lower(tmp_path / "lower", 64)
    yield made
    made.layer.close()


def _check_plan(pieces, fx: FileExtents, offset: int) -> int:
    """Every redirected piece reads the physical words the file maps there; bytes redirected."""
    pos, redirected = offset, 0
    for piece in pieces:
        if piece.fd is not None:
            e = next(e for e in fx.extents if e.logical <= pos < e.end)
            want = _words(e.physical + pos - e.logical, piece.length)
            got = os.pread(piece.fd, piece.length, piece.offset)
            assert got == want, (pos, piece)
            redirected += piece.length
        pos += piece.length
    return redirected


# -- FileExtents ------------------------------------------------------------------------------
def test_without_cuts_the_range_and_keeps_the_rest():
    fx = FileExtents(1, 2, 3 * BLOCK, [Extent(0, 1000, BLOCK, SHARED),
                                       Extent(BLOCK, 9000000, 2 * BLOCK, SHARED)])
    cut = fx.without(BLOCK - 8, BLOCK + 16, 3 * BLOCK)
    assert [(e.logical, e.physical, e.length) for e in cut.extents] == [
        (0, 1000, BLOCK - 8), (BLOCK + 16, 9000000 + 16, 2 * BLOCK - 16)]
    assert cut.starts == [0, BLOCK + 16]
    assert fx.extents[0].length == BLOCK, "the original is never edited"
    grown = fx.without(3 * BLOCK, 4 * BLOCK, 4 * BLOCK)
    assert grown.size == 4 * BLOCK and grown.extents == fx.extents


# -- register / owner -------------------------------------------------------------------------
def test_first_registered_owner_wins_and_partial_overlap_is_split(lower):
    m = ExtentMap()
    a, b = lower.canons[0], lower.canons[1]
    p = lower.phys(0)
    m.register(a, [Extent(0, p + BLOCK // 2, BLOCK // 2, SHARED)])
    # b covers the whole range: only the part nobody owns becomes b's
    m.register(b, [Extent(100 * BLOCK, p, BLOCK, SHARED)])
    assert m.owner(lower.dev, p) == (b, 100 * BLOCK, BLOCK // 2)
    assert m.owner(lower.dev, p + BLOCK // 2 + 8) == (a, 8, BLOCK // 2 - 8)
    assert m.owner(lower.dev, p + BLOCK) is None
    assert m.owner(lower.dev + 1, p) is None, "physical offsets are per device"
    assert len(m) == 2
    # unplain extents (here: DELALLOC 0x4) never become canonical
    m.register(lower.canons[2], [Extent(0, lower.phys(2), BLOCK, 0x4)])
    assert m.owner(lower.dev, lower.phys(2)) is None


# -- plan -------------------------------------------------------------------------------------
def test_plan_redirects_shared_extents_and_stops_at_the_file_size(lower):
    m = ExtentMap()
    for k in (0, 2):
        m.register(lower.canons[k], lower.extents(k))
    fx = lower.referencing([0, 1, 2])
    fx = FileExtents(fx.dev, fx.ino, 2 * BLOCK + 100, fx.extents)  # ends inside block 2
    pieces = m.plan(fx, 8, 10 * BLOCK)
    assert [(p.fd is not None, p.length) for p in pieces] == [
        (True, BLOCK - 8), (False, BLOCK), (True, 100)]
    assert _check_plan(pieces, fx, 8) == BLOCK - 8 + 100
    assert m.plan(fx, 2 * BLOCK + 100, BLOCK) is None, "nothing past the file's size"
    assert m.plan(fx, BLOCK, 64) is None, "an unowned range is the file's own"
    # the canonical file itself reads its own data
    own = FileExtents(lower.dev, lower.canons[0].ino, BLOCK, lower.extents(0))
    assert m.plan(own, 0, BLOCK) is None


def test_plan_of_a_shrunk_mapping_serves_nothing_past_the_new_size(lower):
    m = ExtentMap()
    m.register(lower.canons[0], lower.extents(0))
    fx = lower.referencing([0])
    cut = fx.without(10, 20, max(fx.size, 20))
    pieces = m.plan(cut, 0, BLOCK)
    assert [(p.fd is not None, p.length) for p in pieces] == [(True, 10), (False, 10), (True, BLOCK - 20)]
    assert _check_plan(pieces, cut, 0) == BLOCK - 10


# -- concurrency: register while plans resolve owners (2c) ------------------------------------
@pytest.fixture
def fast_switching():
    """Switch threads every microsecond, so a race window of a few bytecodes is hit."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_register_concurrent_with_plan_never_misdirects(lower, fast_switching):
    """Canonicals registered over and over in random order (each insert shifts the table's
    lists; at 8 intervals the map is full, dropped and rebuilt) while two threads plan short
    reads of a file that references all of them: every redirected byte must be the right
    canonical's, and no plan may raise (an IndexError would be EIO through the mount)."""
    count = len(lower.canons)
    fx = lower.referencing(list(range(count)))
    m = ExtentMap(limit=8)
    errors: list[BaseException] = []
    done = threading.Event()
    redirected = [0, 0]

    def planner(n: int) -> None:
        rnd = random.Random(n)
        try:
            while not done.is_set():
                off = rnd.randrange(0, fx.size, 8)
                # short reads: many owner look-ups, each one checked
                pieces = m.plan(fx, off, rnd.randrange(8, 256, 8))
                if pieces:
                    redirected[n] += _check_plan(pieces, fx, off)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            done.set()

    threads = [threading.Thread(target=planner, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    try:
        rnd = random.Random(1)
        for _ in range(3000):
            if done.is_set():
                break
            for k in rnd.sample(range(count), count):
                m.register(lower.canons[k], lower.extents(k))
    finally:
        done.set()
        for t in threads:
            t.join()
        m.close()
    assert not errors, repr(errors[0])
    assert all(redirected), redirected


# -- canonical fds: eviction never closes one in use (2d) -------------------------------------
def test_evicted_canonical_fd_stays_open_while_a_plan_holds_it(lower, tmp_path):
    m = ExtentMap(max_fds=1)
    for k in range(4):
        m.register(lower.canons[k], lower.extents(k))
    fx = lower.referencing([0])
    held = m.plan(fx, 0, BLOCK)
    fd = held[0].fd
    # three other canonicals evict canonical 0's fd from the LRU (max_fds=1) ...
    for k in (1, 2, 3):
        assert m.plan(lower.referencing([k]), 0, 8)
    # ... and other files are opened meanwhile; a closed fd number would be reused by them
    decoys = [os.open(tmp_path / "lower" / f"c{k}", os.O_RDONLY) for k in range(10, 20)]
    try:
        st = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == (lower.canons[0].dev, lower.canons[0].ino), \
            "the plan's fd now reads another file"
        assert _check_plan(held, fx, 0) == BLOCK
    finally:
        for d in decoys:
            os.close(d)
    m.close()
    assert _check_plan(held, fx, 0) == BLOCK, "close() at unmount leaves plans in flight alone"
    del held


def test_evicted_canonical_fd_is_closed_once_unused(lower):
    m = ExtentMap(max_fds=1)
    for k in range(2):
        m.register(lower.canons[k], lower.extents(k))
    pieces = m.plan(lower.referencing([0]), 0, 8)
    fd = pieces[0].fd
    del pieces
    assert m.plan(lower.referencing([1]), 0, 8)  # evicts canonical 0, used by nobody now
    with pytest.raises(OSError):
        os.fstat(fd)
    m.close()


# -- changes of a file: a mapping made while one runs is never kept -----------------------------
@pytest.fixture
def upper_file(tmp_path: Path, monkeypatch):
    """An overlay inode on a file of a writable layer, its ``Files``, and an fd of the file.
    The file is mapped whatever filesystem tmp_path is (ext4 would not be: no sharing)."""
    from types import SimpleNamespace

    import overlaypc.sharing as sharing_mod

    from overlaypc.files import Files
    from overlaypc.handles import HandleTable
    from overlaypc.inodes import InodeKey, OverlayInode
    from overlaypc.stats import Stats

    monkeypatch.setattr(sharing_mod, "NEVER_SHARED_FS", frozenset())
    root = tmp_path / "upper"
    root.mkdir()
    (root / "f").write_bytes(b"x" * BLOCK)
    layer = Layer(str(root), 0, writable=True)
    st = os.stat(root / "f")
    inode = OverlayInode(InodeKey(st.st_dev, st.st_ino), 1, layer, "f", st.st_dev, st.st_ino)
    files = Files(SimpleNamespace(sharing=ExtentMap(), register_origin=lambda rel: None,
                                  handles=HandleTable(), stats=Stats()))
    fd = os.open(root / "f", os.O_RDONLY)
    yield inode, files, fd
    os.close(fd)
    layer.close()


def test_mapping_made_during_a_change_is_not_kept(upper_file, monkeypatch):
    import overlaypc.files as files_mod
    from overlaypc.sharing import changing

    inode, files, fd = upper_file
    with changing(inode):  # e.g. a truncate in flight
        files._map(inode, fd)
    assert inode.extents is None
    # a change that starts and ends while FIEMAP runs
    real = files_mod.map_file

    def racing(mapped_fd, st=None):
        result = real(mapped_fd, st)
        with changing(inode, 0, 10):
            pass
        return result

    monkeypatch.setattr(files_mod, "map_file", racing)
    files._map(inode, fd)
    assert inode.extents is None
    monkeypatch.setattr(files_mod, "map_file", real)
    files._map(inode, fd)
    assert inode.extents is not None, "with no change around, the mapping is kept"


def test_changing_cuts_before_the_change_and_keeps_the_rest(upper_file):
    from overlaypc.sharing import changing

    inode, _, _ = upper_file
    fx = FileExtents(1, 2, BLOCK, [Extent(0, 1 << 30, BLOCK, SHARED)])
    inode.extents = fx
    with changing(inode, BLOCK - 8, BLOCK + 8):  # a write across the end of the file
        inside = inode.extents
        assert [(e.logical, e.length) for e in inside.extents] == [(0, BLOCK - 8)]
        assert inside.size == BLOCK + 8
        assert inode.extents_busy == 1
    assert inode.extents is inside, "a write keeps the rest of the mapping"
    assert inode.extents_busy == 0
    with changing(inode):  # any size change
        assert inode.extents is None


def test_remembered_lower_mappings_are_bounded_by_extents(monkeypatch):
    """Issue 13.10: the lower-mapping LRU was bounded in files only, and one fragmented file
    holds thousands of extents."""
    import overlaypc.sharing as sharing_mod

    monkeypatch.setattr(sharing_mod, "LOWER_MAP_EXTENTS", 100)
    emap = ExtentMap()
    big = FileExtents(1, 1, 1 << 30, [Extent(i * BLOCK, (1 << 30) + i * BLOCK, BLOCK, SHARED)
                                      for i in range(60)])
    for ino in range(5):
        emap.remember_lower((1, ino), FileExtents(1, ino, big.size, big.extents))
    kept = [ino for ino in range(5) if emap.lower_mapping((1, ino)) is not None]
    assert kept == [4], kept  # 60 extents each: only the newest fits in 100
    emap.remember_lower((1, 9), sharing_mod.NOT_SHARED)  # costs no extents
    assert emap.lower_mapping((1, 4)) is not None


def test_forget_drops_only_that_canonicals_intervals(tmp_path):
    """hunt 8b: an owner whose blocks changed behind the mount (dedupe) is forgotten: its
    intervals go, the others' stay, the count follows, and it can be registered again."""
    lower = Lower(tmp_path / "lower", 3)
    m = ExtentMap()
    for k in range(3):
        m.register(lower.canons[k], lower.extents(k))
    assert len(m) == 3
    m.forget(lower.canons[1])
    assert len(m) == 2
    assert m.owner(lower.dev, lower.phys(1)) is None
    assert m.owner(lower.dev, lower.phys(0))[0] == lower.canons[0]
    assert m.owner(lower.dev, lower.phys(2) + 5)[:2] == (lower.canons[2], 5)
    ref = lower.referencing([0, 1, 2])
    assert set(m.claims(ref)) == {(c.dev, c.ino) for c in (lower.canons[0], lower.canons[2])}
    m.register(lower.canons[1], lower.extents(1))
    assert len(m) == 3 and m.owner(lower.dev, lower.phys(1))[0] == lower.canons[1]
    lower.layer.close()


def test_covers_needs_every_byte_at_its_physical_offset():
    from overlaypc.sharing import _covers

    ext = [Extent(0, 1000, 100, SHARED), Extent(100, 1100, 50, 0), Extent(150, 5000, 50, 0)]
    assert _covers(ext, 10, 1010, 140)        # across two adjacent extents
    assert not _covers(ext, 10, 1010, 141)    # one byte into an extent elsewhere
    assert not _covers(ext, 0, 2000, 10)      # the canonical's blocks moved
    assert not _covers(ext, 190, 5040, 20)    # past its last extent
    assert not _covers([Extent(0, 1000, 100, 0x800)], 0, 1000, 10)  # unwritten: not plain


def test_sharing_takes_extents_at_its_first_mapping(tmp_path):
    """``sharing`` imports ``extents`` at its first FIEMAP, not at import (start-up): the
    stand-in ``fiemap`` then gives its name to ``extents.fiemap`` (later calls go straight
    there), and the SHARED flag ``map_file`` tests is ``extents``' own."""
    import subprocess
    (tmp_path / "f").write_bytes(b"x" * 8192)
    code = "\n".join([
        "import os, sys",
        "from overlaypc import sharing",
        "print('overlaypc.extents' in sys.modules, sharing.fiemap is sharing._first_fiemap)",
        f"fd = os.open({str(tmp_path / 'f')!r}, os.O_RDONLY)",
        "sharing.map_file(fd)",  # (None where the filesystem has no FIEMAP: imported all the same)
        "from overlaypc import extents",
        "print(sharing.fiemap is extents.fiemap, sharing.FIEMAP_EXTENT_SHARED == extents.FIEMAP_EXTENT_SHARED)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
                         ).stdout.split("\n")
    assert out[:2] == ["False True", "True True"]
