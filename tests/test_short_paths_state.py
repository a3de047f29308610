"""The short LOOKUP, UNLINK, CREATE, SETATTR, capability GETXATTR and RELEASE leave the same state as
the generic paths (review47a): two mounts' cores over identical trees run one sequence,
one asking each short path first (as the engine does, the generic one when it declines),
the other only the generic paths; after every step the answers (nodeids, attributes
but times and backing numbers) and the state must match: the node table (names, kernel
references, handles, which nodes keep a key), the lookup cache's directories, the kept
files and absences, the lookup and node-table epochs, the ``pathguard`` count, the change
count, the inode table, the invalidations sent. Driven without FUSE.
"""
from __future__ import annotations

import errno
import os

import pytest

from overlaypc.engine import protocol as p
from overlaypc.engine.ops import Request
from overlaypc.engine.protocol import SetAttr
from overlaypc.killpriv import CAPABILITY_XATTR
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import REQ, make_ops

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"


def _tree(base):
    for d in ("lower/mg", "upper", "work", "mnt"):
        (base / d).mkdir(parents=True)
    (base / "lower" / "mg" / "lo").write_text("lower")


class Side:
    """One core; ``short``: each request asks the short path first, through the hook the
    engine takes (``Session._bind_shorts``: unset where the core sets none)."""

    def __init__(self, base, short: bool, options: dict) -> None:
        _tree(base)
        self.base = base
        self.ops, self.close = make_ops(base, **options)
        self.short = short
        #: the requests each short path answered
        self.answered: dict[str, int] = {}

    def _took(self, what: str) -> None:
        self.answered[what] = self.answered.get(what, 0) + 1

    def lookup(self, parent: int, name: str):
        ops, raw = self.ops, name.encode()
        got = ops.lookup_name(parent, raw) if self.short and ops.lookup_name else None
        if got is None:
            e = ops.lookup(REQ, parent, raw)
            return (e.nodeid, _attr(e.attr))
        self._took("lookup")
        if isinstance(got, bytes):
            return (p.ENTRY_OUT.unpack_from(got)[0], None)
        if type(got) is tuple:  # (a cached directory's entry, packed; an ``Entry`` is a named tuple)
            nodeid, packed = got
            assert p.ENTRY_OUT.unpack_from(packed)[0] == nodeid
            return (nodeid, _attr(p.unpack_attr(packed, p.ENTRY_HEAD.size)))
        return (got.nodeid, _attr(got.attr))

    def create(self, parent: int, name: str, flags: int, mode: int, umask: int = 0):
        """(nodeid, attributes, handle) of the new file."""
        ops, raw = self.ops, name.encode()
        if self.short and ops.create_name:
            got = ops.create_name(REQ.uid, REQ.gid, parent, raw, flags, mode, umask)
            if got is not None:
                self._took("create")
                nodeid, fh, reply = got
                assert p.ENTRY_OUT.unpack_from(reply)[0] == nodeid
                assert p.OPEN_OUT.unpack_from(reply, p.ENTRY_OUT.size)[0] == fh
                return nodeid, _attr(p.unpack_attr(reply, p.ENTRY_HEAD.size)), fh
        entry, opened = ops.create(Request(REQ.uid, REQ.gid, REQ.pid, 0, umask), parent, raw,
                                   flags, mode, 0)
        return entry.nodeid, _attr(entry.attr), opened.fh

    def unlink(self, parent: int, name: str):
        ops, raw = self.ops, name.encode()
        if not (self.short and ops.unlink_name and ops.unlink_name(parent, raw)):
            ops.unlink(REQ, parent, raw)
        else:
            self._took("unlink")

    def setattr(self, node: int, sa: SetAttr):
        ops = self.ops
        if self.short and ops.setattr_node:
            fields = p.SETATTR_IN.unpack(sa.encode())
            got = ops.setattr_node(0, 0, os.getpid(), node, fields)
            if got is not None:
                self._took("setattr")
                return _attr(p.unpack_attr(got, 16))
        return _attr(ops.setattr(REQ, node, sa).attr)

    def capability(self, node: int):
        ops = self.ops
        if self.short and ops.capability_node:
            got = ops.capability_node(node)
            if got is not None:
                self._took("capability")
                if isinstance(got, int):
                    raise OSError(got, os.strerror(got))
                return got
        return ops.getxattr(REQ, node, CAPABILITY_XATTR)

    def release(self, node: int, fh: int, flags: int):
        if self.short:
            self.ops.release_fh(node, fh, flags)
        else:
            self.ops.release(REQ, node, fh, flags)

    def state(self) -> dict:
        ops = self.ops
        fs, nodes, lk = ops.fs, ops.nodes, ops.fs.lookup
        table = {}
        for nodeid, n in nodes._nodes.items():
            table[nodeid] = (sorted(n.names), n.nlookup, sorted(n.fhs or ()), n.is_dir,
                             nodes._by_key.get(n.key) == nodeid, n.gone is not None)
        return {
            "nodes": table, "names": sorted(nodes._by_name.items()),
            "dirs": sorted(lk._dirs), "absent": sorted(lk._absent),
            "recent": sorted((d, sorted(names)) for d, names in lk._recent.items()),
            "epochs": (lk._epoch, nodes.epoch, fs.paths.moves, ops._change),
            "inodes": sorted((i.rel, i.refs, i.privs_clean == i.privs_epoch)
                             for i in fs.inodes.live()),
            "inval": list(ops.notifier.inval),
            "handles": sorted((h.path, h.flags, h.inode.rel) for h in fs.handles._handles.values()),
            "numbers kept": len(fs.inos._cache), "passthrough": len(ops.passthrough),
        }


