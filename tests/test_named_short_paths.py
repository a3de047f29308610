"""The short negative LOOKUP and UNLINK of a name in an upper-only directory
(``OverlayOps._lookup_name`` and ``_unlink_name``, the engine's ``lookup_absent`` and
``unlink_name``) answer what ``lookup`` and ``unlink`` answer, or leave the request to them
with nothing done.

They are the kernel's LOOKUP before each creation (one per file of an untar) and its
UNLINK of each file of an ``rm -rf``: the node table's directory path, the lookup cache's
upper-only directory (``Lookup.upper_dir``: only the upper can hold a name in it) and one
``fstatat`` of the name there (an UNLINK: its xattr names too, then ``unlinkat`` in the held
fd). Cases each guard tells apart: a merged directory (a lower may hold the name: a
whiteout), the root, a name found (made behind the mount's back too), a whiteout, a
directory, a metacopy mark, an open file, hard links, a rename in progress or since the
path was made, a parent renamed or removed meanwhile, fault points armed, names ``lookup``
refuses, read-only and index=on mounts. Driven without FUSE.
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from overlaypc import faults
from overlaypc.engine import protocol as p
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import REQ, look, make_ops


@pytest.fixture
def tree(tmp_path):
    for d in ("lower/mg", "upper/mg", "work", "mnt"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "lower" / "mg" / "lo").write_text("lower")
    return tmp_path


@pytest.fixture
def ops(tree):
    ops, close = make_ops(tree)
    yield ops
    close()


def _made(ops, path: str) -> int:
    parent, _, name = path.rpartition("/")
    return ops.mkdir(REQ, look(ops, parent) if parent else ROOT_ID, name.encode(), 0o755).nodeid


def _create(ops, parent: int, name: bytes) -> int:
    entry, opened = ops.create(REQ, parent, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, 0)
    ops.release(REQ, entry.nodeid, opened.fh)
    return entry.nodeid


def generic_lookup(ops, parent: int, name: bytes) -> bytes:
    e = ops.lookup(REQ, parent, name)
    return p.pack_entry(e.nodeid, e.generation, e.attr, e.entry_timeout, e.attr_timeout)


# -- LOOKUP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["up", "up/deep/er"])
def test_a_negative_lookup_answers_as_lookup_and_keeps_the_absence(ops, tree, path):
    for k in range(path.count("/") + 1):
        _made(ops, "/".join(path.split("/")[:k + 1]))
    d = look(ops, path)
    got = ops._lookup_name(d, b"new")
    assert got is not None, "an upper-only directory went the generic way"
    assert got == generic_lookup(ops, d, b"new")
    assert ops.fs.lookup.absent(f"{path}/new") is not None  # kept for the creation
    with ops.fs.ns_lock:
        ops.fs.lookup._absent.clear()
    assert ops._lookup_name(d, b"new") is not None
    f = _create(ops, d, b"new")  # (takes the kept absence)
    assert (tree / "upper" / path / "new").is_file() and look(ops, f"{path}/new") == f


def _entry_bytes(e) -> bytes:
    return p.pack_entry(e.nodeid, e.generation, e.attr, e.entry_timeout, e.attr_timeout)


def _counting_stats(ops) -> list:
    """Every ``fstatat`` of the upper layer from now on (its arguments)."""
    upper = ops.fs.stack.upper
    calls, real = [], upper.stat_at

    def stat_at(parent, name):
        calls.append(name)
        return real(parent, name)
    upper.stat_at = stat_at
    return calls


@pytest.mark.parametrize("kind", ["file", "symlink", "directory", "cached directory", "hard link"])
def test_a_name_found_is_looked_up_from_that_one_stat(ops, tree, kind):
    """Found, the name's node is made from the short path's ``fstatat`` (``found_upper``),
    not read again: the entry ``lookup`` answers (nodeid, attributes, timeouts), one
    reference taken; a cached directory checked against its held fd from that stat."""
    d = _made(ops, "up")
    look(ops, "up")
    up = tree / "upper" / "up"
    if kind == "file":
        (up / "x").write_text("made behind the mount's back")
    elif kind == "symlink":
        os.symlink("target", up / "x")
    elif kind == "hard link":
        (up / "o").write_text("o")
        os.link(up / "o", up / "x")
    else:
        (up / "x").mkdir()
        if kind == "cached directory":
            look(ops, "up/x")
    stats = _counting_stats(ops)
    got = ops._lookup_name(d, b"x")
    assert got is not None
    # (a cached directory: its entry packed, ``_found_dir``)
    nodeid, packed = got if kind == "cached directory" else (got.nodeid, _entry_bytes(got))
    assert nodeid
    # (a directory found: its OCI opaque marker looked for in it, as ``lookup`` does)
    assert stats == (["x", ".wh..wh..opq"] if kind == "directory" else ["x"])
    assert ops.nodes.nlookup(nodeid) == (2 if kind == "cached directory" else 1)
    assert packed == generic_lookup(ops, d, b"x")
    if kind == "directory":
        assert ops._lookup_name(nodeid, b"y") is not None  # cached by that lookup


def test_names_found_or_hidden_answer_as_lookup(ops, tree):
    d = _made(ops, "up")
    (tree / "upper" / "up" / "behind").write_text("made behind the mount's back")
    os.mknod(tree / "upper" / "up" / "wh", stat.S_IFCHR, 0)  # a whiteout: absent, not kept
    look(ops, "up")
    assert _entry_bytes(ops._lookup_name(d, b"behind")) == generic_lookup(ops, d, b"behind")
    assert ops._lookup_name(d, b"wh") == generic_lookup(ops, d, b"wh")  # negative
    assert ops.fs.lookup.absent("up/wh") is None  # a whiteout: not kept
    for name in (b".wh.x", b".", b"..", b"a" * 256, b"", b"a/b"):
        assert ops._lookup_name(d, name) is None, name


def test_merged_and_root_directories_are_left_to_lookup(ops, tree):
    mg = look(ops, "mg")
    assert ops._lookup_name(mg, b"new") is None  # a lower may hold the name
    assert ops._lookup_name(mg, b"lo") is None
    assert ops.lookup(REQ, mg, b"lo").nodeid  # (the lower's)
    assert ops._lookup_name(ROOT_ID, b"new") is None
    f = _create(ops, look(ops, "mg"), b"f")  # a file is no directory
    assert ops._lookup_name(f, b"x") is None


def test_an_opaque_directory_holds_names_in_the_upper_alone(ops, tree):
    """A directory made over a lower one's whiteout is opaque: one upper entry, and the
    lower's names (``lo`` under ``mg``) are hidden: the short path answers them absent."""
    mg = look(ops, "mg")
    ops.unlink(REQ, mg, b"lo")
    ops.rmdir(REQ, ROOT_ID, b"mg")
    mg = _made(ops, "mg")
    assert ops._lookup_name(mg, b"lo") is None  # not cached yet (MKDIR caches nothing)
    assert ops.lookup(REQ, mg, b"x").nodeid == 0  # (the kernel's first LOOKUP in it)
    got = ops._lookup_name(mg, b"lo")
    assert got is not None and got == generic_lookup(ops, mg, b"lo")


