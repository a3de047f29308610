"""Helpers for the ownership tests (issue 14): fuse-overlayfs as a second oracle, and views
of owners and modes.

What this module owns:
- ``fuse_overlayfs()``: a fuse-overlayfs mount (Debian's 1.10) that we started in the
  foreground and always take down (its PID is ours; nothing is killed by name).
- ``build_owned()``: a layer tree with owners, modes and xattrs set per path.
- ``shown()``: (uid, gid, mode) of every path under a mount, as ``stat`` shows them (a walk
  lists each directory first, so most of these come from READDIRPLUS attributes).
- ``stored()``: the same on a backing directory, with its override xattrs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import helpers

OVERRIDE_NAMES = ("user.containers.override_stat", "security.fuseoverlayfs.override_stat",
                  "user.fuseoverlayfs.override_stat")


@contextlib.contextmanager
def fuse_overlayfs(mnt: Path, options: str, log: Path) -> Iterator[Path]:
    helpers.require_fuse_mount()
    helpers.require(shutil.which("fuse-overlayfs") is not None, "needs fuse-overlayfs")
    mnt.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o", options, str(mnt)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + helpers.MOUNT_TIMEOUT
        while not helpers.is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"fuse-overlayfs did not mount {mnt}: {log.read_text()}")
            time.sleep(0.02)
        yield mnt
    finally:
        helpers.force_unmount(mnt)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


Owned = Mapping[str, tuple]  # rel -> (uid, gid, mode or None, {xattr: value})


def build_owned(root: Path, spec: Mapping[str, object], owners: Owned) -> Path:
    """``helpers.build_layer``, then owner, mode and xattrs per path (``""`` is the root),
    deepest first so that a parent's mode cannot get in the way."""
    helpers.build_layer(root, spec)
    for rel in sorted(owners, key=lambda r: -r.count("/") - (1 if r else 0)):
        uid, gid, mode, xattrs = owners[rel]
        path = root / rel if rel else root
        os.chown(path, uid, gid, follow_symlinks=False)
        if mode is not None:
            os.chmod(path, mode)
        for name, value in xattrs.items():
            os.setxattr(path, name, value, follow_symlinks=False)
    return root


def owned_stack(tmp_path: Path, name: str, spec: Mapping[str, object], owners: Owned):
    """A lower built from ``spec`` with ``owners``, and an empty upper and workdir, under
    ``tmp_path/name``: (lower, upper, work)."""
    base = tmp_path / name
    lower = build_owned(base / "lower", spec, owners)
    upper, work = base / "upper", base / "work"
    upper.mkdir()
    work.mkdir()
    return lower, upper, work


def _walk(root: Path) -> Iterator[str]:
    yield ""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            yield os.path.relpath(os.path.join(dirpath, name), root)


def shown(mnt: Path, skip: tuple = ()) -> dict[str, tuple[int, int, str]]:
    out = {}
    for rel in _walk(mnt):
        if rel in skip:
            continue
        st = os.lstat(mnt / rel if rel else mnt)
        out[rel] = (st.st_uid, st.st_gid, oct(st.st_mode))
    return out


def override_of(path: Union[str, os.PathLike]) -> dict[str, bytes]:
    found = {}
    for name in OVERRIDE_NAMES:
        with contextlib.suppress(OSError):
            found[name] = os.getxattr(path, name, follow_symlinks=False)
    return found


def stored(backing: Path, rel: str) -> tuple[int, int, int, dict[str, bytes]]:
    path = backing / rel if rel else backing
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), override_of(path)


def mount_options(lowers, upper: Optional[Path], work: Optional[Path], extra: str = "") -> str:
    opts = "lowerdir=" + ":".join(map(str, lowers))
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    return f"{opts},{extra}" if extra else opts
