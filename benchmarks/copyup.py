#!/usr/bin/env python3
"""Copy-up of a large lower file (issue 4's benchmark): open(O_RDWR) timed, on XFS with reflink
and on ext4 (fresh loop images attached with --direct-io=on), for overlaypc (both cache modes),
kernel overlayfs and fuse-overlayfs (and unionfs-fuse when asked), interleaved per repetition.

    python benchmarks/copyup.py [--size-mib 1024] [--reps 3] [--systems a,b] [--out copyup.json]

The lower file is read once before each open (so it is in the page cache for every system); the
figure is the copy-up's own cost, including the fsync each system does. overlaypc's copy-up
method (reflink / copy_file_range / chunked) is taken from its stats xattr.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (MiB, Metric, Workspace, loadavg, log, machine_info, markdown_table,  # noqa: E402
                    select_systems, write_json)
from run import copyup_bench  # noqa: E402

DEFAULT_SYSTEMS = "overlaypc-kernel,overlaypc-shared,kernel-overlay,fuse-overlayfs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--systems", default=DEFAULT_SYSTEMS)
    p.add_argument("--fs", default="xfs,ext4", help="filesystems: xfs (reflink), ext4")
    p.add_argument("--out", default="copyup.json")
    p.add_argument("--python", default=sys.executable, help="Python that runs overlaypc")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    systems, skipped = select_systems(args.systems.split(","), args.python)
    names = [s.name for s in systems]
    size = args.size_mib * MiB
    metrics, methods = [], {}
    t0 = time.perf_counter()
    machine = machine_info()            # overlaypc commit and load at the start
    ws = Workspace()
    try:
        for fstype in args.fs.split(","):
            m = Metric(f"copyup_{fstype}", f"copy-up {args.size_mib} MiB, {fstype}"
                       + (" reflink" if fstype == "xfs" else ""), "ms", higher_is_better=False)
            methods[fstype] = copyup_bench(ws, systems, fstype, size, args.reps, m)
            metrics.append(m)
    finally:
        ws.cleanup()
    table = markdown_table(metrics, names)
    print(f"\n{args.reps} reps; median (min–max) **time ratio to fuse-overlayfs**; "
          f"[overlaypc copy-up method from its stats]\n")
    print(table)
    write_json(args.out, {"suite": "copyup.py", "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                          "machine": dict(machine, loadavg_at_end=loadavg()),
                          "systems": names, "skipped": skipped,
                          "elapsed_s": round(time.perf_counter() - t0, 1),
                          "metrics": {m.key: m.to_json() for m in metrics}, "methods": methods,
                          "table_markdown": table})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
