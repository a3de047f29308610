"""FIEMAP: the physical extents of a file.

Owns: the ``FS_IOC_FIEMAP`` ioctl and the ``Extent`` record. Only plain extents
(flags within ``SHARED | LAST | MERGED``) are ever used for sharing; anything else
(DELALLOC, UNWRITTEN, UNKNOWN, ENCODED, DATA_INLINE, NOT_ALIGNED, ...) is treated as
the file's own data.
"""
from __future__ import annotations

import fcntl
import struct

from .records import record

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1

FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_MERGED = 0x1000
FIEMAP_EXTENT_SHARED = 0x2000
PLAIN_FLAGS = FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_MERGED

_HEADER = struct.Struct("=QQIIII")  # fm_start fm_length fm_flags fm_mapped fm_count fm_reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical physical length reserved64[2] flags reserved[3]
_BATCH = 256


@record(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length

    @property
    def plain(self) -> bool:
        return not self.flags & ~PLAIN_FLAGS

    @property
    def shared(self) -> bool:
        """A plain extent that another file also references."""
        return self.plain and bool(self.flags & FIEMAP_EXTENT_SHARED)


def fiemap(fd: int, *, sync: bool, start: int = 0, end: int = (1 << 64) - 1) -> list[Extent]:
    """The extents of ``fd`` that meet the byte range [start, end) (all by default), logical
    order. ``sync`` flushes dirty data first, so a file with unwritten-back writes is not
    reported at its old (shared) location."""
    out: list[Extent] = []
    flags = FIEMAP_FLAG_SYNC if sync else 0
    while True:
        buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, start, end - start, flags, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _HEADER.unpack_from(buf, 0)[3]
        last = False
        for i in range(mapped):
            logical, physical, length, _, _, eflags, _, _, _ = _EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)
            out.append(Extent(logical, physical, length, eflags))
            last = bool(eflags & FIEMAP_EXTENT_LAST)
        if mapped < _BATCH or last or not mapped:
            return out
        start = out[-1].end
        if start >= end:
            return out
