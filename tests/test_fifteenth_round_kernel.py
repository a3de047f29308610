"""The fifteenth round's three branches together, the kernel overlay as the oracle
(review48a): speed48a's short CREATE, its known-clean mark of a new file and MKDIR's cached
directory; speed48b's short READDIRPLUS, read-only OPEN, BATCH_FORGET and one-pass listing
of a lower-only directory; parity48's flags (copy-up of sync/noatime, chattr under
metacopy, chattr of a file with no name left). Each session runs on a fresh stack per side;
every step's answer (a value or an errno name) must match.

- what may give a new file privileges again voids its clean mark: a capability set through
  its fd or through another name (a hard link), setuid by a chmod of another name or a
  fchmod of the open file; a write by another user then strips them on both;
- flags set on a directory MKDIR just made (before any lookup in it) refuse creations in it;
  an O_TMPFILE file flagged through its fd is not linked; a file flagged with no name left
  refuses changes through the hard link the mount never looked up;
- sync/noatime copied up under metacopy=on by chattr and kept through the data copy-up;
  files made in flagged directories inherit what the upper gives them;
- a cold ``find``/``grep -r`` (dentries dropped: BATCH_FORGET) of lower layers built by the
  kernel overlay (whiteouts, an opaque directory, redirects, directories in one lower
  only, hard links, a fifo, a symlink), then changes in them.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from features_support import KERNEL_METACOPY, KERNEL_REDIRECT, mount_side, new_stack
from test_protattr import SIDES, _each_side, _ioctl_flags, _unflag_all

pytestmark = [pytest.mark.mount, pytest.mark.kernel_overlay]

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
INDEX = ("redirect_dir=on", "index=on")


def _err(act):
    try:
        return act()
    except OSError as e:
        return errno.errorcode.get(e.errno, e.errno)


def _as(uid: int, act) -> int:
    """``act()`` in a child with ``uid``'s IDs and no capabilities: its errno, 0 if none."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            act()
        except OSError as e:
            code = e.errno
        except BaseException:
            code = 250
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _write_as_other(p: Path) -> int:
    """A write by uid 1000 (no CAP_FSETID) through an fd opened for it: the kernel strips
    setuid/setgid and the capability (``file_remove_privs``)."""
    fd = os.open(p, os.O_WRONLY)
    try:
        return _as(1000, lambda: os.pwrite(fd, b"x", 0))
    finally:
        os.close(fd)


def _cap(p: Path):
    return _err(lambda: os.getxattr(p, "security.capability"))


def _mode(p: Path) -> str:
    return oct(os.lstat(p).st_mode)


def _lsattr(p: Path):
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return _ioctl_flags(fd)
    finally:
        os.close(fd)


def _chattr(mode: str, p: Path) -> int:
    return subprocess.run(["chattr", mode, str(p)], capture_output=True).returncode


