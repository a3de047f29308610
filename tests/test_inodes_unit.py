"""Unit tests of the inode table and open handles (``overlaypc.inodes``, ``handles``):
no mount, no root. Plain directories stand in for layers.

What is pinned here: identity comes from the backing object, never from a displayed
number; a lower hard link's names are separate inodes exactly when copy-up could split
them; the table's lifetime and bounds; a handle follows a rebind without any fd held by
the inode; a reopen never yields another file when the path moved.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from overlaypc.handles import HandleTable
from overlaypc.inodes import InodeKey, InodeTable, StaleBacking, key_of
from overlaypc.layer import Layer
from overlaypc.lookup import Entry, Node


@pytest.fixture
def layers(tmp_path: Path):
    (tmp_path / "upper").mkdir()
    (tmp_path / "lower").mkdir()
    (tmp_path / "lower" / "a").write_bytes(b"lower a\n")
    os.link(tmp_path / "lower" / "a", tmp_path / "lower" / "b")
    (tmp_path / "lower" / "single").write_bytes(b"single\n")
    upper = Layer(str(tmp_path / "upper"), 0, writable=True)
    lower = Layer(str(tmp_path / "lower"), 1, writable=False)
    yield upper, lower
    upper.close()
    lower.close()


def node(layer: Layer, rel: str) -> Node:
    st = layer.lstat(rel)
    assert st is not None
    return Node(rel, (Entry(layer, rel, st),))


def test_names_of_a_lower_hard_link_split_only_when_copy_up_can_split_them(layers):
    _, lower = layers
    a, b = node(lower, "a"), node(lower, "b")
    assert a.st.st_ino == b.st.st_ino
    assert key_of(a, split_links=False) == key_of(b, split_links=False)
    assert key_of(a, split_links=True) != key_of(b, split_links=True)
    single = node(lower, "single")
    assert key_of(single, split_links=True) == key_of(single, split_links=False)


def test_upper_hard_links_are_one_inode(layers, tmp_path):
    upper, _ = layers
    (tmp_path / "upper" / "x").write_bytes(b"x")
    os.link(tmp_path / "upper" / "x", tmp_path / "upper" / "y")
    assert key_of(node(upper, "x"), split_links=True) == key_of(node(upper, "y"), split_links=True)


def test_table_is_keyed_by_identity_not_by_displayed_number(layers):
    _, lower = layers
    table = InodeTable()
    a, b = node(lower, "a"), node(lower, "b")
    ia = table.acquire(key_of(a, split_links=True), 42, a.top)
    ib = table.acquire(key_of(b, split_links=True), 42, b.top)  # same st_ino shown
    assert ia is not ib and len(table) == 2
    assert table.acquire(key_of(a, split_links=True), 42, a.top) is ia
    assert ia.refs == 2


def test_release_keeps_only_a_bounded_number_of_data_versions(layers):
    _, lower = layers
    table = InodeTable(retain=2)
    keys = [InodeKey(1, i) for i in range(5)]
    for i, key in enumerate(keys):
        inode = table.acquire(key, i, node(lower, "single").top)
        inode.data_version = 10 + i
        table.release(inode)
    assert len(table) == 0
    assert table.acquire(keys[0], 0, node(lower, "single").top).data_version == 0  # evicted
    assert table.acquire(keys[4], 4, node(lower, "single").top).data_version == 14


def test_hold_fails_after_the_last_release(layers):
    _, lower = layers
    table = InodeTable()
    inode = table.acquire(InodeKey(1, 1), 1, node(lower, "single").top)
    assert table.hold(inode)
    table.release(inode)
    table.release(inode)
    assert not table.hold(inode)


def _copied_single(layers, tmp_path):
    """A table with the inode of lower ``single`` and an upper copy of it: (table, inode,
    its old key, the copy's node)."""
    upper, lower = layers
    table = InodeTable()
    old = key_of(node(lower, "single"), split_links=True)
    inode = table.acquire(old, 7, node(lower, "single").top)
    (tmp_path / "upper" / "single").write_bytes(b"copied\n")
    return table, inode, old, node(upper, "single")


def test_hold_succeeds_while_a_copy_up_rekeys_the_inode(layers, tmp_path):
    """Between a copy-up setting the inode's new key and the table's rekey, the inode is
    live (the copy-up holds it): a nameless file's fstat there must not be told ENOENT."""
    table, inode, old, up = _copied_single(layers, tmp_path)
    assert table.hold(inode)  # the copy-up's own reference
    inode.rebind(up.top, key_of(up, split_links=True), 7)
    assert table.hold(inode), "a live inode refused in the rekey window"
    table.release(inode)
    table.rekey(inode, old)
    table.release(inode)
    assert table.get(inode.key) is inode
    table.release(inode)
    assert len(table) == 0 and not table.hold(inode)


def test_rekey_after_copy_up_and_release_under_the_new_key(layers, tmp_path):
    table, inode, old, up = _copied_single(layers, tmp_path)
    inode.rebind(up.top, key_of(up, split_links=True), 7)
    table.rekey(inode, old)
    assert table.get(old) is None and table.get(inode.key) is inode
    table.release(inode)
    assert len(table) == 0


def test_inode_holds_no_fd(layers):
    _, lower = layers
    before = len(os.listdir("/proc/self/fd"))
    table = InodeTable()
    inodes = [table.acquire(InodeKey(9, i), i, node(lower, "single").top) for i in range(50)]
    assert len(os.listdir("/proc/self/fd")) == before
    for inode in inodes:
        table.release(inode)


def test_open_backing_refuses_a_path_that_names_another_file(layers, tmp_path):
    upper, _ = layers
    (tmp_path / "upper" / "f").write_bytes(b"f")
    table = InodeTable()
    f = node(upper, "f")
    inode = table.acquire(key_of(f, split_links=True), 1, f.top)
    os.rename(tmp_path / "upper" / "f", tmp_path / "upper" / "g")
    (tmp_path / "upper" / "f").write_bytes(b"another file")
    with pytest.raises(StaleBacking) as e:
        inode.open_backing(os.O_RDONLY)
    assert e.value.errno == errno.ESTALE
    inode.moved("g")
    fd, _ = inode.open_backing(os.O_RDONLY)
    try:
        assert os.pread(fd, 10, 0) == b"f"
    finally:
        os.close(fd)


def open_then_copy_up(layers, tmp_path, *, follow: bool):
    """A handle opened on the lower ``single``, then a copy-up that rebinds its inode and
    offers the handle the upper copy. Returns (table, handles, inode, handle)."""
    upper, lower = layers
    table, handles = InodeTable(), HandleTable()
    low = node(lower, "single")
    inode = table.acquire(key_of(low, split_links=True), 1, low.top)
    fd, gen = inode.open_backing(os.O_RDONLY, via=low.top)
    handle = handles.add(inode, os.O_RDONLY, "single", fd, gen, follow=follow)
    (tmp_path / "upper" / "single").write_bytes(b"upper\n")
    up = node(upper, "single")
    inode.rebind(up.top, key_of(up, split_links=True), 1)
    handle.offer()
    return table, handles, inode, handle


def test_handle_switches_to_the_offered_backing(layers, tmp_path):
    table, handles, inode, handle = open_then_copy_up(layers, tmp_path, follow=True)
    os.rename(tmp_path / "upper" / "single", tmp_path / "upper" / "moved")  # offer came first
    fd, switched = handle.fd()
    assert not switched and os.pread(fd, 10, 0) == b"upper\n"  # (switched at the offer)
    assert handle.fd() == (fd, False)
    handles.pop(handle.fh).close()
    table.release(inode)


def test_a_switch_keeps_the_handles_one_fd(layers, tmp_path):
    """A handle that follows copy-ups holds one fd: the new backing takes the old fd's
    number (a replaced fd kept until the release ran a daemon out of fds, hunt7)."""
    table, handles, inode, handle = open_then_copy_up(layers, tmp_path, follow=True)
    upper, _ = layers
    held = len(os.listdir("/proc/self/fd"))
    for i in range(3):  # three more copy-ups (as a metacopy's data copy-up would rebind)
        (tmp_path / "upper" / f"v{i}").write_bytes(b"v%d\n" % i)
        up = node(upper, f"v{i}")
        inode.rebind(up.top, key_of(up, split_links=True), 1)
        handle.offer()
        fd, _ = handle.fd()
        assert os.pread(fd, 10, 0) == b"v%d\n" % i
    assert len(os.listdir("/proc/self/fd")) == held
    handles.pop(handle.fh).close()
    table.release(inode)


def test_bind_at_open_handle_never_switches(layers, tmp_path):
    table, handles, inode, handle = open_then_copy_up(layers, tmp_path, follow=False)
    got, switched = handle.fd()
    assert not switched and os.pread(got, 10, 0) == b"single\n"
    handles.pop(handle.fh).close()
    table.release(inode)
