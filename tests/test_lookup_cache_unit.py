"""Unit tests of ``Lookup``'s directory cache (no mount): ``invalidate`` drops a directory
and everything cached below it, and only that, while the cache's counts of directories
below each path (``_below``, rm24: a directory with none is dropped without a look at
every key) follow every store, LRU eviction, invalidation and shedding."""

from __future__ import annotations

import random
from collections import Counter

from overlaypc.lookup import Lookup
from overlaypc.stack import LayerStack


def _recount(keys) -> dict[str, int]:
    below: Counter[str] = Counter()
    for key in keys:
        head = key.rpartition("/")[0]
        while head:
            below[head] += 1
            head = head.rpartition("/")[0]
    return dict(below)


def _tree(root, depth: int, width: int) -> list[str]:
    paths = [""]
    out = []
    for _ in range(depth):
        paths = [f"{p}/d{i}" if p else f"d{i}" for p in paths for i in range(width)]
        out += paths
    for p in out:
        (root / p).mkdir(parents=True, exist_ok=True)
    return out


def test_invalidate_drops_the_subtree_alone_and_counts_follow(tmp_path):
    for name in ("upper", "lower", "work"):
        (tmp_path / name).mkdir()
    dirs = _tree(tmp_path / "lower", 4, 3)  # 120 directories, 4 levels
    stack = LayerStack([str(tmp_path / "lower")], str(tmp_path / "upper"), str(tmp_path / "work"))
    rng = random.Random(24)
    try:
        # few fds: LRU eviction drops ancestors while their descendants stay cached
        lookup = Lookup(stack, "trusted.overlay.", max_fds=25)
        for step in range(1500):
            roll = rng.random()
            if roll < 0.7:
                lookup.directory(rng.choice(dirs))
            elif roll < 0.98:
                rel = rng.choice(dirs)
                before = set(lookup._dirs)
                lookup.invalidate(rel)
                gone = {k for k in before if k == rel or k.startswith(rel + "/")}
                assert set(lookup._dirs) == before - gone, (step, rel)
            else:
                lookup.shed_fds() if roll < 0.99 else lookup.invalidate(None)
                assert not lookup._dirs
            assert lookup._below == _recount(lookup._dirs), step
            assert lookup.cached_fds == sum(held for _, held in lookup._dirs.values())
        # a deep directory cached without its parent (evicted first) still goes with it
        lookup.invalidate(None)
        lookup.directory("d0/d0/d0/d0")
        lookup._dirs.pop("d0/d0")
        lookup._count("d0/d0", -1)
        assert lookup._below == _recount(lookup._dirs)
        lookup.invalidate("d0/d0")
        assert set(lookup._dirs) == {"d0"}
        assert lookup._below == {}
    finally:
        stack.close()
