"""Immutable and append-only flags through the mount, the kernel overlay as the oracle
(fstests overlay/075's ground): every change of a flagged object, or in a flagged
directory, answers as the kernel overlay's (EPERM where its VFS refuses), for objects
whose flags are a lower object's own (``lower``), or in the ``overlay.protattr`` xattr of
an upper the kernel overlay wrote: a lower object copied up by ``chattr`` through it
(``copied``), an object made through it (``upper``). The upper trees after the changes
are compared too: nothing is copied up for a refused change."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import subprocess
from pathlib import Path

import pytest

from features_support import KERNEL_METACOPY, KERNEL_REDIRECT, mount_side, new_stack, ovl_xattr

pytestmark = [pytest.mark.mount]

SIDES = ("kernel", "overlaypc")
FLAGS = {"immutable": "i", "append": "a"}
KINDS = ("lower", "copied", "upper")


def _open(flags: int, data: bytes | None = None):
    def run(p: Path, mnt: Path) -> None:
        fd = os.open(p, flags)
        try:
            if data is not None:
                os.write(fd, data)
            else:
                os.read(fd, 10) if flags & os.O_ACCMODE != os.O_WRONLY else None
        finally:
            os.close(fd)
    return run


def _with_fd(flags: int, act):
    def run(p: Path, mnt: Path) -> None:
        fd = os.open(p, flags)
        try:
            act(fd)
        finally:
            os.close(fd)
    return run


def _punch(fd: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, 0x02 | 0x01, ctypes.c_long(0), ctypes.c_long(2)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _then(first, second):
    def run(p: Path, mnt: Path) -> None:
        try:
            first(p, mnt)
        except OSError:
            pass
        second(p, mnt)
    return run


#: changes of a flagged file itself (``p``: the file, ``mnt``: the mount's root)
FILE_OPS = {
    "open_r": _open(os.O_RDONLY),
    "open_w": _open(os.O_WRONLY),
    "open_rw": _open(os.O_RDWR),
    "open_append": _open(os.O_WRONLY | os.O_APPEND, b"more\n"),
    "open_trunc": _open(os.O_WRONLY | os.O_TRUNC),
    "open_append_trunc": _open(os.O_WRONLY | os.O_APPEND | os.O_TRUNC),
    "truncate": lambda p, mnt: os.truncate(p, 0),
    "ftruncate_appending": _with_fd(os.O_WRONLY | os.O_APPEND, lambda fd: os.ftruncate(fd, 0)),
    "fallocate_appending": _with_fd(os.O_WRONLY | os.O_APPEND,
                                    lambda fd: os.posix_fallocate(fd, 0, 1 << 20)),
    "punch_appending": _with_fd(os.O_WRONLY | os.O_APPEND, lambda fd: _punch(fd)),
    "chmod": lambda p, mnt: os.chmod(p, 0o600),
    "chown": lambda p, mnt: os.chown(p, 1000, 1000),
    "chown_none": lambda p, mnt: os.chown(p, -1, -1),
    "utime_set": lambda p, mnt: os.utime(p, (1, 1)),
    "utime_now": lambda p, mnt: os.utime(p, None),
    "getxattr": lambda p, mnt: os.getxattr(p, "user.x"),
    "setxattr": lambda p, mnt: os.setxattr(p, "user.k", b"v"),
    "removexattr": lambda p, mnt: os.removexattr(p, "user.x"),
    "rename": lambda p, mnt: os.rename(p, mnt / ("r_" + p.name)),
    "unlink": lambda p, mnt: os.unlink(p),
    "link": lambda p, mnt: os.link(p, mnt / ("l_" + p.name)),
    # an append copies an append-only file up: its flags go with it
    "append_then_chmod": _then(_open(os.O_WRONLY | os.O_APPEND, b"more\n"),
                               lambda p, mnt: os.chmod(p, 0o600)),
    "append_then_unlink": _then(_open(os.O_WRONLY | os.O_APPEND, b"more\n"),
                                lambda p, mnt: os.unlink(p)),
}

#: changes of a flagged directory or in it (``p``: the directory, holding file ``c``)
DIR_OPS = {
    "chmod": lambda p, mnt: os.chmod(p, 0o700),
    "chown": lambda p, mnt: os.chown(p, 1000, 1000),
    "utime_set": lambda p, mnt: os.utime(p, (1, 1)),
    "utime_now": lambda p, mnt: os.utime(p, None),
    "setxattr": lambda p, mnt: os.setxattr(p, "user.k", b"v"),
    "removexattr": lambda p, mnt: os.removexattr(p, "user.x"),
    "listdir": lambda p, mnt: os.listdir(p),
    "create": lambda p, mnt: os.close(os.open(p / "new", os.O_CREAT | os.O_WRONLY, 0o644)),
    "mkdir": lambda p, mnt: os.mkdir(p / "newd"),
    "symlink": lambda p, mnt: os.symlink("t", p / "s"),
    "mkfifo": lambda p, mnt: os.mkfifo(p / "fifo"),
    "unlink_child": lambda p, mnt: os.unlink(p / "c"),
    "rename_child": lambda p, mnt: os.rename(p / "c", p / "c2"),
    "rename_child_out": lambda p, mnt: os.rename(p / "c", mnt / ("out_" + p.name)),
    "rename_into": lambda p, mnt: os.rename(mnt / ("x_" + p.name), p / "x"),
    "rename_over_child": lambda p, mnt: os.rename(mnt / ("x_" + p.name), p / "c"),
    "link_into": lambda p, mnt: os.link(mnt / ("x_" + p.name), p / "x"),
    "link_child_out": lambda p, mnt: os.link(p / "c", mnt / ("lo_" + p.name)),
    "rename_dir": lambda p, mnt: os.rename(p, mnt / ("rd_" + p.name)),
    "rename_dir_away": lambda p, mnt: os.rename(p, mnt / "away" / p.name),
    "rmdir_child": lambda p, mnt: os.rmdir(p / "e"),
    "rmdir": lambda p, mnt: os.rmdir(p),
    # a change of a child copies the directory up: its flags go with it
    "chmod_child": lambda p, mnt: os.chmod(p / "c", 0o600),
    "chmod_child_then_create": _then(lambda p, mnt: os.chmod(p / "c", 0o600),
                                     lambda p, mnt: os.mkdir(p / "newd")),
    "chmod_child_then_chmod": _then(lambda p, mnt: os.chmod(p / "c", 0o600),
                                    lambda p, mnt: os.chmod(p, 0o700)),
}


def _errno(op, p: Path, mnt: Path) -> int:
    try:
        op(p, mnt)
    except OSError as e:
        return e.errno
    return 0


def _lower_spec() -> dict:
    spec: dict = {"away": {}}
    for op in FILE_OPS:
        spec["f_" + op] = b"data\n"
    for op in DIR_OPS:
        spec["d_" + op] = {"c": b"child\n", "e": {}} if op != "rmdir" else {}
        spec["x_d_" + op] = b"x\n"
    return spec


def _objects() -> list[str]:
    return ["f_" + op for op in FILE_OPS] + ["d_" + op for op in DIR_OPS]


def _xattrs(root: Path) -> None:
    for name in _objects():
        os.setxattr(root / name, "user.x", b"1")


def _chattr(mode: str, *paths: Path) -> None:
    subprocess.run(["chattr", mode, *map(str, paths)], check=True, capture_output=True)


def _unflag_all(*roots: Path) -> None:
    """Teardown: no immutable/append-only object may stay (the cleanup removes them)."""
    for root in roots:
        if root.exists():
            subprocess.run(["chattr", "-R", "-f", "-i", "-a", str(root)], capture_output=True)


def _tree(root: Path) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


def _prepare(kind: str, letter: str, lower: Path, s, kernel_mount) -> None:
    """Flag the objects: on the lower itself, or through a kernel overlay mount of the
    stack (``copied``: lower objects copied up by the chattr; ``upper``: objects made
    through the mount first)."""
    if kind == "lower":
        return
    mnt = kernel_mount(s.lowers, s.upper, s.work, ("redirect_dir=on",))
    try:
        if kind == "upper":
            for name in _objects():
                os.rename(mnt / name, mnt / ("old_" + name))
                if name.startswith("f_"):
                    (mnt / name).write_bytes(b"data\n")
                else:
                    (mnt / name).mkdir()
                    if not name.endswith("_rmdir"):
                        (mnt / name / "c").write_bytes(b"child\n")
                        (mnt / name / "e").mkdir()
                os.setxattr(mnt / name, "user.x", b"1")
        _chattr("+" + letter, *(mnt / n for n in _objects()))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _each_side(tmp_path: Path, lower: Path, session, overlay_mount, kernel_mount,
               stacks: dict | None = None, opts=KERNEL_REDIRECT) -> dict:
    """``session(mount root)`` on a fresh stack over ``lower`` per side (kernel, then
    overlaypc), each mounted for it alone with ``opts``, its upper and workdir under
    ``tmp_path``; ``stacks`` gets each side's stack."""
    got = {}
    for side in SIDES:
        (tmp_path / side).mkdir()
        s = new_stack([lower], tmp_path / side, side)
        if stacks is not None:
            stacks[side] = s
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts)
        try:
            got[side] = session(mnt)
        finally:
            unmount()
    return got


