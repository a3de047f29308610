"""The benchmark's guard for warm measurements (benchmarks/run.py ``step``, ``common.resident``):
a cache=shared READ-rate measurement whose lower file was not in the page cache measured
the disk, not the daemon, and is redone (benchmarks/RESULTS.md, fifth round)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import helpers

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
    assert run.shared_disturbed(warm) is None
    assert "resident" in run.shared_disturbed(dict(warm, resident_before=0.04))    # dropped before fio
    assert "resident" in run.shared_disturbed(dict(warm, resident_after=0.35))     # evicted, not read back
    assert "from disk" in run.shared_disturbed(dict(warm, daemon_disk_read=0.3))   # evicted, read back


def test_a_shared_run_is_disturbed_when_other_work_took_the_cpus():
    """Another process busy on one of two CPUs makes the scheduler put both workers on the
    other one, and two readers' rate halves (RESULTS.md, "cache=shared, two readers: what
    decides the rate"): such a run measured the machine's load, not the daemon, and is
    redone like a cold one."""
    run = _bench("run")
    quiet = dict(resident_before=1.0, resident_after=1.0, daemon_disk_read=0.0, other_cpu=0.03)
    assert run.shared_disturbed(quiet) is None
    assert "not quiet" in run.shared_disturbed(dict(quiet, other_cpu=0.45))


def test_window_rates_add_the_jobs_per_window(tmp_path):
    """fio's IOPS logs (one per job, stamps drifting by a few ms) summed per window; a
    window only some jobs logged is left out."""
    run = _bench("run")
    one, two = tmp_path / "r_iops.1.log", tmp_path / "r_iops.2.log"
    one.write_text("499, 70000, 0, 0, 0\n1000, 71000, 0, 0, 0\n1501, 30000, 0, 0, 0\n"
                   "2003, 35000, 0, 0, 0\n")
    two.write_text("503, 69000, 0, 0, 0\n1003, 72000, 0, 0, 0\n1504, 31000, 0, 0, 0\n")
    assert run.window_rates([str(one), str(two)]) == [139000, 143000, 61000]


def test_fio_randread_logs_its_rate_per_window(tmp_path):
    helpers.require(shutil.which("fio") is not None, "fio not installed")
    run = _bench("run")
    path = tmp_path / "f"
    path.write_bytes(b"\0" * (1 << 20))
    rates: list[int] = []
    iops = run.fio_randread(str(path), 1 << 20, 2, jobs=2, rates=rates)
    assert len(rates) >= 3  # 500 ms windows of a 2 s run (fio leaves out the last)
    assert all(r > 0 for r in rates)
    assert min(rates) <= 2 * iops and max(rates) >= iops / 2


def test_startup_breakdown_finds_every_step_it_marks(tmp_path):
    """benchmarks/startup.py marks a mount's steps by wrapping functions of ``cli``,
    ``core`` and the engine by name; one renamed would silently fold its step into the
    next. One mount of this tree: every step is marked, each at most the total (the first
    worker may answer before the main thread marks its start: the order of those may vary)."""
    helpers.require_fuse_mount()
    startup = _bench("startup")
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("x")
    steps = startup.one_mount(sys.executable, os.path.dirname(HERE), str(lower), str(tmp_path / "run"))
    assert set(steps) == {"interpreter", "cli imported", "options parsed", "validated",
                          "core imported", "OverlayFS() built", "start() done",
                          "engine imported, OverlayOps()", "mount(2) done", "INIT read start",
                          "INIT answered", "a worker started", "first request dispatched",
                          "first reply written", "visible (stat answered)", "total",
                          "CPU time to the first reply"}
    assert all(v <= steps["total"] for k, v in steps.items() if k != "CPU time to the first reply")
