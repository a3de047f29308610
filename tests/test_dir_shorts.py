"""The short MKDIR and RMDIR of a directory in an upper-only directory (speed50b:
``OverlayOps._mkdir_name`` and ``_rmdir_name``, the engine's ``mkdir_name`` and
``rmdir_name``; ``shortdirs``) answer what ``mkdir`` and ``rmdir`` answer and leave the same
disk and tables, or leave the request to them with nothing done.

Each guard's case: a parent with a default ACL, the setgid bit or the immutable flag, special
mode bits, another caller's IDs, no kept absence, the name taken behind the mount's back,
a merged parent and the root (MKDIR); a directory the cache does not hold, one replaced
behind the mount's back, an immutable one, one merged with a lower directory through a
redirect, a merged or flagged parent, a non-empty one, one holding only a whiteout (RMDIR);
read-only and index=on mounts. Driven without FUSE.
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from overlaypc.engine import protocol as p
from overlaypc.engine.ops import Request
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import REQ, look, make_ops


@pytest.fixture
def tree(tmp_path):
    for d in ("lower/mg/sub", "upper/mg", "work", "mnt"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "lower" / "mg" / "lo").write_text("lower")
    (tmp_path / "lower" / "mg" / "sub" / "s").write_text("s")
    return tmp_path


@pytest.fixture
def ops(tree):
    ops, close = make_ops(tree)
    yield ops
    close()


def _up(ops, tree) -> int:
    """``up``, an upper-only directory the lookup cache holds (MKDIR made it)."""
    return ops.mkdir(REQ, ROOT_ID, b"up", 0o755).nodeid


def _absent(ops, parent: int, name: bytes) -> None:
    """The kernel's negative LOOKUP before a creation (its absence kept)."""
    assert ops.lookup(REQ, parent, name).nodeid == 0


def _entry(e) -> bytes:
    return p.pack_entry(e.nodeid, e.generation, e.attr, e.entry_timeout, e.attr_timeout)


def _disk(path) -> tuple:
    st = os.lstat(path)
    return (st.st_mode, st.st_uid, st.st_gid, sorted(os.listxattr(path)))


def _fields(packed: bytes) -> tuple:
    """An entry reply's nodeid-free fields that two directories made alike share."""
    a = p.unpack_attr(packed, p.ENTRY_HEAD.size)
    return (p.ENTRY_HEAD.unpack_from(packed)[1:], a.mode, a.nlink, a.uid, a.gid, a.size)


# -- MKDIR ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,umask", [(0o755, 0), (0o777, 0o022), (0o777, 0o077), (0o700, 0)])
def test_a_short_mkdir_makes_and_answers_what_mkdir_does(ops, tree, mode, umask):
    """The same disk (mode with the umask, owner, xattrs), the same reply (but the nodeid
    and number), the node taken once, the directory cached for the lookups below it
    (``Lookup.made_dir``), the lookup's epoch moved; the kept absence taken."""
    up = _up(ops, tree)
    _absent(ops, up, b"a")
    _absent(ops, up, b"b")
    epoch = ops.fs.lookup.epoch
    got = ops._mkdir_name(0, 0, up, b"a", stat.S_IFDIR | mode, umask)
    assert got is not None
    nodeid, packed = got
    assert ops.fs.lookup.epoch != epoch and not ops.fs.lookup.absent_kept("up/a")
    generic = ops.mkdir(Request(0, 0, os.getpid(), 0, umask), up, b"b", stat.S_IFDIR | mode)
    assert _fields(packed) == _fields(_entry(generic))
    assert _disk(tree / "upper" / "up" / "a") == _disk(tree / "upper" / "up" / "b")
    assert stat.S_IMODE(os.lstat(tree / "upper" / "up" / "a").st_mode) == mode & ~umask
    assert ops.nodes.nlookup(nodeid) == 1 and ops.nodes.path(nodeid) == "up/a"
    assert {"up/a", "up/b"} <= set(ops.fs.lookup._dirs)
    # the number the next LOOKUP and GETATTR answer
    assert p.unpack_attr(packed, p.ENTRY_HEAD.size).ino == look_attr(ops, up, b"a").ino
    assert ops.nodes.nlookup(nodeid) == 2


