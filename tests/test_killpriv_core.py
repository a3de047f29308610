"""Privilege-clearing writes driven through ``OverlayOps`` without FUSE (``core_driver``):
the daemon strips at most once per burst of writes, and looks again after a chmod or a
setxattr. (What is stripped, against the kernel overlay: ``test_security.py``.)"""
from __future__ import annotations

import errno
import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver
from overlaypc import killpriv
from overlaypc.engine import protocol as p
from overlaypc.engine.ops import Request
from overlaypc.engine.protocol import SetAttr

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
WRITER = Request(uid=65534, gid=65534, pid=os.getpid())  # (this process: in group 0 only)


def _driver(tmp_path, **options) -> CoreDriver:
    # a setuid file with a capability in the lower: setting security.capability needs
    # CAP_SETFCAP, so this unit tier (not marked ``mount``) needs root for it
    helpers.require("root")
    (tmp_path / "lower").mkdir()
    f = tmp_path / "lower" / "f"
    f.write_bytes(b"data")
    os.chmod(f, 0o6755)
    os.setxattr(f, "security.capability", CAP)
    return CoreDriver.in_dir(tmp_path, **options)


@pytest.fixture
def drv(tmp_path):
    d = _driver(tmp_path)
    yield d
    d.close()


@pytest.fixture
def kills(monkeypatch):
    """Counts the checks that read the file's mode and capability."""
    calls = []
    real = killpriv.kill_fd

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(killpriv, "kill_fd", counting)
    return calls


def _write(drv: CoreDriver, fh: int, n: int) -> None:
    for i in range(n):
        drv.ops.write(WRITER, drv._open[fh], fh, memoryview(b"x"), i, p.WRITE_KILL_SUIDGID)


def test_one_check_per_burst_and_again_after_chmod_and_setxattr(drv, tmp_path, kills):
    node = drv.lookup(drv.root(), "f")
    fh = drv.open(node, os.O_WRONLY)
    _write(drv, fh, 50)
    assert len(kills) == 1
    upper = tmp_path / "upper" / "f"
    assert stat.S_IMODE(os.lstat(upper).st_mode) == 0o755
    assert "security.capability" not in os.listxattr(upper)
    assert drv.fs.stats.counters["privileges_cleared"] == 1

    drv.setattr(node, mode=0o4755)          # chmod u+s through the mount
    _write(drv, fh, 10)
    assert len(kills) == 2 and stat.S_IMODE(os.lstat(upper).st_mode) == 0o755

    drv.ops.setxattr(REQ, node.nodeid, "security.capability", CAP, 0)
    _write(drv, fh, 10)
    assert len(kills) == 3 and "security.capability" not in os.listxattr(upper)

    _write(drv, fh, 10)                     # without the flag (CAP_FSETID): nothing at all
    drv.ops.write(REQ, node.nodeid, fh, memoryview(b"y"), 0, 0)
    assert len(kills) == 3
    drv.release(fh)
    drv.settle()


def test_a_setgid_file_the_writer_may_keep_is_checked_each_time(drv, tmp_path, kills):
    """S_ISGID without group-exec stays for a member of the file's group (here: group 0,
    the writer's primary group), so the file is never clean; nothing is stripped."""
    node = drv.lookup(drv.root(), "f")
    drv.setattr(node, mode=0o2644)
    member = Request(uid=65534, gid=0, pid=os.getpid())
    fh = drv.open(node, os.O_WRONLY)
    for i in range(3):
        drv.ops.write(member, node.nodeid, fh, memoryview(b"x"), i, p.WRITE_KILL_SUIDGID)
    assert len(kills) == 3
    assert stat.S_IMODE(os.lstat(tmp_path / "upper" / "f").st_mode) == 0o2644
    # (the capability went with the first write)
    assert "security.capability" not in os.listxattr(tmp_path / "upper" / "f")
    drv.release(fh)
    drv.settle()