def _run_side(side: str, kind: str, letter: str, lower: Path, base: Path,
              overlay_mount, kernel_mount):
    s = new_stack([lower], base, side)
    _prepare(kind, letter, lower, s, kernel_mount)
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
    try:
        got = {}
        for op, fn in FILE_OPS.items():
            got["file " + op] = _errno(fn, mnt / ("f_" + op), mnt)
        for op, fn in DIR_OPS.items():
            got["dir " + op] = _errno(fn, mnt / ("d_" + op), mnt)
    finally:
        unmount()
    return got, _tree(s.upper)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flag", FLAGS)
def test_flagged_objects_refuse_changes_as_the_kernel(kind, flag, tmp_path, layers_factory,
                                                       overlay_mount, kernel_mount):
    letter = FLAGS[flag]
    lower = layers_factory({"l": _lower_spec()}, where={"l": tmp_path}).paths[0]
    _xattrs(lower)
    try:
        if kind == "lower":
            _chattr("+" + letter, *(lower / n for n in _objects()))
        got, trees = {}, {}
        for side in SIDES:
            (tmp_path / side).mkdir()
            got[side], trees[side] = _run_side(side, kind, letter, lower, tmp_path / side,
                                               overlay_mount, kernel_mount)
    finally:
        _unflag_all(tmp_path)
    refused = sorted(k for k, v in got["kernel"].items() if v == errno.EPERM)
    assert refused, "the kernel refused nothing: the flags were not set"
    diff = {k: (v, got["overlaypc"][k]) for k, v in got["kernel"].items() if got["overlaypc"][k] != v}
    assert diff == {}, f"(kernel, overlaypc) errno where they differ; kernel refused {refused}"
    ours, theirs = set(trees["overlaypc"]), set(trees["kernel"])
    assert (sorted(ours - theirs), sorted(theirs - ours)) == ([], [])


FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602


def _flags_of(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)[:4])[0]
    finally:
        os.close(fd)


