"""A copy-up that fails after its copy is in place (the parent directory's fsync, its
times, the index count): the name resolves to the copy from then on, so the object's
inode follows it, and a handle opened before the copy-up reads what is written after it
(mission 1 of the README on a failure path). Driven without FUSE, each step when the test
says; the failing step is a layer call replaced by one that raises EIO."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from test_kept_lookups import fs_factory, write_new, write_then_read  # noqa: F401 (a fixture)


def _eio(*_args, **_kwargs):
    raise OSError(errno.EIO, "injected")


def _reader_then_failing_copy_up(fs, monkeypatch, rel: str, fail: tuple, uncached: str = "") -> int:
    write_new(fs, "d/other", b"")  # its parent is copied up before, without a failure
    reader = fs.open(rel, os.O_RDONLY).fh
    assert fs.read(reader, 100, 0) == b"old\n"
    if len(fail) == 2:
        monkeypatch.setattr(*fail, _eio)
    else:
        monkeypatch.setattr(*fail)
    if uncached:  # (the copy-up finds no cached fd of that upper directory: steps by path)
        upper = fs.stack.upper
        real = upper.dirs
        monkeypatch.setattr(upper, "dirs", lambda rel: None if rel == uncached else real(rel))
    with pytest.raises(OSError):
        fs.open(rel, os.O_RDWR)
    monkeypatch.undo()
    return reader


def _fsync_of_a_directory_fails(fd: int, _real=os.fsync) -> None:
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        raise OSError(errno.EIO, "injected")
    _real(fd)


#: the steps after the rename: through the parent's fd the lookup cache holds (its
#: readable fd, opened at the first copy-up into it: copyup49), or by path where none is
STEPS = {"readable_dir": ("readable_dir", ""), "do_futime": ("do_futime", ""),
         "fsync": ("fsync", ""), "fsync_dir": ("fsync_dir", "d"), "do_utime": ("do_utime", "d")}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_handle_opened_before_a_copy_up_failing_after_its_rename(fs_factory, monkeypatch, step):
    fs = fs_factory({"d/x": b"old\n"})
    name, uncached = STEPS[step]
    fail = (os, "fsync", _fsync_of_a_directory_fails) if name == "fsync" else (fs.stack.upper, name)
    reader = _reader_then_failing_copy_up(fs, monkeypatch, "d/x", fail, uncached)
    assert (fs.root / "upper/d/x").exists()
    assert write_then_read(fs, "d/x", reader) == b"new\n"


def test_handle_opened_before_an_index_copy_up_failing_after_its_link(fs_factory, monkeypatch):
    fs = fs_factory({"d/x": b"old\n"}, index=True)
    os.link(fs.root / "lower/d/x", fs.root / "lower/d/y")
    reader = _reader_then_failing_copy_up(fs, monkeypatch, "d/x", (fs.stack.upper, "fsync_dir"))
    assert write_then_read(fs, "d/x", reader) == b"new\n"


def test_handle_opened_before_a_metacopy_data_copy_up_failing_at_the_mark(fs_factory,
                                                                           monkeypatch):
    """The mark's removal is the data copy-up's last step (a redirect stays: left26;
    before, the redirect's removal after the mark could fail): failing there, it leaves
    the metacopy file as it was, and the next open for writing completes it; the handle
    opened before reads what that writes."""
    fs = fs_factory({"d/x": b"old\n"}, metacopy=True)
    write_new(fs, "d/other", b"")
    fs.chmod("d/x", 0o600)                                   # a metadata-only copy
    reader = fs.open("d/x", os.O_RDONLY).fh
    assert fs.read(reader, 100, 0) == b"old\n"
    tried = []

    def fails(rel, name):
        tried.append(name)
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(fs.stack.upper, "do_removexattr", fails)
    with pytest.raises(OSError):
        fs.open("d/x", os.O_RDWR)
    monkeypatch.undo()
    assert tried == ["trusted.overlay.metacopy"]
    assert os.getxattr(fs.root / "upper/d/x", "trusted.overlay.metacopy") == b""
    assert write_then_read(fs, "d/x", reader) == b"new\n"