def test_truncate_by_path_and_chown_strip_before_the_change(drv, tmp_path):
    node = drv.lookup(drv.root(), "f")
    sa = SetAttr(p.FATTR_SIZE | p.FATTR_KILL_SUIDGID, None, 1, 0, 0, 0, 0, 0)
    attr = drv.ops.setattr(WRITER, node.nodeid, sa).attr
    assert stat.S_IMODE(attr.mode) == 0o755 and attr.size == 1
    drv.setattr(node, mode=0o6755)
    # a chown by a caller with CAP_FSETID (this process, root) keeps setgid-without-exec
    # of a group it is not in, as Linux's chown does; setuid always goes
    drv.setattr(node, mode=0o6745)
    sa = SetAttr(p.FATTR_GID | p.FATTR_KILL_SUIDGID, None, 0, 0, 0, 0, 0, 4242)
    attr = drv.ops.setattr(REQ, node.nodeid, sa).attr
    assert stat.S_IMODE(attr.mode) == 0o2745 and attr.gid == 4242
    drv.settle()


def test_writer_groups_and_capability_come_from_proc(tmp_path):
    status = tmp_path / "123" / "status"
    status.parent.mkdir()
    status.write_text("Name:\tx\nGroups:\t7 8 \nCapEff:\t0000000000000010\n")
    for who, ns in (("123", "ns-a"), ("self", "ns-a")):  # (its user namespace, ours)
        (tmp_path / ns).touch()
        (tmp_path / who / "ns").mkdir(parents=True)
        (tmp_path / who / "ns" / "user").symlink_to(tmp_path / ns)
    w = killpriv.Writer(1, 2, 123)
    assert killpriv.groups_of(123, 2, proc=str(tmp_path)) == {2, 7, 8}
    assert killpriv.has_fsetid(123, proc=str(tmp_path))
    (tmp_path / "ns-b").touch()  # in a user namespace of its own: no capability of ours
    (tmp_path / "123" / "ns" / "user").unlink()
    (tmp_path / "123" / "ns" / "user").symlink_to(tmp_path / "ns-b")
    assert not killpriv.has_fsetid(123, proc=str(tmp_path))
    assert killpriv.same_user_ns(os.getpid()) and not killpriv.same_user_ns(999999)
    status.write_text("Groups:\nCapEff:\t00000000000000ef\n")
    assert not killpriv.has_fsetid(123, proc=str(tmp_path))
    assert not killpriv.has_fsetid(999999, proc=str(tmp_path))
    assert w.keeps_sgid_of(2)


def _capability(drv: CoreDriver, nodeid: int) -> bytes | None:
    """GETXATTR security.capability as the kernel asks before a write or chown."""
    try:
        return drv.ops.getxattr(REQ, nodeid, "security.capability")
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return None


def test_the_capability_of_an_open_file_is_read_through_its_handle(drv, tmp_path, monkeypatch):
    """The kernel asks for security.capability before each write and chown of an open
    file (untar: twice per file): an open upper file answers through its handle, with no
    lookup of its name, and still shows what was set or removed through any name."""
    node, fh = drv.create(drv.root(), "new", os.O_WRONLY, 0o644)
    looked: list[str] = []
    real = drv.fs.lookup.lookup
    monkeypatch.setattr(drv.fs.lookup, "lookup", lambda rel: looked.append(rel) or real(rel))

    def shown() -> bytes | None:
        looked.clear()
        value = _capability(drv, node.nodeid)
        assert looked == [], "looked the name up"
        return value

    assert shown() is None
    drv.ops.setxattr(REQ, node.nodeid, "security.capability", CAP, 0)
    assert shown() == CAP
    alias = drv.link(node, drv.root(), "alias")
    drv.ops.removexattr(REQ, alias.nodeid, "security.capability")
    assert shown() is None
    drv.ops.setxattr(REQ, alias.nodeid, "security.capability", CAP, 0)
    _write(drv, fh, 1)                      # strips it: the file is known clean now
    assert "security.capability" not in os.listxattr(tmp_path / "upper" / "new")
    assert shown() is None
    drv.ops.setxattr(REQ, alias.nodeid, "security.capability", CAP, 0)
    assert shown() == CAP                   # (a setxattr voids "clean")
    drv.release(fh)
    looked.clear()
    assert _capability(drv, node.nodeid) == CAP   # no handle: by its name
    assert looked == ["new"]
    drv.settle()


def test_a_handle_left_on_the_lower_file_does_not_answer_for_its_copy(tmp_path):
    """handles=bind-at-open: a read-only handle stays on the lower file after a copy-up;
    the capability shown is the upper copy's (removed here), not the lower file's."""
    drv = _driver(tmp_path, handles="bind-at-open")
    try:
        node = drv.lookup(drv.root(), "f")
        reader = drv.open(node, os.O_RDONLY)
        assert _capability(drv, node.nodeid) == CAP
        writer = drv.open(node, os.O_WRONLY)   # copy-up, the capability with it
        drv.ops.removexattr(REQ, node.nodeid, "security.capability")
        drv.release(writer)
        assert os.getxattr(tmp_path / "lower" / "f", "security.capability") == CAP
        assert _capability(drv, node.nodeid) is None
        drv.release(reader)
        drv.settle()
    finally:
        drv.close()


