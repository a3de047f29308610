"""An open directory from a lower layer whose name went (rmdir after emptying it, a rename
over it) answers ``fstat`` as the kernel overlay's does (differential; review10 of the
``Node.gone`` change, which was checked against upper directories only): the kernel's
answer comes from the lower directory, still there, so the link count stays as it was
(a merged directory's live count differs already, 2 here against the kernel's 1: the
test compares whether it stays). Before: st_nlink 0."""
from __future__ import annotations

import os
import stat

import pytest


def _fstat_after(mnt, how, which):
    """Lower directory ``low`` (``merged``: its one file unlinked, a merged directory now;
    ``lower``: empty below, never copied up), open, its name taken away: (stat before,
    fstat after, listing after)."""
    if which == "merged":
        os.unlink(mnt / "low" / "f")
    before = os.stat(mnt / "low")
    fd = os.open(mnt / "low", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if how == "rmdir":
            os.rmdir(mnt / "low")
        else:
            os.mkdir(mnt / "other")
            os.rename(mnt / "other", mnt / "low")
        return before, os.fstat(fd), os.listdir(fd)
    finally:
        os.close(fd)


def _seen(before, after, listing):
    return {"mode": stat.filemode(after.st_mode), "nlink_kept": after.st_nlink == before.st_nlink,
            "same_ino": after.st_ino == before.st_ino, "listing": listing}


@pytest.mark.parametrize("which", ["merged", "lower"])
@pytest.mark.parametrize("how", ["rmdir", "rename_over"])
def test_fstat_of_an_open_lower_directory_with_no_name_left(overlay_mount, kernel_mount,
                                                             layers_factory, how, which):
    answers = []
    for kind in ("kernel", "overlaypc"):
        layers = layers_factory({"lower": {"low/f": "x\n"} if which == "merged" else {"low": {}}})
        upper = layers_factory.empty_dir(f"upper-{kind}")
        work = layers_factory.empty_dir(f"work-{kind}")
        if kind == "kernel":
            mnt = kernel_mount([layers["lower"]], upper, work)
        else:
            mnt = overlay_mount(f"lowerdir={layers['lower']},upperdir={upper},workdir={work}").path
        answers.append(_seen(*_fstat_after(mnt, how, which)))
    assert answers[1] == answers[0]
