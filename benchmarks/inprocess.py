"""An overlaypc session driven in-process, for benchmark scripts that count or time requests.

``Harness(cfg)`` starts ``OverlayFS(cfg)`` and a ``Session`` negotiated as with a 6.x kernel,
whose reply writes are kept in memory (``send`` returns the reply) and whose FUSE passthrough
backing ids are numbers (no connection: the ioctls are neither made nor counted). Nothing is
mounted. ``Bytecodes`` counts the Python bytecodes and calls a request runs (its
``tracer`` is ``Harness.send``'s). Import it after putting the tree to measure first on ``sys.path``: it imports
``overlaypc`` from there.
"""
from __future__ import annotations

import collections
import itertools
import os
import shutil
import sys
import tempfile

from overlaypc import overlay_ops
from overlaypc.config import MountConfig, validate
from overlaypc.core import OverlayFS
from overlaypc.engine import protocol as p
from overlaypc.engine import session as session_mod

#: what a 6.x kernel offers at INIT
KERNEL_FLAGS = (p.ASYNC_READ | p.POSIX_LOCKS | p.ATOMIC_O_TRUNC | p.EXPORT_SUPPORT | p.BIG_WRITES
                | p.DONT_MASK | p.AUTO_INVAL_DATA | p.DO_READDIRPLUS | p.READDIRPLUS_AUTO
                | p.ASYNC_DIO | p.PARALLEL_DIROPS | p.HANDLE_KILLPRIV | p.POSIX_ACL
                | p.ABORT_ERROR | p.MAX_PAGES | p.CACHE_SYMLINKS | p.NO_OPENDIR_SUPPORT
                | p.EXPLICIT_INVAL_DATA | p.HANDLE_KILLPRIV_V2 | p.SETXATTR_EXT | p.INIT_EXT
                | p.DIRECT_IO_ALLOW_MMAP | p.PASSTHROUGH)


def workspace(base: str | None, prefix: str, dirs: tuple[str, ...] = ("lower", "upper", "work", "mnt")) -> str:
    """A fresh workspace for a mount's layers: ``base`` emptied (or a new directory under
    /dev/shm named ``prefix``) holding ``dirs``."""
    base = base or tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")
    shutil.rmtree(base, ignore_errors=True)
    for d in dirs:
        os.makedirs(os.path.join(base, d))
    return base


def make_tree(tree: str, dirs: int, files: int) -> None:
    """``dirs`` directories of ``files`` small files each under ``tree`` (run.py's
    ``make_tree``, without importing run.py's dependencies)."""
    for d in range(dirs):
        dp = os.path.join(tree, f"d{d:03d}")
        os.makedirs(dp)
        for i in range(files):
            with open(os.path.join(dp, f"f{i:05d}"), "wb") as f:
                f.write(b"x" * (64 + i % 512))


class FakeBacking:
    """``ops.BackingFiles`` without a connection: ids only."""

    def __init__(self, fd: int) -> None:
        self._ids = itertools.count(1)

    def open(self, fd: int) -> int:
        return next(self._ids)

    def close(self, backing_id: int) -> None:
        pass


session_mod.Backing = FakeBacking
overlay_ops.raise_readahead = lambda mountpoint: None  # (nothing is mounted)


class Harness:
    """One stack's filesystem and session; ``send`` dispatches one request, ``tracer`` (a
    ``sys.settrace`` function, or None) watching it."""

    def __init__(self, cfg: MountConfig) -> None:
        validate(cfg)
        os.umask(0)  # (as the daemon: the core applies each caller's umask)
        self.fs = OverlayFS(cfg)
        self.fs.start()
        self._null = os.open(os.devnull, os.O_WRONLY)
        self.session = session_mod.Session(overlay_ops.OverlayOps(self.fs), self._null, workers=1)
        self.replies: list[bytes] = []
        self.session._writev = lambda fd, parts: self.replies.append(
            b"".join(bytes(x) for x in parts)) or 0
        self.session._negotiate(1, p.InitIn(7, 45, 1 << 17, KERNEL_FLAGS))
        self._out = memoryview(bytearray(1 << 20))
        self._uniques = itertools.count(10, 2)

    def send(self, op: int, nodeid: int, body: bytes = b"", tracer=None) -> bytes:
        """The reply to request ``op`` on ``nodeid`` (b"" for none: FORGET)."""
        msg = memoryview(p.IN_HEADER.pack(p.IN_HEADER.size + len(body), op, next(self._uniques),
                                          nodeid, 0, 0, 4242, 0, 0) + body)
        self.replies.clear()
        if tracer is None:
            self.session.dispatch(self._null, msg, self._out)
        else:
            sys.settrace(tracer)
            try:
                self.session.dispatch(self._null, msg, self._out)
            finally:
                sys.settrace(None)
        return self.replies[0] if self.replies else b""

    def close(self) -> None:
        self.fs.close()
        os.close(self._null)


def error(reply: bytes) -> int:
    """A reply's error (0 or a negative errno)."""
    return p.OUT_HEADER.unpack_from(reply)[1]


class Bytecodes:
    """Python bytecodes and calls per label (``sys.settrace`` with opcode events), and
    bytecodes per (label, ``file:function``); set ``label`` before each traced request."""

    def __init__(self) -> None:
        self.ops: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.funcs: collections.Counter = collections.Counter()
        self.label = ""

    def tracer(self, frame, event, arg):
        if event == "call":
            self.calls[self.label] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            self.ops[self.label] += 1
            code = frame.f_code
            self.funcs[self.label, f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1
        return self.tracer
