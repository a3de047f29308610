#!/usr/bin/env python3
"""Speed plot for the README: each workload's time relative to fuse-overlayfs's, per system.

    python benchmarks/speed_plot.py RESULTS.json [--out benchmarks/speed.png]

RESULTS.json is what ``run.py`` wrote. Every bar is a median over that run's repetitions
divided by fuse-overlayfs's median in the same run (systems interleaved), turned into a
time ratio (rates are inverted), so lower is better everywhere and fuse-overlayfs is 1.
Whiskers span min/max over the repetitions, each divided by fuse-overlayfs's median.
Needs matplotlib (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REFERENCE  # noqa: E402

#: workloads shown, in order, with short labels
SHOWN = [("find_cold", "find+stat\ncold"), ("find_warm", "find+stat\nwarm"), ("grep_lower", "grep -r\nlower, cold"),
         ("grep", "grep -r\nupper"),
         ("untar", "untar"), ("rm_rf", "rm -rf"), ("create", "create\n+write"),
         ("chmod_r", "chmod -R\n(copy-up)"), ("mount_net", "mount cold\n(- python)"),
         ("mount_warm_net", "mount warm\n(- python)")]
SYSTEMS = [("overlaypc-kernel", "overlaypc"), (REFERENCE, "fuse-overlayfs"),
           ("kernel-overlay", "kernel overlayfs")]


def time_ratios(metric: dict, system: str) -> tuple[float, float, float] | None:
    """(median, min, max) of ``system``'s time relative to the reference median."""
    ref = (metric["summary"] or {}).get(REFERENCE)
    own = (metric["summary"] or {}).get(system)
    if not ref or not own or not ref["median"]:
        return None
    if metric["higher_is_better"]:  # a rate: time is its inverse
        return (ref["median"] / own["median"], ref["median"] / own["max"], ref["median"] / own["min"])
    return (own["median"] / ref["median"], own["min"] / ref["median"], own["max"] / ref["median"])


def plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = data["metrics"]
    shown = [(k, label) for k, label in SHOWN if k in metrics]
    fig, ax = plt.subplots(figsize=(11, 4.6))
    width = 0.8 / len(SYSTEMS)
    for i, (system, name) in enumerate(SYSTEMS):
        xs, med, lo, hi = [], [], [], []
        for j, (key, _) in enumerate(shown):
            r = time_ratios(metrics[key], system)
            if r is None:
                continue
            xs.append(j + (i - (len(SYSTEMS) - 1) / 2) * width)
            med.append(r[0])
            lo.append(max(r[0] - r[1], 0))
            hi.append(max(r[2] - r[0], 0))
        bars = ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=name)
        for x, m in zip(xs, med):
            ax.annotate(f"{m:.2g}", (x, m), textcoords="offset points", xytext=(0, 2),
                        ha="center", fontsize=7, color=bars.patches[0].get_facecolor())
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(shown)), [label for _, label in shown])
    ax.set_ylabel("time relative to fuse-overlayfs (log; lower is better)")
    cfg = data.get("config", {})
    machine = data.get("machine", {})
    ax.set_title(f"overlaypc {machine.get('overlaypc_commit', '?')}: median of {cfg.get('reps', '?')} "
                 f"interleaved runs, {cfg.get('tree_files', '?')} files, {machine.get('nproc', '?')} vCPUs "
                 f"(one run; ratios within it)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed.png"))
    args = ap.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    plot(data, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
