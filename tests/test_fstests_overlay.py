"""Scenarios of the kernel overlay maintainers' regression tests (fstests' ``tests/overlay``),
re-expressed here against the kernel overlay and overlaypc on the same layers. The code is
ours; each test names the fstests scenario it restates. Scenarios that only exercise kernel
mount mechanics, ``nfs_export`` file handles, ``fsck.overlay`` or features overlaypc does not
have are not here (the fstests46 report lists them).

- overlay/042: upper hard links copied up with ``index=off`` from a lower file that gains
  lower hard links while unmounted, then mounted with ``index=on``: the non-indexed upper
  inode and the indexed one are two files, so they must show two inode numbers
  (``test_non_indexed_upper_keeps_its_own_inode_number``).
"""

from __future__ import annotations

import os
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
