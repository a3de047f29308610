"""BATCH_FORGET through ``Operations.forget_nodes`` (``NodeTable.forget_all``, the
session's ``_batch_forget_short``) leaves the node table as ``forget`` per pair does: two
cores over trees built alike, one session with the hook, one without, the same lookups and
batches (partial counts, a pair twice, an unknown node, the root, a directory before its
children, a message shorter than its count); and FORGETs racing LOOKUPs of the same name
on two threads leave no reference behind. Driven through the fake kernel, without FUSE.
"""
from __future__ import annotations

import queue
import threading

import pytest

from engine_support import FakeKernel
from overlaypc.engine import protocol as p
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import REQ, make_ops


def _tree(base) -> None:
    for d in ("lower/d/sub", "upper", "work", "mnt"):
        (base / d).mkdir(parents=True)
    for i in range(20):
        (base / "lower" / "d" / f"f{i}").write_text(str(i))
    (base / "lower" / "d" / "sub" / "deep").write_text("deep")


class Side:
    def __init__(self, base, short: bool) -> None:
        self.ops, self._close = make_ops(base)
        if not short:
            self.ops.forget_nodes = None  # (before the session binds its hooks)
        self.fk = FakeKernel(self.ops)
        self.fk.start()
        assert (p.BATCH_FORGET in self.fk.session._shorts) is short

    def close(self) -> None:
        self.fk.close()
        self._close()

    def lookup(self, parent: int, name: str) -> int:
        return p.ENTRY_HEAD.unpack_from(self.fk.ok(p.LOOKUP, parent, name.encode() + b"\0"))[0]

    def settle(self) -> None:
        """A request answered after the batches sent before it (one worker, in order)."""
        self.fk.ok(p.STATFS)

    def table(self) -> dict:
        nodes = self.ops.nodes
        with nodes._lock:
            return {"nodes": {n.nodeid: (n.nlookup, sorted(n.names), n.is_dir)
                              for n in nodes._nodes.values()},
                    "names": sorted(nodes._by_name.items()),
                    "keys": sorted(nodes._by_key.values()), "epoch": nodes.epoch,
                    "dirs_gen": nodes._dirs_gen}


@pytest.fixture
def sides(tmp_path):
    made = []
    for name in ("short", "generic"):
        _tree(tmp_path / name)  # (both before ``make_ops`` sets the umask 0)
    for name in ("short", "generic"):
        made.append(Side(tmp_path / name, name == "short"))
    yield made
    for side in reversed(made):  # (the last made first: each puts back the umask it found)
        side.close()


def test_a_batch_forgets_as_forget_per_pair(sides):
    tables = []
    for side in sides:
        d = side.lookup(ROOT_ID, "d")
        sub = side.lookup(d, "sub")
        deep = side.lookup(sub, "deep")
        files = [side.lookup(d, f"f{i}") for i in range(20)]
        for f in files[:10]:
            side.lookup(d, f"f{files.index(f)}")  # (two references each)
        side.fk.batch_forget([(f, 1) for f in files[:15]] + [(files[0], 1), (99999, 3), (ROOT_ID, 1)])
        side.settle()
        after_first = side.table()
        side.fk.batch_forget([(sub, 1), (deep, 1), (files[19], 5)])  # (a directory first)
        side.settle()
        after_second = side.table()
        # a message shorter than its count: the whole pairs forgotten, the rest not read
        body = p.BATCH_FORGET_IN.pack(4, 0) + p.FORGET_ONE.pack(files[1], 1) + p.FORGET_ONE.pack(files[2], 1)
        side.fk.send(p.BATCH_FORGET, 0, body)
        side.settle()
        tables.append((after_first, after_second, side.table(), side.lookup(d, "f1")))
    assert tables[0] == tables[1]
    first, second, third, _ = tables[0]
    assert len(second["nodes"]) == len(first["nodes"]) - 3  # (sub, deep, f19 gone)
    assert len(third["nodes"]) == len(second["nodes"]) - 2  # (f1, f2: their last references)


def test_forgets_racing_lookups_leave_no_reference(sides):
    """One thread looks a name up again and again, another forgets each reference as soon
    as its lookup answered (BATCH_FORGET of what came meanwhile, through the hook): at the
    end the name's node is gone from every index, and a new lookup finds the file."""
    ops = sides[0].ops
    d = ops.lookup(REQ, ROOT_ID, b"d").nodeid
    taken: queue.SimpleQueue = queue.SimpleQueue()
    rounds = 3000

    def looker() -> None:
        for i in range(rounds):
            taken.put(ops.lookup(REQ, d, b"f%d" % (i % 3)).nodeid)
        taken.put(None)

    t = threading.Thread(target=looker)
    t.start()
    done = False
    while not done:
        batch = [taken.get()]
        while not taken.empty():
            batch.append(taken.get())
        if batch[-1] is None:
            batch.pop()
            done = True
        ops.forget_nodes((nodeid, 1) for nodeid in batch)
    t.join()
    nodes = ops.nodes
    assert [n for n in nodes._nodes.values() if n.nodeid not in (ROOT_ID, d)] == []
    assert all(parent != d for parent, _ in nodes._by_name)
    assert sorted(nodes._by_key.values()) == sorted((ROOT_ID, d))
    assert ops.lookup(REQ, d, b"f1").attr.size == 1
