"""lseek SEEK_DATA/SEEK_HOLE and copy_file_range through the mount (issue 16.7).

SEEK_DATA/SEEK_HOLE answer from the handle's current backing file: sparse files in a
lower and in the upper, and a handle opened before a copy-up, compared with the kernel's
overlay. COPY_FILE_RANGE copies between the backings (a reflink on XFS: FIEMAP shows the
destination's extents shared), with a write's rules for the destination (the sharing
map, the data version, privileges); FICLONE cannot reach a FUSE daemon, so
``cp --reflink=always`` fails on the mount and ``cp --reflink=auto`` copies.
"""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

import helpers
from test_sharing import _data, _write_synced
from upper_support import overlay_stats, run_as, stack_options

MiB = 1 << 20


def _sparse(path: Path) -> None:
    """data [0, 64K), hole, data [1M, 1M+64K), hole up to 3M (the end)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, b"a" * (64 << 10), 0)
        os.pwrite(fd, b"b" * (64 << 10), MiB)
        os.ftruncate(fd, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


def _seek_map(fd: int) -> list:
    """SEEK_DATA and SEEK_HOLE from a few offsets (ENXIO past the last data)."""
    out = []
    for off in (0, 4096, 64 << 10, 512 << 10, MiB, MiB + 4096, 2 * MiB, 3 * MiB - 1):
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            try:
                out.append(os.lseek(fd, off, whence))
            except OSError as e:
                out.append(f"errno {e.errno}")
    return out


def _stack(base: Path):
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    _sparse(lower / "lo")
    _sparse(upper / "up")
    return lower, upper, work


def _seeks(mnt: Path) -> dict:
    got = {}
    early = os.open(mnt / "lo", os.O_RDONLY)  # opened before the copy-up
    try:
        for name in ("lo", "up"):
            fd = os.open(mnt / name, os.O_RDONLY)
            try:
                got[name] = _seek_map(fd)
            finally:
                os.close(fd)
        rw = os.open(mnt / "lo", os.O_RDWR)  # copy-up (sparse: only the data segments)
        try:
            os.pwrite(rw, b"c" * 4096, 2 * MiB)  # a third data segment
            got["copied, new handle"] = _seek_map(rw)
            got["copied, handle from before"] = _seek_map(early)
        finally:
            os.close(rw)
    finally:
        os.close(early)
    return got


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_seek_data_and_hole_as_kernel_overlay(tmp_path, overlay_mount, kernel_mount, cache):
    """Before the copy-up, as the kernel's overlay; after it, what the upper copy holds.
    (The kernel's copy-up fills holes smaller than its 1 MiB chunks; overlaypc's copies
    only data segments, so the copies differ, and each answers for its own.)"""
    k = _seeks(kernel_mount(*_kstack(tmp_path / "k")))
    lower, upper, work = _stack(tmp_path / "o")
    o = _seeks(overlay_mount(stack_options([lower], upper, work, f"cache={cache}")).path)
    assert o["lo"] == k["lo"] and o["up"] == k["up"]
    # and what that means: the holes are seen
    assert o["lo"][:2] == [0, 64 << 10] and o["lo"][8:10] == [MiB, MiB + (64 << 10)]
    assert o["lo"] == o["up"]
    fd = os.open(upper / "lo", os.O_RDONLY)
    try:
        copy = _seek_map(fd)
    finally:
        os.close(fd)
    assert o["copied, new handle"] == o["copied, handle from before"] == copy
    assert copy[12:14] == [2 * MiB, 2 * MiB + 4096] and copy[:2] == [0, 64 << 10]


def _kstack(base: Path):
    lower, upper, work = _stack(base)
    return [lower], upper, work


# --------------------------------------------------------------------------------------
# copy_file_range
# --------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path, length: int, off_in: int = 0, off_out: int = 0) -> int:
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        done = 0
        while done < length:
            n = os.copy_file_range(fi, fo, length - done, off_in + done, off_out + done)
            if n == 0:
                break
            done += n
        return done
    finally:
        os.close(fi)
        os.close(fo)


def test_copy_file_range_between_layers_on_different_filesystems(tmp_path, tmpfs_factory,
                                                                 overlay_mount):
    """A lower on tmpfs, the upper on the test disk: the daemon's own copy_file_range
    fails EXDEV and it copies through itself (short counts, the caller loops); a reader
    of the destination that cached its pages sees the new data."""
    lower = tmpfs_factory()
    data = _data(3 * MiB, 7)
    (lower / "src").write_bytes(data)
    (lower / "dst").write_bytes(b"\0" * MiB)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir(), work.mkdir()
    m = overlay_mount(stack_options([lower], upper, work))
    reader = os.open(m.path / "dst", os.O_RDONLY)
    try:
        assert os.pread(reader, MiB, 0) == b"\0" * MiB  # cached in the kernel (cache=kernel)
        before = overlay_stats(m.path)
        assert _copy(m.path / "src", m.path / "dst", len(data) - 5, 5, 100) == len(data) - 5
        after = overlay_stats(m.path)
        assert os.pread(reader, 4 * MiB, 0) == b"\0" * 100 + data[5:]
    finally:
        os.close(reader)
    assert after["bytes_copied"] - before["bytes_copied"] == len(data) - 5
    assert (upper / "dst").read_bytes() == b"\0" * 100 + data[5:]
    assert (lower / "dst").read_bytes() == b"\0" * MiB


@pytest.fixture
def xfs_tools():
    helpers.require("xfs")


def _xfs_stack(xfs_dir: Path):
    lower, upper, work = (xfs_dir / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    return lower, upper, work


def _shared(path: Path) -> int:
    """Bytes of ``path`` in shared extents (FIEMAP with SYNC, in-process: xfs_io would stat
    every mount on the machine, and one hung FUSE mount elsewhere would hang it)."""
    return sum(e.length for e in helpers.file_extents(path) if e.shared)


def test_copy_file_range_in_the_upper_reflinks_on_xfs(xfs_tools, xfs_dir, overlay_mount):
    lower, upper, work = _xfs_stack(xfs_dir)
    m = overlay_mount(stack_options([lower], upper, work))
    data = _data(4 * MiB, 11)
    _write_synced(m.path / "a", data)
    assert _shared(upper / "a") == 0
    assert _copy(m.path / "a", m.path / "b", len(data)) == len(data)
    assert (m.path / "b").read_bytes() == data
    assert _shared(upper / "b") == len(data)
    assert _shared(upper / "a") == len(data)


def test_copy_file_range_into_a_mapped_reflinked_copy_up_reads_the_new_data(
        xfs_tools, xfs_dir, overlay_mount):
    """The destination is a reflink copy-up its reader has mapped (served from the lower
    canonical file): the copied range must leave the sharing map before the data
    changes, or the reader gets the lower's old bytes."""
    lower, upper, work = _xfs_stack(xfs_dir)
    old, new = _data(MiB, 1), _data(MiB, 2)
    _write_synced(lower / "f", old)
    m = overlay_mount(stack_options([lower], upper, work, "cache=shared"))
    _write_synced(m.path / "g", new)
    path = m.path / "f"
    rw = os.open(path, os.O_RDWR)  # reflink copy-up
    reader = os.open(path, os.O_RDONLY)
    try:
        before = overlay_stats(m.path)
        assert os.pread(reader, MiB, 0) == old
        assert overlay_stats(m.path)["bytes_shared"] - before["bytes_shared"] == MiB
        assert _copy(m.path / "g", path, 256 << 10, 0, 256 << 10) == 256 << 10
        got = os.pread(reader, MiB, 0)
        assert got[:256 << 10] == old[:256 << 10]
        assert got[256 << 10:512 << 10] == new[:256 << 10], "read the lower's old extent"
        assert got[512 << 10:] == old[512 << 10:]
        # growing the file: the whole map goes
        assert _copy(m.path / "g", path, MiB, 0, MiB - 4096) == MiB
        assert os.pread(reader, 3 * MiB, 0)[MiB - 4096:] == new
    finally:
        os.close(reader)
        os.close(rw)
    assert (lower / "f").read_bytes() == old


