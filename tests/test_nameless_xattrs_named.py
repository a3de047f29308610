"""Xattr changes of an open file whose last name went
(``Files.setxattr_inode``) do what the same changes by name do: an access ACL set with
SETXATTR_ACL_KILL_SGID drops S_ISGID, security.capability set through the handle is
stripped by the next killing write (no stale known-clean mark), override xattrs
(xattr_permissions) stay hidden and refused. Each step on a named and a nameless copy of
one file, compared. Driven without FUSE (``core_driver``)."""
from __future__ import annotations

import errno
import os
import stat
import struct

import pytest

import helpers
from core_driver import REQ, CoreDriver, Walker
from overlaypc.engine import protocol as p
from overlaypc.engine.ops import Request

CAP = bytes.fromhex("0100000200200000000000000000000000000000")
WRITER = Request(uid=65534, gid=65534, pid=os.getpid())
# a minimal access ACL (user::rwx group::r-x other::r-x): version 2, (tag, perm, id)
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                      for tag, perm in ((1, 7), (4, 5), (0x20, 5)))


def _answer(call):
    try:
        return call()
    except OSError as e:
        return errno.errorcode[e.errno]


@pytest.mark.parametrize("xp", [0, 1, 2])
def test_nameless_xattr_changes_as_named_ones(tmp_path, xp):
    helpers.require("root")
    (tmp_path / "lower").mkdir()
    drv = CoreDriver.in_dir(tmp_path, xattr_permissions=xp)
    try:
        w = Walker(drv)
        got = {}
        for name in ("named", "nameless"):
            node, fh = w.create(name, os.O_RDWR, 0o2775)
            nodeid = node.nodeid
            drv.setattr(node, mode=0o2775)
            assert _capability(drv, nodeid) is None        # marks it known clean
            if name == "nameless":
                w.unlink(name)
            steps = []
            steps.append(_answer(lambda: drv.ops.setxattr(
                REQ, nodeid, "system.posix_acl_access", ACL, 0, p.SETXATTR_ACL_KILL_SGID)))
            steps.append(oct(drv.ops.getattr(REQ, nodeid).attr.mode))
            steps.append(_answer(lambda: drv.ops.setxattr(REQ, nodeid, "security.capability",
                                                          CAP, 0)))
            steps.append(_answer(lambda: drv.ops.getxattr(REQ, nodeid, "security.capability")))
            drv.ops.write(WRITER, nodeid, fh, memoryview(b"x"), 0, p.WRITE_KILL_SUIDGID)
            steps.append(_answer(lambda: drv.ops.getxattr(REQ, nodeid, "security.capability")))
            steps.append(sorted(n for n in drv.ops.listxattr(REQ, nodeid)))
            steps.append(_answer(lambda: drv.ops.setxattr(
                REQ, nodeid, "user.fuseoverlayfs.override_stat", b"0:0:0100777", 0)))
            steps.append(_answer(lambda: drv.ops.getxattr(
                REQ, nodeid, "user.containers.override_stat")))
            got[name] = steps
            drv.release(fh)
        assert got["nameless"] == got["named"], f"named {got['named']}\nnameless {got['nameless']}"
        assert not int(got["named"][1], 8) & stat.S_ISGID, got["named"]
        assert got["named"][4] == "ENODATA"
        drv.settle()
    finally:
        drv.close()


def _capability(drv, nodeid):
    try:
        return drv.ops.getxattr(REQ, nodeid, "security.capability")
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return None
