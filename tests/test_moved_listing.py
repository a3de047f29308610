"""A listing, and a GETATTR, while a directory above is renamed (driven without FUSE).

The kernel holds only the listed directory's lock for READDIR(PLUS): a rename of a
directory further up runs meanwhile. The listing reads the layers through the directory's
fd (which follows it), but each upper entry's copy-up origin (its ``st_ino``) was read by
*path*: after ``a`` -> ``ax`` and ``b`` -> ``a`` that path names the other tree's file, whose
origin was then shown for this file and kept for it (by device, inode and ctime, none of
which an ancestor rename changes), so ``stat`` of it kept the wrong inode number; with the
old name gone instead the listing failed (ENOENT/ENOTDIR). Found by tests/stress_mount.py
(hunt6): ENOTDIR from READDIRPLUS. The same for the origin of an ``index=on`` upper link, read
after its lookup (GETATTR's link count).
"""
from __future__ import annotations

import os

import pytest

import helpers
from core_driver import REQ, CoreDriver, paused_at
from overlaypc import faults
from overlaypc.config import MountConfig, validate


def _config(tmp_path) -> MountConfig:
    cfg = MountConfig(lowers=[str(tmp_path / "lower")], upper=str(tmp_path / "upper"),
                      work=str(tmp_path / "work"), mountpoint=str(tmp_path / "mnt"),
                      redirect_dir="on")
    validate(cfg)
    return cfg


@pytest.fixture
def copied(tmp_path):
    """Layers where ``a/d/f`` and ``b/d/f`` were copied up (each shows its lower's
    number); a fresh driver over them (no number known yet), and those two numbers."""
    helpers.build_layer(tmp_path / "lower", {"a/d/f": "file of a\n", "b/d/f": "file of b\n"})
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    first = CoreDriver(_config(tmp_path))
    try:
        numbers = {}
        for top in ("a", "b"):
            f = first.lookup(first.lookup(first.lookup(first.root(), top), "d"), "f")
            numbers[top] = first.setattr(f, mode=0o600).ino  # a copy-up with an origin
        first.settle()
    finally:
        first.close()
    assert numbers["a"] != numbers["b"]
    drv = CoreDriver(_config(tmp_path))
    yield drv, numbers
    faults.configure(None)
    drv.close()


def _list_paused(drv: CoreDriver, dir_node, meanwhile):
    """READDIRPLUS of ``dir_node`` in a thread, stopped once the layers are scanned while
    ``meanwhile()`` runs here; its items (or what it raised)."""
    def listing():
        fh = drv.ops.opendir(REQ, dir_node.nodeid).fh
        try:
            return {i.name: i.ino for i in drv.ops.readdir(REQ, dir_node.nodeid, fh, 0, False)}
        finally:
            drv.ops.releasedir(REQ, dir_node.nodeid, fh)
    return paused_at("readdir.scanned", listing, meanwhile)


def test_listing_during_rename_above_shows_each_files_own_number(copied):
    drv, numbers = copied
    root = drv.root()
    d = drv.lookup(drv.lookup(root, "a"), "d")

    def swap():
        drv.rename(root, "a", root, "ax")
        drv.rename(root, "b", root, "a")

    listed = _list_paused(drv, d, swap)
    assert not isinstance(listed, Exception), listed
    assert listed[b"f"] == numbers["a"], "listed with the number of b/d/f (now a/d/f)"
    f = drv.lookup(drv.lookup(drv.lookup(root, "ax"), "d"), "f")
    assert drv.getattr(f).ino == numbers["a"]
    other = drv.lookup(drv.lookup(drv.lookup(root, "a"), "d"), "f")
    assert drv.getattr(other).ino == numbers["b"]
    drv.settle()


def test_listing_during_rename_above_to_a_new_name_lists(copied):
    drv, numbers = copied
    root = drv.root()
    d = drv.lookup(drv.lookup(root, "a"), "d")
    listed = _list_paused(drv, d, lambda: drv.rename(root, "a", root, "ax"))
    assert not isinstance(listed, Exception), listed
    assert listed[b"f"] == numbers["a"]
    drv.settle()


@pytest.fixture
def indexed(tmp_path):
    """index=on over a lower hard link ``d/sub/a``, ``d/sub/b``; ``a`` copied up (an index
    entry, to which the upper ``a`` is a link)."""
    helpers.build_layer(tmp_path / "lower", {"d/sub/a": "linked\n"})
    os.link(tmp_path / "lower" / "d" / "sub" / "a", tmp_path / "lower" / "d" / "sub" / "b")
    drv = CoreDriver.in_dir(tmp_path, index=True, redirect_dir="on")
    a = drv.lookup(drv.lookup(drv.lookup(drv.root(), "d"), "sub"), "a")
    drv.setattr(a, mode=0o600)
    yield drv
    faults.configure(None)
    drv.close()


def test_getattr_of_an_indexed_link_found_before_a_rename_above(indexed):
    """GETATTR found the object through the lookup's directory fds (which follow a moved
    directory); its index entry was then looked for by the path, which a rename of ``d``
    had made a whiteout's: ENOTDIR (tests/stress_mount.py, hunt6)."""
    drv = indexed
    root = drv.root()
    a = drv.lookup(drv.lookup(drv.lookup(root, "d"), "sub"), "a")
    got = paused_at("attrs.found", lambda: drv.ops.getattr(REQ, a.nodeid),
                  lambda: drv.rename(root, "d", root, "dx"))
    assert not isinstance(got, Exception), got
    assert got.attr.nlink == 2
    drv.settle()
