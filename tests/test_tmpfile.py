"""``open(dir, O_TMPFILE)`` through the mount (FUSE_TMPFILE) and ``linkat`` of such a file.

The kernel overlay makes an unnamed file in the upper directory (copied up first) owned by
the caller, and names it later by ``linkat(fd, "", dirfd, name, AT_EMPTY_PATH)`` or by
its ``/proc/self/fd`` link with ``AT_SYMLINK_FOLLOW``; a file opened with ``O_EXCL``
can never be linked (ENOENT). overlaypc answered every TMPFILE request ENOSYS (the kernel
then answers EOPNOTSUPP). Checked here:

- differentially against the kernel overlay (``kernel_mount``), each side over its own
  copy of one lower: contents, modes, owners, link counts, inode identities, every
  ``linkat`` result and errno, and the upper after unmount; as root and as another user
  (in a world-writable and in a setgid directory, and under a default ACL), with
  ``index=on`` and ``metacopy=on`` as well;
- in-process (``core_driver``): the node of an unnamed file is reached by its handle
  (attributes with no link, chmod, truncate), LINK names that node (the same nodeid), an
  ``O_EXCL`` one is refused and leaves the table as it was, the open-file budget counts
  it, ``xattr_permissions`` keeps its owner in the override xattr;
- a daemon killed with such a file open leaves nothing of it in the upper or workdir.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import pickle
import stat
import subprocess
from pathlib import Path

import pytest

import helpers
import reliability_support as rs
from core_driver import CoreDriver
from overlaypc.engine.ops import Request
from upper_support import stack_options

_libc = ctypes.CDLL(None, use_errno=True)
_AT_EMPTY_PATH, _AT_SYMLINK_FOLLOW = 0x1000, 0x400

LOWER = {"d/f": "lower f\n", "e/gone": "gone\n", "e/keep": "keep\n", "open/x": "x\n",
         "sg/y": "y\n", "acl/z": "z\n"}
OTHER = (1000, 1000)
GROUP = 2000


def _linkat(src_fd: int, src: str, dst: str, flags: int) -> None:
    if _libc.linkat(src_fd, os.fsencode(src), -100, os.fsencode(dst), flags) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def link_empty(fd: int, dst: str) -> None:
    """``linkat(fd, "", AT_FDCWD, dst, AT_EMPTY_PATH)``."""
    _linkat(fd, "", dst, _AT_EMPTY_PATH)


def link_proc(fd: int, dst: str) -> None:
    """``linkat(AT_FDCWD, "/proc/self/fd/N", AT_FDCWD, dst, AT_SYMLINK_FOLLOW)`` (Python's
    ``os.link`` calls link(2), which does not follow the magic link: EXDEV)."""
    _linkat(-100, f"/proc/self/fd/{fd}", dst, _AT_SYMLINK_FOLLOW)


def _build_lower(base: Path) -> Path:
    lower = helpers.build_layer(base / "lower", LOWER)
    os.chmod(lower / "open", 0o777)
    os.chown(lower / "sg", 0, GROUP)
    os.chmod(lower / "sg", 0o2777)
    os.chmod(lower / "acl", 0o777)
    subprocess.run(["setfacl", "-d", "-m", f"u:{OTHER[0]}:rw,g::r,o::-,m::rw", str(lower / "acl")],
                   check=True, capture_output=True)
    return lower


def _fstat(fd: int) -> tuple:
    st = os.fstat(fd)
    return oct(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, st.st_size


def _stat(path: str) -> tuple:
    st = os.lstat(path)
    return oct(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, st.st_size


def _try(out: list, label: str, act) -> None:
    try:
        got = act()
        out.append((label, "ok" if got is None else got))
    except OSError as e:
        out.append((label, errno.errorcode[e.errno]))


def scenario_root(m: str) -> list:
    """As root: unnamed files in a lower-only directory, linked both ways, into other
    directories, over an existing name and over a whiteout; O_EXCL; refused opens."""
    out: list = []
    os.umask(0o022)
    fd = os.open(f"{m}/d", os.O_TMPFILE | os.O_RDWR, 0o666)
    out.append(("made", _fstat(fd), sorted(os.listdir(f"{m}/d"))))
    os.write(fd, b"hello tmpfile")
    os.fchmod(fd, 0o604)
    os.ftruncate(fd, 9)
    out.append(("changed", _fstat(fd), os.pread(fd, 100, 0)))
    _try(out, "link d/n1", lambda: link_empty(fd, f"{m}/d/n1"))
    ino = os.fstat(fd).st_ino
    out.append(("linked", _fstat(fd), _stat(f"{m}/d/n1"), os.lstat(f"{m}/d/n1").st_ino == ino,
                open(f"{m}/d/n1", "rb").read()))
    _try(out, "over d/f", lambda: link_empty(fd, f"{m}/d/f"))
    _try(out, "proc e/n2", lambda: link_proc(fd, f"{m}/e/n2"))
    os.unlink(f"{m}/e/gone")
    _try(out, "over whiteout", lambda: link_proc(fd, f"{m}/e/gone"))
    os.pwrite(fd, b"HELLO", 0)
    out.append(("three", _fstat(fd), _stat(f"{m}/e/gone"), open(f"{m}/e/gone", "rb").read(),
                sorted(os.listdir(f"{m}/e"))))
    os.close(fd)
    fx = os.open(m, os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
    os.write(fx, b"never named")
    _try(out, "excl empty", lambda: link_empty(fx, f"{m}/x"))
    _try(out, "excl proc", lambda: link_proc(fx, f"{m}/x"))
    out.append(("excl", _fstat(fx), sorted(os.listdir(m))))
    os.close(fx)
    fy = os.open(m, os.O_TMPFILE | os.O_WRONLY, 0o640)
    _try(out, "link y", lambda: link_proc(fy, f"{m}/y"))
    os.unlink(f"{m}/y")
    _try(out, "relink", lambda: link_proc(fy, f"{m}/y2"))
    out.append(("unnamed again", _fstat(fy)))
    os.close(fy)
    fz = os.open(f"{m}/e", os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fz, b"dropped")
    os.close(fz)  # never named: nothing stays
    _try(out, "on a file", lambda: os.open(f"{m}/d/f", os.O_TMPFILE | os.O_RDWR, 0o600))
    _try(out, "read-only", lambda: os.open(f"{m}/d", os.O_TMPFILE | os.O_RDONLY, 0o600))
    _try(out, "missing", lambda: os.open(f"{m}/none", os.O_TMPFILE | os.O_RDWR, 0o600))
    out.append(("tree", sorted(os.listdir(m)), sorted(os.listdir(f"{m}/d")), sorted(os.listdir(f"{m}/e"))))
    return out


def scenario_other(m: str) -> list:
    """As uid/gid 1000 (in a fork): unnamed files in a world-writable directory, in a
    setgid one of group 2000 (setgid bits asked for), and under a default ACL; each linked."""
    out: list = []
    os.umask(0o002)
    for where, mode in (("open", 0o640), ("sg", 0o2775), ("acl", 0o666)):
        fd = os.open(f"{m}/{where}", os.O_TMPFILE | os.O_RDWR, mode)
        os.write(fd, where.encode())
        out.append((where, _fstat(fd)))
        _try(out, f"link {where}", lambda: link_proc(fd, f"{m}/{where}/t"))
        out.append((where, _fstat(fd), _stat(f"{m}/{where}/t"),
                    _acl(f"{m}/{where}/t")))
        os.close(fd)
    return out


def _acl(path: str) -> bytes | None:
    try:
        return os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return None


def _as_other(scenario, m: str) -> list:
    """``scenario`` of mount ``m`` in a child process with uid/gid 1000 (no supplementary
    groups), from ``m`` as its working directory."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.close(r)
            os.chdir(m)  # (as root: pytest's directories above are 0700)
            os.setgroups([])
            os.setresgid(OTHER[1], OTHER[1], OTHER[1])
            os.setresuid(OTHER[0], OTHER[0], OTHER[0])
            result = scenario(".")
        except BaseException as e:  # noqa: BLE001 (reported to the parent)
            result, code = repr(e), 1
        with os.fdopen(w, "wb") as f:
            pickle.dump(result, f)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    result = pickle.loads(data)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