def test_copy_up_keeps_the_flags_in_protattr_for_the_kernel(tmp_path, layers_factory,
                                                            overlay_mount, kernel_mount):
    """A copy-up through overlaypc of an immutable directory (a change of its child) and
    of an append-only file (an append) writes ``overlay.protattr`` as the kernel's does:
    the kernel overlay, mounting that upper over a lower without the flags, shows them
    and refuses what they refuse."""
    lower = layers_factory({"l": {"d": {"c": b"c\n"}, "f": b"f\n"}}, where={"l": tmp_path}).paths[0]
    try:
        _chattr("+i", lower / "d")
        _chattr("+a", lower / "f")
        s = new_stack([lower], tmp_path, "overlaypc")
        mnt, unmount = mount_side("overlaypc", s, overlay_mount, kernel_mount)
        try:
            os.chmod(mnt / "d" / "c", 0o600)
            with open(mnt / "f", "a") as f:
                f.write("more\n")
        finally:
            unmount()
        assert ovl_xattr(s.upper / "d", "protattr") == b"i"
        assert ovl_xattr(s.upper / "f", "protattr") == b"a"
        assert _flags_of(s.upper / "d") & 0x30 == 0  # (not on the real copies)
        assert _flags_of(s.upper / "f") & 0x30 == 0
        _unflag_all(lower)
        kmnt = kernel_mount(s.lowers, s.upper, s.work, ("redirect_dir=on",))
        assert _flags_of(kmnt / "d") & 0x30 == 0x10
        assert _flags_of(kmnt / "f") & 0x30 == 0x20
        assert _errno(lambda p, m: os.mkdir(p / "x"), kmnt / "d", kmnt) == errno.EPERM
        assert _errno(lambda p, m: os.truncate(p, 0), kmnt / "f", kmnt) == errno.EPERM
    finally:
        _unflag_all(tmp_path)


#: the flags compared: sync, immutable, append, nodump, noatime
SHOWN = 0x08 | 0x10 | 0x20 | 0x40 | 0x80


def _lsattr(mnt: Path, names) -> dict:
    return {n: _flags_of(mnt / n) & SHOWN for n in names}


def _chattr_errno(mode: str, path: Path) -> int:
    r = subprocess.run(["chattr", mode, str(path)], capture_output=True, text=True)
    if r.returncode == 0:
        return 0
    return errno.EPERM if "not permitted" in r.stderr else -1