def test_an_uncached_parent_or_a_move_takes_the_generic_lookup(ops):
    d = _made(ops, "up")
    look(ops, "up")
    ops.fs.lookup.invalidate()
    assert ops._lookup_name(d, b"x") is None  # not cached: ``lookup`` walks
    assert ops.lookup(REQ, d, b"x").nodeid == 0
    assert ops._lookup_name(d, b"x") is not None  # cached by that walk
    with ops._paths.moving():
        assert ops._lookup_name(d, b"x") is None
    faults.install("ops.nothing", lambda *a: None)
    try:
        assert ops._lookup_name(d, b"x") is None
    finally:
        faults.configure(None)
    assert ops._lookup_name(d, b"x") is not None


def test_a_parent_renamed_or_removed_meanwhile(ops, tree):
    d = _made(ops, "up")
    look(ops, "up")
    assert ops._lookup_name(d, b"x") is not None
    ops.rename(REQ, ROOT_ID, b"up", ROOT_ID, b"moved")
    assert ops._lookup_name(d, b"x") is None  # (a rename drops the cached directory)
    assert ops.lookup(REQ, d, b"x").nodeid == 0  # cached again, at its new path
    (tree / "upper" / "moved" / "y").write_text("y")
    assert ops._lookup_name(d, b"y").nodeid == look(ops, "moved/y")  # at the new path
    assert ops._lookup_name(d, b"x") == generic_lookup(ops, d, b"x")
    assert ops.fs.lookup.absent("moved/x") is not None
    e = ops.mkdir(REQ, d, b"sub", 0o755).nodeid
    ops.lookup(REQ, e, b"x")
    ops.rmdir(REQ, d, b"sub")
    assert ops._lookup_name(e, b"x") is None  # no name left: ``lookup`` answers ENOENT
    with pytest.raises(FileNotFoundError):
        ops.lookup(REQ, e, b"x")


