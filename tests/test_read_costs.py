"""What the first READ of a lower file costs the daemon, driven through ``OverlayOps``
without FUSE (``core_driver``): a FIEMAP only where the file's filesystem can share extents.

A cold ``grep -r`` of an ext4 lower tree paid one ``FS_IOC_FIEMAP`` per file (and tmpfs one
failed ioctl per file) for extent sharing that those filesystems cannot have. Counts, never
times; every read must still return the file's bytes, and reflinked files on XFS must still
be mapped and served from their canonical file (in both cache modes).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
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
