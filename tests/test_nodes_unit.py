"""Unit tests of ``overlaypc.nodes.NodeTable`` and of ``OverlayOps`` over a real
``OverlayFS`` on plain directories (no FUSE, no mount): identity rules, names, forget,
re-keying on copy-up, open unlinked files, invalidation by path, memory per node."""
from __future__ import annotations

import errno
import json
import os
import stat
import threading
import tracemalloc
from pathlib import Path

import pytest

from overlaypc.attrs import STATS_XATTR
from overlaypc.config import MountConfig, validate
from overlaypc.core import OverlayFS
from overlaypc.engine import protocol as p
from overlaypc.engine.ops import ConnInfo, Request
from overlaypc.engine.protocol import SetAttr
from overlaypc.inodes import InodeKey
from overlaypc.nodes import ROOT_ID, NodeTable
from overlaypc.overlay_ops import WANTED, OverlayOps

REQ = Request(0, 0, os.getpid())


# -- the table alone ----------------------------------------------------------------------
def K(n: int) -> InodeKey:
    return InodeKey(1, n)


def test_take_counts_references_and_forget_frees():
    t = NodeTable(K(0))
    a = t.take(K(1), ROOT_ID, "a", False)
    assert t.take(K(1), ROOT_ID, "a", False) == a
    assert t.nlookup(a) == 2 and t.path(a) == "a"
    t.forget(a, 1)
    assert a in t
    t.forget(a, 1)
    assert a not in t and t.child(ROOT_ID, "a") is None and t.by_key(K(1)) is None
    b = t.take(K(1), ROOT_ID, "a", False)
    assert b != a, "nodeids are never reused"
    t.forget(ROOT_ID, 5)
    assert ROOT_ID in t


def test_a_directory_keeps_its_removal_attributes_only_once_nameless():
    """``gone`` (a removed directory's attributes, for ``fstat`` of an open fd of it) is
    kept by a directory node that lost its last name, never by a file or a node with a
    name left; a rename over a directory keeps it for the replaced one."""
    t = NodeTable(("root",))
    d = t.take(("d",), ROOT_ID, "d", True)
    t.take(("d",), ROOT_ID, "d2", True)  # (a second name: never for a directory, but be safe)
    f = t.take(("f",), ROOT_ID, "f", False)
    t.unlink(ROOT_ID, "d", gone="attrs of d")
    assert t.gone(d) is None  # a name is left
    t.unlink(ROOT_ID, "d2", gone="attrs of d")
    assert t.gone(d) == "attrs of d"
    t.unlink(ROOT_ID, "f", gone="attrs of f")
    assert t.gone(f) is None
    x = t.take(("x",), ROOT_ID, "x", True)
    y = t.take(("y",), ROOT_ID, "y", True)
    t.rename(ROOT_ID, "x", ROOT_ID, "y", gone="attrs of y")
    assert (t.gone(y), t.gone(x), t.path(x)) == ("attrs of y", None, "y")


def test_rename_moves_names_and_paths_follow_parents():
    t = NodeTable(K(0))
    d = t.take(K(1), ROOT_ID, "d", True)
    f = t.take(K(2), d, "f", False)
    e = t.take(K(3), ROOT_ID, "e", True)
    assert t.path(f) == "d/f"
    t.rename(ROOT_ID, "d", e, "d2")
    assert t.path(f) == "e/d2/f" and t.child(t.child(e, "d2"), "f") == f
    assert t.child(ROOT_ID, "d") is None
    # renamed over: the target loses its name but stays until FORGET
    g = t.take(K(4), ROOT_ID, "g", False)
    t.rename(d, "f", ROOT_ID, "g")
    assert t.path(f) == "g" and t.path(g) is None and g in t
    assert t.by_key(K(4)) is None


