"""A creation's reply entry (built in its lock hold from the stat it holds,
``OverlayOps._made``) says what a later LOOKUP and GETATTR say, in every configuration
that changes inode numbers or shown attributes: xino (lower on another filesystem),
index=on, metacopy=on, xattr_permissions=1/2, uidmapping, another user's object (built in
workdir/work), over a whiteout (a directory there is opaque). Compared with a fresh core
on the same layers (nothing cached). Driven without FUSE (``core_driver``).
"""
from __future__ import annotations

import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver
from overlaypc.config import MountConfig, validate
from overlaypc.engine.ops import Request
from overlaypc.idmap import IdMap

OTHER = Request(uid=1000, gid=1000, pid=os.getpid())

_KINDS = {
    "mkdir": lambda drv, req, d, name: drv.ops.mkdir(req, d.nodeid, name, 0o2755),
    "mknod": lambda drv, req, d, name: drv.ops.mknod(req, d.nodeid, name, stat.S_IFIFO | 0o644, 0),
    "symlink": lambda drv, req, d, name: drv.ops.symlink(req, d.nodeid, name, b"target"),
    "link": lambda drv, req, d, name: drv.ops.link(req, drv.lookup(d, "f").nodeid, d.nodeid, name),
    "create": lambda drv, req, d, name: drv.ops.create(req, d.nodeid, name, os.O_WRONLY | os.O_CREAT,
                                                       stat.S_IFREG | 0o4755),
}

_CONFIGS = {
    "plain": {},
    "index": {"index": True},
    "metacopy": {"metacopy": True, "index": True},
    "xattr_permissions1": {"xattr_permissions": 1},
    "xattr_permissions2": {"xattr_permissions": 2},
    "uidmapping": {"uidmapping": IdMap.parse("0:100000:65536"),
                   "gidmapping": IdMap.parse("0:100000:65536")},
}


def _driver(lower, base, options) -> CoreDriver:
    for d in ("upper", "work", "mnt"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    cfg = MountConfig(lowers=[str(lower)], upper=os.path.join(base, "upper"),
                      work=os.path.join(base, "work"), mountpoint=os.path.join(base, "mnt"),
                      **options)
    validate(cfg)
    return CoreDriver(cfg)


def _fields(attr):
    """The reply's attributes but atime (a later read may move it)."""
    return attr._replace(atime_ns=0)


@pytest.mark.parametrize("xino", [False, True], ids=["samefs", "xino"])
@pytest.mark.parametrize("where", ["fresh", "over-whiteout", "over-dir-whiteout", "other-user"])
@pytest.mark.parametrize("config", sorted(_CONFIGS))
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_reply_entry_is_what_a_later_lookup_says(tmp_path, tmpfs_factory, kind, config, where, xino):
    lower = tmpfs_factory() if xino else tmp_path / "lower"
    layer = {"d/f": "f's data\n", "d/f2": helpers.HardLink("d/f")}
    if where == "over-whiteout":
        layer["d/n"] = "lower n\n"
    if where == "over-dir-whiteout":
        layer["d/n/x"] = "lower x\n"
    helpers.build_layer(lower, layer)
    base = tmp_path / "ov"
    options = dict(_CONFIGS[config])
    drv = _driver(lower, base, options)
    try:
        d = drv.lookup(drv.root(), "d")
        if where == "over-whiteout":
            drv.unlink(d, "n")
        elif where == "over-dir-whiteout":
            n = drv.lookup(d, "n")
            drv.unlink(n, "x")
            drv.rmdir(d, "n")
        req = OTHER if where == "other-user" else REQ
        got = _KINDS[kind](drv, req, d, b"n")
        entry = got[0] if kind == "create" else got
        if kind == "create":
            drv.ops.release(REQ, entry.nodeid, got[1].fh)
        drv._ref(entry)
        reply = _fields(entry.attr)
        again = _fields(drv.ops.getattr(REQ, entry.nodeid).attr)
        assert reply == again, f"reply {reply}\n getattr {again}"
        looked = drv.ops.lookup(REQ, d.nodeid, b"n")
        drv._ref(looked)
        assert looked.nodeid == entry.nodeid
        drv.settle()
    finally:
        drv.close()
    fresh = _driver(lower, base, options)
    try:
        d = fresh.lookup(fresh.root(), "d")
        looked = fresh.ops.lookup(REQ, d.nodeid, b"n")
        fresh._ref(looked)
        later = _fields(fresh.ops.getattr(REQ, looked.nodeid).attr)
        assert reply == later, f"reply {reply}\n a fresh mount's {later}"
        fresh.settle()
    finally:
        fresh.close()
