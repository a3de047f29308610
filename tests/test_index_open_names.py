"""``index=on``: an open hard-linked file whose name was removed or replaced after its open.

The attributes of an open file (the reply to an ``ftruncate``'s SETATTR, which the kernel
then caches for ``fstat``) come from its handle; with ``index=on`` the link count of an
upper hard link is the index's, found from the file's copy-up origin. That origin was read
by the name the file had been opened by: once that name was unlinked the SETATTR failed
with ENOENT (the ftruncate itself), and a name replaced by another file gave that file's
origin. Found by tests/stress_mount.py (hunt6, ``cache=shared,metacopy=on,index=on``).
The kernel overlay on a copy of the same layers is the oracle.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.mount


def _layers(base: Path, lower_links: bool) -> tuple[Path, Path, Path]:
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower / "d", upper, work):
        d.mkdir(parents=True)
    if lower_links:
        (lower / "d" / "a").write_bytes(b"lower data\n")
        os.link(lower / "d" / "a", lower / "d" / "b")
    return lower, upper, work


def _run(mnt: Path, lower_links: bool, change: str) -> dict:
    d = mnt / "d"
    if not lower_links:  # an upper file with three names
        (d / "a").write_bytes(b"upper data\n")
        os.link(d / "a", d / "b")
    fd = os.open(d / "a", os.O_RDWR)  # (copy-up of a lower hard link: an index entry)
    try:
        os.link(d / "a", d / "c")
        if change == "unlink":
            os.unlink(d / "a")
        else:  # another file takes the name the file was opened by
            (d / "x").write_bytes(b"x")
            os.rename(d / "x", d / "a")
        os.ftruncate(fd, 5)  # answered with the open file's attributes
        st = os.fstat(fd)
        seen = {"fd": (st.st_size, st.st_nlink)}
    finally:
        os.close(fd)
    for name in ("a", "b", "c"):
        if os.path.lexists(d / name):
            st = os.lstat(d / name)
            seen[name] = (st.st_size, st.st_nlink)
    return seen


@pytest.mark.parametrize("lower_links", [True, False], ids=["lower-links", "upper-links"])
@pytest.mark.parametrize("change", ["unlink", "replace"])
def test_open_file_whose_name_went_shows_its_own_links(tmp_path, overlay_mount, kernel_mount,
                                                       lower_links, change):
    helpers.require("kernel_overlay")
    mine = _layers(tmp_path / "mine", lower_links)
    theirs = _layers(tmp_path / "theirs", lower_links)
    m = overlay_mount(f"lowerdir={mine[0]},upperdir={mine[1]},workdir={mine[2]},index=on")
    k = kernel_mount([theirs[0]], theirs[1], theirs[2], ["index=on"])
    expected = _run(k, lower_links, change)
    assert _run(m.path, lower_links, change) == expected


def _lower_links(base: Path, names: tuple[str, ...]) -> tuple[Path, Path, Path]:
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower / "A", lower / "C", upper, work):
        d.mkdir(parents=True)
    (lower / names[0]).write_bytes(b"lower data\n")
    for name in names[1:]:
        os.link(lower / names[0], lower / name)
    return lower, upper, work


def _counts(mnt: Path, steps: list) -> list:
    """fstat's st_nlink of the open ``A/f`` after each step (a rename or an unlink)."""
    fd = os.open(mnt / "A" / "f", os.O_RDWR)  # (copy-up: an index entry, A/f linked to it)
    try:
        seen = [os.fstat(fd).st_nlink]
        for step in steps:
            if len(step) == 2:
                os.rename(mnt / step[0], mnt / step[1])
            else:
                os.unlink(mnt / step[0])
            seen.append(os.fstat(fd).st_nlink)
    finally:
        os.close(fd)
    return seen


@pytest.mark.parametrize("names,steps", [
    # a lower name moved (copied up: linked to the index), removed, then the open name
    (("A/f", "C/lf"), [("C/lf", "C/m"), ("C/m",), ("A/f",)]),
    # the lower name removed first (a whiteout), then the open name
    (("A/f", "C/lf"), [("C/lf",), ("A/f",)]),
    # three lower names: the open one removed while two stay below
    (("A/f", "C/lf", "C/lg"), [("A/f",), ("C/lf",), ("C/lg",)]),
], ids=["moved-removed-then-open-name", "lower-name-then-open-name", "three-lower-names"])
def test_open_index_entry_with_no_upper_name_counts_lower_names(tmp_path, overlay_mount, kernel_mount,
                                                                names, steps):
    """An open file whose index entry is its only link left (every upper name gone) shows
    the index's count: the names still below, 0 when none is left; it showed the index
    inode's own one link (found by tests/stress_mount.py with PAIRS, hunt7)."""
    helpers.require("kernel_overlay")
    mine = _lower_links(tmp_path / "mine", names)
    theirs = _lower_links(tmp_path / "theirs", names)
    m = overlay_mount(f"lowerdir={mine[0]},upperdir={mine[1]},workdir={mine[2]},index=on,redirect_dir=on")
    k = kernel_mount([theirs[0]], theirs[1], theirs[2], ["index=on", "redirect_dir=on"])
    expected = _counts(k, steps)
    assert _counts(m.path, steps) == expected
