#!/usr/bin/env python3
"""Python work per FUSE request of an untar and an ``rm -rf``, counted, not timed (a benchmarking aid).

    python benchmarks/request_bytecodes.py [--files N] [--base DIR] [--functions REQUEST]

Drives ``Session.dispatch`` in-process (no FUSE, reply writes kept in memory) over a fresh
stack under ``--base`` (default a new directory under /dev/shm) with the requests the kernel
sends per file, in its order (``benchmarks/count_ops.py`` shows them): untar — parent
GETATTR, LOOKUP (negative), CREATE, GETXATTR ``security.capability``, SETATTR (mtime),
GETXATTR again, SETATTR (chown with the kill flag), SETATTR (mode), RELEASE (the SETATTRs
without a handle, as the kernel sends tar's futimens, fchown and fchmod: ``fuse_setattr``
sends FATTR_FH only with a size, ATTR_FILE coming from ``do_truncate``); ``rm -rf`` —
UNLINK, FORGET, parent GETATTR; per new directory (``files // 8`` of them), as tar makes
one: its negative LOOKUP, the LOOKUP of each ancestor (found: two), the name again, MKDIR;
and as many made in a merged parent (the root: the generic MKDIR): its negative LOOKUP, MKDIR.
The data WRITE passes through (FUSE passthrough, faked
here: backing ids are numbers), so it is not sent. For each request: Python bytecodes
executed and Python calls made (``sys.settrace`` with opcode events), per file. Unlike
time on a shared 2-vCPU VM these counts are the same from run to run, so two trees compare
exactly; system calls are counted with ``strace -f -c`` around it. The tree measured is the
one this script is in unless ``--tree`` names another.
"""
from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--files", type=int, default=200)
ap.add_argument("--base", default=None)
ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ap.add_argument("--functions", metavar="REQUEST", default=None,
                help="also list bytecodes per function for this request (as printed)")
args = ap.parse_args()
sys.path.insert(0, args.tree)

from inprocess import Bytecodes, Harness, error, workspace  # noqa: E402 (imports overlaypc from --tree)
from overlaypc.config import MountConfig  # noqa: E402
from overlaypc.engine import protocol as p  # noqa: E402

base = workspace(args.base, "request-bytecodes-", ("lower", "upper/d", "work", "mnt"))
harness = Harness(MountConfig(lowers=[f"{base}/lower"], upper=f"{base}/upper", work=f"{base}/work",
                              mountpoint=f"{base}/mnt"))

COUNTS = Bytecodes()
OPS, CALLS, FUNCS = COUNTS.ops, COUNTS.calls, COUNTS.funcs


def send(label: str | None, op: int, nodeid: int, body: bytes = b"") -> bytes:
    COUNTS.label = label
    return harness.send(op, nodeid, body, None if label is None else COUNTS.tracer)


D = p.ENTRY_OUT.unpack_from(send(None, p.LOOKUP, p.ROOT_ID, b"d\0"), 16)[0]
GETATTR = p.GETATTR_IN.pack(0, 0, 0)
CAP = p.GETXATTR_IN.pack(0, 0) + b"security.capability\0"
CREATE = p.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOCTTY,
                          stat.S_IFREG | 0o600, 0o022, 0)


def setattr_in(valid: int, *, mode: int = 0, mtime: int = 0) -> bytes:
    return p.SETATTR_IN.pack(valid, 0, 0, 0, 0, 0, mtime, 0, 0, 0, 0, mode, 0, 0, 0, 0)


#: per new directory of an untar (tar's ``mkdirat`` of each ancestor once a file's open found
#: its directory missing; the kernel revalidates each existing one with ``LOOKUP_EXCL``)
NEWDIR = ("LOOKUP new directory", "LOOKUP ancestor (found)", "LOOKUP new directory again",
          "MKDIR")
UNTAR = ("GETATTR parent", "LOOKUP negative", "CREATE", "GETXATTR capability",
         "SETATTR mtime", "GETXATTR capability again", "SETATTR chown+kill", "SETATTR mode",
         "RELEASE")
RM = ("UNLINK", "FORGET", "GETATTR parent (rm)")


def untar(names: list[bytes], count: bool) -> list[tuple[bytes, int]]:
    lbl = (lambda k: k) if count else (lambda k: None)
    made = []
    for name in names:
        send(lbl(UNTAR[0]), p.GETATTR, D, GETATTR)
        r = send(lbl(UNTAR[1]), p.LOOKUP, D, name + b"\0")
        assert error(r) == 0 and p.ENTRY_OUT.unpack_from(r, 16)[0] == 0, r  # a negative entry
        r = send(lbl(UNTAR[2]), p.CREATE, D, CREATE + name + b"\0")
        assert error(r) == 0, r
        node = p.ENTRY_OUT.unpack_from(r, 16)[0]
        fh = p.OPEN_OUT.unpack_from(r, 16 + p.ENTRY_OUT.size)[0]
        assert error(send(lbl(UNTAR[3]), p.GETXATTR, node, CAP)) < 0
        send(lbl(UNTAR[4]), p.SETATTR, node, setattr_in(p.FATTR_MTIME, mtime=1_700_000_000))
        assert error(send(lbl(UNTAR[5]), p.GETXATTR, node, CAP)) < 0
        assert error(send(lbl(UNTAR[6]), p.SETATTR, node,
                          setattr_in(p.FATTR_UID | p.FATTR_GID | p.FATTR_KILL_SUIDGID))) == 0
        send(lbl(UNTAR[7]), p.SETATTR, node, setattr_in(p.FATTR_MODE, mode=stat.S_IFREG | 0o644))
        send(lbl(UNTAR[8]), p.RELEASE, node, p.RELEASE_IN.pack(fh, os.O_WRONLY, 0, 0))
        made.append((name, node))
    return made


