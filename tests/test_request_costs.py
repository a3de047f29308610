"""What one namespace request costs the daemon, driven through ``OverlayOps`` without FUSE
(``core_driver``): how often it looks a name up, walks a layer path, or decodes a copy-up
origin. Counts, never times. Each reply must still show the object's real state after the
change (compared with a fresh ``lstat`` of the backing object / a fresh GETATTR)."""
from __future__ import annotations

import errno
import os
import stat
from collections import Counter

import pytest

import helpers
from core_driver import REQ, CoreDriver
from overlaypc import inumbers, layer, lookup, nodes
from overlaypc.config import MountConfig, validate
from overlaypc.engine import protocol as p
from overlaypc.engine.ops import Request
from overlaypc.engine.protocol import SetAttr
from overlaypc.nodes import ROOT_ID

N = 20  # names per directory in the lower layer


@pytest.fixture
def env(tmp_path):
    helpers.require("root")  # trusted.* xattrs, chown to other IDs, open_by_handle_at
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    lower = tmp_path / "lower"
    (lower / "ld").mkdir()
    for i in range(N):
        (lower / "ld" / f"f{i}").write_bytes(b"x")
    (tmp_path / "upper" / "u").mkdir()
    cfg = MountConfig(lowers=[str(lower)], upper=str(tmp_path / "upper"),
                      work=str(tmp_path / "work"), mountpoint=str(tmp_path / "mnt"))
    validate(cfg)
    drv = CoreDriver(cfg)
    yield drv, tmp_path
    drv.close()


@pytest.fixture
def calls(monkeypatch):
    """Counts: merged lookups (``Lookup.lookup``), layer path walks (``Layer.lstat``,
    ``Layer.getxattr``) and origin decodes (``open_by_handle``)."""
    counts: Counter[str] = Counter()

    def counting(owner, name, key):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    counting(lookup.Lookup, "lookup", "lookup")
    counting(layer.Layer, "lstat", "walk")
    counting(layer.Layer, "getxattr", "walk")
    counting(inumbers.sysapi, "open_by_handle", "decode")
    return counts


def _node(drv: CoreDriver, parent: int, name: str) -> int:
    return drv.ops.lookup(REQ, parent, name.encode()).nodeid


def _same(attr, st: os.stat_result, *, merged: bool = False) -> None:
    """``attr`` shows the upper object of stat ``st``; ``merged``: a merged directory,
    whose ``st_nlink`` is 1 (the kernel overlay's)."""
    assert (attr.mode, attr.uid, attr.gid, attr.size, attr.nlink) == \
        (st.st_mode, st.st_uid, st.st_gid, st.st_size, 1 if merged else st.st_nlink)
    assert attr.ctime_ns == st.st_ctime_ns and attr.mtime_ns == st.st_mtime_ns


