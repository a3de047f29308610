"""``protattr`` without a mount: the ``overlay.protattr`` value as the kernel reads and
writes it, and which changes the immutable/append-only flags refuse (the VFS's rules)."""

from __future__ import annotations

import errno
import os

import pytest

from overlaypc import protattr
from overlaypc.protattr import FS_APPEND_FL as A, FS_IMMUTABLE_FL as I


@pytest.mark.parametrize("value, flags", [
    (None, 0), (b"a", A), (b"i", I), (b"ai", A | I), (b"ia", A | I), (b"aa", A),
    (b"", None), (b"x", None), (b"ax", None), (b"a\0", None), (b"I", None),
    (b"a" * 33, None), (b"a" * 32, A),
])
def test_parse_reads_letters_as_the_kernel(value, flags):
    """``ovl_check_protattr``: letters ``a`` and ``i`` only; empty, another byte or past
    OVL_PROTATTR_MAX is malformed (None: ignored, never a crash)."""
    assert protattr.parse(value) == flags


@pytest.mark.parametrize("flags, value", [(0, b""), (A, b"a"), (I, b"i"), (A | I, b"ai"),
                                          (A | I | protattr.FS_NOATIME_FL, b"ai")])
def test_value_of_writes_the_kernels_order(flags, value):
    assert protattr.value_of(flags) == value
    assert protattr.parse(value or None) == flags & protattr.PROTECTED


def test_statx_bits_are_the_flag_bits():
    assert protattr.from_statx(0x10 | 0x20 | 0x2000 | 0x4) == I | A


def _errno(call, *args, **kwargs) -> int:
    try:
        call(*args, **kwargs)
    except OSError as e:
        return e.errno
    return 0


@pytest.mark.parametrize("open_flags, immutable, append", [
    (os.O_RDONLY, 0, 0),
    (os.O_WRONLY, errno.EPERM, errno.EPERM),
    (os.O_RDWR, errno.EPERM, errno.EPERM),
    (os.O_WRONLY | os.O_APPEND, errno.EPERM, 0),
    (os.O_RDWR | os.O_APPEND, errno.EPERM, 0),
    (os.O_WRONLY | os.O_APPEND | os.O_TRUNC, errno.EPERM, errno.EPERM),
    (os.O_RDONLY | os.O_TRUNC, errno.EPERM, errno.EPERM),
])
def test_open_rules(open_flags, immutable, append):
    """``may_open``: writes refused when immutable; when append-only, unless O_APPEND,
    and never with O_TRUNC."""
    assert _errno(protattr.check_open, I, open_flags, "f") == immutable
    assert _errno(protattr.check_open, A, open_flags, "f") == append
    assert _errno(protattr.check_open, 0, open_flags, "f") == 0


def test_directory_rules():
    """An append-only directory takes new entries and loses none; an immutable one
    neither; a moved directory's ``..`` is a write of it."""
    assert _errno(protattr.check_dir_add, A, "d") == 0
    assert _errno(protattr.check_dir_add, I, "d") == errno.EPERM
    assert _errno(protattr.check_dir_remove, A, "d") == errno.EPERM
    assert _errno(protattr.check_dir_remove, I, "d") == errno.EPERM
    assert _errno(protattr.check_moved_dir, A, "d") == 0
    assert _errno(protattr.check_moved_dir, I, "d") == errno.EPERM
    for check in (protattr.check_dir_add, protattr.check_dir_remove, protattr.check_moved_dir,
                  protattr.check_changed):
        assert _errno(check, protattr.FS_NOATIME_FL | protattr.FS_SYNC_FL, "d") == 0


@pytest.mark.parametrize("kw, immutable, append", [
    (dict(owner_mode_or_times=True, size=False, touch=False), errno.EPERM, errno.EPERM),
    (dict(owner_mode_or_times=False, size=True, touch=False), errno.EPERM, errno.EPERM),
    (dict(owner_mode_or_times=False, size=False, touch=True), errno.EPERM, 0),
    (dict(owner_mode_or_times=False, size=False, touch=False), 0, 0),
    # an ftruncate (``do_ftruncate``): append-only refuses it, immutable does not
    (dict(owner_mode_or_times=False, size=True, touch=True, by_fd=True), 0, errno.EPERM),
    (dict(owner_mode_or_times=False, size=False, touch=True, by_fd=True), 0, 0),
])
def test_setattr_rules(kw, immutable, append):
    """``notify_change``: mode, owner, explicit times and size refused by either flag;
    ``utimes(NULL)`` only by immutable; a truncate through an fd only by append-only."""
    assert _errno(protattr.check_setattr, I, "f", **kw) == immutable
    assert _errno(protattr.check_setattr, A, "f", **kw) == append
