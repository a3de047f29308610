#!/usr/bin/env python3
"""Run the overlaypc daemon with a request counter per FUSE opcode (a benchmarking aid).

    python benchmarks/count_ops.py -f -o lowerdir=L,upperdir=U,workdir=W MNT &
    ... workload ...;  touch /tmp/overlaypc-count-ops.dump   # counts since the last dump -> stderr

Same arguments as ``python -m overlaypc``; must run in the foreground (``-f``): the counter's
thread starts before the mount, and the daemon forks only before any thread runs. Counts are
per request the kernel sent, by opcode (``Session.dispatch`` wrapped), FORGETs and
BATCH_FORGETs included: with the engine there is no library calling back on its own.
The dump is asked for with a trigger file, polled by a thread, rather than a signal, as the
daemon owns SIGTERM/SIGINT/SIGHUP. Used for RESULTS.md section 6 (requests per create, per
warm find).
"""
import collections
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from overlaypc.cli import main  # noqa: E402
from overlaypc.engine import protocol  # noqa: E402
from overlaypc.engine.session import Session  # noqa: E402

#: the trigger file (``OVERLAYPC_COUNT_OPS_TRIGGER`` names another: one per concurrent user)
TRIGGER = os.environ.get("OVERLAYPC_COUNT_OPS_TRIGGER", "/tmp/overlaypc-count-ops.dump")
counts: collections.Counter = collections.Counter()
lock = threading.Lock()


def counting(dispatch):
    """``Session.dispatch`` counting each request by its opcode's name."""
    def counted(self, fd, msg, out):
        op = protocol.decode_header(msg).opcode
        with lock:
            counts[protocol.OPCODE_NAMES.get(op, str(op))] += 1
        return dispatch(self, fd, msg, out)
    counted.__wrapped__ = dispatch
    return counted


def poll() -> None:
    while True:
        time.sleep(0.05)
        if os.path.exists(TRIGGER):
            os.unlink(TRIGGER)
            with lock:
                print("COUNTS", dict(counts), file=sys.stderr, flush=True)
                counts.clear()


if __name__ == "__main__":
    if "-f" not in sys.argv[1:] and "--foreground" not in sys.argv[1:]:
        raise SystemExit("count_ops.py: run it in the foreground (-f)")
    Session.dispatch = counting(Session.dispatch)
    threading.Thread(target=poll, name="count-ops", daemon=True).start()
    sys.exit(main())