def test_cp_reflink_always_fails_and_auto_copies(xfs_tools, xfs_dir, overlay_mount):
    """FICLONE goes through the VFS's remap_file_range, which FUSE lacks: no request
    reaches the daemon and ``cp --reflink=always`` fails; ``--reflink=auto`` falls back
    to copy_file_range, which the daemon turns into a reflink on XFS."""
    lower, upper, work = _xfs_stack(xfs_dir)
    m = overlay_mount(stack_options([lower], upper, work))
    data = _data(2 * MiB, 5)
    _write_synced(m.path / "a", data)
    r = subprocess.run(["cp", "--reflink=always", str(m.path / "a"), str(m.path / "b")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "clone" in r.stderr, r.stderr
    subprocess.run(["cp", "--reflink=auto", str(m.path / "a"), str(m.path / "c")], check=True)
    assert (m.path / "c").read_bytes() == data
    assert _shared(upper / "c") == len(data)


def _copy_priv_states(base: Path, mount) -> dict:
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    (lower / "src").write_bytes(b"#!/bin/sh\n")
    for name, mode in (("suid", 0o4777), ("sgid", 0o2777), ("plain", 0o777)):
        p = lower / name
        p.write_bytes(b"#!/bin/sh\nexit 0\n")
        os.chmod(p, mode)
    mnt = mount(lower, upper, work)
    run_as("""
        for n in ("suid", "sgid", "plain"):
            fi, fo = os.open("src", os.O_RDONLY), os.open(n, os.O_WRONLY)
            assert os.copy_file_range(fi, fo, 4, 0, 0) == 4
            os.close(fi); os.close(fo)
    """, cwd=mnt)
    return {n: (oct(stat.S_IMODE(os.lstat(mnt / n).st_mode)), (mnt / n).read_bytes())
            for n in ("suid", "sgid", "plain")}


def test_copy_file_range_by_unprivileged_caller_clears_setuid_as_kernel_overlay(
        tmp_path, overlay_mount, kernel_mount):
    k = _copy_priv_states(tmp_path / "k", lambda lo, up, wk: kernel_mount([lo], up, wk))
    o = _copy_priv_states(tmp_path / "o", lambda lo, up, wk: overlay_mount(
        stack_options([lo], up, wk)).path)
    assert o == k
    assert o["suid"][0] == oct(0o777) and o["sgid"][0] == oct(0o777)
