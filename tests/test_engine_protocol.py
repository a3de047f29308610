"""Unit tests of ``overlaypc.engine.protocol`` (no root, no mount): every layout the engine
reads or writes, checked against the kernel's ``include/uapi/linux/fuse.h`` as the C
compiler lays it out (the installed header is 7.38; the few fields after it are checked
against offsets from the kernel source), and every codec by the bytes it produces."""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

import helpers
from overlaypc.engine import protocol as p

HEADER = Path("/usr/include/linux/fuse.h")

# our layout -> (C struct, its fields in our order, whether ours is only a prefix of it)
LAYOUTS = {
    "IN_HEADER": ("fuse_in_header", "len opcode unique nodeid uid gid pid total_extlen padding", False),
    "OUT_HEADER": ("fuse_out_header", "len error unique", False),
    "ATTR": ("fuse_attr", "ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode "
                          "nlink uid gid rdev blksize flags", False),
    "ENTRY_HEAD": ("fuse_entry_out", "nodeid generation entry_valid attr_valid entry_valid_nsec "
                                     "attr_valid_nsec", True),
    "ATTR_HEAD": ("fuse_attr_out", "attr_valid attr_valid_nsec dummy", True),
    "INIT_IN": ("fuse_init_in", "major minor max_readahead flags", True),
    "INIT_IN_EXT": ("fuse_init_in", "major minor max_readahead flags flags2", True),
    # 7.38 ends with flags2 and unused[7]; max_stack_depth and request_timeout: below
    "INIT_OUT": ("fuse_init_out", "major minor max_readahead flags max_background "
                                  "congestion_threshold max_write time_gran max_pages "
                                  "map_alignment flags2", False),
    "GETATTR_IN": ("fuse_getattr_in", "getattr_flags dummy fh", False),
    "SETATTR_IN": ("fuse_setattr_in", "valid padding fh size lock_owner atime mtime ctime atimensec "
                                      "mtimensec ctimensec mode unused4 uid gid unused5", False),
    "OPEN_IN": ("fuse_open_in", "flags open_flags", False),
    "CREATE_IN": ("fuse_create_in", "flags mode umask open_flags", False),
    "OPEN_OUT": ("fuse_open_out", "fh open_flags padding", False),   # padding: backing_id (7.40)
    "RELEASE_IN": ("fuse_release_in", "fh flags release_flags lock_owner", False),
    "FLUSH_IN": ("fuse_flush_in", "fh unused padding lock_owner", False),
    "READ_IN": ("fuse_read_in", "fh offset size read_flags lock_owner flags padding", False),
    "WRITE_IN": ("fuse_write_in", "fh offset size write_flags lock_owner flags padding", False),
    "WRITE_OUT": ("fuse_write_out", "size padding", False),
    "STATFS_OUT": ("fuse_kstatfs", "blocks bfree bavail files ffree bsize namelen frsize padding", False),
    "FSYNC_IN": ("fuse_fsync_in", "fh fsync_flags padding", False),
    "SETXATTR_IN": ("fuse_setxattr_in", "size flags", True),          # FUSE_COMPAT_SETXATTR_IN_SIZE
    "SETXATTR_IN_EXT": ("fuse_setxattr_in", "size flags setxattr_flags padding", False),
    "GETXATTR_IN": ("fuse_getxattr_in", "size padding", False),
    "GETXATTR_OUT": ("fuse_getxattr_out", "size padding", False),
    "ACCESS_IN": ("fuse_access_in", "mask padding", False),
    "MKNOD_IN": ("fuse_mknod_in", "mode rdev umask padding", False),
    "MKDIR_IN": ("fuse_mkdir_in", "mode umask", False),
    "RENAME_IN": ("fuse_rename_in", "newdir", False),
    "RENAME2_IN": ("fuse_rename2_in", "newdir flags padding", False),
    "LINK_IN": ("fuse_link_in", "oldnodeid", False),
    "FORGET_IN": ("fuse_forget_in", "nlookup", False),
    "BATCH_FORGET_IN": ("fuse_batch_forget_in", "count dummy", False),
    "FORGET_ONE": ("fuse_forget_one", "nodeid nlookup", False),
    "INTERRUPT_IN": ("fuse_interrupt_in", "unique", False),
    "DIRENT": ("fuse_dirent", "ino off namelen type", False),
    "FALLOCATE_IN": ("fuse_fallocate_in", "fh offset length mode padding", False),
    "LSEEK_IN": ("fuse_lseek_in", "fh offset whence padding", False),
    "LSEEK_OUT": ("fuse_lseek_out", "offset", False),
    "COPY_FILE_RANGE_IN": ("fuse_copy_file_range_in", "fh_in off_in nodeid_out fh_out off_out len "
                                                      "flags", False),
    "IOCTL_IN": ("fuse_ioctl_in", "fh flags cmd arg in_size out_size", False),
    "IOCTL_OUT": ("fuse_ioctl_out", "result flags in_iovs out_iovs", False),
    "NOTIFY_INVAL_INODE_OUT": ("fuse_notify_inval_inode_out", "ino off len", False),
    "NOTIFY_INVAL_ENTRY_OUT": ("fuse_notify_inval_entry_out", "parent namelen flags", False),
    "NOTIFY_DELETE_OUT": ("fuse_notify_delete_out", "parent child namelen padding", False),
}
#: sizes of whole replies and where their nested parts start
EXTRA = {
    "fuse_entry_out": "attr", "fuse_attr_out": "attr", "fuse_init_out": "unused",
    "fuse_statfs_out": "st", "fuse_direntplus": "dirent",
}


