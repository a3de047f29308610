#!/usr/bin/env python3
"""Python work per file of an ``rm -rf`` as the kernel sends it, listings included, counted (a benchmarking aid).

    python benchmarks/rm_bytecodes.py [--dirs N] [--files N] [--base DIR] [--tree TREE]
                                      [--functions REQUEST] [--time PASSES]

Drives ``Session.dispatch`` in-process (``inprocess.Harness``: no FUSE, replies kept in
memory) over a fresh stack under ``--base`` (default a new directory under /dev/shm). First,
not counted, an untar through the requests: a directory ``src`` of ``--dirs`` directories of
``--files`` files each, made as ``request_bytecodes.py``'s untar makes a file (MKDIR after
a negative LOOKUP for a directory), so the files are upper-only and made by the mount, as
run.py's and ab_mount.py's ``rm_rf`` remove them (its tarball: 1,565 files in 189
directories, 8.3 a directory). Then ``rm -rf src`` as GNU rm (fts) and kernel 6.18 send it
(seen through a mount with a request log): per directory, OPENDIR, one READDIRPLUS from 0
(rm's emptiness check reads once), RELEASEDIR; OPENDIR again, GETATTR of the directory (its
atime, dropped by the read, for the open's fstat), READDIRPLUS from 0 until an empty reply;
then per file UNLINK, FORGET of all the references the kernel took (the creation's and both
listings': 3), GETATTR of the directory (its attributes dropped by the change, for the next
removal's permission check); the directories below the same way; RELEASEDIR, RMDIR in the
parent, FORGET, GETATTR of the parent. Per request kind: Python bytecodes and calls
(``sys.settrace`` with opcode events), per file removed (directories are not counted as
files: ``src``'s ``--dirs`` removals are shared among its files). These counts repeat
exactly: two trees compare exactly (``--tree``). ``--time N``: also the thread CPU time of
N untraced passes of the whole removal (each after its own untar), median per file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import stat
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--dirs", type=int, default=25)
ap.add_argument("--files", type=int, default=8, help="files per directory")
ap.add_argument("--base", default=None)
ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ap.add_argument("--functions", metavar="REQUEST", default=None,
                help="also list bytecodes per removed file by function for this request")
ap.add_argument("--time", type=int, default=0, metavar="PASSES",
                help="also time this many untraced removals (thread CPU time)")
args = ap.parse_args()
sys.path.insert(0, args.tree)

from inprocess import Bytecodes, Harness, error, workspace  # noqa: E402 (imports overlaypc from --tree)
from overlaypc.config import MountConfig  # noqa: E402
from overlaypc.engine import protocol as p  # noqa: E402

base = workspace(args.base, "rm-bytecodes-")
harness = Harness(MountConfig(lowers=[f"{base}/lower"], upper=f"{base}/upper", work=f"{base}/work",
                              mountpoint=f"{base}/mnt"))
COUNTS = Bytecodes()
OPS, CALLS, FUNCS = COUNTS.ops, COUNTS.calls, COUNTS.funcs
KINDS = ("OPENDIR", "READDIRPLUS (check)", "RELEASEDIR", "GETATTR dir (open)", "READDIRPLUS",
         "UNLINK", "FORGET", "GETATTR parent", "RMDIR", "LOOKUP")
ENTRY, DIRENT = p.ENTRY_OUT, p.DIRENT
GETATTR = p.GETATTR_IN.pack(0, 0, 0)
CAP = p.GETXATTR_IN.pack(0, 0) + b"security.capability\0"
CREATE = p.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOCTTY,
                          stat.S_IFREG | 0o600, 0o022, 0)
MKDIR = p.MKDIR_IN.pack(stat.S_IFDIR | 0o755, 0o022)
#: the references the kernel holds, by nodeid (what its FORGETs give back)
held: dict[int, int] = {}
counting = False


def send(kind: str | None, op: int, nodeid: int, body: bytes = b"") -> bytes:
    COUNTS.label = kind
    return harness.send(op, nodeid, body, COUNTS.tracer if counting and kind else None)


def took(reply: bytes) -> int:
    """The nodeid an entry reply (LOOKUP, MKDIR, CREATE) gave, counted as held."""
    assert error(reply) == 0, reply
    nodeid = ENTRY.unpack_from(reply, 16)[0]
    if nodeid:
        held[nodeid] = held.get(nodeid, 0) + 1
    return nodeid


def setattr_in(valid: int, *, mode: int = 0, mtime: int = 0) -> bytes:
    return p.SETATTR_IN.pack(valid, 0, 0, 0, 0, 0, mtime, 0, 0, 0, 0, mode, 0, 0, 0, 0)


def untar(top: int) -> int:
    """``src`` in directory ``top``, made through the requests; its nodeid."""
    def mkdir(parent: int, name: bytes) -> int:
        send(None, p.GETATTR, parent, GETATTR)
        assert ENTRY.unpack_from(send(None, p.LOOKUP, parent, name + b"\0"), 16)[0] == 0
        return took(send(None, p.MKDIR, parent, MKDIR + name + b"\0"))

    src = mkdir(top, b"src")
    for d in range(args.dirs):
        dnode = mkdir(src, b"d%03d" % d)
        for i in range(args.files):
            name = b"f%05d.py" % i
            send(None, p.GETATTR, dnode, GETATTR)
            assert ENTRY.unpack_from(send(None, p.LOOKUP, dnode, name + b"\0"), 16)[0] == 0
            r = send(None, p.CREATE, dnode, CREATE + name + b"\0")
            node = took(r)
            fh = p.OPEN_OUT.unpack_from(r, 16 + ENTRY.size)[0]
            send(None, p.GETXATTR, node, CAP)
            send(None, p.SETATTR, node, setattr_in(p.FATTR_MTIME, mtime=1_700_000_000))
            send(None, p.GETXATTR, node, CAP)
            send(None, p.SETATTR, node, setattr_in(p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID))
            send(None, p.SETATTR, node, setattr_in(p.FATTR_MODE, mode=stat.S_IFREG | 0o644))
            send(None, p.RELEASE, node, p.RELEASE_IN.pack(fh, os.O_WRONLY, 0, 0))
    return src


def listing(kind: str, node: int, once: bool) -> list[tuple[bytes, int, int]]:
    """READDIRPLUS of directory ``node`` from 0: one reply (``once``) or until an empty one;
    (name, nodeid, mode) of each entry but the dots, their references counted as held."""
    out, offset = [], 0
    while True:
        r = send(kind, p.READDIRPLUS, node, p.READ_IN.pack(0, offset, 32768, 0, 0, 0, 0))
        assert error(r) == 0, r
        pos, last = p.OUT_HEADER.size, None
        while pos < len(r):
            nodeid = ENTRY.unpack_from(r, pos)[0]
            _ino, last, namelen, dtype = DIRENT.unpack_from(r, pos + ENTRY.size)
            start = pos + ENTRY.size + DIRENT.size
            name = r[start:start + namelen]
            if name not in (b".", b".."):
                if nodeid:
                    held[nodeid] = held.get(nodeid, 0) + 1
                out.append((name, nodeid, dtype << 12))
            pos = start + ((namelen + 7) & ~7)
        if last is None or once:
            return out
        offset = last


def forget(nodeid: int) -> None:
    send("FORGET", p.FORGET, nodeid, p.FORGET_IN.pack(held.pop(nodeid)))


def remove(parent: int, name: bytes, node: int) -> None:
    """``rm -rf`` of directory ``node`` (``name`` in ``parent``), as fts and the kernel do it."""
    send("OPENDIR", p.OPENDIR, node, p.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0))
    listing("READDIRPLUS (check)", node, True)
    send("RELEASEDIR", p.RELEASEDIR, node, p.RELEASE_IN.pack(0, 0, 0, 0))
    send("OPENDIR", p.OPENDIR, node, p.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0))
    send("GETATTR dir (open)", p.GETATTR, node, GETATTR)
    entries = listing("READDIRPLUS", node, False)
    assert all(nodeid for _n, nodeid, _m in entries), "an entry without attributes"
    for child, nodeid, mode in entries:
        if stat.S_ISDIR(mode):
            remove(node, child, nodeid)
            continue
        assert error(send("UNLINK", p.UNLINK, node, child + b"\0")) == 0
        forget(nodeid)
        send("GETATTR parent", p.GETATTR, node, GETATTR)
    send("RELEASEDIR", p.RELEASEDIR, node, p.RELEASE_IN.pack(0, 0, 0, 0))
    assert error(send("RMDIR", p.RMDIR, parent, name + b"\0")) == 0
    forget(node)
    send("GETATTR parent", p.GETATTR, parent, GETATTR)


remove(p.ROOT_ID, b"src", untar(p.ROOT_ID))  # warm: records compiled as in a running daemon
assert not held, held
counting = True
remove(p.ROOT_ID, b"src", untar(p.ROOT_ID))
counting = False
assert not held and not os.listdir(f"{base}/upper"), os.listdir(f"{base}/upper")
n = args.dirs * args.files
print(f"tree {args.tree}, rm -rf of {args.dirs} directories of {args.files} upper files; per file")
for kind in KINDS:
    if CALLS[kind]:
        print(f"  {kind:22s} {OPS[kind] / n:8.1f} bytecodes {CALLS[kind] / n:6.2f} calls")
print(f"  {'all':22s} {sum(OPS.values()) / n:8.1f} bytecodes {sum(CALLS.values()) / n:6.2f} calls")
if args.functions:
    rows = sorted(((c, f) for (k, f), c in FUNCS.items() if k == args.functions), reverse=True)
    for c, f in rows:
        print(f"    {f:50s} {c / n:7.1f}")
if args.time:
    per_file = []
    for _ in range(args.time):
        src = untar(p.ROOT_ID)
        t0 = time.thread_time()
        remove(p.ROOT_ID, b"src", src)
        per_file.append((time.thread_time() - t0) / n * 1e6)
    print(f"  thread CPU per file, untraced: median {statistics.median(per_file):.1f} us "
          f"(range {min(per_file):.1f}-{max(per_file):.1f}, {args.time} passes)")
harness.close()
shutil.rmtree(base, ignore_errors=True)
