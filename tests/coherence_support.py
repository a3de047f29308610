"""Helpers for the coherence tests (tests/test_coherence.py, issue 5).

What this module owns:
- ``Stack``: one lower/upper/work triple on a chosen backing directory (the tmp_path
  filesystem or the session XFS), and the ``-o`` string that mounts it.
- Cache control from the outside: ``dontneed()`` (``posix_fadvise(POSIX_FADV_DONTNEED)``
  on one fd) and ``drop_caches()`` (``echo 3 > /proc/sys/vm/drop_caches``).
- ``stats()``: the daemon's counters, read from the ``user.overlaypc.stats`` xattr;
  ``released()`` waits until the daemon has seen every RELEASE (the kernel sends RELEASE
  in the background: ``close(2)`` returns before the daemon forgets the handle).
- Block patterns for the large-file and threaded checks: every block of every version is
  distinct, so a torn, zeroed or misplaced block is always recognised.

Caveat: why the cache control matters. In ``cache=kernel`` mode FUSE keeps one page
cache per FUSE inode, and a write through any handle updates the pages that are
already cached (write-through). A handle still bound to the lower file therefore only
shows its staleness once a page is (re)read through *that handle*: after
``dontneed(fr)``, or for a page that was never cached (an untouched mmap). The tests
that prove the bind-at-open bug use exactly those paths.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping, Union

import helpers

OLD = b"old-lower-data:" * 400          # 6000 bytes: spans two pages
NEW_HEAD = b"NEW!"
NEW = NEW_HEAD + OLD[len(NEW_HEAD):]    # what OLD becomes after pwrite(NEW_HEAD, 0)
APPENDED = b"+appended-by-fw"


@dataclasses.dataclass
class Stack:
    lower: Path
    upper: Path
    work: Path

    def options(self, cache: str, handles: str = "reopen", extra: str = "") -> str:
        opts = [f"lowerdir={self.lower}", f"upperdir={self.upper}", f"workdir={self.work}",
                f"cache={cache}", f"handles={handles}"]
        if extra:
            opts.append(extra)
        return ",".join(opts)


def make_stack(layers_factory, base: Path, lower_spec: Mapping[str, helpers.Spec],
               name: str = "s") -> Stack:
    """A lower layer built from `lower_spec`, and empty upper/work dirs, all under `base`."""
    layers = layers_factory({f"{name}-lower": lower_spec}, where={f"{name}-lower": base})
    upper = layers_factory.empty_dir(f"{name}-upper", base)
    work = layers_factory.empty_dir(f"{name}-work", base)
    return Stack(layers.paths[0], upper, work)


# --------------------------------------------------------------------------------------
# Cache control and counters
# --------------------------------------------------------------------------------------

def dontneed(fd: int) -> None:
    """Drop the (unmapped) page-cache pages of `fd`'s file, so the next read through
    this fd goes to the daemon through this fd's FUSE handle."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (clean pages, dentries and inodes)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def stats(mnt: Union[str, os.PathLike]) -> dict:
    return json.loads(os.getxattr(os.fspath(mnt), "user.overlaypc.stats"))


def released(mnt: Union[str, os.PathLike], timeout: float = 10.0) -> dict:
    """Wait until the daemon holds no open handle; return its stats then.

    ``close(2)`` of a FUSE file waits for FLUSH but not for RELEASE, which the kernel
    queues as a background request: a test that asserts on what the daemon does once a
    file is closed (passthrough refused while an older open is live) waits here first."""
    assert helpers.wait_until(lambda: stats(mnt)["open_handles"] == 0, timeout), stats(mnt)
    return stats(mnt)


def pread_all(fd: int, size: int = 1 << 20, offset: int = 0) -> bytes:
    """pread until EOF or `size` bytes (a FUSE read may return less than asked)."""
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def upper_names(stack: Stack) -> set[str]:
    return {str(p.relative_to(stack.upper)) for p in stack.upper.rglob("*")}


def fuse_hidden_names(*roots: Union[str, os.PathLike]) -> list[str]:
    """Every ``.fuse_hidden*`` name under the given trees (there must be none)."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            found += [os.path.join(dirpath, n) for n in dirnames + filenames
                      if n.startswith(".fuse_hidden")]
    return found


# --------------------------------------------------------------------------------------
# Block patterns
# --------------------------------------------------------------------------------------

def block(tag: bytes, index: int, size: int) -> bytes:
    """A block whose every 16-byte record names its version `tag` and its block `index`:
    ``tag`` (4 bytes) + index (12 decimal digits). Distinct for every (tag, index)."""
    assert len(tag) == 4 and size % 16 == 0
    return (tag + b"%012d" % index) * (size // 16)


def write_blocks(path: Union[str, os.PathLike], tag: bytes, count: int, size: int) -> None:
    with open(path, "wb") as f:
        for i in range(count):
            f.write(block(tag, i, size))


# --------------------------------------------------------------------------------------
# File descriptors that are always closed (an fd left open on the mount makes umount fail)
# --------------------------------------------------------------------------------------

class Fds:
    """``with Fds() as fds: fr = fds.open(path, os.O_RDONLY)``; all closed on exit."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def open(self, path: Union[str, os.PathLike], flags: int, mode: int = 0o644) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
        self._fds.append(fd)
        return fd

    def close(self, fd: int) -> None:
        self._fds.remove(fd)
        os.close(fd)

    def close_all(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> "Fds":
        return self

    def __exit__(self, *exc) -> None:
        self.close_all()
