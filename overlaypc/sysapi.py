"""Linux system calls the standard library lacks, via ``_ctypes`` (``cbind``).

Owns: ``openat2`` (confined path resolution), ``open_tree`` (``clone_tree``: a detached
copy of a layer's mount), ``fchmodat2`` (``chmod_nofollow``),
``listxattrat`` (``listxattr_at``), ``statx`` (``mount_root_at``), ``renameat2`` (whiteout / exchange / noreplace renames),
``linkat`` of an open fd (``link_fd``), ``name_to_handle_at`` (origin file handles), the
``FICLONE`` ioctl (reflink), the filesystem UUID lookup and ``fstatfs``'s filesystem type.

Caveats: ``openat2`` is called by number (the same on every architecture but alpha), as are
``open_tree``, ``fchmodat2`` and ``listxattrat`` on architectures with the unified syscall table (elsewhere,
or on a kernel without them, their wrappers decline); ``renameat2`` goes through glibc's
wrapper. Every wrapper raises ``OSError`` with the
real errno, nothing else.
"""
from __future__ import annotations

import errno
import fcntl
import os
import _struct as struct  # (struct.py only re-exports _struct: ~0.15 ms of a start)
import sys

from . import cbind

_libc = cbind.Library()
#: how ``os.fsencode`` and ``os.fsdecode`` encode and decode a name (their own two calls,
#: made once): the one pair of the package (``overlay_ops`` too), public so no module makes
#: its own (two private ones, merged, clashed: e714d8a)
FS_ENCODING, FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
_libc.syscall.restype = cbind.c_long

# openat2 has one number on every architecture Linux added it to after the syscall tables
# were unified (5.6), except alpha; glibc has no wrapper for it (os.uname, not platform:
# importing platform costs a mount ~1 ms)
_SYS_OPENAT2 = 547 if os.uname().machine == "alpha" else 437
# architectures known to use the unified syscall table plainly (not mips, whose ABIs add an
# offset, nor alpha): the newer calls below are taken by number only there; elsewhere their
# wrappers decline and the caller does it its own way
_UNIFIED_TABLE = os.uname().machine in (
    "x86_64", "i386", "i686", "aarch64", "armv7l", "armv8l", "riscv64", "s390x", "ppc64le",
    "ppc64", "loongarch64")
# open_tree (5.2): 428 in the unified tables (``clone_tree``)
_SYS_OPEN_TREE = 428 if _UNIFIED_TABLE else None
_OPEN_TREE_CLONE = 1
# fchmodat2 (6.6): 452 in the unified tables (``chmod_nofollow``)
_SYS_FCHMODAT2 = 452 if _UNIFIED_TABLE else None
# listxattrat (6.13): 465 in the unified tables (``listxattr_at``)
_SYS_LISTXATTRAT = 465 if _UNIFIED_TABLE else None
_AT_SYMLINK_NOFOLLOW = 0x100
# renameat2's number differs per architecture: take glibc's wrapper (2.28+), never a guess
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [cbind.c_int, cbind.c_char_p, cbind.c_int, cbind.c_char_p, cbind.c_uint]
    _renameat2.restype = cbind.c_int

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: What every layer path is resolved with (docs/ARCHITECTURE.md §3).
RESOLVE_CONFINED = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

FICLONE = 0x40049409
AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000


class _OpenHow(cbind.Structure):
    _fields_ = [("flags", cbind.c_uint64), ("mode", cbind.c_uint64), ("resolve", cbind.c_uint64)]


def _check(ret: int, what: str, name: object = None) -> int:
    if ret < 0:
        err = cbind.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", name)
    return ret


