"""An ``O_APPEND`` open of an upper file another open passes through is answered
passthrough with DIRECT_IO (soak11, ``PassthroughOpens._answer``). What else that open
does, against the kernel overlay: ``mmap`` of it (``MAP_SHARED`` stores seen by the other
open's reads and by its own), its writes seen by a mapping of the other open and by the
other open's reads, and ``O_APPEND | O_DIRECT`` aligned writes; then the size ``fstat``
gives and the upper's bytes."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from test_open_flags import OPTIONS, _both

PAGE = mmap.PAGESIZE


def _scenario(direct: bool):
    def run(mnt: Path) -> list:
        p = mnt / "a"
        os.close(os.open(p, os.O_RDWR))  # copied up: the next opens may pass through
        other = os.open(p, os.O_RDWR)
        flags = os.O_RDWR | os.O_APPEND | (os.O_DIRECT if direct else 0)
        fd = os.open(p, flags)
        out = []
        try:
            buf = mmap.mmap(-1, PAGE)   # page-aligned, for O_DIRECT
            if direct:
                os.ftruncate(other, PAGE)
            buf[:] = b"A" * PAGE
            out.append(os.write(fd, buf))
            out.append(os.fstat(fd).st_size)
            out.append(os.pread(other, 8, 0 if not direct else PAGE))
            m_other = mmap.mmap(other, os.fstat(other).st_size)
            buf[:] = b"B" * PAGE
            out.append(os.write(fd, buf))        # seen by the other open's mapping?
            m_other2 = mmap.mmap(other, os.fstat(other).st_size)
            out.append(bytes(m_other2[-4:]))
            m_other.close()
            m_other2.close()
            m = mmap.mmap(fd, os.fstat(fd).st_size)  # MAP_SHARED of the DIRECT_IO open
            m[0:2] = b"MM"
            out.append(os.pread(other, 4, 0))
            out.append(os.pread(fd, 4, 0) if not direct else None)
            m.close()
            out.append(os.fstat(other).st_size)
        finally:
            os.close(fd)
            os.close(other)
        out.append(p.read_bytes()[:8])
        return out
    return run


@pytest.mark.parametrize("direct", [False, True], ids=["append", "append_odirect"])
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "shared", "no_passthrough"])
def test_append_open_of_a_passing_through_file(options, direct, tmp_path, overlay_mount,
                                                 kernel_mount):
    results, uppers = _both(tmp_path, overlay_mount, kernel_mount, options, _scenario(direct))
    assert results[1] == results[0], f"kernel {results[0]}\n ours {results[1]}"
    assert uppers[1] == uppers[0]
