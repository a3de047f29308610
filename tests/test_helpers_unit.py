"""tests/helpers.py itself: reading /proc files whose lines other sessions write."""
from __future__ import annotations

import helpers


def test_read_takes_lines_that_are_not_utf8(tmp_path):
    """/proc/self/mountinfo names every mount on the machine: another session's mount
    point named with non-UTF-8 bytes must not make ``is_mounted`` raise."""
    info = tmp_path / "mountinfo"
    info.write_bytes(b"22 27 0:21 / /proc rw - proc proc rw\n"
                     b"90 27 0:50 / /tmp/x\xff\xfe rw - fuse.other other rw\n")
    text = helpers._read(str(info))
    assert text.splitlines()[0].endswith("proc proc rw") and len(text.splitlines()) == 2


def _drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


def test_a_measurement_is_taken_again_when_the_kernel_shrank_its_caches_meanwhile():
    """flake53: a count of LOOKUPs after a listing, taken while any process on the machine
    dropped the caches, counted the lookups of the entries the kernel forgot."""
    helpers.require("root")
    before = helpers.cache_shrinks()
    _drop_caches()
    assert helpers.cache_shrinks() > before
    runs = []

    def measure() -> int:
        runs.append(None)
        if len(runs) == 1:
            _drop_caches()  # another process's, during the first run
        return len(runs)

    assert helpers.undisturbed(measure) == 2
    runs.clear()
    try:
        helpers.undisturbed(lambda: (runs.append(None), _drop_caches()), attempts=3)
    except AssertionError as e:
        assert "during each of 3 attempts" in str(e)
    else:
        raise AssertionError("a measurement disturbed every time was returned")
    assert len(runs) == 3
