"""LINK of an open file whose node has no name left while the file has one (soak15).

An upper file with two names: one process opens it by one name and unlinks that name; the
other name was never looked up, so the node table holds no name of the node. The file still
has a link (the kernel's fstat says 1), so the kernel sends LINK for ``linkat`` of its
``/proc/self/fd/N`` (AT_SYMLINK_FOLLOW); the kernel overlay links it (its VFS links the
upper inode), overlaypc answered ENOENT (LINK of a node with no name went by path, and only
a TMPFILE's node was linked through its fd). Found by stress_crash EXTRA2=1 (seed 7510, an
index=on lower hard link; that case, a lower file not copied up, is left: see the report).
"""
from __future__ import annotations

import errno
import os
import subprocess

import helpers
from core_driver import CoreDriver


def _open_unlink_link(mnt, flags=os.O_RDONLY) -> tuple[int, str]:
    """open ux, unlink it, link its fd as z: (its fstat nlink before the link, the outcome)."""
    fd = os.open(mnt / "ux", flags)
    try:
        os.unlink(mnt / "ux")
        nlink = os.fstat(fd).st_nlink
        dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.link(f"/proc/self/fd/{fd}", "z", dst_dir_fd=dfd, follow_symlinks=True)
        except OSError as e:
            return nlink, errno.errorcode[e.errno]
        finally:
            os.close(dfd)
        return nlink, "ok"
    finally:
        os.close(fd)


def _layers(tmp_path, name):
    base = tmp_path / name
    for d in ("lower", "upper", "work"):
        (base / d).mkdir(parents=True)
    (base / "upper" / "ux").write_bytes(b"upper data")
    os.link(base / "upper" / "ux", base / "upper" / "uy")
    (base / "lower" / "l").write_bytes(b"l")
    return base


def test_an_unlinked_upper_file_with_another_name_links_as_the_kernel_does(
        tmp_path, overlay_mount, kernel_mount):
    k = _layers(tmp_path, "k")
    km = kernel_mount([k / "lower"], k / "upper", k / "work")
    kernel = _open_unlink_link(km)
    assert kernel == (1, "ok")  # (the oracle)
    assert (km / "z").read_bytes() == b"upper data" and os.stat(km / "uy").st_nlink == 2
    subprocess.run(["umount", str(km)], check=True)

    o = _layers(tmp_path, "o")
    m = overlay_mount(f"lowerdir={o / 'lower'},upperdir={o / 'upper'},workdir={o / 'work'}")
    assert _open_unlink_link(m.path) == kernel
    assert (m.path / "z").read_bytes() == b"upper data"
    assert os.stat(m.path / "z").st_ino == os.stat(m.path / "uy").st_ino
    assert os.stat(m.path / "uy").st_nlink == 2
    m.unmount()
    assert os.stat(o / "upper" / "z").st_ino == os.stat(o / "upper" / "uy").st_ino
    assert sorted(os.listdir(o / "upper")) == ["uy", "z"]


def test_link_of_a_nameless_node_with_a_linked_upper_file_in_process(tmp_path):
    """LINK of the node (no name in the table, the upper file linked elsewhere) names it
    through its handle's fd: the same nodeid, both names one upper inode; once its last
    name is gone too, LINK answers ENOENT (the upper filesystem refuses it)."""
    helpers.build_layer(tmp_path / "lower", {"l": "l\n"})
    drv = CoreDriver.in_dir(tmp_path)
    # the layers as given before the first request: ux and uy one upper file
    (tmp_path / "upper" / "ux").write_bytes(b"upper data")
    os.link(tmp_path / "upper" / "ux", tmp_path / "upper" / "uy")
    try:
        root = drv.root()
        node = drv.lookup(root, "ux")
        fh = drv.open(node, os.O_RDONLY)
        drv.unlink(root, "ux")
        linked = drv.link(node, root, "z")
        assert linked.nodeid == node.nodeid
        assert os.stat(tmp_path / "upper" / "z").st_ino == os.stat(tmp_path / "upper" / "uy").st_ino
        assert drv.read(fh, 100, 0) == b"upper data"
        drv.unlink(root, "z")
        drv.lookup(root, "uy")
        drv.unlink(root, "uy")  # its last name
        try:
            drv.link(node, root, "w")
        except OSError as e:
            assert e.errno == errno.ENOENT
        else:
            raise AssertionError("a file with no link left was linked")
        assert drv.lookup(root, "w") is None
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()
