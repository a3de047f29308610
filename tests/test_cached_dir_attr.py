"""The short GETATTR of a cached directory (``OverlayOps._cached_dir_attr``, the engine's
``getattr_node``) answers what ``getattr`` answers, or leaves the request to it.

It is the kernel's GETATTR of a directory after every change in it (one per file of an
untar or an ``rm -rf``): the node table's directory path, the lookup cache's node and one
``fstatat`` of its name checked against the held fd (``Lookup.fresh_dir``), its number kept
on that fd (``InodeNumbers.dir_ino``), packed from the stat. Cases the generic path has
no need of: a directory whose origin was not read yet (left to ``getattr``, which reads
it), one replaced or changed behind the mount's back (a fresh lookup; fresh attributes), a
rename in progress, IDs shown mapped (no short path), and the READDIRPLUS items of two
requests taken in one call (each by its own listing). Driven without FUSE.
"""
from __future__ import annotations

import os
import stat

import pytest

from overlaypc.engine import protocol as p
from overlaypc.engine.protocol import SetAttr
from overlaypc.layer import UNKNOWN
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import REQ, look, make_ops


@pytest.fixture
def tree(tmp_path):
    for d in ("lower/lo/sub", "lower/mg", "lower/cp", "upper/mg", "work", "mnt"):
        (tmp_path / d).mkdir(parents=True)
    for name in ("f", "g"):
        (tmp_path / "lower" / "lo" / name).write_text(name)
    return tmp_path


@pytest.fixture
def ops(tree):
    ops, close = make_ops(tree)
    yield ops
    close()


def generic(ops, nodeid: int) -> bytes:
    r = ops.getattr(REQ, nodeid)
    return p.pack_attr_out(r.attr, r.timeout)


def _chmod(ops, nodeid: int, mode: int) -> None:
    ops.setattr(REQ, nodeid, SetAttr(p.FATTR_MODE, None, 0, None, None, stat.S_IFDIR | mode, 0, 0))


def _made(ops, path: str) -> int:
    """Directory ``path`` made through the mount, its parents looked up (as the kernel)."""
    parent, _, name = path.rpartition("/")
    return ops.mkdir(REQ, look(ops, parent) if parent else ROOT_ID, name.encode(), 0o755).nodeid


