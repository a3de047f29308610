#!/usr/bin/env python3
"""Run the overlaypc daemon with a call counter on its FUSE callbacks (a benchmarking aid).

    FUSE_LIBRARY_NAME=fuse3 python benchmarks/count_ops.py -f -o lowerdir=L,upperdir=U,workdir=W MNT &
    ... workload ...;  touch /tmp/overlaypc-count-ops.dump   # counts since the last dump -> stderr

Same arguments as ``python -m overlaypc``; must run in the foreground (``-f``). Counts are per
Python callback (OverlayFUSE/mfusepy methods), which is one per FUSE request except where
libfuse's high-level API calls back on its own (e.g. a getattr after create). A signal cannot
be used to ask for the counts: the main thread sits in libfuse's loop, so a thread polls for
the trigger file instead. Used for RESULTS.md section 6 (requests per create, per warm find).
"""
import collections
import functools
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mfusepy  # noqa: E402

from overlaypc import fuse_adapter  # noqa: E402
from overlaypc.cli import main  # noqa: E402

TRIGGER = "/tmp/overlaypc-count-ops.dump"
counts: collections.Counter = collections.Counter()
lock = threading.Lock()


def wrap(cls, name: str) -> None:
    f = getattr(cls, name, None)
    if f is None or name in cls.__dict__ and getattr(f, "_counted", False):
        return

    @functools.wraps(f)
    def counted(self, *a, **k):
        with lock:
            counts[name] += 1
        return f(self, *a, **k)
    counted._counted = True
    setattr(cls, name, counted)


for n in ("opendir", "readdir_fuse_3", "releasedir", "read", "write", "fgetattr"):
    wrap(fuse_adapter.OverlayFUSE, n)
for n in ("getattr_fuse_3", "create", "unlink", "release", "flush", "open", "getxattr", "access",
          "utimens_fuse_3", "mkdir", "rmdir", "chmod_fuse_3", "chown_fuse_3", "setxattr", "listxattr",
          "readlink", "symlink", "link", "rename_fuse_3", "truncate_fuse_3", "fsync", "statfs"):
    if n not in fuse_adapter.OverlayFUSE.__dict__:
        wrap(mfusepy.FUSE, n)


def poll() -> None:
    while True:
        time.sleep(0.05)
        if os.path.exists(TRIGGER):
            os.unlink(TRIGGER)
            with lock:
                print("COUNTS", dict(counts), file=sys.stderr, flush=True)
                counts.clear()


threading.Thread(target=poll, daemon=True).start()
sys.exit(main())
