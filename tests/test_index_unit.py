"""Unit tests of ``overlaypc/index.py`` (``IndexDir``), without mounts and without root.

The index is driven directly on plain directories under tmp_path: a work layer holding
``index/``, an upper layer whose names are hard links to index entries (as copy-up makes
them), and a lower layer with a hard-linked file. The xattrs use the ``user.overlay.``
prefix (``-o userxattr``), which an unprivileged user may set on the filesystem of tmp_path
(checked first). What the kernel does is written out where a test imitates it: its
``trusted.overlay.nlink`` is "U%+i" (overlay link count minus the upper inode's) or the
same relative to the lower inode ("L%+i"), and it updates only that xattr.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest

import helpers
from overlaypc import sysapi, whiteout
from overlaypc.index import INDEX_DIR, IndexDir
from overlaypc.layer import Layer
from overlaypc.lookup import Entry

PREFIX = whiteout.xattr_prefix(userxattr=True)
OWN = PREFIX + "overlaypc.nlink"
KERNEL = PREFIX + "nlink"
ORIGIN = PREFIX + "origin"


def _user_xattrs_work(where: Path) -> bool:
    probe = where / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.overlay.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


class Stack:
    """lower (``a``, ``b``, ``sub/c``: one inode; ``single``), upper and work layers."""

    def __init__(self, root: Path) -> None:
        helpers.require(_user_xattrs_work(root), f"needs user xattrs on {root}")
        helpers.build_layer(root / "lower", {"a": "lower data", "sub": {}, "single": "one"})
        os.link(root / "lower/a", root / "lower/b")
        os.link(root / "lower/a", root / "lower/sub/c")
        (root / "upper").mkdir()
        (root / "work").mkdir()
        self.root = root
        self.lower = Layer(str(root / "lower"), 2, writable=False)
        self.upper = Layer(str(root / "upper"), 0, writable=True)
        self.work = Layer(str(root / "work"), 1, writable=True)
        self.index = IndexDir(self.work, PREFIX)
        self.index.prepare()

    def close(self) -> None:
        for layer in (self.lower, self.upper, self.work):
            layer.close()

    def entry(self, layer: Layer, rel: str) -> Entry:
        st = layer.lstat(rel)
        assert st is not None, rel
        return Entry(layer, rel, st)

    def lower_entry(self, rel: str = "a") -> Entry:
        return self.entry(self.lower, rel)

    def copy_up(self, *names: str) -> Entry:
        """What an index=on copy-up leaves: ``index/<key>`` (data + origin xattr) and each
        of ``names`` an upper hard link to it. Returns the index entry."""
        key = self.index.key(self.lower_entry())
        path = self.root / "work" / INDEX_DIR / key
        if not path.exists():
            path.write_bytes((self.root / "lower/a").read_bytes())
            os.setxattr(path, ORIGIN, bytes.fromhex(key))
        for name in names:
            os.link(path, self.root / "upper" / name)
        return self.entry(self.work, self.index.rel(key))

    def index_path(self, entry: Entry) -> Path:
        return self.root / "work" / entry.rel

    def xattr(self, entry: Entry, name: str) -> bytes | None:
        try:
            return os.getxattr(self.index_path(entry), name)
        except OSError:
            return None


@pytest.fixture
def s(tmp_path):
    stack = Stack(tmp_path)
    yield stack
    stack.close()


def kernel_value(overlay_nlink: int, upper_nlink: int) -> bytes:
    """trusted.overlay.nlink as the kernel's ovl_set_nlink_upper writes it."""
    return b"U%+d" % (overlay_nlink - upper_nlink)


# --------------------------------------------------------------------------------------
# Names of index entries
# --------------------------------------------------------------------------------------

def test_prepare_makes_a_private_index_dir_once(s):
    s.index.prepare()  # again: no error
    st = os.stat(s.root / "work" / INDEX_DIR)
    assert st.st_mode & 0o777 == 0o700