def test_unlink_detaches_the_key_but_keeps_the_node():
    t = NodeTable(K(0))
    f = t.take(K(1), ROOT_ID, "f", False)
    t.opened(f, 7)
    t.unlink(ROOT_ID, "f")
    assert f in t and t.path(f) is None and t.handles(f) == [7]
    # a new object that reuses the backing inode number gets a new node
    g = t.take(K(1), ROOT_ID, "f", False)
    assert g != f
    t.closed(f, 7)
    t.forget(f, 1)
    assert f not in t and t.by_key(K(1)) == g


def test_two_names_path_after_one_is_unlinked():
    t = NodeTable(K(0))
    d = t.take(K(1), ROOT_ID, "d", True)
    a = t.take(K(2), ROOT_ID, "a", False)
    assert t.take(K(2), d, "b", False) == a
    assert t.path(a) == "a"
    t.unlink(ROOT_ID, "a")
    assert t.path(a) == "d/b" and t.by_key(K(2)) == a
    t.unlink(d, "b", keep_key=True)  # other names remain on disk: the key stays
    assert t.path(a) is None and t.by_key(K(2)) == a


def test_hard_link_path_survives_the_forget_of_one_names_directory():
    """The kernel evicts dentries without telling the daemon: a hard link's first known
    name may sit in a directory the kernel has since forgotten, while the file stays
    referenced through another name. Its path must come from a name that still resolves."""
    t = NodeTable(K(0))
    d = t.take(K(1), ROOT_ID, "d", True)
    a = t.take(K(2), d, "x", False)
    assert t.take(K(2), ROOT_ID, "y", False) == a
    t.forget(d, 1)
    assert t.path(a) == "y"


def test_kept_directory_paths_follow_every_name_change():
    """Directories keep their paths between requests (``Node.dir_path``): every change of
    a directory's name, or a directory leaving the table, must void them all, deeper
    paths included; a file's rename moves only the file's own path."""
    t = NodeTable(K(0))
    a = t.take(K(1), ROOT_ID, "a", True)
    b = t.take(K(2), a, "b", True)
    c = t.take(K(3), b, "c", True)
    f = t.take(K(4), c, "f", False)
    assert t.path(f) == "a/b/c/f" and t.path(c) == "a/b/c"
    t.rename(ROOT_ID, "a", ROOT_ID, "a2")           # a grandparent renamed
    assert t.path(f) == "a2/b/c/f" and t.path(c) == "a2/b/c"
    t.rename(a, "b", ROOT_ID, "b2")                 # the parent's parent moved up
    assert t.path(f) == "b2/c/f"
    t.rename(c, "f", b, "f2")                       # a file moved: directories unchanged
    assert t.path(f) == "b2/f2" and t.path(c) == "b2/c"
    t.unlink(b, "c", keep_key=True)                 # its name gone, the object known
    assert t.path(c) is None
    assert t.take(K(3), ROOT_ID, "c3", True) == c   # found again elsewhere (same object)
    assert t.path(c) == "c3"
    # a hard link's first name in a directory the kernel forgot: the next name serves
    g = t.take(K(5), c, "x", False)
    assert t.take(K(5), ROOT_ID, "y", False) == g and t.path(g) == "c3/x"
    e = t.take(K(9), c, "e", True)
    i = t.take(K(10), e, "i", False)
    assert t.path(i) == "c3/e/i"
    t.forget(c, 2)
    assert t.path(g) == "y"
    assert t.path(i) is None  # (its directory's kept path went with the forgotten one)
    # a directory's first name replaced by another object's take
    d = t.take(K(6), ROOT_ID, "d", True)
    h = t.take(K(7), d, "h", False)
    assert t.path(h) == "d/h"
    t.take(K(8), ROOT_ID, "d", True)
    assert t.path(h) is None


