"""The fifteenth round's short paths together (review48a): CREATE (with its known-clean
mark and MKDIR's cached directory; the sixteenth round's passthrough open of the new file
and packed entry of a directory found again), READDIRPLUS, the read-only OPEN and BATCH_FORGET, with
the earlier ones (LOOKUP, UNLINK, SETATTR, capability GETXATTR, RELEASE), through the
session as the kernel sends them: two cores over identical trees, one session with every
short hook bound, the other with none; the same requests. Each reply (the open flags of
CREATE and OPEN, the fh, a listing's entries with their nodeids and attributes, read data;
not times nor backing numbers) and the state after each request (``test_short_paths_state``'s:
node table, lookup cache, kept files and absences, epochs, inodes and their clean marks,
handles, invalidations) must match, under each mount option set. Driven through the fake
kernel, without FUSE.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import time

import pytest

from engine_support import FakeKernel, parse_dirents
from overlaypc.engine import protocol as p
from overlaypc.listings import KEY_BITS
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import make_ops

#: the hooks a session binds short handlers for (``Session._bind_shorts``)
_HOOKS = ("lookup_name", "unlink_name", "create_name", "setattr_node", "capability_node",
          "release_fh", "forget_nodes", "open_node", "readdirplus_node", "mkdir_name",
          "rmdir_name")
_KEY_MASK = (1 << KEY_BITS) - 1
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"


def _tree(base) -> None:
    for d in ("lower/mg/sub", "lower/lo_only/deep", "upper/mg", "work", "mnt"):
        (base / d).mkdir(parents=True)
    (base / "lower" / "mg" / "lo").write_text("lower lo")
    (base / "lower" / "mg" / "sub" / "s").write_text("s")
    for i in range(6):
        (base / "lower" / "lo_only" / f"f{i}").write_text("x" * i)
    (base / "lower" / "lo_only" / "deep" / "z").write_text("z")
    os.link(base / "lower" / "lo_only" / "f1", base / "lower" / "lo_only" / "hl")
    (base / "upper" / "mg" / "up").write_text("upper")


class Side:
    def __init__(self, base, short: bool, options: dict) -> None:
        self.base = base
        self.ops, self._close = make_ops(base, **options)
        #: the requests each short hook answered
        self.answered: dict[str, int] = {}
        for hook in _HOOKS:
            fn = getattr(self.ops, hook)
            setattr(self.ops, hook, None if not short or fn is None else self._counted(hook, fn))
        self.fk = FakeKernel(self.ops)
        self.fk.start()
        self.shorts = set(self.fk.session._shorts)
        #: how many notifications the run waits for (the generic side's count, once known)
        self.expect = 0

    def _counted(self, hook: str, fn):
        def counted(*args):
            got = fn(*args)
            if got is not None and got is not False or hook in ("forget_nodes", "release_fh"):
                self.answered[hook] = self.answered.get(hook, 0) + 1
            if type(got) is tuple and hook == "lookup_name":  # (a found directory, packed)
                self.answered["lookup_name found dir"] = self.answered.get("lookup_name found dir", 0) + 1
            return got
        return counted

    def close(self) -> None:
        self.fk.close()
        self._close()

    def req(self, op: int, nodeid: int, body: bytes = b"") -> tuple[int, bytes]:
        r = self.fk.request(op, nodeid, body)
        self.last = r.body
        return r.error, r.body

    def state(self) -> dict:
        ops = self.ops
        fs, nodes, lk = ops.fs, ops.nodes, ops.fs.lookup
        table = {}
        with nodes._lock:
            for nodeid, n in nodes._nodes.items():
                table[nodeid] = (sorted(n.names), n.nlookup, sorted(n.fhs or ()), n.is_dir,
                                 nodes._by_key.get(n.key) == nodeid, n.gone is not None, n.prot)
        return {
            "nodes": table, "names": sorted(nodes._by_name.items()),
            "dirs": sorted(lk._dirs), "absent": sorted(lk._absent),
            "recent": sorted((d, sorted(names)) for d, names in lk._recent.items()),
            "epochs": (lk._epoch, nodes.epoch, fs.paths.moves, ops._change),
            "inodes": sorted((_n(i.rel), i.refs, i.privs_clean == i.privs_epoch, i.data_version,
                              i.cached_version) for i in fs.inodes.live()),
            "handles": sorted((_n(h.path), h.flags, _n(h.inode.rel)) for h in fs.handles._handles.values()),
            "numbers kept": len(fs.inos._cache), "passthrough": len(ops.passthrough),
            "snapshots": (len(ops._snapshots), ops._snapshots.entries),
        }


def _n(rel: str) -> str:
    """A path without the inode number a file with no name is named by (``#N``)."""
    return re.sub(r"#[0-9]+", "#N", rel)


def _attr(body: bytes, at: int) -> tuple:
    a = p.unpack_attr(body, at)
    return (a.mode, a.nlink, a.uid, a.gid, a.size)


def _reply(op: int, err: int, body: bytes):
    """What a reply says, without times and backing numbers."""
    if err:
        return ("err", errno.errorcode.get(-err, err))
    if op in (p.LOOKUP, p.MKDIR, p.LINK):
        nodeid = p.ENTRY_HEAD.unpack_from(body)[0]
        return (nodeid, _attr(body, p.ENTRY_HEAD.size) if nodeid else None)
    if op in (p.CREATE, p.TMPFILE):
        nodeid = p.ENTRY_HEAD.unpack_from(body)[0]
        return (nodeid, _attr(body, p.ENTRY_HEAD.size), p.OPEN_OUT.unpack_from(body, p.ENTRY_OUT.size))
    if op == p.OPEN:
        return p.OPEN_OUT.unpack_from(body)
    if op == p.READDIRPLUS:
        out, pos = [], 0
        for name, _ino, off, typ, nodeid in parse_dirents(body, True):
            attr = _attr(body, pos + p.ENTRY_HEAD.size) if nodeid else None
            out.append((name, off & _KEY_MASK, typ, nodeid, attr))
            pos += p.ENTRY_OUT_SIZE + ((p.DIRENT.size + len(name) + 7) & ~7)
        return out
    if op in (p.SETATTR, p.GETATTR):
        return _attr(body, 16)
    return body


def _create(flags: int, mode: int, umask: int, name: bytes) -> bytes:
    return p.CREATE_IN.pack(flags, mode, umask, 0) + name + b"\0"


def _run(side: Side) -> list:
    out = []

    def step(what, op, nodeid, body=b""):
        err, data = side.req(op, nodeid, body)
        res = _reply(op, err, data)
        out.append((what, res, side.state()))
        return res

    def forget(what, pairs):
        side.fk.batch_forget(pairs)
        side.req(p.STATFS, ROOT_ID)  # (handled after it: the session answers in order)
        out.append((what, None, side.state()))

    up = step("mkdir up", p.MKDIR, ROOT_ID, p.MKDIR_IN.pack(0o755, 0) + b"up\0")[0]
    d = step("mkdir up/d", p.MKDIR, up, p.MKDIR_IN.pack(0o755, 0) + b"d\0")[0]
    step("lookup a", p.LOOKUP, d, b"a\0")
    a, _, (afh, _, _) = step("create a", p.CREATE, d, _create(os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                                              0o100666, 0o022, b"a"))
    step("write a", p.WRITE, a, p.WRITE_IN.pack(afh, 0, 4, 0, 0, 0, 0) + b"data")
    step("cap a", p.GETXATTR, a, p.GETXATTR_IN.pack(64, 0) + b"security.capability\0")
    step("chmod a", p.SETATTR, a, p.SetAttr(p.FATTR_MODE, None, 0, None, None, 0o100640, 0, 0).encode())
    step("release a", p.RELEASE, a, p.RELEASE_IN.pack(afh, os.O_RDWR, 0, 0))
    step("lookup b", p.LOOKUP, d, b"b\0")
    b, _, (bfh, _, _) = step("create b", p.CREATE, d, _create(os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                                              0o100644, 0, b"b"))
    step("setcap b", p.SETXATTR, b, p.SETXATTR_IN_EXT.pack(len(CAP), 0, 0, 0)
         + b"security.capability\0" + CAP)
    step("cap b", p.GETXATTR, b, p.GETXATTR_IN.pack(64, 0) + b"security.capability\0")
    step("release b", p.RELEASE, b, p.RELEASE_IN.pack(bfh, os.O_WRONLY, 0, 0))
    step("mkdir d/e", p.MKDIR, d, p.MKDIR_IN.pack(0o700, 0) + b"e\0")
    # tar's next new directory, below e: its name absent, each ancestor found again (the
    # kernel's LOOKUP_EXCL at each mkdirat), the name again, MKDIR (the sixteenth round's
    # packed entry of a cached directory: ``_found_dir``)
    e1 = step("lookup d/e (found)", p.LOOKUP, d, b"e\0")[0]
    step("lookup e/n", p.LOOKUP, e1, b"n\0")
    step("lookup up (found, in the root)", p.LOOKUP, ROOT_ID, b"up\0")
    step("lookup up/d (found)", p.LOOKUP, up, b"d\0")
    step("lookup d/e (found again)", p.LOOKUP, d, b"e\0")
    step("lookup e/n again", p.LOOKUP, e1, b"n\0")
    n = step("mkdir e/n", p.MKDIR, e1, p.MKDIR_IN.pack(0o755, 0) + b"n\0")[0]
    step("rmdir e/n", p.RMDIR, e1, b"n\0")
    forget("forget e/n", [(n, 1)])
    # the listing of the new directory (cached by MKDIR), its files opened read-only, the
    # listing's references given back in one BATCH_FORGET
    step("opendir d", p.OPENDIR, d, p.OPEN_IN.pack(os.O_RDONLY, 0))
    listed = step("readdirplus d", p.READDIRPLUS, d, p.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0))
    step("releasedir d", p.RELEASEDIR, d, p.RELEASE_IN.pack(0, 0, 0, 0))
    ofh = step("open a ro", p.OPEN, a, p.OPEN_IN.pack(os.O_RDONLY, 0))[0]
    step("read a", p.READ, a, p.READ_IN.pack(ofh, 0, 100, 0, 0, 0, 0))
    step("release a ro", p.RELEASE, a, p.RELEASE_IN.pack(ofh, os.O_RDONLY, 0, 0))
    dfh = step("open b direct", p.OPEN, b, p.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECT, 0))[0]
    step("release b direct", p.RELEASE, b, p.RELEASE_IN.pack(dfh, os.O_RDONLY | os.O_DIRECT, 0, 0))
    forget("forget the listing", [(e[3], 1) for e in listed if e[3]])
    # a lower-only directory (one pass) and a merged one, listed, their files opened
    for dname in (b"lo_only", b"mg"):
        dn = step(f"lookup {dname}", p.LOOKUP, ROOT_ID, dname + b"\0")[0]
        step(f"opendir {dname}", p.OPENDIR, dn, p.OPEN_IN.pack(os.O_RDONLY, 0))
        listed = step(f"readdirplus {dname}", p.READDIRPLUS, dn, p.READ_IN.pack(0, 0, 600, 0, 0, 0, 0))
        cookie = parse_dirents(side.last, True)[-1][2]  # (the last entry's, its snapshot's id in it)
        more = step(f"readdirplus {dname} more", p.READDIRPLUS, dn,
                    p.READ_IN.pack(0, cookie, 4096, 0, 0, 0, 0))
        step(f"releasedir {dname}", p.RELEASEDIR, dn, p.RELEASE_IN.pack(0, 0, 0, 0))
        for e in listed:
            if e[3] and e[2] == 8:  # (a regular file: DT_REG)
                fh = step(f"open {e[0]}", p.OPEN, e[3], p.OPEN_IN.pack(os.O_RDONLY, 0))[0]
                step(f"read {e[0]}", p.READ, e[3], p.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0))
                step(f"release {e[0]}", p.RELEASE, e[3], p.RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0))
        forget(f"forget {dname}", [(e[3], 1) for e in listed + list(more) if e[3]])
    # the new files again after their nodes went, changed by name and removed
    a2 = step("lookup a again", p.LOOKUP, d, b"a\0")[0]
    fh = step("open a again", p.OPEN, a2, p.OPEN_IN.pack(os.O_RDONLY, 0))[0]
    step("release a again", p.RELEASE, a2, p.RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0))
    step("unlink a", p.UNLINK, d, b"a\0")
    step("lookup a gone", p.LOOKUP, d, b"a\0")
    a3, _, (fh, _, _) = step("create a anew", p.CREATE, d, _create(os.O_RDWR | os.O_CREAT, 0o100600,
                                                                   0, b"a"))
    step("release a anew", p.RELEASE, a3, p.RELEASE_IN.pack(fh, os.O_RDWR, 0, 0))
    # flags set through the mount (chattr), on a named file and on ones with no name
    step("lookup b again", p.LOOKUP, d, b"b\0")
    step("chattr +a b", p.IOCTL, b, _setflags(0x20))
    step("lsattr b", p.IOCTL, b, _getflags())
    step("chmod b (+a)", p.SETATTR, b, p.SetAttr(p.FATTR_MODE, None, 0, None, None, 0o100600, 0, 0).encode())
    step("open b wo (+a)", p.OPEN, b, p.OPEN_IN.pack(os.O_WRONLY, 0))
    fh = step("open b ro (+a)", p.OPEN, b, p.OPEN_IN.pack(os.O_RDONLY, 0))[0]
    step("release b ro", p.RELEASE, b, p.RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0))
    step("unlink b (+a)", p.UNLINK, d, b"b\0")
    step("chattr -a b", p.IOCTL, b, _setflags(0))
    step("lookup c", p.LOOKUP, d, b"c\0")
    c, _, (cfh, _, _) = step("create c", p.CREATE, d, _create(os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                                              0o100644, 0, b"c"))
    step("unlink c (open)", p.UNLINK, d, b"c\0")
    step("chattr +i c (no name)", p.IOCTL, c, _setflags(0x10))
    step("lsattr c (no name)", p.IOCTL, c, _getflags())
    step("chmod c (no name, +i)", p.SETATTR, c, p.SetAttr(p.FATTR_MODE, None, 0, None, None, 0o100600,
                                                          0, 0).encode())
    step("cap c (no name)", p.GETXATTR, c, p.GETXATTR_IN.pack(64, 0) + b"security.capability\0")
    step("chattr -i c", p.IOCTL, c, _setflags(0))
    step("release c", p.RELEASE, c, p.RELEASE_IN.pack(cfh, os.O_RDWR, 0, 0))
    t, _, (tfh, _, _) = step("tmpfile", p.TMPFILE, d, p.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"/\0")
    step("cap tmpfile", p.GETXATTR, t, p.GETXATTR_IN.pack(64, 0) + b"security.capability\0")
    step("chattr +i tmpfile", p.IOCTL, t, _setflags(0x10))
    step("link tmpfile (+i)", p.LINK, d, p.LINK_IN.pack(t) + b"t\0")
    step("chattr -i tmpfile", p.IOCTL, t, _setflags(0))
    step("link tmpfile", p.LINK, d, p.LINK_IN.pack(t) + b"t\0")
    step("release tmpfile", p.RELEASE, t, p.RELEASE_IN.pack(tfh, os.O_RDWR, 0, 0))
    # the directory MKDIR cached, renamed, then made anew
    e = step("lookup e", p.LOOKUP, d, b"e\0")[0]
    step("rename e e2", p.RENAME, d, p.RENAME_IN.pack(d) + b"e\0e2\0")
    step("lookup e2/x", p.LOOKUP, e, b"x\0")
    x, _, (xfh, _, _) = step("create e2/x", p.CREATE, e, _create(os.O_WRONLY | os.O_CREAT, 0o100644,
                                                                 0, b"x"))
    step("release e2/x", p.RELEASE, x, p.RELEASE_IN.pack(xfh, os.O_WRONLY, 0, 0))
    step("unlink e2/x", p.UNLINK, e, b"x\0")
    step("rmdir e2", p.RMDIR, d, b"e2\0")
    e3 = step("mkdir e", p.MKDIR, d, p.MKDIR_IN.pack(0o755, 0) + b"e\0")[0]
    step("lookup e/y", p.LOOKUP, e3, b"y\0")
    y, _, (yfh, _, _) = step("create e/y", p.CREATE, e3, _create(os.O_WRONLY | os.O_CREAT, 0o100644,
                                                                 0, b"y"))
    step("release e/y", p.RELEASE, y, p.RELEASE_IN.pack(yfh, os.O_WRONLY, 0, 0))
    step("opendir e", p.OPENDIR, e3, p.OPEN_IN.pack(os.O_RDONLY, 0))
    listed = step("readdirplus e", p.READDIRPLUS, e3, p.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0))
    step("releasedir e", p.RELEASEDIR, e3, p.RELEASE_IN.pack(0, 0, 0, 0))
    forget("forget e's listing and e", [(e[3], 1) for e in listed if e[3]] + [(e3, 1), (y, 1)])
    step("lookup e/y again", p.LOOKUP, e3, b"y\0")
    # MKDIR and RMDIR in an upper-only directory (speed50b), and where the short ones leave
    # it to the generic paths: a umask, a sticky mode (special bits), a name taken (no kept
    # absence: EEXIST), a file (ENOTDIR), an absent name, a directory not empty (ENOTEMPTY),
    # one holding only a whiteout (a former mount's: empty in the merged view, removed)
    step("lookup d/m", p.LOOKUP, d, b"m\0")
    m = step("mkdir d/m (umask)", p.MKDIR, d, p.MKDIR_IN.pack(0o777, 0o027) + b"m\0")[0]
    step("mkdir d/m again", p.MKDIR, d, p.MKDIR_IN.pack(0o755, 0) + b"m\0")
    step("lookup d/t", p.LOOKUP, d, b"t\0")
    step("mkdir d/t (sticky)", p.MKDIR, d, p.MKDIR_IN.pack(0o1777, 0) + b"t\0")
    step("lookup m/f", p.LOOKUP, m, b"f\0")
    f, _, (ffh, _, _) = step("create m/f", p.CREATE, m, _create(os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                                                0o100644, 0, b"f"))
    step("release m/f", p.RELEASE, f, p.RELEASE_IN.pack(ffh, os.O_WRONLY, 0, 0))
    step("rmdir d/m (not empty)", p.RMDIR, d, b"m\0")
    step("rmdir d/a (a file)", p.RMDIR, d, b"a\0")
    step("rmdir d/nothing", p.RMDIR, d, b"nothing\0")
    step("unlink m/f", p.UNLINK, m, b"f\0")
    forget("forget m/f", [(f, 1)])
    os.mknod(side.base / "upper" / "up" / "d" / "m" / "w", stat.S_IFCHR, 0)  # (a whiteout)
    step("rmdir d/m (a whiteout in it)", p.RMDIR, d, b"m\0")
    step("lookup d/m gone", p.LOOKUP, d, b"m\0")
    step("rmdir d/t", p.RMDIR, d, b"t\0")
    # an rm -rf of an upper-only directory as fts and the kernel send it (speed49c): listed
    # twice (the emptiness check's one reply, then in full after a GETATTR), each file
    # unlinked and forgotten, the parent's GETATTR after each; among the files one copied
    # up from a lower directory and renamed there (an origin), and a subdirectory
    rmd = step("mkdir rmd", p.MKDIR, ROOT_ID, p.MKDIR_IN.pack(0o755, 0) + b"rmd\0")[0]
    step("mkdir rmd/sub", p.MKDIR, rmd, p.MKDIR_IN.pack(0o755, 0) + b"sub\0")[0]
    for name in (b"f1", b"f2"):
        step(f"lookup rmd/{name}", p.LOOKUP, rmd, name + b"\0")
        f, _, (ffh, _, _) = step(f"create rmd/{name}", p.CREATE, rmd,
                                 _create(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o100644, 0, name))
        step(f"release rmd/{name}", p.RELEASE, f, p.RELEASE_IN.pack(ffh, os.O_WRONLY, 0, 0))
    mg = step("lookup mg", p.LOOKUP, ROOT_ID, b"mg\0")[0]
    lo = step("lookup mg/lo", p.LOOKUP, mg, b"lo\0")[0]
    step("chmod mg/lo (copy-up)", p.SETATTR, lo, p.SetAttr(p.FATTR_MODE, None, 0, None, None,
                                                           0o100600, 0, 0).encode())
    step("rename mg/lo rmd/lo", p.RENAME, mg, p.RENAME_IN.pack(rmd) + b"lo\0lo\0")
    held: dict[int, int] = {lo: 1}  # (the kernel's references to what it listed: FORGETs give them back)

    def rm_rf(parent: int, name: bytes, node: int) -> None:
        step(f"opendir {name}", p.OPENDIR, node, p.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0))
        step(f"readdirplus {name} (check)", p.READDIRPLUS, node, p.READ_IN.pack(0, 0, 32768, 0, 0, 0, 0))
        for e in parse_dirents(side.last, True):
            if e[4]:
                held[e[4]] = held.get(e[4], 0) + 1
        step(f"releasedir {name} (check)", p.RELEASEDIR, node, p.RELEASE_IN.pack(0, 0, 0, 0))
        step(f"opendir {name} again", p.OPENDIR, node, p.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0))
        step(f"getattr {name}", p.GETATTR, node, p.GETATTR_IN.pack(0, 0, 0))
        listed = step(f"readdirplus {name}", p.READDIRPLUS, node, p.READ_IN.pack(0, 0, 32768, 0, 0, 0, 0))
        for e in listed:
            if e[3]:
                held[e[3]] = held.get(e[3], 0) + 1
        step(f"readdirplus {name} end", p.READDIRPLUS, node,
             p.READ_IN.pack(0, parse_dirents(side.last, True)[-1][2], 32768, 0, 0, 0, 0))
        for child, _off, typ, nodeid, _attr in listed:
            if child in (b".", b".."):
                continue
            if typ == 4:  # (DT_DIR)
                rm_rf(node, child, nodeid)
                continue
            if not nodeid:  # (listed without attributes: the kernel looks it up first)
                nodeid = step(f"lookup {name}/{child}", p.LOOKUP, node, child + b"\0")[0]
                held[nodeid] = held.get(nodeid, 0) + 1
            step(f"unlink {name}/{child}", p.UNLINK, node, child + b"\0")
            forget(f"forget {name}/{child}", [(nodeid, held.pop(nodeid))])
            step(f"getattr {name} (parent)", p.GETATTR, node, p.GETATTR_IN.pack(0, 0, 0))
        step(f"releasedir {name}", p.RELEASEDIR, node, p.RELEASE_IN.pack(0, 0, 0, 0))
        step(f"rmdir {name}", p.RMDIR, parent, name + b"\0")
        forget(f"forget {name}", [(node, held.pop(node, 0) + 1)])  # (+ MKDIR's or the LOOKUP's)
        step(f"getattr parent of {name}", p.GETATTR, parent, p.GETATTR_IN.pack(0, 0, 0))

    rm_rf(ROOT_ID, b"rmd", rmd)
    step("lookup rmd gone", p.LOOKUP, ROOT_ID, b"rmd\0")
    # the invalidations sent (by the notifier's thread: compared once all arrived)
    # (the generic side, run first, knows no count: it waits until none came for 50 ms, so
    # a notification queued late is not missed there and counted as the short side's extra)
    deadline = time.monotonic() + 5
    seen, quiet = -1, 0
    while time.monotonic() < deadline:
        side.req(p.STATFS, ROOT_ID)
        now = len(side.fk.notifications)
        quiet = quiet + 1 if now == seen else 0
        seen = now
        if now >= side.expect and (side.expect or quiet >= 5):
            break
        time.sleep(0.01)
    out.append(("notified", sorted(side.fk.notifications), {}))
    return out


