"""An upper overlaypc built, mounted by the kernel overlay: ``d_ino`` from readdir equals
``st_ino`` (compat15).

The kernel's readdir gives a copied-up object's origin inode number as ``d_ino`` only in an
upper directory marked ``trusted.overlay.impure`` (or, with xino bits, in a merged one): it
marks the parent of every copy-up, and the new parent of a rename across directories or of a
link, when the object has a copy-up origin. Without the mark, its listing shows the upper
file's own number while ``stat`` shows the origin's: ``find``, ``du`` and ``ls -i`` see two
inodes. Each run does the same operations on the kernel overlay (the reference) and on
overlaypc, then mounts both uppers with the kernel and compares.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

import helpers
from helpers import Dir, File, HardLink
from upper_support import stack_options

LOWER = {
    "d1": Dir({"f1": File("one"), "f2": File("two"), "sub": Dir({"g": File("g")})}),
    "d2": Dir({"h": File("h")}),
    "a": File("a"),
    "m": File("m"),
    "hl1": File("linked"),
    "hl2": HardLink("hl1"),
    "dmv": Dir({"x": File("x")}),
}

#: ours, the kernel's; ``moves_dirs``: redirect_dir=on (a lower directory's rename moves it)
RUNS = {
    "plain": ("redirect_dir=on", ("redirect_dir=on",), True),
    "index": ("redirect_dir=on,index=on", ("redirect_dir=on", "index=on"), True),
    "metacopy": ("redirect_dir=on,metacopy=on", ("redirect_dir=on", "metacopy=on"), True),
    "userxattr": ("userxattr,redirect_dir=nofollow", ("userxattr", "redirect_dir=nofollow"), False),
    # lower and upper on two filesystems: the kernel fixes d_ino in merged directories by
    # itself (xino bits), so only the upper-only ones (nd, nd/deep) tell
    "xino": ("redirect_dir=on,xino=on", ("redirect_dir=on", "xino=on"), True),
}


def _operations(mnt: Path, moves_dirs: bool) -> None:
    with open(mnt / "d1/f1", "ab") as f:  # a copy-up into a merged directory
        f.write(b"more")
    os.rename(mnt / "d1/f2", mnt / "d2/f2")  # a lower file into another merged directory
    os.mkdir(mnt / "nd")
    os.mkdir(mnt / "nd/deep")
    os.rename(mnt / "a", mnt / "nd/a")  # a lower file into an upper-only directory
    os.rename(mnt / "nd/a", mnt / "nd/deep/a")  # a copied-up one, on to another
    os.chmod(mnt / "m", 0o600)  # (a metacopy copy-up with metacopy=on)
    os.mkdir(mnt / "ln")
    os.link(mnt / "d2/h", mnt / "ln/h")  # a link of a copied-up file (origin kept)
    os.link(mnt / "hl1", mnt / "ln/hl3")  # a lower hard link: origin with index=on only
    if moves_dirs:
        os.rename(mnt / "dmv", mnt / "nd/dmv")  # a lower directory, by redirect


def _mismatches(mnt: Path) -> list[str]:
    """Every listed entry whose ``d_ino`` is not the ``st_ino`` its ``lstat`` shows."""
    bad = []
    for dirpath, dirnames, _ in os.walk(mnt):
        with os.scandir(dirpath) as entries:
            for entry in entries:
                st = os.lstat(entry.path)
                if entry.inode() != st.st_ino:
                    bad.append(f"{os.path.relpath(entry.path, mnt)}: d_ino {entry.inode()} "
                               f"st_ino {st.st_ino}")
    return sorted(bad)


def _impure_dirs(upper: Path, prefix: str) -> set[str]:
    found = set()
    for dirpath, _, _ in os.walk(upper):
        if (prefix + "impure") in os.listxattr(dirpath):
            found.add(os.path.relpath(dirpath, upper))
    return found


@pytest.mark.parametrize("run", sorted(RUNS))
def test_kernel_lists_our_upper_with_stat_inode_numbers(run, tmp_path, layers_factory, overlay_mount,
                                                        tmpfs_factory):
    """Before: the kernel over overlaypc's upper listed copied-up objects with their upper
    inode numbers (``d1/f1: d_ino 2318867 st_ino 2294419``), in every run; the kernel's own
    upper lists none."""
    ours_opts, kernel_opts, moves_dirs = RUNS[run]
    if run == "xino":
        lower_base, upper_base = tmpfs_factory(), tmpfs_factory()
    else:
        lower_base = upper_base = tmp_path
    lower = layers_factory({"l": LOWER}, where={"l": lower_base})["l"]
    prefix = "user.overlay." if "userxattr" in ours_opts else "trusted.overlay."
    seen, impure = {}, {}
    for side in ("kernel", "ours"):
        upper = layers_factory.empty_dir(f"upper-{side}", upper_base)
        work = layers_factory.empty_dir(f"work-{side}", upper_base)
        if side == "kernel":
            with helpers.kernel_overlay(tmp_path / "kbuild", [lower], upper, work, kernel_opts) as mnt:
                _operations(mnt, moves_dirs)
        else:
            m = overlay_mount(stack_options([lower], upper, work, ours_opts))
            _operations(m.path, moves_dirs)
            assert _mismatches(m.path) == []
            m.unmount()
        with helpers.kernel_overlay(tmp_path / f"kview-{side}", [lower], upper, work, kernel_opts) as mnt:
            seen[side] = _mismatches(mnt)
        impure[side] = _impure_dirs(upper, prefix)
    assert seen["kernel"] == []
    assert seen["ours"] == [], f"the kernel over overlaypc's upper: {seen['ours']}"
    # the same directories marked as the kernel marks them
    assert impure["ours"] == impure["kernel"]


@pytest.mark.parametrize("userxattr", [False, True], ids=["trusted", "userxattr"])
def test_kernel_gives_our_upper_its_own_fsid(userxattr, tmp_path, layers_factory, overlay_mount):
    """The kernel (``uuid=auto``, its default) keeps a uuid for an upper in ``<prefix>uuid``
    on the upper root, written at the first mount of a new upper (root not marked impure),
    and shows it as ``f_fsid``; an upper without one that holds copy-ups (root impure) gets
    the null uuid: the upper filesystem's ``f_fsid``, shared by every overlay on it.
    Before: over overlaypc's upper, ``f_fsid`` was the upper filesystem's."""
    lower = layers_factory({"l": LOWER})["l"]
    prefix = "user.overlay." if userxattr else "trusted.overlay."
    ours_opts = "userxattr,redirect_dir=nofollow" if userxattr else "redirect_dir=on"
    kernel_opts = ("userxattr", "redirect_dir=nofollow") if userxattr else ("redirect_dir=on",)
    fsids, uuids = {}, {}
    for side in ("kernel", "ours"):
        upper = layers_factory.empty_dir(f"upper-{side}")
        work = layers_factory.empty_dir(f"work-{side}")
        if side == "kernel":
            with helpers.kernel_overlay(tmp_path / "kbuild", [lower], upper, work, kernel_opts) as mnt:
                _operations(mnt, False)
        else:
            m = overlay_mount(stack_options([lower], upper, work, ours_opts))
            _operations(m.path, False)
            m.unmount()
        uuids[side] = os.getxattr(upper, prefix + "uuid") if (prefix + "uuid") in os.listxattr(upper) else None
        with helpers.kernel_overlay(tmp_path / f"kview-{side}", [lower], upper, work, kernel_opts) as mnt:
            fsids[side] = os.statvfs(mnt).f_fsid
        # a later mount keeps the uuid
        m = overlay_mount(stack_options([lower], upper, work, ours_opts))
        m.unmount()
        assert (os.getxattr(upper, prefix + "uuid") if uuids[side] else None) == uuids[side]
    assert uuids["kernel"] is not None and len(uuids["kernel"]) == 16
    assert uuids["ours"] is not None and len(uuids["ours"]) == 16, "no uuid on overlaypc's upper root"
    upper_fsid = os.statvfs(tmp_path).f_fsid
    assert fsids["kernel"] != upper_fsid
    assert fsids["ours"] != upper_fsid


def test_the_mark_is_read_once_per_directory_the_lookup_holds(tmp_path, monkeypatch):
    """Copy-ups into one directory read its ``impure`` mark once, not once each (a ``chmod
    -R`` of lower files paid one ``getxattr`` per file; chmod21); one into a directory
    copied up since (a new inode, a new held fd) reads and writes it again. In-process,
    on a real ``OverlayFS`` (no FUSE), counting the daemon's reads of the mark."""
    from overlaypc.config import MountConfig, validate
    from overlaypc.core import OverlayFS

    root = tmp_path / "m"
    for rel in ("lower/d/sub", "upper/d", "work", "mnt"):
        (root / rel).mkdir(parents=True)
    for rel in ("d/f0", "d/f1", "d/f2", "d/sub/g0", "d/sub/g1"):
        (root / "lower" / rel).write_bytes(b"x")
    cfg = MountConfig(lowers=[str(root / "lower")], upper=str(root / "upper"),
                      work=str(root / "work"), mountpoint=str(root / "mnt"))
    validate(cfg)
    fs = OverlayFS(cfg)
    fs.start()
    reads: list[str] = []
    real = os.getxattr

    def counting(path, name, *args, **kwargs):
        if name.endswith("overlay.impure"):
            reads.append(str(path))
        return real(path, name, *args, **kwargs)

    monkeypatch.setattr(os, "getxattr", counting)
    try:
        for name in ("f0", "f1", "f2"):
            fs.chmod(f"d/{name}", 0o600)
        assert len(reads) == 1, reads
        del reads[:]
        for name in ("g0", "g1"):  # d/sub: copied up (a directory) by the first
            fs.chmod(f"d/sub/{name}", 0o600)
        assert len(reads) == 1, reads
    finally:
        fs.close()
    for rel in ("d", "d/sub"):
        assert os.getxattr(root / "upper" / rel, "trusted.overlay.impure") == b"y", rel
    for rel in ("d/f0", "d/f1", "d/f2", "d/sub/g0", "d/sub/g1"):
        assert (root / "upper" / rel).stat().st_mode & 0o777 == 0o600, rel