KINDS = {
    "lower only": "lo", "lower, nested": "lo/sub",
    "merged (no origin)": "mg", "copied up (origin)": "cp",
    "upper only": "up", "upper, nested": "up/deep/er",
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_short_answer_is_the_generic_one(ops, tree, kind):
    for made in ("up", "up/deep", "up/deep/er"):
        _made(ops, made)
    if kind == "copied up (origin)":
        _chmod(ops, look(ops, "cp"), 0o700)  # a copy-up of the directory: origin recorded
    nodeid = look(ops, KINDS[kind])
    want = generic(ops, nodeid)  # (reads an upper directory's origin through its fd)
    got = ops._cached_dir_attr(nodeid)
    assert got is not None, "a cached directory went the generic way"
    assert got == want == generic(ops, nodeid)
    attr = p.unpack_attr(got, 16)
    st = os.lstat(tree / ("lower" if kind.startswith("lower") else "upper") / KINDS[kind])
    assert (attr.mtime_ns, attr.mode) == (st.st_mtime_ns, st.st_mode)
    if kind in ("merged (no origin)", "copied up (origin)"):
        assert attr.nlink == 1  # merged: as the kernel's
        assert attr.ino == os.lstat(tree / "lower" / KINDS[kind]).st_ino  # the lower's number


def test_a_directory_whose_origin_was_not_read_is_left_to_getattr(ops, tree):
    d = _made(ops, "d")
    ops.create(REQ, d, b"f", os.O_WRONLY | os.O_CREAT, 0o644, 0)
    ops.fs.lookup.invalidate()
    ops.fs.lookup.directory("d")  # cached again, on a new fd
    dirfd = ops.fs.lookup._cached("d").entries[0].dirfd
    dirfd.origin_ino = dirfd.dir_ino = UNKNOWN  # (as before anything read its origin through it)
    assert ops._cached_dir_attr(d) is None
    want = generic(ops, d)
    assert dirfd.origin_ino is None  # read by getattr
    assert ops._cached_dir_attr(d) == want


def test_a_directory_replaced_behind_the_mounts_back_is_looked_up_afresh(ops, tree):
    d = _made(ops, "d")
    look(ops, "d")
    generic(ops, d)
    assert ops._cached_dir_attr(d) is not None
    os.rename(tree / "upper" / "d", tree / "upper" / "d.old")
    os.mkdir(tree / "upper" / "d")
    assert ops._cached_dir_attr(d) is None  # another inode at the name: not the cached one
    got = p.unpack_attr(generic(ops, d), 16)
    assert got.ino == os.lstat(tree / "upper" / "d").st_ino
    assert ops._cached_dir_attr(d) == generic(ops, d)  # the new one cached since


def test_a_directory_changed_behind_the_mounts_back_shows_its_fresh_attributes(ops, tree):
    d = _made(ops, "d")
    look(ops, "d")
    generic(ops, d)
    (tree / "upper" / "d" / "x").mkdir()
    os.utime(tree / "upper" / "d", ns=(1, 2_000_000_003))
    got = ops._cached_dir_attr(d)
    assert got == generic(ops, d)
    attr = p.unpack_attr(got, 16)
    assert (attr.mtime_ns, attr.nlink) == (2_000_000_003, 3)


def test_a_rename_in_progress_leaves_the_request_to_getattr(ops):
    d = _made(ops, "d")
    look(ops, "d")
    generic(ops, d)
    with ops._paths.moving():  # (as a rename or removal holds it, under the namespace lock)
        assert ops._cached_dir_attr(d) is None
    assert ops._cached_dir_attr(d) is not None


def test_ids_shown_mapped_take_no_short_path(tree):
    ops, close = make_ops(tree, squash_to_uid=1000)
    try:
        assert ops.getattr_node is None
    finally:
        close()
    ops, close = make_ops(tree)
    try:
        assert ops.getattr_node == ops._cached_dir_attr
    finally:
        close()


def test_items_of_two_listings_taken_at_once_are_each_their_own_listings(ops):
    lo = look(ops, "lo")
    first = {i.name: i for i in ops.readdir(REQ, lo, 0, 0, True)}
    second = {i.name: i for i in ops.readdir(REQ, lo, 0, 0, True)}
    taken = ops.take_entries(REQ, lo, [first[b"f"], second[b"g"]])
    assert [e.nodeid for e in taken] == [look(ops, "lo/f"), look(ops, "lo/g")]
    assert [e.attr for e in taken] == [ops.getattr(REQ, e.nodeid).attr for e in taken]
    assert [ops.nodes.nlookup(e.nodeid) for e in taken] == [2, 2]  # (taken, then looked up)


def test_two_upper_directories_naming_one_origin_show_two_numbers(tree):
    """``cp`` (copied up, its origin the lower ``cp``) and ``cp2``, given that origin as a
    ``cp -a`` of the upper while unmounted gives it, name one origin. The first answered shows the origin's number, the
    other its own upper number (``InodeNumbers._unique``, fstests overlay/049): the short
    answer too, which read the origin kept on the directory's fd without that rule."""
    ops, close = make_ops(tree)
    try:
        _chmod(ops, look(ops, "cp"), 0o700)
    finally:
        close()
    os.mkdir(tree / "upper" / "cp2")
    os.setxattr(tree / "upper" / "cp2", "trusted.overlay.origin",
                os.getxattr(tree / "upper" / "cp", "trusted.overlay.origin"))
    for order in (("cp", "cp2"), ("cp2", "cp")):
        ops, close = make_ops(tree)
        try:
            shown = {}
            for name in order:
                nodeid = look(ops, name)
                want = generic(ops, nodeid)
                got = ops._cached_dir_attr(nodeid)
                assert got is not None, "a cached directory went the generic way"
                assert got == want, name
                shown[name] = p.unpack_attr(got, 16).ino
            assert shown[order[0]] == os.lstat(tree / "lower" / "cp").st_ino
            assert shown[order[1]] == os.lstat(tree / "upper" / order[1]).st_ino
        finally:
            close()
