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

from inprocess import Harness, error  # noqa: E402 (imports overlaypc from --tree)
from overlaypc.config import MountConfig  # noqa: E402
from overlaypc.engine import protocol as p  # noqa: E402

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
harness = Harness(cfg)


def send(op: int, nodeid: int, body: bytes = b"", tracer=None) -> bytes:
    reply = harness.send(op, nodeid, body, tracer)
    assert reply and error(reply) == 0, reply
    return reply


def lookup(name: str) -> int:
    return p.ENTRY_OUT.unpack_from(send(p.LOOKUP, p.ROOT_ID, name.encode() + b"\0"), 16)[0]


F = lookup("f")
harness.fs.chmod("f", 0o600)  # copied up into the index (metadata only under metacopy)
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
    send(op, nodeid, body, tracer)


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
harness.close()
shutil.rmtree(base, ignore_errors=True)
