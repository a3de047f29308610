"""Open-file flags that reach the backing file, against the kernel overlay (hunt10a).

- ``O_APPEND`` is the open file's state, changed by ``fcntl(F_SETFL)`` at any time, which
  the FUSE protocol never tells the daemon: the kernel computes every write's offset
  itself (the file's size when ``O_APPEND`` is set), so a backing fd opened with
  ``O_APPEND`` kept appending after the flag was cleared (the kernel overlay follows
  ``F_SETFL`` on its real file, ``ovl_change_flags``).
- ``O_DIRECT`` writes of aligned buffers at aligned offsets reach the daemon as WRITE
  requests whose data must sit aligned in its buffer to be written through the backing
  file's ``O_DIRECT`` fd (they failed with ``EINVAL``); unaligned ones still fail with
  ``EINVAL``, as the kernel overlay's real file answers.

Each case runs on a file held open read-only first (the daemon serves the writes) and on
one opened alone (an upper file then passes through), in both cache modes and without
passthrough; each side over its own copy of one lower.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import helpers
from upper_support import stack_options

LOWER = {"a": b"aaaa", "d": bytes((i * 13) % 256 for i in range(1 << 16))}
OPTIONS = ["", "cache=shared", "passthrough=off"]


def _layers(base: Path) -> tuple[list[Path], Path, Path]:
    lower = helpers.build_layer(base / "lower", LOWER)
    upper, work = base / "upper", base / "work"
    upper.mkdir()
    work.mkdir()
    return [lower], upper, work


def _both(tmp_path: Path, overlay_mount, kernel_mount, options: str, scenario) -> tuple:
    """``scenario(mnt)`` on the kernel overlay and on overlaypc; their results and the
    uppers' contents after unmount."""
    results, uppers = [], []
    for side in ("kernel", "ours"):
        lowers, upper, work = _layers(tmp_path / side)
        if side == "kernel":
            mnt = kernel_mount(lowers, upper, work)
            results.append(scenario(mnt))
            helpers.force_unmount(mnt)
        else:
            m = overlay_mount(stack_options(lowers, upper, work, options))
            results.append(scenario(m.path))
            m.unmount()
        uppers.append({p.name: p.read_bytes() for p in sorted(upper.iterdir())})
        shutil.rmtree(tmp_path / side / "lower")
    return tuple(results), tuple(uppers)


def _setfl(fd: int, on: int = 0, off: int = 0) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, (fcntl.fcntl(fd, fcntl.F_GETFL) | on) & ~off)


def _append_toggled(held: bool):
    def scenario(mnt: Path) -> list:
        p = mnt / "a"
        reader = os.open(p, os.O_RDONLY) if held else None
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)  # (copies the lower file up)
        try:
            os.write(fd, b"1")
            _setfl(fd, off=os.O_APPEND)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, b"N")       # at offset 0 now
            _setfl(fd, on=os.O_APPEND)
            os.write(fd, b"2")       # at the end again
        finally:
            os.close(fd)
            if reader is not None:
                os.close(reader)
        fd = os.open(p, os.O_WRONLY)
        try:
            _setfl(fd, on=os.O_APPEND)
            os.write(fd, b"3")
        finally:
            os.close(fd)
        return [p.read_bytes()]
    return scenario


@pytest.mark.parametrize("held", [True, False], ids=["held", "alone"])
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "shared", "no_passthrough"])
def test_fcntl_setfl_append_is_followed(options, held, tmp_path, overlay_mount, kernel_mount):
    results, uppers = _both(tmp_path, overlay_mount, kernel_mount, options, _append_toggled(held))
    assert results[0] == [b"Naaa123"]
    assert results[1] == results[0]
    assert uppers[1] == uppers[0]


def _append_while_passing_through(mnt: Path) -> list:
    """An ``O_APPEND`` open of an upper file another open passes through (soak11:
    stress_crash EXTRA=1 seed 2002): the kernel makes it pass through too, to a backing
    file it opens with the open's flags, whose ``O_APPEND`` no ``fcntl`` clears, so its
    writes went on appending (at the size, and the file offset followed)."""
    p = mnt / "a"
    os.close(os.open(p, os.O_RDWR))  # copied up: the next opens may pass through
    other = os.open(p, os.O_RDWR)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"1")
        _setfl(fd, off=os.O_APPEND)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"N")       # at offset 0 now
        where = os.lseek(fd, 0, os.SEEK_CUR)
        _setfl(fd, on=os.O_APPEND)
        os.write(fd, b"2")       # at the end again
    finally:
        os.close(fd)
        os.close(other)
    return [where, p.read_bytes()]


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "shared", "no_passthrough"])
def test_fcntl_setfl_append_while_passing_through(options, tmp_path, overlay_mount, kernel_mount):
    results, uppers = _both(tmp_path, overlay_mount, kernel_mount, options,
                            _append_while_passing_through)
    assert results[0] == [1, b"Naaa12"]
    assert results[1] == results[0]
    assert uppers[1] == uppers[0]


def _direct_writes(held: bool):
    def attempt(call, *args):
        try:
            return call(*args)
        except OSError as e:
            return errno.errorcode[e.errno]

    def scenario(mnt: Path) -> list:
        p = mnt / "d"
        buf = mmap.mmap(-1, 8192)  # page-aligned memory, as O_DIRECT wants
        buf[:] = b"W" * 8192
        reader = os.open(p, os.O_RDONLY) if held else None
        fd = os.open(p, os.O_RDWR | os.O_DIRECT)
        out = []
        try:
            out.append(attempt(os.pwritev, fd, [buf], 8192))
            out.append(attempt(os.pwritev, fd, [memoryview(buf)[:4096]], 4096 * 20))  # extends
            out.append(attempt(os.pwritev, fd, [memoryview(buf)[:100]], 3))  # unaligned
            back = mmap.mmap(-1, 8192)
            out.append(attempt(os.preadv, fd, [back], 4096))
            out.append(bytes(back[4090:4100]))
        finally:
            os.close(fd)
            if reader is not None:
                os.close(reader)
        data = p.read_bytes()
        out += [len(data), data[8180:8200], data[-4100:-4090]]
        return out
    return scenario


