"""A directory's node must not keep a name in a directory node the kernel forgot.

The kernel sends the FORGETs of a directory and of its parent in that order, but the
daemon's worker threads may run them in another: the parent's first. Its node leaves; a
lookup of it then gets a new nodeid, and one of the child, which is still in the table,
adds the name under the new nodeid to the one under the old. When that name goes (rmdir,
a rename over it), the node kept the stale one, so its key stayed in the key index, and a
directory made next on the same backing inode number (an upper filesystem hands freed
numbers out again) got the removed directory's nodeid (hunt9, suspect of lead 1: after a
rename of ``c/x`` over ``z`` in seed 26, ``mkdir c/x`` and every op under it answered
ESTALE; the kernel's ``d_splice_alias`` refuses a directory inode it holds elsewhere). A
directory has one name in the kernel (``d_splice_alias`` moves its dentry): a new name
replaces the old. Driven without FUSE (``core_driver``).
"""
from __future__ import annotations

import os

import pytest

from core_driver import REQ, CoreDriver
from overlaypc.inodes import InodeKey
from overlaypc.nodes import ROOT_ID, NodeTable


def _key(path) -> InodeKey:
    st = os.lstat(path)
    return InodeKey(st.st_dev, st.st_ino)


@pytest.fixture
def drv(tmp_path):
    d = CoreDriver.in_dir(tmp_path)
    yield d
    d.close()


def _child_with_stale_name(drv: CoreDriver) -> tuple[int, int]:
    """``c/x`` (upper directories) whose node holds a name under ``c``'s forgotten nodeid:
    (``c``'s new nodeid, ``x``'s nodeid)."""
    ops = drv.ops
    c = ops.mkdir(REQ, ROOT_ID, b"c", 0o755).nodeid
    x = ops.mkdir(REQ, c, b"x", 0o755).nodeid
    ops.forget(c, 1)  # c's FORGET ran first ...
    c2 = ops.lookup(REQ, ROOT_ID, b"c").nodeid
    assert c2 != c
    assert ops.lookup(REQ, c2, b"x").nodeid == x  # (x's node, by its key)
    ops.forget(x, 1)  # ... x's (of its first reference) after the lookups
    return c2, x


@pytest.mark.parametrize("removal", ["rmdir", "rename_over"])
def test_a_removed_directory_leaves_the_key_index_despite_a_name_in_a_forgotten_directory(
        drv, tmp_path, removal):
    ops = drv.ops
    c2, x = _child_with_stale_name(drv)
    key = _key(tmp_path / "upper" / "c" / "x")
    assert ops.nodes.by_key(key) == x
    if removal == "rmdir":
        ops.rmdir(REQ, c2, b"x")
    else:  # (the lead's op 39: another directory renamed over it)
        ops.mkdir(REQ, ROOT_ID, b"y", 0o755)
        ops.rename(REQ, ROOT_ID, b"y", c2, b"x")
    assert ops.nodes.by_key(key) is None, ops.nodes.node(x)
    assert ops.nodes.names(x) == []
    # a new directory on that inode number (ext4 and XFS hand it out again) is a new node
    made = ops.mkdir(REQ, c2, b"new", 0o755).nodeid
    if _key(tmp_path / "upper" / "c" / "new") == key:
        assert made != x


def test_a_directory_taken_at_a_new_name_has_that_name_only():
    t = NodeTable(InodeKey(1, 0))
    c = t.take(InodeKey(1, 1), ROOT_ID, "c", True)
    x = t.take(InodeKey(1, 2), c, "x", True)
    t.forget(c, 1)
    c2 = t.take(InodeKey(1, 1), ROOT_ID, "c", True)
    assert t.take(InodeKey(1, 2), c2, "x", True) == x
    assert t.names(x) == [(c2, "x")]
    assert t.child(c, "x") is None
    assert t.path(x) == "c/x"
    t.unlink(c2, "x")
    assert t.by_key(InodeKey(1, 2)) is None
    assert t.take(InodeKey(1, 2), c2, "x2", True) != x


def test_a_file_keeps_its_names_in_several_directories():
    """(Not a directory: a hard link has one name per directory, all current.)"""
    t = NodeTable(InodeKey(1, 0))
    a = t.take(InodeKey(1, 1), ROOT_ID, "a", True)
    b = t.take(InodeKey(1, 2), ROOT_ID, "b", True)
    f = t.take(InodeKey(1, 3), a, "f", False)
    assert t.take(InodeKey(1, 3), b, "g", False) == f
    assert t.names(f) == [(a, "f"), (b, "g")]


def test_an_unlinked_file_leaves_the_key_index_despite_a_name_in_a_forgotten_directory(
        drv, tmp_path):
    """The same FORGET order for a file: its name under the forgotten nodeid is none."""
    ops = drv.ops
    c = ops.mkdir(REQ, ROOT_ID, b"c", 0o755).nodeid
    f = ops.mknod(REQ, c, b"f", 0o100644, 0).nodeid
    ops.forget(c, 1)
    c2 = ops.lookup(REQ, ROOT_ID, b"c").nodeid
    assert ops.lookup(REQ, c2, b"f").nodeid == f
    ops.forget(f, 1)
    key = _key(tmp_path / "upper" / "c" / "f")
    ops.unlink(REQ, c2, b"f")
    assert ops.nodes.by_key(key) is None, ops.nodes.node(f)
