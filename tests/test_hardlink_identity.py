"""Inode identity of lower hard links, copied origin xattrs, metacopy uppers without
metacopy=on (issue 12, defects 1 and 3). Each case fails on cb3d6d2.

The kernel's rule (``ovl_hash_bylower``): in a writable mount without ``index``, each
*name* of a lower non-directory with ``st_nlink > 1`` is its own overlay inode. Both
names show the lower inode number until one is copied up; the copy-up breaks the link;
the copied name then shows its upper inode number. Read-only mounts merge the names.
The kernel overlay over identical layers is the oracle wherever it runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import helpers
from features_support import make_lowers, new_stack, ovl_xattr

pytestmark = [pytest.mark.mount]

OLD = b"lower data of a and b\n"


def linked_lowers(layers_factory, base: Path, kind: str = "file") -> list[Path]:
    lowers = make_lowers(layers_factory, base, {"l": {"a": OLD, "d": {}, "other": b"x"}})
    if kind == "fifo":
        os.unlink(lowers[0] / "a")
        os.mkfifo(lowers[0] / "a", 0o644)
    os.link(lowers[0] / "a", lowers[0] / "b")
    os.link(lowers[0] / "a", lowers[0] / "d" / "c")
    return lowers


def read(path: Path) -> bytes:
    return Path(path).read_bytes()


def scenario_stale_other_name(root: Path) -> dict:
    """Open a read-only; write BBBB through b. What a's old fd, a fresh open of a, and b
    show, and the st_ino classes."""
    fr = os.open(root / "a", os.O_RDONLY)
    try:
        ino_before = (os.stat(root / "a").st_ino, os.stat(root / "b").st_ino)
        fw = os.open(root / "b", os.O_RDWR)
        try:
            os.pwrite(fw, b"BBBB", 0)
        finally:
            os.close(fw)
        out = {
            "a_old_fd": os.pread(fr, 100, 0),
            "a_fstat_size": os.fstat(fr).st_size,
            "a_fresh": read(root / "a"),
            "b": read(root / "b"),
            "c": read(root / "d" / "c"),
            "same_ino_before": ino_before[0] == ino_before[1],
            "a_is_c": os.stat(root / "a").st_ino == os.stat(root / "d" / "c").st_ino,
            "a_is_b": os.stat(root / "a").st_ino == os.stat(root / "b").st_ino,
            "nlink": [os.stat(root / n).st_nlink for n in ("a", "b", "d/c")],
        }
    finally:
        os.close(fr)
    return out


def test_other_name_keeps_lower_data(xfs_dir, layers_factory, overlay_mount, kernel_mount):
    """Defect 1: writing name b of a lower hard link never changes what name a shows."""
    lowers = linked_lowers(layers_factory, xfs_dir)
    ours = new_stack(lowers, xfs_dir, "ours")
    m = overlay_mount(ours.options())
    got = scenario_stale_other_name(m.path)
    assert got["a_old_fd"] == OLD
    assert got["a_fresh"] == OLD
    assert got["c"] == OLD
    assert got["b"] == b"BBBB" + OLD[4:]
    assert got["same_ino_before"] and not got["a_is_b"] and got["a_is_c"]
    theirs = new_stack(lowers, xfs_dir, "kernel")
    k = kernel_mount(lowers, theirs.upper, theirs.work)
    assert scenario_stale_other_name(k) == got


def test_writes_through_two_names_land_in_their_own_files(xfs_dir, layers_factory, overlay_mount):
    """Defect 1: write through a, then through b: b's data must not land in upper/a."""
    lowers = linked_lowers(layers_factory, xfs_dir)
    st = new_stack(lowers, xfs_dir, "w")
    m = overlay_mount(st.options())
    fa = os.open(m / "a", os.O_RDWR)
    fb = os.open(m / "b", os.O_RDWR)
    try:
        os.pwrite(fa, b"AAAA", 0)
        os.pwrite(fb, b"BBBB", 0)
        assert os.pread(fa, 4, 0) == b"AAAA"
        assert os.pread(fb, 4, 0) == b"BBBB"
    finally:
        os.close(fa)
        os.close(fb)
    assert read(m / "a")[:4] == b"AAAA" and read(m / "b")[:4] == b"BBBB"
    m.unmount()
    assert read(st.upper / "a")[:4] == b"AAAA"
    assert read(st.upper / "b")[:4] == b"BBBB"
    assert os.stat(st.upper / "a").st_ino != os.stat(st.upper / "b").st_ino
    assert read(lowers[0] / "a") == OLD
    # as the kernel: no origin on a copy that broke a hard link
    assert ovl_xattr(st.upper / "a", "origin") is None


def test_copied_name_shows_upper_inode_number(xfs_dir, layers_factory, overlay_mount):
    """After the copy-up of one name of a lower hard link, that name shows its upper
    inode number (samefs: the real one), the other names keep the lower number, and a
    remount shows the same."""
    lowers = linked_lowers(layers_factory, xfs_dir)
    st = new_stack(lowers, xfs_dir, "ino")
    lower_ino = os.stat(lowers[0] / "a").st_ino
    m = overlay_mount(st.options())
    os.chmod(m / "b", 0o600)  # metadata copy-up
    seen = {n: os.stat(m / n).st_ino for n in ("a", "b", "d/c")}
    assert seen["a"] == seen["d/c"] == lower_ino
    assert seen["b"] == os.stat(st.upper / "b").st_ino != lower_ino
    m.unmount()
    m2 = overlay_mount(st.options())
    assert {n: os.stat(m2 / n).st_ino for n in ("a", "b", "d/c")} == seen