#: (flags, mode, resolve) -> a ready ``open_how`` argument: the kernel only reads it, and a
#: mount uses a few combinations (at most ``_HOWS_MAX`` kept; the rest made per call)
_hows: dict[tuple[int, int, int], object] = {}
_HOWS_MAX = 64
_HOW_SIZE = cbind.sizeof(_OpenHow)


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_CONFINED) -> int:
    """Open ``path`` beneath ``dirfd`` with ``resolve`` restrictions; return the new fd."""
    key = (flags, mode, resolve)
    how = _hows.get(key)
    if how is None:
        how = cbind.byref(_OpenHow(flags | os.O_CLOEXEC, mode, resolve))  # (keeps it alive)
        if len(_hows) < _HOWS_MAX:
            _hows[key] = how
    # (``os.fsencode`` inlined for a str: it is Python code, one call per open of a file)
    raw = path.encode(FS_ENCODING, FS_ERRORS) if path.__class__ is str else os.fsencode(path)
    while True:
        ret = _libc.syscall(_SYS_OPENAT2, dirfd, raw, how, _HOW_SIZE)
        if ret >= 0:
            return ret
        err = cbind.get_errno()
        if err != 4 and err != 11:  # EINTR, EAGAIN (RESOLVE_CACHED races)
            raise OSError(err, os.strerror(err), path)


def clone_tree(fd: int) -> int:
    """An ``O_PATH`` fd of a detached, non-recursive copy of the mount at the directory
    ``fd`` refers to (``open_tree(OPEN_TREE_CLONE)`` without ``AT_RECURSIVE``): the copy
    has none of the mounts beneath that directory, so every path resolved from the new fd
    sees the objects they cover, and no mount made later propagates into it. It keeps the
    mount's flags (ro, nosuid...) and idmapping, and it goes when the last fd beneath it
    does. Raises ``OSError``: EPERM without CAP_SYS_ADMIN over the mount namespace, EINVAL
    where the mount has locked mounts beneath it (a less privileged namespace's), ENOSYS
    where the kernel (before 5.2) or this architecture's table has no ``open_tree``."""
    if _SYS_OPEN_TREE is None:
        raise OSError(errno.ENOSYS, "open_tree: not taken by number on this architecture")
    flags = _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_EMPTY_PATH
    return _check(_libc.syscall(_SYS_OPEN_TREE, fd, b"", flags), "open_tree")


class _Fchmodat2:
    """Whether the kernel has ``fchmodat2`` (False once it answered ENOSYS)."""
    present = _SYS_FCHMODAT2 is not None


def chmod_nofollow(dirfd: int, name: str, mode: int) -> bool:
    """``chmod`` of entry ``name`` (one component) of directory ``dirfd``, not followed
    (``fchmodat2`` with ``AT_SYMLINK_NOFOLLOW``: one system call, where glibc's
    ``fchmodat`` opens, stats and closes; a symlink gives EOPNOTSUPP); ``name`` "": the
    object ``dirfd`` (any fd, ``O_PATH`` too) refers to (``AT_EMPTY_PATH``). False, nothing
    done, where the kernel has no ``fchmodat2`` (before 6.6): the caller does it its way.
    Caveat: a ``name`` that is a mount point is crossed (no ``RESOLVE_NO_XDEV`` here)."""
    if not _Fchmodat2.present:
        return False
    flags = _AT_SYMLINK_NOFOLLOW if name else _AT_SYMLINK_NOFOLLOW | _AT_EMPTY_PATH
    if _libc.syscall(_SYS_FCHMODAT2, dirfd, os.fsencode(name), mode, flags) == 0:
        return True
    err = cbind.get_errno()
    if err == errno.ENOSYS:
        _Fchmodat2.present = False
        return False
    raise OSError(err, os.strerror(err), name)


class _Listxattrat:
    """Whether the kernel has ``listxattrat`` (False once it answered ENOSYS)."""
    present = _SYS_LISTXATTRAT is not None


#: the list ``listxattr_at`` reads in one call (an upper file's names: none, or a few marks)
_XATTR_LIST_SHORT = 256
_XattrList = cbind.c_ubyte * _XATTR_LIST_SHORT


