"""The sixteenth round's copy-up and one-layer listing changes together, the kernel overlay
as the oracle (review49b): copyup49's readable fd of each upper directory a copy-up goes
into (``DirFd.readable``: the parent's fsync and times) and the held fds passed down the
copy-up's steps; speed49c's one-pass READDIRPLUS of upper-only and opaque directories
(``readdir._one_layer_plus``) and the node table's FORGET changes. Each session runs on a
fresh stack per side; every step's answer must match.

- a parent directory's times across copy-ups into it (set through the mount between
  them), after it is renamed, after another directory is renamed over its name, after it
  is removed and made again (opaque) and a lower file is moved in;
- copied-up files renamed into upper-only and opaque directories: their numbers (the
  origin's, as the kernel's same-filesystem layers show them) in a cold listing's
  ``d_ino`` and ``st_ino``, with the directories' own listing after ``rm -rf`` of parts.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from features_support import KERNEL_METACOPY, KERNEL_REDIRECT
from test_fifteenth_round_kernel import INDEX, _drop_dentries, _err
from test_protattr import _each_side

pytestmark = [pytest.mark.mount, pytest.mark.kernel_overlay]

T1 = (1_000_000_000_000_000_000, 1_100_000_000_000_000_000)
T2 = (1_200_000_000_000_000_000, 1_300_000_000_000_000_000)


def _times(p: Path):
    st = os.lstat(p)
    return st.st_atime_ns, st.st_mtime_ns


def _lower(root: Path) -> Path:
    lower = root / "lower"
    for d in ("p", "r", "s", "v", "w"):
        (lower / d).mkdir(parents=True)
        for i in range(4):
            (lower / d / f"{d}{i}").write_bytes(b"lower " + f"{d}{i}".encode())
        os.utime(lower / d, ns=T1)
    return lower


def _session(mnt: Path, inos: dict) -> dict:
    got = {}
    p, r, s = mnt / "p", mnt / "r", mnt / "s"
    # copy-ups into p: the first one copies p itself up; then its times set through the
    # mount between copy-ups kept by each
    os.chmod(p / "p0", 0o600)
    got["p after first"] = _times(p)
    os.utime(p, ns=T2)
    os.chmod(p / "p1", 0o600)
    got["p after second"] = _times(p)
    os.utime(p, ns=T1)
    with open(p / "p2", "r+b") as f:  # (a copy-up by an open for writing)
        f.write(b"W")
    got["p after write"] = _times(p)
    # renamed: a copy-up into it at its new name
    os.rename(p, mnt / "p2dir")
    os.utime(mnt / "p2dir", ns=T2)
    os.chmod(mnt / "p2dir" / "p3", 0o640)
    got["p2dir after"] = _times(mnt / "p2dir")
    # another directory renamed over p's old name: copy-ups go into that one
    os.chmod(r / "r0", 0o600)  # (r copied up, its readable fd kept)
    os.mkdir(p)
    os.rename(r, p)
    os.utime(p, ns=T2)
    os.chmod(p / "r1", 0o600)
    got["p (was r) after"] = _times(p)
    got["p (was r) list"] = sorted(os.listdir(p))
    got["p2dir list"] = sorted(os.listdir(mnt / "p2dir"))
    # removed and made again (opaque), a lower file moved in, a copy-up into it by rename
    os.chmod(s / "s0", 0o600)
    for n in os.listdir(s):
        os.unlink(s / n)
    os.rmdir(s)
    os.mkdir(s)
    os.utime(s, ns=T1)
    os.rename(mnt / "v" / "v0", s / "v0")
    renamed_in = _times(s)  # (the rename's own time: each side's)
    got["s atime after rename in"] = renamed_in[0]
    os.chmod(s / "v0", 0o600)
    got["s after chmod kept"] = _times(s) == renamed_in
    # upper-only directories holding copied-up files renamed in (their origins' numbers)
    os.mkdir(mnt / "made")
    for i in range(1, 4):
        os.rename(mnt / "v" / f"v{i}", mnt / "made" / f"v{i}")
    os.makedirs(mnt / "made" / "sub" / "deep")
    os.rename(mnt / "w", mnt / "made" / "sub" / "w")  # (a merged directory, redirected)
    (mnt / "made" / "new").write_bytes(b"new")
    os.symlink("new", mnt / "made" / "link")
    os.link(mnt / "made" / "new", mnt / "made" / "new2")
    _drop_dentries()
    for d in ("made", "made/sub", "s", "p", "p2dir"):
        with os.scandir(mnt / d) as it:
            entries = sorted((e.name, e.inode(), e.is_dir(follow_symlinks=False)) for e in it)
        got["list " + d] = [(n, inos.get(ino, "own"), is_dir) for n, ino, is_dir in entries]
        got["stat " + d] = sorted((n, inos.get(os.lstat(mnt / d / n).st_ino, "own"),
                                   os.lstat(mnt / d / n).st_nlink) for n, _, _ in entries)
    got["data"] = {str(q.relative_to(mnt)): q.read_bytes()
                   for q in sorted(mnt.rglob("*")) if q.is_file() and not q.is_symlink()}
    got["rm -rf made/sub"] = subprocess.run(["rm", "-rf", str(mnt / "made" / "sub")]).returncode
    _drop_dentries()
    got["find"] = sorted(subprocess.run(["find", str(mnt), "-mindepth", "1", "-printf", "%P %y %n\n"],
                                        capture_output=True, text=True).stdout.splitlines())
    got["rm -rf made"] = subprocess.run(["rm", "-rf", str(mnt / "made")]).returncode
    got["ls"] = sorted(os.listdir(mnt))
    got["rmdir p2dir"] = _err(lambda: os.rmdir(mnt / "p2dir"))
    return got


@pytest.mark.parametrize("opts", [KERNEL_REDIRECT, KERNEL_METACOPY, INDEX, KERNEL_REDIRECT + ("volatile",)])
def test_copy_ups_into_moved_and_replaced_directories_as_the_kernel(opts, tmp_path, overlay_mount,
                                                                    kernel_mount):
    lower = _lower(tmp_path)
    inos = {os.lstat(q).st_ino: str(q.relative_to(lower)) for q in lower.rglob("*")}
    got = _each_side(tmp_path, lower, lambda mnt: _session(mnt, inos), overlay_mount,
                     kernel_mount, opts=opts)
    assert got["kernel"]["p after second"] == T2
    assert got["overlaypc"] == got["kernel"]


def _append(path: Path, data: bytes) -> int:
    with open(path, "ab") as f:
        return f.write(data)


def test_copy_up_into_an_append_only_upper_directory_as_the_kernel(tmp_path, overlay_mount,
                                                                  kernel_mount):
    """fix50: the parent's times set back after a copy-up are best effort, as the kernel's
    (``ovl_set_timestamps``' error ignored). Into an append-only upper directory (``chattr
    +a``: entries may be added, its times set from user space may not: ``utimensat`` is
    EPERM there) the copy-up succeeds for both; only the parent's mtime differs: the
    kernel sets it without ``ATTR_TIMES_SET`` (which ``may_setattr`` refuses for an
    append-only inode) and keeps it, overlaypc cannot (before: EPERM to the caller, the
    copy already in place)."""
    from features_support import mount_side, new_stack
    from helpers import require
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "f").write_bytes(b"lower\n")
    got, upper_dirs = {}, []
    try:
        for side in ("kernel", "overlaypc"):
            s = new_stack([lower], tmp_path, side)
            d = s.upper / "d"
            d.mkdir()
            os.setxattr(d, "trusted.overlay.impure", b"y")  # (the kernel sets none on +a)
            os.utime(d, ns=T1)
            r = subprocess.run(["chattr", "+a", str(d)], capture_output=True, text=True)
            require(r.returncode == 0, f"chattr +a on {tmp_path}: {r.stderr.strip()}")
            upper_dirs.append(d)
            mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, KERNEL_REDIRECT)
            try:
                got[side] = [_err(lambda: _append(mnt / "d" / "f", b"more\n")),
                             (mnt / "d" / "f").read_bytes(), (s.upper / "d" / "f").read_bytes()]
            finally:
                unmount()
            got[side].append(_times(d)[1] == T1[1])
    finally:
        for d in upper_dirs:
            subprocess.run(["chattr", "-a", str(d)], capture_output=True)
    assert got["kernel"] == [5, b"lower\nmore\n", b"lower\nmore\n", True]
    assert got["overlaypc"] == got["kernel"][:3] + [False]