def test_special_file_links_are_separate_inodes(xfs_dir, layers_factory, overlay_mount):
    """A fifo with two lower names: chmod through one name changes only that name."""
    lowers = linked_lowers(layers_factory, xfs_dir, kind="fifo")
    st = new_stack(lowers, xfs_dir, "fifo")
    m = overlay_mount(st.options())
    os.stat(m / "a")
    os.chmod(m / "b", 0o600)
    assert os.stat(m / "a").st_mode & 0o777 == 0o644
    assert os.stat(m / "b").st_mode & 0o777 == 0o600
    assert os.stat(m / "a").st_ino != os.stat(m / "b").st_ino


def test_read_only_mount_merges_names(xfs_dir, layers_factory, overlay_mount):
    """Read-only: the names of a lower hard link are one inode (one st_ino), as the kernel."""
    lowers = linked_lowers(layers_factory, xfs_dir)
    m = overlay_mount(f"lowerdir={lowers[0]}")
    fa = os.open(m / "a", os.O_RDONLY)
    fb = os.open(m / "b", os.O_RDONLY)
    try:
        assert os.fstat(fa).st_ino == os.fstat(fb).st_ino
        assert os.pread(fa, 100, 0) == os.pread(fb, 100, 0) == OLD
    finally:
        os.close(fa)
        os.close(fb)


def test_copied_upper_on_other_lowers_shows_own_inode(xfs_dir, tmp_path, layers_factory,
                                                      overlay_mount, kernel_mount):
    """An upper copied with ``cp -a`` and mounted over a copy of its lowers on another
    filesystem: the origin handles no longer decode, so no recorded number is trusted (the
    kernel shows the upper's own number too); overlaypc's old ``ino`` xattr, copied along,
    must not win."""
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {"f": b"data\n", "g": b"other\n"}})
    st = new_stack(lowers, xfs_dir, "orig")
    m = overlay_mount(st.options())
    os.chmod(m / "f", 0o600)
    assert os.stat(m / "f").st_ino == os.stat(lowers[0] / "f").st_ino
    m.unmount()
    # what older overlaypc versions wrote: a copy carries it along
    os.setxattr(st.upper / "f", "trusted.overlay.overlaypc.ino",
                str(os.stat(lowers[0] / "g").st_ino).encode())
    other_lower = tmp_path / "lower-copy"  # not the XFS: the origin's UUID is not there
    subprocess.run(["cp", "-a", str(lowers[0]), str(other_lower)], check=True)
    other = new_stack([other_lower], xfs_dir, "copy")
    shutil.rmtree(other.upper)
    subprocess.run(["cp", "-a", str(st.upper), str(other.upper)], check=True)
    m2 = overlay_mount(other.options())
    seen = os.stat(m2 / "f").st_ino
    assert seen == os.stat(other.upper / "f").st_ino
    assert seen != os.stat(other_lower / "g").st_ino
    m2.unmount()
    k = kernel_mount([other_lower], other.upper, other.work)
    assert os.stat(k / "f").st_ino == seen


def test_metacopy_upper_without_metacopy_option_is_eperm(xfs_dir, layers_factory, overlay_mount,
                                                        kernel_mount):
    """Defect 3: an upper made with metacopy=on, mounted with metacopy=off (the default):
    EPERM as the kernel, never the sparse copy's zeros, and nothing written."""
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {"f": b"lower data\n" * 100}})
    st = new_stack(lowers, xfs_dir, "meta")
    m = overlay_mount(st.options("metacopy=on"))
    os.chmod(m / "f", 0o600)
    m.unmount()
    assert ovl_xattr(st.upper / "f", "metacopy") is not None
    before = read(st.upper / "f")
    m2 = overlay_mount(st.options())
    for attempt in (lambda: read(m2 / "f"), lambda: os.open(m2 / "f", os.O_WRONLY),
                    lambda: os.stat(m2 / "f")):
        with pytest.raises(PermissionError):
            attempt()
    m2.unmount()
    assert read(st.upper / "f") == before
    assert ovl_xattr(st.upper / "f", "metacopy") is not None
    k = kernel_mount(lowers, st.upper, st.work)
    with pytest.raises(PermissionError):
        read(k / "f")


def scenario_open_breaks_link(root: Path) -> dict:
    """Look a name up, open it for append without writing (the open alone copies it up and
    breaks the lower link), then stat it: link count and inode class, as the kernel shows."""
    before = os.lstat(root / "b")
    os.close(os.open(root / "b", os.O_WRONLY | os.O_APPEND))
    after = os.lstat(root / "b")
    return {"nlink": (before.st_nlink, after.st_nlink),
            "same_ino": before.st_ino == after.st_ino,
            "a_is_b": os.lstat(root / "a").st_ino == after.st_ino}


def test_open_for_write_shows_the_broken_link_at_once(xfs_dir, layers_factory, overlay_mount,
                                                      kernel_mount):
    """The kernel cached the name's attributes at lookup (nlink 3, the lower's inode); the
    open's copy-up changes both, and nothing else (no write, no setattr) refreshes them."""
    lowers = linked_lowers(layers_factory, xfs_dir)
    ours = new_stack(lowers, xfs_dir, "ours")
    got = scenario_open_breaks_link(overlay_mount(ours.options()).path)
    theirs = new_stack(lowers, xfs_dir, "kernel")
    assert scenario_open_breaks_link(kernel_mount(lowers, theirs.upper, theirs.work)) == got
    assert got["nlink"] == (3, 1)