def look_attr(ops, parent: int, name: bytes):
    return ops.lookup(REQ, parent, name).attr


def _setfacl(path, *args) -> None:
    if subprocess.run(["setfacl", *args, str(path)], capture_output=True).returncode:
        pytest.fail("setfacl refused (ACLs on the test filesystem are needed)")


@pytest.mark.parametrize("case", ["default ACL", "setgid", "immutable", "sticky mode",
                                  "other caller", "no kept absence", "taken meanwhile",
                                  "merged parent", "root"])
def test_what_mkdir_decides_otherwise_is_left_to_it(ops, tree, case):
    """The short MKDIR answers None with nothing made where ``mkdir`` must decide; ``mkdir``
    then answers (and makes) what it always did."""
    upper_up = tree / "upper" / "up"
    if case == "immutable":  # (the kernel overlay's ``protattr``, read by the lookup)
        upper_up.mkdir()
        os.setxattr(upper_up, ops.fs.protection.xattr, b"i")
        up = look(ops, "up")
    else:
        up = _up(ops, tree)
    parent, name, mode, ids, rel = up, b"x", stat.S_IFDIR | 0o755, (0, 0), "up/x"
    if case == "default ACL":
        _setfacl(upper_up, "-d", "-m", "u::rwx,g::r-x,o::---")
    elif case == "setgid":
        os.chmod(upper_up, 0o2755)
    elif case == "sticky mode":
        mode |= stat.S_ISVTX
    elif case == "other caller":
        ids = (1000, 1000)
    elif case == "merged parent":
        parent, rel = look(ops, "mg"), "mg/x"
    elif case == "root":
        parent, rel = ROOT_ID, "x"
    if case != "no kept absence":
        _absent(ops, parent, name)
    if case == "taken meanwhile":
        (upper_up / "x").mkdir()  # (behind the mount's back, after the negative LOOKUP)
    assert ops._mkdir_name(ids[0], ids[1], parent, name, mode, 0) is None
    target = tree / "upper" / rel
    assert target.exists() == (case == "taken meanwhile")
    req = Request(ids[0], ids[1], os.getpid())
    if case == "taken meanwhile":
        with pytest.raises(FileExistsError):
            ops.mkdir(req, parent, name, mode)
        return
    if case == "immutable":
        with pytest.raises(PermissionError):
            ops.mkdir(req, parent, name, mode)
        assert not target.exists()
        return
    entry = ops.mkdir(req, parent, name, mode)
    st = os.lstat(target)
    assert entry.nodeid and stat.S_ISDIR(st.st_mode)
    if case == "default ACL":
        assert "system.posix_acl_default" in os.listxattr(target)
    elif case == "setgid":
        assert st.st_mode & stat.S_ISGID
    elif case == "sticky mode":
        assert st.st_mode & stat.S_ISVTX
    elif case == "other caller":
        assert (st.st_uid, st.st_gid) == ids


@pytest.mark.parametrize("options", [{"writable": False}, {"index": True}])
def test_read_only_and_index_mounts(tree, options):
    ops, close = make_ops(tree, **options)
    try:
        assert ops.rmdir_name is None
        assert (ops.mkdir_name is None) == (not options.get("writable", True))
    finally:
        close()


# -- RMDIR ---------------------------------------------------------------------------------

def test_a_short_rmdir_removes_and_leaves_what_rmdir_does(ops, tree):
    """The upper directory gone, its cached structure dropped, the table's name dropped,
    its node keeping what a removed directory keeps (``_gone_dir``: no links), the
    lookup's epoch moved; a LOOKUP then finds nothing."""
    up = _up(ops, tree)
    x = ops.mkdir(REQ, up, b"x", 0o755).nodeid
    assert "up/x" in ops.fs.lookup._dirs
    epoch = ops.fs.lookup.epoch
    assert ops._rmdir_name(up, b"x") is True
    assert not (tree / "upper" / "up" / "x").exists()
    assert "up/x" not in ops.fs.lookup._dirs and ops.fs.lookup.epoch != epoch
    node = ops.nodes.node(x)
    assert node.gone is not None and not node.names
    assert ops.getattr(REQ, x).attr.nlink == 0
    assert ops.lookup(REQ, up, b"x").nodeid == 0
    ops.forget(x, 1)


