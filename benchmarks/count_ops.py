#!/usr/bin/env python3
"""Run the overlaypc daemon with a counter of the FUSE requests it serves (a benchmarking aid).

    python benchmarks/count_ops.py -f -o lowerdir=L,upperdir=U,workdir=W MNT &
    ... workload ...;  touch /tmp/overlaypc-count-ops.dump   # counts since the last dump -> stderr

Same arguments as ``python -m overlaypc``; must run in the foreground (``-f``). Counts are
per request the engine's session dispatches (by opcode), one per round trip. A thread polls
for the trigger file (the main thread waits on the workers). Used for RESULTS.md (requests
per create, per warm find, ...).
"""
import collections
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from overlaypc.cli import main  # noqa: E402
from overlaypc.engine import protocol as p  # noqa: E402
from overlaypc.engine.session import Session  # noqa: E402

TRIGGER = "/tmp/overlaypc-count-ops.dump"
counts: collections.Counter = collections.Counter()
lock = threading.Lock()
_dispatch = Session.dispatch


def counted(self, fd, msg, out):
    op = p.decode_header(msg).opcode
    with lock:
        counts[p.OPCODE_NAMES.get(op, str(op))] += 1
    return _dispatch(self, fd, msg, out)


Session.dispatch = counted


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