def listxattr_at(dirfd: int, name: str) -> list[str] | None:
    """The xattr names of entry ``name`` (one component) of directory ``dirfd``, not
    followed: one ``listxattrat`` with ``AT_SYMLINK_NOFOLLOW`` (where the ``llistxattr`` of
    ``/proc/self/fd/N/name`` resolves three more components through procfs: ~1.5 us more).
    None, nothing read, where the kernel has no ``listxattrat`` (before 6.13) or the list
    is longer than ``_XATTR_LIST_SHORT`` bytes (ERANGE): the caller lists its own way.
    Other failures raise ``OSError`` with the errno (ENOENT, ENOTSUP...)."""
    if not _Listxattrat.present:
        return None
    buf = _XattrList()
    raw = name.encode(FS_ENCODING, FS_ERRORS)  # (``os.fsencode``'s, without its frame)
    n = _libc.syscall(_SYS_LISTXATTRAT, dirfd, raw, _AT_SYMLINK_NOFOLLOW, buf, _XATTR_LIST_SHORT)
    if n > 0:
        return [os.fsdecode(x) for x in bytes(buf)[:n - 1].split(b"\0")]  # (NUL-terminated names)
    if n == 0:
        return []
    err = cbind.get_errno()
    if err == errno.ENOSYS:
        _Listxattrat.present = False
        return None
    if err == errno.ERANGE:
        return None
    raise OSError(err, os.strerror(err), name)


_STATX_TYPE_INO = 0x001 | 0x100  # STATX_TYPE | STATX_INO
_STATX_ATTR_MOUNT_ROOT = 0x2000  # (5.8)
_AT_STATX_DONT_SYNC = 0x4000
_STATX_SIZE = 256
_StatxBuf = cbind.c_ubyte * _STATX_SIZE
# stx_attributes at 8, stx_ino at 32, stx_attributes_mask at 56, stx_dev_major/minor at 136
_STATX_FIELDS = struct.Struct("=8xQ16xQ16xQ72xII")


def mount_root_at(dirfd: int, name: str) -> tuple[int, int, bool] | None:
    """``(st_dev, st_ino, is a mount's root)`` of entry ``name`` (one component) of
    directory ``dirfd``, not followed: one ``statx`` with ``AT_SYMLINK_NOFOLLOW`` whose
    ``STATX_ATTR_MOUNT_ROOT`` says whether the name is a mount point (a lookup by name
    crosses it to the mounted root; ``RESOLVE_NO_XDEV`` has no ``*at`` stat). None where
    the kernel does not report that attribute (before 5.8): the caller checks its own
    way. Failures raise ``OSError`` with the errno (ENOENT...)."""
    buf = _StatxBuf()
    _check(_libc.statx(dirfd, os.fsencode(name), _AT_SYMLINK_NOFOLLOW | _AT_STATX_DONT_SYNC,
                       _STATX_TYPE_INO, buf), "statx", name)
    attributes, ino, mask, major, minor = _STATX_FIELDS.unpack_from(bytes(buf))
    if not mask & _STATX_ATTR_MOUNT_ROOT:
        return None
    return os.makedev(major, minor), ino, bool(attributes & _STATX_ATTR_MOUNT_ROOT)


def statx_attributes(dirfd: int, name: str) -> int:
    """``stx_attributes`` of entry ``name`` of directory ``dirfd`` (``""``: of ``dirfd``
    itself, an ``O_PATH`` fd will do), not followed: immutable, append-only and the other
    ``STATX_ATTR_*`` bits, which an ``fstatat`` does not report. OSError with the errno."""
    buf = _StatxBuf()
    flags = _AT_SYMLINK_NOFOLLOW | _AT_STATX_DONT_SYNC | (_AT_EMPTY_PATH if not name else 0)
    _check(_libc.statx(dirfd, os.fsencode(name), flags, 0, buf), "statx", name)
    return _STATX_FIELDS.unpack_from(bytes(buf))[0]


