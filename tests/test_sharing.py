"""Issue 6: one cached copy of reflinked data (extent sharing), on a real XFS with reflink.

Two lower files that are reflinked copies of each other are read through the mount; the
second must be served from the first's extents (stats) and its own lower file must stay out
of the page cache (``fincore``: page-cache residency, not timing). A write through the mount
unshares exactly the written range; random writes and truncates against reflinked files
must always read back like a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
from upper_support import overlay_stats
from test_upper_reflink import FIEMAP_EXTENT_SHARED, fiemap_extents

pytestmark = [pytest.mark.mount, pytest.mark.reflink]

SIZE = 8 << 20
PAIR_SIZE = 256 << 10
PAIRS = 40


def _data(size: int, seed: int) -> bytes:
    block = bytes((i * 131 + seed) % 251 for i in range(4096))
    return b"".join(i.to_bytes(4, "little") + block[4:] for i in range(size // 4096))


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _reflink(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--reflink=always", str(src), str(dst)], check=True)


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore; no pages are faulted in)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def _stack(xfs_dir: Path):
    lower, upper, work = (xfs_dir / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    return lower, upper, work


def _options(lower: Path, upper: Path, work: Path, cache: str) -> str:
    return f"lowerdir={lower},upperdir={upper},workdir={work},cache={cache}"


@pytest.fixture
def require_tools():
    helpers.require("xfs")
    helpers.require(shutil.which("fincore") is not None, "needs fincore (util-linux)")


@pytest.mark.parametrize("cache", ["shared", "kernel"])
def test_reflinked_lower_files_share_one_copy(require_tools, xfs_dir, overlay_mount, cache):
    lower, upper, work = _stack(xfs_dir)
    data = _data(SIZE, 1)
    _write_synced(lower / "a", data)
    _reflink(lower / "a", lower / "b")
    assert all(f & FIEMAP_EXTENT_SHARED for _, _, f in fiemap_extents(lower / "b"))
    for name in ("a", "b"):
        helpers.evict(lower / name)
    m = overlay_mount(_options(lower, upper, work, cache))

    assert (m.path / "a").read_bytes() == data
    before = overlay_stats(m.path)
    assert (m.path / "b").read_bytes() == data
    after = overlay_stats(m.path)
    # the second file was served from the first one's extents
    assert after["bytes_shared"] - before["bytes_shared"] >= SIZE, (before, after)
    assert after["extent_map_intervals"] >= 1
    # ... so its own blocks were never read into the page cache
    assert _resident(lower / "b") == 0
    assert _resident(lower / "a") >= SIZE


def test_write_unshares_only_the_written_range(require_tools, xfs_dir, overlay_mount):
    lower, upper, work = _stack(xfs_dir)
    data = _data(SIZE, 2)
    _write_synced(lower / "a", data)
    _reflink(lower / "a", lower / "b")
    m = overlay_mount(_options(lower, upper, work, "shared"))
    assert (m.path / "a").read_bytes() == data  # a becomes the canonical owner

    middle = SIZE // 2
    new = b"\xab" * 4096
    fd = os.open(m.path / "b", os.O_WRONLY)  # reflink copy-up, then COW of 4 KiB
    try:
        assert os.pwrite(fd, new, middle) == 4096
    finally:
        os.close(fd)
    assert overlay_stats(m.path)["copy_ups"].get("reflink") == 1

    expected = data[:middle] + new + data[middle + 4096:]
    helpers.evict(upper / "b")
    before = overlay_stats(m.path)
    assert (m.path / "b").read_bytes() == expected
    after = overlay_stats(m.path)
    # everything but the written 4 KiB still comes from a's extents
    assert after["bytes_shared"] - before["bytes_shared"] >= SIZE - 4096 - (64 << 10), (before, after)
    assert _resident(upper / "b") <= 64 << 10  # only the private range is the file's own
    # the upper file still shares all but the written range on disk
    ext = fiemap_extents(upper / "b")
    private = sum(length for _, length, f in ext if not f & FIEMAP_EXTENT_SHARED)
    assert private <= 64 << 10, ext
    # and the other file is unchanged, through the mount and below it
    assert (m.path / "a").read_bytes() == data
    assert (lower / "a").read_bytes() == data and (lower / "b").read_bytes() == data


@pytest.fixture
def reflinked_pairs(require_tools, xfs_dir, overlay_mount):
    """PAIRS reflinked pairs (pN/a, pN/b) in one lower, one cache=shared mount over them."""
    lower, upper, work = _stack(xfs_dir)
    originals = {}
    for i in range(PAIRS):
        d = lower / f"p{i}"
        d.mkdir()
        originals[i] = _data(PAIR_SIZE, 10 + i)
        _write_synced(d / "a", originals[i])
        _reflink(d / "a", d / "b")
    m = overlay_mount(_options(lower, upper, work, "shared"))
    pool = list(range(PAIRS))
    return m.path, originals, pool


_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, PAIR_SIZE + 8192), st.integers(1, 20000)),
    st.tuples(st.just("truncate"), st.integers(0, PAIR_SIZE + 8192), st.just(0)),
    st.tuples(st.just("read"), st.integers(0, PAIR_SIZE + 8192), st.integers(1, 70000)),
)


def test_random_writes_and_truncates_match_a_model(reflinked_pairs):
    mnt, originals, pool = reflinked_pairs

    @settings(max_examples=PAIRS, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(_op, min_size=1, max_size=12), st.sampled_from(["a", "b"]))
    def run(ops, which):
        if not pool:
            return
        i = pool.pop()
        model = bytearray(originals[i])
        path = mnt / f"p{i}" / which
        other = mnt / f"p{i}" / ("b" if which == "a" else "a")
        assert other.read_bytes() == originals[i]  # make the other one canonical sometimes
        fd = os.open(path, os.O_RDWR)
        try:
            for kind, off, n in ops:
                if kind == "write":
                    chunk = bytes((off + k) % 256 for k in range(n))
                    os.pwrite(fd, chunk, off)
                    if off > len(model):
                        model.extend(b"\0" * (off - len(model)))
                    model[off:off + n] = chunk
                elif kind == "truncate":
                    os.ftruncate(fd, off)
                    del model[off:]
                    model.extend(b"\0" * (off - len(model)))
                else:
                    assert os.pread(fd, n, off) == bytes(model[off:off + n]), (ops, kind, off, n)
                assert os.pread(fd, len(model) + 1, 0) == bytes(model), ops
        finally:
            os.close(fd)
        assert path.read_bytes() == bytes(model)
        assert other.read_bytes() == originals[i], "the other reflinked file changed"

    run()
    stats = json.loads(os.getxattr(str(mnt), "user.overlaypc.stats"))
    assert stats["bytes_shared"] > 0, stats


# -- issue 12, defect 2: a shared read must never serve bytes the file no longer has ------------

@contextlib.contextmanager
def _mapped_reflink_copy_up(xfs_dir, overlay_mount, seed: int):
    """A 1 MiB lower file copied up by reflink (an O_RDWR open) in a cache=shared mount, and
    a reader whose first read mapped the upper copy to its origin's extents: yields
    ``(lower, upper, path, rw fd, reader fd, data)``; both fds are closed after."""
    lower, upper, work = _stack(xfs_dir)
    data = _data(1 << 20, seed)
    _write_synced(lower / "f", data)
    m = overlay_mount(_options(lower, upper, work, "shared"))
    path = m.path / "f"
    rw = os.open(path, os.O_RDWR)  # reflink copy-up
    try:
        reader = os.open(path, os.O_RDONLY)
        try:
            before = overlay_stats(m.path)
            assert os.pread(reader, 2 << 20, 0) == data  # maps the upper file
            after = overlay_stats(m.path)
            assert after["copy_ups"].get("reflink") == 1, after
            assert after["bytes_shared"] - before["bytes_shared"] == len(data), (before, after)
            yield lower, upper, path, rw, reader, data
        finally:
            os.close(reader)
    finally:
        os.close(rw)


def test_o_trunc_open_drops_the_sharing_map(require_tools, xfs_dir, overlay_mount):
    """2a: an open(O_TRUNC) of a mapped, reflink-copied-up file, then a 10-byte write: a
    reader that mapped the file before must read exactly the ten new bytes, not the old
    megabyte from the copy-up origin after them."""
    with _mapped_reflink_copy_up(xfs_dir, overlay_mount, 3) as (lower, _, path, _, reader, data):
        trunc = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.write(trunc, b"0123456789") == 10
        finally:
            os.close(trunc)
        got = os.pread(reader, 2 << 20, 0)
        assert len(got) == 10 and got == b"0123456789", (len(got), got[:32])
    assert path.read_bytes() == b"0123456789"
    assert (lower / "f").read_bytes() == data


def test_unflushed_overwrite_of_a_lower_reflink_is_not_shared(require_tools, xfs_dir, overlay_mount):
    """2b: ``cp --reflink a b``, then b's first 64 KiB overwritten without fsync (XFS keeps
    the new data in b's COW fork, FIEMAP without SYNC still shows a's extent): through the
    mount, b must read its own new head, not a's bytes."""
    from overlaypc.extents import fiemap

    lower, upper, work = _stack(xfs_dir)
    data = _data(1 << 20, 4)
    _write_synced(lower / "a", data)
    _reflink(lower / "a", lower / "b")
    head = b"\x5a" * (64 << 10)
    fd = os.open(lower / "b", os.O_WRONLY)
    try:
        assert os.pwrite(fd, head, 0) == len(head)  # no fsync: dirty pages over a shared extent
        # the trap is set: an unsynced FIEMAP still reports b's head as the shared extent
        # (a plain fiemap, not xfs_io's, which syncs first)
        first = fiemap(fd, sync=False)[0]
        assert first.logical == 0 and first.shared, first
    finally:
        os.close(fd)
    m = overlay_mount(_options(lower, upper, work, "shared"))
    assert (m.path / "a").read_bytes() == data  # a becomes the canonical owner
    got = (m.path / "b").read_bytes()
    assert got[:len(head)] == head, "b's unflushed head was read from a's extent"
    assert got == head + data[len(head):]