def test_key_is_the_kernels_origin_of_the_lower_inode(s):
    keys = {rel: s.index.key(s.lower_entry(rel)) for rel in ("a", "b", "sub/c", "single")}
    assert keys["a"] == keys["b"] == keys["sub/c"], "names of one inode share one index name"
    assert keys["single"] != keys["a"]
    assert re.fullmatch(r"[0-9a-f]+", keys["a"])
    # struct ovl_fb: the lower filesystem's UUID and the file handle of the lower inode
    parsed = sysapi.parse_ovl_origin(bytes.fromhex(keys["a"]))
    assert parsed is not None
    uuid, handle_type, fid = parsed
    assert uuid == s.lower.uuid
    fd = os.open(s.root / "lower/a", os.O_PATH)
    try:
        assert (handle_type, fid) == sysapi.name_to_handle(fd)
    finally:
        os.close(fd)


def test_key_handle_opens_the_lower_inode(s):
    """open_by_handle_at needs CAP_DAC_READ_SEARCH: the one root-only check."""
    helpers.require("root")
    _, handle_type, fid = sysapi.parse_ovl_origin(bytes.fromhex(s.index.key(s.lower_entry())))
    fd = sysapi.open_by_handle(s.lower.mount_fd, handle_type, fid)
    try:
        assert os.fstat(fd).st_ino == os.stat(s.root / "lower/a").st_ino
    finally:
        os.close(fd)


def test_eligible_only_multiply_linked_regular_files(s):
    assert IndexDir.eligible(s.lower_entry("a"))
    assert not IndexDir.eligible(s.lower_entry("single"))
    assert not IndexDir.eligible(s.lower_entry("sub"))


def test_find_only_a_regular_index_file(s):
    lower = s.lower_entry("b")
    assert s.index.find(lower) is None  # nothing copied up yet
    made = s.copy_up()
    found = s.index.find(lower)
    assert found is not None and found.rel == made.rel == f"{INDEX_DIR}/{s.index.key(lower)}"
    assert (found.st.st_dev, found.st.st_ino) == (made.st.st_dev, made.st.st_ino)
    os.unlink(s.index_path(made))
    os.mkdir(s.index_path(made))
    # a directory (or a whiteout) there is no index entry of a file, and no lower file to
    # read in its place either: EIO, as the kernel's "bad index found" (index45)
    with pytest.raises(OSError) as e:
        s.index.find(lower)
    assert e.value.errno == errno.EIO
    os.rmdir(s.index_path(made))
    os.mknod(s.index_path(made), stat.S_IFCHR | 0o600, 0)
    with pytest.raises(OSError) as e:
        s.index.find(lower)
    assert e.value.errno == errno.EIO
    assert s.index.find(s.lower_entry("single")) is None


def test_of_upper_needs_a_link_to_the_named_index_entry(s):
    made = s.copy_up("a", "b")
    got = s.index.of_upper(s.entry(s.upper, "a"))
    assert got is not None and got.rel == made.rel
    # a copy with the same origin but its own inode is not a name of the index entry
    (s.root / "upper/copy").write_bytes(b"x")
    os.link(s.root / "upper/copy", s.root / "upper/copy2")
    os.setxattr(s.root / "upper/copy", ORIGIN, bytes.fromhex(made.rel.split("/")[1]))
    assert s.index.of_upper(s.entry(s.upper, "copy")) is None
    # nlink 1, or no origin: not indexed
    (s.root / "upper/alone").write_bytes(b"x")
    os.setxattr(s.root / "upper/alone", ORIGIN, bytes.fromhex(made.rel.split("/")[1]))
    assert s.index.of_upper(s.entry(s.upper, "alone")) is None
    os.removexattr(s.root / "upper/copy", ORIGIN)
    assert s.index.of_upper(s.entry(s.upper, "copy")) is None


