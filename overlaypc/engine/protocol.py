"""The FUSE wire protocol (``include/uapi/linux/fuse.h``): layouts, constants, codecs.

Owns every byte layout the engine reads or writes, as ``struct`` formats with their
sizes checked at import, and small pure functions that encode replies and decode
request arguments. No I/O here: the session reads requests and writes what these
functions build, and the unit tests run them without a kernel.

Layouts are the kernel's for protocol 7.31 and later (the header on Debian 12 is
7.38; the flags above it, passthrough and ``DIRECT_IO_ALLOW_MMAP``, are from 7.39/7.40
and are defined here by number). Integers are native little-endian.
"""
from __future__ import annotations

import os
import stat
import _struct as struct  # (struct.py only re-exports _struct: ~0.15 ms of a start)

from ..records import record
from ..typing_lite import NamedTuple

KERNEL_MAJOR = 7
#: the minor version we speak; the kernel's own may be higher (it adapts) or lower
#: (we adapt: nothing we send depends on a minor above 7.31 unless the kernel offered it)
KERNEL_MINOR = 45
MIN_MINOR = 31

ROOT_ID = 1

# -- opcodes ------------------------------------------------------------------------------
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = range(8, 19)
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT, OPENDIR, READDIR = range(20, 29)
RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT, BMAP, DESTROY = range(29, 39)
IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, LSEEK = range(39, 47)
COPY_FILE_RANGE, SETUPMAPPING, REMOVEMAPPING, SYNCFS, TMPFILE, STATX, COPY_FILE_RANGE_64 = range(47, 54)

OPCODE_NAMES = {v: k for k, v in list(globals().items())
                if k.isupper() and isinstance(v, int) and 1 <= v <= 53 and k not in ("ROOT_ID",)}

#: requests the kernel sends without waiting for a reply
NO_REPLY = frozenset((FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY))

# -- INIT flags (flags | flags2 << 32) ---------------------------------------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
CREATE_SUPP_GROUP = 1 << 34
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38

# -- open flags (fuse_open_out.open_flags) -----------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# -- request flags -------------------------------------------------------------------------
GETATTR_FH = 1
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
OPEN_KILL_SUIDGID = 1 << 0
SETXATTR_ACL_KILL_SGID = 1 << 0   # fuse_setxattr_in.setxattr_flags (SETXATTR_EXT)
FSYNC_FDATASYNC = 1
RELEASE_FLUSH = 1

FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# -- notifications (fuse_out_header.error of an unsolicited message) ------------------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_DELETE = 6

# -- /dev/fuse ioctls ----------------------------------------------------------------------
DEV_IOC_CLONE = 0x8004E500
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502

# -- layouts -------------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")      # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # ino size blocks a/m/ctime a/m/cnsec mode nlink uid gid rdev blksize flags
ENTRY_HEAD = struct.Struct("<QQQQII")        # nodeid generation entry_valid attr_valid (nsec x2)
ATTR_HEAD = struct.Struct("<QII")            # attr_valid attr_valid_nsec dummy
ENTRY_OUT = struct.Struct(ENTRY_HEAD.format + ATTR.format[1:])   # fuse_entry_out: both in one
ATTR_OUT = struct.Struct(ATTR_HEAD.format + ATTR.format[1:])     # fuse_attr_out
INIT_IN = struct.Struct("<IIII")             # major minor max_readahead flags
INIT_IN_EXT = struct.Struct("<IIIII")        # ... flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
GETATTR_IN = struct.Struct("<IIQ")           # getattr_flags dummy fh
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("<II")               # flags open_flags
CREATE_IN = struct.Struct("<IIII")           # flags mode umask open_flags
OPEN_OUT = struct.Struct("<QIi")             # fh open_flags backing_id
RELEASE_IN = struct.Struct("<QIIQ")          # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("<QIIQ")            # fh unused padding lock_owner
READ_IN = struct.Struct("<QQIIQII")          # fh offset size read_flags lock_owner flags pad
WRITE_IN = struct.Struct("<QQIIQII")         # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<II")           # size flags
SETXATTR_IN_EXT = struct.Struct("<IIII")     # size flags setxattr_flags padding
GETXATTR_IN = struct.Struct("<II")
IOCTL_IN = struct.Struct("<QIIQII")          # fh flags cmd arg in_size out_size
IOCTL_OUT = struct.Struct("<iIII")           # result flags in_iovs out_iovs
IOCTL_DIR = 1 << 4                           # fuse_ioctl_in.flags: on a directory
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
MKNOD_IN = struct.Struct("<IIII")            # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")              # mode umask
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")           # newdir flags padding
LINK_IN = struct.Struct("<Q")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
INTERRUPT_IN = struct.Struct("<Q")
DIRENT = struct.Struct("<QQII")              # ino off namelen type
FALLOCATE_IN = struct.Struct("<QQQII")       # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")            # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")   # parent namelen flags
NOTIFY_DELETE_OUT = struct.Struct("<QQII")       # parent child namelen padding
BACKING_MAP = struct.Struct("<iIQ")              # fd flags padding

