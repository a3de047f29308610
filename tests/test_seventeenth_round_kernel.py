"""The seventeenth round's short MKDIR and RMDIR in upper-only and opaque directories
(speed50b: ``shortdirs``), the kernel overlay as the oracle. Each session runs on a fresh
stack per side; every step's answer (errors, modes with the umask, owners, the setgid
parent's group and bit, default ACLs inherited, link counts, listings) and the upper layer's
made directories (mode, overlay xattrs: opaque only where the kernel sets it) must match.

- an untar-like tree of new directories (``tar`` then ``rm -rf``), with umasks;
- a setgid parent, a default-ACL parent (the generic path's, the short one declining);
- a lower directory removed and made again (opaque), directories made and removed in it;
- ``rmdir`` of a non-empty directory, of a file, of an absent name, of a directory
  holding only a whiteout left by a removal in a merged directory renamed away, and of a
  lower directory renamed into an upper-only one (merged through its redirect).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from features_support import KERNEL_METACOPY, KERNEL_REDIRECT
from test_fifteenth_round_kernel import INDEX, _err
from test_protattr import _each_side

pytestmark = [pytest.mark.mount, pytest.mark.kernel_overlay]


def _lower(root: Path) -> Path:
    lower = root / "lower"
    for d in ("p/deep", "r", "m"):
        (lower / d).mkdir(parents=True)
    for d in ("p", "p/deep", "r", "m"):
        (lower / d / "f").write_bytes(b"lower " + d.encode())
    return lower


def _tarball(root: Path) -> Path:
    src = root / "src"
    for i in range(3):
        for j in range(2):
            (src / f"d{i}" / f"e{j}").mkdir(parents=True)
            (src / f"d{i}" / f"e{j}" / "f").write_text(f"{i}{j}")
    out = root / "t.tar"
    with tarfile.open(out, "w") as t:
        for p in sorted(src.rglob("f")):  # (files only: tar makes each missing directory)
            t.add(p, arcname=str(p.relative_to(src)))
    shutil.rmtree(src)
    return out


def _st(p: Path):
    st = os.lstat(p)
    return oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink


def _acl(p: Path) -> str:
    return subprocess.run(["getfacl", "-cp", str(p)], capture_output=True, text=True).stdout


def _session(mnt: Path, tarball: Path) -> dict:
    got = {}
    u = mnt / "u"
    old = os.umask(0o022)
    try:
        os.mkdir(u)
        got["untar"] = subprocess.run(["tar", "-xf", str(tarball), "-C", str(u)]).returncode
        got["untarred"] = sorted((str(p.relative_to(u)), _st(p)) for p in u.rglob("*")
                                 if p.is_dir())
        os.umask(0o027)
        os.mkdir(u / "a", 0o777)
        os.umask(0o077)
        os.mkdir(u / "b", 0o750)
        os.umask(0)
        os.mkdir(u / "c", 0o1777)
        got["umasks"] = [_st(u / n) for n in "abc"]
        os.mkdir(u / "g", 0o755)
        os.chown(u / "g", 0, 12345)
        os.chmod(u / "g", 0o2775)
        os.mkdir(u / "g" / "in", 0o755)
        got["setgid"] = _st(u / "g" / "in")
        os.mkdir(u / "acl", 0o755)
        subprocess.run(["setfacl", "-d", "-m", "u::rwx,g::r-x,o::---,u:1000:rwx",
                        str(u / "acl")], check=True)
        os.mkdir(u / "acl" / "in", 0o777)
        got["acl"] = (_st(u / "acl" / "in"), _acl(u / "acl" / "in"))
    finally:
        os.umask(old)
    # a lower directory removed and made again: opaque; directories made and removed in it
    got["rm -rf p"] = subprocess.run(["rm", "-rf", str(mnt / "p")]).returncode
    os.mkdir(mnt / "p")
    os.mkdir(mnt / "p" / "deep")
    os.mkdir(mnt / "p" / "deep" / "x")
    got["opaque p"] = sorted(os.listdir(mnt / "p")), sorted(os.listdir(mnt / "p" / "deep"))
    got["rmdir p/deep/x"] = _err(lambda: os.rmdir(mnt / "p" / "deep" / "x"))
    got["rmdir p/deep"] = _err(lambda: os.rmdir(mnt / "p" / "deep"))
    got["p after"] = sorted(os.listdir(mnt / "p"))
    # rmdir's answers
    (u / "a" / "f").write_text("f")
    got["rmdir not empty"] = _err(lambda: os.rmdir(u / "a"))
    got["rmdir a file"] = _err(lambda: os.rmdir(u / "a" / "f"))
    got["rmdir absent"] = _err(lambda: os.rmdir(u / "nothing"))
    # a merged directory's file removed (a whiteout), the directory renamed into u: its
    # upper part holds only that whiteout over the lower's; then a lower directory moved in
    os.unlink(mnt / "m" / "f")
    got["rename m"] = _err(lambda: os.rename(mnt / "m", u / "m"))
    got["m listed"] = _err(lambda: sorted(os.listdir(u / "m")))
    got["rmdir m"] = _err(lambda: os.rmdir(u / "m"))
    got["rename r"] = _err(lambda: os.rename(mnt / "r", u / "r"))
    got["rmdir r"] = _err(lambda: os.rmdir(u / "r"))
    os.unlink(u / "r" / "f")
    got["rmdir r emptied"] = _err(lambda: os.rmdir(u / "r"))
    got["rm -rf u/d0"] = subprocess.run(["rm", "-rf", str(u / "d0")]).returncode
    got["ls u"] = sorted(os.listdir(u))
    return got


def _made_in_upper(upper: Path) -> list:
    """The upper layer's directories (what MKDIR made in upper-only and opaque parents, the
    short paths' cases, and ``u``, made in the merged root by the generic path: opaque, as
    the kernel's, parity50): mode and overlay xattr names. ``u``'s ``impure`` is left out:
    the kernel (6.18) clears it once a listing finds no entry with an origin left
    (``ovl_cache_get_impure``), overlaypc keeps it (a hint the kernel does not rely on:
    ``test_impure.py``, docs/DESIGN-NOTES.md parity50)."""
    out = []
    for p in sorted(upper.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            rel = str(p.relative_to(upper))
            names = sorted(n for n in os.listxattr(p) if n.startswith("trusted.overlay.")
                           and n != "trusted.overlay.origin"
                           and not (rel == "u" and n == "trusted.overlay.impure"))
            out.append((rel, oct(os.lstat(p).st_mode), names))
    return out


@pytest.mark.parametrize("opts", [KERNEL_REDIRECT, KERNEL_METACOPY, INDEX])
def test_directories_made_and_removed_as_the_kernel(opts, tmp_path, overlay_mount, kernel_mount):
    lower = _lower(tmp_path)
    tarball = _tarball(tmp_path)
    stacks: dict = {}
    got = _each_side(tmp_path, lower, lambda mnt: _session(mnt, tarball), overlay_mount,
                     kernel_mount, stacks=stacks, opts=opts)
    assert got["kernel"]["untar"] == 0 and got["kernel"]["rm -rf u/d0"] == 0
    assert got["overlaypc"] == got["kernel"]
    assert _made_in_upper(stacks["overlaypc"].upper) == _made_in_upper(stacks["kernel"].upper)