#: upper xattrs only the kernel writes, whatever the files: ``uuid`` on the upper root
#: (its ``uuid=`` default), ``impure`` on a directory holding copied-up objects
_KERNEL_ONLY = ("trusted.overlay.uuid", "trusted.overlay.impure")


def _upper_tree(upper: Path) -> dict:
    """The upper as ``tree_snapshot`` shows it, origin file handles left out (each side
    copied up from its own copy of the lower), and ``_KERNEL_ONLY``."""
    tree = helpers.tree_snapshot(upper)
    return {rel: dataclasses.replace(e, xattrs=tuple(
        (n, b"<handle>" if n.endswith("overlay.origin") else v) for n, v in e.xattrs
        if n not in _KERNEL_ONLY)) for rel, e in tree.items()}


RUNS = {"plain": ("", ()), "index": ("index=on", ("index=on",)),
        "metacopy": ("metacopy=on,redirect_dir=on", ("redirect_dir=on", "metacopy=on"))}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_tmpfile_against_the_kernel_overlay(run, tmp_path, overlay_mount, kernel_mount):
    """Every step of ``scenario_root`` and ``scenario_other`` answers as on the kernel
    overlay, and the uppers match after unmount. Before: O_TMPFILE answered EOPNOTSUPP."""
    ours_opts, kernel_opts = RUNS[run]
    results, uppers = [], []
    for side in ("kernel", "ours"):
        base = tmp_path / side
        lower = _build_lower(base)
        upper, work = base / "upper", base / "work"
        upper.mkdir()
        work.mkdir()
        if side == "kernel":
            mnt = kernel_mount([lower], upper, work, kernel_opts)
            results.append((scenario_root(str(mnt)), _as_other(scenario_other, str(mnt))))
            helpers.force_unmount(mnt)
        else:
            mo = overlay_mount(stack_options([lower], upper, work, ours_opts))
            results.append((scenario_root(str(mo.path)), _as_other(scenario_other, str(mo.path))))
            mo.unmount()
        uppers.append(_upper_tree(upper))
    kernel, ours = results
    assert ("made", ("0o100644", 0, 0, 0, 0), ["f"]) in kernel[0]  # (the oracle does it)
    assert ours[0] == kernel[0]
    assert ours[1] == kernel[1]
    assert uppers[1] == uppers[0], helpers.diff_snapshots(uppers[0], uppers[1], ("kernel", "ours"))