def test_punched_hole_is_read_as_zeros_not_from_the_canonical_file(require_tools, xfs_dir,
                                                                   overlay_mount):
    """2, the rule for every size-or-map change: ``fallocate(PUNCH_HOLE)`` through the mount
    on a mapped, reflink-copied-up file must drop the mapping first, so a reader that mapped
    the file before reads zeros in the hole, not the copy-up origin's bytes there."""
    from overlaypc import sysapi

    punch = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    with _mapped_reflink_copy_up(xfs_dir, overlay_mount, 5) as (lower, upper, path, rw, reader, data):
        start, length = 64 << 10, 128 << 10
        sysapi.fallocate(rw, punch, start, length)
        expected = data[:start] + bytes(length) + data[start + length:]
        got = os.pread(reader, 2 << 20, 0)
        assert len(got) == len(data)
        assert got[start:start + length] == bytes(length), "the hole read the origin's bytes"
        assert got == expected
    assert path.read_bytes() == expected
    assert (upper / "f").read_bytes() == expected
    assert (lower / "f").read_bytes() == data


# -- hunt 8b: a lower file deduplicated behind the mount (duperemove, bees) --------------------

def _physical(path: Path) -> list[tuple[int, int, int]]:
    """(logical, physical, length) of each extent of ``path``, dirty data flushed first."""
    return [(e.logical, e.physical, e.length) for e in helpers.file_extents(path)]


