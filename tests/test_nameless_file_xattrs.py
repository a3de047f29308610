"""xattrs of an open file whose last name went (soak11: stress_crash EXTRA=1 seed 1, worker 2
op 100, ``fsetxattr`` through a fd of a copied-up file unlinked meanwhile answered ENOENT;
the plain directory and the kernel overlay set it). FUSE sends GETXATTR, LISTXATTR,
SETXATTR and REMOVEXATTR by node, without a handle, and that node has no name left: they go
through one of its open handles, as its SETATTR does (``Files``: an upper file is changed,
an unlinked lower one answers EEXIST as to ``fchmod``, and its xattrs are read from it).
Driven without FUSE (``core_driver``): the requests as the kernel sends them."""
from __future__ import annotations

import errno
import os

import pytest

from core_driver import REQ, CoreDriver, Walker


@pytest.fixture
def drv(tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_bytes(b"lower data")
    os.setxattr(lower / "f", "user.low", b"from the lower")
    d = CoreDriver.in_dir(tmp_path)
    yield d
    d.close()


def _open_unlinked(drv: CoreDriver, name: str, flags: int) -> tuple[int, int]:
    """Open ``name`` (``flags``), unlink it: (its nodeid, the handle)."""
    w = Walker(drv)
    fh = w.open(name, flags)
    nodeid = drv._open[fh]
    w.unlink(name)
    return nodeid, fh


def _answer(call):
    try:
        return call()
    except OSError as e:
        return errno.errorcode[e.errno]


@pytest.mark.parametrize("how", ["copied_up", "upper_only"])
def test_xattrs_of_an_open_upper_file_with_no_name(drv, how):
    if how == "upper_only":
        w = Walker(drv)
        _, fh0 = w.create("g", os.O_RDWR, 0o644)
        drv.release(fh0)
        nodeid, fh = _open_unlinked(drv, "g", os.O_RDWR)
    else:
        nodeid, fh = _open_unlinked(drv, "f", os.O_RDWR)  # copied up by the open
    ops = drv.ops
    got = _answer(lambda: ops.setxattr(REQ, nodeid, "user.k", b"v1", 0))
    assert got is None, f"fsetxattr of an open file with no name left: {got}"
    assert _answer(lambda: ops.getxattr(REQ, nodeid, "user.k")) == b"v1"
    assert "user.k" in _answer(lambda: ops.listxattr(REQ, nodeid))
    if how == "copied_up":  # the copy-up took the lower's xattrs
        assert _answer(lambda: ops.getxattr(REQ, nodeid, "user.low")) == b"from the lower"
    assert _answer(lambda: ops.removexattr(REQ, nodeid, "user.k")) is None
    assert _answer(lambda: ops.getxattr(REQ, nodeid, "user.k")) == "ENODATA"
    assert _answer(lambda: ops.removexattr(REQ, nodeid, "user.k")) == "ENODATA"
    # overlay-private names stay hidden and refused
    assert _answer(lambda: ops.setxattr(REQ, nodeid, "trusted.overlay.x", b"", 0)) == "EPERM"
    assert not [n for n in ops.listxattr(REQ, nodeid) if n.startswith("trusted.overlay.")]
    drv.release(fh)


def test_xattrs_of_an_open_lower_file_with_no_name(drv, tmp_path):
    """Read-only open of a lower file, unlinked (a whiteout now): its xattrs read from the
    lower file; a change answers EEXIST (as ``fchmod``, and as the kernel overlay: its
    copy-up finds the name taken by the whiteout)."""
    nodeid, fh = _open_unlinked(drv, "f", os.O_RDONLY)
    ops = drv.ops
    assert _answer(lambda: ops.getxattr(REQ, nodeid, "user.low")) == b"from the lower"
    assert _answer(lambda: ops.listxattr(REQ, nodeid)) == ["user.low"]
    assert _answer(lambda: ops.setxattr(REQ, nodeid, "user.k", b"v", 0)) == "EEXIST"
    assert _answer(lambda: ops.removexattr(REQ, nodeid, "user.low")) == "EEXIST"
    assert os.listxattr(tmp_path / "lower" / "f") == ["user.low"]
    drv.release(fh)
