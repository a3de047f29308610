"""Listings of directories the kernel opened itself (zero-message OPENDIR), without FUSE.

``OverlayOps`` answers OPENDIR with ENOSYS once INIT offered ``NO_OPENDIR_SUPPORT``; READDIR
and READDIRPLUS then come with handle 0 and are served from snapshots named by the
cookies (``overlaypc.listings``): each lister continues in its own snapshot, which is
dropped at its end, at most ``MAX_SNAPSHOTS`` kept; a lister whose snapshot went continues
after its cookie's key, in a fresh reading.
"""
from __future__ import annotations

import os

import pytest

from overlaypc.engine import protocol as p
from overlaypc import listings
from overlaypc.engine.ops import ConnInfo
from overlaypc.listings import Snapshot, Snapshots, split_cookie
from overlaypc.readdir import DirEntry
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import REQ, look, make_ops

FILES = [f"f{i}" for i in range(10)]


def _names(items) -> list[str]:
    return [os.fsdecode(i.name) for i in items]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "lower" / "d").mkdir(parents=True)
    (tmp_path / "lower" / "e").mkdir()
    for name in FILES:
        (tmp_path / "lower" / "d" / name).write_text(name)
    for name in ("upper", "work", "mnt"):
        (tmp_path / name).mkdir()
    return tmp_path


@pytest.fixture
def ops(tree):
    ops, close = make_ops(tree)
    ops.init(ConnInfo(7, 45, p.NO_OPENDIR_SUPPORT))
    yield ops
    close()


def _change(ops, tree) -> None:
    """A new name in d, made in the upper layer (invisible to a snapshot taken before)."""
    (tree / "upper" / "d").mkdir(exist_ok=True)
    (tree / "upper" / "d" / "new").write_text("x")
    ops.fs.lookup.invalidate("d")


def test_the_kernels_listing_cache_goes_to_one_handle_of_a_directory_at_a_time(ops):
    """dircache14: OPENDIR answers handle 0 (listings come from snapshots); CACHE_DIR only
    to a handle opened while no other of that directory is, so no reader of the kernel's
    cached listing is overtaken by another's refill (``listings.OpenDirs``)."""
    d = ops.lookup(REQ, ROOT_ID, b"d").nodeid
    first, second = ops.opendir(REQ, ROOT_ID), ops.opendir(REQ, ROOT_ID)
    other = ops.opendir(REQ, d)
    assert (first.fh, second.fh, other.fh) == (0, 0, 0)
    assert (first.cache_dir, second.cache_dir, other.cache_dir) == (True, False, True)
    assert first.keep_cache and second.keep_cache
    ops.releasedir(REQ, ROOT_ID, 0)
    assert not ops.opendir(REQ, ROOT_ID).cache_dir       # the second is still open
    ops.releasedir(REQ, ROOT_ID, 0)
    ops.releasedir(REQ, ROOT_ID, 0)
    assert ops.opendir(REQ, ROOT_ID).cache_dir           # none open: the cache again
    assert sorted(_names(ops.readdir(REQ, ROOT_ID, 0, 0))) == [".", "..", "d", "e"]


def test_the_engines_short_path_counts_the_same_handles(ops):
    """``opendir_zero``/``releasedir_zero`` (the engine's OPENDIR and RELEASEDIR of
    handle 0, no ``Request``) count the handles ``opendir``/``releasedir`` count: one
    CACHE_DIR handle of a directory at a time whichever path opened or released it."""
    assert ops.opendir_zero(ROOT_ID) is True
    assert ops.opendir(REQ, ROOT_ID).cache_dir is False   # opened through the short path
    ops.releasedir_zero(ROOT_ID)
    assert ops.opendir_zero(ROOT_ID) is False             # ... and the other is still open
    ops.releasedir(REQ, ROOT_ID, 0)
    ops.releasedir_zero(ROOT_ID)
    assert ops.opendir(REQ, ROOT_ID).cache_dir is True    # none open
    ops.releasedir_zero(ROOT_ID)
    assert len(ops._open_dirs) == 0


def test_without_the_offer_directories_get_handle_0_too(tree):
    """fix15a: where the kernel does not offer NO_OPENDIR_SUPPORT (an old kernel, or a
    plain user's ``allow_root`` mount: the session withdraws the offer), directories got
    real handles whose listings kept positions as cookies, and every one got the kernel's
    cache: both listing defects of soak13 and dircache14 stayed there. Now the same as
    with the offer: handle 0, the cache to one handle at a time."""
    ops, close = make_ops(tree)
    try:
        ops.init(ConnInfo(7, 45, 0))
        assert ops.opendir_zero is not None   # (the engine's short path too)
        first, second = ops.opendir(REQ, ROOT_ID), ops.opendir(REQ, ROOT_ID)
        assert (first.fh, second.fh) == (0, 0)
        assert (first.cache_dir, second.cache_dir) == (True, False)
        items = list(ops.readdir(REQ, ROOT_ID, 0, 0))
        assert sorted(_names(items)) == [".", "..", "d", "e"]
        assert all(split_cookie(i.offset)[0] for i in items)   # a snapshot's cookies
        ops.releasedir(REQ, ROOT_ID, 0)
        ops.releasedir(REQ, ROOT_ID, 0)
    finally:
        close()