#: _IOR('X', 126, struct xfs_fsop_geom): 256 bytes, blocksize, rtextsize, agblocks, agcount first
XFS_IOC_FSGEOMETRY = 0x8100587E
#: _IOWR(0x94, 54, struct file_dedupe_range): its 24-byte head, then one 32-byte info per dest
FIDEDUPERANGE = 0xC0189436
_DEDUPE_HEAD = struct.Struct("=QQHHI")    # src_offset src_length dest_count reserved1 reserved2
_DEDUPE_INFO = struct.Struct("=qQQiI")    # dest_fd dest_offset bytes_deduped status reserved


def _ag_bytes(path: Path) -> int:
    """Bytes of an XFS allocation group (in-process, as the other XFS queries here: xfs_io
    stats every mount on the machine at start and hangs on a stuck FUSE mount)."""
    geometry = bytearray(256)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, XFS_IOC_FSGEOMETRY, geometry)
    finally:
        os.close(fd)
    bsize, _, agblocks, _ = struct.unpack_from("=IIII", geometry)
    return agblocks * bsize


def _dirs_in_one_allocation_group(base: Path) -> tuple[Path, Path]:
    """Two new directories whose files XFS allocates in one allocation group (XFS spreads
    new directories over the groups and allocates a file's data near its directory)."""
    ag = _ag_bytes(base)
    seen: dict[int, Path] = {}
    for i in range(32):
        d = base / f"d{i}"
        d.mkdir()
        _write_synced(d / "probe", b"p" * 4096)
        group = _physical(d / "probe")[0][1] // ag
        (d / "probe").unlink()
        if group in seen:
            return seen[group], d
        seen[group] = d
    raise AssertionError(f"no two directories in one allocation group: {seen}")


