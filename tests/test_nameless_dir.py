"""An open directory whose name is gone (rmdir of it, a rename of another directory over
it) still answers ``fstat`` (hunt8d lead 3): FUSE sends GETATTR by node for a directory,
without its handle, and that node has no name left. The kernel overlay and a plain
filesystem answer its stat, st_nlink 0 for an upper directory (checked by hand against
``mount -t overlay``: same mode, st_nlink 0). The kernel opens directories itself here
(NO_OPENDIR_SUPPORT: no handle the daemon could keep an fd in) and the upper directory's
inode is freed by the removal: the node keeps the attributes the removal found
(``Node.gone``). Before: ENOENT.
"""
from __future__ import annotations

import os
import stat

import pytest


@pytest.fixture
def mnt(overlay_mount, layers_factory):
    layers = layers_factory({"lower": {"low/f": "x\n"}})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers['lower']},upperdir={upper},workdir={work}")
    return m.path


@pytest.mark.parametrize("how", ["rmdir", "rename_over"])
def test_fstat_of_an_open_directory_with_no_name_left(mnt, how):
    os.mkdir(mnt / "d")
    os.chmod(mnt / "d", 0o751)
    ino = os.stat(mnt / "d").st_ino
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if how == "rmdir":
            os.rmdir(mnt / "d")
        else:
            os.mkdir(mnt / "other")
            os.rename(mnt / "other", mnt / "d")
        st = os.fstat(fd)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o751
        assert st.st_nlink == 0
        assert st.st_ino == ino
        assert os.listdir(fd) == []
    finally:
        os.close(fd)
