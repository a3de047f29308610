"""``OVERLAYPC_BENCH_WORKERS`` (engine/daemon.py, benchmark-only): the base worker count a
benchmark pairs (one worker against one per CPU); it lowers the count and never raises it."""
from __future__ import annotations

import os
import time

import pytest

from overlaypc.engine.pool import usable_cpus


def _readers(pid: int) -> int:
    """The daemon's threads waiting in a read of /dev/fuse (the idle workers)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                n += f.read().strip() == "fuse_dev_do_read"
        except OSError:
            pass
    return n


def _idle_readers(pid: int, want: int) -> int:
    """The idle workers once ``want`` wait (the clones start after the first answer), or
    what waits after 10 s."""
    deadline = time.monotonic() + 10
    n = _readers(pid)
    while n != want and time.monotonic() < deadline:
        time.sleep(0.05)
        n = _readers(pid)
    return n


@pytest.mark.parametrize("asked", [1, 64])
def test_bench_workers_sets_the_base_count_at_most_one_per_cpu(layers_factory, overlay_mount, asked):
    layers = layers_factory({"low": {"f": "x"}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}",
                      env={"OVERLAYPC_BENCH_WORKERS": str(asked)})
    assert (m.path / "f").read_text() == "x"
    want = min(asked, usable_cpus())
    assert _idle_readers(m.proc.pid, want) == want
