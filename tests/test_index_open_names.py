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