def test_a_directory_not_empty_is_enotempty_and_stays(ops, tree):
    up = _up(ops, tree)
    x = ops.mkdir(REQ, up, b"x", 0o755).nodeid
    entry, opened = ops.create(REQ, x, b"f", os.O_WRONLY | os.O_CREAT, 0o644, 0)
    ops.release(REQ, entry.nodeid, opened.fh)
    with pytest.raises(OSError) as e:
        ops._rmdir_name(up, b"x")
    assert e.value.errno == errno.ENOTEMPTY
    assert (tree / "upper" / "up" / "x" / "f").exists() and ops.nodes.path(x) == "up/x"
    assert look(ops, "up/x") == x


def test_a_directory_holding_only_whiteouts_is_empty_and_goes(ops, tree):
    """A former mount's whiteout in an upper-only directory hides nothing: the merged view
    is empty, so the directory goes (``_remove``: through ``workdir/work``, discarded)."""
    up = _up(ops, tree)
    ops.mkdir(REQ, up, b"x", 0o755)
    os.mknod(tree / "upper" / "up" / "x" / "w", stat.S_IFCHR, 0)
    assert ops._rmdir_name(up, b"x") is True
    assert not (tree / "upper" / "up" / "x").exists()
    assert not [n for n in os.listdir(tree / "work" / "work")]


@pytest.mark.parametrize("case", ["not cached", "replaced meanwhile", "immutable",
                                  "redirected", "merged parent", "immutable parent",
                                  "a file", "absent", "root"])
def test_what_rmdir_decides_otherwise_is_left_to_it(ops, tree, case):
    """False with nothing changed where ``rmdir`` must decide; ``rmdir`` then answers
    what it always did."""
    up_path = tree / "upper" / "up"
    if case == "immutable parent":
        up_path.mkdir()
        (up_path / "x").mkdir()
        os.setxattr(up_path, ops.fs.protection.xattr, b"a")
        up = look(ops, "up")
    else:
        up = _up(ops, tree)
    parent, name, gone = up, b"x", up_path / "x"
    if case not in ("immutable parent", "a file", "absent", "root", "merged parent"):
        (up_path / "x").mkdir() if case == "immutable" else ops.mkdir(REQ, up, b"x", 0o755)
    if case == "immutable":
        os.setxattr(up_path / "x", ops.fs.protection.xattr, b"i")
    if case == "not cached":
        ops.fs.lookup.invalidate("up/x")
    elif case == "replaced meanwhile":  # (behind the mount's back: another inode)
        os.rmdir(up_path / "x")
        os.mkdir(up_path / "x")
    elif case == "redirected":  # (a lower directory renamed in: merged through a redirect)
        ops.rename(REQ, look(ops, "mg"), b"sub", up, b"x")
        look(ops, "up/x")
    elif case == "merged parent":
        ops.mkdir(REQ, look(ops, "mg"), b"x", 0o755)
        parent, gone = look(ops, "mg"), tree / "upper" / "mg" / "x"
    elif case == "a file":
        entry, opened = ops.create(REQ, up, b"x", os.O_WRONLY | os.O_CREAT, 0o644, 0)
        ops.release(REQ, entry.nodeid, opened.fh)
    elif case == "root":
        ops.mkdir(REQ, ROOT_ID, b"x", 0o755)
        parent, gone = ROOT_ID, tree / "upper" / "x"
    if case in ("immutable", "immutable parent"):
        look(ops, "up/x")
    epoch = ops.fs.lookup.epoch
    assert ops._rmdir_name(parent, name) is False
    assert ops.fs.lookup.epoch == epoch
    errors = {"immutable": errno.EPERM, "immutable parent": errno.EPERM, "a file": errno.ENOTDIR,
              "absent": errno.ENOENT, "redirected": errno.ENOTEMPTY}  # (the lower ``s``)
    if case in errors:
        with pytest.raises(OSError) as e:
            ops.rmdir(REQ, parent, name)
        assert e.value.errno == errors[case]
        return
    ops.rmdir(REQ, parent, name)
    assert not gone.exists()
    assert ops.lookup(REQ, parent, name).nodeid == 0