def test_an_upper_only_directory_moved_over_a_lower_one(tree):
    """Moved over an empty lower directory, an upper-only directory hides it (opaque, as
    the kernel's): the names the lower would hold are the upper's alone, whatever the
    short path or ``lookup`` says; both say the same."""
    (tree / "lower" / "empty").mkdir()
    ops, close = make_ops(tree)
    try:
        d = _made(ops, "up")
        look(ops, "up")
        look(ops, "empty")
        ops.rename(REQ, ROOT_ID, b"up", ROOT_ID, b"empty")
        assert ops.lookup(REQ, d, b"x").nodeid == 0
        got = ops._lookup_name(d, b"x")
        assert got in (None, generic_lookup(ops, d, b"x"))
        assert (got is None) == (len(ops.fs.lookup._cached("empty").entries) > 1)
    finally:
        close()


# -- UNLINK ---------------------------------------------------------------------------------
def test_an_unlink_removes_the_upper_file_and_the_tables_name(ops, tree):
    d = _made(ops, "up")
    f = _create(ops, d, b"f")
    assert ops._unlink_name(d, b"f") is True
    assert not (tree / "upper" / "up" / "f").exists()
    assert ops.nodes.child(d, "f") is None and ops.nodes.path(f) is None
    assert ops.lookup(REQ, d, b"f").nodeid == 0
    assert os.listdir(tree / "work" / "work") == []  # no whiteout made anywhere
    (tree / "upper" / "up" / "behind").write_text("made behind the mount's back")
    os.symlink("t", tree / "upper" / "up" / "ln")
    assert ops._unlink_name(d, b"behind") is True and ops._unlink_name(d, b"ln") is True
    assert os.listdir(tree / "upper" / "up") == []


def test_a_hard_link_keeps_its_node_by_the_other_name(ops, tree):
    d = _made(ops, "up")
    f = _create(ops, d, b"a")
    assert ops.link(REQ, f, d, b"b").nodeid == f
    assert ops._unlink_name(d, b"a") is True
    assert look(ops, "up/b") == f  # one object, one nodeid (its key kept)
    assert ops.getattr(REQ, f).attr.nlink == 1