# --------------------------------------------------------------------------------------
# Link counts
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, kernel", [(3, b"U+1"), (2, b"U+0"), (1, b"U-1"), (-4, b"U-2")])
def test_set_nlink_writes_ours_and_the_kernels_relative_count(s, value, kernel):
    made = s.copy_up("a")  # index inode: 2 links
    s.index.set_nlink(made.rel, value)
    assert s.xattr(made, OWN) == str(max(value, 0)).encode()
    assert s.xattr(made, KERNEL) == kernel == kernel_value(max(value, 0), 2)
    assert re.fullmatch(rb"U[+-]\d+", s.xattr(made, KERNEL))  # the kernel needs the sign


@pytest.mark.parametrize("own, kernel, lower_nlink, expected", [
    (b"7", b"U+0", 3, 2),        # the kernel's wins: a kernel mounting the upper updates only it
    (b"7", None, 3, 7),          # ours stands in
    (b"7", b"X+1", 3, 7),
    (None, b"U+1", 3, 3),        # upper inode 2 + 1
    (None, b"U-1", 3, 1),
    (None, b"L+0", 3, 3),        # relative to the lower inode
    (None, b"L+2", 3, 5),
    (None, b"L+0", None, 1),     # no lower known: fallback (index links - 1)
    (None, b"U-2", 3, 1),        # would be 0: fallback
    (None, b"X+1", 3, 1),        # malformed: fallback
    (None, b"U+x", 3, 1),
    (b"bad", b"U+1", 3, 3),      # ours unreadable: the kernel's
    (None, None, 3, 1),
])
def test_nlink_reads_the_kernels_else_ours(s, own, kernel, lower_nlink, expected):
    made = s.copy_up("a")
    for name, value in ((OWN, own), (KERNEL, kernel)):
        if value is not None:
            os.setxattr(s.index_path(made), name, value)
    lower = os.stat(s.root / "lower/a") if lower_nlink else None
    assert lower is None or lower.st_nlink == lower_nlink
    assert s.index.nlink(s.entry(s.work, made.rel), lower) == expected


@pytest.mark.parametrize("own, legacy, kernel, expected", [
    (None, b"7", None, 7),        # only the pre-d71628d count (user.overlaypc.nlink): it stands in
    (b"5", b"7", None, 5),        # today's own count first
    (None, b"7", b"U+1", 3),      # the kernel's wins
    (None, b"bad", None, 1),      # unreadable: fallback (index links - 1)
])
def test_nlink_reads_the_count_of_an_older_overlaypc(s, own, legacy, kernel, expected):
    """overlaypc before d71628d kept its count as ``<ns>.overlaypc.nlink`` (``user.`` here:
    ``userxattr``), which nothing read after; it stands in where no other count is."""
    made = s.copy_up("a")
    assert s.index.legacy_nlink_xattr == "user.overlaypc.nlink"
    for name, value in ((OWN, own), (s.index.legacy_nlink_xattr, legacy), (KERNEL, kernel)):
        if value is not None:
            os.setxattr(s.index_path(made), name, value)
    lower = os.stat(s.root / "lower/a")
    assert s.index.nlink(s.entry(s.work, made.rel), lower) == expected


def test_copy_up_link_and_unlink_move_the_count(s):
    """The sequence overlaypc's copy-up, link and unlink use; after each step both xattrs
    say the overlay count, the kernel's relative to the index inode's own links."""
    def check(expected: int) -> None:
        entry = s.entry(s.work, made.rel)
        assert s.index.nlink(entry) == expected
        assert s.xattr(entry, KERNEL) == kernel_value(expected, entry.st.st_nlink)

    made = s.copy_up()
    s.index.set_nlink(made.rel, 3)                  # copy-up: the lower's count
    check(3)
    os.link(s.index_path(made), s.root / "upper/a")  # the copied name becomes a link
    s.index.sync(made.rel)
    check(3)                                        # a name moved up: same count
    os.link(s.index_path(made), s.root / "upper/d")  # link a d through the mount
    s.index.adjust(made, +1)
    check(4)
    os.unlink(s.root / "upper/d")                   # unlink d
    s.index.adjust(made, -1)
    check(3)
    s.index.adjust(made, -1, links=0)               # unlink of a lower-only name (whiteout)
    check(2)