def _immutable_as(uid: int, path: Path) -> int:
    """The errno of FS_IOC_SETFLAGS adding immutable by a process of ``uid`` without
    capabilities (opened first as root: the layers' parents are not searchable)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fd = os.open(path, os.O_RDONLY)
            flags = _flags_of(path)
            os.setgid(uid)
            os.setuid(uid)  # (all capabilities go)
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | 0x10) + b"\0" * 4)
        except OSError as e:
            code = e.errno
        except BaseException:
            code = 255
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _chattr_session(mnt: Path) -> dict:
    out = {"before": _lsattr(mnt, ["f", "d", "g", "n"])}
    out["chattr"] = {
        "+i f": _chattr_errno("+i", mnt / "f"),
        "+a d": _chattr_errno("+a", mnt / "d"),
        "+A g": _chattr_errno("+A", mnt / "g"),     # with its own lower +a: both kept
        "+S n": _chattr_errno("+S", mnt / "n"),
        "-i u (not flagged)": _chattr_errno("-i", mnt / "u"),
        "+i u by its owner": _immutable_as(1000, mnt / "u"),
    }
    out["after"] = _lsattr(mnt, ["f", "d", "g", "n", "u"])
    out["changes"] = {
        "write f": _errno(_open(os.O_WRONLY), mnt / "f", mnt),
        "create in d": _errno(lambda p, m: os.mkdir(p / "new"), mnt / "d", mnt),
        "unlink d/c": _errno(lambda p, m: os.unlink(p / "c"), mnt / "d", mnt),
        "append g": _errno(_open(os.O_WRONLY | os.O_APPEND, b"g\n"), mnt / "g", mnt),
    }
    out["chattr"]["-i f"] = _chattr_errno("-i", mnt / "f")
    out["changes"]["write f after -i"] = _errno(_open(os.O_WRONLY), mnt / "f", mnt)
    out["last"] = _lsattr(mnt, ["f", "d", "g", "n"])
    return out


def test_chattr_and_lsattr_as_the_kernel(tmp_path, layers_factory, overlay_mount, kernel_mount):
    """``lsattr``/``chattr`` through the mount (FS_IOC_GETFLAGS/SETFLAGS, sent as
    FUSE_IOCTL) answer as the kernel overlay's: a set copies up, immutable/append-only go
    to ``overlay.protattr``, the others onto the real copy; the caller needs
    CAP_LINUX_IMMUTABLE for i/a. Each side's upper then mounted by the other shows the
    same flags (layers move freely both ways)."""
    lower = layers_factory({"l": {"f": b"f\n", "d": {"c": b"c\n"}, "g": b"g\n", "n": b"n\n",
                                  "u": b"u\n"}}, where={"l": tmp_path}).paths[0]
    os.chown(lower / "u", 1000, 1000)
    try:
        _chattr("+a", lower / "g")
        stacks: dict = {}
        got = _each_side(tmp_path, lower, _chattr_session, overlay_mount, kernel_mount, stacks)
        assert got["overlaypc"] == got["kernel"]
        assert got["kernel"]["after"]["f"] & 0x10 and got["kernel"]["after"]["d"] & 0x20
        assert got["kernel"]["chattr"]["+i u by its owner"] == errno.EPERM
        for side in SIDES:
            up = stacks[side].upper
            got[side] = {n: ovl_xattr(up / n, "protattr") for n in ("f", "d", "g", "n")}
            got[side]["real"] = {n: _flags_of(up / n) & SHOWN for n in ("d", "g", "n")}
        assert got["overlaypc"] == got["kernel"]
        # each side's upper under the other
        for side, other in (("overlaypc", "kernel"), ("kernel", "overlaypc")):
            s = stacks[side]
            mnt, unmount = mount_side(other, s, overlay_mount, kernel_mount)
            try:
                got[side] = _lsattr(mnt, ["f", "d", "g", "n"])
                got[side]["mkdir in d"] = _errno(lambda p, m: os.mkdir(p / "new2"), mnt / "d", mnt)
                got[side]["unlink d/c"] = _errno(lambda p, m: os.unlink(p / "c"), mnt / "d", mnt)
            finally:
                unmount()
        assert got["overlaypc"] == got["kernel"]
    finally:
        _unflag_all(tmp_path)


@pytest.mark.parametrize("value", [b"x", b"", b"ia!", b"a" * 40])
def test_malformed_protattr_is_ignored_as_the_kernel(value, tmp_path, layers_factory,
                                                     overlay_mount, kernel_mount):
    """An upper's ``protattr`` the kernel cannot read (empty, another letter, too long)
    counts as no flags, there as here (logged, never a failed request nor a crash)."""
    lower = layers_factory({"l": {"x": b"x\n"}}, where={"l": tmp_path}).paths[0]
    got = {}
    for side in SIDES:
        (tmp_path / side).mkdir()
        s = new_stack([lower], tmp_path / side, side)
        for name in ("d", "f"):
            (s.upper / name).mkdir() if name == "d" else (s.upper / name).write_bytes(b"f\n")
            os.setxattr(s.upper / name, "trusted.overlay.protattr", value)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
        try:
            got[side] = {
                "mkdir in d": _errno(lambda p, m: os.mkdir(p / "new"), mnt / "d", mnt),
                "write f": _errno(_open(os.O_WRONLY), mnt / "f", mnt),
                "flags": _lsattr(mnt, ["d", "f"]),
            }
        finally:
            unmount()
    assert got["overlaypc"] == got["kernel"] == {"mkdir in d": 0, "write f": 0,
                                                  "flags": {"d": 0, "f": 0}}


def _upper_only_session(mnt: Path) -> dict:
    """Changes in an upper-only directory ``u`` of flagged objects: through an open
    append-only file's fd (fchmod, fchown, futimens: SETATTRs of an open upper file) and
    removals of flagged files and of files in flagged directories (UNLINKs where only the
    upper can hold the name): the requests overlaypc answers by its short paths."""
    got = {}
    fd = os.open(mnt / "u" / "app", os.O_WRONLY | os.O_APPEND)
    try:
        for name, act in (("fchmod", lambda: os.chmod(fd, 0o600)),
                          ("fchown", lambda: os.chown(fd, 1000, 1000)),
                          ("futimens", lambda: os.utime(fd, (1, 1))),
                          ("append", lambda: os.write(fd, b"more\n"))):
            try:
                act()
                got[name] = 0
            except OSError as e:
                got[name] = e.errno
    finally:
        os.close(fd)
    for rel in ("u/imm", "u/app", "u/idir/c", "u/adir/c", "u/plain"):
        got["unlink " + rel] = _errno(lambda p, m: os.unlink(p), mnt / rel, mnt)
    return got


def test_flagged_objects_in_an_upper_only_directory_as_the_kernel(tmp_path, layers_factory,
                                                                    overlay_mount, kernel_mount):
    """Objects the kernel overlay made and flagged in a directory only the upper holds:
    fd-based SETATTRs of an open append-only file and UNLINKs of flagged files, or of files
    in flagged directories, are refused as the kernel refuses them (overlaypc answers these
    requests by short paths in such a directory: they must see the flags too)."""
    lower = layers_factory({"l": {"keep": b"x\n"}}, where={"l": tmp_path}).paths[0]
    got, trees = {}, {}
    try:
        for side in SIDES:
            (tmp_path / side).mkdir()
            s = new_stack([lower], tmp_path / side, side)
            mnt = kernel_mount(s.lowers, s.upper, s.work, ())
            try:
                (mnt / "u").mkdir()
                for name in ("imm", "app", "plain"):
                    (mnt / "u" / name).write_bytes(b"data\n")
                for name in ("idir", "adir"):
                    (mnt / "u" / name).mkdir()
                    (mnt / "u" / name / "c").write_bytes(b"child\n")
                _chattr("+i", mnt / "u" / "imm", mnt / "u" / "idir")
                _chattr("+a", mnt / "u" / "app", mnt / "u" / "adir")
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
            mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
            try:
                got[side] = _upper_only_session(mnt)
            finally:
                unmount()
            trees[side] = _tree(s.upper)
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["fchmod"] == errno.EPERM and got["kernel"]["unlink u/imm"] == errno.EPERM
    assert got["overlaypc"] == got["kernel"]
    assert trees["overlaypc"] == trees["kernel"]


def _fallocate(mode: int):
    def run(fd: int) -> None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fallocate(fd, mode, ctypes.c_long(0), ctypes.c_long(4096)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return run


#: changes through an fd opened for writing (O_RDWR) before ``chattr``: the flags are checked
#: by ``vfs_fallocate`` and ``copy_file_range`` on the inode, not only at open
FD_OPS = {
    "fallocate": _fallocate(0),
    "fallocate_keep_size": _fallocate(0x01),
    "punch": _fallocate(0x02 | 0x01),
    "zero_range": _fallocate(0x10),
    "write": lambda fd: os.write(fd, b"w"),
    "pwrite": lambda fd: os.pwrite(fd, b"w", 0),
    "ftruncate": lambda fd: os.ftruncate(fd, 4),
    "ftruncate_grow": lambda fd: os.ftruncate(fd, 20),
    "futimens_now": lambda fd: os.utime(fd, None),
    "fchmod": lambda fd: os.chmod(fd, 0o600),
}


def _fd_session(mnt: Path, letter: str) -> dict:
    got = {}
    src = os.open(mnt / "src", os.O_RDONLY)
    try:
        for kind in ("lower", "upper"):
            if kind == "upper":
                for op in [*FD_OPS, "copy_file_range"]:
                    (mnt / f"upper_{op}").write_bytes(b"0123456789")
            for op in [*FD_OPS, "copy_file_range"]:
                p = mnt / f"{kind}_{op}"
                fd = os.open(p, os.O_RDWR)
                try:
                    _chattr("+" + letter, p)
                    act = FD_OPS.get(op) or (lambda fd: os.copy_file_range(src, fd, 3, 0, 0))
                    got[f"{kind} {op}"] = _errno(lambda p, m: act(fd), p, mnt)
                finally:
                    os.close(fd)
                _chattr("-" + letter, p)
                got[f"{kind} {op} data"] = p.read_bytes()
    finally:
        os.close(src)
    return got


@pytest.mark.parametrize("flag", FLAGS)
def test_changes_through_an_fd_opened_before_chattr_as_the_kernel(flag, tmp_path, layers_factory,
                                                                  overlay_mount, kernel_mount):
    """An fd opened for writing before ``chattr +i``/``+a`` through the mount: fallocate
    (any mode) and copy_file_range into the file are refused once it is immutable, a hole
    punched or a range zeroed once it is append-only, a write goes on (the kernel overlay
    checks its inode's flags in ``vfs_fallocate`` and ``generic_copy_file_checks``, not at
    write); for a lower file (copied up by the open) and one made through the mount."""
    spec = {"src": b"SRC"}
    spec.update({f"lower_{op}": b"0123456789" for op in [*FD_OPS, "copy_file_range"]})
    lower = layers_factory({"l": spec}, where={"l": tmp_path}).paths[0]
    try:
        got = _each_side(tmp_path, lower, lambda mnt: _fd_session(mnt, FLAGS[flag]),
                         overlay_mount, kernel_mount)
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["lower punch"] == errno.EPERM
    assert got["overlaypc"] == got["kernel"]


def test_the_roots_protattr_lasts_one_mount_as_the_kernel(tmp_path, layers_factory, overlay_mount,
                                                          kernel_mount):
    """``chattr +a`` of the mount's root writes the upper root's ``protattr`` and holds for
    that mount; the kernel overlay's root inode does not read it at the next mount (its
    root is not made by ``ovl_get_inode``, where ``protattr`` is read), so a root flagged
    by either side is not flagged at the next mount of either: lsattr shows no flag and
    the root's entries can be removed."""
    pairs = (("kernel", "kernel"), ("kernel", "overlaypc"), ("overlaypc", "overlaypc"))
    spec = {"f": b"f\n", **{f"g_{a}_{b}": b"g\n" for a, b in pairs}}
    lower = layers_factory({"l": spec}, where={"l": tmp_path}).paths[0]
    stacks: dict = {}
    try:
        got = _each_side(tmp_path, lower,
                         lambda mnt: {"chattr +a /": _chattr_errno("+a", mnt),
                                      "flags /": _flags_of(mnt) & SHOWN,
                                      "unlink f": _errno(lambda p, m: os.unlink(p), mnt / "f", mnt)},
                         overlay_mount, kernel_mount, stacks)
        assert got["overlaypc"] == got["kernel"]
        assert got["kernel"]["unlink f"] == errno.EPERM
        for side in SIDES:
            assert ovl_xattr(stacks[side].upper, "protattr") == b"a"
        for side, other in pairs:
            mnt, unmount = mount_side(other, stacks[side], overlay_mount, kernel_mount)
            try:
                got[f"{side} upper, {other}"] = {
                    "flags /": _flags_of(mnt) & SHOWN,
                    "unlink g": _errno(lambda p, m: os.unlink(p), mnt / f"g_{side}_{other}", mnt)}
            finally:
                unmount()
        assert got["kernel upper, kernel"] == {"flags /": 0, "unlink g": 0}
        assert got["kernel upper, overlaypc"] == got["kernel upper, kernel"]
        assert got["overlaypc upper, overlaypc"] == got["kernel upper, kernel"]
    finally:
        _unflag_all(tmp_path)