for _s, _n in ((IN_HEADER, 40), (OUT_HEADER, 16), (ATTR, 88), (ENTRY_HEAD, 40), (ATTR_HEAD, 16),
               (ENTRY_OUT, 128), (ATTR_OUT, 104),
               (INIT_OUT, 64), (SETATTR_IN, 88), (OPEN_OUT, 16), (READ_IN, 40), (WRITE_IN, 40),
               (STATFS_OUT, 80), (DIRENT, 24), (COPY_FILE_RANGE_IN, 56)):
    assert _s.size == _n, (_s.format, _s.size, _n)

ENTRY_OUT_SIZE = ENTRY_HEAD.size + ATTR.size   # 128
ATTR_OUT_SIZE = ATTR_HEAD.size + ATTR.size     # 104
#: where a WRITE's data starts in the request
WRITE_DATA = IN_HEADER.size + WRITE_IN.size    # 80
#: the smallest read buffer the kernel accepts
MIN_BUFFER = 8192
PAGE = 4096


class InHeader(NamedTuple):
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    extlen: int


def decode_header(buf) -> InHeader:
    ln, op, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(buf)
    return InHeader(ln, op, unique, nodeid, uid, gid, pid, extlen * 8)


def out_header(unique: int, error: int, payload_len: int) -> bytes:
    """The reply header; ``error`` is 0 or a negative errno."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, error, unique)


# -- attributes and entries -----------------------------------------------------------------
class FileAttr(NamedTuple):
    """What a reply says about an inode (``struct fuse_attr``); times in nanoseconds."""
    ino: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int

    @classmethod
    def from_stat(cls, st: os.stat_result, ino: int | None = None) -> "FileAttr":
        return cls(st.st_ino if ino is None else ino, st.st_size, st.st_blocks, st.st_atime_ns,
                   st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_nlink, st.st_uid,
                   st.st_gid, st.st_rdev, st.st_blksize)


def _split_ns(ns: int) -> tuple[int, int]:
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec & 0xFFFFFFFFFFFFFFFF, nsec


def _attr_fields(a: FileAttr) -> tuple:
    """``struct fuse_attr``'s fields in order (every reply with attributes packs them
    with its head in one ``pack``: the splits are inlined, this runs per LOOKUP, GETATTR
    and listed entry; the named tuple is unpacked at once, not read field by field)."""
    ino, size, blocks, atime, mtime, ctime, mode, nlink, uid, gid, rdev, blksize = a
    asec, ansec = divmod(atime, 1_000_000_000)
    msec, mnsec = divmod(mtime, 1_000_000_000)
    csec, cnsec = divmod(ctime, 1_000_000_000)
    # glibc's dev_t encoding agrees with the kernel's new_encode_dev in the low 32 bits
    return (ino, size, blocks, asec & 0xFFFFFFFFFFFFFFFF, msec & 0xFFFFFFFFFFFFFFFF,
            csec & 0xFFFFFFFFFFFFFFFF, ansec, mnsec, cnsec, mode, nlink, uid & 0xFFFFFFFF,
            gid & 0xFFFFFFFF, rdev & 0xFFFFFFFF, blksize, 0)


def pack_attr(a: FileAttr) -> bytes:
    return ATTR.pack(*_attr_fields(a))


def unpack_attr(buf, offset: int = 0) -> FileAttr:
    (ino, size, blocks, asec, msec, csec, ansec, mnsec, cnsec, mode, nlink, uid, gid, rdev,
     blksize, _flags) = ATTR.unpack_from(buf, offset)
    return FileAttr(ino, size, blocks, asec * 10**9 + ansec, msec * 10**9 + mnsec,
                    csec * 10**9 + cnsec, mode, nlink, uid, gid, rdev, blksize)


#: a timeout's (seconds, nanoseconds), by its value: a mount uses two or three values
_TIMEOUTS: dict[float, tuple[int, int]] = {}


def _timeout(seconds: float) -> tuple[int, int]:
    split = _TIMEOUTS.get(seconds)
    if split is None:
        sec = int(seconds)
        split = sec, int((seconds - sec) * 1e9)
        if len(_TIMEOUTS) < 64:  # (a dict read and write are atomic: no lock needed)
            _TIMEOUTS[seconds] = split
    return split


def pack_entry(nodeid: int, generation: int, attr: FileAttr | None, entry_timeout: float,
               attr_timeout: float) -> bytes:
    """``fuse_entry_out``; nodeid 0 with no attributes is a negative entry."""
    es, ens = _timeout(entry_timeout)
    as_, ans = _timeout(attr_timeout)
    if attr is None:
        return ENTRY_HEAD.pack(nodeid, generation, es, as_, ens, ans) + bytes(ATTR.size)
    return ENTRY_OUT.pack(nodeid, generation, es, as_, ens, ans, *_attr_fields(attr))


def pack_attr_out(attr: FileAttr, timeout: float) -> bytes:
    s, ns = _timeout(timeout)
    return ATTR_OUT.pack(s, ns, 0, *_attr_fields(attr))


def split_timeout(seconds: float) -> tuple[int, int]:
    """A timeout as a reply's (seconds, nanoseconds) fields."""
    return _timeout(seconds)


