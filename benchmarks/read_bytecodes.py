#!/usr/bin/env python3
"""Python work per file of a cold ``grep -r`` over lower files, counted, not timed (a benchmarking aid).

    python benchmarks/read_bytecodes.py [--dirs N] [--files N] [--base DIR] [--tree TREE]
                                        [--cache kernel|shared] [--functions REQUEST] [--time PASSES]

Drives ``Session.dispatch`` in-process (``inprocess.Harness``: no FUSE, replies kept in
memory) over a fresh writable stack under ``--base`` (default a new directory under
/dev/shm) whose lower layer holds run.py's tree (``make_tree``: ``--dirs`` directories of
``--files`` small files each). Per file, the requests the kernel sends ``grep -r`` once the
listing gave each file's entry (READDIRPLUS, sent but not counted: ``listing_bytecodes.py``
counts those; the OPEN then finds the file the listing kept, ``Lookup.recent``): OPEN
read-only (O_RDONLY|O_NOFOLLOW|O_NOCTTY|O_LARGEFILE, a lower file: a daemon handle), READ
of 128 KiB at 0 (the file's data), with ``--cache shared`` (direct io) a READ at its end
(the empty read that ends grep's loop: elsewhere the kernel answers it from the size it
knows), RELEASE. No FLUSH: overlaypc answers the first ENOSYS, the kernel sends no more
(sent once, in the warm-up pass). For each: Python bytecodes executed and calls made
(``sys.settrace`` opcode events), per file. Each reply is checked (the data read is the file's). The counts repeat exactly, so
two trees compare exactly; the tree measured is this script's unless ``--tree`` names another.
``--time N``: also the thread CPU time per file of N untraced passes, the listings (LOOKUP,
OPENDIR, READDIRPLUS, RELEASEDIR, FORGETs) included (timed, so noisy: compare trees alternated).
"""
from __future__ import annotations

import argparse
import errno
import os
import shutil
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--dirs", type=int, default=10)
ap.add_argument("--files", type=int, default=100, help="files per directory")
ap.add_argument("--base", default=None)
ap.add_argument("--cache", default="kernel", choices=("kernel", "shared"))
ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ap.add_argument("--time", type=int, default=0, metavar="PASSES",
                help="also time this many untraced passes (thread CPU time per file)")
ap.add_argument("--functions", metavar="REQUEST", default=None,
                help="also list bytecodes per file by function for this request")
args = ap.parse_args()
sys.path.insert(0, args.tree)

from inprocess import Bytecodes, Harness, error, make_tree, workspace  # noqa: E402 (imports overlaypc from --tree)
from overlaypc.config import MountConfig  # noqa: E402
from overlaypc.engine import protocol as p  # noqa: E402

base = workspace(args.base, "read-bytecodes-")
tree = os.path.join(base, "lower", "tree")
make_tree(tree, args.dirs, args.files)

COUNTS = Bytecodes()
OPS, CALLS, FUNCS = COUNTS.ops, COUNTS.calls, COUNTS.funcs
KINDS = ("OPEN", "READ", "READ at end", "RELEASE")
ENTRY = p.ENTRY_OUT
READ_SIZE = 128 << 10
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_LARGEFILE


def listing(harness: Harness, dnode: int) -> dict[bytes, int]:
    """The nodeid of each file READDIRPLUS of directory ``dnode`` gave (a reference each)."""
    assert error(harness.send(p.OPENDIR, dnode, p.OPEN_IN.pack(os.O_RDONLY, 0))) == 0
    listed, offset = {}, 0
    while True:
        r = harness.send(p.READDIRPLUS, dnode, p.READ_IN.pack(0, offset, 32768, 0, 0, 0, 0))
        assert error(r) == 0, r
        pos = p.OUT_HEADER.size
        if pos == len(r):
            break
        while pos < len(r):
            nodeid = ENTRY.unpack_from(r, pos)[0]
            _ino, offset, namelen, _type = p.DIRENT.unpack_from(r, pos + ENTRY.size)
            start = pos + ENTRY.size + p.DIRENT.size
            if nodeid:
                listed[r[start:start + namelen]] = nodeid
            pos = start + ((namelen + 7) & ~7)
    harness.send(p.RELEASEDIR, dnode, p.RELEASE_IN.pack(0, 0, 0, 0))
    assert len(listed) == args.files, len(listed)
    return listed