def rm(made: list[tuple[bytes, int]], count: bool) -> None:
    lbl = (lambda k: k) if count else (lambda k: None)
    for name, node in made:
        assert error(send(lbl(RM[0]), p.UNLINK, D, name + b"\0")) == 0
        send(lbl(RM[1]), p.FORGET, node, p.FORGET_IN.pack(1))
        send(lbl(RM[2]), p.GETATTR, D, GETATTR)


MKDIR = p.MKDIR_IN.pack(0o755, 0o022)


def new_dirs(run: int, count: bool) -> None:
    """``args.files // 8`` new directories, each at ``d/a<run>/b/`` (two ancestors below
    ``d``, an upper-only directory), as tar makes them: a negative LOOKUP, the ancestors
    found again, the name looked up again, MKDIR. ``rm`` leaves them."""
    lbl = (lambda k: k) if count else (lambda k: None)
    a = p.ENTRY_OUT.unpack_from(send(None, p.MKDIR, D, MKDIR + b"a%d\0" % run), 16)[0]
    b = p.ENTRY_OUT.unpack_from(send(None, p.MKDIR, a, MKDIR + b"b\0"), 16)[0]
    for i in range(args.files // 8):
        name = b"new_%05d\0" % i
        assert p.ENTRY_OUT.unpack_from(send(lbl(NEWDIR[0]), p.LOOKUP, b, name), 16)[0] == 0
        for parent, child, node in ((D, b"a%d\0" % run, a), (a, b"b\0", b)):
            r = send(lbl(NEWDIR[1]), p.LOOKUP, parent, child)
            assert p.ENTRY_OUT.unpack_from(r, 16)[0] == node, r
        assert p.ENTRY_OUT.unpack_from(send(lbl(NEWDIR[2]), p.LOOKUP, b, name), 16)[0] == 0
        assert error(send(lbl(NEWDIR[3]), p.MKDIR, b, MKDIR + name)) == 0


#: per new directory in a merged parent (the root), as ``mkdir NAME`` makes it
MERGED_NEWDIR = ("LOOKUP new directory (merged)", "MKDIR (merged parent)")


def merged_dirs(run: int, count: bool) -> None:
    """``args.files // 8`` new directories in the root, a merged directory (the lower
    layer's root below): a negative LOOKUP, MKDIR. ``rm`` leaves them."""
    lbl = (lambda k: k) if count else (lambda k: None)
    for i in range(args.files // 8):
        name = b"merged_%d_%05d\0" % (run, i)
        assert p.ENTRY_OUT.unpack_from(send(lbl(MERGED_NEWDIR[0]), p.LOOKUP, p.ROOT_ID, name), 16)[0] == 0
        assert error(send(lbl(MERGED_NEWDIR[1]), p.MKDIR, p.ROOT_ID, MKDIR + name)) == 0


def names(run: int) -> list[bytes]:
    return [b"file_%d_%05d.py" % (run, i) for i in range(args.files)]


rm(untar(names(0), False), False)  # warm: caches and records compiled as in a running daemon
rm(untar(names(1), True), True)
new_dirs(0, False)
new_dirs(1, True)
merged_dirs(0, False)
merged_dirs(1, True)
n = args.files
print(f"tree {args.tree}, {n} files; per file")
for label in UNTAR + RM:
    print(f"  {label:28s} {OPS[label] / n:8.1f} bytecodes {CALLS[label] / n:6.1f} calls")
for what, labels in (("untar", UNTAR), ("rm -rf", RM)):
    print(f"  {what + ' (all of the above)':28s} {sum(OPS[k] for k in labels) / n:8.1f} bytecodes "
          f"{sum(CALLS[k] for k in labels) / n:6.1f} calls")
nd = args.files // 8
print(f"{nd} new directories (two ancestors each); per directory")
for label in NEWDIR:
    print(f"  {label:28s} {OPS[label] / nd:8.1f} bytecodes {CALLS[label] / nd:6.1f} calls")
print(f"  {'new directory (all)':28s} {sum(OPS[k] for k in NEWDIR) / nd:8.1f} bytecodes "
      f"{sum(CALLS[k] for k in NEWDIR) / nd:6.1f} calls")
print(f"{nd} new directories in a merged parent (the root); per directory")
for label in MERGED_NEWDIR:
    print(f"  {label:28s} {OPS[label] / nd:8.1f} bytecodes {CALLS[label] / nd:6.1f} calls")
if args.functions:
    rows = sorted(((c, f) for (k, f), c in FUNCS.items() if k == args.functions), reverse=True)
    for c, f in rows:
        print(f"    {f:50s} {c / n:7.1f}")
harness.close()
shutil.rmtree(base, ignore_errors=True)
