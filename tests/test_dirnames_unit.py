"""The names of lower directories held for lookups (``overlaypc/dirnames.py``) and what
``Lookup`` does with them, without FUSE or root: the cache is bounded, a too-big directory
falls back to ``fstatat``, and every answer equals the one ``fstatat`` gives (present,
absent, ``.wh.NAME`` whiteouts, ``.wh..wh..opq`` opaque markers), in a stack of three lower
layers and under an upper. System calls are counted by wrapping a layer's own methods."""
from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

from overlaypc.dirnames import LowerNames
from overlaypc.inumbers import InodeNumbers
from overlaypc.lookup import Lookup, Node
from overlaypc.readdir import merged_listing
from overlaypc.stack import LayerStack

PREFIX = "trusted.overlay."
LONG = "n" * 252  # its ".wh." marker would be 256 bytes: cannot exist


def _files(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text(name)


@pytest.fixture
def lowers(tmp_path: Path) -> list[Path]:
    """Three lower layers, top first: present, absent, whiteout and opaque names."""
    l0, l1, l2 = (tmp_path / f"l{i}" for i in range(3))
    _files(l2, "d/a", "d/b", "d/c", "d/gone", "d/sub/x", "d/opq/x", "d/bottom", f"d/{LONG}",
           "d/gonedir/x", "d/olddir/x")
    _files(l1, "d/.wh.gone", "d/b", "d/sub/y", "d/opq/.wh..wh..opq", "d/opq/z", "d/.wh.gonedir",
           "d/olddir")  # a file over a lower directory: the directory is not merged
    _files(l0, "d/a", "d/.wh.c", "d/sub/", "top")
    return [l0, l1, l2]


NAMES = ["a", "b", "c", "gone", "sub", "opq", "bottom", "missing", LONG, "gonedir", "olddir"]


def _shape(node: Node) -> tuple:
    """What a lookup answered: which layer objects, and the flags."""
    return (tuple((e.layer.index, e.rel, e.st.st_ino, e.st.st_mode) for e in node.entries),
            node.opaque, node.upper_whiteout, node.upper_marker)


def _counting(stack: LayerStack) -> collections.Counter:
    """Count ``stat_at`` (by layer and name), ``dir_at`` and ``names_at`` calls of every
    layer by wrapping the layer's own methods."""
    calls: collections.Counter = collections.Counter()
    for layer in stack.layers:
        for method in ("stat_at", "dir_at", "names_at"):
            real = getattr(layer, method)

            def counted(*args, _real=real, _method=method, _layer=layer):
                calls[_method] += 1
                if _method == "stat_at":
                    calls[(_layer.index, args[1])] += 1
                return _real(*args)
            setattr(layer, method, counted)
    return calls


def _paths(*parents: str) -> list[str]:
    return [f"{p}/{n}" if p else n for p in parents for n in NAMES]


def test_answers_equal_fstatat_for_present_absent_whiteout_and_opaque(lowers):
    """A lookup helped by held names answers exactly as one that stats every name, for
    each name in a directory, in a directory below an OCI opaque marker and in one merged
    from two layers; and each held set agrees with ``fstatat`` name by name."""
    stack = LayerStack([str(p) for p in lowers], None, None)
    try:
        plain = Lookup(stack, PREFIX)
        plain.names = LowerNames(max_names=0)  # holds nothing: fstatat for every name
        held = Lookup(stack, PREFIX)
        inos = InodeNumbers(stack, PREFIX)
        for rel in ("d", "d/sub", "d/opq"):  # listings fill the names, as READDIR does
            merged_listing(held.directory(rel), inos, PREFIX, names=held.names)
        assert len(held.names) >= 5 and len(plain.names) == 0
        for rel in _paths("d", "d/sub", "d/opq") + ["top", "d/.wh.gone", "d/opq/.wh..wh..opq"]:
            assert _shape(held.lookup(rel)) == _shape(plain.lookup(rel)), rel
        assert held.lookup("d/opq").opaque and held.lookup("d/gone").entries == ()
        assert not held.lookup("d/c").exists and held.lookup("d/bottom").exists
        # each held set against fstatat, for its names and for names it lacks
        for layer in stack.lowers:
            for rel in ("d", "d/sub", "d/opq"):
                names = held.names.known(layer, rel)
                if names is None:
                    continue
                dirfd = layer.dir_fd(rel)
                for name in set(names) | set(NAMES) | {".wh.c", ".wh.gone", ".wh..wh..opq"}:
                    assert (name in names) == (layer.stat_at(dirfd, name) is not None), (layer, rel, name)
    finally:
        stack.close()


def test_held_names_spare_the_stats_of_absent_names(lowers):
    """A name only in the bottom layer of three: the first lookup reads the names of the
    directories it is absent from (instead of asking for NAME and .wh.NAME in each); later
    lookups ask only the bottom layer (where a whiteout would hide nothing), for the name
    alone."""
    stack = LayerStack([str(p) for p in lowers], None, None)
    try:
        lookup = Lookup(stack, PREFIX)
        lookup.directory("d")
        calls = _counting(stack)
        assert lookup.lookup("d/bottom").exists
        calls.clear()
        assert lookup.lookup("d/bottom").exists and not lookup.lookup("d/missing").exists
        # before: 5 each (NAME and .wh.NAME in the two layers above, NAME at the bottom)
        assert calls["stat_at"] == 2, calls
        assert calls[(2, "bottom")] == 1 and calls[(2, "missing")] == 1
    finally:
        stack.close()


def test_a_looked_up_directory_is_resolved_once(lowers):
    """LOOKUP of a directory, then of a name in it (the kernel's usual order): the
    directory's fd in each layer is opened once, not again for the lookup below it."""
    stack = LayerStack([str(p) for p in lowers], None, None)
    try:
        lookup = Lookup(stack, PREFIX)
        calls = _counting(stack)
        assert lookup.lookup("d").is_dir
        assert lookup.lookup("d/sub").is_dir
        opened = calls["dir_at"]
        assert lookup.lookup("d/sub/x").exists and lookup.lookup("d/sub/y").exists
        assert calls["dir_at"] == opened == 3 + 3, calls  # before: 6 more (d and d/sub again)
    finally:
        stack.close()


def test_cache_is_bounded_lru_and_huge_directories_fall_back(tmp_path):
    """At most ``max_names`` names in all, least recently used dropped; a directory over
    ``max_dir`` names is not held, is not read again, and its lookups still answer right."""
    lower = tmp_path / "low"
    for d in range(6):
        _files(lower, *(f"d{d}/f{i}" for i in range(4)))
    _files(lower, *(f"huge/f{i}" for i in range(50)))
    below = tmp_path / "below"
    _files(below, "huge/f7", "huge/only", "d0/z")
    stack = LayerStack([str(lower), str(below)], None, None)
    try:
        lookup = Lookup(stack, PREFIX)
        lookup.names = names = LowerNames(max_names=10, max_dir=8)
        layer = stack.lowers[0]
        for d in range(6):
            names.fill(layer, f"d{d}", layer.dir_fd(f"d{d}"))
            assert names.names_held <= 10
        assert names.names_held == 8 and len(names) == 2  # d4 and d5, 4 names each
        assert names.known(layer, "d0") is None and names.known(layer, "d5") == {f"f{i}" for i in range(4)}
        names.known(layer, "d4")  # used: d5 is now the least recent
        names.offer(layer, "d0", ["f0", "f1", "f2", "f3"])
        assert names.known(layer, "d5") is None and names.known(layer, "d4") is not None
        # the huge directory: not held, marked (one name's weight), read once
        calls = _counting(stack)
        assert not lookup.lookup("huge/missing").exists
        assert lookup.lookup("huge/only").top.layer is stack.lowers[1]
        assert lookup.lookup("huge/f7").top.layer is layer
        assert calls["names_at"] == 1 and names.known(layer, "huge") is None
        assert names.fill(layer, "huge", layer.dir_fd("huge")) is None and calls["names_at"] == 1
        assert names.names_held <= 10
    finally:
        stack.close()


def test_writable_layers_are_never_held(tmp_path, lowers):
    """The upper changes through the mount: its names are never held, so a name created
    there after a lookup is found by the next one."""
    upper, work = tmp_path / "up", tmp_path / "wk"
    _files(upper, "d/")
    work.mkdir()
    stack = LayerStack([str(p) for p in lowers], str(upper), str(work))
    try:
        lookup = Lookup(stack, PREFIX)
        inos = InodeNumbers(stack, PREFIX)
        merged_listing(lookup.directory("d"), inos, PREFIX, names=lookup.names)
        assert not lookup.lookup("d/new").exists
        assert lookup.names.known(stack.upper, "d") is None
        assert lookup.names.fill(stack.upper, "d", stack.upper.dir_fd("d")) is None
        (upper / "d/new").write_text("x")
        assert lookup.lookup("d/new").top.layer is stack.upper
        (upper / "d/.wh.bottom").write_text("")  # as fuse-overlayfs writes them
        assert not lookup.lookup("d/bottom").exists
        assert lookup.lookup("d/bottom").upper_marker
    finally:
        stack.close()


def test_lower_exists_agrees_with_the_stats(lowers):
    """``Lookup.lower_exists`` (what removals ask) is the same with names held or not."""
    stack = LayerStack([str(p) for p in lowers], None, None)
    try:
        plain = Lookup(stack, PREFIX)
        plain.names = LowerNames(max_names=0)
        held = Lookup(stack, PREFIX)
        merged_listing(held.directory("d"), InodeNumbers(stack, PREFIX), PREFIX, names=held.names)
        for rel in _paths("d"):
            assert held.lower_exists(rel) == plain.lower_exists(rel), rel
        assert held.lower_exists("d/bottom") and not held.lower_exists("d/gone")
        assert not held.lower_exists("d/c") and not held.lower_exists("d/missing")
    finally:
        stack.close()


def test_read_only_open_looks_the_name_up_once(lowers):
    """OPEN for reading: one lookup (under the namespace lock), not a second one before it
    that only an open for writing needs."""
    from overlaypc.config import MountConfig
    from overlaypc.core import OverlayFS
    fs = OverlayFS(MountConfig(lowers=[str(p) for p in lowers]))
    try:
        fs.start()
        real, seen = fs.lookup.lookup, []
        fs.lookup.lookup = lambda rel: (seen.append(rel), real(rel))[1]
        fh = fs.open("d/bottom", os.O_RDONLY).fh
        try:
            assert fs.read(fh, 100, 0) == b"d/bottom"
        finally:
            fs.release(fh)
        assert seen == ["d/bottom"]  # before: twice
        with pytest.raises(FileNotFoundError):
            fs.open("d/gone", os.O_RDONLY)
    finally:
        fs.close()