def test_a_killed_daemon_leaves_no_unnamed_file(tmp_path, overlay_mount):
    """SIGKILL of the daemon while an unnamed file is open (written, chmodded): the upper
    holds the copied-up directory only, and workdir/work nothing (the file never had a
    name: no detour through the workdir, as another user's named objects take)."""
    lower = _build_lower(tmp_path)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(stack_options([lower], upper, work))
    fd = os.open(m.path / "d", os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"x" * 100000)
        os.fchmod(fd, 0o4755)
        rs.kill_daemon(m)
    finally:
        with contextlib.suppress(OSError):  # (ENOTCONN from the dead mount; closed all the same)
            os.close(fd)
    assert sorted(p.name for p in upper.iterdir()) == ["d"]
    assert list((upper / "d").iterdir()) == []
    assert list((work / "work").iterdir()) == []


# -- in-process (core_driver) ---------------------------------------------------------------
def test_the_unnamed_node_is_reached_by_its_handle_and_linked(tmp_path):
    """TMPFILE in a lower-only directory copies it up; the node has no name: GETATTR (by
    node and by handle) shows no link, SETATTR by node chmods and truncates it through its
    handle, and LINK names that node (the same nodeid, which a lookup of the name gives),
    into another lower-only directory (copied up then)."""
    helpers.build_layer(tmp_path / "lower", {"d/f": "f\n", "e/g": "g\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        d = drv.lookup(drv.root(), "d")
        node, fh = drv.tmpfile(d, os.O_TMPFILE | os.O_RDWR, 0o640)
        assert (tmp_path / "upper" / "d").is_dir() and sorted(os.listdir(tmp_path / "upper" / "d")) == []
        assert node.attr.nlink == 0 and stat.S_IMODE(node.attr.mode) == 0o640
        assert drv.write(fh, b"0123456789", 0) == 10
        assert drv.getattr(node).nlink == 0 and drv.fstat(fh).size == 10
        after = drv.setattr(node, mode=0o600, size=4)
        assert (stat.S_IMODE(after.mode), after.size, after.nlink) == (0o600, 4, 0)
        assert drv.read(fh, 100, 0) == b"0123"
        e = drv.lookup(drv.root(), "e")
        linked = drv.link(node, e, "t")
        assert linked.nodeid == node.nodeid and linked.attr.nlink == 1
        assert drv.lookup(e, "t").nodeid == node.nodeid
        assert (tmp_path / "upper" / "e" / "t").read_bytes() == b"0123"
        assert stat.S_IMODE((tmp_path / "upper" / "e" / "t").stat().st_mode) == 0o600
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()


def test_an_o_excl_unnamed_file_is_never_linked(tmp_path):
    """LINK of an O_EXCL unnamed file answers ENOENT (the upper filesystem refuses it, as
    the kernel's VFS does before asking) and leaves no name, no reference."""
    helpers.build_layer(tmp_path / "lower", {"d/f": "f\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        root = drv.root()
        node, fh = drv.tmpfile(root, os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
        with pytest.raises(OSError) as e:
            drv.link(node, root, "x")
        assert e.value.errno == errno.ENOENT
        assert drv.lookup(root, "x") is None
        assert sorted(os.listdir(tmp_path / "upper")) == []
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()


def test_an_unnamed_file_counts_in_the_open_file_budget(tmp_path):
    """With open files holding their whole share of fds, TMPFILE answers ENFILE before it
    changes anything (its directory not copied up)."""
    helpers.build_layer(tmp_path / "lower", {"d/f": "f\n"})
    drv = CoreDriver.in_dir(tmp_path)
    try:
        d = drv.lookup(drv.root(), "d")
        node, fh = drv.tmpfile(drv.root(), os.O_TMPFILE | os.O_RDWR, 0o600)
        assert drv.fs.open_fds() == 1
        drv.fs.open_file_fds = 1
        with pytest.raises(OSError) as e:
            drv.tmpfile(d, os.O_TMPFILE | os.O_RDWR, 0o600)
        assert e.value.errno == errno.ENFILE
        assert not (tmp_path / "upper" / "d").exists()
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()


def test_xattr_permissions_keeps_an_unnamed_files_owner_in_the_xattr(tmp_path):
    """Under ``xattr_permissions=2`` another user's unnamed file is the daemon's on disk,
    with the caller's owner and mode (setuid kept) in the override xattr, set before the
    file is handed out; linked, its name shows them."""
    helpers.build_layer(tmp_path / "lower", {"d/f": "f\n"})
    drv = CoreDriver.in_dir(tmp_path, xattr_permissions=2)
    other = Request(uid=1000, gid=1000, pid=os.getpid(), umask=0o022)
    try:
        d = drv.lookup(drv.root(), "d")
        node, fh = drv.tmpfile(d, os.O_TMPFILE | os.O_RDWR, 0o4755, other)
        assert (node.attr.uid, node.attr.gid, stat.S_IMODE(node.attr.mode)) == (1000, 1000, 0o4755)
        linked = drv.link(node, d, "t")
        assert (linked.attr.uid, linked.attr.gid, stat.S_IMODE(linked.attr.mode)) == (1000, 1000, 0o4755)
        real = os.lstat(tmp_path / "upper" / "d" / "t")
        assert (real.st_uid, real.st_gid, stat.S_IMODE(real.st_mode)) == (0, 0, 0o755)
        assert os.getxattr(tmp_path / "upper" / "d" / "t", "user.fuseoverlayfs.override_stat") \
            == b"1000:1000:4755"
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()
