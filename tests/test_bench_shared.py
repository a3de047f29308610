"""The benchmark's guard for warm measurements (benchmarks/run.py ``step``, ``common.resident``):
a cache=shared READ-rate measurement whose lower file was not in the page cache measured
the disk, not the daemon, and is redone (benchmarks/RESULTS.md, fifth round)."""
from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks")


def _bench(name: str):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)  # run.py imports its sibling ``common``
    spec = importlib.util.spec_from_file_location(f"overlaypc_bench_{name}",
                                                  os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def test_step_redoes_a_measurement_that_found_its_data_cold():
    run = _bench("run")
    metric = run.Metric("shared_1", "label", "reads/s")
    calls: list[int] = []

    def measure() -> float:
        calls.append(1)
        return float(len(calls))

    verdicts = iter(["lower file 1.1% resident around fio", None])
    value = run.step(metric, "overlaypc-shared", None, 60, measure, cold=lambda: next(verdicts))
    assert calls == [1, 1]
    assert value == 2.0
    assert metric.values == {"overlaypc-shared": [2.0]}
    assert metric.disturbed == {}


def test_step_keeps_and_marks_a_measurement_cold_every_time():
    run = _bench("run")
    metric = run.Metric("shared_2", "label", "reads/s")
    calls: list[int] = []

    def measure() -> float:
        calls.append(1)
        return 5.0

    run.step(metric, "overlaypc-shared", None, 60, measure, cold=lambda: "cold")
    assert len(calls) == 3
    assert metric.values == {"overlaypc-shared": [5.0]}
    assert metric.disturbed == {"overlaypc-shared": 1}


def test_resident_counts_the_page_cache_of_a_file(tmp_path):
    common = _bench("common")
    path = str(tmp_path / "f")
    size = 64 * 4096
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: all dropped
    finally:
        os.close(fd)
    assert common.resident(path) == 0
    # other work on this machine may drop the page cache between the read and the look:
    # read again then (a drop leaves the counter moved)
    for _ in range(5):
        before = common.drops()
        common.read_file(path)
        seen = common.resident(path)
        if common.drops() == before:
            break
    assert seen == size


def test_a_shared_run_is_cold_when_its_file_was_evicted_or_read_from_disk():
    run = _bench("run")
    warm = dict(resident_before=1.0, resident_after=0.9995, daemon_disk_read=0.0004)
    assert run.shared_cold(warm) is None
    assert "resident" in run.shared_cold(dict(warm, resident_before=0.04))    # dropped before fio
    assert "resident" in run.shared_cold(dict(warm, resident_after=0.35))     # evicted, not read back
    assert "from disk" in run.shared_cold(dict(warm, daemon_disk_read=0.3))   # evicted, read back