def test_adjust_of_a_vanished_index_entry_is_a_no_op(s):
    made = s.copy_up()
    os.unlink(s.index_path(made))
    s.index.adjust(made, +1)
    assert not s.index_path(made).exists()


def _kernel_made(s) -> Entry:
    """An index entry as the kernel leaves it after copying up ``a``: 2 links (index, a),
    overlay count 3, only the kernel's relative xattr."""
    made = s.copy_up("a")
    os.setxattr(s.index_path(made), KERNEL, kernel_value(3, 2))
    assert s.index.nlink(s.entry(s.work, made.rel)) == 3
    return made


@pytest.mark.parametrize("step", ["link", "copy_up"])
def test_kernel_made_index_counts_each_change_once(s, step):
    made = _kernel_made(s)
    if step == "link":
        os.link(s.index_path(made), s.root / "upper/d")  # link a d: overlay count 3 -> 4
        s.index.adjust(made, +1)
        expected = 4
    else:
        os.link(s.index_path(made), s.root / "upper/b")  # copy-up of b: count stays 3
        s.index.sync(made.rel)
        expected = 3
    assert s.index.nlink(s.entry(s.work, made.rel)) == expected


def test_count_follows_a_change_made_by_the_kernel(s):
    made = s.copy_up("a")
    s.index.set_nlink(made.rel, 3)
    # the kernel mounts this upper and links a to d: one more upper link, and it rewrites
    # only its own xattr (ovl_set_nlink_upper: overlay 4 - upper inode 3)
    os.link(s.index_path(made), s.root / "upper/d")
    os.setxattr(s.index_path(made), KERNEL, kernel_value(4, 3))
    assert s.index.nlink(s.entry(s.work, made.rel)) == 4


# --------------------------------------------------------------------------------------
# Counts and origins kept between GETATTRs (index45)
# --------------------------------------------------------------------------------------

def _same_ctime(st: os.stat_result, like: os.stat_result) -> os.stat_result:
    """``st`` with the ctime of ``like``: what a filesystem with coarse timestamps may show
    after a change made within one tick."""
    fields = list(st)
    fields[9] = like.st_ctime
    return os.stat_result(fields, {"st_ctime_ns": like.st_ctime_ns})


def test_counts_kept_are_dropped_by_a_count_written(s):
    """A count written through the index is read back, also where the entry's ctime and
    links did not move (a coarse clock): kept counts go with every write."""
    made = s.copy_up("a")
    s.index.set_nlink(made.rel, 3)
    before = s.entry(s.work, made.rel)
    assert s.index.nlink(before) == 3
    assert s.index.nlink(before) == 3  # (kept: the entry's stat is the same)
    s.index.set_nlink(made.rel, 5)
    after = Entry(s.work, made.rel, _same_ctime(s.entry(s.work, made.rel).st, before.st))
    assert s.index.nlink(after) == 5
    s.index.adjust(after, -1, links=0)  # (a whiteout over a lower name)
    assert s.index.nlink(Entry(s.work, made.rel, _same_ctime(after.st, before.st))) == 4


def test_counts_kept_follow_a_change_behind_the_index(s):
    """A change the index did not write (the kernel's, on a later mount of the layers)
    moves the entry's ctime or links: the count is read again."""
    made = s.copy_up("a")
    s.index.set_nlink(made.rel, 3)
    assert s.index.nlink(s.entry(s.work, made.rel)) == 3
    os.setxattr(s.index_path(made), KERNEL, kernel_value(7, 2))  # (moves the ctime)
    assert s.index.nlink(s.entry(s.work, made.rel)) == 7
    os.link(s.index_path(made), s.root / "upper/d")  # 3 links now: "U+5" says 8
    assert s.index.nlink(s.entry(s.work, made.rel)) == 8


