"""The layers and the in-memory model behind ``test_core_model`` (issue 12).

Owns: ``build_layers`` (the on-disk layer stack every example starts from), ``INITIAL``
(its merged view, written out by hand rather than computed, so a shared mistake in
merging cannot hide), the ``Model`` of the merged tree with the rules of each operation,
and the checks of the layer directories themselves.

Model rules (the kernel's; where they are not plain POSIX, checked on ``mount -t
overlay`` when written):
- a lower non-directory with st_nlink > 1, with ``index=off``: every *name* is its own
  inode; the names show one st_ino (the lower one) and the lower st_nlink until a name
  is copied up (open for write or O_TRUNC, truncate, chmod, chown, link, rename); the
  copied name then has its own data, st_nlink 1 and its own (upper) st_ino, also
  through a file opened before. With ``index=on`` all names are one inode (fifos and
  devices too).
- a hard link made through the mount: the names are one inode.
- an upper file marked ``trusted.overlay.metacopy`` is EPERM while ``metacopy=off``
  (its lookup fails, a listing shows it); with ``metacopy=on`` it shows the upper's
  attributes and the lower's data.
- ``mknod`` of a 0/0 character device (a whiteout) is EPERM; ``.wh.*`` names are never
  shown and cannot be created (EINVAL).
- new names in a setgid directory take its group (directories also the setgid bit).
- remounts keep everything; switching ``index`` on makes the names of a lower hard link
  not copied up yet one inode.
Not modelled: times, directory sizes and link counts, symlink modes, link counts of
index=on hard links after the switch (left to the kernel differential).
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import helpers

BIG = random.Random(12).randbytes(64 << 10)
DEV = os.makedev(1, 3)

# ------------------------------------------------------------------------------------------
# The layers, and the merged view the model starts from
# ------------------------------------------------------------------------------------------
MC_DATA = b"metacopy: the data stays in the lower layer\n"


@dataclass(frozen=True)
class Layout:
    lowers: list[Path]  # top first
    upper: Path
    work: Path


def build_layers(lower_base: Path, upper_base: Path, *, reflink: bool, metacopy_file: bool) -> Layout:
    """Three lowers, an upper (holding one metacopy file if asked), an empty workdir."""
    l0, l1, l2 = (lower_base / n for n in ("l0", "l1", "l2"))
    upper, work = upper_base / "upper", upper_base / "work"
    helpers.build_layer(l2, {
        "a": "lower a, three names\n",
        "d1": {"f": "l2 d1/f, hidden by l0\n", "gone": "whited out in l1\n",
               "oci_gone": "OCI-whited out in l1\n"},
        "opq": {"hidden": "below an opaque dir\n"},
        "opq2": {"hidden2": "below an OCI-opaque dir\n"},
        "deep/1/2/3/4/5/6/file": "deep\n",
        "sym": helpers.Symlink("a"),
        "link2": helpers.Symlink("d1/f"),
        "mc": MC_DATA,
        "own": helpers.File("owned by 1000\n", mode=0o640),
        "big": BIG,
    })
    os.link(l2 / "a", l2 / "hl")
    os.link(l2 / "a", l2 / "d1/h")
    os.mkfifo(l2 / "fifo1")
    os.chmod(l2 / "fifo1", 0o644)
    os.link(l2 / "fifo1", l2 / "fifo2")
    os.mknod(l2 / "dev1", stat.S_IFCHR | 0o600, DEV)
    os.chmod(l2 / "dev1", 0o600)
    os.link(l2 / "dev1", l2 / "dev2")
    os.chown(l2 / "own", 1000, 1000)
    helpers.build_layer(l1, {
        "d1": {"gone": helpers.WHITEOUT, "oci_gone": helpers.OCI_WHITEOUT, "g": "l1 d1/g\n"},
        "opq": helpers.Dir({"shown": "above the opaque\n"}, opaque="trusted"),
        "opq2": helpers.Dir({"shown2": "above the OCI opaque\n"}, opaque="oci"),
        "deep/1/2/x": "x\n",
        "b": "l1 b, two names\n",
    })
    os.link(l1 / "b", l1 / "b2")
    helpers.build_layer(l0, {"top": "top\n", "sym": helpers.OCI_WHITEOUT,
                             "d1": {"f": "l0 d1/f\n"}})
    for src, dst in ((l2 / "big", l1 / "big2"), (l2 / "big", l2 / "d1/big3")):
        subprocess.run(["cp", "--reflink=always" if reflink else "--reflink=auto", str(src), str(dst)],
                       check=True, capture_output=True)
    upper.mkdir()
    work.mkdir()
    if metacopy_file:
        with open(upper / "mc", "wb") as f:
            f.truncate(len(MC_DATA))  # sparse, as a metacopy file is
        os.chmod(upper / "mc", 0o600)
        os.setxattr(upper / "mc", "trusted.overlay.metacopy", b"")
    return Layout([l0, l1, l2], upper, work)


#: The merged view of ``build_layers``, written out by hand (not computed from the layers):
#: path -> (kind, mode, data or target or rdev, uid/gid, lower hard-link group)
INITIAL: dict[str, tuple] = {
    "": ("dir", 0o755, None, 0, None),
    "a": ("reg", 0o644, b"lower a, three names\n", 0, "a"),
    "hl": ("reg", 0o644, b"lower a, three names\n", 0, "a"),
    "d1": ("dir", 0o755, None, 0, None),
    "d1/h": ("reg", 0o644, b"lower a, three names\n", 0, "a"),
    "d1/f": ("reg", 0o644, b"l0 d1/f\n", 0, None),
    "d1/g": ("reg", 0o644, b"l1 d1/g\n", 0, None),
    "d1/big3": ("reg", 0o644, BIG, 0, None),
    "b": ("reg", 0o644, b"l1 b, two names\n", 0, "b"),
    "b2": ("reg", 0o644, b"l1 b, two names\n", 0, "b"),
    "fifo1": ("fifo", 0o644, None, 0, "fifo"),
    "fifo2": ("fifo", 0o644, None, 0, "fifo"),
    "dev1": ("chr", 0o600, DEV, 0, "dev"),
    "dev2": ("chr", 0o600, DEV, 0, "dev"),
    "opq": ("dir", 0o755, None, 0, None),
    "opq/shown": ("reg", 0o644, b"above the opaque\n", 0, None),
    "opq2": ("dir", 0o755, None, 0, None),
    "opq2/shown2": ("reg", 0o644, b"above the OCI opaque\n", 0, None),
    "deep": ("dir", 0o755, None, 0, None),
    "deep/1": ("dir", 0o755, None, 0, None),
    "deep/1/2": ("dir", 0o755, None, 0, None),
    "deep/1/2/x": ("reg", 0o644, b"x\n", 0, None),
    "deep/1/2/3": ("dir", 0o755, None, 0, None),
    "deep/1/2/3/4": ("dir", 0o755, None, 0, None),
    "deep/1/2/3/4/5": ("dir", 0o755, None, 0, None),
    "deep/1/2/3/4/5/6": ("dir", 0o755, None, 0, None),
    "deep/1/2/3/4/5/6/file": ("reg", 0o644, b"deep\n", 0, None),
    "link2": ("lnk", 0o777, "d1/f", 0, None),
    "mc": ("reg", 0o600, MC_DATA, 0, None),  # the metacopy upper file (else 0o644, lower)
    "own": ("reg", 0o640, b"owned by 1000\n", 1000, None),
    "top": ("reg", 0o644, b"top\n", 0, None),
    "big": ("reg", 0o644, BIG, 0, None),
    "big2": ("reg", 0o644, BIG, 0, None),
}
GROUP_SIZES = {"a": 3, "b": 2, "fifo": 2, "dev": 2}
#: name -> the next name of the same lower hard link (a -> hl -> d1/h -> a)
NEXT_LINK = {}
for _group in ("a", "b", "fifo", "dev"):
    _names = [p for p, spec in INITIAL.items() if spec[4] == _group]
    NEXT_LINK.update({n: _names[(k + 1) % len(_names)] for k, n in enumerate(_names)})

# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
_tokens = itertools.count(1)


class ModelError(Exception):
    """The model's answer is this errno (or any of ``errnos`` where the order of two
    checks is not specified)."""

    def __init__(self, *errnos: int) -> None:
        super().__init__(", ".join(errno.errorcode[e] for e in errnos))
        self.errnos = frozenset(errnos)


@dataclass(eq=False)
class MInode:
    kind: str                      # reg, dir, lnk, fifo, chr
    mode: int                      # permission bits
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""
    rdev: int = 0
    nlink: int | None = 1          # None: not checked
    #: lower hard-link group of a name not copied up yet (None once it has its own copy)
    group: str | None = None
    lower_link: bool = False       # a name of a lower hard link: st_ino may change at remount
    in_upper: bool = False
    poisoned: bool = False         # metacopy upper file under metacopy=off
    token: int = field(default_factory=lambda: next(_tokens))  # st_ino class

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


@dataclass(eq=False)
class MHandle:
    fh: int
    inode: MInode
    flags: int
    path: str   # the name it was opened by
    label: str

    @property
    def readable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_WRONLY

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY

    def __repr__(self) -> str:
        return f"<handle {self.label}>"


def split(path: str) -> tuple[str, str]:
    head, _, name = path.rpartition("/")
    return head, name


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


class Model:
    """Merged names -> model inodes, and the rules of each operation. Every method either
    raises ``ModelError`` having changed nothing, or applies the change."""

    def __init__(self, *, metacopy_file: bool) -> None:
        self.names: dict[str, MInode] = {}
        self.index = False
        self.metacopy = False
        groups: dict[str, int] = {}
        for path, (kind, mode, value, owner, group) in INITIAL.items():
            ino = MInode(kind, mode, owner, owner, nlink=None if kind == "dir" else 1)
            if kind == "reg":
                ino.data = value
            elif kind == "lnk":
                ino.target = value
            elif kind == "chr":
                ino.rdev = value
            if group is not None:  # index=off: one inode per name, one st_ino per group
                ino.group, ino.lower_link, ino.nlink = group, True, GROUP_SIZES[group]
                ino.token = groups.setdefault(group, ino.token)
            if path == "mc" and metacopy_file:
                ino.poisoned, ino.in_upper = True, True
            elif path == "mc":
                ino.mode = 0o644
            self.names[path] = ino

    # -- lookups, as the VFS walks --------------------------------------------------------
    def resolve(self, path: str) -> MInode:
        node, cur = self.names[""], ""
        for name in [p for p in path.split("/") if p]:
            if not node.is_dir:
                raise ModelError(errno.ENOTDIR)
            cur = f"{cur}/{name}" if cur else name
            node = self.names.get(cur)
            if node is None:
                raise ModelError(errno.ENOENT)
            if node.poisoned:
                raise ModelError(errno.EPERM)
        return node

    def entry(self, path: str) -> MInode | None:
        """The parent must resolve to a directory; the name itself may be absent."""
        head, name = split(path)
        if not self.resolve(head).is_dir:
            raise ModelError(errno.ENOTDIR)
        node = self.names.get(path)
        if node is not None and node.poisoned:
            raise ModelError(errno.EPERM)
        return node

    def children(self, path: str) -> set[str]:
        prefix = path + "/" if path else ""
        return {p[len(prefix):] for p in self.names
                if p and p.startswith(prefix) and "/" not in p[len(prefix):]}

    def live_inodes(self) -> list[MInode]:
        seen: dict[int, MInode] = {}
        for ino in self.names.values():
            seen.setdefault(id(ino), ino)
        return list(seen.values())

    def paths_of(self, ino: MInode) -> list[str]:
        return sorted(p for p, i in self.names.items() if i is ino)

    # -- the rules ----------------------------------------------------------------------
    def copy_up(self, ino: MInode) -> None:
        if ino.in_upper:
            return
        ino.in_upper = True
        if ino.group is not None and not self.index:  # the copy breaks the lower link
            ino.group, ino.nlink, ino.token = None, 1, next(_tokens)

    def _new(self, path: str) -> MInode:
        """Checks for a new name; returns the parent."""
        if self.entry(path) is not None:
            raise ModelError(errno.EEXIST)
        if split(path)[1].startswith(".wh."):
            raise ModelError(errno.EINVAL)
        return self.resolve(split(path)[0])

    @staticmethod
    def _owner(parent: MInode) -> tuple[int, int]:
        return 0, parent.gid if parent.mode & stat.S_ISGID else 0

    def _drop_name(self, path: str) -> None:
        ino = self.names.pop(path)
        if ino.nlink is not None and not ino.is_dir and self.paths_of(ino):
            ino.nlink -= 1

    def create(self, path: str, mode: int) -> MInode:
        parent = self._new(path)
        uid, gid = self._owner(parent)
        ino = self.names[path] = MInode("reg", mode, uid, gid, in_upper=True)
        return ino

    def mkdir(self, path: str, mode: int) -> None:
        parent = self._new(path)
        uid, gid = self._owner(parent)
        if parent.mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        self.names[path] = MInode("dir", mode, uid, gid, nlink=None, in_upper=True)

    def mknod(self, path: str, kind: str, mode: int) -> None:
        if self.entry(path) is not None:
            raise ModelError(errno.EEXIST)
        if kind == "whiteout":  # which of the two checks comes first is not specified
            raise ModelError(errno.EPERM, *((errno.EINVAL,) if split(path)[1].startswith(".wh.") else ()))
        parent = self._new(path)
        uid, gid = self._owner(parent)
        self.names[path] = MInode(kind, mode, uid, gid, rdev=DEV if kind == "chr" else 0, in_upper=True)

    def symlink(self, path: str, target: str) -> None:
        parent = self._new(path)
        uid, gid = self._owner(parent)
        self.names[path] = MInode("lnk", 0o777, uid, gid, target=target, in_upper=True)

    def link(self, src: str, dst: str) -> None:
        ino = self.resolve(src)
        if ino.is_dir:
            raise ModelError(errno.EPERM)
        self._new(dst)
        self.copy_up(ino)
        self.names[dst] = ino
        if ino.nlink is not None:
            ino.nlink += 1

    def unlink(self, path: str) -> None:
        ino = self.entry(path)
        if ino is None:
            raise ModelError(errno.ENOENT)
        if ino.is_dir:
            raise ModelError(errno.EISDIR)
        self._drop_name(path)

    def rmdir(self, path: str) -> None:
        ino = self.entry(path)
        if ino is None:
            raise ModelError(errno.ENOENT)
        if not ino.is_dir:
            raise ModelError(errno.ENOTDIR)
        if self.children(path):
            raise ModelError(errno.ENOTEMPTY)
        del self.names[path]

    def rename_check(self, old: str, new: str) -> tuple[MInode, MInode | None]:
        src = self.entry(old)
        if src is None:
            raise ModelError(errno.ENOENT)
        dst = self.entry(new)
        if old == new:
            return src, dst
        if under(new, old):
            raise ModelError(errno.EINVAL)
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise ModelError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise ModelError(errno.EISDIR)
            if under(old, new):
                raise ModelError(errno.ENOTEMPTY)
        if split(new)[1].startswith(".wh."):
            raise ModelError(errno.EINVAL)
        if dst is not None and dst.is_dir and self.children(new):
            raise ModelError(errno.ENOTEMPTY)
        return src, dst

    def rename(self, old: str, new: str) -> None:
        src, dst = self.rename_check(old, new)
        if old == new or src is dst:
            return
        self.copy_up(src)
        if dst is not None:
            self._drop_name(new)
        for path in sorted((p for p in self.names if under(p, old)), key=len):
            self.names[new + path[len(old):]] = self.names.pop(path)

    def setattr(self, path: str, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None) -> MInode:
        ino = self.resolve(path)
        self.copy_up(ino)
        if mode is not None:
            ino.mode = mode
        if uid is not None:
            ino.uid = uid
        if gid is not None:
            ino.gid = gid
        if size is not None:
            ino.data = ino.data[:size].ljust(size, b"\0")
        return ino

    def open(self, path: str, flags: int) -> MInode:
        ino = self.resolve(path)
        if ino.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise ModelError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self.copy_up(ino)
        if flags & os.O_TRUNC:
            ino.data = b""
        return ino

    @staticmethod
    def write(ino: MInode, data: bytes, off: int) -> None:
        ino.data = ino.data[:off].ljust(off, b"\0") + data + ino.data[off + len(data):]

    def remount(self, index: bool, metacopy: bool) -> None:
        renewed: dict[int, int] = {}
        for ino in self.live_inodes():
            if ino.lower_link:  # their st_ino may change with the mount; learnt again
                ino.token = renewed.setdefault(ino.token, next(_tokens))
        if index and not self.index:  # the names of a lower hard link become one inode
            merged: dict[str, MInode] = {}
            for path, ino in sorted(self.names.items()):
                if ino.group is not None and not ino.in_upper:
                    first = merged.setdefault(ino.group, ino)
                    first.nlink = None
                    self.names[path] = first
        if metacopy:
            for ino in self.live_inodes():
                ino.poisoned = False
        self.index |= index
        self.metacopy |= metacopy


# ------------------------------------------------------------------------------------------
# Checks of the layer directories
# ------------------------------------------------------------------------------------------
def layer_state(root: Path) -> dict[str, tuple]:
    """Everything about a lower tree that the overlay must never change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None, *dirnames, *filenames]:
            p = dirpath if name is None else os.path.join(dirpath, name)
            st_ = os.lstat(p)
            digest = None
            if stat.S_ISREG(st_.st_mode):
                digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                                  for n in os.listxattr(p, follow_symlinks=False)))
            out[os.path.relpath(p, root)] = (st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size,
                                             st_.st_nlink, st_.st_ino, st_.st_rdev, st_.st_mtime_ns,
                                             st_.st_ctime_ns, digest, xattrs)
    return out


def check_upper(layout: Layout, model: Model) -> None:
    """After a clean unmount: no leftovers in workdir/work, no OCI names in the upper, and
    every fully copied-up regular file of the model holds its data in the upper itself."""
    leftovers = os.listdir(layout.work / "work")
    assert not leftovers, f"workdir/work not empty after unmount: {leftovers}"
    for dirpath, dirnames, filenames in os.walk(layout.upper):
        for name in dirnames + filenames:
            assert not name.startswith((".wh.", ".fuse_hidden")), f"{dirpath}/{name} in the upper"
    for path, ino in model.names.items():
        p = layout.upper / path
        if ino.kind != "reg" or ino.poisoned or not os.path.isfile(p) or os.path.islink(p):
            continue
        try:
            os.getxattr(p, "trusted.overlay.metacopy")
            continue  # data still below
        except OSError:
            pass
        assert p.read_bytes() == ino.data, f"upper file {path} does not hold the data of its name"
