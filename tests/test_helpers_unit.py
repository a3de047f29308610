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
