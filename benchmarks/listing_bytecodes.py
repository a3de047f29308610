#!/usr/bin/env python3
"""Python work per listed entry of a cold ``find``+stat, counted, not timed (a benchmarking aid).

    python benchmarks/listing_bytecodes.py [--dirs N] [--files N] [--size BYTES] [--layer lower|upper]
                                           [--batch] [--base DIR] [--tree TREE] [--functions REQUEST]

Drives ``Session.dispatch`` in-process (``inprocess.Harness``: no FUSE, replies kept in
memory) over a fresh stack under ``--base`` (default a new directory under /dev/shm) whose
``--layer`` holds run.py's tree (``make_tree``: ``--dirs`` directories of ``--files`` small
files each) with the requests the kernel sends a cold ``find`` per directory, in its
order: LOOKUP of the directory, OPENDIR, READDIRPLUS of ``--size`` bytes from each reply's
last cookie until an empty reply, RELEASEDIR; then one FORGET per entry taken (the kernel
drops them later, with its dentries), or with ``--batch`` one BATCH_FORGET of the directory's
entries (how the kernel sends the forgets it queued, after a cache drop: counted per entry
under the FORGET label). The stat of each entry needs no request: every
listed file comes with its attributes. For each request kind: Python bytecodes executed
and Python calls made (``sys.settrace`` with opcode events), per listed entry (files, "."
and ".." not counted). Each reply is checked (the names, attributes for every file) and
the listings' replies of the counted pass are compared with the warm-up pass's,
attributes and all (a fresh mount: same inode numbers, stats). As with
``request_bytecodes.py`` these counts repeat exactly, so two trees compare exactly; the
tree measured is the one this script is in unless ``--tree`` names another.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--dirs", type=int, default=10)
ap.add_argument("--files", type=int, default=100, help="files per directory")
ap.add_argument("--size", type=int, default=32768, help="READDIRPLUS reply size asked for")
ap.add_argument("--layer", choices=("lower", "upper"), default="lower")
ap.add_argument("--batch", action="store_true", help="one BATCH_FORGET per directory")
ap.add_argument("--base", default=None)
ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ap.add_argument("--functions", metavar="REQUEST", default=None,
                help="also list bytecodes per listed entry by function for this request")
args = ap.parse_args()
sys.path.insert(0, args.tree)

from inprocess import Bytecodes, Harness, error, make_tree, workspace  # noqa: E402 (imports overlaypc from --tree)
from overlaypc.config import MountConfig  # noqa: E402
from overlaypc.engine import protocol as p  # noqa: E402

base = workspace(args.base, "listing-bytecodes-")
tree = os.path.join(base, args.layer, "tree")
make_tree(tree, args.dirs, args.files)

COUNTS = Bytecodes()
OPS, CALLS, FUNCS = COUNTS.ops, COUNTS.calls, COUNTS.funcs


KINDS = ("LOOKUP dir", "OPENDIR", "READDIRPLUS", "RELEASEDIR", "FORGET")
ENTRY, DIRENT = p.ENTRY_OUT, p.DIRENT


def entries(reply: bytes) -> list[tuple[bytes, int, int, bytes]]:
    """(name, nodeid, cookie, fuse_entry_out bytes) of each entry of a READDIRPLUS reply."""
    out, pos = [], p.OUT_HEADER.size
    while pos < len(reply):
        nodeid = ENTRY.unpack_from(reply, pos)[0]
        _ino, off, namelen, _type = DIRENT.unpack_from(reply, pos + ENTRY.size)
        start = pos + ENTRY.size + DIRENT.size
        out.append((reply[start:start + namelen], nodeid, off, reply[pos:pos + ENTRY.size]))
        pos = start + ((namelen + 7) & ~7)
    return out


def find(harness: Harness, count: bool) -> list[list[tuple[bytes, int, int, bytes]]]:
    """One cold ``find`` of the tree's directories through ``harness``; each listing."""
    def send(kind: str, op: int, nodeid: int, body: bytes = b"") -> bytes:
        COUNTS.label = kind
        return harness.send(op, nodeid, body, COUNTS.tracer if count else None)

    r = harness.send(p.LOOKUP, p.ROOT_ID, b"tree\0")
    top = ENTRY.unpack_from(r, 16)[0]
    listings = []
    for d in range(args.dirs):
        r = send(KINDS[0], p.LOOKUP, top, b"d%03d\0" % d)
        assert error(r) == 0, r
        node = ENTRY.unpack_from(r, 16)[0]
        assert error(send(KINDS[1], p.OPENDIR, node, p.OPEN_IN.pack(os.O_RDONLY, 0))) == 0
        listed, offset = [], 0
        while True:
            r = send(KINDS[2], p.READDIRPLUS, node, p.READ_IN.pack(0, offset, args.size, 0, 0, 0, 0))
            assert error(r) == 0, r
            chunk = entries(r)
            if not chunk:
                break
            listed += chunk
            offset = chunk[-1][2]
        names = sorted(n for n, *_ in listed)
        assert names == [b".", b".."] + [b"f%05d" % i for i in range(args.files)], names[:5]
        assert all(nodeid for n, nodeid, *_ in listed if n not in (b".", b"..")), "a file without attributes"
        send(KINDS[3], p.RELEASEDIR, node, p.RELEASE_IN.pack(0, 0, 0, 0))
        taken = [nodeid for n, nodeid, *_ in listed if nodeid]
        if args.batch:
            send(KINDS[4], p.BATCH_FORGET, 0, p.BATCH_FORGET_IN.pack(len(taken), 0)
                 + b"".join(p.FORGET_ONE.pack(nodeid, 1) for nodeid in taken))
        else:
            for nodeid in taken:
                send(KINDS[4], p.FORGET, nodeid, p.FORGET_IN.pack(1))
        send(None, p.FORGET, node, p.FORGET_IN.pack(1))
        listings.append(listed)
    harness.send(p.FORGET, top, p.FORGET_IN.pack(1))
    return listings


def shown(listings) -> list:
    """What the kernel takes of the listings: names, cookies' order, and each entry's
    attributes and timeouts (the nodeid and the cookies' snapshot ids aside)."""
    out = []
    for listed in listings:
        for name, _nodeid, _off, entry in sorted(listed):
            out.append((name, entry[16:]))
    return out


def harness() -> Harness:
    return Harness(MountConfig(lowers=[f"{base}/lower"], upper=f"{base}/upper", work=f"{base}/work",
                               mountpoint=f"{base}/mnt"))


warm = harness()
first = find(warm, False)  # a warm-up pass: the records compiled, as in a running daemon
second = find(warm, True)
assert shown(first) == shown(second), "the counted listing differs from the first"
warm.close()
n = args.dirs * args.files
print(f"tree {args.tree}, {args.dirs} directories of {args.files} files in the {args.layer} layer, "
      f"READDIRPLUS of {args.size} bytes; per listed file")
for kind in KINDS:
    print(f"  {kind:14s} {OPS[kind] / n:8.1f} bytecodes {CALLS[kind] / n:6.2f} calls")
print(f"  {'all':14s} {sum(OPS.values()) / n:8.1f} bytecodes {sum(CALLS.values()) / n:6.2f} calls")
if args.functions:
    rows = sorted(((c, f) for (k, f), c in FUNCS.items() if k == args.functions), reverse=True)
    for c, f in rows:
        print(f"    {f:50s} {c / n:7.1f}")
shutil.rmtree(base, ignore_errors=True)
