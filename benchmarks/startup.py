#!/usr/bin/env python3
"""Where a mount's start-up goes: the time from starting the command to a ``stat`` that
answers (benchmarks/run.py's "mount until visible"), split at each step of the daemon.

    python benchmarks/startup.py [--reps 15] [--tree PATH ...] [--workspace DIR]

Each tree's overlaypc is started as ``bin/overlaypc`` is (``entry``'s collector pause,
then ``cli.main``), by a wrapper that marks the steps: the wrapper's first line (so the
interpreter's own start and ``site``), ``cli`` imported, options parsed, validated,
``core`` imported, ``OverlayFS()`` built, ``start()`` done, the engine and
``overlay_ops`` imported (``resume_gc``, just before ``daemon.run``), mount(2), INIT
read and answered, the first worker started, the first request (the caller's GETATTR)
dispatched and answered. Marks are ``time.perf_counter()`` values: CLOCK_MONOTONIC, the
same clock as this process's, so a mark minus the moment the command was started is
time since start; a step is the time from the mark before it (the first worker may answer
before the main thread marks its start: those two then come in the other order). Marks
are set by wrapping the functions named above: one that a tree
does not have is left out (the step then counts in the next one). The wrappers add a few
microseconds per mark, and once per step, nothing to requests after the first.

Warm page cache (one unmeasured mount per tree first), trees alternated, a fresh upper and
workdir per mount, ``-f``, one lower file. Printed: the median (min-max) of each step per
tree, the total, ``python3 -I -c pass`` and the daemon's CPU time until its first reply.
Used for RESULTS.md's start-up breakdowns (eleventh and fifteenth rounds).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import REPO, _pc_env, python_start, unmount  # noqa: E402

#: the marked ``bin/overlaypc``: run with ``-c``, the command's arguments after it
WRAPPER = r'''
import os, sys, time
_pc = time.perf_counter
def mark(name):
    os.write(2, f"MARK {name} {_pc()!r}\n".encode())
mark("interpreter")
import gc
gc.disable()
from overlaypc import cli
mark("cli imported")
cli.gc_paused = True

def wrap(owner, attr, before=None, after=None, then=None):
    orig = getattr(owner, attr, None)
    if orig is None:
        return
    def wrapper(*a, **k):
        if before:
            mark(before)
        r = orig(*a, **k)
        if after:
            mark(after)
        if then:
            then()
        return r
    setattr(owner, attr, wrapper)

def after_core():
    core = sys.modules["overlaypc.core"]
    wrap(core.OverlayFS, "start", before="OverlayFS() built", after="start() done")

def before_run():
    daemon = sys.modules["overlaypc.engine.daemon"]
    wrap(daemon.ch, "mount", after="mount(2) done")
    S = sys.modules["overlaypc.engine.session"].Session
    wrap(S, "handshake", before="INIT read start", after="INIT answered")
    wrap(S, "_start_worker", after="a worker started")
    first = []
    orig = S.dispatch
    def dispatch(self, *a, **k):
        if not first:
            mark("first request dispatched")
        r = orig(self, *a, **k)
        if not first:
            first.append(1)
            mark("first reply written")
            os.write(2, f"CPU {time.process_time()!r}\n".encode())
        return r
    S.dispatch = dispatch

wrap(cli, "validate", before="options parsed", after="validated")
wrap(cli, "_setup_logging", before="core imported", then=after_core)
wrap(cli, "resume_gc", before="engine imported, OverlayOps()", then=before_run)
sys.argv[0] = "overlaypc"
sys.exit(cli.main())
'''


#: (printed with an arrow: a step's time is from the mark before it to this one)
STEPS_TO = ("interpreter", "cli imported", "options parsed", "validated", "core imported",
            "OverlayFS() built", "start() done", "engine imported, OverlayOps()", "mount(2) done",
            "INIT read start", "INIT answered", "a worker started", "first request dispatched",
            "first reply written", "visible (stat answered)")


def one_mount(python: str, tree: str, lower: str, base: str) -> dict[str, float]:
    """Marks (ms since the command started) of one warm mount of ``tree``'s overlaypc."""
    subprocess.run(["rm", "-rf", base], check=True)
    for d in ("upper", "work", "mnt"):
        os.makedirs(os.path.join(base, d))
    mnt = os.path.join(base, "mnt")
    opts = f"lowerdir={lower},upperdir={base}/upper,workdir={base}/work"
    below = os.stat(mnt).st_dev
    with open(os.path.join(base, "stderr"), "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([python, "-c", WRAPPER, "-f", "-o", opts, mnt], env=_pc_env(tree),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 30
            while os.stat(mnt).st_dev == below:  # as benchmarks/common.py's System.mount
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{tree}: no mount at {mnt}")
                time.sleep(0.001)
            os.stat(mnt)
            visible = time.perf_counter()
        finally:
            time.sleep(0.05)  # (the daemon's "mounted" record, after the first reply)
            unmount(mnt, proc)
    marks = {"start": t0}
    cpu = None
    with open(os.path.join(base, "stderr")) as f:
        for line in f:
            if line.startswith("MARK "):
                name, value = line[5:].rsplit(" ", 1)
                marks.setdefault(name, float(value))
            elif line.startswith("CPU "):
                cpu = float(line.split()[1]) * 1e3
    marks["visible (stat answered)"] = visible
    names = list(marks)
    steps = {b: (marks[b] - marks[a]) * 1e3 for a, b in zip(names, names[1:])}
    steps["total"] = (visible - t0) * 1e3
    if cpu is not None:
        steps["CPU time to the first reply"] = cpu
    return steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tree", action="append", help="a checkout whose overlaypc to start (repeatable)")
    ap.add_argument("--workspace", default="/tmp/overlaypc-startup")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    trees = args.tree or [REPO]
    lower = os.path.join(args.workspace, "lower")
    os.makedirs(lower, exist_ok=True)
    with open(os.path.join(lower, "f"), "w") as f:
        f.write("x")
    results: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    for rep in range(args.reps + 1):
        for tree in trees if rep % 2 else trees[::-1]:
            steps = one_mount(args.python, tree, lower, os.path.join(args.workspace, "run"))
            if rep:  # the first round warms the page cache
                for k, v in steps.items():
                    results[tree].setdefault(k, []).append(v)
    own = python_start(args.python, reps=args.reps) * 1e3
    print(f"python -I -c pass: {own:.2f} ms; load {os.getloadavg()[0]:.2f}")
    for tree, steps in results.items():
        print(tree)
        for k, v in steps.items():
            print(f"  {'-> ' + k if k in STEPS_TO else k:37s} {statistics.median(v):7.2f}  "
                  f"({min(v):.2f}-{max(v):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