def test_a_callers_own_setflags_ioctl_is_not_served(tmp_path):
    """Before FUSE's fileattr operations (kernel 5.13; overlaypc speaks FUSE 7.31 and up,
    5.2) the VFS hands a caller's own FS_IOC_SETFLAGS/FSSETXATTR ioctl to FUSE as it came,
    with neither the owner check nor CAP_LINUX_IMMUTABLE's: any user who can open a file
    could clear or set its flags through the root daemon. Only the kernel's fileattr form
    is served (``fuse_priv_ioctl``: ``arg`` 0, the flags as 4 bytes); a caller's ioctl
    (``arg``: its buffer's address; FS_IOC_SETFLAGS's ``_IOC_SIZE`` is 8 bytes) answers
    ENOTTY, as before flags47, and changes nothing."""
    import helpers
    from core_driver import CoreDriver
    from engine_support import FakeKernel
    from overlaypc.engine import protocol as p
    helpers.require("root")
    (tmp_path / "lower").mkdir()
    (tmp_path / "lower" / "f").write_bytes(b"f\n")
    drv = CoreDriver.in_dir(tmp_path)
    fk = FakeKernel(drv.ops)
    try:
        fk.start()
        entry = p.ENTRY_OUT.unpack_from(fk.ok(p.LOOKUP, p.ROOT_ID, b"f\0"))
        nodeid, user_buffer = entry[0], 0x7FFD_2000_0000
        raw = [p.IOCTL_IN.pack(0, 0, FS_IOC_SETFLAGS, user_buffer, 8, 0) + struct.pack("<Q", 0x10),
               p.IOCTL_IN.pack(0, 0, 0x401C5820, user_buffer, 28, 0) + struct.pack("<I24x", 0x8)]
        assert [fk.request(p.IOCTL, nodeid, body).error for body in raw] == [-errno.ENOTTY] * 2
        assert ovl_xattr(tmp_path / "upper" / "f", "protattr") is None
        # (as chattr does: the flags it read with i added; a bare 0x10 would also clear the
        # file's own flags, and ext4 refuses clearing its extents flag 'e' with EPERM)
        flags = _flags_of(tmp_path / "lower" / "f") | 0x10
        fk.ok(p.IOCTL, nodeid, p.IOCTL_IN.pack(0, 0, FS_IOC_SETFLAGS, 0, 4, 0) + struct.pack("<I", flags))
        assert ovl_xattr(tmp_path / "upper" / "f", "protattr") == b"i"
    finally:
        fk.close()
        drv.close()


