"""The daemon's readers of /proc/self/mountinfo take every mount the machine has, also one
whose mount point is named with bytes that are not UTF-8 (another user's, another session's)."""
from __future__ import annotations

from overlaypc import idmap


def test_mount_options_read_past_a_mount_point_that_is_not_utf8(tmp_path):
    """``idmap.mount_options`` (asked for every lower layer at each mount: is it idmapped?)
    read mountinfo as strict UTF-8: one such mount point anywhere failed every mount."""
    info = tmp_path / "mountinfo"
    info.write_bytes(b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
                     b"90 27 0:50 / /tmp/x\xff\xfe rw,nosuid - fuse.other other rw\n"
                     b"91 27 0:51 / /srv/lower ro,idmapped - xfs /dev/vdb rw\n")
    assert idmap.mount_options(91, str(info)) == ["ro", "idmapped"]
    assert idmap.mount_options(90, str(info)) == ["rw", "nosuid"]
    assert idmap.mount_options(7, str(info)) is None