#: ``fuse_attr_out`` with its three seconds fields signed: the same bytes as ``ATTR_OUT``
#: given each one's two's complement (``_attr_fields``'s mask), without the masking
_ATTR_OUT_SIGNED = struct.Struct("<QIIQQQqqqIIIIIIIIII")
assert _ATTR_OUT_SIGNED.size == ATTR_OUT.size


def pack_stat_attr_out(valid: tuple[int, int], st: os.stat_result, ino: int,
                       nlink: int | None) -> bytes:
    """``pack_attr_out(FileAttr.from_stat(st, ino), timeout)`` (``valid``: its
    ``split_timeout``), ``st_nlink`` replaced by ``nlink`` unless None, in one ``pack``
    with no object between (a directory's GETATTR after every change in it, an open file's
    SETATTR). The seconds are the stat's integer fields 7-9 (``tv_sec``: the floor of the
    ns value, as ``divmod`` gives it, negative times too), the nanoseconds the ns value's
    remainder."""
    return _ATTR_OUT_SIGNED.pack(valid[0], valid[1], 0, ino, st.st_size, st.st_blocks, st[7], st[8],
                                 st[9], st.st_atime_ns % 1_000_000_000,
                                 st.st_mtime_ns % 1_000_000_000, st.st_ctime_ns % 1_000_000_000,
                                 st.st_mode, st.st_nlink if nlink is None else nlink,
                                 st.st_uid & 0xFFFFFFFF, st.st_gid & 0xFFFFFFFF,
                                 st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)


