#!/usr/bin/env python3
"""A ``chmod -R`` copy-up's system calls, each with the Python function that makes it (a benchmarking aid).

    python benchmarks/copyup_calls.py [--files N] [--base DIR] [--depth D] [--tree PATH]
                                      [--mode calls|bytecodes|rusage]

Drives ``Session.dispatch`` in-process (``inprocess.Harness``: no FUSE, replies kept in memory)
over a fresh stack under ``--base`` (default a new directory under /dev/shm; give a directory on
the benchmarks' disk for the fsyncs' real cost) with what the kernel sends per file of a
``chmod -R`` of lower files: a SETATTR of the mode of a looked-up lower file, which copies it up.
One directory of ``--files`` files is warmed (caches, records) and another measured.

- ``calls``: each call of an ``os``/``fcntl`` builtin and each call into ``sysapi`` (its ctypes
  system calls: ``openat2``, ``fchmodat2``, ``renameat2``, ``name_to_handle_at``, ``statx``...),
  per copy-up, with its ``--depth`` callers (``sys.setprofile``'s ``c_call`` events), those
  that failed, and the order of one copy-up's. Unlike ``strace -c`` (6.1 leaves out the system
  calls it does not know: ``fchmodat2``, ``listxattrat``) it sees every call the package makes;
  the engine's ``readv``/``writev`` are not made here. Every public ``sysapi`` function is listed,
  whether it makes a system call itself or not (``ovl_origin_xattr`` wraps ``name_to_handle``,
  ``parse_ovl_origin`` makes none), and one that calls a builtin is listed with it
  (``get_flags`` and ``fcntl.ioctl``).
- ``bytecodes``: Python bytecodes per copy-up, by function, self and inclusive (every function
  on the stack counts an opcode once).
- ``rusage``: the thread's user and system CPU and the wall time per copy-up (timed, noisy).

Used for RESULTS.md's fifteenth-round profiles (``profile48``).
"""
from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import stat
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--files", type=int, default=200)
ap.add_argument("--base", default=None)
ap.add_argument("--depth", type=int, default=3, help="callers shown per call (calls mode)")
ap.add_argument("--mode", choices=("calls", "bytecodes", "rusage"), default="calls")
ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
args = ap.parse_args()
sys.path.insert(0, args.tree)

from inprocess import Harness, error, workspace  # noqa: E402 (imports overlaypc from --tree)
from overlaypc.config import MountConfig  # noqa: E402
from overlaypc.engine import protocol as p  # noqa: E402

n = args.files
base = workspace(args.base, "copyup-calls-")
for d in ("warm", "measured"):
    os.makedirs(f"{base}/lower/{d}")
    for i in range(n):
        with open(f"{base}/lower/{d}/f{i:05d}", "wb") as f:
            f.write(b"x" * (64 + i % 512))  # (run.py's small files)
harness = Harness(MountConfig(lowers=[f"{base}/lower"], upper=f"{base}/upper", work=f"{base}/work",
                              mountpoint=f"{base}/mnt"))
CHMOD = p.SETATTR_IN.pack(p.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFREG | 0o664, 0, 0, 0, 0)


def lookup(parent: int, name: bytes) -> int:
    r = harness.send(p.LOOKUP, parent, name + b"\0")
    assert error(r) == 0, r
    return p.ENTRY_OUT.unpack_from(r, 16)[0]


def chmod(node: int, tracer=None) -> None:
    assert error(harness.send(p.SETATTR, node, CHMOD, tracer)) == 0


nodes = {}
for d in ("warm", "measured"):
    parent = lookup(p.ROOT_ID, d.encode())
    nodes[d] = [lookup(parent, b"f%05d" % i) for i in range(n)]
for node in nodes["warm"]:
    chmod(node)

SYSTEM = ("posix", "fcntl")


def callers(frame) -> str:
    out = []
    while frame is not None and len(out) < args.depth:
        out.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(out)


if args.mode == "calls":
    calls: collections.Counter = collections.Counter()
    failed: collections.Counter = collections.Counter()
    order: list = []
    recording = [False]

    def profile(frame, event, arg):
        if event in ("c_call", "c_exception"):
            module = getattr(arg, "__module__", None)
            if module not in SYSTEM or arg.__name__ == "fspath":
                return
            key = (f"{module}.{arg.__name__}", callers(frame))
            if event == "c_exception":
                failed[key] += 1
                return
        elif event == "call" and frame.f_code.co_filename.endswith("sysapi.py") \
                and not frame.f_code.co_name.startswith("_"):
            key = (f"sysapi.{frame.f_code.co_name}", callers(frame.f_back))
        else:
            return
        calls[key] += 1
        if recording[0]:
            order.append(key)

    for i, node in enumerate(nodes["measured"]):
        recording[0] = i == n // 2
        sys.setprofile(profile)
        try:
            chmod(node)
        finally:
            sys.setprofile(None)
    totals: collections.Counter = collections.Counter()
    for (name, _), c in calls.items():
        totals[name] += c
    print(f"tree {args.tree}, {n} copy-ups; per copy-up, by call:")
    for name, c in totals.most_common():
        print(f"  {c / n:6.2f} {name}")
    print("by call and its callers:")
    for (name, where), c in sorted(calls.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"  {c / n:6.2f} {name:28s} {where}")
    print("failed:")
    for (name, where), c in sorted(failed.items()):
        print(f"  {c / n:6.2f} {name:28s} {where}")
    print("one copy-up, in order:")
    for name, where in order:
        print(f"  {name:28s} {where}")
elif args.mode == "bytecodes":
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = [0, 0]

    def tracer(frame, event, arg):
        if event == "call":
            total[1] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            total[0] += 1
            seen = set()
            f = frame
            while f is not None:
                key = f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}"
                if f is frame:
                    own[key] += 1
                if key not in seen:
                    seen.add(key)
                    incl[key] += 1
                f = f.f_back
        return tracer

    for node in nodes["measured"]:
        chmod(node, tracer)
    print(f"tree {args.tree}, {n} copy-ups; per copy-up {total[0] / n:.0f} bytecodes, {total[1] / n:.0f} calls")
    print("self:")
    for key, c in own.most_common(40):
        print(f"  {c / n:7.1f} {key}")
    print("inclusive:")
    for key, c in incl.most_common(60):
        print(f"  {c / n:7.1f} {key}")
else:
    user = system = 0.0
    walls = []
    for node in nodes["measured"]:
        r0, w0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
        chmod(node)
        r1, w1 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
        user += r1.ru_utime - r0.ru_utime
        system += r1.ru_stime - r0.ru_stime
        walls.append(w1 - w0)
    walls.sort()
    print(f"tree {args.tree}, {n} copy-ups; per copy-up: user {user / n * 1e6:.0f} us, system "
          f"{system / n * 1e6:.0f} us, wall median {walls[n // 2] * 1e6:.0f} us, mean {sum(walls) / n * 1e6:.0f} us")
harness.close()
shutil.rmtree(base, ignore_errors=True)