@pytest.mark.parametrize("batch", [False, True])
def test_a_directory_forgotten_voids_kept_paths_only_while_it_has_a_name(batch):
    """A directory leaving the table voids the kept paths (its descendants' go through it)
    while it still has a name; one whose last name went first (an ``rm -rf``: RMDIR, then
    its FORGET) is on no kept path since, so the others stay kept (not walked again), by
    FORGET and by BATCH_FORGET alike."""
    t = NodeTable(K(0))
    forget = (lambda n, c: t.forget_all([(n, c)])) if batch else t.forget
    a = t.take(K(1), ROOT_ID, "a", True)
    b = t.take(K(2), a, "b", True)
    gone = t.take(K(3), a, "gone", True)
    below = t.take(K(4), gone, "below", True)
    assert t.dir_path(b) == "a/b" and t.dir_path(below) == "a/gone/below"
    t.unlink(gone, "below")
    t.unlink(a, "gone")                          # nameless now: the loss voided the kept paths
    assert t.dir_path(below) is None and t.dir_path(b) == "a/b"
    kept = t._nodes[b].dir_path
    forget(below, 1)
    forget(gone, 1)
    assert gone not in t and t.dir_path(b) == "a/b" and t._nodes[b].dir_path is kept
    c = t.take(K(5), b, "c", True)
    assert t.dir_path(c) == "a/b/c"
    forget(b, 1)                                 # named: what is below it goes too
    assert t.dir_path(c) is None and t.path(c) is None


def test_very_long_directory_paths_are_walked_not_kept():
    t = NodeTable(K(0))
    parent = ROOT_ID
    for i in range(40):
        parent = t.take(K(i + 1), parent, "n" * 200, True)
    assert t.path(parent) == "/".join(["n" * 200] * 40)
    assert t._nodes[parent].dir_path is None  # 8 KiB: recomputed each time
    t.rename(ROOT_ID, "n" * 200, ROOT_ID, "m")
    assert t.path(parent) == "/".join(["m"] + ["n" * 200] * 39)


def test_rekey():
    t = NodeTable(K(0))
    f = t.take(K(1), ROOT_ID, "f", False)
    epoch = t.epoch
    t.rekey(K(1), K(9))
    assert t.by_key(K(9)) == f and t.by_key(K(1)) is None and t.epoch > epoch
    assert t.take(K(9), ROOT_ID, "f", False) == f


def test_concurrent_takes_of_one_name_yield_one_nodeid():
    t = NodeTable(K(0))
    got: list[int] = []
    start = threading.Barrier(8)

    def work():
        start.wait()
        for _ in range(500):
            got.append(t.take(K(1), ROOT_ID, "x", False))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(got)) == 1 and t.nlookup(got[0]) == 4000 and len(t) == 2


def test_take_listed_refs_held_names_and_takes_keys_only_at_the_listing_epoch():
    t = NodeTable(InodeKey(0, 0))
    held = t.take(K(1), ROOT_ID, "held", False)
    epoch = t.epoch
    got = t.take_listed(ROOT_ID, [("held", K(99), False), ("new", K(2), False),
                                  ("dir", K(3), True), ("again", K(2), False)], epoch)
    # a held name keeps its node whatever the listed key; a key seen twice is one node
    assert got[0] == held and t.nlookup(held) == 2
    assert got[1] == got[3] != got[2] and t.nlookup(got[1]) == 2 and t.nlookup(got[2]) == 1
    assert t.child(ROOT_ID, "again") == got[1] and t.path(got[2]) == "dir"
    # identities moved since the listing: only the names already held are trusted
    t.unlink(ROOT_ID, "dir")
    assert t.epoch != epoch
    got2 = t.take_listed(ROOT_ID, [("new", K(2), False), ("other", K(4), False)], epoch)
    assert got2 == [got[1], 0] and t.by_key(K(4)) is None and t.nlookup(got[1]) == 3
    assert t.take_listed(ROOT_ID, [("other", K(4), False)], None) == [0]


def test_bytes_per_node():
    """The README's bound: measured with tracemalloc (nodes with one name each)."""
    count = 20000
    t = NodeTable(K(0))
    keys = [K(i) for i in range(1, count + 1)]
    names = [f"file{i:06d}" for i in range(count)]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for key, name in zip(keys, names):
        t.take(key, ROOT_ID, name, False)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    per_node = sum(s.size_diff for s in after.compare_to(before, "filename")) / count
    print(f"NodeTable: {per_node:.0f} bytes per node (keys and names excluded)")
    assert 100 < per_node < 600


