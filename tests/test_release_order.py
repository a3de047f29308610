"""RELEASE of a file's last handle takes its inode out of the inode table before the
handle's fd closes (soak23 seed 9219, ``stress_mount`` TMPFILE with REOPENMETA).

The fd of the last handle of an unlinked upper file is what keeps the file, and so its
inode number, taken: once it closes, the upper filesystem may hand the number to a new
file at once. The table is keyed by (st_dev, st_ino) of the backing: a creation in
another worker thread (an ``O_TMPFILE`` file there) between that close and the inode's
release found the dying inode under the reused number and became it: its ``st_ino``
showed the old file's copy-up origin (a lower file's number) until the new file got a
name. In-process (``core_driver``): whether the dying inode is still in the table when
the fd closes; the number reuse itself is up to the upper filesystem, not forced here.
"""
from __future__ import annotations

import os

import pytest

import helpers
from core_driver import CoreDriver, Walker
from overlaypc import handles


@pytest.mark.parametrize("how", ["copied", "upper"])
def test_the_inode_leaves_the_table_before_the_last_fd_closes(tmp_path, monkeypatch, how):
    """A lower file copied up by a chmod (it shows its origin's number), or a new upper
    file, opened, unlinked, closed: when the handle's fd closes, the table has no inode
    under the file's key (a new object given the number would get its own). Before:
    the dying inode was still there."""
    helpers.build_layer(tmp_path / "lower", {"f": "lower data\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        w = Walker(drv)
        if how == "copied":
            w.setattr("f", mode=0o640)
            fh = w.open("f", os.O_RDONLY)
        else:
            _, fh = w.create("g", os.O_RDWR, 0o644)
        inode = drv.fs.handles.get(fh).inode
        assert inode.in_upper
        w.unlink("f" if how == "copied" else "g")
        seen = []
        real_close = handles.Handle.close

        def close(handle):
            real_close(handle)
            # (here the upper filesystem may reuse the number: what would a new file find?)
            seen.append(drv.fs.inodes.get(handle.inode.key))
        monkeypatch.setattr(handles.Handle, "close", close)
        drv.release(fh)
        assert seen == [None]
        assert drv.fs.inodes.get(inode.key) is None
        drv.settle()
    finally:
        drv.close()


def _node_key_at_close(drv, monkeypatch, fh) -> list:
    """RELEASE ``fh``; what the node table's key index gives for the file's key when the
    handle's fd closes (the moment the upper filesystem may reuse its inode number)."""
    key = drv.fs.handles.get(fh).inode.key
    seen = []
    real_close = handles.Handle.close

    def close(handle):
        real_close(handle)
        seen.append(drv.ops.nodes.by_key(key))
    monkeypatch.setattr(handles.Handle, "close", close)
    drv.release(fh)
    monkeypatch.setattr(handles.Handle, "close", real_close)
    return seen


def test_an_unlinked_tmpfile_node_gives_up_its_key_before_the_last_fd_closes(
        tmp_path, monkeypatch):
    """An O_TMPFILE file never linked, closed before the kernel's FORGET of its node: the
    close frees the upper file, and a file made next on the freed inode number must not be
    given the dying node (the kernel would attach the new name to that nodeid: its old
    page cache and attributes). Before: the key index still gave the tmpfile's nodeid
    after the close, until FORGET."""
    helpers.build_layer(tmp_path / "lower", {"d/f": "lower\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        w = Walker(drv)
        node, fh = drv.tmpfile(w.node("d"), os.O_RDWR, 0o644)
        drv.write(fh, b"tmp data\n", 0)
        key = drv.fs.handles.get(fh).inode.key
        assert drv.ops.nodes.by_key(key) == node.nodeid
        assert _node_key_at_close(drv, monkeypatch, fh) == [None]
        # a new file on the same (st_dev, st_ino), before the FORGET: a node of its own
        new = drv.ops.nodes.take(key, w.node("d").nodeid, "new", False)
        assert new != node.nodeid
        drv.ops.forget(new, 1)
        drv.settle()
    finally:
        drv.close()


def test_a_linked_tmpfile_and_an_open_file_with_another_name_keep_their_keys(
        tmp_path, monkeypatch):
    """The guard's other side: a tmpfile given a name, and an unlinked open file whose
    other name remains (its node keeps the key for that name's next lookup), keep their
    keys at RELEASE: their files live on."""
    helpers.build_layer(tmp_path / "lower", {"d/f": "lower\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        w = Walker(drv)
        node, fh = drv.tmpfile(w.node("d"), os.O_RDWR, 0o644)
        drv.link(node, w.node("d"), "named")
        assert _node_key_at_close(drv, monkeypatch, fh) == [node.nodeid]
        _, fh = w.create("d/a", os.O_RDWR, 0o644)
        w.link("d/a", "d/b")
        nodeid = drv._open[fh]
        w.unlink("d/a")
        assert _node_key_at_close(drv, monkeypatch, fh) == [nodeid]
        drv.settle()
    finally:
        drv.close()


@pytest.mark.parametrize("held", ["open", "cached"])
def test_a_removed_files_key_goes_with_its_name(tmp_path, held):
    """An upper file unlinked while open (its fd holds the file) or while only the
    kernel's dentry cache refers to it (no handle: the unlink frees the inode number at
    once): the node leaves the key index in the namespace lock hold of the unlink, before
    any creation may take the number (a guard: it does already)."""
    helpers.build_layer(tmp_path / "lower", {"d/f": "lower\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        w = Walker(drv)
        node, fh = w.create("d/g", os.O_RDWR, 0o644)
        key = drv.fs.handles.get(fh).inode.key
        if held == "cached":
            drv.release(fh)
        assert drv.ops.nodes.by_key(key) == node.nodeid
        w.unlink("d/g")
        assert drv.ops.nodes.by_key(key) is None
        if held == "open":
            drv.release(fh)
        drv.settle()
    finally:
        drv.close()