def test_origin_kept_only_when_found(s):
    """A kept origin is checked against the inode it names (``same_file``); a file
    without one keeps nothing, so an origin it gets later is found."""
    made = s.copy_up("a")
    upper_a = s.entry(s.upper, "a")
    assert s.index.of_upper(upper_a).rel == made.rel
    assert s.index.of_upper(upper_a).rel == made.rel  # (kept)
    (s.root / "upper/x").write_bytes(b"x")
    os.link(s.root / "upper/x", s.root / "upper/y")
    # none is kept for a file without origin: one set later is read, also where the
    # file's ctime did not move (a coarse clock)
    x = s.entry(s.upper, "x")
    assert s.index.of_upper(x) is None
    origin = bytes.fromhex(made.rel.split("/")[1])
    os.setxattr(s.root / "upper/x", ORIGIN, origin)
    assert s.index._origin(x, None) == origin


# --------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------

def test_key_cache_is_bounded(s):
    """As bounded as the module's other table (65536): 70,000 distinct lower inodes (one
    real file under fabricated (st_dev, st_ino) identities, which is what the cache keys)."""
    real = s.lower_entry("a").st
    for i in range(70_000):
        fake = os.stat_result((real.st_mode, 10_000_000 + i, real.st_dev, 2, 0, 0, 1, 0, 0, 0))
        s.index.key(Entry(s.lower, "a", fake))
    assert len(s.index._keys) <= 65536


def test_kept_counts_and_origins_are_bounded(s):
    made = s.copy_up("a")
    real = s.entry(s.work, made.rel).st
    upper = s.entry(s.upper, "a").st
    for i in range(20_000):
        fake = os.stat_result((real.st_mode, 10_000_000 + i, real.st_dev, 2, 0, 0, 1, 0, 0, 0))
        s.index.nlink(Entry(s.work, made.rel, fake))
        fake = os.stat_result((upper.st_mode, 10_000_000 + i, upper.st_dev, 2, 0, 0, 1, 0, 0, 0))
        s.index.of_upper(Entry(s.upper, "a", fake))
    assert len(s.index._nlinks) <= 16384 and len(s.index._origins) <= 16384


def test_inuse_reads_kernel_overlay_dirs_from_mountinfo(tmp_path):
    """``inuse.refuse_held``: an overlay line's upperdir or workdir (octal escapes undone:
    a comma, a space, a backslash) that is this stack's upperdir, workdir or a lowerdir
    refuses it (EBUSY); another fstype's, or a directory elsewhere, does not."""
    from types import SimpleNamespace

    from overlaypc import inuse
    upper, work, elsewhere = tmp_path / "up, per\\x", tmp_path / "work", tmp_path / "other"
    lower = tmp_path / "low er"
    for d in (upper, work, elsewhere, lower):
        d.mkdir()

    def layer(p):
        st = os.stat(p)
        return SimpleNamespace(dev=st.st_dev, root_ino=st.st_ino, path=str(p))
    stack = SimpleNamespace(upper=layer(upper), work=layer(work), lowers=[layer(lower)])

    def esc(p):
        return str(p).replace("\\", "\\134").replace(",", "\\054").replace(" ", "\\040")

    def refused(fstype, up, wk):
        info = tmp_path / "mountinfo"
        info.write_text(f"1 2 0:1 / /mnt\\040k rw - {fstype} overlay rw,lowerdir=/l,"
                        f"upperdir={esc(up)},workdir={esc(wk)},index=on\n")
        try:
            inuse.refuse_held(stack, str(info))
        except OSError as e:
            assert e.errno == errno.EBUSY and "/mnt k" in str(e)
            return True
        return False

    assert refused("overlay", upper, elsewhere)
    assert refused("overlay", elsewhere, work)
    assert refused("overlay", lower, elsewhere)
    assert refused("overlay", elsewhere, lower)
    assert not refused("overlay", elsewhere, elsewhere)
    assert not refused("fuse.overlaypc", upper, work)