def field_offsets(s: struct.Struct) -> list[int]:
    """The offset of each field of a little-endian, unaligned ``struct`` format."""
    out, pos = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", s.format.lstrip("<=")):
        n = int(count or 1)
        if code == "x":
            pos += n
            continue
        size = struct.calcsize("<" + code)
        for _ in range(n):
            out.append(pos)
            pos += size
    return out


@pytest.fixture(scope="module")
def kernel_layouts(tmp_path_factory) -> dict[str, list[int]]:
    """sizeof and offsetof of every field above, and the header's macro constants, as the
    C compiler reads the installed header: {"OUR_NAME": [size, off...], "FUSE_X": [value]}."""
    cc = shutil.which("cc") or shutil.which("gcc")
    helpers.require(cc is not None and HEADER.exists(), "needs a C compiler and linux/fuse.h")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <sys/ioctl.h>", "#include <linux/fuse.h>", "int main(void) {"]
    for name, (cname, fields, _) in LAYOUTS.items():
        offs = "".join(f' printf(" %zu", offsetof(struct {cname}, {f}));' for f in fields.split())
        lines.append(f' printf("{name} %zu", sizeof(struct {cname}));{offs} printf("\\n");')
    for cname, f in EXTRA.items():
        lines.append(f' printf("{cname}.{f} %zu %zu\\n", sizeof(struct {cname}), '
                     f'offsetof(struct {cname}, {f}));')
    for name in _macro_names():
        lines += [f"#ifdef FUSE_{name}",
                  f' printf("FUSE_{name} %llu\\n", (unsigned long long)(FUSE_{name}));', "#endif",
                  f"#ifdef {name}",
                  f' printf("{name} %llu\\n", (unsigned long long)({name}));', "#endif"]
    lines.append(" return 0; }")
    d = tmp_path_factory.mktemp("fuseh")
    (d / "l.c").write_text("\n".join(lines) + "\n")
    r = subprocess.run([cc, "-o", str(d / "l"), str(d / "l.c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(d / "l")], check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: [int(x) for x in line.split()[1:]] for line in out.splitlines()}


def _our_constants() -> dict[str, int]:
    return {k: v for k, v in vars(p).items() if k.isupper() and isinstance(v, int)}


def _macro_names() -> list[str]:
    return [k for k in _our_constants() if not k.startswith("_")] + ["MIN_READ_BUFFER"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_kernel_header(kernel_layouts, name):
    cname, _fields, prefix = LAYOUTS[name]
    ours = getattr(p, name)
    size, *offsets = kernel_layouts[name]
    if name == "INIT_OUT":  # and two fields after 7.38: test_nested_and_later_fields
        assert field_offsets(ours)[:len(offsets)] == offsets
        assert ours.size == size == 64
        return
    assert field_offsets(ours) == offsets
    if prefix:
        assert ours.size <= size
    else:
        assert ours.size == size, (name, ours.size, size)


def test_nested_and_later_fields(kernel_layouts):
    size, attr_at = kernel_layouts["fuse_entry_out.attr"]
    assert (size, attr_at) == (p.ENTRY_OUT_SIZE, p.ENTRY_HEAD.size)
    size, attr_at = kernel_layouts["fuse_attr_out.attr"]
    assert (size, attr_at) == (p.ATTR_OUT_SIZE, p.ATTR_HEAD.size)
    size, st_at = kernel_layouts["fuse_statfs_out.st"]
    assert (size, st_at) == (p.STATFS_OUT.size, 0)
    size, dirent_at = kernel_layouts["fuse_direntplus.dirent"]
    assert dirent_at == p.ENTRY_OUT_SIZE and size == p.ENTRY_OUT_SIZE + p.DIRENT.size
    # fuse_init_out after 7.38: u32 max_stack_depth (7.40), u16 request_timeout (7.43)
    # where 7.38 had unused[7]; fuse_open_out.backing_id (7.40) where it had padding
    _, unused_at = kernel_layouts["fuse_init_out.unused"]
    assert field_offsets(p.INIT_OUT)[11:] == [unused_at, unused_at + 4]
    assert field_offsets(p.OPEN_OUT)[2] == 12
    # fuse_backing_map (7.40): s32 fd, u32 flags, u64 padding
    assert field_offsets(p.BACKING_MAP) == [0, 4, 8] and p.BACKING_MAP.size == 16
    assert p.WRITE_DATA == p.IN_HEADER.size + p.WRITE_IN.size


def test_constants_match_kernel_header(kernel_layouts):
    """Every constant of ours that the 7.38 header defines as a macro has its value."""
    compared = 0
    for name, value in _our_constants().items():
        for cname in (f"FUSE_{name}", name):
            if cname in kernel_layouts:
                assert kernel_layouts[cname] == [value], (name, value, kernel_layouts[cname])
                compared += 1
    assert compared >= 45, compared
    assert kernel_layouts["FUSE_DEV_IOC_CLONE"] == [p.DEV_IOC_CLONE]
    assert kernel_layouts["FUSE_MIN_READ_BUFFER"] == [p.MIN_BUFFER]


def test_enums_match_kernel_header():
    """Opcodes and notification codes (C enums, so read from the header's text)."""
    helpers.require(HEADER.exists(), "needs linux/fuse.h")
    text = HEADER.read_text()
    enum = dict((m[0], int(m[1])) for m in re.findall(r"^\s*FUSE_(\w+)\s*=\s*(\d+)", text, re.M))
    ours = _our_constants()
    for name in p.OPCODE_NAMES.values():
        if name in enum:
            assert ours[name] == enum[name], name
    assert {n for n in enum if n in ours and 1 <= enum[n] <= 52} >= {"LOOKUP", "READDIRPLUS",
                                                                    "RENAME2", "LSEEK", "SYNCFS"}
    for name in ("NOTIFY_INVAL_INODE", "NOTIFY_INVAL_ENTRY", "NOTIFY_DELETE"):
        assert ours[name] == enum[name]
    # after 7.38 (kernel source): TMPFILE 51, STATX 52, COPY_FILE_RANGE_64 53;
    # DIRECT_IO_ALLOW_MMAP 1<<36, PASSTHROUGH 1<<37, NO_EXPORT_SUPPORT 1<<38
    assert (p.TMPFILE, p.STATX, p.COPY_FILE_RANGE_64) == (51, 52, 53)
    assert (p.DIRECT_IO_ALLOW_MMAP, p.PASSTHROUGH, p.NO_EXPORT_SUPPORT) == (1 << 36, 1 << 37, 1 << 38)
    assert p.FOPEN_PASSTHROUGH == 1 << 7
    assert p.OPCODE_NAMES[p.LOOKUP] == "LOOKUP" and p.OPCODE_NAMES[p.COPY_FILE_RANGE_64] == \
        "COPY_FILE_RANGE_64"
    assert p.NO_REPLY == {p.FORGET, p.BATCH_FORGET, p.INTERRUPT, p.NOTIFY_REPLY}


# -- headers ----------------------------------------------------------------------------------
def test_in_header_decode_with_extensions():
    raw = p.IN_HEADER.pack(200, p.MKDIR, 0x1122334455667788, 42, 1000, 1001, 4242, 3, 0)
    h = p.decode_header(raw + bytes(160))
    assert h == p.InHeader(200, p.MKDIR, 0x1122334455667788, 42, 1000, 1001, 4242, 24)


def test_out_header():
    raw = p.out_header(77, -errno.ENOENT, 12)
    assert len(raw) == 16
    assert struct.unpack("<IiQ", raw) == (28, -errno.ENOENT, 77)


# -- INIT -------------------------------------------------------------------------------------
def test_init_in_flags2_only_with_init_ext():
    body = struct.pack("<IIIII", 7, 44, 65536, p.ASYNC_READ | p.INIT_EXT, 0b101) + bytes(44)
    init = p.InitIn.decode(body)
    assert init == p.InitIn(7, 44, 65536, p.ASYNC_READ | p.INIT_EXT | (0b101 << 32))
    # flags2 is ignored without INIT_EXT; an old kernel's 16-byte INIT decodes
    body = struct.pack("<IIIII", 7, 44, 65536, p.ASYNC_READ, 0b101) + bytes(44)
    assert p.InitIn.decode(body).flags == p.ASYNC_READ
    assert p.InitIn.decode(struct.pack("<IIII", 7, 31, 4096, p.BIG_WRITES)) == \
        p.InitIn(7, 31, 4096, p.BIG_WRITES)
    # encode -> the kernel's 64-byte fuse_init_in
    enc = p.InitIn(7, 44, 4096, p.INIT_EXT | p.SECURITY_CTX).encode()
    assert len(enc) == 64
    assert struct.unpack_from("<IIIII", enc) == (7, 44, 4096, p.INIT_EXT, 1)
    assert p.InitIn.decode(enc) == p.InitIn(7, 44, 4096, p.INIT_EXT | p.SECURITY_CTX)


def test_init_out_encoding():
    out = p.InitOut(7, 40, 131072, p.ASYNC_READ | p.MAX_PAGES | p.CREATE_SUPP_GROUP, 64, 48,
                    1 << 20, 1, 256, 2)
    raw = out.encode()
    assert len(raw) == 64
    (major, minor, ra, flags, bg, cong, mw, tg, mp, align, flags2, depth,
     timeout) = struct.unpack_from("<IIIIHHIIHHIIH", raw)
    assert (major, minor, ra, bg, cong, mw, tg, mp, align, depth, timeout) == \
        (7, 40, 131072, 64, 48, 1 << 20, 1, 256, 0, 2, 0)
    # a flag above bit 31 travels in flags2, and INIT_EXT says so
    assert flags == p.ASYNC_READ | p.MAX_PAGES | p.INIT_EXT
    assert flags2 == p.CREATE_SUPP_GROUP >> 32
    assert raw[42:] == bytes(22)
    assert p.InitOut.decode(raw) == p.InitOut(7, 40, 131072, p.ASYNC_READ | p.MAX_PAGES
                                              | p.INIT_EXT | p.CREATE_SUPP_GROUP, 64, 48,
                                              1 << 20, 1, 256, 2)
    # without flags above 31 there is no INIT_EXT and flags2 is zero
    raw = p.InitOut(7, 31, 0, p.ASYNC_READ, 1, 1, 4096, 1, 0).encode()
    assert struct.unpack_from("<I", raw, 12)[0] == p.ASYNC_READ
    assert struct.unpack_from("<I", raw, 32)[0] == 0


# -- attributes, entries, opens, statfs ---------------------------------------------------------
def _attr(**kw) -> p.FileAttr:
    base = dict(ino=5, size=1 << 40, blocks=9, atime_ns=1_700_000_000_123_456_789,
                mtime_ns=1_500_000_000_000_000_001, ctime_ns=999_999_999, mode=stat.S_IFREG | 0o640,
                nlink=3, uid=1000, gid=100, rdev=os.makedev(8, 1), blksize=4096)
    base.update(kw)
    return p.FileAttr(**base)


def test_attr_packing_fields():
    a = _attr()
    raw = p.pack_attr(a)
    assert len(raw) == 88
    (ino, size, blocks, asec, msec, csec, ansec, mnsec, cnsec, mode, nlink, uid, gid, rdev,
     blksize, flags) = struct.unpack("<QQQQQQIIIIIIIIII", raw)
    assert (ino, size, blocks) == (5, 1 << 40, 9)
    assert (asec, ansec) == (1_700_000_000, 123_456_789)
    assert (msec, mnsec) == (1_500_000_000, 1)
    assert (csec, cnsec) == (0, 999_999_999)
    assert (mode, nlink, uid, gid, blksize, flags) == (stat.S_IFREG | 0o640, 3, 1000, 100, 4096, 0)
    assert rdev == (8 << 8) | 1  # the kernel's new_encode_dev
    assert p.unpack_attr(raw) == a


def test_attr_negative_times_and_big_devices():
    a = _attr(atime_ns=-1, mtime_ns=-1_500_000_000, rdev=os.makedev(259, 300))
    raw = p.pack_attr(a)
    _, _, _, asec, msec, _, ansec, mnsec = struct.unpack_from("<QQQQQQII", raw)
    # before the epoch: seconds as a two's-complement u64, nanoseconds in [0, 1e9)
    assert (asec, ansec) == (2**64 - 1, 999_999_999)
    assert (msec, mnsec) == (2**64 - 2, 500_000_000)
    rdev = struct.unpack_from("<I", raw, 76)[0]
    assert rdev == (300 & 0xFF) | (259 << 8) | ((300 & ~0xFF) << 12)


def test_attr_from_stat(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    st = os.lstat(f)
    a = p.FileAttr.from_stat(st)
    assert (a.ino, a.size, a.mode, a.mtime_ns, a.nlink) == (st.st_ino, 3, st.st_mode, st.st_mtime_ns, 1)
    assert p.FileAttr.from_stat(st, ino=99).ino == 99


def test_entry_and_negative_entry():
    a = _attr()
    raw = p.pack_entry(7, 3, a, 1.5, 0.25)
    assert len(raw) == 128
    assert struct.unpack_from("<QQQQII", raw) == (7, 3, 1, 0, 500_000_000, 250_000_000)
    assert p.unpack_attr(raw, 40) == a
    neg = p.pack_entry(0, 0, None, 86400.0, 0)
    assert len(neg) == 128
    assert struct.unpack_from("<QQQQII", neg) == (0, 0, 86400, 0, 0, 0)
    assert neg[40:] == bytes(88)


def test_entry_and_attr_out_pack_the_attr_as_pack_attr():
    """``fuse_entry_out``/``fuse_attr_out`` are packed in one struct with their head: the
    attribute part is byte for byte ``pack_attr``'s (pre-epoch times, 32-bit IDs), and a
    timeout seen before (kept split) packs as the first time."""
    a = _attr(atime_ns=-1, mtime_ns=-1_500_000_000, uid=2**32 - 1, rdev=os.makedev(259, 300))
    for _ in range(2):
        entry = p.pack_entry(9, 1, a, 0.1, 0.0)
        assert struct.unpack_from("<QQQQII", entry) == (9, 1, 0, 0, 100_000_000, 0)
        assert entry[40:] == p.pack_attr(a)
        out = p.pack_attr_out(a, 1e-9)
        assert out[:16] == p.ATTR_HEAD.pack(0, 1, 0) and out[16:] == p.pack_attr(a)
    assert p.unpack_attr(entry, 40).uid == 2**32 - 1


def test_attr_out_from_a_stat_packs_as_pack_attr_out(tmp_path):
    """``pack_stat_attr_out`` (a cached directory's GETATTR) gives ``pack_attr_out``'s bytes
    for the same stat, number and link count: pre-epoch times (its seconds packed signed,
    not masked), a stat's -1 owner (Python's for ``(uid_t)-1``), a big device, 1e-9 s."""
    d = tmp_path / "d"
    d.mkdir()
    os.utime(d, ns=(-1, -1_500_000_000))
    st = os.lstat(d)
    fields = list(st)
    fields[4] = -1  # st_uid as Python shows uid 4294967295
    fake = os.stat_result(fields, {"st_atime_ns": st.st_atime_ns, "st_mtime_ns": st.st_mtime_ns,
                                   "st_ctime_ns": st.st_ctime_ns, "st_blocks": 7,
                                   "st_blksize": 4096, "st_rdev": os.makedev(259, 300)})
    for s, nlink in ((st, None), (st, 1), (fake, None)):
        a = p.FileAttr.from_stat(s, 12345)
        if nlink is not None:
            a = a._replace(nlink=nlink)
        for timeout in (1e-9, 86400.0, 0.0):
            assert p.pack_stat_attr_out(p.split_timeout(timeout), s, 12345, nlink) == \
                p.pack_attr_out(a, timeout)


def test_attr_out_open_statfs():
    a = _attr()
    raw = p.pack_attr_out(a, 2.75)
    assert len(raw) == 104 and struct.unpack_from("<QII", raw) == (2, 750_000_000, 0)
    assert p.unpack_attr(raw, 16) == a
    assert p.pack_open(0xDEADBEEF01, p.FOPEN_KEEP_CACHE | p.FOPEN_DIRECT_IO, 5) == \
        struct.pack("<QIi", 0xDEADBEEF01, 3, 5)
    sv = {"f_blocks": 10, "f_bfree": 9, "f_bavail": 8, "f_files": 7, "f_ffree": 6, "f_bsize": 4096,
          "f_namemax": 255, "f_frsize": 512}
    raw = p.pack_statfs(sv)
    assert len(raw) == 80
    assert struct.unpack_from("<QQQQQIIII", raw) == (10, 9, 8, 7, 6, 4096, 255, 512, 0)
    assert raw[56:] == bytes(24)
    real = os.statvfs("/")
    assert struct.unpack_from("<QQ", p.pack_statfs(real)) == (real.f_blocks, real.f_bfree)


# -- directory entries ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [b"a", b"abcdefg", b"abcdefgh", b"abcdefghi", b"x" * 255])
def test_dirent_padding(name):
    raw = p.pack_dirent(name, 12, 3, stat.S_IFDIR | 0o755)
    assert len(raw) % 8 == 0 and len(raw) == p.dirent_size(name, False)
    assert len(raw) - (24 + len(name)) < 8
    assert struct.unpack_from("<QQII", raw) == (12, 3, len(name), 4)  # DT_DIR
    assert raw[24:24 + len(name)] == name and raw[24 + len(name):] == bytes(len(raw) - 24 - len(name))
    plus = p.pack_direntplus(bytes(128), name, 12, 3, stat.S_IFLNK)
    assert len(plus) == p.dirent_size(name, True) == 128 + len(raw)
    assert struct.unpack_from("<QQII", plus, 128) == (12, 3, len(name), 10)  # DT_LNK


@pytest.mark.parametrize("name", [b"a", b"abcdefg", b"abcdefgh", b"abcdefghi", b"x" * 255])
def test_direntplus_entry_in_one_pack_is_entry_then_dirent(name):
    a = p.FileAttr(77, 5, 8, -1_500_000_000, 2_000_000_001, 3, stat.S_IFREG | 0o644, 1, 1000,
                   1000, 0, 4096)
    one = p.pack_direntplus_entry(9, 2, a, 1.5, 0.25, name, 77, 3, a.mode)
    assert one == p.pack_direntplus(p.pack_entry(9, 2, a, 1.5, 0.25), name, 77, 3, a.mode)
    assert len(one) == p.dirent_size(name, True)
    # nodeid 0: no entry at all (the kernel looks the name up), the dirent still there
    none = p.pack_direntplus_entry(0, 0, None, 0.0, 0.0, name, 77, 3, stat.S_IFDIR)
    assert none == p.pack_direntplus(bytes(128), name, 77, 3, stat.S_IFDIR)


@pytest.mark.parametrize("mode,dtype", [(stat.S_IFREG, 8), (stat.S_IFDIR, 4), (stat.S_IFLNK, 10),
                                        (stat.S_IFCHR, 2), (stat.S_IFBLK, 6), (stat.S_IFIFO, 1),
                                        (stat.S_IFSOCK, 12)])
def test_dirent_types(mode, dtype):
    assert struct.unpack_from("<QQII", p.pack_dirent(b"n", 1, 1, mode | 0o644))[3] == dtype


# -- request arguments ------------------------------------------------------------------------------
def test_cstrings():
    assert p.cstrings(b"old\0new\0", 2) == [b"old", b"new"]
    assert p.cstrings(memoryview(b"name\0"), 1) == [b"name"]
    assert p.cstrings(b"a\0b\0c\0", 1) == [b"a"]
    assert p.cstrings(b"\0", 1) == [b""]
    for bad, n in ((b"name", 1), (b"old\0new", 2), (b"", 1), (b"one\0", 2)):
        with pytest.raises(ValueError):
            p.cstrings(bad, n)


def test_setattr_decode():
    body = p.SETATTR_IN.pack(p.FATTR_MODE | p.FATTR_SIZE | p.FATTR_FH | p.FATTR_ATIME | p.FATTR_MTIME,
                             0, 17, 4096, 0, 10, 20, 30, 5, 6, 7, 0o100600, 0, 1000, 1001, 0)
    sa = p.SetAttr.decode(body)
    assert sa == p.SetAttr(p.FATTR_MODE | p.FATTR_SIZE | p.FATTR_FH | p.FATTR_ATIME | p.FATTR_MTIME,
                           17, 4096, 10 * 10**9 + 5, 20 * 10**9 + 6, 0o100600, 1000, 1001)
    assert p.SetAttr.decode(sa.encode()) == sa
    # without FATTR_FH there is no handle, whatever the field says
    body = p.SETATTR_IN.pack(p.FATTR_SIZE, 0, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert p.SetAttr.decode(body).fh is None


def test_setattr_now():
    valid = p.FATTR_ATIME | p.FATTR_ATIME_NOW | p.FATTR_MTIME
    body = p.SETATTR_IN.pack(valid, 0, 0, 0, 0, 99, 20, 0, 99, 6, 0, 0, 0, 0, 0, 0)
    sa = p.SetAttr.decode(body)
    assert sa.atime_ns is None and sa.mtime_ns == 20 * 10**9 + 6
    valid = p.FATTR_ATIME | p.FATTR_MTIME | p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW
    sa = p.SetAttr.decode(p.SETATTR_IN.pack(valid, *([0] * 15)))
    assert sa.atime_ns is None and sa.mtime_ns is None
    assert p.SetAttr.decode(sa.encode()) == sa


# -- notifications ------------------------------------------------------------------------------------
def test_notify_inval_inode():
    msg = p.notify_inval_inode(9, 4096, -1)
    assert struct.unpack("<IiQQqq", msg) == (40, p.NOTIFY_INVAL_INODE, 0, 9, 4096, -1)


def test_notify_inval_entry_and_delete():
    msg = p.notify_inval_entry(1, b"name")
    assert len(msg) == 16 + 16 + 5
    assert struct.unpack_from("<IiQQII", msg) == (len(msg), p.NOTIFY_INVAL_ENTRY, 0, 1, 4, 0)
    assert msg[32:] == b"name\0"
    msg = p.notify_delete(1, 7, b"gone")
    assert len(msg) == 16 + 24 + 5
    assert struct.unpack_from("<IiQQQII", msg) == (len(msg), p.NOTIFY_DELETE, 0, 1, 7, 4, 0)
    assert msg[40:] == b"gone\0"