@pytest.mark.parametrize("plus", [False, True])
def test_a_listing_read_in_chunks_is_one_snapshot(ops, tree, plus):
    d = look(ops, "d")
    first = list(ops.readdir(REQ, d, 0, 0, plus))[:5]       # a reply with room for five
    assert _names(first)[:2] == [".", ".."]
    _change(ops, tree)
    rest = list(ops.readdir(REQ, d, 0, first[-1].offset, plus))
    assert sorted(_names(first + rest)[2:]) == FILES         # no entry lost, none twice
    cookies = [split_cookie(i.offset) for i in first + rest]
    # one snapshot; "." and ".." at keys 1 and 2, then the names' keys, ascending
    keys = [key for _, key in cookies]
    assert keys[:2] == [1, 2] and keys == sorted(set(keys)) and len({s for s, _ in cookies}) == 1
    # the end is served (the kernel's last, empty request): the snapshot is gone
    assert list(ops.readdir(REQ, d, 0, rest[-1].offset, plus)) == [] and len(ops._snapshots) == 0
    assert "new" in _names(ops.readdir(REQ, d, 0, 0, plus))


def test_each_lister_continues_in_its_own_snapshot(ops, tree):
    d = look(ops, "d")
    a = list(ops.readdir(REQ, d, 0, 0))[:6]
    _change(ops, tree)
    b = list(ops.readdir(REQ, d, 0, 0))                      # another opener, after the change
    a += list(ops.readdir(REQ, d, 0, a[-1].offset))
    assert sorted(_names(a)[2:]) == FILES
    assert sorted(_names(b)[2:]) == sorted(FILES + ["new"])


def test_a_cookie_whose_snapshot_is_gone_reads_the_directory_again(ops):
    d, e = look(ops, "d"), look(ops, "e")
    first = list(ops.readdir(REQ, d, 0, 0))[:4]
    ops._snapshots = Snapshots()                             # dropped (bound, or ended)
    rest = list(ops.readdir(REQ, d, 0, first[-1].offset))
    assert sorted(_names(first + rest)[2:]) == FILES
    # a cookie of d's listing used on e (seekdir(3) with a foreign value): e's own entries
    mine = list(ops.readdir(REQ, d, 0, 0))[:4]
    assert _names(ops.readdir(REQ, e, 0, mine[-1].offset)) == []   # e has 2 entries: past its end
    assert _names(ops.readdir(REQ, e, 0, mine[0].offset)) == [".."]