def _attr(a):
    """A reply's attributes without times and backing numbers (two trees' files)."""
    return None if a is None else (a.mode, a.nlink, a.uid, a.gid, a.size)


def _run(side: Side) -> list:
    out = []

    def step(what, fn):
        try:
            res = ("ok", fn())
        except OSError as e:
            res = ("err", errno.errorcode.get(e.errno, e.errno))
        out.append((what, res, side.state()))
        return res[1] if res[0] == "ok" else None

    ops = side.ops
    up = step("mkdir up", lambda: ops.mkdir(REQ, ROOT_ID, b"up", 0o755).nodeid)
    d = step("mkdir up/d", lambda: ops.mkdir(REQ, up, b"d", 0o755).nodeid)
    step("lookup x", lambda: side.lookup(d, "x"))
    x, _, fh = step("create x", lambda: side.create(d, "x", os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                                    0o100644))
    step("write x", lambda: ops.write(REQ, x, fh, memoryview(b"data"), 0, 0))
    step("cap x", lambda: side.capability(x))
    step("setxattr cap x", lambda: ops.setxattr(REQ, x, CAPABILITY_XATTR, CAP, 0))
    step("chmod x 4755", lambda: side.setattr(x, SetAttr(p.FATTR_MODE, None, 0, None, None,
                                                        0o104755, 0, 0)))
    step("cap x again", lambda: side.capability(x))
    step("utimens x", lambda: side.setattr(x, SetAttr(p.FATTR_ATIME | p.FATTR_MTIME, None, 0,
                                                     10**18, 2 * 10**18, 0, 0, 0)))
    step("chown x", lambda: side.setattr(x, SetAttr(p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID,
                                                   None, 0, None, None, 0, 1234, 5678)))
    step("cap x stripped", lambda: side.capability(x))
    step("cap x clean", lambda: side.capability(x))
    step("release x", lambda: side.release(x, fh, os.O_RDWR))
    step("lookup x found", lambda: side.lookup(d, "x"))
    step("link y", lambda: ops.link(REQ, x, d, b"y").nodeid)
    step("lookup y", lambda: side.lookup(d, "y"))
    fh = step("open x", lambda: ops.open(REQ, x, os.O_RDWR).fh)
    step("chmod x (two links)", lambda: side.setattr(x, SetAttr(p.FATTR_MODE, None, 0, None, None,
                                                               0o100600, 0, 0)))
    step("unlink y", lambda: side.unlink(d, "y"))
    step("chmod x (one link)", lambda: side.setattr(x, SetAttr(p.FATTR_MODE, None, 0, None, None,
                                                              0o100640, 0, 0)))
    step("unlink x", lambda: side.unlink(d, "x"))
    step("lookup x gone", lambda: side.lookup(d, "x"))
    step("chmod x (no name)", lambda: side.setattr(x, SetAttr(p.FATTR_MODE, None, 0, None, None,
                                                             0o100644, 0, 0)))
    step("cap x (no name)", lambda: side.capability(x))
    again = step("create x again", lambda: side.create(d, "x", os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                                       0o100600))
    step("release old x", lambda: side.release(x, fh, os.O_RDWR))
    step("release x again", lambda: side.release(again[0], again[2], os.O_RDWR))
    # a name the kernel knows alone of two links goes: its node keeps its key for the other
    k, _, kfh = step("create k", lambda: side.create(d, "k", os.O_RDWR | os.O_CREAT, 0o100644))
    step("release k", lambda: side.release(k, kfh, os.O_RDWR))
    step("link k2", lambda: ops.link(REQ, k, d, b"k2").nodeid)
    step("forget k", lambda: ops.forget(k, 2))
    step("lookup k2", lambda: side.lookup(d, "k2"))
    step("unlink k2", lambda: side.unlink(d, "k2"))
    step("lookup k", lambda: side.lookup(d, "k"))
    # creations the short path leaves to the generic one: no negative LOOKUP before (no kept
    # absence), a name made behind the mount's back after it (EEXIST), special bits; and
    # one it takes with a umask and O_TRUNC
    step("create c (no lookup)", lambda: side.create(d, "c", os.O_WRONLY | os.O_CREAT, 0o100644)[:2])
    step("lookup m", lambda: side.lookup(d, "m"))
    step("m made behind the mount", lambda: (side.base / "upper/up/d/m").write_text("m"))
    step("create m (taken)", lambda: side.create(d, "m", os.O_WRONLY | os.O_CREAT, 0o100644)[:2])
    step("lookup m again", lambda: side.lookup(d, "m"))
    step("lookup sp", lambda: side.lookup(d, "sp"))
    step("create sp 2755", lambda: side.create(d, "sp", os.O_WRONLY | os.O_CREAT, 0o102755)[:2])
    step("lookup u", lambda: side.lookup(d, "u"))
    u, _, ufh = step("create u (umask, O_TRUNC)", lambda: side.create(
        d, "u", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o100666, 0o027))
    step("release u", lambda: side.release(u, ufh, os.O_RDWR))
    step("mkdir sub", lambda: ops.mkdir(REQ, d, b"sub", 0o755).nodeid)
    step("lookup sub", lambda: side.lookup(d, "sub"))
    step("symlink s", lambda: ops.symlink(REQ, d, b"s", b"x").nodeid)
    step("lookup s", lambda: side.lookup(d, "s"))
    step("unlink s", lambda: side.unlink(d, "s"))
    step("unlink sub", lambda: side.unlink(d, "sub"))
    step("unlink absent", lambda: side.unlink(d, "nothing"))
    step("mknod fifo", lambda: ops.mknod(REQ, d, b"f", 0o010644, 0).nodeid)
    step("unlink fifo", lambda: side.unlink(d, "f"))
    mg = step("lookup mg", lambda: side.lookup(ROOT_ID, "mg")[0])
    step("lookup mg/new (merged)", lambda: side.lookup(mg, "new"))
    # a lower file open read-only, then for writing (a copy-up: under handles=bind-at-open the first
    # handle stays on the lower file), changed through the node
    lo = step("lookup mg/lo", lambda: side.lookup(mg, "lo")[0])
    ro = step("open lo ro", lambda: ops.open(REQ, lo, os.O_RDONLY).fh)
    step("chmod lo (lower)", lambda: side.setattr(lo, SetAttr(p.FATTR_MODE, None, 0, None, None,
                                                             0o100600, 0, 0)))
    step("cap lo (lower)", lambda: side.capability(lo))
    rw = step("open lo rw", lambda: ops.open(REQ, lo, os.O_RDWR).fh)
    step("chmod lo (copied up)", lambda: side.setattr(lo, SetAttr(p.FATTR_MODE, None, 0, None,
                                                                 None, 0o100640, 0, 0)))
    step("cap lo (copied up)", lambda: side.capability(lo))
    step("release lo ro", lambda: side.release(lo, ro, os.O_RDONLY))
    step("chmod lo (one handle)", lambda: side.setattr(lo, SetAttr(p.FATTR_MODE, None, 0, None,
                                                                  None, 0o100644, 0, 0)))
    step("release lo rw", lambda: side.release(lo, rw, os.O_RDWR))
    step("rename up/d -> up/e", lambda: ops.rename(REQ, up, b"d", up, b"e", 0))
    step("lookup x after rename", lambda: side.lookup(d, "x"))
    step("unlink x after rename", lambda: side.unlink(d, "x"))
    step("lookup x after unlink", lambda: side.lookup(d, "x"))
    return out


