"""What the first READ of a lower file costs the daemon, driven through ``OverlayOps``
without FUSE (``core_driver``): a FIEMAP only where the file's filesystem can share extents.

A cold ``grep -r`` of an ext4 lower tree paid one ``FS_IOC_FIEMAP`` per file (and tmpfs one
failed ioctl per file) for extent sharing that those filesystems cannot have. Counts, never
times; every read must still return the file's bytes, and reflinked files on XFS must still
be mapped and served from their canonical file (in both cache modes).
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import subprocess
import time
from pathlib import Path

import pytest

import helpers
from core_driver import CoreDriver
from overlaypc import sharing
from overlaypc.config import MountConfig, validate
from reliability_support import loop_fs

N = 12  # lower files read


@pytest.fixture
def fiemaps(monkeypatch):
    """How many FIEMAP ioctls the core makes (``sharing.map_file``'s ``fiemap``)."""
    calls = [0]
    real = sharing.fiemap

    def counting(fd: int, *, sync: bool, **limits: int):
        calls[0] += 1
        return real(fd, sync=sync, **limits)
    monkeypatch.setattr(sharing, "fiemap", counting)
    return calls


def _driver(base: Path, lower: Path, cache: str) -> CoreDriver:
    for d in ("upper", "work", "mnt"):
        (base / d).mkdir(parents=True)
    cfg = MountConfig(lowers=[str(lower)], upper=str(base / "upper"), work=str(base / "work"),
                      mountpoint=str(base / "mnt"), cache=cache)
    validate(cfg)
    return CoreDriver(cfg)


def _read_all(drv: CoreDriver, names: list[str]) -> dict[str, bytes]:
    """OPEN, READ, RELEASE of each lower file in ``d`` (a grep's requests)."""
    d = drv.lookup(drv.root(), "d")
    got = {}
    for name in names:
        fh = drv.open(drv.lookup(d, name), os.O_RDONLY)
        got[name] = drv.read(fh, 1 << 19, 0)
        drv.release(fh)
    return got


def _lower_files(lower: Path) -> dict[str, bytes]:
    (lower / "d").mkdir(parents=True)
    files = {f"f{i}": f"file {i}\n".encode() * (i + 1) for i in range(N)}
    for name, data in files.items():
        (lower / "d" / name).write_bytes(data)
    return files


@pytest.mark.parametrize("cache", ["kernel", "shared"])
@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_lower_files_where_nothing_can_be_shared_are_read_without_fiemap(
        tmp_path, tmpfs_factory, fiemaps, fstype, cache):
    """ext4 (no reflink) and tmpfs (no FIEMAP): the first READ of each lower file makes no
    FIEMAP ioctl (before: one per file), and reads the file's own bytes."""
    helpers.require("root")  # loop devices, tmpfs, trusted.* xattrs
    with loop_fs(tmp_path / "loop", 32, "ext4") if fstype == "ext4" else contextlib.nullcontext(tmpfs_factory()) as root:
        lower = root / "lower"
        files = _lower_files(lower)
        drv = _driver(tmp_path / "stack", lower, cache)
        try:
            assert _read_all(drv, sorted(files)) == files
            assert fiemaps[0] == 0, f"{fiemaps[0]} FIEMAP calls reading {N} {fstype} lower files"
            assert drv.fs.stats.snapshot()["bytes_shared"] == 0
        finally:
            drv.close()


@pytest.mark.reflink
@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_reflinked_lower_files_on_xfs_are_still_mapped_and_shared(
        tmp_path, xfs_dir, fiemaps, cache):
    """The other side of the rule: on XFS every lower file is mapped at its first READ, and
    a reflinked copy is read from the first file's extents, in both cache modes."""
    lower = xfs_dir / "lower"
    files = _lower_files(lower)
    data = bytes(range(256)) * 1024  # 256 KiB
    with open(lower / "d" / "a", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    subprocess.run(["cp", "--reflink=always", str(lower / "d" / "a"), str(lower / "d" / "b")],
                   check=True)
    files.update(a=data, b=data)
    drv = _driver(xfs_dir / "stack", lower, cache)
    try:
        names = sorted(files)
        names.remove("b")
        got = _read_all(drv, names + ["b"])  # a first: it owns the extents
        assert got == files
        assert fiemaps[0] >= len(files), f"{fiemaps[0]} FIEMAP calls for {len(files)} XFS files"
        assert drv.fs.stats.snapshot()["bytes_shared"] == len(data)
    finally:
        drv.close()


def _cached(path: Path) -> bool:
    """Whether the first page of ``path`` is in the page cache (mincore of a private
    mapping, which faults nothing in; a probing read would start the read it looks for)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            vec = ctypes.create_string_buffer(1)
            if libc.mincore(ctypes.addressof(anchor), 1, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return bool(vec.raw[0] & 1)
        finally:
            del anchor  # (the mapping closes only once no buffer points into it)


def test_a_read_only_open_of_a_cold_lower_file_starts_its_disk_read(tmp_path):
    """A cold ``grep -r`` of lower files waited for one disk read per file after the OPEN
    reply and the first READ's round trip: a read-only OPEN now asks the backing
    filesystem for the file's start (POSIX_FADV_WILLNEED), so the disk works while the
    request travels. Seen without any READ: the lower file's pages come into the page
    cache after the OPEN alone (before: never). Reads still return the file's bytes."""
    helpers.require("root")  # a loop device: an ext4 with a page cache of its own
    with loop_fs(tmp_path / "loop", 32, "ext4") as root:
        lower = root / "lower"
        files = _lower_files(lower)
        drv = _driver(tmp_path / "stack", lower, "kernel")
        try:
            d = drv.lookup(drv.root(), "d")
            for name in ("f3", "f7"):
                path = lower / "d" / name
                helpers.evict(path)
                assert not _cached(path), "precondition: the file's pages were dropped"
                fh = drv.open(drv.lookup(d, name), os.O_RDONLY)
                try:
                    deadline = time.monotonic() + 10  # a wait for the loop device, not a timing
                    while not _cached(path) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    assert _cached(path), f"{name}: the OPEN started no read of its data"
                    assert drv.read(fh, 1 << 19, 0) == files[name]
                finally:
                    drv.release(fh)
        finally:
            drv.close()


@pytest.fixture
def advised(monkeypatch):
    """The (offset, length) of each POSIX_FADV_WILLNEED the core gives."""
    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def recording(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            calls.append((offset, length))
        real(fd, offset, length, advice)
    monkeypatch.setattr(os, "posix_fadvise", recording)
    return calls


def test_only_read_only_opens_of_files_with_data_prefetch(tmp_path, tmpfs_factory, advised):
    """The prefetch is a read-only open's: a writable open (which copies the file up),
    O_DIRECT (which bypasses the page cache) and an empty file ask for nothing; a big file
    for its first ``files.PREFETCH`` bytes only, a small one for its size."""
    helpers.require("root")  # tmpfs, trusted.* xattrs
    from overlaypc import files as files_mod
    lower = tmpfs_factory() / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "small").write_bytes(b"s" * 100)
    (lower / "d" / "big").write_bytes(b"b" * (files_mod.PREFETCH * 3))
    (lower / "d" / "empty").write_bytes(b"")
    drv = _driver(tmp_path / "stack", lower, "kernel")
    try:
        d = drv.lookup(drv.root(), "d")

        def advice_of(name: str, flags: int) -> list[tuple[int, int]]:
            advised.clear()
            fh = drv.open(drv.lookup(d, name), flags)
            drv.release(fh)
            return list(advised)
        assert advice_of("small", os.O_RDONLY) == [(0, 100)]
        assert advice_of("big", os.O_RDONLY) == [(0, files_mod.PREFETCH)]
        assert advice_of("empty", os.O_RDONLY) == []
        assert advice_of("small", os.O_RDONLY | os.O_DIRECT) == []
        assert advice_of("big", os.O_RDWR) == []  # (copied up)
        assert advice_of("small", os.O_WRONLY) == []
        assert advice_of("big", os.O_RDONLY) == [(0, files_mod.PREFETCH)]  # now the upper copy
    finally:
        drv.close()


@pytest.mark.reflink
def test_no_prefetch_where_page_cache_sharing_may_serve_the_file(tmp_path, xfs_dir, advised):
    """On a filesystem that can share extents (XFS with reflink), a file's reads may come
    from the canonical copy's pages: its first read-only open asks for none of its own
    (they would be cached twice); once its first READ mapped it as sharing nothing, its
    next open prefetches. With ``sharing=off`` every read-only open does."""
    lower = xfs_dir / "lower"
    files = _lower_files(lower)
    for sharing_opt, first in (("on", []), ("off", [(0, len(files["f5"]))])):
        base = tmp_path / f"stack-{sharing_opt}"
        for d in ("upper", "work", "mnt"):
            (base / d).mkdir(parents=True)
        cfg = MountConfig(lowers=[str(lower)], upper=str(base / "upper"), work=str(base / "work"),
                          mountpoint=str(base / "mnt"), sharing=sharing_opt == "on")
        validate(cfg)
        drv = CoreDriver(cfg)
        try:
            f5 = drv.lookup(drv.lookup(drv.root(), "d"), "f5")
            advised.clear()
            fh = drv.open(f5, os.O_RDONLY)
            assert advised == first, sharing_opt
            assert drv.read(fh, 1 << 19, 0) == files["f5"]
            drv.release(fh)
            advised.clear()
            drv.release(drv.open(f5, os.O_RDONLY))
            assert advised == [(0, len(files["f5"]))], sharing_opt
        finally:
            drv.close()
