"""Layers with hard links, special files, OCI markers and deep paths for the kernel
differentials, and what those compare beyond ``helpers.tree_snapshot``: which names share
an inode.

What this module owns:
- ``kernel_form()``: a layer spec with every OCI whiteout (``.wh.NAME``) and OCI opaque
  marker (``.wh..wh..opq``) turned into the kernel's format (0/0 character device,
  ``trusted.overlay.opaque=y``). The kernel's overlay does not read the OCI form, so the
  kernel oracle gets its own copy of the layers in kernel form and overlaypc the OCI one;
  the two copies have different inode numbers, so only inode *classes* are compared.
- ``SAFE_DEVICES``: device nodes that random operations may open, read and write without
  touching hardware: ``/dev/null``'s numbers, and a character and a block device of major
  60 ("local/experimental use", not registered here), whose open fails ENXIO. Never
  ``/dev/zero``: a read to EOF would not end.
- ``deep_dir()``: a chain of long directory names whose path below a root ends just under
  PATH_MAX, so that every absolute path the tests use stays valid.
- ``Identity`` / ``identity()``: the partition of the names under a root into ``st_ino``
  classes (only classes of two or more names are listed) and each non-directory's
  ``st_nlink``.
- ``age_tree()``: every object's atime and mtime set to one value, so that two copies of a
  layer built at different moments show the same times.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import helpers
from helpers import WHITEOUT, Device, Dir, OciWhiteout, Spec

PATH_MAX = 4096
#: bytes left after the deep chain (for ``.wh.NAME`` markers and names created below it)
DEEP_TAIL = 40

DEV_NULL = Device("chr", 1, 3, 0o666)
NO_CHR = Device("chr", 60, 1, 0o640)
NO_BLK = Device("blk", 60, 2, 0o640)
SAFE_DEVICES = (DEV_NULL, NO_CHR, NO_BLK)


def kernel_form(spec: Union[Mapping[str, Spec], Spec]):
    """``spec`` (a layer spec or one item) with its OCI markers in the kernel's format."""
    if isinstance(spec, OciWhiteout):
        return WHITEOUT
    if isinstance(spec, Mapping):
        return {name: kernel_form(item) for name, item in spec.items()}
    if isinstance(spec, Dir):
        return dataclasses.replace(spec, children=kernel_form(spec.children),
                                   opaque="trusted" if spec.opaque == "oci" else spec.opaque)
    return spec


def deep_dir(roots, stem: str = "deep", tail: int = DEEP_TAIL) -> str:
    """A relative path of directory names (250 bytes each, the last one shorter) such that
    ``ROOT/path`` plus ``tail`` bytes stays under PATH_MAX for the longest of ``roots``."""
    room = PATH_MAX - 1 - max(len(os.fsencode(str(r))) for r in roots) - 1 - tail
    parts: list[str] = []
    used = 0
    while True:
        name = f"{stem}{len(parts):02d}".ljust(250, "d")
        if used + len(name) + 1 > room:
            break
        parts.append(name)
        used += len(name) + 1
    rest = room - used - 1
    if rest >= len(stem) + 2:
        parts.append(f"{stem}{len(parts):02d}".ljust(rest, "e"))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Which names are one inode, and the link count each name shows."""
    classes: frozenset  # of frozensets of relative paths (two or more names each)
    nlinks: tuple       # sorted (relative path, st_nlink) of non-directories

    def differences(self, other: "Identity", names=("a", "b")) -> str:
        lines = []
        if self.classes != other.classes:
            for label, mine, theirs in ((names[0], self.classes, other.classes),
                                        (names[1], other.classes, self.classes)):
                only = sorted(sorted(c) for c in mine - theirs)
                if only:
                    lines.append(f"st_ino classes only in {label}: {only}")
        a, b = dict(self.nlinks), dict(other.nlinks)
        for rel in sorted(set(a) | set(b)):
            if a.get(rel) != b.get(rel):
                lines.append(f"st_nlink of {rel}: {names[0]} {a.get(rel)}, {names[1]} {b.get(rel)}")
        return "\n".join(lines)


def identity(root: Union[str, os.PathLike], under: Optional[Iterable[str]] = None) -> Identity:
    """The st_ino classes and link counts under ``root`` (not following symlinks), or only
    in its entries named in ``under``. A name listed but not found (the kernel lists
    whiteouts in directories it does not merge, see ``helpers.tree_snapshot``) is left out."""
    by_ino: dict[int, set[str]] = {}
    nlinks: dict[str, int] = {}
    only = None if under is None else set(under)

    def visit(path: str, rel: str) -> None:
        for name in sorted(os.listdir(path)):
            if only is not None and not rel and name not in only:
                continue
            child, child_rel = os.path.join(path, name), f"{rel}/{name}" if rel else name
            try:
                st = os.lstat(child)
            except FileNotFoundError:
                continue
            by_ino.setdefault(st.st_ino, set()).add(child_rel)
            if stat.S_ISDIR(st.st_mode):
                visit(child, child_rel)
            else:
                nlinks[child_rel] = st.st_nlink

    visit(os.fspath(root), "")
    return Identity(frozenset(frozenset(c) for c in by_ino.values() if len(c) > 1),
                    tuple(sorted(nlinks.items())))


def age_tree(root: Union[str, os.PathLike], t_ns: int) -> None:
    """atime and mtime of everything under ``root`` (and of root) set to ``t_ns``."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(t_ns, t_ns), follow_symlinks=False)
    os.utime(root, ns=(t_ns, t_ns))


def build_pair(base: Path, name: str, spec: Mapping[str, Spec], t_ns: int) -> tuple[Path, Path]:
    """``spec`` built twice under ``base``: as given (for overlaypc) and in kernel form (for
    the kernel); both aged to ``t_ns``. Returns (overlaypc's copy, the kernel's copy)."""
    ours = helpers.build_layer(base / f"o-{name}", spec)
    theirs = helpers.build_layer(base / f"k-{name}", kernel_form(spec))
    for root in (ours, theirs):
        age_tree(root, t_ns)
    return ours, theirs
