"""The engine's node table through a real mount (issue 15 items 3 and 5).

One nodeid per overlay inode, held only while the kernel references it: after the kernel
drops its dentries and inodes (``drop_caches``), it FORGETs every node and the table
empties; ``overlaypc stats`` reports the count as ``nodes``. Hard links are one kernel
inode where the overlay merges them (read-only mounts), so a change through one name is
seen through the other with no invalidation at all.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from coherence_support import stats
from helpers import HardLink, wait_until


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


@contextlib.contextmanager
def _held() -> Iterator[list[int]]:
    """A list to put O_PATH fds in, all closed at the end. An fd holds its dentry, and so
    the kernel's inode: a cache drop meanwhile (``drop_caches`` by another test or
    process on the machine, memory pressure) cannot make the kernel FORGET it, so a
    count of nodes taken while they are held is the count of what was looked up."""
    fds: list[int] = []
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _tree(n: int) -> dict:
    return {f"d{i}": {f"f{j}": f"{i}.{j}\n" for j in range(10)} for i in range(n)}


def test_node_table_follows_kernel_references(layers_factory, overlay_mount):
    layers = layers_factory({"low": _tree(30)})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}")
    seen = 0
    with _held() as fds:
        for dirpath, dirnames, filenames in os.walk(m.path):
            fds += [os.open(os.path.join(dirpath, n), os.O_PATH | os.O_NOFOLLOW)
                    for n in dirnames + filenames]
            seen += len(filenames)
        assert seen == 300
        busy = stats(m.path)["nodes"]
        assert busy >= 330, busy  # every directory and file looked up is referenced
    # the kernel forgets what it no longer caches, and the table follows it down
    assert wait_until(lambda: (_drop_caches(), stats(m.path)["nodes"])[1] < 10, timeout=10), \
        stats(m.path)
    # and the overlay is the same afterwards
    assert (m.path / "d7" / "f3").read_text() == "7.3\n"


def test_open_unlinked_file_keeps_its_node(layers_factory, overlay_mount):
    layers = layers_factory({"low": {"f": "lower data\n"}})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}")
    fd = os.open(m.path / "f", os.O_RDWR)
    try:
        os.unlink(m.path / "f")
        _drop_caches()
        os.pwrite(fd, b"still here", 0)
        assert os.pread(fd, 10, 0) == b"still here"
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == len("lower data\n")
        os.fchmod(fd, 0o600)
        assert os.fstat(fd).st_mode & 0o777 == 0o600
        assert not (m.path / "f").exists()
    finally:
        os.close(fd)
    assert sorted(os.listdir(upper)) == ["f"]  # the whiteout, nothing else
    assert wait_until(lambda: (_drop_caches(), stats(m.path)["nodes"])[1] < 5, timeout=10)


def test_read_only_hard_links_are_one_kernel_inode(layers_factory, overlay_mount):
    layers = layers_factory({"low": {"a": "linked\n", "b": HardLink("a")}})
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    before = stats(m.path)["nodes"]  # the root's: never forgotten
    with _held() as fds:
        fds.append(os.open(m.path / "a", os.O_PATH))
        a = os.fstat(fds[-1])
        assert stats(m.path)["nodes"] == before + 1
        fds.append(os.open(m.path / "b", os.O_PATH))
        b = os.fstat(fds[-1])
        # the second name found the same node: no new one
        assert stats(m.path)["nodes"] == before + 1
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