def test_an_open_file_unlinked_stays_readable_through_its_handle(ops, tree):
    d = _made(ops, "up")
    entry, opened = ops.create(REQ, d, b"f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, 0)
    os.write(os.open(tree / "upper" / "up" / "f", os.O_WRONLY), b"data")
    assert ops._unlink_name(d, b"f") is True
    assert ops.getattr(REQ, entry.nodeid).attr.nlink == 0
    buf = memoryview(bytearray(8))
    assert bytes(buf[:ops.read(REQ, entry.nodeid, opened.fh, buf, 0)]) == b"data"
    ops.release(REQ, entry.nodeid, opened.fh)


def test_what_unlink_does_otherwise_is_left_to_it(ops, tree):
    mg = look(ops, "mg")
    _create(ops, mg, b"new")
    assert ops._unlink_name(mg, b"new") is False  # a merged parent: ``unlink`` decides
    assert ops._unlink_name(mg, b"lo") is False
    ops.unlink(REQ, mg, b"lo")
    assert stat.S_ISCHR(os.lstat(tree / "upper" / "mg" / "lo").st_mode)  # its whiteout
    d = _made(ops, "up")
    ops.mkdir(REQ, d, b"sub", 0o755)
    os.mknod(tree / "upper" / "up" / "wh", stat.S_IFCHR, 0)
    for name in (b"sub", b"wh", b"none", b".wh.x", b".", b"..", b"a" * 256, b""):
        assert ops._unlink_name(d, name) is False, name
    with pytest.raises(OSError) as e:
        ops.unlink(REQ, d, b"sub")
    assert e.value.errno == errno.EISDIR
    with pytest.raises(FileNotFoundError):
        ops.unlink(REQ, d, b"wh")
    assert ops._unlink_name(ROOT_ID, b"x") is False


def test_a_metacopy_mark_is_left_to_unlink(ops, tree):
    """An upper file marked metacopy in a mount without metacopy=on: ``unlink``'s lookup
    refuses it (EPERM), and so does the short path, by leaving it to ``unlink``."""
    d = _made(ops, "up")
    _create(ops, d, b"m")
    os.setxattr(tree / "upper" / "up" / "m", "trusted.overlay.metacopy", b"")
    assert ops._unlink_name(d, b"m") is False
    with pytest.raises(PermissionError):
        ops.unlink(REQ, d, b"m")
    assert (tree / "upper" / "up" / "m").exists()


def test_a_move_or_armed_faults_take_the_generic_unlink(ops, tree):
    d = _made(ops, "up")
    _create(ops, d, b"f")
    epoch = ops.fs.lookup.epoch
    with ops._paths.moving():
        assert ops._unlink_name(d, b"f") is False
    faults.install("ops.nothing", lambda *a: None)
    try:
        assert ops._unlink_name(d, b"f") is False
    finally:
        faults.configure(None)
    assert ops.fs.lookup.epoch == epoch and (tree / "upper" / "up" / "f").exists()
    ops.rename(REQ, ROOT_ID, b"up", ROOT_ID, b"moved")  # the parent renamed meanwhile
    assert ops._unlink_name(d, b"f") is False  # (a rename drops the cached directory)
    assert ops.lookup(REQ, d, b"x").nodeid == 0  # cached again, at its new path
    assert ops._unlink_name(d, b"f") is True
    assert not (tree / "upper" / "moved" / "f").exists()
    assert ops.fs.lookup.epoch != epoch


def test_an_unlink_error_is_the_answer(ops, tree):
    """``unlinkat``'s own error (an immutable file: EPERM, root too) is the answer, as
    ``unlink``'s; nothing is dropped from the table."""
    d = _made(ops, "up")
    f = _create(ops, d, b"f")
    path = tree / "upper" / "up" / "f"
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.fail("chattr +i refused (CAP_LINUX_IMMUTABLE and ext4 are needed)")
    try:
        with pytest.raises(PermissionError):
            ops._unlink_name(d, b"f")
        with pytest.raises(PermissionError):
            ops.unlink(REQ, d, b"f")
        assert look(ops, "up/f") == f and path.exists()
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert ops._unlink_name(d, b"f") is True


@pytest.mark.parametrize("options", [{"writable": False}, {"index": True}])
def test_read_only_and_index_mounts_take_no_short_unlink(tree, options):
    ops, close = make_ops(tree, **options)
    try:
        assert ops.unlink_name is None
        assert ops.lookup_name is not None
    finally:
        close()


# -- a directory the lookup cache holds, found again (``OverlayOps._found_dir``) --------------

def _found_again(ops, parent: int, name: bytes):
    """The short LOOKUP's packed entry of a cached directory: (nodeid, bytes)."""
    got = ops._lookup_name(parent, name)
    assert type(got) is tuple, f"not answered packed: {got!r}"
    return got


@pytest.mark.parametrize("kind", ["made", "nested", "looked up", "with an origin", "immutable"])
def test_a_cached_directory_found_again_answers_as_lookup(ops, tree, kind):
    """The kernel's LOOKUP of each directory on a new one's path (tar's ``mkdirat`` of every
    ancestor, revalidated with ``LOOKUP_EXCL``): packed from the one ``fstatat`` the short
    path makes, the entry ``lookup`` answers (nodeid, number, attributes, timeouts), one
    more reference, the node's flags as ``lookup`` leaves them."""
    _made(ops, "up")
    look(ops, "up")
    up = tree / "upper" / "up"
    path = "up/x"
    if kind == "nested":
        _made(ops, "up/x")
        _made(ops, "up/x/y")
        path = "up/x/y"
    elif kind == "made":
        _made(ops, "up/x")  # (cached by MKDIR: ``Lookup.made_dir``)
    else:
        (up / "x").mkdir()
        if kind == "with an origin":
            # a ``cp -a`` of a copied-up directory: it names the lower ``cp`` as its origin
            (tree / "lower" / "cp").mkdir()
            ops.setattr(REQ, look(ops, "cp"), p.SetAttr(p.FATTR_MODE, None, 0, None, None,
                                                       stat.S_IFDIR | 0o700, 0, 0))
            os.setxattr(up / "x", "trusted.overlay.origin",
                        os.getxattr(tree / "upper" / "cp", "trusted.overlay.origin"))
        elif kind == "immutable":  # (as the kernel overlay keeps the flag: ``protattr``)
            os.setxattr(up / "x", ops.fs.protection.xattr, b"i")
        look(ops, path)  # (cached by that lookup)
    parent = look(ops, path.rpartition("/")[0])
    name = path.rpartition("/")[2].encode()
    first = look(ops, path)
    if kind == "immutable":
        assert ops._protected(first) > 0  # (read by a change that asks: kept on the node)
    before = ops.nodes.nlookup(first)
    stats = _counting_stats(ops)
    nodeid, packed = _found_again(ops, parent, name)
    assert stats == [name.decode()]  # one ``fstatat``, nothing else read
    assert nodeid == first and ops.nodes.nlookup(nodeid) == before + 1
    prot = ops.nodes.node(nodeid).prot
    assert packed == generic_lookup(ops, parent, name)
    assert ops.nodes.node(nodeid).prot == prot
    attr = p.unpack_attr(packed, p.ENTRY_HEAD.size)
    st = os.lstat(tree / "upper" / path)
    assert (attr.mode, attr.mtime_ns, attr.nlink) == (st.st_mode, st.st_mtime_ns, st.st_nlink)
    if kind == "with an origin":  # (``cp``, shown first, shows the origin's: ``_unique``)
        assert attr.ino == st.st_ino
    if kind == "immutable":
        assert prot > 0


def test_a_found_directory_the_cache_cannot_vouch_for_is_left_to_take(ops, tree):
    """Where ``_take`` would read more or answer otherwise, nothing is taken and ``lookup``
    answers: a directory replaced behind the mount's back (another inode at the name), not
    cached, an origin not read through its fd yet, a change (the lookup epoch, the node
    table's epoch) or a move since the name was read, IDs shown mapped."""
    from overlaypc.layer import UNKNOWN
    from overlaypc.lookup import UpperName
    d = _made(ops, "up")
    look(ops, "up")
    x = _made(ops, "up/x")
    _found_again(ops, d, b"x")
    # replaced behind the mount's back: looked up afresh (and cached again)
    os.rename(tree / "upper" / "up" / "x", tree / "upper" / "up" / "x.old")
    os.mkdir(tree / "upper" / "up" / "x")
    got = ops._lookup_name(d, b"x")
    assert type(got) is not tuple and got.nodeid != x
    assert got.attr.ino == os.lstat(tree / "upper" / "up" / "x").st_ino
    assert type(ops._lookup_name(d, b"x")) is tuple  # (the new one, cached by that lookup)
    # not cached
    ops.fs.lookup.invalidate()
    look(ops, "up")
    got = ops._lookup_name(d, b"x")
    assert got is not None and type(got) is not tuple
    # an origin not read through the (new) fd yet
    dirfd = ops.fs.lookup._cached("up/x").entries[0].dirfd
    dirfd.origin_ino = dirfd.dir_ino = UNKNOWN
    got = ops._lookup_name(d, b"x")
    assert got is not None and type(got) is not tuple
    assert dirfd.origin_ino is None  # (read by that lookup)
    nodeid, _ = _found_again(ops, d, b"x")
    # a change or a move since the name was read: nothing taken
    lk = ops.fs.lookup
    parent = lk.upper_dir("up")
    st = os.lstat(tree / "upper" / "up" / "x")
    assert lk.found_dir("up/x", UpperName(parent, lk._epoch - 1, st)) is None
    n = ops.nodes.nlookup(nodeid)
    found = UpperName(parent, lk._epoch, st)
    moves, epoch = ops._paths.moves, ops.nodes.epoch
    assert ops._found_dir(d, "x", "up/x", moves + 2, found, epoch) is None
    assert ops._found_dir(d, "x", "up/x", moves, found, epoch - 1) is None
    assert ops.nodes.nlookup(nodeid) == n
    assert ops._found_dir(d, "x", "up/x", moves, found, epoch)[0] == nodeid
    assert ops.nodes.nlookup(nodeid) == n + 1


def test_ids_shown_mapped_answer_a_found_directory_with_lookups_entry(tree):
    ops, close = make_ops(tree, squash_to_uid=1000)
    try:
        d = _made(ops, "up")
        look(ops, "up")
        _made(ops, "up/x")
        look(ops, "up/x")
        got = ops._lookup_name(d, b"x")
        assert type(got) is not tuple and got.attr.uid == 1000
    finally:
        close()


def test_an_undelivered_packed_entry_is_forgotten(ops, tree):
    """Through the engine: the kernel never took the reply (ENOENT: an interrupted
    request), so the reference the short LOOKUP took is forgotten, as ``_entry``'s undo."""
    from overlaypc.engine import session as session_mod
    d = _made(ops, "up")
    look(ops, "up")
    x = _made(ops, "up/x")
    null = os.open(os.devnull, os.O_WRONLY)
    s = session_mod.Session(ops, null, workers=1)
    s._negotiate(1, p.InitIn(7, 45, 1 << 17, p.ASYNC_READ | p.DO_READDIRPLUS))
    fail = [False]
    replies = []

    def writev(fd, parts):
        if fail[0]:
            raise OSError(errno.ENOENT, "interrupted")
        replies.append(b"".join(bytes(part) for part in parts))
        return 0
    s._writev = writev
    out = memoryview(bytearray(1 << 16))
    msg = memoryview(p.IN_HEADER.pack(p.IN_HEADER.size + 2, p.LOOKUP, 2, d, 0, 0, os.getpid(),
                                      0, 0) + b"x\0")
    try:
        n = ops.nodes.nlookup(x)
        s.dispatch(null, msg, out)
        assert p.ENTRY_OUT.unpack_from(replies[-1], 16)[0] == x
        assert ops.nodes.nlookup(x) == n + 1
        fail[0] = True
        s.dispatch(null, msg, out)
        assert ops.nodes.nlookup(x) == n + 1
    finally:
        os.close(null)


@pytest.mark.parametrize("found_dirs", [True, False])
def test_a_found_directory_waiting_for_the_namespace_lock_holds_no_fd_of_it(ops, found_dirs):
    """While the LOOKUP of a cached directory found again waits for the namespace lock (to
    take its node's reference), it holds no fd of that directory: ``_take``'s rule (review19,
    ``test_limits``'s test of a merged directory), the lock's holder may be a change waiting
    at the fd limit, which sheds the lookup cache and waits for fds to be let go. The
    packed path (``_found_dir``) as the generic one (``_take``, ``found_dirs`` False)."""
    import threading
    d = _made(ops, "up")
    look(ops, "up")
    _made(ops, "up/x")  # (cached by MKDIR)
    ops._found_dirs = found_dirs
    held = ops.fs.lookup._cached("up/x").entries[0].dirfd
    fd, ino = held.fd, os.fstat(held.fd).st_ino
    del held
    lock = ops.fs.ns_lock
    waiting = threading.Event()

    class Watched:  # the namespace lock, telling when the LOOKUP's thread waits for it
        def __enter__(self):
            if threading.current_thread() is not threading.main_thread():
                waiting.set()
            return lock.__enter__()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)
    ops.fs.ns_lock = Watched()
    got = []
    try:
        with lock:  # a change's hold, at the fd limit: the cache shed
            looker = threading.Thread(target=lambda: got.append(ops._lookup_name(d, b"x")))
            looker.start()
            assert waiting.wait(60)
            ops.fs.lookup.shed_fds()
            try:
                still = os.fstat(fd).st_ino == ino
            except OSError:
                still = False
        looker.join(60)
    finally:
        ops.fs.ns_lock = lock
    assert got and got[0] is not None
    assert not still, "the LOOKUP waiting for the namespace lock holds the directory's fd"
