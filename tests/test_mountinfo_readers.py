"""Every reader of /proc/self/mountinfo outside the package (the tests' helpers, the
rootless/podman support, the examples README's main command runs) takes a mount point
elsewhere on the machine whose name is not UTF-8: mountinfo lists everyone's mounts.
Before: ``rootless_support.mounts_below`` (the podman fixture's teardown) and the examples'
``is_mounted`` raised UnicodeDecodeError while such a mount existed (a full run's error at
the podman fixture's teardown, from another test's mount)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
import rootless_support

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import stale_read  # noqa: E402


@pytest.fixture
def odd_mount(tmp_path):
    """A tmpfs mounted at ``<tmp>/mnt \\xff\\xfe`` (a space mountinfo escapes, bytes that
    are not UTF-8): its path as ``os.fsdecode`` gives it."""
    helpers.require("root")
    odd = os.path.join(os.fsencode(tmp_path), b"mnt \xff\xfe")
    os.mkdir(odd)
    subprocess.run([b"mount", b"-t", b"tmpfs", b"-o", b"size=1m", b"tmpfs", odd], check=True)
    try:
        yield os.fsdecode(odd)
    finally:
        subprocess.run([b"umount", odd], check=True)


def test_readers_take_a_mount_point_not_named_in_utf8(odd_mount, tmp_path):
    assert rootless_support.mounts_below(tmp_path) == [odd_mount]
    assert stale_read.is_mounted(Path(odd_mount))
    assert not stale_read.is_mounted(tmp_path)
    assert odd_mount in helpers.mount_points()
