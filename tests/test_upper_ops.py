"""Writable upper layer (issue 4): each mutating operation, mounted, checked in the merged
view AND in the backing dirs (upper, lower, workdir/work).

Layout of this file: copy-up per operation; ancestors; sparse files; ownership; namespace
ops (mknod, mkdir, symlink, link, unlink, rmdir, rename, renameat2, reserved names,
read-only mounts); data ops; inode numbers; hard links in kernel cache mode; unlink of
open files; ``-o volatile``; interoperability of the upper with the kernel's overlayfs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import threading
from pathlib import Path

import pytest

import helpers
from helpers import Dir, File, Symlink
from upper_support import (NOBODY, RENAME_EXCHANGE, RENAME_NOREPLACE, fuse_hidden, is_whiteout,
                           link_groups, make_stack, overlay_stats, renameat2, run_as,
                           stack_options, work_leftovers, xattr_dict)

pytestmark = pytest.mark.mount

T_LOWER = 1_500_000_000_123_456_789      # lower mtimes, ns precision
T_DIR = 1_400_000_000_987_654_321
CONTENT = b"lower data line\n" * 64       # 1 KiB
PRIVATE_ON_LOWER = {"trusted.overlay.junk": b"j", "user.overlay.junk": b"u",
                    "trusted.overlaypc.junk": b"p"}
USER_XATTRS = {"user.color": b"red", "user.note": b"lower note"}
ACL_ENTRY = "u:4321:r"
F_OWNER = (1234, 5678)

LOWER = {
    "f.txt": File(CONTENT, mode=0o640, xattrs=USER_XATTRS),
    "other.txt": File("other lower\n", mode=0o644),
    "third.txt": File("third lower\n"),
    "a/b/c/deep.txt": File("deep\n", mode=0o600),
    "merged/l1.txt": "l1",
    "merged/l2.txt": "l2",
    "ldir/x.txt": "x",
    "ldir/sub/y.txt": "y",
    "pub": Dir({}, mode=0o777),
    "sg": Dir({}, mode=0o2777),
    "suid": File("#!/bin/sh\nexit 0\n", mode=0o6777),
    "link_to_f": Symlink("f.txt"),
}

# rel -> (uid, gid, mode or None, mtime_ns); applied deepest first, after the tree is built
LOWER_META = {
    "f.txt": (*F_OWNER, None, T_LOWER),
    "other.txt": (0, 0, None, T_LOWER + 1),
    "third.txt": (0, 0, None, T_LOWER + 2),
    "a": (1001, 1002, 0o751, T_DIR),
    "a/b": (1003, 1004, 0o705, T_DIR + 1),
    "a/b/c": (1005, 1006, 0o770, T_DIR + 2),
    "a/b/c/deep.txt": (1007, 1008, None, T_LOWER + 3),
    "merged": (0, 0, None, T_DIR + 3),
    "sg": (0, 4242, 0o2777, T_DIR + 4),
    "pub": (0, 0, 0o777, T_DIR + 5),
}
DIR_XATTRS = {"a": {"user.dir": b"a"}, "a/b": {"user.dir": b"ab"}, "a/b/c": {"user.dir": b"abc"}}


def prepare_lower(layers) -> None:
    lower = layers.paths[0]
    for rel, value in DIR_XATTRS.items():
        for k, v in value.items():
            os.setxattr(lower / rel, k, v)
    for k, v in PRIVATE_ON_LOWER.items():
        os.setxattr(lower / "f.txt", k, v)
    subprocess.run(["setfacl", "-m", ACL_ENTRY, str(lower / "f.txt")], check=True)
    for rel in sorted(LOWER_META, key=lambda r: -r.count("/")):
        uid, gid, mode, mtime = LOWER_META[rel]
        p = lower / rel
        os.chown(p, uid, gid)
        if mode is not None:
            os.chmod(p, mode)
        os.utime(p, ns=(mtime, mtime))


@pytest.fixture
def stk(layers_factory, overlay_mount):
    """The standard stack: one lower (LOWER, with owners/times/xattrs/ACL), empty upper."""
    return make_stack(layers_factory, overlay_mount, {"lower": LOWER}, prepare=prepare_lower)


def snapshot_lower(s):
    return helpers.dir_state(s.lower)


def assert_clean_work(s) -> None:
    assert work_leftovers(s.work) == [], "workdir/work not empty"


def private_names(names) -> list[str]:
    return [n for n in names if n.startswith(helpers.PRIVATE_XATTR_PREFIXES + ("trusted.overlaypc.",
                                                                               "user.overlaypc."))]


# ======================================================================================
# Copy-up, one operation at a time
# ======================================================================================

WRITTEN = b"WRITTEN"
NEW_TIMES = (1_600_000_000_111_111_111, 1_300_000_000_222_222_222)   # (atime, mtime)


def _write(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        assert os.pwrite(fd, WRITTEN, 0) == len(WRITTEN)
    finally:
        os.close(fd)


COPY_UP_OPS = {
    # name: (action on merged path, name of the object afterwards)
    "open_wronly": (lambda p: os.close(os.open(p, os.O_WRONLY)), "f.txt"),
    "open_rdwr": (lambda p: os.close(os.open(p, os.O_RDWR)), "f.txt"),
    "o_trunc": (lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)), "f.txt"),
    "truncate": (lambda p: os.truncate(p, 4), "f.txt"),
    "write": (_write, "f.txt"),
    "chmod": (lambda p: os.chmod(p, 0o604), "f.txt"),
    "chown": (lambda p: os.chown(p, 2222, 3333), "f.txt"),
    "utimens": (lambda p: os.utime(p, ns=NEW_TIMES), "f.txt"),
    "setxattr": (lambda p: os.setxattr(p, "user.new", b"new value"), "f.txt"),
    "removexattr": (lambda p: os.removexattr(p, "user.note"), "f.txt"),
    "link": (lambda p: os.link(p, p.parent / "f.link"), "f.txt"),
    "rename": (lambda p: os.rename(p, p.parent / "g.txt"), "g.txt"),
}


def expected_after(op: str, lower_st: os.stat_result) -> dict:
    content = {"o_trunc": b"", "truncate": CONTENT[:4],
               "write": WRITTEN + CONTENT[len(WRITTEN):]}.get(op, CONTENT)
    mode = 0o604 if op == "chmod" else stat.S_IMODE(lower_st.st_mode)
    owner = (2222, 3333) if op == "chown" else F_OWNER
    xattrs = dict(USER_XATTRS)
    if op == "setxattr":
        xattrs["user.new"] = b"new value"
    if op == "removexattr":
        del xattrs["user.note"]
    mtime = {"utimens": NEW_TIMES[1]}.get(op, T_LOWER)
    mtime_changes = op in ("o_trunc", "truncate", "write")
    return dict(content=content, mode=mode, owner=owner, xattrs=xattrs, mtime=mtime,
                mtime_changes=mtime_changes)


@pytest.mark.parametrize("op", list(COPY_UP_OPS))
def test_copy_up_by_operation(stk, op):
    action, name = COPY_UP_OPS[op]
    lower_before = snapshot_lower(stk)
    lower_st = os.lstat(stk.lo("f.txt"))
    lower_acl = os.getxattr(stk.lo("f.txt"), "system.posix_acl_access")
    merged_ino = os.lstat(stk.m("f.txt")).st_ino
    assert not os.path.lexists(stk.u("f.txt"))

    action(stk.m("f.txt"))

    exp = expected_after(op, lower_st)
    up, mp = stk.u(name), stk.m(name)
    assert up.is_file() and not up.is_symlink(), f"{op}: no regular file {name} in upper"
    ust, mst = os.lstat(up), os.lstat(mp)
    for where, st_, path in (("upper", ust, up), ("merged", mst, mp)):
        assert path.read_bytes() == exp["content"], f"{op}: {where} content"
        assert stat.S_IMODE(st_.st_mode) == exp["mode"], f"{op}: {where} mode {oct(st_.st_mode)}"
        assert (st_.st_uid, st_.st_gid) == exp["owner"], f"{op}: {where} owner"
        if exp["mtime_changes"]:
            assert st_.st_mtime_ns != T_LOWER, f"{op}: {where} mtime not updated"
        else:
            assert st_.st_mtime_ns == exp["mtime"], \
                f"{op}: {where} mtime {st_.st_mtime_ns} != {exp['mtime']} (ns precision)"
    if op == "utimens":
        assert ust.st_atime_ns == NEW_TIMES[0] and mst.st_atime_ns == NEW_TIMES[0]

    # xattrs: user ones and the ACL copied; lower-private ones neither copied nor visible
    ux = xattr_dict(up)
    user = {k: v for k, v in ux.items() if k.startswith("user.")
            and not k.startswith(("user.overlay.", "user.overlaypc."))}
    assert user == exp["xattrs"], f"{op}: upper user xattrs"
    assert "system.posix_acl_access" in ux, f"{op}: POSIX ACL lost in copy-up"
    if op != "chmod":  # chmod rewrites the ACL mask, as on any filesystem
        assert ux["system.posix_acl_access"] == lower_acl, f"{op}: ACL changed by copy-up"
    for k in PRIVATE_ON_LOWER:
        assert ux.get(k) != PRIVATE_ON_LOWER[k], f"{op}: lower-private {k} copied to upper"
    mnames = os.listxattr(mp)
    assert private_names(mnames) == [], f"{op}: private xattrs listed through the mount"
    assert {n for n in mnames if n.startswith("user.")} == set(exp["xattrs"])
    for k in [*PRIVATE_ON_LOWER, "trusted.overlay.origin"]:
        with pytest.raises(OSError) as ei:
            os.getxattr(mp, k)
        assert ei.value.errno == errno.ENODATA, f"{op}: getxattr {k} through the mount"

    # identity: the inode number survives copy-up
    assert mst.st_ino == merged_ino, f"{op}: st_ino changed by copy-up"

    # op-specific shape of the upper
    if op == "link":
        assert os.lstat(stk.u("f.link")).st_ino == ust.st_ino
        assert ust.st_nlink == 2 and mst.st_nlink == 2
        assert os.lstat(stk.m("f.link")).st_ino == mst.st_ino
    if op == "rename":
        assert is_whiteout(stk.u("f.txt")), "rename of a lower file left no whiteout"
        assert not os.path.lexists(stk.m("f.txt"))

    assert snapshot_lower(stk) == lower_before, f"{op}: lower layer changed"
    assert_clean_work(stk)


# --------------------------------------------------------------------------------------
# utimens: UTIME_NOW / UTIME_OMIT (docs/ARCHITECTURE.md §6 trap 11)
# --------------------------------------------------------------------------------------

A_OLD, M_OLD = 1_650_000_000_555_555_555, 1_550_000_000_444_444_444


@pytest.mark.parametrize("origin", ["lower", "upper"])
def test_touch_m_and_touch_a_change_only_what_they_name(stk, origin):
    name = "third.txt" if origin == "lower" else "fresh.txt"
    if origin == "upper":
        stk.m(name).write_bytes(b"fresh")
    os.utime(stk.m(name), ns=(A_OLD, M_OLD))      # copies a lower file up, with ns precision
    st0 = os.stat(stk.m(name))
    assert (st0.st_atime_ns, st0.st_mtime_ns) == (A_OLD, M_OLD)
    subprocess.run(["touch", "-m", str(stk.m(name))], check=True)
    st1 = os.stat(stk.m(name))
    assert st1.st_atime_ns == A_OLD, "touch -m changed atime (UTIME_OMIT not honoured)"
    assert st1.st_mtime_ns > M_OLD + 10**18 // 10, f"touch -m set mtime {st1.st_mtime_ns}, not now"
    subprocess.run(["touch", "-a", str(stk.m(name))], check=True)
    st2 = os.stat(stk.m(name))
    assert st2.st_mtime_ns == st1.st_mtime_ns, "touch -a changed mtime (UTIME_OMIT not honoured)"
    assert st2.st_atime_ns > A_OLD, "touch -a did not set atime to now"
    ust = os.stat(stk.u(name))
    assert (ust.st_atime_ns, ust.st_mtime_ns) == (st2.st_atime_ns, st2.st_mtime_ns)
    if origin == "lower":
        assert os.stat(stk.lo(name)).st_mtime_ns == T_LOWER + 2


def test_touch_plain_on_lower_file(stk):
    subprocess.run(["touch", str(stk.m("other.txt"))], check=True)
    st_ = os.stat(stk.m("other.txt"))
    assert st_.st_mtime_ns > T_LOWER and st_.st_atime_ns > T_LOWER
    assert os.stat(stk.u("other.txt")).st_mtime_ns == st_.st_mtime_ns
    assert os.stat(stk.lo("other.txt")).st_mtime_ns == T_LOWER + 1


# --------------------------------------------------------------------------------------
# security.capability: kept by copy-up, cleared by a data write
# --------------------------------------------------------------------------------------

# VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, permitted = CAP_NET_BIND_SERVICE
CAP_XATTR = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def _set_cap(layers):
    os.setxattr(layers.paths[0] / "capfile", "security.capability", CAP_XATTR)


def test_capability_kept_by_copy_up_cleared_by_write(layers_factory, overlay_mount):
    s = make_stack(layers_factory, overlay_mount,
                   {"lower": {"capfile": File(b"\x7fELF fake", mode=0o755)}}, prepare=_set_cap)
    os.setxattr(s.m("capfile"), "user.trigger", b"1")           # metadata copy-up
    assert os.getxattr(s.u("capfile"), "security.capability") == CAP_XATTR
    assert os.getxattr(s.m("capfile"), "security.capability") == CAP_XATTR
    fd = os.open(s.m("capfile"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"more")
    finally:
        os.close(fd)
    for where in (s.m("capfile"), s.u("capfile")):
        assert "security.capability" not in os.listxattr(where), f"{where}: write kept file caps"
    assert os.getxattr(s.lo("capfile"), "security.capability") == CAP_XATTR


# --------------------------------------------------------------------------------------
# One copy-up per inode; leftovers in workdir/work
# --------------------------------------------------------------------------------------

def test_racing_opens_copy_up_once(stk):
    before = sum(overlay_stats(stk.mnt)["copy_ups"].values())
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def opener(i: int) -> None:
        try:
            barrier.wait()
            fd = os.open(stk.m("f.txt"), os.O_RDWR)
            try:
                os.pwrite(fd, bytes([65 + i]), i)
            finally:
                os.close(fd)
        except BaseException as e:  # reported below
            errors.append(e)

    helpers.run_threads(opener, 8)
    assert not errors, errors
    after = sum(overlay_stats(stk.mnt)["copy_ups"].values())
    assert after - before == 1, f"{after - before} copy-ups for one file"
    data = stk.m("f.txt").read_bytes()
    assert data[:8] == b"ABCDEFGH" and data[8:] == CONTENT[8:], "a write was lost"
    assert stk.lo("f.txt").read_bytes() == CONTENT
    assert_clean_work(stk)


def test_workdir_leftovers_removed_at_mount(layers_factory, overlay_mount):
    layers = layers_factory({"lower": {"f": "f"}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    os.makedirs(work / "work" / "#ovlpc-old-dir" / "inner")
    (work / "work" / "#ovlpc-old-file").write_bytes(b"half a copy-up")
    m = overlay_mount(stack_options(layers.paths, upper, work), allow_daemon_errors=True)
    assert work_leftovers(work) == []
    assert sorted(os.listdir(m.path)) == ["f"]
    assert os.listdir(upper) == []


def test_copy_up_records_origin(stk):
    """The kernel's format: trusted.overlay.origin on the copied-up file (docs/ARCHITECTURE.md §4)."""
    os.chmod(stk.m("f.txt"), 0o600)
    assert "trusted.overlay.origin" in os.listxattr(stk.u("f.txt"))
    assert "trusted.overlay.origin" not in os.listxattr(stk.m("f.txt"))