def _half_set_session(mnt: Path) -> dict:
    got = {}
    for name in ("lower", "upper"):
        p = mnt / name
        if name == "upper":
            p.write_bytes(b"u\n")
        got[name + " open_w before"] = _errno(_open(os.O_WRONLY), p, mnt)  # (its flags read)
        # casefold on a regular file: the upper refuses it after protattr was written
        got[name + " chattr +iF"] = _chattr_errno("+iF", p)
        got[name + " flags"] = _flags_of(p) & SHOWN
        got[name + " open_w"] = _errno(_open(os.O_WRONLY), p, mnt)
        got[name + " chmod"] = _errno(lambda p, m: os.chmod(p, 0o600), p, mnt)
    return got


def test_a_chattr_failing_after_its_protattr_keeps_the_flags_as_the_kernel(
        tmp_path, layers_factory, overlay_mount, kernel_mount):
    """A set whose other flags the real upper refuses fails after ``protattr`` was
    written (the kernel's ``ovl_set_protattr`` first, then ``ovl_real_fileattr_set``):
    the kernel's inode keeps the immutable flag it set, and lsattr shows it on both; the
    changes it refuses are refused here too (the node's kept flags were the old ones)."""
    lower = layers_factory({"l": {"lower": b"l\n"}}, where={"l": tmp_path}).paths[0]
    try:
        got = _each_side(tmp_path, lower, _half_set_session, overlay_mount, kernel_mount)
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["lower chattr +iF"] != 0 and got["kernel"]["lower open_w"] == errno.EPERM
    assert got["overlaypc"] == got["kernel"]


def _half_set_nameless_session(mnt: Path) -> dict:
    """As ``_half_set_session``, through the fd of a file made through the mount, named
    and with no name left (chattr of a nameless file: d7ec31d)."""
    got = {}
    for kind in ("named", "nameless"):
        p = mnt / kind
        p.write_bytes(b"u\n")
        fd = os.open(p, os.O_RDWR)
        try:
            got[kind + " fchmod before"] = _errno(lambda p, m: os.chmod(fd, 0o640), p, mnt)
            if kind == "nameless":
                os.unlink(p)
            got[kind + " set +iF"] = _ioctl_flags(fd, 0x10 | 0x40000000)  # (casefold: refused)
            got[kind + " get"] = _ioctl_flags(fd)
            got[kind + " fchmod"] = _errno(lambda p, m: os.chmod(fd, 0o600), p, mnt)
            got[kind + " fchown"] = _errno(lambda p, m: os.chown(fd, 5, 5), p, mnt)
            got[kind + " setxattr"] = _errno(lambda p, m: os.setxattr(fd, "user.x", b"1"), p, mnt)
            got[kind + " set none"] = _ioctl_flags(fd, 0)
            got[kind + " fchmod after"] = _errno(lambda p, m: os.chmod(fd, 0o600), p, mnt)
        finally:
            os.close(fd)
    return got


def test_a_chattr_failing_after_its_protattr_keeps_the_flags_with_no_name_left_as_the_kernel(
        tmp_path, layers_factory, overlay_mount, kernel_mount):
    """review48a: a set of an open file with no name left whose other flags the upper
    refuses fails after ``protattr`` was written, as by name; the kernel's inode keeps the
    immutable flag (``ovl_set_protattr`` set it), so fchmod, fchown and fsetxattr through
    the fd are refused. The node's flags were left unknown, which for a node with no name
    counts as none (``_protected``): they went on."""
    lower = layers_factory({"l": {"lo": b"l\n"}}, where={"l": tmp_path}).paths[0]
    try:
        got = _each_side(tmp_path, lower, _half_set_nameless_session, overlay_mount, kernel_mount)
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["nameless set +iF"] != 0 and got["kernel"]["nameless fchmod"] == errno.EPERM
    assert got["overlaypc"] == got["kernel"]


#: lower objects flagged sync (S), noatime (A), nodump (d) and mixes; ``aS``: append-only too
COPIED_FLAGS = {"S": "+S", "A": "+A", "d": "+d", "SA": "+SA", "Sd": "+Sd", "Ad": "+Ad",
                "aS": "+aS", "none": "-S"}


def _copy_up_flags_session(mnt: Path) -> dict:
    """Copy each lower object up (a chmod of a file, of a directory's child, an append to
    the append-only file), each side's answer and then the flags lsattr shows."""
    got = {}
    for n in COPIED_FLAGS:
        if n == "aS":
            got["append f_aS"] = _errno(_open(os.O_WRONLY | os.O_APPEND, b"more\n"), mnt / "f_aS", mnt)
        else:
            got["chmod f_" + n] = _errno(lambda p, m: os.chmod(p, 0o600), mnt / ("f_" + n), mnt)
        got["chmod d_" + n + "/c"] = _errno(lambda p, m: os.chmod(p, 0o600), mnt / ("d_" + n) / "c", mnt)
    got["lsattr"] = _lsattr(mnt, [p + n for n in COPIED_FLAGS for p in ("f_", "d_")])
    return got


