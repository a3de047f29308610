"""A creation (MKDIR, MKNOD, SYMLINK, LINK, CREATE) answers an error only when nothing was
made.

After the object is made and named on disk, the adapter reads what its reply needs (the new
object's attributes, its node): a failure there (EMFILE or ENFILE at the fd limit, EIO)
answered an error for an object that exists, so the client (``mkdir -p``, ``cp``, a package
manager) believed nothing was made, retried and got EEXIST, or left an object it never
meant to keep. Fault point ``ops.made`` fails that step (in the creation's namespace lock
hold, the new object named): the answer is the error, and the object must be gone (a name
that hid a lower one hides it again), nothing left referenced or open. And a rename of the
new name after the creation's hold, before its reply (``ops.created``), leaves the reply's
node named by its new name. Driven without FUSE (``core_driver``).
"""
from __future__ import annotations

import errno
import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver, paused_at
from overlaypc import faults
from overlaypc.engine.ops import Request

OTHER = Request(uid=1000, gid=1000, pid=os.getpid())

_KINDS = {
    "mkdir": lambda drv, req, d, name: drv.ops.mkdir(req, d.nodeid, name, 0o755),
    "mknod": lambda drv, req, d, name: drv.ops.mknod(req, d.nodeid, name, stat.S_IFIFO | 0o644, 0),
    "symlink": lambda drv, req, d, name: drv.ops.symlink(req, d.nodeid, name, b"target"),
    "link": lambda drv, req, d, name: drv.ops.link(req, drv.lookup(d, "f").nodeid, d.nodeid, name),
    "create": lambda drv, req, d, name: drv.ops.create(req, d.nodeid, name, os.O_WRONLY | os.O_CREAT,
                                                       stat.S_IFREG | 0o644),
}


def _make(drv: CoreDriver, kind: str, req: Request, d, name: str):
    """One creation request; its node (references counted, a CREATE's handle released)."""
    got = _KINDS[kind](drv, req, d, os.fsencode(name))
    if kind == "create":
        entry, opened = got
        drv.ops.release(REQ, entry.nodeid, opened.fh)
        got = entry
    return drv._ref(got)


@pytest.mark.parametrize("where", ["fresh", "over-whiteout", "other-user", "index"])
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_a_failed_reply_entry_leaves_nothing_made(tmp_path, kind, where):
    """``d/n`` is made (a fresh name; over the whiteout of a lower ``d/n``; by another
    user, so built in ``workdir/work`` and renamed into place; index=on), and reading its
    reply's entry fails (EIO at ``ops.made``). The answer is EIO, and then nothing is at
    ``d/n`` (a lower ``d/n`` stays hidden), the same request again succeeds, no reference
    or handle is left, and a LINK's source keeps its link count. Before: the object was
    there after the error (``lookup`` found it), and the retry answered EEXIST."""
    lower = {"d/f": "f's data\n"}
    if where == "over-whiteout":
        lower["d/n"] = "lower n\n"
    if where == "index":
        lower["d/f2"] = helpers.HardLink("d/f")
    helpers.build_layer(tmp_path / "lower", lower)
    drv = CoreDriver.in_dir(tmp_path, index=where == "index")
    try:
        d = drv.lookup(drv.root(), "d")
        if where == "over-whiteout":
            drv.unlink(d, "n")
        req = OTHER if where == "other-user" else REQ
        links = drv.getattr(drv.lookup(d, "f")).nlink
        handles = len(drv.fs.handles)
        faults.configure("ops.made=eio")
        try:
            _make(drv, kind, req, d, "n")
            answer = None
        except OSError as e:
            answer = e
        finally:
            faults.configure(None)
        assert answer is not None and answer.errno == errno.EIO, answer
        assert drv.lookup(d, "n") is None, f"{kind} answered EIO and left d/n"
        upper = tmp_path / "upper" / "d" / "n"
        if where == "over-whiteout":  # the whiteout is back: the lower n stays hidden
            st = os.lstat(upper)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, oct(st.st_mode)
        else:
            assert not os.path.lexists(upper)
        assert os.listdir(tmp_path / "work" / "work") == []
        assert len(drv.fs.handles) == handles
        assert drv.getattr(drv.lookup(d, "f")).nlink == links
        if where == "index":
            assert drv.getattr(drv.lookup(d, "f2")).nlink == links
        made = _make(drv, kind, req, d, "n")  # the client's retry
        assert drv.lookup(d, "n").nodeid == made.nodeid
        if kind == "link":
            assert drv.getattr(drv.lookup(d, "f")).nlink == links + 1
        drv.settle()
    finally:
        faults.configure(None)
        drv.close()


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_a_rename_of_the_new_name_before_the_reply(tmp_path, kind):
    """``d/n`` is made; after the creation's namespace lock hold, before its reply
    (``ops.created``), another client renames it to ``d/m``. The reply is the new object's
    node (its entry taken in the hold that made it), now named ``m``: a LOOKUP of ``m``
    gives that node, of ``n`` nothing."""
    helpers.build_layer(tmp_path / "lower", {"d/f": "f's data\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        d = drv.lookup(drv.root(), "d")
        got = paused_at("ops.created", lambda: _make(drv, kind, REQ, d, "n"),
                        lambda: drv.rename(d, "n", d, "m"))
        assert not isinstance(got, Exception), got
        assert drv.lookup(d, "n") is None
        assert drv.lookup(d, "m").nodeid == got.nodeid
        assert drv.getattr(got).mode == drv.getattr(drv.lookup(d, "m")).mode
        drv.settle()
    finally:
        faults.configure(None)
        drv.close()