def test_private_xattrs_refused_through_mount(stk):
    for name in ("trusted.overlay.opaque", "trusted.overlay.origin", "user.overlay.x"):
        with pytest.raises(OSError) as ei:
            os.setxattr(stk.m("other.txt"), name, b"y")
        assert ei.value.errno in (errno.EPERM, errno.EOPNOTSUPP), name
    assert not os.path.lexists(stk.u("other.txt"))


def test_copy_up_preserves_fresh_lower_read_handle(stk):
    """An fd opened read-only before copy-up sees the new data (docs/ARCHITECTURE.md §1)."""
    fr = os.open(stk.m("f.txt"), os.O_RDONLY)
    try:
        assert os.pread(fr, 16, 0) == CONTENT[:16]
        _write(stk.m("f.txt"))
        assert os.pread(fr, len(WRITTEN), 0) == WRITTEN
    finally:
        os.close(fr)


# --------------------------------------------------------------------------------------
# Ancestors
# --------------------------------------------------------------------------------------

ANCESTOR_OPS = {
    "write": lambda s: _write(s.m("a/b/c/deep.txt")),
    "chmod": lambda s: os.chmod(s.m("a/b/c/deep.txt"), 0o644),
    "create": lambda s: s.m("a/b/c/new.txt").write_bytes(b"new"),
    "setxattr_on_dir": lambda s: os.setxattr(s.m("a/b/c"), "user.more", b"1"),
}