# -- OverlayOps over real layers --------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.inval: list[int] = []

    def inval_inode(self, nodeid, offset=0, length=0):
        self.inval.append(nodeid)

    def inval_entry(self, parent, name):
        pass

    def delete(self, parent, child, name):
        pass


@pytest.fixture
def stack(tmp_path: Path):
    """lower: f, d/g, a + hl (hard links); an empty upper and workdir."""
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "f").write_bytes(b"lower f\n")
    (lower / "d" / "g").write_bytes(b"lower g\n")
    (lower / "a").write_bytes(b"linked\n")
    os.link(lower / "a", lower / "hl")
    for name in ("upper", "work", "mnt"):
        (tmp_path / name).mkdir()
    return tmp_path


def make_ops(root: Path, *, writable: bool = True, **options):
    cfg = MountConfig(lowers=[str(root / "lower")], upper=str(root / "upper") if writable else None,
                      work=str(root / "work") if writable else None, mountpoint=str(root / "mnt"),
                      **options)
    validate(cfg)
    old = os.umask(0)
    fs = OverlayFS(cfg)
    fs.start()
    ops = OverlayOps(fs)
    ops.notifier = Recorder()
    return ops, lambda: (fs.close(), fs.lookup.invalidate(), os.umask(old))


@pytest.fixture
def ops_factory(stack):
    closers = []

    def make(**kw):
        ops, close = make_ops(stack, **kw)
        closers.append(close)
        return ops

    yield make
    for close in closers:
        close()


def look(ops, path: str) -> int:
    nodeid = ROOT_ID
    for name in path.split("/"):
        entry = ops.lookup(REQ, nodeid, os.fsencode(name))
        assert entry.nodeid, f"{path}: negative entry"
        nodeid = entry.nodeid
    return nodeid


@pytest.mark.parametrize("mode,merged", [("writable", False), ("read-only", True), ("index", True)])
def test_lower_hard_link_names_split_or_merged(ops_factory, mode, merged):
    ops = ops_factory(writable=mode != "read-only", **({"index": True} if mode == "index" else {}))
    a, hl = look(ops, "a"), look(ops, "hl")
    assert (a == hl) is merged
    if merged:
        assert sorted(n for _, n in ops.nodes.names(a)) == ["a", "hl"]


def test_negative_lookup_is_a_cached_entry(ops_factory):
    ops = ops_factory()
    entry = ops.lookup(REQ, ROOT_ID, b"missing")
    assert entry.nodeid == 0 and entry.attr is None and entry.entry_timeout == ops.timeout


@pytest.mark.parametrize("path", ["f", "d"])
def test_copy_up_rekeys_the_node(ops_factory, path):
    """Files and directories alike: the copy-up changes the key, the nodeid stays."""
    ops = ops_factory()
    nodeid = look(ops, path)
    key = ops.nodes.node(nodeid).key
    ops.setattr(REQ, nodeid, SetAttr(p.FATTR_MODE, None, 0, None, None, 0o700, 0, 0))
    new_key = ops.nodes.node(nodeid).key
    assert new_key != key and ops.nodes.by_key(new_key) == nodeid
    assert look(ops, path) == nodeid
    if path == "d":
        assert ops.nodes.path(look(ops, "d/g")) == "d/g"


def test_open_unlinked_file_is_served_through_its_handle(ops_factory):
    ops = ops_factory()
    d = look(ops, "d")
    g = look(ops, "d/g")
    fh = ops.open(REQ, g, os.O_RDWR).fh
    ops.unlink(REQ, d, b"g")
    assert ops.nodes.path(g) is None and ops.lookup(REQ, d, b"g").nodeid == 0
    attr = ops.getattr(REQ, g).attr
    assert attr.nlink == 0 and attr.size == 8
    attr = ops.setattr(REQ, g, SetAttr(p.FATTR_MODE | p.FATTR_SIZE, None, 3, None, None,
                                       stat.S_IFREG | 0o600, 0, 0)).attr
    assert stat.S_IMODE(attr.mode) == 0o600 and attr.size == 3
    buf = bytearray(16)
    assert bytes(buf[:ops.read(REQ, g, fh, memoryview(buf), 0)]) == b"low"
    ops.release(REQ, g, fh)
    with pytest.raises(OSError) as e:
        ops.getattr(REQ, g)
    assert e.value.errno == errno.ENOENT


