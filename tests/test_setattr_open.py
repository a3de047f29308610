"""SETATTR of an open file (untar's utimens, chown and chmod of each file come before its
close) is done through the file's handle, without a lookup of its name
(``Files.setattr_open``): driven through ``OverlayOps`` without FUSE (``core_driver``),
each sequence of changes is made on an open file and on a closed one, and both must end
the same, in the replies and on disk."""
from __future__ import annotations

import os
import stat
import threading
from dataclasses import replace

import pytest

import helpers
from core_driver import REQ, CoreDriver, NodeRef
from overlaypc import faults
from overlaypc.engine import protocol as p
from overlaypc.engine.protocol import SetAttr

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
T = 1_600_000_000_123_456_789


@pytest.fixture
def drv(tmp_path):
    helpers.require("root")  # chown, and security.capability (CAP_SETFCAP)
    d = CoreDriver.in_dir(tmp_path)
    yield d
    d.close()


#: (valid, atime, mtime, mode, uid, gid): as tar sends them, then others
STEPS = [
    (p.FATTR_ATIME | p.FATTR_MTIME, T - 9, T - 9, 0, 0, 0),           # (both alike from here)
    (p.FATTR_MODE, 0, 0, 0o6755, 0, 0),
    (p.FATTR_MTIME, 0, T, 0, 0, 0),                                   # atime UTIME_OMIT
    (p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID, 0, 0, 0, 1234, 5678),
    (p.FATTR_MODE, 0, 0, 0o2640, 0, 0),
    (p.FATTR_GID | p.FATTR_KILL_SUIDGID, 0, 0, 0, 0, 4242),
    (p.FATTR_ATIME | p.FATTR_MTIME, T - 5, T + 7, 0, 0, 0),
    (p.FATTR_MODE | p.FATTR_UID | p.FATTR_ATIME_NOW | p.FATTR_MTIME, 0, T, 0o4711, 99, 0),
]


def _apply(drv: CoreDriver, node: NodeRef, step) -> tuple:
    valid, atime, mtime, mode, uid, gid = step
    if valid & p.FATTR_KILL_SUIDGID:  # a capability for the kill to strip
        drv.ops.setxattr(REQ, node.nodeid, "security.capability", CAP, 0)
    attr = drv.ops.setattr(REQ, node.nodeid, SetAttr(valid, None, 0, atime, mtime, mode, uid, gid)).attr
    # atime NOW differs between the two files; ctime always does
    return (attr.mode, attr.uid, attr.gid, attr.nlink, attr.size, attr.mtime_ns,
            None if valid & p.FATTR_ATIME_NOW else attr.atime_ns)


def _on_disk(path) -> tuple:
    st = os.lstat(path)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size, st.st_mtime_ns,
            sorted(os.listxattr(path)))


def test_setattr_of_an_open_file_needs_no_lookup_and_ends_as_by_name(drv, tmp_path, monkeypatch):
    root = drv.root()
    shut, fh = drv.create(root, "shut", os.O_WRONLY, 0o644)
    drv.write(fh, b"data", 0)
    drv.release(fh)
    held, fh = drv.create(root, "held", os.O_WRONLY, 0o644)
    drv.write(fh, b"data", 0)
    looked: list[str] = []
    real = drv.fs.lookup.lookup
    monkeypatch.setattr(drv.fs.lookup, "lookup", lambda rel: looked.append(rel) or real(rel))
    for step in STEPS:
        by_name = _apply(drv, shut, step)
        looked.clear()
        valid = step[0]
        if valid & p.FATTR_KILL_SUIDGID:
            drv.ops.setxattr(REQ, held.nodeid, "security.capability", CAP, 0)
            looked.clear()
        attr = drv.ops.setattr(REQ, held.nodeid, SetAttr(valid, None, 0, *step[1:])).attr
        assert looked == [], f"SETATTR {valid:#x} of an open file looked its name up"
        through_handle = (attr.mode, attr.uid, attr.gid, attr.nlink, attr.size, attr.mtime_ns,
                          None if valid & p.FATTR_ATIME_NOW else attr.atime_ns)
        assert through_handle == by_name, f"SETATTR {valid:#x}"
        assert _on_disk(tmp_path / "upper" / "held") == _on_disk(tmp_path / "upper" / "shut")
        assert replace(drv.getattr(held), ino=0) == replace(drv.getattr(shut), ino=0)
    # the last chown (after its chmod) cleared setuid, as Linux's chown does for anyone
    assert stat.S_IMODE(os.lstat(tmp_path / "upper" / "held").st_mode) == 0o711
    assert os.lstat(tmp_path / "upper" / "held").st_uid == 99
    drv.release(fh)
    drv.settle()


