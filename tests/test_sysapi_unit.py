"""Unit tests of ``overlaypc.sysapi`` (no mount, no root)."""

from __future__ import annotations

import errno
import importlib
import os
import platform

import pytest

from overlaypc import sysapi


def test_renameat2_flags(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sysapi.renameat2(fd, "a", fd, "b", sysapi.RENAME_EXCHANGE)
        assert (tmp_path / "a").read_bytes() == b"b" and (tmp_path / "b").read_bytes() == b"a"
        with pytest.raises(OSError) as e:
            sysapi.renameat2(fd, "a", fd, "b", sysapi.RENAME_NOREPLACE)
        assert e.value.errno == errno.EEXIST
        sysapi.renameat2(fd, "a", fd, "c", sysapi.RENAME_NOREPLACE)
        assert (tmp_path / "c").read_bytes() == b"b"
    finally:
        os.close(fd)


def test_no_syscall_number_guessed_for_an_unknown_architecture(monkeypatch):
    """Issue 13.10: on an architecture it did not know, sysapi used x86_64's renameat2
    number, which is another system call there. The number now comes from glibc."""
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    try:
        fresh = importlib.reload(sysapi)
        assert getattr(fresh, "_SYS_RENAMEAT2", None) != 316
        assert fresh._renameat2 is not None
    finally:
        monkeypatch.undo()
        importlib.reload(sysapi)