def test_rename_of_an_open_file_to_a_fuse_hidden_name_is_a_rename(stack):
    """libfuse's ``.fuse_hidden*`` names are not special any more: the old core took a
    rename of an open file to such a name as an unlink, and the file vanished."""
    ops, close = make_ops(stack)
    fs = ops.fs
    try:
        fh = fs.open("f", os.O_RDONLY).fh
        hidden = ".fuse_hidden0123456789abcdef"
        fs.rename("f", hidden)
        assert fs.getattr(hidden).st.st_size == 8
        assert hidden in [e.name for e in fs.readdir("")]
        fs.release(fh)
    finally:
        close()


def test_metacopy_files_are_attribute_cached_and_invalidated_at_their_data_copy_up(ops_factory):
    """A metacopy file's data copy-up (an open for writing) changes its mtime, blocks and
    ctime, and invalidates its cached attributes before the open's reply (``_copied_up``,
    notify49): its attributes are cached for the mount's timeout (fix50; 0 before, from
    when that invalidation was queued and could come after the next ``stat``: review45c)."""
    ops = ops_factory(metacopy=True)
    ops.fs.chmod("f", 0o600)  # a metadata-only copy
    assert os.getxattr(ops.fs.stack.upper.path + "/f", "trusted.overlay.metacopy") == b""
    entry = ops.lookup(REQ, ROOT_ID, b"f")
    assert entry.attr_timeout == ops.timeout > 0
    assert ops.getattr(REQ, entry.nodeid).timeout == ops.timeout
    ops.notifier.inval.clear()
    fh = ops.open(REQ, entry.nodeid, os.O_WRONLY).fh
    assert ops.notifier.inval == [entry.nodeid]  # (written before the reply: notify49)
    ops.release(REQ, entry.nodeid, fh)
    assert ops.getattr(REQ, entry.nodeid).timeout == ops.timeout


def test_split_hard_link_names_are_never_attribute_cached(ops_factory):
    """An open for writing copies up a split lower hard-link name and changes its st_nlink
    and st_ino with no reply carrying attributes: the kernel must not cache them. Merged
    names, and the name once copied up, are cached for the mount's timeout."""
    ops = ops_factory()
    entry = ops.lookup(REQ, ROOT_ID, b"a")
    assert entry.attr_timeout == 0 and ops.getattr(REQ, entry.nodeid).timeout == 0
    assert ops.lookup(REQ, ROOT_ID, b"f").attr_timeout == ops.timeout > 0
    fh = ops.open(REQ, entry.nodeid, os.O_WRONLY).fh
    ops.release(REQ, entry.nodeid, fh)
    assert ops.getattr(REQ, entry.nodeid).timeout == ops.timeout


def test_readdirplus_takes_one_reference_per_entry(ops_factory):
    ops = ops_factory()
    d = look(ops, "d")
    fh = ops.opendir(REQ, d).fh
    items = list(ops.readdir(REQ, d, fh, 0, True))
    assert [i.name for i in items[:2]] == [b".", b".."] and items[0].take is None
    (g,) = [i for i in items if i.name == b"g"]
    entry = g.take()
    assert ops.nodes.nlookup(entry.nodeid) == 1 and look(ops, "d/g") == entry.nodeid
    rest = list(ops.readdir(REQ, d, fh, g.offset, True))
    assert all(i.name != b"g" for i in rest)
    ops.releasedir(REQ, d, fh)


