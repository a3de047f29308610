"""Unit tests of how a layer resolves what it acts on (``overlaypc.layer``, and the lookup
cache's ``held_dir``): no mount, no root. Plain directories stand in for layers.

What is pinned here: a change or open whose parent directory the lookup cache holds acts on
that fd (one ``*at`` call, no walk from the layer root); without it, the parent is resolved
from the root for the call; a directory reached through a redirect, or dropped from the
cache, is never handed out for its plain path.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from helpers import require
from overlaypc import layer as layer_mod
from overlaypc.layer import DirFd, Layer
from overlaypc.lookup import Entry, Lookup, Node
from overlaypc.stack import LayerStack


@pytest.fixture
def walks(monkeypatch) -> list[str]:
    """Every path resolved from a layer's root (``openat_beneath``), in order."""
    seen: list[str] = []
    real = layer_mod.openat_beneath

    def counting(dirfd: int, rel: str, flags: int, mode: int = 0) -> int:
        seen.append(rel)
        return real(dirfd, rel, flags, mode)

    monkeypatch.setattr(layer_mod, "openat_beneath", counting)
    return seen


@pytest.fixture
def upper(tmp_path: Path):
    (tmp_path / "upper" / "d").mkdir(parents=True)
    layer = Layer(str(tmp_path / "upper"), 0, writable=True)
    yield layer
    layer.close()


def test_changes_act_on_the_held_parent_without_a_walk(tmp_path, upper, walks):
    # the held fd is of a directory elsewhere in the layer: whatever lands there came
    # through the fd, not through a path walk to "d"
    (tmp_path / "upper" / "held").mkdir()
    held = DirFd(os.open(tmp_path / "upper" / "held", os.O_PATH | os.O_DIRECTORY))
    upper.dirs = lambda rel: held if rel == "d" else None
    upper.do_mkdir("d/sub", 0o755)
    upper.do_symlink("target", "d/ln")
    os.close(upper.do_create("d/f", os.O_WRONLY | os.O_EXCL, 0o644))
    upper.do_chown("d/f", os.getuid(), os.getgid())
    upper.do_utime("d/f", (1, 2))
    upper.do_chmod("d/f", 0o600)
    layer_mod.do_rename(upper, "d/f", upper, "d/g")
    upper.do_unlink("d/ln")
    assert walks == []
    assert sorted(os.listdir(tmp_path / "upper" / "held")) == ["g", "sub"]
    assert os.listdir(tmp_path / "upper" / "d") == []
    st = os.stat(tmp_path / "upper" / "held" / "g")
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, 2)
    upper.do_rmdir("d/sub")
    assert walks == []
    assert os.listdir(tmp_path / "upper" / "held") == ["g"]


def test_without_a_held_parent_it_is_resolved_from_the_root(tmp_path, upper, walks):
    upper.dirs = lambda rel: None
    upper.do_mkdir("d/sub", 0o755)
    upper.do_rmdir("d/sub")
    assert walks == ["d", "d"]
    upper.do_mkdir("top", 0o755)  # the root's own fd: no walk either
    assert walks == ["d", "d"]
    assert (tmp_path / "upper" / "top").is_dir()


def test_held_dir_is_the_cached_directory_of_that_layer_path(tmp_path):
    for name in ("upper", "lower", "work"):
        (tmp_path / name).mkdir()
    (tmp_path / "lower" / "a" / "b").mkdir(parents=True)
    stack = LayerStack([str(tmp_path / "lower")], str(tmp_path / "upper"), str(tmp_path / "work"))
    try:
        lookup = Lookup(stack, "trusted.overlay.", max_fds=64)
        upper, lower = stack.layers
        assert lookup.held_dir(lower, "a/b") is None  # not looked up yet
        node = lookup.directory("a/b")
        held = lookup.held_dir(lower, "a/b")
        assert held is not None and held is node.entries[0].dirfd
        assert os.path.samestat(os.fstat(held.fd), os.stat(tmp_path / "lower" / "a" / "b"))
        assert lookup.held_dir(upper, "a/b") is None  # the upper has no such directory
        lookup.invalidate("a")
        assert lookup.held_dir(lower, "a/b") is None
    finally:
        stack.close()


