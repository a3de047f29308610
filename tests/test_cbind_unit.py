"""``overlaypc.cbind``: libc calls through ``_ctypes`` without the ``ctypes`` package give
what ``ctypes.CDLL(None, use_errno=True)`` and ``ctypes``' types give: sizes, conversions,
results, errno; and ``sysapi``'s wrappers built on it keep their answers."""
from __future__ import annotations

import ctypes
import errno
import os

import pytest

from overlaypc import cbind, sysapi

TYPES = ["c_int", "c_uint", "c_long", "c_ulong", "c_int64", "c_uint64", "c_ubyte", "c_char_p"]


@pytest.mark.parametrize("name", TYPES)
def test_types_match_ctypes(name):
    """Each type has ``ctypes``' size and alignment, and converts values as it does."""
    ours, theirs = getattr(cbind, name), getattr(ctypes, name)
    assert cbind.sizeof(ours) == ctypes.sizeof(theirs)
    assert ctypes.alignment(ours) == ctypes.alignment(theirs)
    samples = [b"abc", None] if name == "c_char_p" else [0, 1, 255, 256, -1, 2**31, 2**63 + 5]
    for value in samples:
        assert ours(value).value == theirs(value).value, value
    arrays = (ours * 3)(), (theirs * 3)()
    assert cbind.sizeof(arrays[0]) == ctypes.sizeof(arrays[1])


def test_library_calls_as_ctypes_cdll_does():
    """Results, argument conversion with ``argtypes``/``restype``, errno saved after the
    call, missing symbols, and settings that stay on one ``Library`` instance."""
    ours, theirs = cbind.Library(), ctypes.CDLL(None, use_errno=True)
    assert ours.getpid() == theirs.getpid() == os.getpid()
    assert ours.getpid is ours.getpid                      # made once, kept
    assert ours.close(-1) == theirs.close(-1) == -1
    assert cbind.get_errno() == ctypes.get_errno() == errno.EBADF
    ours.strlen.argtypes, ours.strlen.restype = [cbind.c_char_p], cbind.c_ulong
    assert ours.strlen(b"hello") == 5
    with pytest.raises(ctypes.ArgumentError):
        ours.strlen("text")                               # c_char_p takes bytes, as ctypes'
    ours.labs.restype = cbind.c_long
    assert ours.labs(-(2**40)) != 2**40                   # a plain int goes as a C int
    ours.labs.argtypes = [cbind.c_long]
    assert ours.labs(-(2**40)) == 2**40
    assert cbind.Library().labs.restype is cbind.c_int   # another instance: its own settings
    with pytest.raises(AttributeError):
        ours.no_such_function_here
    assert getattr(ours, "no_such_function_here", None) is None
    with pytest.raises(AttributeError):
        ours.__wrapped__


def test_structures_by_reference():
    """A ``Structure`` of these types has the C layout and is passed by ``byref``, as
    ``sysapi``'s ``open_how`` and file handles are."""
    class Pair(cbind.Structure):
        _fields_ = [("a", cbind.c_uint), ("b", cbind.c_int), ("rest", cbind.c_ubyte * 8)]

    class Theirs(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint), ("b", ctypes.c_int), ("rest", ctypes.c_ubyte * 8)]

    assert cbind.sizeof(Pair) == ctypes.sizeof(Theirs) == 16
    p = Pair(1, -2)
    p.rest[:3] = b"xyz"
    libc = cbind.Library()
    assert bytes(p) == bytes(Theirs(1, -2, (ctypes.c_ubyte * 8)(*b"xyz")))
    copy = Pair()
    libc.memcpy(cbind.byref(copy), cbind.byref(p), cbind.sizeof(Pair))
    assert (copy.a, copy.b, bytes(copy.rest)) == (1, -2, b"xyz\0\0\0\0\0")
    with pytest.raises(ValueError):
        p.rest[:9] = b"123456789"                          # does not fit: refused, not copied


def test_sysapi_file_handles_round_trip(tmp_path):
    """``name_to_handle``/``open_by_handle`` (the structure and ``byref`` path) open the
    same file again; a handle longer than the kernel's 128 bytes is refused EINVAL (as the
    kernel refuses it) rather than copied past the structure's room."""
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    mount_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            htype, fid = sysapi.name_to_handle(fd)
        except OSError as e:
            pytest.fail(f"name_to_handle_at on {tmp_path}: {e}")
        again = sysapi.open_by_handle(mount_fd, htype, fid, os.O_RDONLY)
        try:
            assert os.path.sameopenfile(again, fd)
        finally:
            os.close(again)
        with pytest.raises(OSError) as caught:
            sysapi.open_by_handle(mount_fd, htype, fid + bytes(200))
        assert caught.value.errno == errno.EINVAL
        assert sysapi.fs_type(fd) != 0
    finally:
        os.close(fd)
        os.close(mount_fd)


def test_sysapi_openat2_confines_and_reports_errno(tmp_path):
    """``openat2`` through the ``syscall`` function (``restype`` c_long, a structure by
    reference) opens beneath its directory and refuses to leave it with the kernel's errno."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"")
    dirfd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = sysapi.openat2(dirfd, "f", os.O_RDONLY)
        os.close(fd)
        with pytest.raises(OSError) as caught:
            sysapi.openat2(dirfd, "../d/f", os.O_RDONLY)
        assert caught.value.errno == errno.EXDEV
        with pytest.raises(OSError) as caught:
            sysapi.openat2(dirfd, "missing", os.O_RDONLY)
        assert caught.value.errno == errno.ENOENT
    finally:
        os.close(dirfd)