def test_readdirplus_takes_a_replys_entries_at_once_as_one_by_one(stack, ops_factory):
    """``take_entries`` (one reply's items at once) gives what each item's ``take`` gives:
    the lookup's node and getattr's attributes, and a name listed before identities
    moved (here: a rename over another listed name) is looked up afresh."""
    seen = []
    for batch in (False, True):  # (one mount of the layers at a time)
        ops, close = make_ops(stack)
        try:
            items = [i for i in ops.readdir(REQ, ROOT_ID, ops.opendir(REQ, ROOT_ID).fh, 0, True)
                     if i.take is not None]
            assert sorted(i.name for i in items) == [b"d", b"f"]  # a, hl: hard links, none
            entries = (ops.take_entries(REQ, ROOT_ID, items) if batch
                       else [i.take() for i in items])
            for item, entry in zip(items, entries):
                assert look(ops, os.fsdecode(item.name)) == entry.nodeid
                assert ops.nodes.nlookup(entry.nodeid) == 2
                assert entry.attr == ops.getattr(REQ, entry.nodeid, None).attr
            seen.append([(i.name, e.attr.ino, e.attr.mode, e.entry_timeout, e.attr_timeout)
                         for i, e in zip(items, entries)])
        finally:
            close()
    assert seen[0] == seen[1]
    # a listing read, then "a" renamed over "f" (a name the table holds: its epoch moves):
    # the listed stat of "f" is stale
    ops = ops_factory()
    old = look(ops, "f")
    items = {i.name: i for i in ops.readdir(REQ, ROOT_ID, ops.opendir(REQ, ROOT_ID).fh, 0, True)}
    ops.rename(REQ, ROOT_ID, b"a", ROOT_ID, b"f", 0)
    (entry,) = ops.take_entries(REQ, ROOT_ID, [items[b"f"]])
    assert entry.nodeid == look(ops, "f") != old and entry.attr.size == len(b"linked\n")


@pytest.mark.parametrize("batch", [False, True])
def test_a_listed_name_replaced_by_a_rename_the_table_did_not_see_is_looked_up(ops_factory,
                                                                              batch):
    """A listing read, then "b" renamed over "f" where the node table holds neither name
    (its epoch does not move): the listed stat of "f" is stale all the same, so the entry
    is looked up afresh (before: keyed by the lower file's stat, a node no lookup gives,
    with the old attributes)."""
    ops = ops_factory()
    entry, opened = ops.create(REQ, ROOT_ID, b"b", os.O_WRONLY, 0o644)
    ops.write(REQ, entry.nodeid, opened.fh, b"four", 0, 0)
    ops.release(REQ, entry.nodeid, opened.fh)
    ops.forget(entry.nodeid, 1)
    items = {i.name: i for i in ops.readdir(REQ, ROOT_ID, ops.opendir(REQ, ROOT_ID).fh, 0, True)}
    assert ops.nodes.child(ROOT_ID, "f") is None and ops.nodes.child(ROOT_ID, "b") is None
    ops.rename(REQ, ROOT_ID, b"b", ROOT_ID, b"f", 0)
    (got,) = ops.take_entries(REQ, ROOT_ID, [items[b"f"]]) if batch else [items[b"f"].take()]
    assert got.nodeid == look(ops, "f") and got.attr.size == 4


def test_stats_count_nodes(ops_factory):
    ops = ops_factory()
    look(ops, "d/g")
    data = json.loads(ops.getxattr(REQ, ROOT_ID, STATS_XATTR))
    assert data["nodes"] == 3


@pytest.mark.parametrize("noacl", [False, True])
def test_init_flags(ops_factory, noacl):
    ops = ops_factory(noacl=noacl)
    offered = (1 << 40) - 1
    conn = ConnInfo(7, 45, offered)
    ops.init(conn)
    acl = p.POSIX_ACL | p.DONT_MASK
    assert conn.wanted & WANTED == WANTED and bool(conn.wanted & acl) is not noacl
    assert not conn.wanted & (p.WRITEBACK_CACHE | p.READDIRPLUS_AUTO | p.EXPORT_SUPPORT)