def test_a_cookie_whose_snapshot_is_gone_goes_on_after_its_name(tmp_path):
    """soak13: the kernel's cache of a listing (CACHE_DIR) keeps the cookies of a snapshot
    dropped at its end; when a change voids that cache, a lister reading from it goes on
    with READDIR at such a cookie. The fresh reading then served from the cookie's
    position: names removed before it meanwhile made as many names after it missed (a
    cookie now names the entry's key: every name there all along comes once)."""
    (tmp_path / "lower" / "d").mkdir(parents=True)
    (tmp_path / "upper" / "d").mkdir(parents=True)
    lower = [f"b{i}" for i in range(60)]
    for name in lower:
        (tmp_path / "lower" / "d" / name).write_text("x")
    for i in range(30):
        (tmp_path / "upper" / "d" / f"u{i}").write_text("u")
    (tmp_path / "work").mkdir()
    (tmp_path / "mnt").mkdir()
    ops, close = make_ops(tmp_path)
    try:
        ops.init(ConnInfo(7, 45, p.NO_OPENDIR_SUPPORT))
        d = look(ops, "d")
        items = list(ops.readdir(REQ, d, 0, 0))
        half = items[:len(items) // 2]                       # the part a lister has read
        assert list(ops.readdir(REQ, d, 0, items[-1].offset)) == []   # the end: dropped
        for i in range(20):                                  # names go, at any key
            os.unlink(tmp_path / "upper" / "d" / f"u{i}")
        ops.fs.lookup.invalidate("d")
        rest = list(ops.readdir(REQ, d, 0, half[-1].offset))  # the snapshot's cookie
        got = _names(half + rest)
        stable = set(lower) | {f"u{i}" for i in range(20, 30)}
        assert not stable - set(got), f"missed: {sorted(stable - set(got))}"
        assert len(got) == len(set(got))
    finally:
        close()


def test_snapshots_are_bounded_and_dropped_at_their_end():
    snaps = Snapshots(limit=3)
    made = [Snapshot.of(n, 0, [], (n, n)) for n in range(5)]
    ids = [snaps.add(s) for s in made]
    assert len(set(ids)) == 5 and len(snaps) == 3
    assert snaps.get(ids[0], 0) is None and snaps.get(ids[4], 4) is made[4]
    assert snaps.get(ids[2], 2) is made[2]                   # used: now the newest
    assert snaps.get(ids[2], 3) is None                      # not a listing of node 3
    snaps.add(Snapshot.of(9, 0, [], (9, 9)))
    assert snaps.get(ids[3], 3) is None and snaps.get(ids[2], 2) is made[2]   # the least recent went
    snaps.done(ids[2])
    assert snaps.get(ids[2], 2) is None


def _entries(n: int) -> list:
    return [DirEntry(f"n{i}", 0o100644, i) for i in range(n)]


def test_snapshots_are_bounded_by_their_entries_in_all():
    """Past ``max_entries`` in all, the least recently used others go; the one just kept
    stays, however large (its lister needs it for its next chunk)."""
    snaps = Snapshots(limit=10, max_entries=100)
    a, b = snaps.add(Snapshot.of(1, 0, _entries(40), (1, 1))), snaps.add(Snapshot.of(2, 0, _entries(40), (2, 2)))
    assert snaps.get(a, 1) is not None and snaps.entries == 80  # a used: b the least recent
    c = snaps.add(Snapshot.of(3, 0, _entries(40), (3, 3)))
    assert (snaps.get(b, 2), len(snaps), snaps.entries) == (None, 2, 80)
    big = snaps.add(Snapshot.of(4, 0, _entries(500), (4, 4)))
    assert snaps.get(a, 1) is None and snaps.get(c, 3) is None
    assert (snaps.get(big, 4).nodeid, snaps.entries) == (4, 500)
    snaps.done(big)
    assert (len(snaps), snaps.entries) == (0, 0)


@pytest.mark.parametrize("plus", [False, True])
def test_two_listings_past_the_entry_bound_read_in_turns(tmp_path, plus):
    """review11: two listings that together pass the entry bound, read in turns 3
    entries at a time: each lister's snapshot goes at the other's next chunk and is read
    again from its position; with nothing changed, each gets every entry exactly once."""
    for d, n in (("d", 37), ("e", 41)):
        (tmp_path / "lower" / d).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "lower" / d / f"{d}{i}").write_text("x")
    (tmp_path / "upper" / "d").mkdir(parents=True)  # d merged: entries from both layers
    for i in range(5):
        (tmp_path / "upper" / "d" / f"u{i}").write_text("u")
    (tmp_path / "work").mkdir()
    (tmp_path / "mnt").mkdir()
    ops, close = make_ops(tmp_path)
    try:
        ops.init(ConnInfo(7, 45, p.NO_OPENDIR_SUPPORT))
        ops._snapshots.max_entries = 50
        nodes = {x: look(ops, x) for x in ("d", "e")}
        got: dict[str, list[str]] = {"d": [], "e": []}
        offsets = {"d": 0, "e": 0}
        reread = 0
        while nodes:
            for x in list(nodes):
                items = []
                for item in ops.readdir(REQ, nodes[x], 0, offsets[x], plus=plus):
                    items.append(item)
                    if len(items) == 3:
                        break
                if not items:
                    del nodes[x]
                    continue
                reread += offsets[x] and split_cookie(items[0].offset)[0] != split_cookie(offsets[x])[0]
                got[x] += _names(items)
                offsets[x] = items[-1].offset
        assert reread > 10  # (the bound was in play)
        assert sorted(got["d"]) == sorted([".", ".."] + [f"d{i}" for i in range(37)]
                                          + [f"u{i}" for i in range(5)])
        assert sorted(got["e"]) == sorted([".", ".."] + [f"e{i}" for i in range(41)])
    finally:
        close()


def _ordered_by_loop(entries, span):
    """``listings.ordered`` as written before it was built with ``map`` (the reference)."""
    keyed = sorted([(listings._FIRST_KEY + hash(e[0]) % span, e[0], e) for e in entries])
    keys, last = [], 0
    for key, _name, _e in keyed:
        last = key if key > last else last + 1
        keys.append(last)
    return [e for _k, _n, e in keyed], keys


@pytest.mark.parametrize("span", [None, 7, 1])
def test_ordered_keys_are_the_loops_keys_with_collisions_too(monkeypatch, span):
    """Every name's key from its hash, a later one of a key taken the next free one: the
    same entries and keys as the per-entry loop; strictly ascending keys. A small key
    span makes names share keys (1 in 2**43 a pair in a real one)."""
    if span is not None:
        monkeypatch.setattr(listings, "_KEY_SPAN", span)
    span = listings._KEY_SPAN
    for n in (0, 1, 2, 50, 300):
        entries = [DirEntry(f"name{i}", 0o100000, i) for i in range(n)]
        got = listings.ordered(entries)
        assert got == _ordered_by_loop(entries, span)
        assert all(a < b for a, b in zip(got[1], got[1][1:]))
        assert sorted(e.name for e in got[0]) == sorted(e.name for e in entries)
