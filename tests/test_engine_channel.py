"""``engine.channel`` without a mount: what a failed fusermount3 leaves behind."""
from __future__ import annotations

import errno
import gc
import os
import warnings

import pytest

from overlaypc.engine import channel


def _open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


def test_a_failed_fusermount_leaves_no_file_nor_socket_open(tmp_path, monkeypatch):
    """fusermount3 exiting without passing a /dev/fuse fd: the mount answers EPERM with
    its message, and the file that took its output and both ends of its socket are
    closed (no ResourceWarning at collection, no fd left)."""
    fake = tmp_path / "fusermount3"
    fake.write_text("#!/bin/sh\necho 'fusermount3: mount failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(channel, "_fusermount", lambda: str(fake))
    (tmp_path / "mnt").mkdir()
    gc.collect()
    before = _open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(OSError) as raised:
            channel._mount_fusermount(str(tmp_path / "mnt"), channel.MountOptions("t"), 0, [])
        assert raised.value.errno == errno.EPERM and "Operation not permitted" in str(raised.value)
        del raised
        left = _open_fds() - before
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert left == set()


def test_a_missing_fusermount_leaves_no_socket_open(monkeypatch, tmp_path):
    """No fusermount3 at all (ENOENT before it runs): nothing of the attempt stays open."""
    def missing() -> str:
        raise OSError(errno.ENOENT, "fusermount3 not found")
    monkeypatch.setattr(channel, "_fusermount", missing)
    gc.collect()
    before = _open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(OSError) as raised:
            channel._mount_fusermount(str(tmp_path), channel.MountOptions("t"), 0, [])
        assert raised.value.errno == errno.ENOENT
        del raised
        left = _open_fds() - before
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert left == set()