def test_a_mark_left_unneeded_is_the_kernels_to_drop(tmp_path, layers_factory, overlay_mount):
    """The kernel (6.18) removes an upper-only directory's ``impure`` mark once a listing
    of it finds no entry with a copy-up origin left (``ovl_cache_get_impure``); overlaypc
    keeps it (parity50, docs/DESIGN-NOTES.md: a hint, not a format the kernel relies on).
    What it costs the layers' moves: nothing. The kernel mounting overlaypc's upper lists
    every entry with ``d_ino`` equal to ``st_ino`` and drops the mark at that listing, as
    over its own upper."""
    lower = layers_factory({"l": LOWER})["l"]
    opts = ("redirect_dir=on",)
    uppers = {}
    for side in ("kernel", "ours"):
        upper = layers_factory.empty_dir(f"upper-{side}")
        work = layers_factory.empty_dir(f"work-{side}")
        uppers[side] = upper
        with contextlib.ExitStack() as stack:
            if side == "kernel":
                mnt = stack.enter_context(
                    helpers.kernel_overlay(tmp_path / "kbuild", [lower], upper, work, opts))
            else:
                m = overlay_mount(stack_options([lower], upper, work, ",".join(opts)))
                stack.callback(m.unmount)
                mnt = m.path
            os.mkdir(mnt / "nd")
            os.rename(mnt / "a", mnt / "nd/a")  # a copy-up (an origin): nd marked
            assert "trusted.overlay.impure" in os.listxattr(upper / "nd")
            os.rename(mnt / "nd/a", mnt / "a2")  # nothing with an origin left in nd
            os.mkdir(mnt / "nd/sub")
            (mnt / "nd/f").write_bytes(b"f")
            assert sorted(os.listdir(mnt / "nd")) == ["f", "sub"]
            assert _mismatches(mnt) == []
    impure = {side: "trusted.overlay.impure" in os.listxattr(uppers[side] / "nd") for side in uppers}
    assert impure == {"kernel": False, "ours": True}
    work = layers_factory.empty_dir("work-view")
    with helpers.kernel_overlay(tmp_path / "kview", [lower], uppers["ours"], work, opts) as mnt:
        assert _mismatches(mnt) == []
    assert "trusted.overlay.impure" not in os.listxattr(uppers["ours"] / "nd")