@pytest.mark.parametrize("op", list(ANCESTOR_OPS))
def test_ancestors_copied_up_with_metadata(stk, op):
    lower_before = snapshot_lower(stk)
    ANCESTOR_OPS[op](stk)
    for rel in ("a", "a/b", "a/b/c"):
        lst, ust, mst = os.lstat(stk.lo(rel)), os.lstat(stk.u(rel)), os.lstat(stk.m(rel))
        assert stat.S_ISDIR(ust.st_mode), f"{rel} not a directory in upper"
        for where, st_ in (("upper", ust), ("merged", mst)):
            assert stat.S_IMODE(st_.st_mode) == stat.S_IMODE(lst.st_mode), f"{where} {rel} mode"
            assert (st_.st_uid, st_.st_gid) == (lst.st_uid, lst.st_gid), f"{where} {rel} owner"
            if not (op == "create" and rel == "a/b/c"):  # a new entry updates its dir's mtime
                assert st_.st_mtime_ns == lst.st_mtime_ns, \
                    f"{where} {rel}: mtime {st_.st_mtime_ns} != lower {lst.st_mtime_ns}"
        exp = dict(DIR_XATTRS[rel])
        if op == "setxattr_on_dir" and rel == "a/b/c":
            exp["user.more"] = b"1"
        got = {k: v for k, v in xattr_dict(stk.u(rel)).items() if k.startswith("user.")}
        assert got == exp, f"{rel}: upper xattrs"
        assert not os.lstat(stk.u(rel)).st_mode & 0o7000 & ~stat.S_IMODE(lst.st_mode)
    if op == "create":
        assert os.lstat(stk.m("a/b/c")).st_mtime_ns != T_DIR + 2
    assert snapshot_lower(stk) == lower_before
    assert_clean_work(stk)


# --------------------------------------------------------------------------------------
# Sparse files
# --------------------------------------------------------------------------------------

SPARSE_SIZE = 64 << 20
SPARSE_DATA_AT = 24 << 20


