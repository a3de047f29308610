"""An open directory whose name is gone (rmdir of it, a rename of another directory over
it) still answers ``fstat`` (hunt8d lead 3), as a plain directory and the kernel overlay
do: FUSE sends GETATTR by node for a directory, without its handle, and that node has no
name left. The kernel opens directories itself here (NO_OPENDIR_SUPPORT: no handle the
daemon could keep an fd in) and an upper directory's inode is freed by the removal: the
node keeps the attributes the removal found (``Node.gone``). Before: ENOENT.

An upper directory answers st_nlink 0 (checked by hand against ``mount -t overlay``: same
mode, st_nlink 0). A directory from a lower layer answers as the kernel overlay's does
(differential; review10): the kernel's answer comes from the lower directory, still there,
so the link count stays as it was (a merged directory's live count differs already, 2 here
against the kernel's 1: the test compares whether it stays). Before that fix: st_nlink 0.
"""
from __future__ import annotations

import os
import stat

import pytest


def _taken_away(mnt, name: str, how: str):
    """Open directory ``name`` of the mount, take its name away (``how``): (stat before,
    fstat after, listing after)."""
    before = os.stat(mnt / name)
    fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if how == "rmdir":
            os.rmdir(mnt / name)
        else:
            os.mkdir(mnt / "other")
            os.rename(mnt / "other", mnt / name)
        return before, os.fstat(fd), os.listdir(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["rmdir", "rename_over"])
def test_fstat_of_an_open_directory_with_no_name_left(overlay_mount, layers_factory, how):
    layers = layers_factory({"lower": {"low/f": "x\n"}})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    mnt = overlay_mount(f"lowerdir={layers['lower']},upperdir={upper},workdir={work}").path
    os.mkdir(mnt / "d")
    os.chmod(mnt / "d", 0o751)
    before, st, listing = _taken_away(mnt, "d", how)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o751
    assert st.st_nlink == 0
    assert st.st_ino == before.st_ino
    assert listing == []


@pytest.mark.parametrize("which", ["merged", "lower"])
@pytest.mark.parametrize("how", ["rmdir", "rename_over"])
def test_fstat_of_an_open_lower_directory_with_no_name_left(overlay_mount, kernel_mount,
                                                             layers_factory, how, which):
    """Lower directory ``low`` (``merged``: its one file unlinked, a merged directory now;
    ``lower``: empty below, never copied up), as the kernel overlay answers."""
    answers = []
    for kind in ("kernel", "overlaypc"):
        layers = layers_factory({"lower": {"low/f": "x\n"} if which == "merged" else {"low": {}}})
        upper = layers_factory.empty_dir(f"upper-{kind}")
        work = layers_factory.empty_dir(f"work-{kind}")
        if kind == "kernel":
            mnt = kernel_mount([layers["lower"]], upper, work)
        else:
            mnt = overlay_mount(f"lowerdir={layers['lower']},upperdir={upper},workdir={work}").path
        if which == "merged":
            os.unlink(mnt / "low" / "f")
        before, after, listing = _taken_away(mnt, "low", how)
        answers.append({"mode": stat.filemode(after.st_mode),
                        "nlink_kept": after.st_nlink == before.st_nlink,
                        "same_ino": after.st_ino == before.st_ino, "listing": listing})
    assert answers[1] == answers[0]