def test_create_looks_its_name_up_once(env, calls):
    """CREATE in a directory that has its upper copy: one lookup (under the namespace
    lock, the one that decides EEXIST), no path walk in the upper; the reply is the file
    as made, its owner the caller's (set after creation, in workdir/work, where the one
    walk is: the ``lstat`` of the file built there, so a kill -9 never leaves it the
    daemon's)."""
    drv, tmp = env
    u = _node(drv, ROOT_ID, "u")
    caller = Request(uid=1234, gid=5678, pid=os.getpid())
    calls.clear()
    entry, opened = drv.ops.create(caller, u, b"new", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                   stat.S_IFREG | 0o640)
    assert calls["lookup"] == 1, calls
    assert calls["walk"] == 1, calls
    _same(entry.attr, os.lstat(tmp / "upper" / "u" / "new"))
    assert (entry.attr.uid, entry.attr.gid) == (1234, 5678)
    assert os.listdir(tmp / "work" / "work") == []
    # the node is the one a lookup finds, with the same attributes
    again = drv.ops.lookup(REQ, u, b"new")
    assert again.nodeid == entry.nodeid and again.attr == entry.attr
    drv.ops.release(REQ, entry.nodeid, opened.fh)
    drv.ops.forget(entry.nodeid, 2)
    with pytest.raises(FileExistsError):  # the check under the lock still decides
        drv.ops.create(REQ, u, b"new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IFREG | 0o644)


def test_create_reads_the_new_file_stat_once(env, monkeypatch):
    """CREATE by a caller the file is made for as it is (no chown needed): the stat read
    to decide the owner is the one the reply and the node are made of."""
    drv, tmp = env
    u = _node(drv, ROOT_ID, "u")
    stats: list[int] = []
    real_fstat, real_stat_at = os.fstat, layer.Layer.stat_at

    def fstat(fd):
        st = real_fstat(fd)
        if stat.S_ISREG(st.st_mode):
            stats.append(st.st_ino)
        return st

    def stat_at(self, parent, name):
        st = real_stat_at(self, parent, name)
        if st is not None and stat.S_ISREG(st.st_mode):
            stats.append(st.st_ino)
        return st
    monkeypatch.setattr(os, "fstat", fstat)
    monkeypatch.setattr(layer.Layer, "stat_at", stat_at)
    entry, opened = drv.ops.create(REQ, u, b"new", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                   stat.S_IFREG | 0o640)
    monkeypatch.undo()
    st = os.lstat(tmp / "upper" / "u" / "new")
    assert stats == [st.st_ino], stats
    _same(entry.attr, st)
    drv.ops.release(REQ, entry.nodeid, opened.fh)
    drv.ops.forget(entry.nodeid, 1)


def test_unlink_looks_its_name_up_once(env, calls):
    """UNLINK in a directory that has its upper copy: one lookup (under the lock), which
    also gives the link count the node table needs; a directory is refused under it."""
    drv, tmp = env
    u = _node(drv, ROOT_ID, "u")
    (tmp / "upper" / "u" / "a").write_bytes(b"a")
    os.link(tmp / "upper" / "u" / "a", tmp / "upper" / "u" / "b")
    a = _node(drv, u, "a")
    calls.clear()
    drv.ops.unlink(REQ, u, b"a")
    assert calls["lookup"] == 1, calls
    assert not (tmp / "upper" / "u" / "a").exists()
    # a hard link: the node keeps its identity, and the other name finds it
    assert _node(drv, u, "b") == a
    (tmp / "upper" / "u" / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        drv.ops.unlink(REQ, u, b"d")
    with pytest.raises(NotADirectoryError):
        drv.ops.rmdir(REQ, u, b"b")
    with pytest.raises(FileNotFoundError):
        drv.ops.unlink(REQ, u, b"a")


def test_parent_getattr_after_removals_decodes_its_origin_once(env, calls):
    """rm of a lower tree: every UNLINK changes the copied-up parent's ctime, and the
    kernel's GETATTR of the parent then asks its inode number again; the origin handle is
    decoded once, and the number stays the lower directory's."""
    drv, tmp = env
    ld = _node(drv, ROOT_ID, "ld")
    ino = drv.ops.getattr(REQ, ld).attr.ino
    assert ino == os.lstat(tmp / "lower" / "ld").st_ino
    calls.clear()
    for i in range(N):
        drv.ops.unlink(REQ, ld, f"f{i}".encode())
        attr = drv.ops.getattr(REQ, ld).attr
        assert attr.ino == ino
        _same(attr, os.lstat(tmp / "upper" / "ld"), merged=True)
    assert calls["decode"] <= 1, calls


def _count_xattr_reads(monkeypatch) -> Counter[str]:
    """Counts of ``Layer.getxattr_at`` calls by xattr name, from now on."""
    reads: Counter[str] = Counter()
    real = layer.Layer.getxattr_at

    def counting(self, dirfd, name):
        reads[name] += 1
        return real(self, dirfd, name)
    monkeypatch.setattr(layer.Layer, "getxattr_at", counting)
    return reads


def test_parent_getattr_after_changes_reads_its_origin_xattrs_once(env, monkeypatch):
    """untar and rm -rf: after each CREATE or UNLINK the kernel asks the parent's
    attributes again (its ctime moved). The directory's origin xattrs (none for a
    directory made through the mount, a decodable handle for a copied-up one) are read
    once while the lookup holds its fd, not at every GETATTR; the number stays right."""
    drv, tmp = env
    reads = _count_xattr_reads(monkeypatch)
    u = _node(drv, ROOT_ID, "u")
    ld = _node(drv, ROOT_ID, "ld")
    drv.ops.unlink(REQ, ld, b"f0")  # copies ld up: its origin is the lower ld
    lower_ino = os.lstat(tmp / "lower" / "ld").st_ino
    for parent, ino in ((u, os.lstat(tmp / "upper" / "u").st_ino), (ld, lower_ino)):
        assert drv.ops.getattr(REQ, parent).attr.ino == ino
        reads.clear()
        for i in range(N):
            entry, opened = drv.ops.create(REQ, parent, f"n{i}".encode(),
                                           os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IFREG | 0o644)
            drv.ops.release(REQ, entry.nodeid, opened.fh)
            drv.ops.forget(entry.nodeid, 1)
            assert drv.ops.getattr(REQ, parent).attr.ino == ino
            drv.ops.unlink(REQ, parent, f"n{i}".encode())
            attr = drv.ops.getattr(REQ, parent).attr
            assert attr.ino == ino
        _same(attr, os.lstat(tmp / "upper" / drv.ops.nodes.path(parent)), merged=parent == ld)
        origin_reads = sum(n for name, n in reads.items() if name.endswith("origin"))
        assert origin_reads == 0, reads  # read before the loop, at the first GETATTR


def test_mkdir_reads_no_origin_xattr_of_the_new_directory(env, monkeypatch):
    """untar's MKDIR: the lookup that answers it lists the new directory's xattr names
    (for its opaque mark); with no origin among them its inode number needs no origin read.
    A copied-up directory (origin set) still shows its lower's number."""
    drv, tmp = env
    reads = _count_xattr_reads(monkeypatch)
    u = _node(drv, ROOT_ID, "u")
    entry = drv.ops.mkdir(REQ, u, b"new", 0o755)
    assert entry.attr.ino == os.lstat(tmp / "upper" / "u" / "new").st_ino
    assert not [name for name in reads if name.endswith("origin")], reads
    drv.ops.forget(entry.nodeid, 1)
    ld = _node(drv, ROOT_ID, "ld")
    drv.ops.unlink(REQ, ld, b"f0")  # copies ld up: its origin is the lower ld
    drv.ops.forget(ld, 1)
    drv.fs.lookup.invalidate()
    assert drv.ops.lookup(REQ, ROOT_ID, b"ld").attr.ino == os.lstat(tmp / "lower" / "ld").st_ino


def test_rmdir_of_an_empty_upper_only_directory_is_one_rmdir(env, monkeypatch):
    """rm -rf of a tree made through the mount: a directory with no lower name to hide
    goes with one ``rmdir`` (as the kernel's ``ovl_remove_upper``), not a rename into the
    workdir and a removal there. One that holds only whiteouts (an image layer's) still
    goes (the workdir way), and one with entries is ENOTEMPTY, both unchanged."""
    drv, tmp = env
    moves: Counter[str] = Counter()
    real = layer.do_rename

    def counting(*args, **kwargs):
        moves["rename"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr("overlaypc.namespace.do_rename", counting)
    u = _node(drv, ROOT_ID, "u")
    drv.ops.mkdir(REQ, u, b"e", 0o755)
    drv.ops.rmdir(REQ, u, b"e")
    assert moves["rename"] == 0, moves
    assert not (tmp / "upper" / "u" / "e").exists()
    assert drv.ops.lookup(REQ, u, b"e").nodeid == 0
    up = tmp / "upper" / "u"
    (up / "w").mkdir()
    os.mknod(up / "w" / "gone", stat.S_IFCHR | 0o600, 0)  # a whiteout: hides nothing here
    (up / "full").mkdir()
    (up / "full" / "x").write_bytes(b"x")
    with pytest.raises(OSError) as e:
        drv.ops.rmdir(REQ, u, b"full")
    assert e.value.errno == errno.ENOTEMPTY
    assert (up / "full" / "x").read_bytes() == b"x"
    drv.ops.rmdir(REQ, u, b"w")
    assert not (up / "w").exists()
    assert os.listdir(tmp / "work" / "work") == []


def test_setattr_of_an_upper_file_looks_it_up_once(env, calls, monkeypatch):
    """untar's three SETATTRs of every file (utimens, chown with the kill flag, chmod) of
    an upper file: one lookup each, for the copy-up check, the privileges and the reply
    (its stat read again); the chown opens nothing when the lookup shows nothing to
    strip. Each reply is the file's real state after the change."""
    drv, tmp = env
    opens: Counter[str] = Counter()
    real_open = layer.Layer.open

    def counting(self, rel, flags, mode=0):
        if not flags & os.O_PATH:  # (chown, chmod, utime by an O_PATH fd: review24)
            opens[rel] += 1
        return real_open(self, rel, flags, mode)
    monkeypatch.setattr(layer.Layer, "open", counting)
    u = _node(drv, ROOT_ID, "u")
    path = tmp / "upper" / "u" / "f"
    path.write_bytes(b"f")
    f = _node(drv, u, "f")
    t = 1_600_000_000
    for sa in (SetAttr(p.FATTR_MTIME, None, 0, None, t * 10**9, 0, 0, 0),
               SetAttr(p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID, None, 0, None, None, 0, 0, 0),
               SetAttr(p.FATTR_MODE, None, 0, None, None, 0o600, 0, 0)):
        calls.clear()
        opens.clear()
        reply = drv.ops.setattr(REQ, f, sa)
        assert calls["lookup"] == 1, (sa, calls)
        _same(reply.attr, os.lstat(path))
        if sa.valid & p.FATTR_KILL_SUIDGID:
            assert opens == {}, opens
    assert stat.S_IMODE(reply.attr.mode) == 0o600 and reply.attr.mtime_ns == t * 10**9
    # a setuid file: the chown with the kill flag strips the bit (and says so)
    os.chmod(path, 0o4755)
    reply = drv.ops.setattr(REQ, f, SetAttr(p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID,
                                            None, 0, None, None, 0, 0, 0))
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o755
    _same(reply.attr, os.lstat(path))


def test_create_and_unlink_in_a_lower_directory_copy_it_up_first(env, calls):
    """A parent without an upper copy: the name is checked before the copy-up (a doomed
    change copies nothing up), then again under the lock."""
    drv, tmp = env
    ld = _node(drv, ROOT_ID, "ld")
    with pytest.raises(OSError) as e:
        drv.ops.unlink(REQ, ld, b"missing")
    assert e.value.errno == errno.ENOENT
    assert not (tmp / "upper" / "ld").exists()
    with pytest.raises(FileExistsError):
        drv.ops.create(REQ, ld, b"f0", os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IFREG | 0o644)
    assert not (tmp / "upper" / "ld").exists()
    entry, opened = drv.ops.create(REQ, ld, b"new", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                   stat.S_IFREG | 0o644)
    _same(entry.attr, os.lstat(tmp / "upper" / "ld" / "new"))
    drv.ops.release(REQ, entry.nodeid, opened.fh)


def test_link_to_an_existing_name_copies_nothing_up(env):
    """LINK onto a name that exists, in a directory that has its upper copy: EEXIST, and
    the source (a lower file) is not copied up first: a failed link leaves the upper as
    it was (the check before the copy-up must not be skipped for link, whose copy-up is
    the source's, not the parent's)."""
    drv, tmp = env
    u = _node(drv, ROOT_ID, "u")
    ld = _node(drv, ROOT_ID, "ld")
    f0 = _node(drv, ld, "f0")
    (tmp / "upper" / "u" / "taken").write_bytes(b"t")
    with pytest.raises(FileExistsError):
        drv.ops.link(REQ, f0, u, b"taken")
    assert not (tmp / "upper" / "ld").exists(), os.listdir(tmp / "upper" / "ld")
    assert (tmp / "upper" / "u" / "taken").read_bytes() == b"t"


def test_copy_up_builds_the_file_through_its_fd_and_fsyncs_it_complete(env, calls, monkeypatch):
    """chmod -R of a lower tree: each SETATTR copies a file up. The copy is built through
    the fd it is created with (owner, xattrs, origin, mode, times: no path walk per step,
    ``workdir/work`` held open), the lookup the request made is not repeated before the
    copy-up's own check under the object's lock, and the copy's fsync comes once it is
    complete, so it makes its metadata durable with its data, before the rename. The
    reply and the copy are the file's real state."""
    drv, tmp = env
    lf = tmp / "lower" / "ld" / "f3"
    os.chown(lf, 1234, 5678)
    os.chmod(lf, 0o2755)
    os.setxattr(lf, "user.note", b"kept")
    os.utime(lf, ns=(1_500_000_000 * 10**9, 1_600_000_000 * 10**9))
    ld = _node(drv, ROOT_ID, "ld")
    drv.ops.unlink(REQ, ld, b"f0")  # copies the parent up: only the file's copy-up is left
    f = _node(drv, ld, "f3")
    opened: list[str] = []
    real_openat2 = layer.sysapi.openat2

    def counting_openat2(dirfd, path, flags, mode=0, *args):
        opened.append(path)
        return real_openat2(dirfd, path, flags, mode, *args)
    monkeypatch.setattr(layer.sysapi, "openat2", counting_openat2)
    synced: list[os.stat_result] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.fstat(fd))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    calls.clear()
    reply = drv.ops.setattr(REQ, f, SetAttr(p.FATTR_MODE, None, 0, None, None, 0o2750, 0, 0))
    monkeypatch.undo()
    uf = tmp / "upper" / "ld" / "f3"
    st = os.lstat(uf)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2750, 1234, 5678)
    assert st.st_mtime_ns == 1_600_000_000 * 10**9
    assert os.getxattr(uf, "user.note") == b"kept"
    assert os.getxattr(uf, "trusted.overlay.origin")
    _same(reply.attr, st)
    assert reply.attr.ino == os.lstat(lf).st_ino  # the origin's number
    assert os.listdir(tmp / "work" / "work") == []
    # the copy's fsync saw it complete, the chmod's mode in it (copyup50: the copy-up makes a
    # chmod alone of a lower file, in the chmod every copy gets; before, the lower's 0o2755)
    copy = [s for s in synced if stat.S_ISREG(s.st_mode)]
    assert len(copy) == 1, synced
    assert (stat.S_IMODE(copy[0].st_mode), copy[0].st_uid, copy[0].st_gid,
            copy[0].st_mtime_ns) == (0o2750, 1234, 5678, 1_600_000_000 * 10**9), copy[0]
    assert len(synced) == 2 and stat.S_ISDIR(synced[1].st_mode)  # then the parent's
    # opens: the temporary file, the source, the parent to fsync, the chmod's O_PATH
    assert len(opened) <= 4, opened
    assert calls["lookup"] <= 3, calls
    assert calls["decode"] == 0, calls  # the copy-up told the origin's number


def test_listing_of_an_upper_directory_walks_no_path_for_origins(env, calls):
    """rm -rf after untar: READDIRPLUS of an upper directory whose subdirectories'
    numbers are not known yet reads their origin xattrs through the listed directory's
    fd (one call each), with no path walk; the numbers are their own."""
    drv, tmp = env
    up = tmp / "upper" / "u"
    for i in range(5):
        (up / f"sub{i}").mkdir()
    u = _node(drv, ROOT_ID, "u")
    calls.clear()
    fh = drv.ops.opendir(REQ, u).fh
    items = [i for i in drv.ops.readdir(REQ, u, fh, 0, True) if i.name not in (b".", b"..")]
    drv.ops.releasedir(REQ, u, fh)
    assert calls["walk"] == 0, calls
    for item in items:
        assert item.ino == os.lstat(up / os.fsdecode(item.name)).st_ino
        if item.take is not None:
            taken = item.take()
            if taken is not None:
                drv.ops.forget(taken.nodeid, 1)
    assert len(items) == 5


def test_copy_up_after_a_change_since_the_callers_lookup_looks_again(env, monkeypatch):
    """The caller's lookup stands in for the copy-up's own only while no change ran
    since (``copyup.Seen``): a file another request copied up meanwhile is found
    copied, and not built a second time."""
    from overlaypc import copyup
    drv, tmp = env
    fs = drv.fs
    fs.copyup.ensure_upper("ld")
    epoch = fs.lookup.epoch
    node = fs.lookup.lookup("ld/f5")
    assert node.upper is None
    first = fs.copyup.ensure_upper("ld/f5")  # another request, in between
    builds: list[str] = []
    real = copyup.CopyUp._build
    monkeypatch.setattr(copyup.CopyUp, "_build", lambda self, ctx: (builds.append(ctx.node.rel), real(self, ctx)))
    again = fs.copyup.ensure_upper("ld/f5", seen=copyup.Seen(node, epoch))
    assert builds == []
    assert again.st.st_ino == first.st.st_ino == os.lstat(tmp / "upper" / "ld" / "f5").st_ino
    # unchanged since: the caller's node is used, and the copy is built once
    epoch = fs.lookup.epoch
    node = fs.lookup.lookup("ld/f6")
    made = fs.copyup.ensure_upper("ld/f6", seen=copyup.Seen(node, epoch))
    assert builds == ["ld/f6"]
    assert made.st.st_ino == os.lstat(tmp / "upper" / "ld" / "f6").st_ino
    assert os.listdir(tmp / "work" / "work") == []


def test_capability_of_an_open_file_makes_no_path(env, calls, monkeypatch):
    """GETXATTR ``security.capability`` of an open upper file (untar: before the write and
    the chown of each file): its handle answers, so no path is made and nothing looked up;
    the answers are the file's (ENODATA, then its capability once one is set)."""
    drv, tmp = env
    u = _node(drv, ROOT_ID, "u")
    entry, opened = drv.ops.create(REQ, u, b"f", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                   stat.S_IFREG | 0o644)
    paths: Counter[int] = Counter()
    real_path = nodes.NodeTable.path

    def path(self, nodeid):
        paths[nodeid] += 1
        return real_path(self, nodeid)
    monkeypatch.setattr(nodes.NodeTable, "path", path)
    calls.clear()
    for _ in range(2):  # (the second: known clean, as the first found it)
        with pytest.raises(OSError) as e:
            drv.ops.getxattr(REQ, entry.nodeid, "security.capability")
        assert e.value.errno == errno.ENODATA
    assert paths == {} and calls["lookup"] == 0, (paths, calls)
    cap = bytes.fromhex("0100000200000000000000000000000000000000")  # v2, no bits
    os.setxattr(tmp / "upper" / "u" / "f", "security.capability", cap)
    drv.ops.setxattr(REQ, entry.nodeid, "user.x", b"1", 0)  # (voids the clean mark)
    assert drv.ops.getxattr(REQ, entry.nodeid, "security.capability") == cap
    monkeypatch.undo()
    drv.ops.release(REQ, entry.nodeid, opened.fh)
    drv.ops.forget(entry.nodeid, 1)
