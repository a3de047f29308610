#!/usr/bin/env python3
"""GETATTR of ``index=on`` hard links, in-process: time, Python bytecodes and calls per request.

    python benchmarks/index_getattr.py [--tree DIR] [--n N] [--base DIR] [--metacopy 0|1] [--kind K]

Drives ``Session.dispatch`` (no FUSE, replies kept in memory) over a fresh stack under
``--base`` (default a new directory under /dev/shm) with ``index=on`` (and ``metacopy=on``
unless ``--metacopy 0``): a lower file ``f`` with a hard link ``g``; a chmod of ``f``
copies it up into the index (metadata only under metacopy), ``g`` stays a lower name of the
indexed inode, and both are one node. Then N of each: GETATTR of that node by nodeid
(through ``f``, an upper link of the index entry), GETATTR by an open handle of it (fstat),
and LOOKUP of ``g`` (a lower name whose lookup finds the index entry). Prints, per kind,
microseconds per request (best of 3 rounds: wall clock, and the thread's CPU time, user
and system, which a loaded machine disturbs less) and bytecodes and calls per request (one
request traced). The tree measured is the one this script is in unless ``--tree`` names
another: run two trees alternately (A B A B) to compare times. System calls per request:
``strace -f -c`` around a run with ``--kind K`` at two values of N.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import shutil
import sys
import tempfile
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--n", type=int, default=5000)
ap.add_argument("--base", default=None)
ap.add_argument("--metacopy", type=int, default=1)
ap.add_argument("--kind", default=None, help="only this one (for strace -c: syscalls per request)")
ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
args = ap.parse_args()
sys.path.insert(0, args.tree)

from overlaypc import overlay_ops  # noqa: E402
from overlaypc.config import MountConfig, validate  # noqa: E402
from overlaypc.core import OverlayFS  # noqa: E402
from overlaypc.engine import protocol as p  # noqa: E402
from overlaypc.engine import session as session_mod  # noqa: E402


class FakeBacking:
    """``ops.BackingFiles`` without a connection: ids only."""

    def __init__(self, fd: int) -> None:
        self._ids = itertools.count(1)

    def open(self, fd: int) -> int:
        return next(self._ids)

    def close(self, backing_id: int) -> None:
        pass


session_mod.Backing = FakeBacking
overlay_ops.raise_readahead = lambda mountpoint: None

KERNEL_FLAGS = (p.ASYNC_READ | p.POSIX_LOCKS | p.ATOMIC_O_TRUNC | p.BIG_WRITES | p.DONT_MASK
                | p.AUTO_INVAL_DATA | p.DO_READDIRPLUS | p.PARALLEL_DIROPS | p.HANDLE_KILLPRIV
                | p.MAX_PAGES | p.EXPLICIT_INVAL_DATA | p.HANDLE_KILLPRIV_V2 | p.INIT_EXT)

base = args.base or tempfile.mkdtemp(prefix="index-getattr-", dir="/dev/shm")
shutil.rmtree(base, ignore_errors=True)
for d in ("lower", "upper", "work", "mnt"):
    os.makedirs(os.path.join(base, d))
with open(f"{base}/lower/f", "wb") as f:
    f.write(b"x" * 10000)
os.link(f"{base}/lower/f", f"{base}/lower/g")
extra = {"redirect_dir": "on", "metacopy": True} if args.metacopy else {}
cfg = MountConfig(lowers=[f"{base}/lower"], upper=f"{base}/upper", work=f"{base}/work",
                  mountpoint=f"{base}/mnt", index=True, **extra)
validate(cfg)
os.umask(0)
fs = OverlayFS(cfg)
fs.start()
null = os.open(os.devnull, os.O_WRONLY)
sess = session_mod.Session(overlay_ops.OverlayOps(fs), null, workers=1)
replies: list[bytes] = []
sess._writev = lambda fd, parts: replies.append(b"".join(bytes(x) for x in parts)) or 0
sess._negotiate(1, p.InitIn(7, 45, 1 << 17, KERNEL_FLAGS))
out = memoryview(bytearray(1 << 20))
uniques = itertools.count(10, 2)


def send(op: int, nodeid: int, body: bytes = b"") -> bytes:
    msg = memoryview(p.IN_HEADER.pack(p.IN_HEADER.size + len(body), op, next(uniques), nodeid,
                                      0, 0, 4242, 0, 0) + body)
    replies.clear()
    sess.dispatch(null, msg, out)
    assert replies and p.OUT_HEADER.unpack_from(replies[0])[1] == 0, replies
    return replies[0]


def lookup(name: str) -> int:
    return p.ENTRY_OUT.unpack_from(send(p.LOOKUP, p.ROOT_ID, name.encode() + b"\0"), 16)[0]


F = lookup("f")
fs.chmod("f", 0o600)  # copied up into the index (metadata only under metacopy)
assert os.path.exists(f"{base}/upper/f") and len(os.listdir(f"{base}/work/index")) == 1
G = lookup("g")
FH = p.OPEN_OUT.unpack_from(send(p.OPEN, F, p.OPEN_IN.pack(os.O_RDONLY, 0)), 16)[0]
assert G == F  # (one inode: one node)
KINDS = {"GETATTR f": (p.GETATTR, F, p.GETATTR_IN.pack(0, 0, 0)),
         "GETATTR f by fh": (p.GETATTR, F, p.GETATTR_IN.pack(p.GETATTR_FH, 0, FH)),
         "LOOKUP g": (p.LOOKUP, p.ROOT_ID, b"g\0")}

OPS: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()


def traced(kind: str) -> None:
    def tracer(frame, event, arg):
        if event == "call":
            CALLS[kind] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            OPS[kind] += 1
        return tracer
    op, nodeid, body = KINDS[kind]
    sys.settrace(tracer)
    try:
        send(op, nodeid, body)
    finally:
        sys.settrace(None)


print(f"tree {args.tree}, metacopy={args.metacopy}, n={args.n}")
for kind, (op, nodeid, body) in KINDS.items():
    if args.kind is not None and kind != args.kind:
        continue
    best = cpu = float("inf")
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(args.n):
            send(op, nodeid, body)
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.thread_time() - c0)
    traced(kind)
    print(f"{kind:16s} {best / args.n * 1e6:7.2f} us  {cpu / args.n * 1e6:7.2f} us cpu  "
          f"{OPS[kind]:5d} bytecodes  {CALLS[kind]:4d} calls")
send(p.RELEASE, F, p.RELEASE_IN.pack(FH, 0, 0, 0))
fs.close()
shutil.rmtree(base, ignore_errors=True)