def _sparse_prepare(layers):
    p = layers.paths[0] / "sparse.bin"
    with open(p, "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_DATA_AT)
        f.write(b"\xab" * 4096)


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("trigger", ["chmod", "open_rdwr"])
def test_sparse_file_stays_sparse(layers_factory, overlay_mount, trigger):
    s = make_stack(layers_factory, overlay_mount, {"lower": {}}, prepare=_sparse_prepare)
    lower_blocks = os.stat(s.lo("sparse.bin")).st_blocks
    assert lower_blocks * 512 < 1 << 20, "test set-up: lower is not sparse"
    if trigger == "chmod":
        os.chmod(s.m("sparse.bin"), 0o600)
    else:
        os.close(os.open(s.m("sparse.bin"), os.O_RDWR))
    ust = os.stat(s.u("sparse.bin"))
    assert ust.st_size == SPARSE_SIZE
    assert ust.st_blocks * 512 < 1 << 20, \
        f"copy-up filled the holes: {ust.st_blocks * 512} bytes allocated for 4 KiB of data"
    assert _sha(s.m("sparse.bin")) == _sha(s.lo("sparse.bin"))
    assert_clean_work(s)


def _small_sparse_prepare(layers):
    """Two files at the edge of copy-up's "no room for a hole" test (``_copy_data``): one
    block of data then a hole of two (fewer bytes allocated than its size: its holes are
    looked for), and three blocks written whole (no room for a hole: copied as one segment)."""
    with open(layers.paths[0] / "holey.bin", "wb") as f:
        f.write(b"\xcd" * 4096)
        f.truncate(3 * 4096)
    with open(layers.paths[0] / "dense.bin", "wb") as f:
        f.write(b"\xef" * (3 * 4096 - 5))


def test_small_sparse_file_stays_sparse_dense_one_whole(layers_factory, overlay_mount):
    """copyup49's dense test skips SEEK_DATA/SEEK_HOLE only where the source's blocks cover
    its size: a small file with a hole still gets a copy with the hole."""
    s = make_stack(layers_factory, overlay_mount, {"lower": {}}, prepare=_small_sparse_prepare)
    holey = os.stat(s.lo("holey.bin"))
    assert holey.st_blocks * 512 < holey.st_size, "test set-up: the lower file has no hole"
    dense = os.stat(s.lo("dense.bin"))
    assert dense.st_blocks * 512 >= dense.st_size, "test set-up: the lower file has a hole"
    for name in ("holey.bin", "dense.bin"):
        os.chmod(s.m(name), 0o600)
    ust = os.stat(s.u("holey.bin"))
    assert ust.st_size == 3 * 4096
    with open(s.u("holey.bin"), "rb") as f:  # the hole is where the source's is
        fd = f.fileno()
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4096, "copy-up filled the small file's hole"
    for name in ("holey.bin", "dense.bin"):
        assert _sha(s.m(name)) == _sha(s.lo(name)) == _sha(s.u(name))
        assert os.stat(s.u(name)).st_size == os.stat(s.lo(name)).st_size
    assert_clean_work(s)


# ======================================================================================
# Ownership
# ======================================================================================

# runs with the target dir as cwd: pytest's tmp dirs (0700) are not searchable by others
CREATE_ALL = """
d = "."
with open(os.path.join(d, "file"), "w") as f:
    f.write("by nobody")
os.mkdir(os.path.join(d, "dir"), 0o755)
os.symlink("file", os.path.join(d, "sym"))
os.mkfifo(os.path.join(d, "fifo"), 0o644)
os.mknod(os.path.join(d, "node"), stat.S_IFIFO | 0o600)
import socket
s = socket.socket(socket.AF_UNIX)
s.bind(os.path.join(d, "sock"))
s.close()
"""
CREATED = ("file", "dir", "sym", "fifo", "node", "sock")


def test_created_objects_belong_to_caller(stk):
    run_as(CREATE_ALL, uid=NOBODY, gid=NOBODY, cwd=stk.m("pub"))
    for name in CREATED:
        for where in (stk.m("pub/" + name), stk.u("pub/" + name)):
            st_ = os.lstat(where)
            assert (st_.st_uid, st_.st_gid) == (NOBODY, NOBODY), f"{where}: {st_.st_uid}:{st_.st_gid}"
    assert stat.S_ISFIFO(os.lstat(stk.u("pub/fifo")).st_mode)
    assert stat.S_ISSOCK(os.lstat(stk.u("pub/sock")).st_mode)
    assert os.readlink(stk.u("pub/sym")) == "file"
    assert stat.S_IMODE(os.lstat(stk.u("pub/file")).st_mode) == 0o644  # umask 022 applied
    assert stat.S_IMODE(os.lstat(stk.u("pub/dir")).st_mode) == 0o755
    assert_clean_work(stk)


def test_created_objects_belong_to_caller_in_new_dir(stk):
    """Also when the parent was created through the mount (upper-only), and with a gid
    different from the uid."""
    os.mkdir(stk.m("newpub"))
    os.chmod(stk.m("newpub"), 0o777)
    run_as(CREATE_ALL, uid=4000, gid=4001, cwd=stk.m("newpub"))
    for name in CREATED:
        st_ = os.lstat(stk.u("newpub/" + name))
        assert (st_.st_uid, st_.st_gid) == (4000, 4001), name


def test_setgid_directory_inheritance(stk):
    run_as(CREATE_ALL, uid=NOBODY, gid=NOBODY, cwd=stk.m("sg"))
    assert stat.S_IMODE(os.lstat(stk.u("sg")).st_mode) == 0o2777, "setgid lost in copy-up"
    assert os.lstat(stk.u("sg")).st_gid == 4242
    for name in CREATED:
        for where in (stk.m("sg/" + name), stk.u("sg/" + name)):
            st_ = os.lstat(where)
            assert (st_.st_uid, st_.st_gid) == (NOBODY, 4242), f"{where}: {st_.st_uid}:{st_.st_gid}"
    for where in (stk.m("sg/dir"), stk.u("sg/dir")):
        assert os.lstat(where).st_mode & stat.S_ISGID, f"{where}: subdir did not inherit setgid"


def test_setgid_inheritance_for_root_too(stk):
    os.mkdir(stk.m("sg/rootdir"))
    (stk.m("sg/rootfile")).write_bytes(b"x")
    for rel in ("sg/rootdir", "sg/rootfile"):
        assert os.lstat(stk.u(rel)).st_gid == 4242
    assert os.lstat(stk.u("sg/rootdir")).st_mode & stat.S_ISGID


def test_setgid_inheritance_follows_chmod_and_chgrp_of_the_parent(stk):
    """New objects see the parent's setgid bit and group as they are *now*: set through
    the mount after the directory was looked up (and cached), then cleared again."""
    for parent in ("pub", "newdir"):
        if parent == "newdir":
            os.mkdir(stk.m(parent), 0o777)
        os.listdir(stk.m(parent))
        os.chown(stk.m(parent), -1, 4242)
        os.chmod(stk.m(parent), 0o2777)
        os.mkdir(stk.m(f"{parent}/sub"))
        (stk.m(f"{parent}/file")).write_bytes(b"x")
        os.chmod(stk.m(parent), 0o777)
        os.mkdir(stk.m(f"{parent}/plain"))
        for rel in (f"{parent}/sub", f"{parent}/file"):
            assert os.lstat(stk.u(rel)).st_gid == 4242, rel
        assert os.lstat(stk.u(f"{parent}/sub")).st_mode & stat.S_ISGID, parent
        plain = os.lstat(stk.u(f"{parent}/plain"))
        assert plain.st_gid == os.getgid() and not plain.st_mode & stat.S_ISGID, parent


def test_write_by_non_owner_clears_suid_sgid(stk):
    assert stat.S_IMODE(os.lstat(stk.m("suid")).st_mode) == 0o6777
    run_as("""
fd = os.open("suid", os.O_WRONLY | os.O_APPEND)
os.write(fd, b"# appended by nobody\\n")
os.close(fd)
""", cwd=stk.mnt)
    for where in (stk.m("suid"), stk.u("suid")):
        mode = stat.S_IMODE(os.lstat(where).st_mode)
        assert mode & (stat.S_ISUID | stat.S_ISGID) == 0, f"{where}: mode {oct(mode)}"
    assert stk.m("suid").read_bytes().endswith(b"# appended by nobody\n")


def test_chown_by_root_to_other_user(stk):
    os.chown(stk.m("other.txt"), NOBODY, NOBODY)
    assert (os.lstat(stk.u("other.txt")).st_uid, os.lstat(stk.u("other.txt")).st_gid) == (NOBODY, NOBODY)
    os.chown(stk.m("link_to_f"), 77, 88, follow_symlinks=False)
    st_ = os.lstat(stk.u("link_to_f"))
    assert stat.S_ISLNK(st_.st_mode) and (st_.st_uid, st_.st_gid) == (77, 88)
    assert os.lstat(stk.lo("f.txt")).st_uid == F_OWNER[0]  # not followed


# ======================================================================================
# Namespace operations
# ======================================================================================

def test_mknod_fifo_and_devices(stk):
    os.mkfifo(stk.m("fifo"), 0o640)
    os.mknod(stk.m("chr"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(stk.m("blk"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.mknod(stk.m("ldir/reg"), stat.S_IFREG | 0o640)
    for base in (stk.mnt, stk.upper):
        assert stat.S_ISFIFO(os.lstat(base / "fifo").st_mode)
        assert stat.S_IMODE(os.lstat(base / "fifo").st_mode) == 0o640
        st_ = os.lstat(base / "chr")
        assert stat.S_ISCHR(st_.st_mode) and st_.st_rdev == os.makedev(1, 3)
        st_ = os.lstat(base / "blk")
        assert stat.S_ISBLK(st_.st_mode) and st_.st_rdev == os.makedev(7, 200)
        assert stat.S_ISREG(os.lstat(base / "ldir/reg").st_mode)
    assert stk.m("ldir/x.txt").read_bytes() == b"x"   # merged dir still merged
    # a device node through the mount works as a device
    with open(stk.m("chr"), "rb") as f:
        assert f.read(4) == b""   # /dev/null semantics
    assert_clean_work(stk)


def test_mkdir_and_symlink(stk):
    os.mkdir(stk.m("newdir"), 0o710)
    os.mkdir(stk.m("merged/sub"))
    os.symlink("../f.txt", stk.m("newdir/up"))
    os.symlink("/no/such/target", stk.m("dangling"))
    assert stat.S_IMODE(os.lstat(stk.u("newdir")).st_mode) == 0o710
    assert os.lstat(stk.u("merged/sub")).st_mode & stat.S_IFDIR
    assert os.readlink(stk.u("newdir/up")) == "../f.txt"
    assert os.readlink(stk.m("newdir/up")) == "../f.txt"
    assert stk.m("newdir/up").read_bytes() == CONTENT
    assert os.readlink(stk.m("dangling")) == "/no/such/target"
    # a new dir in a merged parent is opaque, as the kernel's under redirect_dir=on (the
    # default: offline changes of the lowers not allowed; test_opaque_new_dirs_kernel)
    assert "trusted.overlay.opaque" in os.listxattr(stk.u("newdir"))
    assert "trusted.overlay.opaque" in os.listxattr(stk.u("merged/sub"))
    with pytest.raises(FileExistsError):
        os.mkdir(stk.m("ldir"))
    with pytest.raises(FileExistsError):
        os.symlink("x", stk.m("f.txt"))
    assert_clean_work(stk)


def test_link_upper_file(stk):
    stk.m("u1").write_bytes(b"upper file")
    os.link(stk.m("u1"), stk.m("u2"))
    a, b = os.lstat(stk.m("u1")), os.lstat(stk.m("u2"))
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    assert os.lstat(stk.u("u1")).st_ino == os.lstat(stk.u("u2")).st_ino
    os.link(stk.m("u2"), stk.m("ldir/u3"))
    assert os.lstat(stk.m("u1")).st_nlink == 3
    os.unlink(stk.m("u1"))
    assert os.lstat(stk.m("u2")).st_nlink == 2
    assert not os.path.lexists(stk.u("u1")), "unlink of an upper-only name left something"


def test_link_lower_file_copies_up(stk):
    lower_before = snapshot_lower(stk)
    ino = os.lstat(stk.m("other.txt")).st_ino
    os.link(stk.m("other.txt"), stk.m("ldir/other.link"))
    a, b = os.lstat(stk.m("other.txt")), os.lstat(stk.m("ldir/other.link"))
    assert a.st_ino == b.st_ino == ino
    assert a.st_nlink == b.st_nlink == 2
    ua, ub = os.lstat(stk.u("other.txt")), os.lstat(stk.u("ldir/other.link"))
    assert ua.st_ino == ub.st_ino and ua.st_nlink == 2
    assert stk.m("ldir/other.link").read_bytes() == b"other lower\n"
    assert snapshot_lower(stk) == lower_before
    with pytest.raises(OSError) as ei:
        os.link(stk.m("ldir"), stk.m("ldir2"))
    assert ei.value.errno == errno.EPERM
    assert_clean_work(stk)


def test_unlink_lower_file_leaves_whiteout(stk):
    lower_before = snapshot_lower(stk)
    os.unlink(stk.m("f.txt"))
    assert not os.path.lexists(stk.m("f.txt"))
    assert "f.txt" not in os.listdir(stk.mnt)
    st_ = os.lstat(stk.u("f.txt"))
    assert stat.S_ISCHR(st_.st_mode) and st_.st_rdev == os.makedev(0, 0)
    assert snapshot_lower(stk) == lower_before
    # also after a copy-up: the upper copy is replaced by a whiteout
    os.chmod(stk.m("other.txt"), 0o600)
    os.unlink(stk.m("other.txt"))
    assert is_whiteout(stk.u("other.txt"))
    # and in a subdirectory (parent copied up)
    os.unlink(stk.m("ldir/sub/y.txt"))
    assert is_whiteout(stk.u("ldir/sub/y.txt"))
    assert os.listdir(stk.m("ldir/sub")) == []
    assert snapshot_lower(stk) == lower_before
    assert_clean_work(stk)


def test_unlink_upper_only_file_leaves_nothing(stk):
    stk.m("tmp.txt").write_bytes(b"t")
    os.unlink(stk.m("tmp.txt"))
    assert not os.path.lexists(stk.u("tmp.txt"))
    with pytest.raises(FileNotFoundError):
        os.unlink(stk.m("tmp.txt"))


def test_rmdir_merged_dir_whiteout_then_recreate_opaque(stk):
    lower_before = snapshot_lower(stk)
    stk.m("merged/u.txt").write_bytes(b"upper in merged")
    with pytest.raises(OSError) as ei:
        os.rmdir(stk.m("merged"))
    assert ei.value.errno == errno.ENOTEMPTY
    for name in ("l1.txt", "l2.txt", "u.txt"):
        os.unlink(stk.m("merged/" + name))
    assert os.listdir(stk.m("merged")) == []
    os.rmdir(stk.m("merged"))
    assert not os.path.lexists(stk.m("merged"))
    assert is_whiteout(stk.u("merged")), "rmdir of a merged dir left no whiteout"
    os.mkdir(stk.m("merged"), 0o750)
    ust = os.lstat(stk.u("merged"))
    assert stat.S_ISDIR(ust.st_mode) and stat.S_IMODE(ust.st_mode) == 0o750
    assert os.getxattr(stk.u("merged"), "trusted.overlay.opaque") == b"y"
    assert os.listdir(stk.m("merged")) == [], "recreated dir shows lower entries"
    assert os.listdir(stk.u("merged")) == []
    assert "trusted.overlay.opaque" not in os.listxattr(stk.m("merged"))
    assert snapshot_lower(stk) == lower_before
    assert_clean_work(stk)


def test_rmdir_lower_only_dir_and_upper_only_dir(stk):
    os.unlink(stk.m("ldir/sub/y.txt"))
    os.rmdir(stk.m("ldir/sub"))
    assert is_whiteout(stk.u("ldir/sub"))
    os.mkdir(stk.m("fresh"))
    os.rmdir(stk.m("fresh"))
    assert not os.path.lexists(stk.u("fresh"))
    with pytest.raises(NotADirectoryError):
        os.rmdir(stk.m("f.txt"))
    assert_clean_work(stk)


def test_recreate_file_over_whiteout(stk):
    os.unlink(stk.m("other.txt"))
    stk.m("other.txt").write_bytes(b"new one")
    assert stk.m("other.txt").read_bytes() == b"new one"
    assert stat.S_ISREG(os.lstat(stk.u("other.txt")).st_mode)
    os.unlink(stk.m("third.txt"))
    os.mkdir(stk.m("third.txt"))          # a dir where a file was: nothing to hide, fine
    assert os.listdir(stk.m("third.txt")) == []
    os.unlink(stk.m("f.txt"))
    os.symlink("other.txt", stk.m("f.txt"))
    assert os.readlink(stk.u("f.txt")) == "other.txt"
    assert_clean_work(stk)


# --------------------------------------------------------------------------------------
# rename
# --------------------------------------------------------------------------------------

def test_rename_lower_over_lower(stk):
    lower_before = snapshot_lower(stk)
    os.rename(stk.m("other.txt"), stk.m("third.txt"))
    assert stk.m("third.txt").read_bytes() == b"other lower\n"
    assert not os.path.lexists(stk.m("other.txt"))
    assert is_whiteout(stk.u("other.txt"))
    assert stk.u("third.txt").read_bytes() == b"other lower\n"
    assert snapshot_lower(stk) == lower_before
    assert_clean_work(stk)


def test_rename_upper_over_lower_and_lower_over_upper(stk):
    stk.m("up.txt").write_bytes(b"up")
    os.rename(stk.m("up.txt"), stk.m("other.txt"))
    assert stk.m("other.txt").read_bytes() == b"up"
    assert not os.path.lexists(stk.u("up.txt")), "source had no lower: no whiteout expected"
    stk.m("up2.txt").write_bytes(b"up2")
    os.rename(stk.m("third.txt"), stk.m("up2.txt"))
    assert stk.m("up2.txt").read_bytes() == b"third lower\n"
    assert is_whiteout(stk.u("third.txt"))
    assert "third.txt" not in os.listdir(stk.mnt)
    assert_clean_work(stk)


def test_rename_lower_file_into_other_dir(stk):
    os.rename(stk.m("a/b/c/deep.txt"), stk.m("ldir/deep.moved"))
    assert is_whiteout(stk.u("a/b/c/deep.txt"))
    assert stk.u("ldir/deep.moved").read_bytes() == b"deep\n"
    st_ = os.lstat(stk.u("ldir/deep.moved"))
    assert (st_.st_uid, st_.st_gid) == (1007, 1008) and st_.st_mtime_ns == T_LOWER + 3
    assert os.listdir(stk.m("a/b/c")) == []
    assert_clean_work(stk)


def test_rename_upper_only_dirs(stk):
    os.makedirs(stk.m("nd/inner"))
    stk.m("nd/inner/f").write_bytes(b"f")
    os.rename(stk.m("nd"), stk.m("nd2"))
    assert stk.m("nd2/inner/f").read_bytes() == b"f"
    assert stk.u("nd2/inner/f").read_bytes() == b"f"
    assert not os.path.lexists(stk.u("nd"))
    # over an empty upper-only dir
    os.mkdir(stk.m("empty"))
    os.rename(stk.m("nd2"), stk.m("empty"))
    assert stk.m("empty/inner/f").read_bytes() == b"f"
    # into a merged dir
    os.rename(stk.m("empty"), stk.m("ldir/moved"))
    assert stk.u("ldir/moved/inner/f").read_bytes() == b"f"
    # over a non-empty dir
    os.mkdir(stk.m("full"))
    stk.m("full/x").write_bytes(b"x")
    os.mkdir(stk.m("other_dir"))
    with pytest.raises(OSError) as ei:
        os.rename(stk.m("other_dir"), stk.m("full"))
    assert ei.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert_clean_work(stk)


def test_rename_upper_dir_over_whiteout_of_lower_dir(stk):
    """A new dir moved to where a lower dir was deleted must hide the lower entries."""
    os.unlink(stk.m("ldir/x.txt"))
    os.unlink(stk.m("ldir/sub/y.txt"))
    os.rmdir(stk.m("ldir/sub"))
    os.rmdir(stk.m("ldir"))
    os.mkdir(stk.m("nd"))
    stk.m("nd/n").write_bytes(b"n")
    os.rename(stk.m("nd"), stk.m("ldir"))
    assert sorted(os.listdir(stk.m("ldir"))) == ["n"]
    assert os.getxattr(stk.u("ldir"), "trusted.overlay.opaque") == b"y"
    assert_clean_work(stk)


@pytest.fixture
def stk_noredirect(layers_factory, overlay_mount):
    """The standard stack mounted with redirect_dir=off (the kernel's default)."""
    return make_stack(layers_factory, overlay_mount, {"lower": LOWER}, prepare=prepare_lower,
                      options="redirect_dir=off")


@pytest.mark.parametrize("src", ["ldir", "merged", "a/b"])
def test_rename_lower_dir_is_exdev_with_redirect_dir_off(stk_noredirect, src):
    stk = stk_noredirect
    if src == "merged":
        stk.m("merged/u").write_bytes(b"u")     # a merged dir (upper + lower)
    before_upper = helpers.dir_state(stk.upper)
    before_names = helpers.merged_names(stk.mnt)
    with pytest.raises(OSError) as ei:
        os.rename(stk.m(src), stk.m("renamed"))
    assert ei.value.errno == errno.EXDEV
    assert helpers.merged_names(stk.mnt) == before_names
    assert helpers.dir_state(stk.upper) == before_upper
    assert_clean_work(stk)


def test_renameat2_noreplace(stk):
    stk.m("u.txt").write_bytes(b"u")
    for src, dst in (("u.txt", "other.txt"), ("other.txt", "third.txt"), ("other.txt", "u.txt")):
        before = helpers.tree_snapshot(stk.mnt)
        upper_before = helpers.dir_state(stk.upper)
        with pytest.raises(OSError) as ei:
            renameat2(stk.m(src), stk.m(dst), RENAME_NOREPLACE)
        assert ei.value.errno == errno.EEXIST, (src, dst)
        assert helpers.tree_snapshot(stk.mnt) == before
        assert helpers.dir_state(stk.upper) == upper_before, f"{src}->{dst}: upper changed"
    renameat2(stk.m("other.txt"), stk.m("brand_new.txt"), RENAME_NOREPLACE)
    assert stk.m("brand_new.txt").read_bytes() == b"other lower\n"
    assert is_whiteout(stk.u("other.txt"))
    renameat2(stk.m("u.txt"), stk.m("ldir/u.txt"), RENAME_NOREPLACE)
    assert stk.u("ldir/u.txt").read_bytes() == b"u"
    assert_clean_work(stk)


def test_renameat2_exchange_refused(stk):
    stk.m("u1").write_bytes(b"1")
    stk.m("u2").write_bytes(b"2")
    os.mkdir(stk.m("ud"))
    for src, dst in (("u1", "u2"), ("other.txt", "third.txt"), ("u1", "other.txt"),
                     ("ud", "u1"), ("u1", "missing")):
        before = helpers.tree_snapshot(stk.mnt)
        upper_before = helpers.dir_state(stk.upper)
        with pytest.raises(OSError) as ei:
            renameat2(stk.m(src), stk.m(dst), RENAME_EXCHANGE)
        assert ei.value.errno in (errno.EINVAL, errno.ENOENT) if dst == "missing" else \
            ei.value.errno == errno.EINVAL, (src, dst, ei.value)
        assert helpers.tree_snapshot(stk.mnt) == before, f"{src}<->{dst}: merged view changed"
        assert helpers.dir_state(stk.upper) == upper_before, f"{src}<->{dst}: upper changed"
    assert stk.m("u1").read_bytes() == b"1" and stk.m("u2").read_bytes() == b"2"


def test_rename_onto_itself_and_hard_link_twin(stk):
    stk.m("x").write_bytes(b"x")
    os.link(stk.m("x"), stk.m("y"))
    os.rename(stk.m("x"), stk.m("x"))
    os.rename(stk.m("x"), stk.m("y"))      # POSIX: same inode, nothing happens
    assert stk.m("x").read_bytes() == b"x" and stk.m("y").read_bytes() == b"x"


# --------------------------------------------------------------------------------------
# Reserved names, read-only mounts
# --------------------------------------------------------------------------------------

WH_ATTEMPTS = {
    "create": lambda m: os.close(os.open(m / ".wh.foo", os.O_CREAT | os.O_WRONLY, 0o644)),
    "mkdir": lambda m: os.mkdir(m / ".wh.foo"),
    "symlink": lambda m: os.symlink("f.txt", m / ".wh.foo"),
    "mknod": lambda m: os.mkfifo(m / ".wh.foo"),
    "link": lambda m: os.link(m / "f.txt", m / ".wh.foo"),
    "rename": lambda m: os.rename(m / "other.txt", m / ".wh.other.txt"),
    "opaque_marker": lambda m: os.mkdir(m / "ldir/.wh..wh..opq"),
}


@pytest.mark.parametrize("how", list(WH_ATTEMPTS))
def test_whiteout_names_refused(stk, how):
    upper_before = helpers.dir_state(stk.upper)
    with pytest.raises(OSError) as ei:
        WH_ATTEMPTS[how](stk.mnt)
    assert ei.value.errno == errno.EINVAL
    assert helpers.dir_state(stk.upper) == upper_before
    assert not [n for n in os.listdir(stk.mnt) if n.startswith(".wh.")]


def _ro_attempts(m: Path):
    return {
        "create": lambda: os.close(os.open(m / "new", os.O_CREAT | os.O_WRONLY, 0o644)),
        "open_write": lambda: os.close(os.open(m / "f.txt", os.O_WRONLY)),
        "o_trunc": lambda: os.close(os.open(m / "f.txt", os.O_RDONLY | os.O_TRUNC)),
        "truncate": lambda: os.truncate(m / "f.txt", 0),
        "mkdir": lambda: os.mkdir(m / "d"),
        "symlink": lambda: os.symlink("x", m / "s"),
        "mknod": lambda: os.mkfifo(m / "p"),
        "link": lambda: os.link(m / "f.txt", m / "l"),
        "unlink": lambda: os.unlink(m / "f.txt"),
        "rmdir": lambda: os.rmdir(m / "pub"),
        "rename": lambda: os.rename(m / "f.txt", m / "g"),
        "chmod": lambda: os.chmod(m / "f.txt", 0o600),
        "chown": lambda: os.chown(m / "f.txt", 1, 1),
        "utime": lambda: os.utime(m / "f.txt", ns=(1, 1)),
        "setxattr": lambda: os.setxattr(m / "f.txt", "user.x", b"1"),
        "removexattr": lambda: os.removexattr(m / "f.txt", "user.color"),
    }


@pytest.mark.parametrize("form", ["lowers_only", "ro_option"])
def test_read_only_mount_erofs(layers_factory, overlay_mount, form):
    layers = layers_factory({"lower": LOWER})
    prepare_lower(layers)
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    opts = (f"lowerdir={layers.lowerdir}" if form == "lowers_only"
            else stack_options(layers.paths, upper, work, "ro"))
    m = overlay_mount(opts)
    lower_before, upper_before = helpers.dir_state(layers.paths[0]), helpers.dir_state(upper)
    for name, attempt in _ro_attempts(m.path).items():
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS, f"{name}: {ei.value!r}"
    assert helpers.dir_state(layers.paths[0]) == lower_before
    assert helpers.dir_state(upper) == upper_before
    assert m.path.joinpath("f.txt").read_bytes() == CONTENT


# ======================================================================================
# Data operations
# ======================================================================================

def test_o_append(stk):
    fd = os.open(stk.m("other.txt"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"one\n")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"two\n")
    finally:
        os.close(fd)
    assert stk.m("other.txt").read_bytes() == b"other lower\none\ntwo\n"
    assert stk.u("other.txt").read_bytes() == b"other lower\none\ntwo\n"
    assert stk.lo("other.txt").read_bytes() == b"other lower\n"
    with open(stk.m("new.log"), "ab") as f:
        f.write(b"a")
    with open(stk.m("new.log"), "ab") as f:
        f.write(b"b")
    assert stk.u("new.log").read_bytes() == b"ab"


def test_ftruncate_shrink_and_grow(stk):
    fd = os.open(stk.m("f.txt"), os.O_RDWR)
    try:
        os.ftruncate(fd, 10)
        assert os.fstat(fd).st_size == 10
        assert os.pread(fd, 100, 0) == CONTENT[:10]
        os.ftruncate(fd, 100_000)
        assert os.fstat(fd).st_size == 100_000
        assert os.pread(fd, 20, 0) == CONTENT[:10] + b"\0" * 10
    finally:
        os.close(fd)
    assert os.stat(stk.u("f.txt")).st_size == 100_000
    assert os.stat(stk.m("f.txt")).st_size == 100_000
    assert stk.lo("f.txt").read_bytes() == CONTENT
    os.truncate(stk.m("f.txt"), 3)
    assert stk.m("f.txt").read_bytes() == CONTENT[:3]


def test_fallocate(stk):
    fd = os.open(stk.m("alloc.bin"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
    finally:
        os.close(fd)
    ust = os.stat(stk.u("alloc.bin"))
    assert ust.st_size == 1 << 20 and ust.st_blocks * 512 >= 1 << 20
    assert os.stat(stk.m("alloc.bin")).st_size == 1 << 20
    # on a lower file: copy-up, then grow
    fd = os.open(stk.m("other.txt"), os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 65536)
    finally:
        os.close(fd)
    assert os.stat(stk.u("other.txt")).st_size == 65536
    data = stk.m("other.txt").read_bytes()
    assert data.startswith(b"other lower\n") and len(data) == 65536
    assert stk.lo("other.txt").read_bytes() == b"other lower\n"


def test_fsync_fdatasync(stk):
    fd = os.open(stk.m("f.txt"), os.O_RDWR)
    try:
        os.pwrite(fd, b"SYNCED", 0)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert stk.u("f.txt").read_bytes().startswith(b"SYNCED")
    dfd = os.open(stk.m("ldir"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    except OSError as e:     # directory fsync may be unimplemented, but must not lie badly
        assert e.errno in (errno.EINVAL, errno.ENOSYS), e
    finally:
        os.close(dfd)


def test_statfs_of_upper(stk):
    m, u = os.statvfs(stk.mnt), os.statvfs(stk.upper)
    assert (m.f_bsize, m.f_frsize, m.f_blocks, m.f_files) == (u.f_bsize, u.f_frsize, u.f_blocks, u.f_files)
    assert abs(m.f_bfree - u.f_bfree) < max(1, u.f_blocks // 100)
    assert m.f_namemax == 255


# ======================================================================================
# Inode numbers
# ======================================================================================

def test_inode_numbers_stable_across_copy_up_and_remount(stk):
    names = ["f.txt", "other.txt", "ldir", "ldir/x.txt", "a/b/c/deep.txt", "link_to_f"]
    before = {n: os.lstat(stk.m(n)).st_ino for n in names}
    os.chmod(stk.m("f.txt"), 0o600)
    _write(stk.m("ldir/x.txt"))
    os.setxattr(stk.m("a/b/c/deep.txt"), "user.k", b"v")
    os.chown(stk.m("link_to_f"), 5, 5, follow_symlinks=False)
    stk.m("created").write_bytes(b"c")
    os.mkdir(stk.m("cdir"))
    before["created"] = os.lstat(stk.m("created")).st_ino
    before["cdir"] = os.lstat(stk.m("cdir")).st_ino
    after = {n: os.lstat(stk.m(n)).st_ino for n in before}
    assert after == before, "st_ino changed by copy-up"
    # fstat agrees with stat
    fd = os.open(stk.m("f.txt"), os.O_RDONLY)
    try:
        assert os.fstat(fd).st_ino == before["f.txt"]
    finally:
        os.close(fd)
    # readdir d_ino agrees too
    with os.scandir(stk.mnt) as it:
        d_inos = {e.name: e.inode() for e in it}
    for n in ("f.txt", "other.txt", "ldir", "created", "cdir"):
        assert d_inos[n] == before[n], f"readdir d_ino of {n}"
    stk.mount.unmount()
    m2 = helpers.Mount(stk.mnt, stk.options, log_dir=stk.mnt.parent)
    with m2:
        again = {n: os.lstat(m2.path / n).st_ino for n in before}
        assert again == before, "st_ino changed by remount"


def test_hard_links_one_inode_number(stk):
    os.link(stk.m("f.txt"), stk.m("ldir/f.hard"))
    os.link(stk.m("ldir/f.hard"), stk.m("a/f.hard2"))
    inos = {os.lstat(stk.m(p)).st_ino for p in ("f.txt", "ldir/f.hard", "a/f.hard2")}
    assert len(inos) == 1
    assert os.lstat(stk.m("a/f.hard2")).st_nlink == 3


# ======================================================================================
# Hard links in kernel cache mode (docs/ARCHITECTURE.md §6 trap 9)
# ======================================================================================

@pytest.mark.parametrize("origin", ["upper", "lower"])
def test_hard_link_write_visible_through_other_name(stk, origin):
    if origin == "upper":
        stk.m("h1").write_bytes(b"A" * 8192)
    else:
        os.rename(stk.m("f.txt"), stk.m("h1"))
    first = stk.m("h1").read_bytes()
    os.link(stk.m("h1"), stk.m("h2"))
    fb = os.open(stk.m("h2"), os.O_RDONLY)
    try:
        assert os.pread(fb, 1 << 16, 0) == first     # h2's page cache now holds the data
        fa = os.open(stk.m("h1"), os.O_WRONLY)
        try:
            os.pwrite(fa, b"B" * 100, 0)
        finally:
            os.close(fa)
        expected = b"B" * 100 + first[100:]
        assert os.pread(fb, 1 << 16, 0) == expected, "stale read through the other name's open fd"
        assert stk.m("h2").read_bytes() == expected, "stale read through a fresh open of the other name"
        # the other direction, and a size change
        with open(stk.m("h2"), "ab") as f:
            f.write(b"tail")
        assert stk.m("h1").read_bytes() == expected + b"tail"
        assert os.stat(stk.m("h1")).st_size == len(expected) + 4
        assert os.pread(fb, 1 << 16, 0) == expected + b"tail"
    finally:
        os.close(fb)


def test_hard_link_truncate_visible_through_other_name(stk):
    stk.m("t1").write_bytes(b"C" * 5000)
    os.link(stk.m("t1"), stk.m("t2"))
    assert stk.m("t2").read_bytes() == b"C" * 5000
    os.truncate(stk.m("t1"), 10)
    assert stk.m("t2").read_bytes() == b"C" * 10
    assert os.stat(stk.m("t2")).st_size == 10


# ======================================================================================
# Unlink of open files (docs/ARCHITECTURE.md §6 trap 10)
# ======================================================================================

@pytest.mark.parametrize("origin", ["upper", "lower"])
def test_unlink_open_file(stk, origin):
    name = "open.txt" if origin == "upper" else "other.txt"
    if origin == "upper":
        stk.m(name).write_bytes(b"upper data\n")
    data = stk.m(name).read_bytes()
    fd = os.open(stk.m(name), os.O_RDWR)
    fr = os.open(stk.m(name), os.O_RDONLY)
    try:
        os.unlink(stk.m(name))
        assert not os.path.lexists(stk.m(name))
        assert fuse_hidden(stk.mnt, stk.upper, stk.work) == []
        assert os.pread(fd, 100, 0) == data
        os.pwrite(fd, b"ZZ", 0)
        assert os.pread(fd, 100, 0) == b"ZZ" + data[2:]
        assert os.pread(fr, 100, 0) == b"ZZ" + data[2:]
        if origin == "lower":
            assert is_whiteout(stk.u(name))
        else:
            assert not os.path.lexists(stk.u(name))
        # the name can be reused at once
        stk.m(name).write_bytes(b"reborn")
        assert os.pread(fd, 100, 0) == b"ZZ" + data[2:]
    finally:
        os.close(fd)
        os.close(fr)
    assert stk.m(name).read_bytes() == b"reborn"
    assert fuse_hidden(stk.mnt, stk.upper, stk.work) == []
    assert stk.lo("other.txt").read_bytes() == b"other lower\n"


@pytest.mark.parametrize("origin", ["upper", "lower"])
def test_fstat_of_unlinked_open_file(stk, origin):
    """POSIX: an open fd of an unlinked file still answers fstat (st_nlink 0)."""
    name = "open.txt" if origin == "upper" else "other.txt"
    if origin == "upper":
        stk.m(name).write_bytes(b"upper data\n")
    size = os.stat(stk.m(name)).st_size
    fd = os.open(stk.m(name), os.O_RDWR)
    try:
        os.unlink(stk.m(name))
        st_ = os.fstat(fd)
        assert st_.st_size == size
        assert st_.st_nlink == 0
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
    finally:
        os.close(fd)


def test_rmdir_after_unlinking_open_file(stk):
    os.mkdir(stk.m("d"))
    stk.m("d/f").write_bytes(b"f")
    fd = os.open(stk.m("d/f"), os.O_RDONLY)
    try:
        os.unlink(stk.m("d/f"))
        os.rmdir(stk.m("d"))          # would fail with a .fuse_hidden file inside
        assert os.read(fd, 10) == b"f"
    finally:
        os.close(fd)
    assert not os.path.lexists(stk.u("d"))


@pytest.mark.parametrize("where", ["new", "lower"])
def test_setgid_dir_after_chmod_and_chown_through_the_mount(stk, where):
    """Issue 13.3: new objects take the group (subdirs also S_ISGID) of a setgid parent,
    also right after a chmod/chown of that parent through the mount (the cached lookup
    kept the parent's old attributes)."""
    d = "sgnew" if where == "new" else "ldir"
    if where == "new":
        os.mkdir(stk.m(d), 0o755)
    os.listdir(stk.m(d))  # cached by lookup
    os.chown(stk.m(d), -1, 4242)
    os.chmod(stk.m(d), 0o2775)
    stk.m(f"{d}/f").write_bytes(b"f")
    os.mkdir(stk.m(f"{d}/sdir"))
    os.mknod(stk.m(f"{d}/fifo"), stat.S_IFIFO | 0o644)
    for name in ("f", "sdir", "fifo"):
        assert os.stat(stk.m(f"{d}/{name}")).st_gid == 4242, name
        assert os.stat(stk.u(f"{d}/{name}")).st_gid == 4242, name
    assert os.stat(stk.m(f"{d}/sdir")).st_mode & stat.S_ISGID
    assert not os.stat(stk.m(f"{d}/f")).st_mode & stat.S_ISGID


@pytest.mark.parametrize("kind", ["fifo", "chardev", "socket", "regular"])
def test_other_names_of_hard_linked_special_files_stay_current(stk, kind):
    """Issue 13.1: link-name tracking knew only regular files, so the other names of a
    hard-linked fifo, socket or device showed stale attributes for the attribute timeout."""
    p = stk.m("p")
    if kind == "fifo":
        os.mkfifo(p, 0o644)
    elif kind == "chardev":
        os.mknod(p, stat.S_IFCHR | 0o644, os.makedev(1, 3))
    elif kind == "socket":
        os.mknod(p, stat.S_IFSOCK | 0o644)
    else:
        p.write_bytes(b"r")
        os.chmod(p, 0o644)
    os.link(p, stk.m("q"))
    assert os.stat(stk.m("q")).st_nlink == 2  # cached now
    os.link(p, stk.m("r"))
    assert os.stat(stk.m("q")).st_nlink == 3, "after link"
    os.chmod(p, 0o600)
    assert stat.S_IMODE(os.stat(stk.m("q")).st_mode) == 0o600, "after chmod"
    os.chown(p, 1234, 5678)
    assert os.stat(stk.m("q"))[4:6] == (1234, 5678), "after chown"
    os.unlink(stk.m("r"))
    assert os.stat(stk.m("q")).st_nlink == 2, "after unlink"
    stk.m("other").write_bytes(b"o")
    ctime = os.stat(stk.m("q")).st_ctime_ns
    os.rename(stk.m("other"), p)  # rename over one name: the other loses a link
    st = os.stat(stk.m("q"))
    assert st.st_nlink == 1, "after rename over another name"
    assert st.st_ctime_ns >= ctime


@pytest.mark.kernel_overlay
def test_mknod_of_a_whiteout_device_is_eperm(stk, kernel_mount):
    """Issue 13.7: ``mknod c 0 0`` made a whiteout, and the name vanished; the kernel's
    overlay answers EPERM, and nothing reaches the upper."""
    ku, kw = stk.upper.parent / "k-upper", stk.upper.parent / "k-work"
    ku.mkdir()
    kw.mkdir()
    for root in (stk.mnt, kernel_mount(stk.lowers, ku, kw)):
        with pytest.raises(PermissionError):
            os.mknod(root / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
        assert not os.path.lexists(root / "wh")
    assert not os.path.lexists(stk.u("wh"))
    os.mknod(stk.m("dev"), stat.S_IFCHR | 0o600, os.makedev(1, 3))  # other devices work
    assert os.stat(stk.m("dev")).st_rdev == os.makedev(1, 3)


@pytest.mark.parametrize("held_open", [False, True])
@pytest.mark.parametrize("origin", ["upper", "lower"])
def test_rename_of_closed_file_to_a_hidden_like_name_is_a_rename(stk, origin, held_open):
    """Issue 13.8: a rename to ``.fuse_hidden`` + 16 hex digits was taken as libfuse's
    hidden unlink even for a file nobody had open, and deleted it. Such names are not
    special at all any more (the node-based engine gets UNLINK for an open file, not a
    rename): open or not, the file is renamed as asked."""
    name = "third.txt"
    if origin == "upper":
        os.chmod(stk.m(name), 0o600)  # copied up without an open
        assert stk.u(name).exists()
    data = (stk.lower / name).read_bytes()
    hidden_like = ".fuse_hidden0123456789abcdef"
    fd = os.open(stk.m(name), os.O_RDONLY) if held_open else None
    try:
        os.rename(stk.m(name), stk.m(hidden_like))
        assert not os.path.lexists(stk.m(name))
        assert stk.m(hidden_like).read_bytes() == data
        assert hidden_like in os.listdir(stk.mnt)
    finally:
        if fd is not None:
            os.close(fd)
    assert hidden_like in os.listdir(stk.mnt)


def test_lower_file_open_readonly_then_unlinked(stk):
    fd = os.open(stk.m("third.txt"), os.O_RDONLY)
    try:
        os.unlink(stk.m("third.txt"))
        assert os.read(fd, 100) == b"third lower\n"
    finally:
        os.close(fd)
    assert fuse_hidden(stk.mnt, stk.upper, stk.work) == []


# ======================================================================================
# -o volatile
# ======================================================================================

def test_volatile_mount(layers_factory, overlay_mount):
    s = make_stack(layers_factory, overlay_mount, {"lower": LOWER}, options="volatile",
                   prepare=prepare_lower)
    _write(s.m("f.txt"))
    s.m("n").write_bytes(b"n")
    os.unlink(s.m("other.txt"))
    assert s.u("f.txt").read_bytes().startswith(WRITTEN)
    assert s.u("n").read_bytes() == b"n"
    assert is_whiteout(s.u("other.txt"))
    assert work_leftovers(s.work) == ["incompat"]  # the kernel's marker, nothing else
    s.mount.unmount()
    marker = s.work / "work" / "incompat" / "volatile"
    assert marker.is_dir(), "a volatile mount leaves the kernel's marker"
    for options in (s.options, s.options.replace(",volatile", "")):
        r = helpers.run_overlaypc(["-o", options, s.mnt], s.mnt, s.mnt.parent)
        assert r.returncode == 2 and "volatile" in r.stderr and str(marker.relative_to(s.work)) in r.stderr, r
        assert not helpers.is_mounted(s.mnt)
    assert marker.is_dir(), "a refused mount removes nothing"
    assert (marker / "dirty").is_dir(), "the kernel's own form of the marker"
    shutil.rmtree(marker)  # the recovery the error names: nothing crashed
    with helpers.Mount(s.mnt, s.options, log_dir=s.mnt.parent) as m2:
        assert (m2.path / "f.txt").read_bytes().startswith(WRITTEN)
        assert not (m2.path / "other.txt").exists()


@pytest.mark.kernel_overlay
def test_volatile_marker_is_the_kernels(layers_factory, overlay_mount, kernel_mount):
    # issue 13.4: overlaypc emptied workdir/work, marker included, and wrote none
    """The kernel refuses a workdir overlaypc used with -o volatile, and overlaypc refuses
    one the kernel used so."""
    s = make_stack(layers_factory, overlay_mount, {"lower": LOWER}, options="volatile",
                   prepare=prepare_lower)
    s.mount.unmount()
    with pytest.raises(AssertionError, match="kernel overlay mount failed"):
        kernel_mount(s.lowers, s.upper, s.work)
    shutil.rmtree(s.work / "work" / "incompat" / "volatile")
    k = kernel_mount(s.lowers, s.upper, s.work, extra_options=("volatile",))
    helpers.force_unmount(k)
    assert (s.work / "work" / "incompat" / "volatile").is_dir()
    r = helpers.run_overlaypc(["-o", s.mount.options, s.mnt], s.mnt, s.mnt.parent)
    assert r.returncode == 2 and "volatile" in r.stderr, r


# ======================================================================================
# The upper's on-disk format: interchangeable with the kernel's overlayfs
# ======================================================================================

INTEROP_LOWER = {
    "lower": {
        "f.txt": File("file f\n", mode=0o640, xattrs={"user.a": b"1"}, mtime_ns=T_LOWER),
        "g.txt": File("file g\n", mtime_ns=T_LOWER),
        "h.txt": File("file h\n", mtime_ns=T_LOWER),
        "dir/one": File("one", mtime_ns=T_LOWER),
        "dir/two": File("two", mtime_ns=T_LOWER),
        "gone/inner": File("inner", mtime_ns=T_LOWER),
        "keep/sub/deep": File("deep", mtime_ns=T_LOWER),
        "sym": Symlink("f.txt"),
        "big.bin": File(bytes(range(256)) * 512, mtime_ns=T_LOWER),
    },
}


def interop_scenario(m: Path) -> None:
    """Mutations exercising every on-disk form: copy-ups, whiteouts, opaque dirs,
    renames, links, special files, xattrs, times."""
    with open(m / "f.txt", "ab") as f:
        f.write(b"appended\n")
    os.chmod(m / "g.txt", 0o600)
    os.setxattr(m / "g.txt", "user.b", b"2")
    os.removexattr(m / "f.txt", "user.a")
    os.unlink(m / "h.txt")
    os.unlink(m / "dir/one")
    (m / "dir/three").write_bytes(b"three")
    os.unlink(m / "gone/inner")
    os.rmdir(m / "gone")
    os.mkdir(m / "gone")
    (m / "gone/new").write_bytes(b"new in opaque")
    os.rename(m / "dir/two", m / "keep/sub/two")
    os.rename(m / "g.txt", m / "dir/g.moved")
    os.makedirs(m / "fresh/a/b")
    (m / "fresh/a/b/c").write_bytes(b"c")
    os.link(m / "fresh/a/b/c", m / "fresh/c.link")
    os.link(m / "big.bin", m / "keep/big.link")
    os.symlink("../f.txt", m / "fresh/rel")
    os.mkfifo(m / "fresh/fifo")
    os.mknod(m / "fresh/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.truncate(m / "keep/sub/deep", 2)
    os.utime(m / "keep/sub", ns=(T_DIR, T_DIR + 7))
    os.utime(m / "fresh/a/b/c", ns=(T_DIR, T_DIR + 8))
    os.chown(m / "fresh/a", 321, 654)
    os.unlink(m / "sym")
    os.symlink("dir/three", m / "sym")


def _snap(root, kernel=False):
    return helpers.tree_snapshot(root, times=True, ignore_vanished=kernel)


def test_overlaypc_upper_mounts_under_kernel(layers_factory, overlay_mount, mountpoint):
    helpers.require("kernel_overlay")
    s = make_stack(layers_factory, overlay_mount, INTEROP_LOWER)
    interop_scenario(s.mnt)
    ours = _snap(s.mnt)
    ours_links = link_groups(s.mnt)
    s.mount.unmount()
    with helpers.kernel_overlay(mountpoint("kmnt"), s.lowers, s.upper, s.work) as k:
        theirs = _snap(k, kernel=True)
        assert theirs == ours, "kernel overlayfs shows overlaypc's upper differently:\n" + \
            helpers.diff_snapshots(ours, theirs, ("overlaypc", "kernel"))
        assert link_groups(k) == ours_links


def test_kernel_upper_mounts_under_overlaypc(layers_factory, overlay_mount, mountpoint):
    helpers.require("kernel_overlay")
    layers = layers_factory(INTEROP_LOWER)
    upper, work = layers_factory.empty_dir("kupper"), layers_factory.empty_dir("kwork")
    with helpers.kernel_overlay(mountpoint("kmnt"), layers.paths, upper, work) as k:
        interop_scenario(k)
        theirs = _snap(k, kernel=True)
        their_links = link_groups(k)
    m = overlay_mount(stack_options(layers.paths, upper, work))
    ours = _snap(m.path)
    assert ours == theirs, "overlaypc shows the kernel's upper differently:\n" + \
        helpers.diff_snapshots(theirs, ours, ("kernel", "overlaypc"))
    assert link_groups(m.path) == their_links
    # and it keeps working on it
    (m.path / "gone/more").write_bytes(b"more")
    os.unlink(m.path / "dir/three")
    assert sorted(os.listdir(m.path / "gone")) == ["more", "new"]


def test_same_result_as_kernel_for_interop_scenario(layers_factory, overlay_mount, mountpoint):
    """Both implementations running the same scenario end with the same merged view
    (times left out: the two runs happen at different moments)."""
    helpers.require("kernel_overlay")
    layers = layers_factory(INTEROP_LOWER)
    upper, work = layers_factory.empty_dir("kupper"), layers_factory.empty_dir("kwork")
    with helpers.kernel_overlay(mountpoint("kmnt"), layers.paths, upper, work) as k:
        interop_scenario(k)
        theirs = helpers.tree_snapshot(k, ignore_vanished=True)
    s = make_stack(layers_factory, overlay_mount, INTEROP_LOWER)
    interop_scenario(s.mnt)
    ours = helpers.tree_snapshot(s.mnt)
    assert ours == theirs, helpers.diff_snapshots(theirs, ours, ("kernel", "overlaypc"))


def _inos(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                out[os.path.relpath(p, root)] = os.lstat(p).st_ino
            except FileNotFoundError:
                continue  # a kernel-listed whiteout (see helpers.tree_snapshot)
    return out


@pytest.mark.parametrize("writer", ["kernel", "overlaypc"])
def test_inode_numbers_agree_with_kernel_on_one_filesystem(layers_factory, overlay_mount,
                                                           mountpoint, writer):
    """All layers on one filesystem (the kernel's samefs case, docs/ARCHITECTURE.md §4): every object
    shows the same st_ino under both implementations, whichever of them made the upper:
    lower-only objects their own number, copied-up ones their origin's."""
    helpers.require("kernel_overlay")
    layers = layers_factory(INTEROP_LOWER)
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    if writer == "kernel":
        with helpers.kernel_overlay(mountpoint("kmnt"), layers.paths, upper, work) as k:
            interop_scenario(k)
    else:
        m = overlay_mount(stack_options(layers.paths, upper, work))
        interop_scenario(m.path)
        m.unmount()
    with helpers.kernel_overlay(mountpoint("kmnt"), layers.paths, upper, work) as k:
        kernel_inos = _inos(k)
    m2 = overlay_mount(stack_options(layers.paths, upper, work))
    ours = _inos(m2.path)
    assert set(ours) == set(kernel_inos)
    differ = {p: (kernel_inos[p], ours[p]) for p in ours if ours[p] != kernel_inos[p]}
    assert not differ, f"st_ino (kernel, overlaypc) differs for {differ}"