def _linkat_fd(fd: int, dst: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", -100, os.fsencode(dst), 0x1000) != 0:  # AT_FDCWD, AT_EMPTY_PATH
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


def _drop_dentries() -> None:
    """The kernel forgets its unused dentries and inodes (BATCH_FORGETs follow)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


def _created_session(mnt: Path) -> dict:
    old = os.umask(0)
    try:
        return _created_steps(mnt)
    finally:
        os.umask(old)


def _created_steps(mnt: Path) -> dict:
    got = {}
    d = mnt / "d"
    os.mkdir(d, 0o777)
    # known clean at its creation, then a capability through its fd
    fd = os.open(d / "f", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    got["cap f"] = _err(lambda: os.getxattr(fd, "security.capability"))
    got["setcap f"] = _err(lambda: os.setxattr(fd, "security.capability", CAP))
    os.close(fd)
    got["write f as 1000"] = _write_as_other(d / "f")
    got["cap f after"] = _cap(d / "f")
    # setuid through another name (a hard link), the file open meanwhile
    fd = os.open(d / "g", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    got["cap g"] = _err(lambda: os.getxattr(fd, "security.capability"))
    os.link(d / "g", d / "g2")
    os.chmod(d / "g2", 0o4777)
    got["write g as 1000"] = _write_as_other(d / "g")
    got["mode g after"] = _mode(d / "g")
    os.close(fd)
    # a capability through another name
    fd = os.open(d / "h", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    got["cap h"] = _err(lambda: os.getxattr(fd, "security.capability"))
    os.link(d / "h", d / "h2")
    os.setxattr(d / "h2", "security.capability", CAP)
    got["write h as 1000"] = _write_as_other(d / "h")
    got["cap h after"] = _cap(d / "h")
    os.close(fd)
    # setuid/setgid by a fchmod of the open file (the short SETATTR)
    fd = os.open(d / "k", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    got["cap k"] = _err(lambda: os.getxattr(fd, "security.capability"))
    os.fchmod(fd, 0o6777)
    got["write k as 1000"] = _write_as_other(d / "k")
    got["mode k after"] = _mode(d / "k")
    os.close(fd)
    # flags of directories MKDIR made, set before and after a lookup in them
    os.mkdir(d / "e", 0o755)
    (d / "e" / "one").write_bytes(b"1")
    got["chattr +a e"] = _chattr("+a", d / "e")
    got["create in +a"] = _err(lambda: os.close(os.open(d / "e" / "two", os.O_CREAT | os.O_WRONLY, 0o644)))
    got["unlink in +a"] = _err(lambda: os.unlink(d / "e" / "one"))
    got["chattr +i e"] = _chattr("-a", d / "e") or _chattr("+i", d / "e")
    got["create in +i"] = _err(lambda: os.close(os.open(d / "e" / "three", os.O_CREAT | os.O_WRONLY, 0o644)))
    got["chattr -i e"] = _chattr("-i", d / "e")
    got["create after -i"] = _err(lambda: os.close(os.open(d / "e" / "four", os.O_CREAT | os.O_WRONLY, 0o644)))
    os.mkdir(d / "n", 0o755)
    got["chattr +i n"] = _chattr("+i", d / "n")
    got["create in new +i"] = _err(lambda: os.close(os.open(d / "n" / "x", os.O_CREAT | os.O_WRONLY, 0o644)))
    got["mkdir in new +i"] = _err(lambda: os.mkdir(d / "n" / "y"))
    got["chattr -i n"] = _chattr("-i", d / "n")
    # O_TMPFILE: known clean, flagged through its fd, then linked
    tfd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o644)
    try:
        got["cap tmp"] = _err(lambda: os.getxattr(tfd, "security.capability"))
        got["tmp +i"] = _ioctl_flags(tfd, 0x10)
        got["link tmp +i"] = _err(lambda: _linkat_fd(tfd, d / "tl"))
        got["tmp -i"] = _ioctl_flags(tfd, 0)
        got["link tmp"] = _err(lambda: _linkat_fd(tfd, d / "tl"))
        got["open tl w"] = _err(lambda: os.close(os.open(d / "tl", os.O_WRONLY)))
    finally:
        os.close(tfd)
    got["find"] = sorted(str(Path(q).relative_to(mnt)) for q in subprocess.run(
        ["find", str(d)], capture_output=True, text=True).stdout.split())
    got["grep"] = sorted(subprocess.run(["grep", "-rc", "x", str(d)], capture_output=True,
                                        text=True).stdout.replace(str(mnt), "M").split())
    got["rm -rf"] = subprocess.run(["rm", "-rf", str(d)], capture_output=True).returncode
    got["ls"] = sorted(os.listdir(mnt))
    return got


@pytest.mark.parametrize("opts", [KERNEL_REDIRECT, KERNEL_METACOPY, INDEX])
def test_new_files_and_directories_as_the_kernel(opts, tmp_path, layers_factory, overlay_mount,
                                                  kernel_mount):
    lower = layers_factory({"l": {"lo": b"l\n"}}, where={"l": tmp_path}).paths[0]
    try:
        got = _each_side(tmp_path, lower, _created_session, overlay_mount, kernel_mount, opts=opts)
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["cap f after"] == "ENODATA" and got["kernel"]["link tmp +i"] == "EPERM"
    assert got["overlaypc"] == got["kernel"]


def _flags_session(mnt: Path) -> dict:
    got = {}
    for name, mode in (("f_S", "+S"), ("f_A", "+A"), ("f_a", "+a"), ("f_i", "+i"), ("h1", "+S"),
                       ("dS", "+S"), ("dA", "+A")):
        got["chattr " + name] = _chattr(mode, mnt / name)
        got["lsattr " + name] = _lsattr(mnt / name)
    got["read f_i"] = (mnt / "f_i").read_bytes()
    for name in ("f_S", "f_A", "h1"):
        got["write " + name] = _err(lambda: (mnt / name).write_bytes(b"new " + name.encode()))
        got["lsattr after write " + name] = _lsattr(mnt / name)
        got["data " + name] = (mnt / name).read_bytes()
    got["lsattr h2"] = _lsattr(mnt / "h2")
    got["append f_a"] = _err(lambda: open(mnt / "f_a", "ab").write(b"more"))
    got["lsattr f_a after"] = _lsattr(mnt / "f_a")
    got["data f_a"] = (mnt / "f_a").read_bytes()
    for d in ("dS", "dA"):
        got["create in " + d] = _err(lambda: (mnt / d / "new").write_bytes(b"n"))
        got["lsattr new in " + d] = _lsattr(mnt / d / "new")
        got["mkdir in " + d] = _err(lambda: os.mkdir(mnt / d / "sub"))
        got["lsattr sub in " + d] = _lsattr(mnt / d / "sub")
        got["chmod c in " + d] = _err(lambda: os.chmod(mnt / d / "c", 0o600))
        got["lsattr c in " + d] = _lsattr(mnt / d / "c")
        got["list " + d] = sorted(os.listdir(mnt / d))
    for name in ("f_a", "f_i"):
        _chattr("-a", mnt / name) or _chattr("-i", mnt / name)
    got["write f_i"] = _err(lambda: (mnt / "f_i").write_bytes(b"after"))
    got["lsattr f_i end"] = _lsattr(mnt / "f_i")
    return got


@pytest.mark.parametrize("opts", [KERNEL_REDIRECT, KERNEL_METACOPY, INDEX, INDEX + ("metacopy=on",)])
def test_flags_copied_up_and_inherited_as_the_kernel(opts, tmp_path, layers_factory, overlay_mount,
                                                     kernel_mount):
    spec: dict = {n: n.encode() * 3 for n in ("f_S", "f_A", "f_a", "f_i", "h1")}
    spec["dS"] = {"c": b"c"}
    spec["dA"] = {"c": b"c"}
    lower = layers_factory({"l": spec}, where={"l": tmp_path}).paths[0]
    os.link(lower / "h1", lower / "h2")
    try:
        got = _each_side(tmp_path, lower, _flags_session, overlay_mount, kernel_mount, opts=opts)
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["lsattr after write f_S"] == 0x08
    assert got["overlaypc"] == got["kernel"]


def _flagged_unnamed_session(mnt: Path) -> dict:
    """A file with two names, one the mount never looked up in this life (dentries
    dropped), flagged through the fd of the other after its removal."""
    got = {}
    for letter, value in (("i", 0x10), ("a", 0x20)):
        d = mnt / f"d{letter}"
        os.mkdir(d)
        (d / "f").write_bytes(b"data")
        os.link(d / "f", d / "g")
        _drop_dentries()
        fd = os.open(d / "f", os.O_RDWR)
        try:
            os.unlink(d / "f")
            got[f"{letter} set"] = _ioctl_flags(fd, value)
            got[f"{letter} lsattr g"] = _lsattr(d / "g")
            got[f"{letter} read g"] = _err(lambda: (d / "g").read_bytes())
            got[f"{letter} open g w"] = _err(lambda: os.close(os.open(d / "g", os.O_WRONLY)))
            got[f"{letter} open g a"] = _err(lambda: os.close(os.open(d / "g", os.O_WRONLY | os.O_APPEND)))
            got[f"{letter} chmod g"] = _err(lambda: os.chmod(d / "g", 0o600))
            got[f"{letter} fchmod"] = _err(lambda: os.fchmod(fd, 0o600))
            got[f"{letter} setxattr g"] = _err(lambda: os.setxattr(d / "g", "user.x", b"1"))
            got[f"{letter} unlink g"] = _err(lambda: os.unlink(d / "g"))
            got[f"{letter} rename g"] = _err(lambda: os.rename(d / "g", d / "g3"))
            got[f"{letter} link g"] = _err(lambda: os.link(d / "g", d / "h"))
            got[f"{letter} write fd"] = _err(lambda: os.pwrite(fd, b"w", 0))
            got[f"{letter} unset"] = _ioctl_flags(fd, 0)
            got[f"{letter} unlink g after"] = _err(lambda: os.unlink(d / "g"))
        finally:
            os.close(fd)
        got[f"{letter} names"] = sorted(os.listdir(d))
    return got


@pytest.mark.parametrize("opts", [KERNEL_REDIRECT, INDEX])
def test_a_file_flagged_with_no_name_left_through_its_other_name_as_the_kernel(
        opts, tmp_path, layers_factory, overlay_mount, kernel_mount):
    lower = layers_factory({"l": {"lo": b"l\n"}}, where={"l": tmp_path}).paths[0]
    try:
        got = _each_side(tmp_path, lower, _flagged_unnamed_session, overlay_mount, kernel_mount,
                         opts=opts)
    finally:
        _unflag_all(tmp_path)
    assert got["kernel"]["i unlink g"] == "EPERM" and got["kernel"]["a open g a"] is None
    assert got["overlaypc"] == got["kernel"]


def _walk(root: Path) -> list:
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out.append((os.path.relpath(p, root), oct(st.st_mode), st.st_nlink, st.st_size, st.st_ino))
    return sorted(out)


def _find(mnt: Path) -> list:
    """``find``'s view, the root left out (its number is each side's own upper root's)."""
    lines = subprocess.run(["find", str(mnt), "-mindepth", "1", "-printf", "%P %y %n %s %i\n"],
                           capture_output=True, text=True).stdout.splitlines()
    return sorted(lines)


def _listing_session(mnt: Path) -> dict:
    got = {}
    _drop_dentries()
    got["walk cold"] = _walk(mnt)
    got["find"] = _find(mnt)
    _drop_dentries()
    got["grep"] = sorted(subprocess.run(["grep", "-rc", "a", str(mnt)], capture_output=True,
                                        text=True).stdout.replace(str(mnt), "M").splitlines())
    _drop_dentries()
    got["find again"] = _find(mnt)
    got["mkdir in only1"] = _err(lambda: os.mkdir(mnt / "only1" / "new"))
    got["create in only1/new"] = _err(lambda: (mnt / "only1" / "new" / "f").write_bytes(b"a"))
    got["rm -rf only2"] = subprocess.run(["rm", "-rf", str(mnt / "only2")]).returncode
    got["rm -rf op"] = subprocess.run(["rm", "-rf", str(mnt / "op")]).returncode
    got["mv moved moved2"] = _err(lambda: os.rename(mnt / "moved", mnt / "moved2"))
    _drop_dentries()
    got["walk after"] = [w[:4] for w in _walk(mnt)]  # (new upper objects' numbers differ)
    return got


@pytest.mark.parametrize("opts", [KERNEL_REDIRECT, KERNEL_METACOPY])
def test_cold_listings_of_lower_layers_as_the_kernel(opts, tmp_path, overlay_mount, kernel_mount):
    """Two lower layers, the top one a former upper the kernel overlay wrote: a file
    whited out, a directory removed, one renamed (redirect), one removed and made again
    (opaque), directories in it alone (a fifo, a symlink, hard links, a renamed one)."""
    base, l1, wk = tmp_path / "L2", tmp_path / "L1", tmp_path / "wk"
    for d in (base, l1, wk):
        d.mkdir()
    for d in ("mg/sub", "gone", "orig/in", "op", "both"):
        (base / d).mkdir(parents=True)
    for f in ("mg/a", "mg/b", "mg/sub/x", "gone/g", "orig/o", "orig/in/i", "op/p", "both/q", "top"):
        (base / f).write_bytes(b"aa " + f.encode())
    os.link(base / "mg" / "a", base / "mg" / "alink")
    m = kernel_mount([base], l1, wk, KERNEL_REDIRECT)
    try:
        os.unlink(m / "mg" / "b")
        shutil.rmtree(m / "gone")
        os.rename(m / "orig", m / "moved")
        shutil.rmtree(m / "op")
        os.mkdir(m / "op")
        (m / "op" / "newp").write_bytes(b"a new")
        os.makedirs(m / "only1" / "deep")
        (m / "only1" / "deep" / "z").write_bytes(b"za")
        os.mkfifo(m / "only1" / "fifo")
        os.symlink("deep/z", m / "only1" / "sym")
        (m / "only1" / "h").write_bytes(b"ha")
        os.link(m / "only1" / "h", m / "only1" / "h2")
        os.mkdir(m / "only2")
        (m / "only2" / "w").write_bytes(b"wa")
        os.unlink(m / "only2" / "w")
        os.rename(m / "only1" / "deep", m / "only1" / "deep2")
    finally:
        subprocess.run(["umount", str(m)], check=True)
    shutil.rmtree(wk)
    got = {}
    for side in SIDES:
        (tmp_path / side).mkdir()
        s = new_stack([l1, base], tmp_path / side, side)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, opts)
        try:
            got[side] = _listing_session(mnt)
        finally:
            unmount()
    assert any(w[0] == "only1/deep2/z" for w in got["kernel"]["walk cold"])
    assert got["overlaypc"] == got["kernel"]