def pack_open(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    return OPEN_OUT.pack(fh, open_flags, backing_id)


#: ``fuse_entry_out`` then ``fuse_open_out`` (a CREATE's reply), the attribute's three
#: seconds fields signed as ``_ATTR_OUT_SIGNED``'s
_CREATE_OUT_SIGNED = struct.Struct(ENTRY_HEAD.format + "QQQqqqIIIIIIIIII" + OPEN_OUT.format[1:])
assert _CREATE_OUT_SIGNED.size == ENTRY_OUT.size + OPEN_OUT.size
CREATE_OUT_SIZE = _CREATE_OUT_SIGNED.size


def pack_stat_created(nodeid: int, valid: tuple[int, int], st: os.stat_result, ino: int, fh: int,
                      open_flags: int, backing_id: int) -> bytes:
    """``pack_entry(nodeid, 0, FileAttr.from_stat(st, ino), t, t) + pack_open(fh,
    open_flags, backing_id)`` (``valid``: ``split_timeout(t)``) in one ``pack`` with no
    object between: a short CREATE's reply (the seconds as ``pack_stat_attr_out``'s)."""
    return _CREATE_OUT_SIGNED.pack(nodeid, 0, valid[0], valid[0], valid[1], valid[1], ino,
                                   st.st_size, st.st_blocks, st[7], st[8], st[9],
                                   st.st_atime_ns % 1_000_000_000, st.st_mtime_ns % 1_000_000_000,
                                   st.st_ctime_ns % 1_000_000_000, st.st_mode, st.st_nlink,
                                   st.st_uid & 0xFFFFFFFF, st.st_gid & 0xFFFFFFFF,
                                   st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0, fh, open_flags,
                                   backing_id)


def pack_statfs(st) -> bytes:
    """``fuse_statfs_out`` from an ``os.statvfs_result`` or a dict of its fields."""
    get = st.__getitem__ if isinstance(st, dict) else st.__getattribute__
    return STATFS_OUT.pack(get("f_blocks"), get("f_bfree"), get("f_bavail"), get("f_files"),
                           get("f_ffree"), get("f_bsize"), get("f_namemax"), get("f_frsize"), 0)


def dirent_size(name: bytes, plus: bool) -> int:
    size = DIRENT.size + len(name)
    size = (size + 7) & ~7
    return size + (ENTRY_OUT_SIZE if plus else 0)


def pack_dirent(name: bytes, ino: int, off: int, mode: int) -> bytes:
    """One ``fuse_dirent``, padded to 8 bytes; ``mode``'s file type becomes d_type."""
    raw = DIRENT.pack(ino, off, len(name), stat.S_IFMT(mode) >> 12) + name
    return raw + bytes(-len(raw) % 8)


def pack_direntplus(entry: bytes, name: bytes, ino: int, off: int, mode: int) -> bytes:
    return entry + pack_dirent(name, ino, off, mode)


#: ``fuse_direntplus`` (``fuse_entry_out``, ``fuse_dirent``, the name NUL-padded to 8 bytes)
#: in one layout per padded name length ("Ns" pads with NULs): one ``pack`` per listed entry.
#: The attribute's three seconds fields are signed ("q"): the same bytes as ``_attr_fields``'s
#: two's-complement mask gives, without the masking
_DIRENTPLUS_FORMAT = ENTRY_HEAD.format + "QQQqqqIIIIIIIIII" + DIRENT.format[1:]
assert struct.calcsize(_DIRENTPLUS_FORMAT) == ENTRY_OUT.size + DIRENT.size
_DIRENTPLUS: dict[int, struct.Struct] = {}
_NO_ENTRY = (0,) * (len(ENTRY_OUT.format) - 1)
_NO_ATTR = (0,) * (len(ATTR.format) - 1)
#: ``fuse_entry_out``'s four timeout fields, by (entry timeout, attribute timeout)
_TIMEOUT_PAIRS: dict[tuple[float, float], tuple[int, int, int, int]] = {}


def _direntplus_layout(padded: int) -> struct.Struct:
    layout = _DIRENTPLUS.get(padded)
    if layout is None:  # (names are at most 1 KiB: at most 128 layouts; a dict write is atomic)
        layout = _DIRENTPLUS[padded] = struct.Struct(f"{_DIRENTPLUS_FORMAT}{padded}s")
    return layout


#: ``direntplus_layout``'s, by name length (at most 1,024 entries, each one of ``_DIRENTPLUS``)
DIRENTPLUS_BY_LEN: dict[int, struct.Struct] = {}


def direntplus_layout(namelen: int) -> struct.Struct:
    """The layout of a ``fuse_direntplus`` whose name is ``namelen`` bytes long (its
    ``size``: the entry's room in a reply, padded); ``DIRENTPLUS_BY_LEN.get`` first where
    one entry per listed name matters (``pack_direntplus_stat``'s callers)."""
    layout = DIRENTPLUS_BY_LEN.get(namelen)
    if layout is None:
        layout = DIRENTPLUS_BY_LEN[namelen] = _direntplus_layout((namelen + 7) & ~7)
    return layout


def pack_direntplus_entry(nodeid: int, generation: int, attr: FileAttr | None, entry_timeout: float,
                          attr_timeout: float, name: bytes, ino: int, off: int, mode: int) -> bytes:
    """One ``fuse_direntplus``: ``pack_direntplus(pack_entry(...), ...)`` in one ``pack``,
    except that nodeid 0 makes an all-zero entry (none: the kernel looks the name up).
    (``_attr_fields`` and ``_direntplus_layout``'s hit inlined: one per listed entry.)"""
    layout = _DIRENTPLUS.get((len(name) + 7) & ~7)
    if layout is None:
        layout = _direntplus_layout((len(name) + 7) & ~7)
    if not nodeid:
        return layout.pack(*_NO_ENTRY, ino, off, len(name), (mode & 0o170000) >> 12, name)
    timeouts = _TIMEOUT_PAIRS.get((entry_timeout, attr_timeout))
    if timeouts is None:
        (es, ens), (as_, ans) = _timeout(entry_timeout), _timeout(attr_timeout)
        timeouts = es, as_, ens, ans
        if len(_TIMEOUT_PAIRS) < 64:
            _TIMEOUT_PAIRS[entry_timeout, attr_timeout] = timeouts
    if attr is None:
        return layout.pack(nodeid, generation, *timeouts, *_NO_ATTR, ino, off,
                           len(name), (mode & 0o170000) >> 12, name)
    a_ino, size, blocks, atime, mtime, ctime, a_mode, nlink, uid, gid, rdev, blksize = attr
    asec, ansec = divmod(atime, 1_000_000_000)
    msec, mnsec = divmod(mtime, 1_000_000_000)
    csec, cnsec = divmod(ctime, 1_000_000_000)
    return layout.pack(nodeid, generation, *timeouts, a_ino, size, blocks, asec, msec, csec, ansec,
                       mnsec, cnsec, a_mode, nlink, uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                       rdev & 0xFFFFFFFF, blksize, 0, ino, off, len(name), (mode & 0o170000) >> 12,
                       name)


def pack_direntplus_stat(layout: struct.Struct, nodeid: int, timeouts: tuple[int, int, int, int],
                         st: os.stat_result, ino: int, nlink: int | None, name: bytes, d_ino: int,
                         off: int, mode: int) -> bytes:
    """``pack_direntplus_entry(nodeid, 0, FileAttr.from_stat(st, ino) with st_nlink
    replaced by nlink unless None, ...)`` with no object between (a READDIRPLUS entry
    taken from its listing's stat): ``layout`` is ``direntplus_layout(len(name))`` (the
    caller fitted the entry by its ``size``), ``timeouts`` ``fuse_entry_out``'s four fields
    (entry s, attr s, entry ns, attr ns); the times split as ``pack_stat_attr_out`` does.
    (An ``os.stat_result``'s owner fits its 32 bits: no mask, as ``uid_t``/``gid_t``.)"""
    es, as_, ens, ans = timeouts
    return layout.pack(nodeid, 0, es, as_, ens, ans, ino, st.st_size, st.st_blocks, st[7], st[8],
                       st[9], st.st_atime_ns % 1_000_000_000, st.st_mtime_ns % 1_000_000_000,
                       st.st_ctime_ns % 1_000_000_000, st.st_mode,
                       st.st_nlink if nlink is None else nlink, st.st_uid, st.st_gid,
                       st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0, d_ino, off, len(name),
                       (mode & 0o170000) >> 12, name)



#: ``fuse_entry_out`` with the attribute's three seconds fields signed (as ``_ATTR_OUT_SIGNED``)
_ENTRY_OUT_SIGNED = struct.Struct(ENTRY_HEAD.format + "QQQqqqIIIIIIIIII")
assert _ENTRY_OUT_SIGNED.size == ENTRY_OUT.size


def pack_stat_entry(nodeid: int, timeouts: tuple[int, int, int, int], st: os.stat_result,
                    ino: int) -> bytes:
    """``pack_entry(nodeid, 0, FileAttr.from_stat(st, ino), ...)`` in one ``pack`` with no
    object between (a LOOKUP of a directory the lookup cache holds, found again):
    ``timeouts`` as ``pack_direntplus_stat``'s, the times split as ``pack_stat_attr_out``
    does."""
    es, as_, ens, ans = timeouts
    return _ENTRY_OUT_SIGNED.pack(nodeid, 0, es, as_, ens, ans, ino, st.st_size, st.st_blocks,
                                  st[7], st[8], st[9], st.st_atime_ns % 1_000_000_000,
                                  st.st_mtime_ns % 1_000_000_000, st.st_ctime_ns % 1_000_000_000,
                                  st.st_mode, st.st_nlink, st.st_uid & 0xFFFFFFFF,
                                  st.st_gid & 0xFFFFFFFF, st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)

# -- request arguments ---------------------------------------------------------------------
def cstrings(body, count: int) -> list[bytes]:
    """The first ``count`` NUL-terminated strings of ``body``."""
    parts = bytes(body).split(b"\0", count)
    if len(parts) <= count:
        raise ValueError("truncated request: a string without its NUL")
    return parts[:count]


@record(frozen=True)
class SetAttr:
    """A SETATTR request: which fields are set (``valid``, FATTR_*) and their values."""
    valid: int
    fh: int | None
    size: int
    atime_ns: int | None   # None with FATTR_ATIME_NOW: now
    mtime_ns: int | None
    mode: int
    uid: int
    gid: int

    @classmethod
    def decode(cls, body) -> "SetAttr":
        (valid, _, fh, size, _lock, atime, mtime, _ctime, ansec, mnsec, _cnsec, mode, _u4,
         uid, gid, _u5) = SETATTR_IN.unpack_from(body)
        return cls(valid, fh if valid & FATTR_FH else None, size,
                   None if valid & FATTR_ATIME_NOW else atime * 10**9 + ansec,
                   None if valid & FATTR_MTIME_NOW else mtime * 10**9 + mnsec,
                   mode, uid, gid)

    def encode(self) -> bytes:
        """For tests and the fake kernel: the request body this object decodes from."""
        a = self.atime_ns or 0
        m = self.mtime_ns or 0
        return SETATTR_IN.pack(self.valid, 0, self.fh or 0, self.size, 0, a // 10**9, m // 10**9,
                               0, a % 10**9, m % 10**9, 0, self.mode, 0, self.uid, self.gid, 0)


@record(frozen=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int     # flags | flags2 << 32 (flags2 only with INIT_EXT)

    @classmethod
    def decode(cls, body) -> "InitIn":
        major, minor, readahead, flags = INIT_IN.unpack_from(body)
        if flags & INIT_EXT and len(body) >= INIT_IN_EXT.size:
            flags |= INIT_IN_EXT.unpack_from(body)[4] << 32
        return cls(major, minor, readahead, flags)

    def encode(self) -> bytes:
        return INIT_IN_EXT.pack(self.major, self.minor, self.max_readahead,
                                self.flags & 0xFFFFFFFF, self.flags >> 32) + bytes(44)


@record(frozen=True)
class InitOut:
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    max_stack_depth: int = 0

    def encode(self) -> bytes:
        flags = self.flags
        if flags >> 32:
            flags |= INIT_EXT
        return INIT_OUT.pack(self.major, self.minor, self.max_readahead, flags & 0xFFFFFFFF,
                             self.max_background, self.congestion_threshold, self.max_write,
                             self.time_gran, self.max_pages, 0, flags >> 32,
                             self.max_stack_depth, 0)

    @classmethod
    def decode(cls, body) -> "InitOut":
        (major, minor, ra, flags, bg, cong, mw, tg, mp, _align, flags2, depth,
         _timeout) = INIT_OUT.unpack_from(body)
        return cls(major, minor, ra, flags | (flags2 << 32 if flags & INIT_EXT else 0), bg, cong,
                   mw, tg, mp, depth)


def notify_inval_inode(nodeid: int, offset: int = 0, length: int = 0) -> bytes:
    """Drop cached attributes and, from ``offset`` (``length`` 0: to the end; -1: none),
    the inode's pages."""
    body = NOTIFY_INVAL_INODE_OUT.pack(nodeid, offset, length)
    return out_header(0, NOTIFY_INVAL_INODE, len(body)) + body


def notify_inval_entry(parent: int, name: bytes) -> bytes:
    body = NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
    return out_header(0, NOTIFY_INVAL_ENTRY, len(body)) + body


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    body = NOTIFY_DELETE_OUT.pack(parent, child, len(name), 0) + name + b"\0"
    return out_header(0, NOTIFY_DELETE, len(body)) + body
