"""Scenarios of the kernel overlay maintainers' regression tests (fstests' ``tests/overlay``),
re-expressed here against the kernel overlay and overlaypc on the same layers. The code is
ours; each test names the fstests scenario it restates. Scenarios that only exercise kernel
mount mechanics, ``nfs_export`` file handles, ``fsck.overlay`` or features overlaypc does not
have are not here (the fstests46 report lists them).

- overlay/042: upper hard links copied up with ``index=off`` from a lower file that gains
  lower hard links while unmounted, then mounted with ``index=on``: the non-indexed upper
  inode and the indexed one are two files, so they must show two inode numbers
  (``test_non_indexed_upper_keeps_its_own_inode_number``).
- overlay/059 and overlay/049: an upper copied with ``cp -a`` while unmounted holds two
  files naming one copy-up origin, and two directories redirected to one lower directory.
  Two objects must never show one ``st_dev``/``st_ino`` (``diff`` and ``cmp`` then call
  them one file): the kernel fails the lookup of the second (``ESTALE``), overlaypc shows
  it with its own upper number (``test_duplicated_origin_never_shares_an_inode_number``).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from features_support import make_lowers, mount_side, new_stack

pytestmark = [pytest.mark.mount]

SIDES = ("kernel", "overlaypc")


def _ino_classes(root: Path, names) -> list[list[str]]:
    """The names grouped by the ``st_ino`` they show (the numbers differ between sides)."""
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(os.lstat(root / n).st_ino, []).append(n)
    return sorted(sorted(g) for g in groups.values())


def _non_indexed_then_indexed(side, base: Path, layers_factory, overlay_mount, kernel_mount):
    lowers = make_lowers(layers_factory, base, {"l": {"0": b"zero\n"}})
    s = new_stack(lowers, base, side)
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts=())
    os.link(mnt / "0", mnt / "1")  # copy-up without an index entry; an upper hard link
    unmount()
    os.link(lowers[0] / "0", lowers[0] / "2")  # the origin becomes a lower hard link
    os.link(lowers[0] / "0", lowers[0] / "3")
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts=("index=on",))
    os.link(mnt / "2", mnt / "4")  # copy-up of the lower hard link: indexed
    unmount()
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts=("index=on",))
    names = ["0", "1", "2", "3", "4"]
    with open(mnt / "0", "a") as f:
        f.write("upper 0\n")
    out = {
        "classes": _ino_classes(mnt, names),
        "nlink": [os.lstat(mnt / n).st_nlink for n in names],
        "data": [(mnt / n).read_bytes() for n in names],
        "d_ino_is_st_ino": sorted((e.name, e.inode() == os.lstat(e.path).st_ino)
                                  for e in os.scandir(mnt)),
    }
    unmount()
    return out


def test_non_indexed_upper_keeps_its_own_inode_number(xfs_dir, layers_factory, overlay_mount,
                                                      kernel_mount):
    """overlay/042. As the kernel's ``ovl_getattr``: the origin's number only for an
    indexed inode or an origin with one link; upper 0 (and its link 1) is neither, so it
    shows its own number, apart from the indexed 2, 3 and 4, whose data it does not share."""
    got = {}
    for side in SIDES:
        (xfs_dir / side).mkdir()
        got[side] = _non_indexed_then_indexed(side, xfs_dir / side, layers_factory,
                                              overlay_mount, kernel_mount)
    ours = got["overlaypc"]
    assert ours["classes"] == [["0", "1"], ["2", "3", "4"]]
    assert ours["data"][0] != ours["data"][2]
    assert ours == got["kernel"]


def _stat_or_stale(path: Path):
    try:
        return os.stat(path)
    except OSError as e:
        assert e.errno == errno.ESTALE, e  # (the kernel's refusal of the second)
        return None


def _duplicated_origins(side, base: Path, layers_factory, overlay_mount, kernel_mount):
    lowers = make_lowers(layers_factory, base, {"l": {"origin": b"", "dir": {"file": b""}}})
    s = new_stack(lowers, base, side)
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
    os.rename(mnt / "origin", mnt / "ref1")  # a copy-up with an origin
    os.utime(mnt / "dir" / "file")
    os.rename(mnt / "dir", mnt / "redirect1")  # a redirected directory, with an origin
    unmount()
    for one, two in (("ref1", "ref2"), ("redirect1", "redirect2")):
        subprocess.run(["cp", "-a", s.upper / one, s.upper / two], check=True)
    (s.upper / "ref1").write_text("right\n")
    (s.upper / "ref2").write_text("wrong\n")
    (s.upper / "redirect1" / "file").write_text("right\n")
    (s.upper / "redirect2" / "file").write_text("wrong\n")
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
    out = {}
    for one, two in (("ref1", "ref2"), ("redirect1", "redirect2"),
                     ("redirect1/file", "redirect2/file")):
        a, b = _stat_or_stale(mnt / one), _stat_or_stale(mnt / two)
        out[two] = a is not None and b is not None and \
            (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        if side == "overlaypc" and "/" not in two:  # (the kernel's listing fails: ESTALE)
            listed = {e.name: e.inode() for e in os.scandir(mnt)}
            out[two + " d_ino"] = (listed[one], listed[two]) == (a.st_ino, b.st_ino)
        out[two + " diff"] = subprocess.run(["diff", "-q", mnt / one, mnt / two],
                                            capture_output=True).returncode
    unmount()
    return out


def test_duplicated_origin_never_shares_an_inode_number(xfs_dir, layers_factory, overlay_mount,
                                                        kernel_mount):
    """overlay/059, overlay/049: two upper objects naming one origin never show one inode
    number, and ``diff`` tells them apart (the kernel: it refuses the second, ESTALE, and
    diff fails with status 2)."""
    for side in SIDES:
        (xfs_dir / side).mkdir()
        got = _duplicated_origins(side, xfs_dir / side, layers_factory, overlay_mount,
                                  kernel_mount)
        assert not got["ref2"] and not got["redirect2"] and not got["redirect2/file"], side
        assert got["ref2 diff"] != 0 and got["redirect2 diff"] != 0, side
        if side == "overlaypc":
            assert got["ref2 d_ino"] and got["redirect2 d_ino"]
            assert got["ref2 diff"] == got["redirect2 diff"] == 1