def _setflags(flags: int) -> bytes:
    """FS_IOC_SETFLAGS as the kernel's fileattr operation sends it (``arg`` 0, 4 bytes)."""
    return p.IOCTL_IN.pack(0, 0, 0x40086602, 0, 4, 0) + flags.to_bytes(4, "little")


def _getflags() -> bytes:
    return p.IOCTL_IN.pack(0, 0, 0x80086601, 0, 0, 4)


OPTIONS = {
    "default": {},
    "cache=shared": {"cache": "shared"},
    "passthrough=off": {"passthrough": False},
    "metacopy": {"metacopy": True},
    "index": {"index": True},
    "noxattrs": {"noxattrs": True},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_short_paths_together_answer_and_leave_what_the_generic_ones_do(tmp_path, name):
    old = os.umask(0o022)
    try:
        for side in ("short", "generic"):
            _tree(tmp_path / side)
    finally:
        os.umask(old)
    sides = [Side(tmp_path / "short", True, OPTIONS[name]),
             Side(tmp_path / "generic", False, OPTIONS[name])]
    try:
        assert sides[1].shorts <= {p.OPENDIR, p.RELEASEDIR} and {p.CREATE, p.OPEN, p.READDIRPLUS,
                                                                 p.BATCH_FORGET} <= sides[0].shorts
        generic = _run(sides[1])
        sides[0].expect = len(generic[-1][1])
        short = _run(sides[0])
    finally:
        for s in reversed(sides):
            s.close()
    for (what, sres, sstate), (_, gres, gstate) in zip(short, generic):
        assert sres == gres, f"{what}: short {sres}, generic {gres}"
        diff = {k: (sstate[k], gstate[k]) for k in sstate if sstate[k] != gstate[k]}
        assert not diff, f"{what}: " + "\n".join(f"{k}:\n short   {s}\n generic {g}"
                                                for k, (s, g) in diff.items())
    assert len(short) == len(generic)
    for hook in ("create_name", "open_node", "readdirplus_node", "forget_nodes", "lookup_name",
                 "release_fh", "lookup_name found dir"):
        assert sides[0].answered.get(hook), f"{hook} never answered"
    if name != "index":  # (not bound with an index: ``OverlayOps.unlink_name``)
        assert sides[0].answered.get("unlink_name"), "unlink_name never answered"
        assert sides[0].answered.get("rmdir_name"), "rmdir_name never answered"
    assert sides[0].answered.get("mkdir_name"), "mkdir_name never answered"