def test_an_open_file_with_other_links_is_changed_by_name(drv, tmp_path):
    """A second link: the reply's link count is the overlay's (computed by name)."""
    root = drv.root()
    node, fh = drv.create(root, "a", os.O_WRONLY, 0o644)
    drv.link(node, root, "b")
    attr = drv.ops.setattr(REQ, node.nodeid, SetAttr(p.FATTR_MODE, None, 0, 0, 0, 0o600, 0, 0)).attr
    assert attr.nlink == 2 and stat.S_IMODE(attr.mode) == 0o600
    assert stat.S_IMODE(os.lstat(tmp_path / "upper" / "b").st_mode) == 0o600
    drv.release(fh)
    drv.settle()


def test_an_open_file_under_squashed_owners_is_changed_by_name(tmp_path):
    """Shown owners differ from the stored ones: the name's path decides what is shown."""
    helpers.require("root")
    drv = CoreDriver.in_dir(tmp_path, squash_to_uid=4321)
    try:
        node, fh = drv.create(drv.root(), "f", os.O_WRONLY, 0o644)
        attr = drv.ops.setattr(REQ, node.nodeid,
                               SetAttr(p.FATTR_MTIME, None, 0, 0, T, 0, 0, 0)).attr
        assert attr.uid == 4321 and attr.mtime_ns == T
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()


def test_a_listing_after_the_changes_reads_no_origin_of_the_file(drv, monkeypatch):
    """The inode-number answer of the changed file is kept under its new ctime, as a
    change by name keeps it: a listing (rm -rf's READDIRPLUS after untar) need not read
    the file's origin xattrs again."""
    root = drv.root()
    node, fh = drv.create(root, "f", os.O_WRONLY, 0o644)
    drv.write(fh, b"data", 0)               # (a write changes the ctime first)
    for step in STEPS[:4]:
        drv.ops.setattr(REQ, node.nodeid, SetAttr(step[0], None, 0, *step[1:]))
    drv.release(fh)
    read: list[str] = []
    real = drv.fs.inos._from_origin
    monkeypatch.setattr(drv.fs.inos, "_from_origin", lambda e: read.append(e.rel) or real(e))
    assert "f" in drv.readdir(root)
    assert read == []
    drv.settle()


def test_a_released_handle_lends_no_fd(drv):
    """A SETATTR or GETXATTR by node borrows the fd of one of the node's open handles,
    whose RELEASE may run at the same time: once closed, the handle lends nothing (its fd
    number may name another open file by then)."""
    node, fh = drv.create(drv.root(), "f", os.O_WRONLY, 0o644)
    handle = drv.fs.handles.get(fh)
    assert handle.with_fd(lambda fd: os.fstat(fd).st_ino) == os.fstat(handle.bound_fd).st_ino
    drv.release(fh)
    assert handle.with_fd(lambda fd: pytest.fail(f"lent fd {fd} of a released handle")) is None
    drv.settle()