def renameat2(olddirfd: int, oldname: str, newdirfd: int, newname: str, flags: int = 0) -> None:
    """``renameat2`` through glibc; ENOSYS where this libc has no wrapper (callers fall
    back or refuse the flags, never guess a syscall number)."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2: not provided by this C library", oldname)
    ret = _renameat2(olddirfd, os.fsencode(oldname), newdirfd, os.fsencode(newname), flags)
    _check(ret, "renameat2", oldname)


_linkat = _libc.linkat
_linkat.argtypes = [cbind.c_int, cbind.c_char_p, cbind.c_int, cbind.c_char_p, cbind.c_int]
_linkat.restype = cbind.c_int
_AT_SYMLINK_FOLLOW = 0x400


def link_fd(fd: int, newdirfd: int, newname: str) -> None:
    """Give the open file ``fd`` the name ``newname`` in ``newdirfd`` (``linkat`` of an fd:
    a file made with ``O_TMPFILE`` has no name to link from). ``AT_EMPTY_PATH`` needs
    CAP_DAC_READ_SEARCH (the kernel answers ENOENT without it): then through the fd's
    ``/proc/self/fd`` link with ``AT_SYMLINK_FOLLOW``, which a plain user may use. ENOENT
    from both: the file cannot be linked (made with ``O_EXCL``, or its last name went)."""
    raw = os.fsencode(newname)
    if _linkat(fd, b"", newdirfd, raw, _AT_EMPTY_PATH) == 0:
        return
    err = cbind.get_errno()
    if err not in (errno.ENOENT, errno.EPERM):
        raise OSError(err, f"linkat: {os.strerror(err)}", newname)
    via = os.fsencode(f"/proc/self/fd/{fd}")
    _check(_linkat(AT_FDCWD, via, newdirfd, raw, _AT_SYMLINK_FOLLOW), "linkat", newname)


def ficlone(dst_fd: int, src_fd: int) -> None:
    """Reflink all of ``src_fd`` into ``dst_fd`` (raises OSError when unsupported)."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


class _FileHandle(cbind.Structure):
    _fields_ = [("handle_bytes", cbind.c_uint), ("handle_type", cbind.c_int),
                ("f_handle", cbind.c_ubyte * 128)]


def name_to_handle(fd: int) -> tuple[int, bytes]:
    """Return ``(handle_type, handle_bytes)`` of the object ``fd`` refers to."""
    fh = _FileHandle(128, 0)
    mount_id = cbind.c_int(0)
    ret = _libc.name_to_handle_at(fd, b"", cbind.byref(fh), cbind.byref(mount_id), _AT_EMPTY_PATH)
    _check(ret, "name_to_handle_at")
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])

_LITTLE = sys.byteorder == "little"
#: the most bytes a file handle has (the kernel's MAX_HANDLE_SZ, and ``_FileHandle``'s room)
_HANDLE_MAX = 128


def open_by_handle(mount_fd: int, handle_type: int, fid: bytes, flags: int = os.O_PATH) -> int:
    """``open_by_handle_at`` (needs CAP_DAC_READ_SEARCH); raises OSError (ESTALE, ...)."""
    if len(fid) > _HANDLE_MAX:  # as the kernel answers (and the copy below would not fit)
        raise OSError(errno.EINVAL, f"open_by_handle_at: {os.strerror(errno.EINVAL)}")
    fh = _FileHandle(len(fid), handle_type)
    fh.f_handle[:len(fid)] = fid
    ret = _libc.open_by_handle_at(mount_fd, cbind.byref(fh), flags | os.O_CLOEXEC)
    return _check(ret, "open_by_handle_at")


def parse_ovl_origin(value: bytes) -> tuple[bytes, int, bytes] | None:
    """(uuid, handle_type, fid) from a ``trusted.overlay.origin`` value, or None if malformed."""
    if len(value) < 21 or value[0] != 0 or value[1] != 0xFB or value[2] != len(value):
        return None
    return value[5:21], value[4], value[21:]


_FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2), Linux 6.5+


def fs_uuid(fd: int) -> bytes:
    """The 16-byte UUID of the filesystem holding ``fd``; zeros when unknown (e.g. tmpfs)."""
    buf = bytearray(17)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFSUUID, buf)
    except OSError:
        return bytes(16)
    length = buf[0]
    return bytes(buf[1 : 1 + length]).ljust(16, b"\0")[:16]


#: ``struct ovl_fb`` flags: big-endian fid, fid of any byte order, fid of an upper inode
OVL_FH_FLAG_BIG_ENDIAN = 1 << 0
OVL_FH_FLAG_ANY_ENDIAN = 1 << 1
OVL_FH_FLAG_PATH_UPPER = 1 << 2


def ovl_origin_xattr(fd: int, uuid: bytes, *, upper: bool = False) -> bytes | None:
    """Encode the kernel's ``trusted.overlay.origin`` value (struct ovl_fb, v0) for ``fd``.

    Layout: version(0) magic(0xfb) len flags type uuid[16] fid[]; flags 0 means
    "CPU byte order, lower inode", which is what a little-endian kernel writes.
    ``upper``: the handle of an upper inode (``OVL_FH_FLAG_PATH_UPPER``), as the kernel's
    ``trusted.overlay.upper`` of the index dir holds it.
    ``uuid`` is the filesystem's (``fs_uuid`` of a normal fd on it: ioctls refuse O_PATH
    fds). Returns None where the filesystem cannot export file handles.
    """
    try:
        htype, fid = name_to_handle(fd)
    except OSError:
        return None
    if htype > 255:
        return None
    length = 21 + len(fid)
    flags = (0 if _LITTLE else OVL_FH_FLAG_BIG_ENDIAN) | (OVL_FH_FLAG_PATH_UPPER if upper else 0)
    header = struct.pack("<BBBBB", 0, 0xFB, length, flags, htype)
    return header + uuid + fid


def fs_type(fd: int) -> int:
    """``f_type`` of ``fstatfs(fd)`` (the filesystem's magic number). Read as a C long at
    the struct's start, which it is on the usual ABIs; where it is not (s390x: an int) the
    value matches no magic number, which callers must treat as "unknown"."""
    buf = (cbind.c_long * 32)()  # struct statfs is 120 bytes on 64-bit Linux
    _check(_libc.fstatfs(fd, buf), "fstatfs")
    return buf[0] & 0xFFFFFFFF


_libc.fallocate.argtypes = [cbind.c_int, cbind.c_int, cbind.c_int64, cbind.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with any mode (``os.posix_fallocate`` only knows mode 0)."""
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


# -- file attribute flags (chattr/lsattr) ------------------------------------------------------
FS_IOC_GETFLAGS = 0x80086601      # _IOR('f', 1, long): the kernel reads and writes an int
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F    # _IOR('X', 31, struct fsxattr)
FS_IOC_FSSETXATTR = 0x401C5820
FSXATTR = struct.Struct("<IIIII8x")  # xflags extsize nextents projid cowextsize pad


def get_flags(fd: int) -> int:
    """The ``FS_*_FL`` flags of the object open as ``fd`` (not ``O_PATH``)."""
    buf = bytearray(8)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    return struct.unpack_from("<I", buf)[0]


def set_flags(fd: int, flags: int) -> None:
    buf = bytearray(8)
    struct.pack_into("<I", buf, 0, flags & 0xFFFFFFFF)
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, buf)


def fsgetxattr(fd: int) -> bytes:
    """The ``struct fsxattr`` (28 bytes) of the object open as ``fd``."""
    buf = bytearray(FSXATTR.size)
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
    return bytes(buf)


def fssetxattr(fd: int, raw: bytes) -> None:
    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, bytearray(raw))