@pytest.mark.parametrize("held", [True, False], ids=["held", "alone"])
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "shared", "no_passthrough"])
def test_o_direct_writes(options, held, tmp_path, overlay_mount, kernel_mount):
    results, uppers = _both(tmp_path, overlay_mount, kernel_mount, options, _direct_writes(held))
    assert results[0][:3] == [8192, 4096, "EINVAL"]
    assert results[1] == results[0]
    assert uppers[1] == uppers[0]


def test_what_fuse_does_not_carry(tmp_path, overlay_mount):
    """Documented (README, "What FUSE does not carry"): COLLAPSE/INSERT_RANGE answer
    EOPNOTSUPP, and change nothing. (``O_TMPFILE`` works since FUSE_TMPFILE is served:
    tests/test_tmpfile.py; an unnamed file never linked leaves nothing.)"""
    lowers, upper, work = _layers(tmp_path)
    m = overlay_mount(stack_options(lowers, upper, work))
    tmp = os.open(m.path, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.close(tmp)
    fd = os.open(m / "d", os.O_RDWR)
    try:
        for mode in (0x08, 0x20):  # FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE
            with pytest.raises(OSError) as e:
                _fallocate(fd, mode, 4096, 4096)
            assert e.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert (m / "d").read_bytes() == LOWER["d"]
    assert sorted(os.listdir(m.path)) == ["a", "d"]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# review11: the kernel gives every O_APPEND write its offset from its own i_size (the
# daemon's backing fds have no O_APPEND since hunt10a); these check that size is current
APPENDS = 1500
_APPENDER = textwrap.dedent("""
    import os, sys
    path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    for i in range(n):
        os.write(fd, f"{tag}{i:07d}\\n".encode())
    os.close(fd)
""")


def _appenders(held: str):
    def scenario(mnt: Path) -> list:
        p = mnt / "a"
        # "writer": an O_WRONLY open first (copies up; the inode passes through, and so do
        # the O_APPEND opens that follow)
        fd = {"none": None, "writer": os.O_WRONLY, "reader": os.O_RDONLY}[held]
        fd = None if fd is None else os.open(p, fd)
        try:
            procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(p), tag, str(APPENDS)])
                     for tag in "xyz"]
            codes = [pr.wait() for pr in procs]
        finally:
            if fd is not None:
                os.close(fd)
        data = p.read_bytes()
        records = data[4:].split(b"\n")
        return [codes, data[:4], len(data), records[-1], len(set(records[:-1])),
                {len(r) for r in records[:-1]}]
    return scenario


@pytest.mark.parametrize("held", ["none", "writer", "reader"])
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "shared", "no_passthrough"])
def test_concurrent_appends_of_three_processes(options, held, tmp_path, overlay_mount,
                                               kernel_mount):
    """Three processes append 8-byte records through one mount at once: none lost, none
    overlapping, as on the kernel overlay."""
    results, _ = _both(tmp_path, overlay_mount, kernel_mount, options, _appenders(held))
    assert results[0] == [[0, 0, 0], b"aaaa", 4 + 3 * APPENDS * 9, b"", 3 * APPENDS, {8}]
    assert results[1] == results[0]


def _appends_between_changes(append_first: bool):
    def scenario(mnt: Path) -> list:
        p = mnt / "a"
        opens = [(os.O_WRONLY | os.O_APPEND), os.O_RDWR]
        fds = [os.open(p, f) for f in (opens if append_first else opens[::-1])]
        a, b = fds if append_first else fds[::-1]
        try:
            os.write(a, b"1")
            os.pwrite(b, b"XX", 10)             # extended by another fd, a hole between
            os.write(a, b"2")
            os.ftruncate(b, 3)                  # truncated by another fd
            os.write(a, b"3")
            _fallocate(b, 0, 0, 40)             # extended by fallocate
            os.write(a, b"4")
            m = mmap.mmap(b, 0)                 # an mmap'd write (extends nothing)
            m[0:2] = b"MM"
            m.flush()
            m.close()
            os.write(a, b"5")
            os.truncate(p, 50)                  # by path
            os.write(a, b"6")
            src = os.open(mnt / "d", os.O_RDONLY)
            try:
                os.copy_file_range(src, b, 100, 0, 60)   # extended by copy_file_range
            finally:
                os.close(src)
            os.write(a, b"7")
            size = os.fstat(a).st_size
        finally:
            for fd in fds:
                os.close(fd)
        return [size, p.read_bytes()]
    return scenario


@pytest.mark.parametrize("append_first", [True, False], ids=["append_first", "other_first"])
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "shared", "no_passthrough"])
def test_appends_after_changes_through_another_fd(options, append_first, tmp_path,
                                                  overlay_mount, kernel_mount):
    """O_APPEND writes between size changes made through another fd of the file (a
    write past the end, ftruncate, fallocate, an mmap'd write, truncate by path,
    copy_file_range) land at the end as on the kernel overlay; "other_first": that fd
    opened first, so the inode passes through."""
    results, uppers = _both(tmp_path, overlay_mount, kernel_mount, options,
                            _appends_between_changes(append_first))
    assert results[0][0] == 161
    assert results[1] == results[0]
    assert uppers[1] == uppers[0]