def test_concurrent_lookups_during_a_copy_up_yield_one_nodeid(ops_factory):
    """Lookups of one name on several threads while a copy-up changes its key: the epoch
    check makes every lookup land on the one node."""
    ops = ops_factory()
    got: list[int] = []
    start = threading.Barrier(5)

    def looker():
        start.wait()
        for _ in range(200):
            got.append(ops.lookup(REQ, ROOT_ID, b"f").nodeid)

    def chmod():
        start.wait()
        ops.fs.chmod("f", 0o600)  # the copy-up

    threads = [threading.Thread(target=looker) for _ in range(4)] + [threading.Thread(target=chmod)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(got)) == 1 and ops.nodes.nlookup(got[0]) == 800
    assert ops.nodes.by_key(ops.fs.identity(ops.fs.lookup.lookup("f"))) == got[0]


def test_lookup_reads_the_object_once(ops_factory):
    """A LOOKUP takes the attributes and the identity from one lookup of the layers."""
    ops = ops_factory()
    calls = []
    real = ops.fs.lookup.lookup
    ops.fs.lookup.lookup = lambda rel: calls.append(rel) or real(rel)
    entry = ops.lookup(REQ, ROOT_ID, b"f")
    assert entry.nodeid and calls == ["f"]


def test_flush_answers_enosys(ops_factory):
    """FLUSH does nothing a close needs (writes are on the layer before their reply): ENOSYS
    tells the kernel to stop sending it, a round trip saved per close(2)."""
    ops = ops_factory()
    fh = ops.open(REQ, look(ops, "f"), os.O_RDONLY).fh
    with pytest.raises(OSError) as e:
        ops.flush(REQ, look(ops, "f"), fh)
    assert e.value.errno == errno.ENOSYS


def test_file_path_is_path():
    """``NodeTable.file_path`` (the short OPEN's: one name in a kept directory or the root
    without the walk) answers ``path`` through every change of the kept-paths test above:
    renames of a grandparent, a parent, the file; an unlinked name, a hard link whose first
    directory was forgotten, a directory replaced; ESTALE for an unknown node."""
    t = NodeTable(K(0))
    made: list[int] = []

    def same():
        for n in made:
            got = t.file_path(n)
            assert got == t.path(n), n
    a = t.take(K(1), ROOT_ID, "a", True)
    b = t.take(K(2), a, "b", True)
    c = t.take(K(3), b, "c", True)
    f = t.take(K(4), c, "f", False)
    top = t.take(K(11), ROOT_ID, "top", False)
    made += [a, b, c, f, top]
    same()
    assert t.file_path(f) == "a/b/c/f" and t.file_path(top) == "top"
    t.rename(ROOT_ID, "a", ROOT_ID, "a2")
    same()
    assert t.file_path(f) == "a2/b/c/f"
    t.rename(a, "b", ROOT_ID, "b2")
    same()
    t.rename(c, "f", b, "f2")
    same()
    assert t.file_path(f) == "b2/f2"
    t.unlink(b, "c", keep_key=True)
    same()
    assert t.file_path(c) is None
    t.take(K(3), ROOT_ID, "c3", True)
    g = t.take(K(5), c, "x", False)
    assert t.take(K(5), ROOT_ID, "y", False) == g
    e = t.take(K(9), c, "e", True)
    i = t.take(K(10), e, "i", False)
    made += [g, e, i]
    same()
    t.forget(c, 2)
    made.remove(c)
    assert t.file_path(g) == "y" and t.file_path(i) is None
    same()
    d = t.take(K(6), ROOT_ID, "d", True)
    h = t.take(K(7), d, "h", False)
    made += [d, h]
    same()
    t.take(K(8), ROOT_ID, "d", True)
    assert t.file_path(h) is None
    same()
    for probe in (t.file_path, t.path):
        with pytest.raises(OSError) as err:
            probe(99999)
        assert err.value.errno == errno.ESTALE
