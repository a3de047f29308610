"""Unit tests of ``overlaypc/linknames.py`` (``LinkNames``): which names of a multiply-linked
file are remembered, so that a change through one name invalidates the others, and the
bounds ``limit`` (inodes) and ``per_inode`` (names per inode). No filesystem needed: the
registry sees only stat results, which are made up here.
"""

from __future__ import annotations

import os
import stat
import sys
import threading

import pytest

from overlaypc.linknames import LinkNames

DEV = 64769


def st_of(ino: int, nlink: int = 2, kind: int = stat.S_IFREG, dev: int = DEV) -> os.stat_result:
    return os.stat_result((kind | 0o644, ino, dev, nlink, 0, 0, 1, 0, 0, 0))


def names(links: LinkNames, ino: int, dev: int = DEV) -> set[str]:
    return set(links.others((dev, ino), None))


def test_key_only_for_multiply_linked_non_directories():
    assert LinkNames.key(st_of(5)) == (DEV, 5)
    assert LinkNames.key(st_of(5, dev=7)) == (7, 5)
    assert LinkNames.key(st_of(5, nlink=1)) is None
    assert LinkNames.key(st_of(5, nlink=3, kind=stat.S_IFDIR)) is None
    assert LinkNames.key(st_of(5, kind=stat.S_IFLNK)) == (DEV, 5)  # a hard-linked symlink


@pytest.mark.parametrize("kind", [stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK], ids=["fifo", "chr", "blk"])
def test_key_for_multiply_linked_special_files(kind):
    assert LinkNames.key(st_of(5, kind=kind)) == (DEV, 5)


def test_others_are_the_other_names_of_the_inode():
    links = LinkNames()
    for rel in ("a", "b", "sub/c"):
        links.note(st_of(5), rel)
    links.note(st_of(6), "x")
    assert sorted(links.others((DEV, 5), "a")) == ["b", "sub/c"]
    assert names(links, 5) == {"a", "b", "sub/c"}
    assert names(links, 6) == {"x"}
    assert links.others((DEV, 7), None) == []
    assert links.others((DEV + 1, 5), None) == []  # the same number on another device


def test_single_links_and_directories_are_not_recorded():
    links = LinkNames()
    links.note(st_of(5, nlink=1), "a")
    links.note(st_of(6, nlink=4, kind=stat.S_IFDIR), "d")
    assert names(links, 5) == set() and names(links, 6) == set()


def test_names_per_inode_are_bounded():
    links = LinkNames(per_inode=4)
    for i in range(10):
        links.note(st_of(5), f"n{i}")
    assert names(links, 5) == {"n6", "n7", "n8", "n9"}  # the most recently seen


def test_inodes_are_bounded_oldest_dropped_first():
    links = LinkNames(limit=3)
    for ino in range(1, 6):
        links.note(st_of(ino), f"n{ino}")
    assert [ino for ino in range(1, 6) if names(links, ino)] == [3, 4, 5]
    links.note(st_of(3), "again")  # a known inode takes no new slot
    assert [ino for ino in range(1, 6) if names(links, ino)] == [3, 4, 5]


def test_alias_gives_the_copy_the_names_of_the_lower_file():
    links = LinkNames(per_inode=4)
    for rel in ("a", "b", "c"):
        links.note(st_of(5), rel)
    links.note(st_of(9), "u")
    links.alias(st_of(5), st_of(9))
    assert names(links, 9) == {"u", "a", "b", "c"}
    assert names(links, 5) == {"a", "b", "c"}  # the other names still show the lower file
    links.note(st_of(5), "d")
    links.alias(st_of(5), st_of(9))            # already full: per_inode holds
    assert len(names(links, 9)) == 4


def test_alias_no_op_cases():
    links = LinkNames()
    links.note(st_of(5), "a")
    links.alias(st_of(5), st_of(5))                  # same inode
    links.alias(st_of(5), st_of(9, nlink=1))         # the copy is a single link
    links.alias(st_of(6), st_of(9))                  # nothing known for the old inode
    assert names(links, 5) == {"a"} and names(links, 9) == set()


def test_alias_respects_the_inode_limit():
    links = LinkNames(limit=2)
    links.note(st_of(1), "a")
    links.note(st_of(2), "b")
    for ino in range(10, 20):
        links.alias(st_of(1), st_of(ino))
    assert len([ino for ino in [1, 2, *range(10, 20)] if names(links, ino)]) <= 2


def test_stale_names_do_not_crowd_out_a_live_one():
    links = LinkNames(per_inode=4)
    for i in range(4):
        links.note(st_of(5), f"renamed-since-{i}")
    links.note(st_of(5), "live")
    assert "live" in links.others((DEV, 5), "other")


def test_concurrent_notes_and_lookups_keep_the_bounds():
    """others() iterates a set that note() grows: without the lock, a thread switch in
    the middle raises "Set changed size during iteration" (switches are made frequent)."""
    links = LinkNames(limit=8, per_inode=5000)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(k: int) -> None:
        try:
            for i in range(6000):
                links.note(st_of(i % 10), f"w{k}-{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader() -> None:
        try:
            while not stop.is_set():
                for ino in range(10):
                    links.others((DEV, ino), None)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in readers + threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        for t in readers:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len([ino for ino in range(10) if names(links, ino)]) <= 8
    assert all(len(names(links, ino)) <= 5000 for ino in range(10))