def _dedupe(src: Path, dst: Path, length: int) -> None:
    """FIDEDUPERANGE: ``dst``'s first ``length`` bytes (equal to ``src``'s) now reference
    ``src``'s blocks. Its data does not change."""
    buf = bytearray(_DEDUPE_HEAD.size + _DEDUPE_INFO.size)
    s_fd = os.open(src, os.O_RDONLY)
    try:
        d_fd = os.open(dst, os.O_RDWR)
        try:
            _DEDUPE_HEAD.pack_into(buf, 0, 0, length, 1, 0, 0)
            _DEDUPE_INFO.pack_into(buf, _DEDUPE_HEAD.size, d_fd, 0, 0, 0, 0)
            fcntl.ioctl(s_fd, FIDEDUPERANGE, buf)
        finally:
            os.close(d_fd)
    finally:
        os.close(s_fd)
    _, _, deduped, status, _ = _DEDUPE_INFO.unpack_from(buf, _DEDUPE_HEAD.size)
    assert status == 0 and deduped == length, (status, deduped)  # FILE_DEDUPE_RANGE_SAME


def test_dedupe_behind_the_mount_never_serves_a_freed_extent(require_tools, xfs_dir, overlay_mount):
    """Lower a and b (a reflink of a) are read through a cache=shared mount: a becomes the
    canonical owner of their physical extent P. Behind the mount, both are deduplicated
    against an identical file outside the layers (their data unchanged): P is freed, and
    files then written through the mount get P. Once such a file shares its extent (a
    copy_file_range through the mount), its reads must come from its own data, not from a's
    bytes that the stale owner entry for P points at."""
    lower, upper = _dirs_in_one_allocation_group(xfs_dir)  # so P is reused for upper files
    work, outside = xfs_dir / "work", xfs_dir / "outside"
    work.mkdir()
    outside.mkdir()
    size = 1 << 20
    data = _data(size, 21)
    _write_synced(lower / "a", data)
    _reflink(lower / "a", lower / "b")
    _write_synced(outside / "x", data)
    freed = _physical(lower / "a")[0][1]
    m = overlay_mount(_options(lower, upper, work, "shared"))
    assert (m.path / "a").read_bytes() == data  # a owns P
    assert (m.path / "b").read_bytes() == data  # b is served from a

    _dedupe(outside / "x", lower / "a", size)
    _dedupe(outside / "x", lower / "b", size)
    assert (lower / "a").read_bytes() == data and (lower / "b").read_bytes() == data
    subprocess.run(["sync"], check=True)  # freed extents become reusable once the log commits
    reused = []
    for k in range(16):
        new = _data(64 << 10, 100 + k)
        fd = os.open(m.path / f"n{k}", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.write(fd, new)
            os.fsync(fd)
        finally:
            os.close(fd)
        if freed <= _physical(upper / f"n{k}")[0][1] < freed + size:
            reused.append((k, new))
    # the trap is set: XFS gave a file written through the mount a's old blocks
    assert reused, "XFS reused none of the freed extent"
    for k, new in reused:
        src = os.open(m.path / f"n{k}", os.O_RDONLY)
        dst = os.open(m.path / f"c{k}", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            assert os.copy_file_range(src, dst, len(new), 0, 0) == len(new)  # a reflink
        finally:
            os.close(src)
            os.close(dst)
    for k, new in reused:
        got = (m.path / f"n{k}").read_bytes()
        assert got == new, f"n{k} read {'a' if got == data[:len(got)] else 'other'}'s bytes"
        assert (m.path / f"c{k}").read_bytes() == new
    # and the deduplicated files still read right, through the mount
    assert (m.path / "a").read_bytes() == data and (m.path / "b").read_bytes() == data