def test_a_capability_question_answered_absent_makes_the_file_known_clean(drv, tmp_path, kills,
                                                                          monkeypatch):
    """The kernel asks for security.capability before a write and again before a chown
    (untar: twice per new file): once the handle found none, and no setuid/setgid bit, the
    file is known clean; the next question and a killing write read nothing of the file.
    A setxattr or chmod through any name voids that."""
    node, fh = drv.create(drv.root(), "new", os.O_WRONLY, 0o755)
    upper = tmp_path / "upper" / "new"
    reads: list[str] = []
    real_getxattr = os.getxattr
    monkeypatch.setattr(os, "getxattr", lambda *a, **k: reads.append(a[1]) or real_getxattr(*a, **k))
    # (a new file is known clean from its creation on, ``Files.made_clean``: nothing read;
    # a chmod voids that, and the question is answered from the file again)
    assert _capability(drv, node.nodeid) is None and reads == []
    drv.setattr(node, mode=0o755)
    assert _capability(drv, node.nodeid) is None
    assert reads == ["security.capability"]
    assert _capability(drv, node.nodeid) is None
    _write(drv, fh, 3)
    assert kills == [] and reads == ["security.capability"]
    monkeypatch.setattr(os, "getxattr", real_getxattr)

    alias = drv.link(node, drv.root(), "alias")
    drv.ops.setxattr(REQ, alias.nodeid, "security.capability", CAP, 0)
    assert _capability(drv, node.nodeid) == CAP
    _write(drv, fh, 1)
    assert len(kills) == 1 and "security.capability" not in os.listxattr(upper)
    assert _capability(drv, node.nodeid) is None
    drv.setattr(alias, mode=0o4755)
    _write(drv, fh, 1)
    assert len(kills) == 2 and stat.S_IMODE(os.lstat(upper).st_mode) == 0o755
    drv.release(fh)
    drv.settle()


def test_a_setuid_file_without_capability_is_not_known_clean(drv, tmp_path, kills):
    node, fh = drv.create(drv.root(), "suid", os.O_WRONLY, 0o4755)
    upper = tmp_path / "upper" / "suid"
    assert stat.S_IMODE(os.lstat(upper).st_mode) == 0o4755
    assert _capability(drv, node.nodeid) is None
    _write(drv, fh, 1)
    assert len(kills) == 1 and stat.S_IMODE(os.lstat(upper).st_mode) == 0o755
    drv.release(fh)
    drv.settle()


@pytest.mark.parametrize("change", ["chmod", "setxattr"])
def test_a_change_while_the_capability_is_read_voids_the_mark(drv, tmp_path, kills, monkeypatch,
                                                             change):
    """A chmod u+s or a setxattr of the capability that lands while the handle reads the
    capability (after the absent answer, before the mark) leaves the file not known clean:
    a killing write strips what it set."""
    node, fh = drv.create(drv.root(), "new", os.O_WRONLY, 0o755)
    upper = tmp_path / "upper" / "new"
    drv.setattr(node, mode=0o755)  # (voids the mark of its creation: ``Files.made_clean``)
    inode = drv.fs.handles.get(fh).inode
    real_fstat = os.fstat
    fired: list[bool] = []

    def fstat(fd):
        # what a chmod or setxattr by another thread does, in its order: the file
        # changes, then the inode's epoch moves (here: in this thread, which holds the
        # handle's lock, that a change through the handle would wait for)
        if not fired:
            fired.append(True)
            if change == "chmod":
                os.chmod(upper, 0o4755)
            else:
                os.setxattr(upper, "security.capability", CAP)
            inode.privs_may_grow()
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    assert _capability(drv, node.nodeid) is None   # (read before the change)
    monkeypatch.setattr(os, "fstat", real_fstat)
    assert fired
    _write(drv, fh, 1)
    assert len(kills) == 1
    assert stat.S_IMODE(os.lstat(upper).st_mode) == 0o755
    assert "security.capability" not in os.listxattr(upper)
    drv.release(fh)
    drv.settle()