def test_a_nameless_file_changed_while_its_handle_is_released_changes_no_other_file(drv, tmp_path):
    """A truncate by node of an open file with no name left runs on the fd of one of its
    handles; that handle's RELEASE comes at the same time, and another open takes the fd
    number it freed. The truncate must still reach the file, not the other one. Before:
    the fd number was read, then reopened through /proc with nothing held, so the other
    file ("victim") was truncated."""
    node, fh = drv.create(drv.root(), "f", os.O_RDWR, 0o644)
    drv.write(fh, b"nameless data", 0)
    keep = drv.open(node, os.O_RDONLY)  # (open after the handle lent: stays open)
    drv.unlink(drv.root(), "f")
    victim = tmp_path / "victim"
    victim.write_bytes(b"victim data")
    reached, go = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def hook(point, *args):
        reached.set()
        go.wait(10)

    def truncate():
        try:
            results["truncate"] = drv.setattr(node, size=4)  # SETATTR by node: no name
        except Exception as e:  # noqa: BLE001 (reported below)
            results["truncate"] = e

    def release_and_open():
        drv.release(fh)                                      # the lent handle's fd goes...
        results["fd"] = os.open(victim, os.O_RDWR)          # ...and its number is taken

    faults.install("files.nameless", hook)
    threads = [threading.Thread(target=truncate), threading.Thread(target=release_and_open)]
    try:
        threads[0].start()
        assert reached.wait(10)
        threads[1].start()
        threads[1].join(0.5)  # before: released and reopened at once; now it waits
        go.set()
        for t in threads:
            t.join(10)
    finally:
        go.set()
        faults.configure(None)
        if isinstance(results.get("fd"), int):
            os.close(results["fd"])
    assert victim.read_bytes() == b"victim data"
    assert not isinstance(results["truncate"], Exception), results["truncate"]
    assert results["truncate"].size == 4 and drv.read(keep, 100, 0) == b"name"
    drv.release(keep)



def test_an_open_file_that_lost_the_name_it_was_opened_by(drv, tmp_path):
    """A lower file opened (copied up: it has an origin) by ``a``, a hard link ``b`` made,
    ``a`` unlinked: one link left, so a chmod goes through the handle, which then read the
    file's copy-up origin by the name ``a`` (gone): ENOENT after the chmod was made (a
    futimens in tests/stress_mount.py, hunt6), or no origin, kept for the file: ``b`` then
    showed its upper inode's number."""
    (tmp_path / "lower" / "a").write_bytes(b"lower a\n")
    root = drv.root()
    a = drv.lookup(root, "a")
    a_ino = a.attr.ino
    fh = drv.open(a, os.O_WRONLY)
    b = drv.link(a, root, "b")
    drv.unlink(root, "a")
    attr = drv.ops.setattr(REQ, b.nodeid, SetAttr(p.FATTR_MODE, None, 0, 0, 0, 0o600, 0, 0)).attr
    assert attr.nlink == 1 and stat.S_IMODE(attr.mode) == 0o600
    assert attr.ino == a_ino
    assert drv.getattr(drv.lookup(root, "b")).ino == a_ino
    assert stat.S_IMODE(os.lstat(tmp_path / "upper" / "b").st_mode) == 0o600
    drv.release(fh)
    drv.settle()


def test_an_open_file_whose_first_name_another_file_took_keeps_its_number(drv, tmp_path):
    """As above, but a copied-up lower file ``x`` is renamed over ``a``: the handle's file
    read *x's* origin by the name ``a`` and kept that number for itself (by device, inode
    and ctime), so ``b`` showed the inode number of ``a`` (once ``x``)."""
    (tmp_path / "lower" / "a").write_bytes(b"lower a\n")
    (tmp_path / "lower" / "x").write_bytes(b"lower x\n")
    root = drv.root()
    a = drv.lookup(root, "a")
    a_ino = a.attr.ino
    fh = drv.open(a, os.O_WRONLY)
    b = drv.link(a, root, "b")
    x = drv.lookup(root, "x")
    x_ino = drv.setattr(x, mode=0o640).ino  # copied up with an origin: the lower's number
    drv.rename(root, "x", root, "a")
    attr = drv.ops.setattr(REQ, b.nodeid, SetAttr(p.FATTR_MODE, None, 0, 0, 0, 0o600, 0, 0)).attr
    assert attr.ino == a_ino != x_ino
    assert drv.getattr(drv.lookup(root, "b")).ino == a_ino
    assert drv.getattr(drv.lookup(root, "a")).ino == x_ino
    drv.release(fh)
    drv.settle()