def _copy_up_flags_lower(tmp_path: Path, layers_factory) -> Path:
    spec = {}
    for n in COPIED_FLAGS:
        spec["f_" + n] = b"data\n"
        spec["d_" + n] = {"c": b"child\n"}
    lower = layers_factory({"l": spec}, where={"l": tmp_path}).paths[0]
    for n, mode in COPIED_FLAGS.items():
        _chattr(mode, lower / ("f_" + n), lower / ("d_" + n))
    return lower


@pytest.mark.parametrize("opts", [KERNEL_REDIRECT, KERNEL_METACOPY], ids=["plain", "metacopy"])
def test_copy_up_carries_sync_and_noatime_as_the_kernel(opts, tmp_path, layers_factory,
                                                        overlay_mount, kernel_mount):
    """A copy-up puts the lower object's sync and noatime flags on the real upper copy,
    as the kernel's ``ovl_copy_fileattr`` (``OVL_COPY_FS_FLAGS_MASK``), not nodump;
    immutable/append-only go to ``protattr``. Files (data, or metadata only under
    metacopy=on) and directories: lsattr through the mount, the upper's real flags and
    ``protattr`` the same on both sides."""
    lower = _copy_up_flags_lower(tmp_path, layers_factory)
    stacks: dict = {}
    try:
        got = _each_side(tmp_path, lower, _copy_up_flags_session, overlay_mount, kernel_mount,
                         stacks, opts)
        for side in SIDES:
            up = stacks[side].upper
            names = sorted(os.listdir(up))
            got[side]["upper"] = {n: (_flags_of(up / n) & SHOWN, ovl_xattr(up / n, "protattr"))
                                  for n in names}
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["upper"]["f_SA"][0] == 0x88 and got["kernel"]["upper"]["d_Sd"][0] == 0x08
    assert got["overlaypc"] == got["kernel"]


def test_copy_up_of_a_sync_file_to_an_upper_without_it_fails_as_the_kernel(
        tmp_path, layers_factory, tmpfs_factory, overlay_mount, kernel_mount):
    """An upper that cannot hold the sync flag (tmpfs) fails the copy-up of a lower file
    or directory flagged sync, as the kernel's (``ovl_real_fileattr_set``'s EOPNOTSUPP);
    noatime, which tmpfs holds, goes on."""
    lower = _copy_up_flags_lower(tmp_path, layers_factory)
    upper_fs = tmpfs_factory("16m")
    got = {}
    try:
        for side in SIDES:
            (upper_fs / side).mkdir()
            s = new_stack([lower], upper_fs / side, side)
            mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
            try:
                got[side] = _copy_up_flags_session(mnt)
            finally:
                unmount()
            got[side]["upper"] = sorted(os.listdir(s.upper))
    finally:
        _unflag_all(tmp_path, upper_fs)
    assert got["kernel"]["chmod f_S"] == errno.EOPNOTSUPP and got["kernel"]["chmod f_A"] == 0
    assert got["overlaypc"] == got["kernel"]


def _ioctl_flags(fd: int, value: int | None = None) -> int | str:
    """FS_IOC_GETFLAGS of ``fd`` (the shown flags), or (as chattr) FS_IOC_SETFLAGS of its
    flags with the shown ones ``value`` (0); the errno's name when refused."""
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)[:4])[0]
        if value is None:
            return flags & SHOWN
        value |= flags & ~SHOWN  # (ext4's extents flag, which it may not clear: EOPNOTSUPP)
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", value) + b"\0" * 4)
        return 0
    except OSError as e:
        return errno.errorcode[e.errno]


def _nameless_flags_session(mnt: Path) -> dict:
    """lsattr/chattr (the ioctls, through the fd) of open files and directories whose name
    went: a lower file open read-only (its copy-up needs the name), one open for writing
    (copied up by the open), a file and a directory made through the mount, a lower
    directory; each flagged sync, then immutable, then unflagged, its flags read after each."""
    got = {}
    (mnt / "up").write_bytes(b"u\n")
    (mnt / "updir").mkdir()
    for name, flags in (("lo", os.O_RDONLY), ("lo_w", os.O_RDWR), ("up", os.O_RDWR),
                        ("lodir", os.O_RDONLY | os.O_DIRECTORY),
                        ("updir", os.O_RDONLY | os.O_DIRECTORY)):
        p = mnt / name
        fd = os.open(p, flags)
        try:
            os.rmdir(p) if name.endswith("dir") else os.unlink(p)
            got[name + " get"] = _ioctl_flags(fd)
            for step, value in (("S", 0x08), ("i", 0x18), ("none", 0)):
                got[f"{name} set {step}"] = _ioctl_flags(fd, value)
                got[f"{name} get after {step}"] = _ioctl_flags(fd)
                if step == "i" and flags & os.O_RDWR:
                    got[name + " fchmod when immutable"] = _errno(lambda p, m: os.chmod(fd, 0o600), p, mnt)
        finally:
            os.close(fd)
    return got


