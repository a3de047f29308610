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


#: the steps after the rename that fail the copy-up: through the parent's fd the lookup
#: cache holds (its readable fd, opened at the first copy-up into it: copyup49, for the
#: fsync), or by path where none is
STEPS = {"readable_dir": ("readable_dir", ""), "fsync": ("fsync", ""),
         "fsync_dir": ("fsync_dir", "d")}
#: the parent's times set back, best effort as the kernel's (fix50): through its readable
#: fd, by name where no cache holds it or where that fd may not be opened (EACCES)
TIMES = {"do_futime": ("do_futime", "", errno.EIO), "do_utime": ("do_utime", "d", errno.EIO),
         "do_utime-eperm": ("do_utime", "d", errno.EPERM),
         "readable_dir-eacces-do_utime": ("do_utime", "", errno.EIO)}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_handle_opened_before_a_copy_up_failing_after_its_rename(fs_factory, monkeypatch, step):
    fs = fs_factory({"d/x": b"old\n"})
    name, uncached = STEPS[step]
    fail = (os, "fsync", _fsync_of_a_directory_fails) if name == "fsync" else (fs.stack.upper, name)
    reader = _reader_then_failing_copy_up(fs, monkeypatch, "d/x", fail, uncached)
    assert (fs.root / "upper/d/x").exists()
    assert write_then_read(fs, "d/x", reader) == b"new\n"


@pytest.mark.parametrize("step", sorted(TIMES))
def test_a_copy_up_whose_parents_times_cannot_be_set_is_done(fs_factory, monkeypatch, step):
    """The kernel sets a copy-up's parent's times back as best effort (the error of
    ``ovl_set_timestamps`` ignored: an upper directory owned by another user, EPERM, or
    append-only): the open that copies up succeeds, the copy is in place, the handle
    opened before reads what is written after, the parent's times are what they came to."""
    fs = fs_factory({"d/x": b"old\n"}, volatile=step.startswith("readable_dir"))
    write_new(fs, "d/other", b"")
    reader = fs.open("d/x", os.O_RDONLY).fh
    assert fs.read(reader, 100, 0) == b"old\n"
    name, uncached, code = TIMES[step]
    tried = []

    def fails(*args, **kwargs):
        tried.append(name)
        raise OSError(code, "injected")
    monkeypatch.setattr(fs.stack.upper, name, fails)
    upper = fs.stack.upper
    if step.startswith("readable_dir"):  # (a readable fd refused: by name, see copyup.py)
        monkeypatch.setattr(upper, "readable_dir", lambda *a: _raise(errno.EACCES))
    if uncached:
        real = upper.dirs
        monkeypatch.setattr(upper, "dirs", lambda rel: None if rel == uncached else real(rel))
    fs.release(fs.open("d/x", os.O_RDWR).fh)
    monkeypatch.undo()
    assert tried == [name]
    assert (fs.root / "upper/d/x").read_bytes() == b"old\n"
    assert write_then_read(fs, "d/x", reader) == b"new\n"


def _raise(code: int):
    raise OSError(code, "injected")


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


@pytest.mark.parametrize("code", [errno.EMFILE, errno.EIO])
def test_a_copy_ups_parent_times_kept_by_name_when_no_readable_fd_can_be_had(fs_factory,
                                                                             monkeypatch, code):
    """review50a: the parent's readable fd refused for another reason than EACCES (EMFILE
    once ``retrying`` shed the caches, EIO): its times are set back by name, which needs no
    fd, as where no cache holds the parent; the kernel keeps them. Volatile: no fsync
    needs that fd after, so the copy-up is done."""
    fs = fs_factory({"d/x": b"old\n"}, volatile=True)
    write_new(fs, "d/other", b"")  # (d copied up and cached)
    parent = fs.root / "upper/d"
    times = (1_500_000_000_000_000_001, 1_400_000_000_000_000_002)
    os.utime(parent, ns=times)
    tried = []

    def readable_dir(*args):
        tried.append(args[1])
        raise OSError(code, "injected")
    monkeypatch.setattr(fs.stack.upper, "readable_dir", readable_dir)
    fs.release(fs.open("d/x", os.O_RDWR).fh)
    monkeypatch.undo()
    assert tried == ["d"]
    st = os.stat(parent)
    assert (st.st_atime_ns, st.st_mtime_ns) == times
    assert (fs.root / "upper/d/x").read_bytes() == b"old\n"
