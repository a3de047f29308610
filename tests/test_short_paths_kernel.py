"""The short LOOKUP, UNLINK, SETATTR, capability GETXATTR and RELEASE together, through
mounts, against the kernel overlay (review47a): untar, chmod/chown/touch, rm -rf in an
upper-only and an opaque directory, open files unlinked and changed through their fds,
hard links losing names between the requests, names made again after their removal, a
merged directory and copied-up files moved into an upper-only directory. Every step's
answer (a value or an errno), the merged tree after the sequence and the upper layer left
on disk must match.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import tarfile

import pytest

import helpers
from upper_support import stack_options

pytestmark = [pytest.mark.mount, pytest.mark.kernel_overlay]

T = 1_300_000_000_123_456_789
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"


def _tarball(path) -> None:
    """An archive as an untar meets it: files (setuid, owners, old mtimes), a directory,
    a symlink, a hard link pair, a fifo."""
    src = path.parent / "src"
    src.mkdir()
    (src / "d").mkdir()
    for name, mode in (("f1", 0o4755), ("f2", 0o644), ("d/f3", 0o2750), ("d/f4", 0o600)):
        (src / name).write_bytes(name.encode() * 10)
        os.chmod(src / name, mode)
        os.chown(src / name, 1000, 1000 + len(name))
        os.utime(src / name, ns=(T, T))
    os.link(src / "f2", src / "d" / "f2link")
    os.symlink("f1", src / "sym")
    os.mkfifo(src / "fifo", 0o640)
    with tarfile.open(path, "w") as tar:
        for name in ("f1", "f2", "d", "sym", "fifo"):
            tar.add(src / name, arcname=name)


#: xattrs whose values name the other side's own lower copy or mount: compared by name
_OWN_VALUES = ("trusted.overlay.origin", "trusted.overlay.uuid")


def _upper(base) -> dict:
    """The upper layer as left on disk, xattr values naming the lower copy left out."""
    snap = helpers.tree_snapshot(base / "upper")
    return {n: dataclasses.replace(e, xattrs=tuple((k, b"*" if k in _OWN_VALUES else v)
                                                   for k, v in e.xattrs))
            for n, e in snap.items()}


def _lower(base) -> None:
    lower = base / "lower"
    for d in ("mg/sub", "mg2", "gone", "cp"):
        (lower / d).mkdir(parents=True)
    (lower / "mg" / "lo").write_bytes(b"lower lo\n")
    (lower / "mg" / "sub" / "x").write_bytes(b"x\n")
    (lower / "mg2" / "lo").write_bytes(b"lower lo2\n")
    (lower / "gone" / "a").write_bytes(b"lower a\n")
    (lower / "gone" / "b").write_bytes(b"lower b\n")
    (lower / "cp" / "f").write_bytes(b"copied\n")
    (lower / "hl1").write_bytes(b"linked\n")
    os.link(lower / "hl1", lower / "mg" / "hl2")


def _run(base, mount, tarball) -> tuple[list, dict]:
    _lower(base)
    for d in ("upper", "work"):
        (base / d).mkdir()
    m = mount(base / "lower", base / "upper", base / "work")
    log: list = []

    def step(what, fn):
        try:
            res = ("ok", fn())
        except OSError as e:
            res = ("err", errno.errorcode.get(e.errno, e.errno))
        log.append((what, res))

    def shown(path):
        st = os.lstat(path)
        return (oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, st.st_size)

    def fshown(fd, mtime=False):
        st = os.fstat(fd)
        return (oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, st.st_size) \
            + ((st.st_mtime_ns,) if mtime else ())

    up = m / "up"
    step("mkdir up", lambda: os.mkdir(up, 0o755))
    r = subprocess.run(["tar", "-x", "-p", "--same-owner", "-f", str(tarball), "-C", str(up)],
                       capture_output=True, text=True)
    log.append(("untar", r.returncode, r.stderr))
    for name in ("f1", "f2", "d", "d/f3", "d/f4", "d/f2link", "sym", "fifo"):
        step(f"stat {name}", lambda: shown(up / name))
    # again over what is there: tar removes each name before it makes it anew
    step("chmod f2", lambda: os.chmod(up / "f2", 0o600))
    r = subprocess.run(["tar", "-x", "-p", "--same-owner", "-f", str(tarball), "-C", str(up)],
                       capture_output=True, text=True)
    log.append(("untar again", r.returncode, r.stderr))
    for name in ("f1", "f2", "d/f2link", "sym", "fifo"):
        step(f"stat {name} again", lambda: shown(up / name))
    # chmod, chown, touch by name of what the untar made
    step("chmod f1", lambda: os.chmod(up / "f1", 0o6711))
    step("chown f1", lambda: os.chown(up / "f1", 7, 8))
    step("stat f1", lambda: shown(up / "f1"))
    step("touch d/f3", lambda: os.utime(up / "d" / "f3", ns=(T, T + 3)))
    step("chown d/f2link", lambda: os.chown(up / "d" / "f2link", 9, 9))
    step("stat f2", lambda: shown(up / "f2"))

    # an open file unlinked, then changed through its fd; its name made again meanwhile
    fd = os.open(up / "o", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"open")
    step("setxattr cap o", lambda: os.setxattr(fd, "security.capability", CAP))
    step("fchmod o", lambda: os.fchmod(fd, 0o4755))
    step("unlink o", lambda: os.unlink(up / "o"))
    step("lookup o", lambda: shown(up / "o"))
    step("fchmod o unlinked", lambda: os.fchmod(fd, 0o6755))
    step("fchown o unlinked", lambda: os.fchown(fd, 3, 4))
    step("cap o", lambda: os.getxattr(fd, "security.capability"))
    step("futimens o", lambda: os.utime(fd, ns=(T, T + 9)))
    step("fstat o", lambda: fshown(fd, True))
    fd2 = os.open(up / "o", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    step("fchmod o again", lambda: os.fchmod(fd2, 0o640))
    step("fstat o again", lambda: fshown(fd2))
    step("fstat o old", lambda: fshown(fd, True))
    step("unlink o again", lambda: os.unlink(up / "o"))
    os.close(fd2)
    step("close old o", lambda: os.close(fd))

    # hard links losing their names one by one while open
    fd = os.open(up / "h1", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    step("link h2", lambda: os.link(up / "h1", up / "h2"))
    step("link d/h3", lambda: os.link(up / "h1", up / "d" / "h3"))
    step("fchmod h (3 links)", lambda: os.fchmod(fd, 0o700))
    step("unlink h2", lambda: os.unlink(up / "h2"))
    step("fstat h (2 links)", lambda: fshown(fd))
    step("fchown h (2 links)", lambda: os.fchown(fd, 5, 6))
    step("unlink h1", lambda: os.unlink(up / "h1"))
    step("fchmod h (1 link)", lambda: os.fchmod(fd, 0o710))
    step("stat d/h3", lambda: shown(up / "d" / "h3"))
    step("unlink d/h3", lambda: os.unlink(up / "d" / "h3"))
    step("fchmod h (0 links)", lambda: os.fchmod(fd, 0o711))
    step("fstat h (0 links)", lambda: fshown(fd))
    os.close(fd)

    # an opaque directory over a removed merged one
    step("rm gone", lambda: subprocess.run(["rm", "-rf", str(m / "gone")], check=True).returncode)
    step("mkdir gone", lambda: os.mkdir(m / "gone", 0o750))
    step("lookup gone/a", lambda: shown(m / "gone" / "a"))
    step("create gone/a", lambda: os.close(os.open(m / "gone" / "a", os.O_CREAT | os.O_WRONLY, 0o600)))
    step("chmod gone/a", lambda: os.chmod(m / "gone" / "a", 0o644))
    step("stat gone/a", lambda: shown(m / "gone" / "a"))
    step("unlink gone/a", lambda: os.unlink(m / "gone" / "a"))
    step("lookup gone/a again", lambda: shown(m / "gone" / "a"))
    step("unlink gone/b", lambda: os.unlink(m / "gone" / "b"))
    step("list gone", lambda: sorted(os.listdir(m / "gone")))
    step("untar in gone", lambda: subprocess.run(
        ["tar", "-x", "-f", str(tarball), "-C", str(m / "gone")], check=True).returncode)
    step("rm -rf gone/d", lambda: subprocess.run(["rm", "-rf", str(m / "gone" / "d")]).returncode)
    step("list gone after", lambda: sorted(os.listdir(m / "gone")))

    # copied-up files moved into the upper-only directory, then removed
    step("chmod cp/f", lambda: os.chmod(m / "cp" / "f", 0o600))
    step("mv cp/f up/cf", lambda: os.rename(m / "cp" / "f", up / "cf"))
    step("stat up/cf", lambda: shown(up / "cf"))
    step("unlink up/cf", lambda: os.unlink(up / "cf"))
    step("lookup cp/f", lambda: shown(m / "cp" / "f"))
    step("mv hl1 up/hl1", lambda: os.rename(m / "hl1", up / "hl1"))
    step("stat up/hl1", lambda: shown(up / "hl1"))
    step("stat mg/hl2", lambda: shown(m / "mg" / "hl2"))
    step("unlink up/hl1", lambda: os.unlink(up / "hl1"))
    step("stat mg/hl2 after", lambda: shown(m / "mg" / "hl2"))
    # a merged directory moved into it (EXDEV without redirect_dir)
    step("mv mg up/mg", lambda: os.rename(m / "mg", up / "mg"))
    step("lookup up/mg/lo", lambda: shown(up / "mg" / "lo"))
    step("unlink up/mg/lo", lambda: os.unlink(up / "mg" / "lo"))
    step("lookup up/mg/lo again", lambda: shown(up / "mg" / "lo"))
    step("list up/mg", lambda: sorted(os.listdir(up / "mg")) if up.joinpath("mg").is_dir() else None)

    # an upper-only directory a merged one is renamed over (EXDEV without redirect_dir), a
    # process still in the old one
    step("mkdir u2", lambda: os.mkdir(m / "u2"))
    step("create u2/z", lambda: os.close(os.open(m / "u2" / "z", os.O_CREAT | os.O_WRONLY, 0o644)))
    step("unlink u2/z", lambda: os.unlink(m / "u2" / "z"))
    old = os.open(m / "u2", os.O_RDONLY | os.O_DIRECTORY)
    step("lookup u2/lo before", lambda: shown(m / "u2" / "lo"))
    step("mv mg2 over u2", lambda: os.rename(m / "mg2", m / "u2"))
    step("lookup u2/lo", lambda: shown(m / "u2" / "lo"))
    step("lookup old/lo", lambda: os.stat("lo", dir_fd=old, follow_symlinks=False).st_size)
    step("create old/q", lambda: os.close(os.open("q", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=old)))
    step("unlink old/z", lambda: os.unlink("z", dir_fd=old))
    os.close(old)
    step("create u2/new", lambda: os.close(os.open(m / "u2" / "new", os.O_CREAT | os.O_WRONLY, 0o644)))
    step("unlink u2/new", lambda: os.unlink(m / "u2" / "new"))
    step("unlink u2/lo", lambda: os.unlink(m / "u2" / "lo"))
    step("lookup u2/lo again", lambda: shown(m / "u2" / "lo"))
    step("list u2", lambda: sorted(os.listdir(m / "u2")))

    snap = helpers.tree_snapshot(m, ignore_vanished=True)
    step("rm -rf up", lambda: subprocess.run(["rm", "-rf", str(up)], capture_output=True).returncode)
    step("lookup up", lambda: shown(up))
    step("list", lambda: sorted(os.listdir(m)))
    return log, {k: v for k, v in snap.items() if k != "."}


@pytest.mark.parametrize("extra", ["redirect_dir=off", "redirect_dir=on", "redirect_dir=on,metacopy=on",
                                   "redirect_dir=on,index=on"])
def test_short_paths_answer_as_the_kernel_overlay(tmp_path, overlay_mount, kernel_mount, extra):
    helpers.require("root")
    tarball = tmp_path / "t" / "a.tar"
    tarball.parent.mkdir()
    _tarball(tarball)
    kopts = [extra]
    mounters = {
        "kernel": lambda lo, up, wk: kernel_mount([lo], up, wk, kopts),
        "overlaypc": lambda lo, up, wk: overlay_mount(stack_options([lo], up, wk, extra)).path,
    }
    runs = {}
    for who, mount in mounters.items():
        (tmp_path / who).mkdir()
        runs[who] = _run(tmp_path / who, mount, tarball)
    (klog, ksnap), (olog, osnap) = runs["kernel"], runs["overlaypc"]
    steps = [f"{k}\n   kernel    {o_k}\n   overlaypc {o_o}"
             for (k, *o_k), (_, *o_o) in zip(klog, olog) if o_k != o_o]
    assert not steps, "\n".join(steps)
    assert len(klog) == len(olog)
    trees = {n: (ksnap.get(n), osnap.get(n)) for n in set(ksnap) | set(osnap)
             if ksnap.get(n) != osnap.get(n)}
    assert not trees, "\n".join(f"{n}:\n kernel    {k}\n overlaypc {o}" for n, (k, o) in sorted(trees.items()))
    # the same state on disk: names, whiteouts, modes, owners, contents, overlay marks
    ku, ou = (_upper(tmp_path / who) for who in ("kernel", "overlaypc"))
    assert "gone/f1" in ku and "cp" in ku  # (what the sequence leaves in the upper)
    uppers = {n: (ku.get(n), ou.get(n)) for n in set(ku) | set(ou) if ku.get(n) != ou.get(n)}
    assert not uppers, "\n".join(f"upper {n}:\n kernel    {k}\n overlaypc {o}"
                                  for n, (k, o) in sorted(uppers.items()))
