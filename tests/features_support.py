"""Helpers for the redirect_dir / index / metacopy tests (issue 9), on top of ``helpers``.

What this module owns:
- ``Stack``: lowers + upper + workdir on one backing dir (the session XFS: these features
  need file handles and a filesystem UUID, which tmpfs lacks), the ``-o`` string for
  overlaypc and the option list for the kernel oracle.
- ``KERNEL_REDIRECT`` / ``KERNEL_INDEX`` / ``KERNEL_METACOPY``: extra options for the kernel
  oracle, added after helpers.KERNEL_PINNED_OPTIONS (the kernel parses mount options in
  order, so a later ``redirect_dir=on`` wins over the pinned ``redirect_dir=off``).
- Backing-dir inspection: ``ovl_xattr()`` (a ``trusted.overlay.*`` value, None if
  absent), ``is_whiteout()``, ``regular_files()``, ``upper_redirects()``.
- ``snapshot()``: ``helpers.tree_snapshot`` minus overlaypc's own ``trusted.overlaypc.*``
  xattrs, which a kernel mount of an upper written by overlaypc lists (the kernel hides
  only ``trusted.overlay.*``). That is the one known, documented difference left out.
- Data patterns for large files (``pattern_file``), hashing (``sha256_of``).

Caveat: everything assumes root (the tests gate through the fixtures).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Optional, Sequence, Union

import helpers
from upper_support import is_whiteout  # noqa: F401  (re-exported for the feature tests)

PathLike = Union[str, os.PathLike]
OVL = "trusted.overlay."
STATS_XATTR = "user.overlaypc.stats"

KERNEL_REDIRECT = ("redirect_dir=on",)
KERNEL_INDEX = ("index=on",)
KERNEL_METACOPY = ("redirect_dir=on", "metacopy=on")


@dataclasses.dataclass
class Stack:
    lowers: list[Path]
    upper: Path
    work: Path

    def options(self, extra: str = "") -> str:
        opts = (f"lowerdir={':'.join(map(str, self.lowers))},upperdir={self.upper},"
                f"workdir={self.work}")
        return f"{opts},{extra}" if extra else opts


def make_lowers(layers_factory, base: Path, spec: dict) -> list[Path]:
    """Build ``spec`` ({layer name: layer spec}, top first) under ``base``."""
    return layers_factory(spec, where={name: base for name in spec}).paths


def new_stack(lowers: Sequence[Path], base: Path, tag: str) -> Stack:
    """Fresh, empty upper and workdir (unique names under ``base``) over ``lowers``."""
    tag = f"{tag}-{os.urandom(3).hex()}"
    upper, work = Path(base) / f"upper-{tag}", Path(base) / f"work-{tag}"
    upper.mkdir()
    work.mkdir()
    return Stack(list(lowers), upper, work)


# --------------------------------------------------------------------------------------
# Backing dirs
# --------------------------------------------------------------------------------------

def mount_side(side: str, s: Stack, overlay_mount, kernel_mount,
               opts: Sequence[str] = KERNEL_REDIRECT, **kw):
    """(the mount point, its unmount) of stack ``s`` mounted by ``side``, ``"kernel"`` or
    overlaypc's, both with the mount options ``opts`` (``kw``: the ``overlay_mount``
    fixture's), for tests that compare the two."""
    if side == "kernel":
        mnt = kernel_mount(s.lowers, s.upper, s.work, tuple(opts))
        return mnt, lambda: helpers.force_unmount(mnt)
    m = overlay_mount(s.options(",".join(opts)), **kw)
    return m.path, m.unmount


def ovl_xattr(path: PathLike, name: str) -> Optional[bytes]:
    """``trusted.overlay.<name>`` of a backing path (never followed), None if absent."""
    try:
        return os.getxattr(path, OVL + name, follow_symlinks=False)
    except OSError:
        return None


def regular_files(root: PathLike) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                out.append(os.path.relpath(p, root))
    return sorted(out)


def upper_redirects(root: PathLike) -> dict[str, bytes]:
    """Relative path -> trusted.overlay.redirect for every object under an upper dir."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            v = ovl_xattr(p, "redirect")
            if v is not None:
                out[os.path.relpath(p, root)] = v
    return out


# --------------------------------------------------------------------------------------
# Merged views
# --------------------------------------------------------------------------------------

def _strip_own(entry: helpers.Entry) -> helpers.Entry:
    xattrs = tuple((n, v) for n, v in entry.xattrs if ".overlaypc." not in n)
    return dataclasses.replace(entry, xattrs=xattrs)


def snapshot(root: PathLike, *, kernel: bool = False, **kwargs) -> dict[str, helpers.Entry]:
    snap = helpers.tree_snapshot(root, ignore_vanished=kernel, **kwargs)
    return {k: _strip_own(e) for k, e in snap.items()}


def assert_same(expected: dict, got: dict, names=("expected", "got")) -> None:
    if expected != got:
        raise AssertionError("trees differ:\n" + helpers.diff_snapshots(expected, got, names))


def overlay_stats(mnt: PathLike) -> dict:
    return json.loads(os.getxattr(str(mnt), STATS_XATTR))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def pattern_file(path: PathLike, size: int, tag: bytes = b"L") -> str:
    """Write ``size`` bytes in which every 4 KiB block is distinct; return its sha256."""
    h = hashlib.sha256()
    block = 4096
    with open(path, "wb") as f:
        chunk = bytearray()
        for i in range(size // block):
            b = (tag + b"%010d" % i) * (block // 11 + 1)
            chunk += b[:block]
            if len(chunk) >= (1 << 20):
                f.write(chunk)
                h.update(chunk)
                chunk = bytearray()
        if chunk:
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def link_through_fd(fd: int, directory: PathLike, name: str) -> Optional[str]:
    """Link the open file ``fd`` as ``directory/name`` through ``/proc/self/fd`` (a linkat
    of an fd, as for a file whose name is gone): None, or the errno's name."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        os.close(dfd)
    return None
