"""Small additions for the writable-upper tests (issue 4), on top of ``helpers``.

What this module owns:
- ``UpperStack``: one lower (or several) + upper + workdir, mounted by overlaypc, with the
  backing dirs at hand so a test can check the merged view *and* what landed on disk.
- ``make_stack()``: build it from a layer spec with the suite's fixtures.
- ``run_as()``: run a small Python snippet as another uid/gid (a child process that drops
  privileges in ``preexec_fn``), for ownership tests.
- ``renameat2()``: the raw syscall through libc, with the RENAME_* flags.
- Backing-dir checks: ``is_whiteout()``, ``work_leftovers()``, ``fuse_hidden()``.
- ``overlay_stats()``: the JSON counters on the mount root.
- ``on_both()``: one scenario on the kernel overlay and on overlaypc, each over its own copy
  of one lower tree (differential tests).

Caveats: everything assumes root (the suite gates on it through ``helpers.require``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence, Union

import helpers

NOBODY = 65534
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
STATS_XATTR = "user.overlaypc.stats"


# --------------------------------------------------------------------------------------
# A mounted stack with its backing dirs
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class UpperStack:
    lowers: list[Path]
    upper: Path
    work: Path
    mount: helpers.Mount

    @property
    def lower(self) -> Path:
        return self.lowers[0]

    @property
    def mnt(self) -> Path:
        return self.mount.path

    @property
    def options(self) -> str:
        return stack_options(self.lowers, self.upper, self.work)

    def m(self, rel: str) -> Path:
        return self.mnt / rel

    def u(self, rel: str) -> Path:
        return self.upper / rel

    def lo(self, rel: str) -> Path:
        return self.lower / rel


def stack_options(lowers: Sequence[Path], upper: Path, work: Path, extra: str = "") -> str:
    opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"
    return f"{opts},{extra}" if extra else opts


def make_stack(layers_factory, overlay_mount, spec: dict, *, options: str = "",
               base: Optional[Path] = None, prepare=None, **mount_kwargs) -> UpperStack:
    """Build ``spec`` ({layer name: layer spec}, top first) as lowers, make empty upper
    and work dirs (on ``base`` if given), run ``prepare(layers)`` (e.g. chown, setfacl on
    the lower), then mount overlaypc."""
    where = {name: base for name in spec} if base else None
    layers = layers_factory(spec, where=where)
    tag = os.urandom(3).hex()
    upper = layers_factory.empty_dir(f"upper-{tag}", base)
    work = layers_factory.empty_dir(f"work-{tag}", base)
    if prepare is not None:
        prepare(layers)
    m = overlay_mount(stack_options(layers.paths, upper, work, options), **mount_kwargs)
    return UpperStack(layers.paths, upper, work, m)


# --------------------------------------------------------------------------------------
# Backing-dir checks
# --------------------------------------------------------------------------------------

def is_whiteout(path: Union[str, os.PathLike]) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def work_leftovers(work: Path) -> list[str]:
    """Entries in ``workdir/work`` (must be empty between operations)."""
    w = Path(work) / "work"
    return sorted(os.listdir(w)) if w.is_dir() else []


def fuse_hidden(*roots: Union[str, os.PathLike]) -> list[str]:
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                if name.startswith(".fuse_hidden"):
                    found.append(os.path.join(dirpath, name))
    return found


def xattr_dict(path: Union[str, os.PathLike], *, follow: bool = False) -> dict[str, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=follow):
        out[name] = os.getxattr(path, name, follow_symlinks=follow)
    return out


def overlay_stats(mnt: Union[str, os.PathLike]) -> dict:
    return json.loads(os.getxattr(str(mnt), STATS_XATTR))


# --------------------------------------------------------------------------------------
# Processes as another user
# --------------------------------------------------------------------------------------

def _drop(uid: int, gid: int, groups: Sequence[int]):
    def preexec() -> None:
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
    return preexec


def child_python() -> str:
    """A Python interpreter any user may run (the test venv may live under /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        if os.path.exists(candidate) and os.stat(candidate).st_mode & 0o001:
            return candidate
    return sys.executable


def run_as(code: str, *, uid: int = NOBODY, gid: int = NOBODY, groups: Sequence[int] = (),
           cwd: Optional[Union[str, os.PathLike]] = None, umask: int = 0o022) -> str:
    """Run Python ``code`` as uid/gid; return its stdout; raise AssertionError on failure."""
    full = f"import os, sys, stat\nos.umask({umask:#o})\n" + textwrap.dedent(code)
    r = subprocess.run([child_python(), "-c", full], cwd=cwd, capture_output=True, text=True,
                       preexec_fn=_drop(uid, gid, groups), timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"child as {uid}:{gid} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


# --------------------------------------------------------------------------------------
# renameat2
# --------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Union[str, os.PathLike], new: Union[str, os.PathLike], flags: int) -> None:
    fn = _libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old), None, str(new))


# --------------------------------------------------------------------------------------
# Comparing trees beyond helpers.tree_snapshot
# --------------------------------------------------------------------------------------

def link_groups(root: Union[str, os.PathLike]) -> set:
    """Hard-link groups under root: sets of relative paths of non-directories sharing one
    st_ino with st_nlink > 1 (what tar/du/cp -a would see)."""
    groups: dict[int, set] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                st_ = os.lstat(p)
            except FileNotFoundError:
                continue  # a kernel-listed whiteout (see helpers.tree_snapshot)
            if st_.st_nlink > 1:
                groups.setdefault(st_.st_ino, set()).add(os.path.relpath(p, root))
    return {frozenset(g) for g in groups.values()}


def merged_tree(mnt: Union[str, os.PathLike]) -> dict:
    """Type, mode, size and content of every entry below ``mnt`` (no xattrs)."""
    return {rel: (e.type, e.mode, e.size, e.content)
            for rel, e in helpers.tree_snapshot(mnt, xattrs=False).items() if rel != "."}


def on_both(tmp_path: Path, overlay_mount, kernel_mount, tree: dict, ours_opts: str,
            kernel_opts: Sequence[str], scenario) -> list:
    """``scenario(mountpoint)`` on the kernel overlay, then on overlaypc, each over its own
    copy of the lower ``tree`` with an empty upper: [kernel's result, ours]. Asserts that
    neither changed its lower and that the merged trees end alike."""
    results, trees = [], []
    for side in ("kernel", "ours"):
        base = tmp_path / side
        lower = helpers.build_layer(base / "lower", tree)
        before = helpers.tree_snapshot(lower)
        upper, work = base / "upper", base / "work"
        upper.mkdir()
        work.mkdir()
        if side == "kernel":
            mnt = kernel_mount([lower], upper, work, kernel_opts)
            results.append(scenario(str(mnt)))
            trees.append(merged_tree(mnt))
            helpers.force_unmount(mnt)
        else:
            mo = overlay_mount(stack_options([lower], upper, work, ours_opts))
            results.append(scenario(str(mo.path)))
            trees.append(merged_tree(mo.path))
            mo.unmount()
        assert helpers.tree_snapshot(lower) == before, f"{side} changed the lower"
    assert trees[1] == trees[0]
    return results
