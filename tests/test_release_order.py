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
