"""Copy-up by reflink (FICLONE) on a real XFS (reflink=1, loop device; the session
``xfs_fs`` fixture): a 256 MiB lower file opened O_RDWR through the mount is copied up
without copying its data. Three independent witnesses: the daemon's copy-up counter
says "reflink", FIEMAP of the upper file flags its extents shared, and the filesystem's
used space barely grows. No timing asserts (the stuck-mount test bounds a wait: it
would otherwise hang)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from pathlib import Path

import pytest

import helpers
from features_support import sha256_of
from upper_support import make_stack, overlay_stats, work_leftovers

pytestmark = [pytest.mark.mount, pytest.mark.reflink]

SIZE = 256 << 20
FIEMAP_EXTENT_SHARED = 0x2000


def _fill(path: Path, size: int) -> str:
    """Write `size` bytes of non-repeating data (no holes, nothing to dedupe); return sha256."""
    h = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * (1 << 15)      # 1 MiB
    with open(path, "wb") as f:
        for i in range(size >> 20):
            chunk = i.to_bytes(8, "little") + block[8:]
            h.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def _used_bytes(path: Path) -> int:
    sv = os.statvfs(path)
    return (sv.f_blocks - sv.f_bfree) * sv.f_frsize


def fiemap_extents(path: Path) -> list[tuple[int, int, int]]:
    """(logical offset, length, flags) of each extent, in bytes (``helpers.file_extents``:
    FIEMAP with SYNC in-process; xfs_io hung on any stuck FUSE mount on the machine)."""
    return [(e.logical, e.length, e.flags) for e in helpers.file_extents(path)]


def test_copy_up_uses_reflink_on_xfs(xfs_dir, layers_factory, overlay_mount):
    digest = {}

    def prepare(layers):
        digest["lower"] = _fill(layers.paths[0] / "big.bin", SIZE)

    s = make_stack(layers_factory, overlay_mount, {"lower": {"keep.txt": "k"}}, base=xfs_dir,
                   prepare=prepare)
    assert os.stat(s.lower).st_dev == os.stat(s.upper).st_dev == os.stat(xfs_dir).st_dev
    lower_extents = fiemap_extents(s.lo("big.bin"))
    assert lower_extents and not any(f & FIEMAP_EXTENT_SHARED for _, _, f in lower_extents), \
        "test set-up: the lower file already shares extents"
    before = overlay_stats(s.mnt)["copy_ups"]
    os.sync()
    used_before = _used_bytes(xfs_dir)

    fd = os.open(s.m("big.bin"), os.O_RDWR)
    os.close(fd)

    os.sync()
    grown = _used_bytes(xfs_dir) - used_before
    after = overlay_stats(s.mnt)["copy_ups"]
    assert after.get("reflink", 0) == before.get("reflink", 0) + 1, \
        f"copy-up did not take the reflink path: copy_ups {before} -> {after}"
    assert os.stat(s.u("big.bin")).st_size == SIZE
    upper_extents = fiemap_extents(s.u("big.bin"))
    assert upper_extents, "no extents reported for the upper file"
    covered = sum(length for _, length, _ in upper_extents)
    shared = sum(length for _, length, f in upper_extents if f & FIEMAP_EXTENT_SHARED)
    if not (covered >= SIZE and shared == covered):
        raise AssertionError(f"upper extents not all shared: {shared} of {covered} bytes; "
                             "fiemap (offset, length, flags):\n"
                             + "\n".join(f"{o} {n} {f:#x}" for o, n, f in upper_extents))
    assert any(f & FIEMAP_EXTENT_SHARED for _, _, f in fiemap_extents(s.lo("big.bin")))
    assert grown < 16 << 20, f"filesystem grew by {grown} bytes for a reflink copy-up of 256 MiB"
    assert work_leftovers(s.work) == []
    assert sha256_of(s.m("big.bin")) == digest["lower"]
    assert sha256_of(s.lo("big.bin")) == digest["lower"]

    # a write unshares only what it touches: the lower keeps its data
    fd = os.open(s.m("big.bin"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 4096, 1 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert sha256_of(s.lo("big.bin")) == digest["lower"]
    with open(s.m("big.bin"), "rb") as f:
        f.seek(1 << 20)
        assert f.read(4096) == b"\xff" * 4096
    unshared = sum(length for _, length, f in fiemap_extents(s.u("big.bin"))
                   if not f & FIEMAP_EXTENT_SHARED)
    assert 0 < unshared < 16 << 20


def test_extents_are_read_while_a_fuse_mount_on_the_machine_is_stuck(xfs_dir, layers_factory,
                                                                     overlay_mount):
    """flake53: FIEMAP for these tests came from ``xfs_io``, which stats every mount on the
    machine at start: one FUSE mount whose daemon is stopped or hung (another test's,
    anywhere) hung it. Failed before: still waiting after 5 s (xfs_io in the stopped
    daemon's mount); the in-process ioctl touches no other mount."""
    plain = xfs_dir / "plain"
    _fill(plain, 1 << 20)
    layers = layers_factory({"low": {"f": "x"}})
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    assert m.proc is not None  # foreground: the process we started is the daemon
    got: list = []
    reader = threading.Thread(target=lambda: got.append(fiemap_extents(plain)), daemon=True)
    os.kill(m.proc.pid, signal.SIGSTOP)
    try:
        reader.start()
        reader.join(5)  # short: a stuck mount delays any xfs_io on the machine meanwhile
        stuck = reader.is_alive()
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
        reader.join(30)
    assert not stuck, "reading extents waited on a stuck FUSE mount"
    assert got and sum(length for _, length, _ in got[0]) >= 1 << 20