def test_a_redirected_entry_is_not_held_for_its_plain_path(tmp_path):
    for name in ("upper", "lower", "work"):
        (tmp_path / name).mkdir()
    (tmp_path / "lower" / "old").mkdir()
    stack = LayerStack([str(tmp_path / "lower")], str(tmp_path / "upper"), str(tmp_path / "work"))
    try:
        lookup = Lookup(stack, "trusted.overlay.", max_fds=64)
        lower = stack.layers[1]
        fd = DirFd(os.open(tmp_path / "lower" / "old", os.O_PATH | os.O_DIRECTORY))
        # merged "new" comes from lower "old" (a redirect): "new" of the lower is not it
        entry = Entry(lower, "old", os.fstat(fd.fd), fd)
        lookup._store("new", lookup._epoch, Node("new", (entry,)))
        assert lookup.held_dir(lower, "new") is None
    finally:
        stack.close()


def _deep_tree(top: Path, depth: int) -> None:
    """``top``/d/d/... ``depth`` directories deep (deeper than PATH_MAX and Python's
    recursion limit), made through dir fds; every 500th level also holds a file, a
    symlink and an empty directory."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            if level % 500 == 0:
                os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
                os.symlink("/", "ln", dir_fd=fd)
                os.mkdir("empty", dir_fd=fd)
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
    finally:
        os.close(fd)


def test_remove_tree_of_a_deep_tree_holds_few_fds_and_stays_in_the_layer(tmp_path, upper):
    """``do_remove_tree`` of a tree 3,000 levels deep (a copied tree a killed daemon left in
    workdir/work): removed without recursion (before: RecursionError), holding a bounded
    number of fds whatever the depth, and a symlink inside (to a directory outside the
    layer) is removed, never followed."""
    from overlaypc import faults
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"k")
    top = tmp_path / "upper" / "deep"
    top.mkdir()
    _deep_tree(top, 3000)
    os.symlink(outside, top / "out")
    counts: list[int] = []
    faults.install("layer.rmdir", lambda point, *args: counts.append(len(os.listdir("/proc/self/fd"))))
    try:
        before = len(os.listdir("/proc/self/fd"))
        upper.do_remove_tree("deep")
    finally:
        faults.configure(None)
        # (a tree left behind would fail pytest's own clean-up of old base directories)
        subprocess.run(["rm", "-rf", str(top)], check=True)
    assert not top.exists() and os.listdir(tmp_path / "upper") == ["d"]
    assert (outside / "keep").read_bytes() == b"k"
    assert len(counts) == 3000 + 6 + 1  # every directory: the chain, the empties, the top
    assert max(counts) - before <= layer_mod.REMOVAL_FDS + 2


def _branchy_tree(top: Path, depth: int, width: int, side: int) -> None:
    """A chain ``depth`` deep whose every level holds ``width`` side chains ``side``
    deep (every third level's mode 000), each of their levels a file and a symlink loop
    (``..``); each chain level also a fifo and a symlink to ``/``."""
    p = top
    for level in range(depth):
        for w in range(width):
            q = p / f"side{w}"
            for _ in range(side):
                q.mkdir()
                (q / "f").write_text("x")
                os.symlink("..", q / "loop")
                q = q / "n"
            if level % 3 == 0:
                os.chmod(p / f"side{w}", 0)
        os.mkfifo(p / "fifo")
        os.symlink("/", p / "root")
        p = p / "d"
        p.mkdir()


def test_remove_tree_goes_back_up_past_its_held_fds_into_side_branches(tmp_path, upper):
    """review11: ``_TreeRemoval`` going back up past the ``REMOVAL_FDS`` levels it holds
    (reopened by path from the top) and down again into side chains longer than that
    window: everything goes, mode-000 directories and symlink loops included, and no fd
    is left open."""
    top = tmp_path / "upper" / "t"
    top.mkdir()
    _branchy_tree(top, 40, 2, layer_mod.REMOVAL_FDS + 4)
    before = sorted(os.listdir("/proc/self/fd"))
    upper.do_remove_tree("t")
    assert sorted(os.listdir("/proc/self/fd")) == before
    assert os.listdir(tmp_path / "upper") == ["d"]


@pytest.mark.parametrize("by_name", [True, False], ids=["by-name", "confined"])
@pytest.mark.parametrize("fchmodat2", [True, False], ids=["fchmodat2", "without"])
def test_chmod_through_the_held_parent_never_follows_a_symlink(tmp_path, upper, walks, monkeypatch,
                                                              fchmodat2, by_name):
    """``do_chmod`` by the held parent (``by_name``: one ``fchmodat2`` on the name; chmod21),
    by an ``O_PATH`` fd opened from it (review24: ``fchmodat2`` of that fd), or, where the
    kernel has none, by chmod of that fd's magic link: a symlink gives EOPNOTSUPP and its
    target keeps its mode; no path walk from the root."""
    from overlaypc import sysapi
    monkeypatch.setattr(sysapi._Fchmodat2, "present", fchmodat2)
    held = DirFd(os.open(tmp_path / "upper" / "d", os.O_PATH | os.O_DIRECTORY))
    upper.dirs = lambda rel: held if rel == "d" else None
    target = tmp_path / "target"
    target.write_bytes(b"t")
    target.chmod(0o644)
    (tmp_path / "upper" / "d" / "ln").symlink_to(target)
    (tmp_path / "upper" / "d" / "f").write_bytes(b"f")
    with pytest.raises(OSError) as e:
        upper.do_chmod("d/ln", 0o600, by_name=by_name)
    assert e.value.errno == errno.EOPNOTSUPP
    assert target.stat().st_mode & 0o777 == 0o644
    upper.do_chmod("d/f", 0o640, by_name=by_name)
    assert (tmp_path / "upper" / "d" / "f").stat().st_mode & 0o777 == 0o640
    assert walks == []


@pytest.mark.parametrize("listxattrat", [True, False], ids=["listxattrat", "without"])
def test_xattr_names_of_an_entry_never_follow_it(tmp_path, upper, monkeypatch, listxattrat):
    """``xattr_names_at`` (a lookup's listing of an upper file's xattr names): one
    ``listxattrat`` where the kernel has it (rm24), else ``llistxattr`` through procfs; the
    same answer either way. A symlink's own names (not its target's), a long list read in
    full (more than ``listxattr_at``'s buffer: the procfs way), an absent entry None."""
    from overlaypc import sysapi
    d = tmp_path / "upper" / "d"
    held = DirFd(os.open(d, os.O_PATH | os.O_DIRECTORY))
    target = d / "target"
    target.write_bytes(b"t")
    os.setxattr(target, "user.a", b"1")
    os.setxattr(target, "user.overlay.origin", b"")
    if listxattrat:
        require(sysapi.listxattr_at(held.fd, "target") is not None, "the kernel has listxattrat (6.13)")
    monkeypatch.setattr(sysapi._Listxattrat, "present", listxattrat)
    (d / "ln").symlink_to(target)
    (d / "plain").write_bytes(b"p")
    many = d / "many"
    many.write_bytes(b"m")
    long_names = {f"user.{'n' * 40}{i}" for i in range(8)}  # > 256 bytes of names
    for n in long_names:
        os.setxattr(many, n, b"")
    assert upper.xattr_names_at(held, "target") == {"user.a", "user.overlay.origin"}
    assert upper.xattr_names_at(held, "ln") == frozenset(os.listxattr(d / "ln", follow_symlinks=False))
    assert "user.a" not in upper.xattr_names_at(held, "ln")
    assert upper.xattr_names_at(held, "plain") == frozenset(os.listxattr(d / "plain"))
    assert upper.xattr_names_at(held, "many") >= long_names
    assert upper.xattr_names_at(held, "absent") is None
    if listxattrat:
        assert sysapi.listxattr_at(held.fd, "many") is None  # (ERANGE: the caller's way)
        assert sorted(sysapi.listxattr_at(held.fd, "target")) == ["user.a", "user.overlay.origin"]