#: mount options, and the requests the short paths answer under them (no short CREATE where
#: IDs or link counts are shown otherwise: ``static_nlink`` sets ``Ownership.active``)
OPTIONS = {
    "default": ({}, {"lookup": 13, "create": 3, "unlink": 6, "setattr": 6, "capability": 7}),
    "index": ({"index": True}, {"lookup": 13, "create": 3, "setattr": 6, "capability": 7}),
    # (the copied-up lower file: first metadata only, by the chmod by name)
    "metacopy": ({"metacopy": True},
                 {"lookup": 13, "create": 3, "unlink": 6, "setattr": 4, "capability": 6}),
    "userxattr": ({"userxattr": True},
                  {"lookup": 13, "create": 3, "unlink": 6, "setattr": 6, "capability": 7}),
    "noxattrs": ({"noxattrs": True}, {"lookup": 13, "create": 3, "unlink": 6, "setattr": 6}),
    "static_nlink": ({"static_nlink": True}, {"lookup": 13, "unlink": 6, "capability": 7}),
    "cache=shared": ({"cache": "shared"},
                     {"lookup": 13, "create": 3, "unlink": 6, "setattr": 6, "capability": 7}),
    # (the read-only handle left on the lower file, the first one asked, answers nothing)
    "handles=bind-at-open": ({"handles": "bind-at-open"},
                     {"lookup": 13, "create": 3, "unlink": 6, "setattr": 5, "capability": 5}),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_short_paths_leave_the_state_the_generic_ones_leave(tmp_path, name):
    options, answered = OPTIONS[name]
    sides = [Side(tmp_path / "short", True, options), Side(tmp_path / "generic", False, options)]
    try:
        short, generic = (_run(s) for s in sides)
    finally:
        for s in reversed(sides):  # (each core restores the umask it found: last made, first closed)
            s.close()
    for (what, sres, sstate), (_, gres, gstate) in zip(short, generic):
        assert sres == gres, f"{what}: short {sres}, generic {gres}"
        diff = {k: (sstate[k], gstate[k]) for k in sstate if sstate[k] != gstate[k]}
        assert not diff, f"{what}: " + "\n".join(f"{k}:\n short   {s}\n generic {g}"
                                                for k, (s, g) in diff.items())
    # (LOOKUP: not the first in a directory MKDIR made in the root, nor in the root, a
    # merged or a renamed one; CREATE: not without a LOOKUP before, nor over a name made
    # behind the mount's back, nor with special bits; SETATTR: not with two links or none,
    # nor a lower file; UNLINK: not a directory or an absent name)
    assert sides[0].answered == answered