def grep(harness: Harness, count: bool) -> list[bytes]:
    """One pass over the tree's files through ``harness``: each file's data read."""
    def send(kind: str, op: int, nodeid: int, body: bytes = b"") -> bytes:
        COUNTS.label = kind
        return harness.send(op, nodeid, body, COUNTS.tracer if count else None)

    r = harness.send(p.LOOKUP, p.ROOT_ID, b"tree\0")
    top = ENTRY.unpack_from(r, 16)[0]
    datas = []
    for d in range(args.dirs):
        r = harness.send(p.LOOKUP, top, b"d%03d\0" % d)
        dnode = ENTRY.unpack_from(r, 16)[0]
        listed = listing(harness, dnode)  # (not counted: listing_bytecodes.py's)
        for i in range(args.files):
            node = listed[b"f%05d" % i]
            r = send(KINDS[0], p.OPEN, node, p.OPEN_IN.pack(OPEN_FLAGS, 0))
            assert error(r) == 0, r
            fh = p.OPEN_OUT.unpack_from(r, 16)[0]
            r = send(KINDS[1], p.READ, node, p.READ_IN.pack(fh, 0, READ_SIZE, 0, 0, OPEN_FLAGS, 0))
            assert error(r) == 0, r
            data = r[16:]
            assert data == b"x" * (64 + i % 512), (d, i, len(data))
            if args.cache == "shared":
                r = send(KINDS[2], p.READ, node, p.READ_IN.pack(fh, len(data), READ_SIZE, 0, 0,
                                                               OPEN_FLAGS, 0))
                assert error(r) == 0 and len(r) == 16, r
            if not count and not d and not i:
                assert error(harness.send(p.FLUSH, node, p.FLUSH_IN.pack(fh, 0, 0, 0))) == -errno.ENOSYS
            r = send(KINDS[3], p.RELEASE, node, p.RELEASE_IN.pack(fh, OPEN_FLAGS, 0, 0))
            assert error(r) == 0, r
            datas.append(data)
        harness.send(p.BATCH_FORGET, 0, p.BATCH_FORGET_IN.pack(len(listed), 0)
                     + b"".join(p.FORGET_ONE.pack(nodeid, 1) for nodeid in listed.values()))
        harness.send(p.FORGET, dnode, p.FORGET_IN.pack(1))
    harness.send(p.FORGET, top, p.FORGET_IN.pack(1))
    return datas


warm = Harness(MountConfig(lowers=[f"{base}/lower"], upper=f"{base}/upper", work=f"{base}/work",
                           mountpoint=f"{base}/mnt", cache=args.cache))
first = grep(warm, False)  # a warm-up pass: the records compiled, as in a running daemon
second = grep(warm, True)
assert first == second
per_file = []
for _ in range(args.time):
    t0 = time.thread_time()
    assert grep(warm, False) == first
    per_file.append((time.thread_time() - t0) / (args.dirs * args.files) * 1e6)
assert not os.listdir(f"{base}/upper"), "a read copied something up"
warm.close()
n = args.dirs * args.files
print(f"tree {args.tree}, {args.dirs} directories of {args.files} lower files, cache={args.cache}; per file")
for kind in KINDS:
    print(f"  {kind:14s} {OPS[kind] / n:8.1f} bytecodes {CALLS[kind] / n:6.2f} calls")
print(f"  {'all':14s} {sum(OPS.values()) / n:8.1f} bytecodes {sum(CALLS.values()) / n:6.2f} calls")
if args.functions:
    rows = sorted(((c, f) for (k, f), c in FUNCS.items() if k == args.functions), reverse=True)
    for c, f in rows:
        print(f"    {f:50s} {c / n:7.1f}")
if per_file:
    print(f"  thread CPU per file, untraced, with its listing: median {statistics.median(per_file):.1f} us "
          f"(range {min(per_file):.1f}-{max(per_file):.1f}, {args.time} passes)")
shutil.rmtree(base, ignore_errors=True)