def test_chattr_and_lsattr_of_a_file_with_no_name_left_as_the_kernel(tmp_path, layers_factory,
                                                                     overlay_mount, kernel_mount):
    """lsattr of an open file or directory whose name went answers from the open object,
    as the kernel overlay's (``ovl_fileattr_get`` of the real file it keeps): not ENOENT;
    chattr of an upper one sets its flags (``protattr`` on the unlinked upper file), of a
    lower file EEXIST (its copy-up needs the name). One answer differs, kept apart: a set
    of a removed lower directory (the kernel's copy-up meets the whiteout: ENOTDIR;
    overlaypc ESTALE, as for every change of one, ``nameless``)."""
    lower = layers_factory({"l": {"lo": b"l\n", "lo_w": b"w\n", "lodir": {}}},
                           where={"l": tmp_path}).paths[0]
    try:
        got = _each_side(tmp_path, lower, _nameless_flags_session, overlay_mount, kernel_mount)
    finally:
        _unflag_all(tmp_path)
    apart = {side: {k: got[side].pop(k) for k in list(got[side]) if k.startswith("lodir set")}
             for side in SIDES}
    assert got["kernel"]["lo_w get after i"] == 0x18 and got["kernel"]["lo set S"] == "EEXIST"
    assert got["overlaypc"] == got["kernel"]
    assert apart == {"kernel": dict.fromkeys(apart["kernel"], "ENOTDIR"),
                     "overlaypc": dict.fromkeys(apart["kernel"], "ESTALE")}


def _linkat_fd(fd: int, dst: Path) -> None:
    """``linkat(fd, "", AT_FDCWD, dst, AT_EMPTY_PATH)``: a name for an open file."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", -100, os.fsencode(dst), 0x1000) != 0:  # AT_FDCWD, AT_EMPTY_PATH
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def _flagged_nameless_link_session(mnt: Path) -> dict:
    """Files flagged through their fd while they had no name (an ``O_TMPFILE`` one, an
    upper file whose names went but one the mount never looked up), then given a name by
    ``linkat`` of that fd; what the name allows after."""
    got = {}
    (mnt / "d").mkdir()
    for letter, value in (("i", 0x10), ("a", 0x20)):
        fd = os.open(mnt / "d", os.O_TMPFILE | os.O_RDWR, 0o644)
        try:
            got[f"tmp set {letter}"] = _ioctl_flags(fd, value)
            got[f"tmp link {letter}"] = _errno(lambda p, m: _linkat_fd(fd, p), mnt / f"t{letter}", mnt)
            # into a lower directory: refused before it is copied up
            got[f"tmp link lodir {letter}"] = _errno(lambda p, m: _linkat_fd(fd, p),
                                                     mnt / "lodir" / f"t{letter}", mnt)
            got[f"tmp get after link {letter}"] = _ioctl_flags(fd)
            got[f"tmp unset {letter}"] = _ioctl_flags(fd, 0)
        finally:
            os.close(fd)
        got[f"tmp names {letter}"] = sorted(os.listdir(mnt))
    return got


def test_a_file_flagged_with_no_name_left_is_not_linked_as_the_kernel(tmp_path, layers_factory,
                                                                     overlay_mount, kernel_mount):
    """review48a: chattr +i/+a of an open file with no name (d7ec31d) makes its inode
    immutable/append-only on the kernel overlay, whose ``vfs_link`` then refuses to give it
    a name (EPERM); overlaypc linked it (``Namespace.link_open`` read no flags)."""
    lower = layers_factory({"l": {"lo": b"l\n", "lodir": {"x": b"x\n"}}},
                           where={"l": tmp_path}).paths[0]
    stacks: dict = {}
    try:
        got = _each_side(tmp_path, lower, _flagged_nameless_link_session, overlay_mount,
                         kernel_mount, stacks)
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["tmp link i"] == errno.EPERM and got["kernel"]["tmp set a"] == 0
    assert got["overlaypc"] == got["kernel"]
    uppers = {side: [n for n in _tree(stacks[side].upper) if n != "d"] for side in SIDES}
    assert uppers["overlaypc"] == uppers["kernel"] == []  # (nothing copied up, nothing linked)


def _metacopy_chattr_session(mnt: Path) -> dict:
    got = {}
    for name, mode in (("f_S", "+S"), ("f_i", "+i"), ("f_a", "+a"), ("f_A", "+A")):
        got["chattr " + name] = _chattr_errno(mode, mnt / name)
    got["flags"] = _lsattr(mnt, ["f_S", "f_i", "f_a", "f_A"])
    got["data"] = {n: (mnt / n).read_bytes() for n in ("f_S", "f_i", "f_a", "f_A")}
    got["append f_a"] = _errno(_open(os.O_WRONLY | os.O_APPEND, b"more\n"), mnt / "f_a", mnt)
    got["data f_a after"] = (mnt / "f_a").read_bytes()
    return got


def _holds_data(path: Path) -> bool:
    """Whether a file has any data extent (SEEK_DATA; a metacopy file has none)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
        return True
    except OSError as e:
        if e.errno == errno.ENXIO:
            return False
        raise
    finally:
        os.close(fd)


def test_chattr_under_metacopy_copies_metadata_only_as_the_kernel(tmp_path, layers_factory,
                                                                 overlay_mount, kernel_mount):
    """``chattr`` of a lower file with metacopy=on copies its metadata only, as the kernel's
    ``ovl_fileattr_set`` (``ovl_copy_up``: a metadata copy-up): the upper file is the sparse
    metacopy file, its data stays below (read through the mount the same); an append to an
    append-only one then copies the data in, keeping the flags."""
    lower = layers_factory({"l": {n: b"data\n" * 1000 for n in ("f_S", "f_i", "f_a", "f_A")}},
                           where={"l": tmp_path}).paths[0]
    stacks: dict = {}
    try:
        got = _each_side(tmp_path, lower, _metacopy_chattr_session, overlay_mount, kernel_mount,
                         stacks, KERNEL_METACOPY)
        for side in SIDES:
            up = stacks[side].upper
            got[side]["upper"] = {n: (ovl_xattr(up / n, "metacopy") is not None,
                                      _holds_data(up / n), ovl_xattr(up / n, "protattr"),
                                      _flags_of(up / n) & SHOWN)
                                  for n in sorted(os.listdir(up))}
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["upper"]["f_S"] == (True, False, None, 0x08)
    assert got["overlaypc"] == got["kernel"]
