"""Directories' ``st_nlink`` and ``st_ino``/``st_dev`` as the kernel overlay shows them
(nlink16), the kernel's ``mount -t overlay`` as the oracle.

The kernel (``ovl_getattr``): a merged directory (an upper part over a lower one, or parts
in two lowers; the root with an upper is always merged) shows ``st_nlink`` 1, "unknown": a
tool that trusts ``nlink - 2`` as its count of subdirectories (fts's leaf optimisation,
``find`` without ``-noleaf``, some backup tools) would skip subdirectories of a merged
directory whose real count, the upper's or the lower's alone, undercounts them. An upper-only
or a lower-only directory shows its real count. The root shows the upper root's inode number
(the top lower root's without an upper); any other merged directory its topmost lower's.

Each run does the same operations on the kernel overlay and on overlaypc, each over its own
copy of one lower tree, and compares, for every object: which layer object its ``st_ino``
is (upper or lower, and its path there: the numbers themselves differ between the copies),
its ``st_nlink``, and whether its ``st_dev`` is the mount's. Runs: same filesystem, lower
and upper on two tmpfs with ``xino=on``, ``index=on``; ``redirect_dir=on`` in each (the
rename of a merged directory). Listings: ``d_ino`` of every entry, of ``.`` and of ``..``
is the ``st_ino`` of what they name (the root's ``..`` is the root).
"""
from __future__ import annotations

import ctypes
import os
import stat
import struct
from pathlib import Path

import pytest

import helpers
from helpers import Dir, File
from upper_support import stack_options

LOWER = {
    "m": Dir({"a": Dir(), "b": Dir({"deep": Dir()}), "f": File("f")}),  # merged (mkdir m/c)
    "lo": Dir({"s1": Dir(), "s2": Dir(), "g": File("g")}),  # lower-only
    "rmk": Dir({"s1": Dir(), "s2": Dir(), "keep": File("k")}),  # rmdir s1, mkdir s3
    "cu": Dir({"f": File("c"), "sub": Dir()}),  # copied up by a write of cu/f
    "rn": Dir({"s": Dir(), "g": File("g")}),  # renamed to up/rn2 (a redirect)
    "op": Dir({"s": Dir()}),  # removed and made again: opaque, upper-only
    "file": File("x"),
}

#: ours, the kernel's, whether lower and upper sit on two filesystems
RUNS = {
    "samefs": ("redirect_dir=on", ("redirect_dir=on",), False),
    "xino": ("redirect_dir=on,xino=on", ("redirect_dir=on", "xino=on"), True),
    "index": ("redirect_dir=on,index=on", ("redirect_dir=on", "index=on"), False),
}


def _operations(mnt: Path, tree: str) -> None:
    os.mkdir(mnt / "up")  # upper-only, with subdirectories
    os.mkdir(mnt / "up/x")
    os.mkdir(mnt / "up/y")
    if tree == "empty":
        return
    os.mkdir(mnt / "m/c")  # merged: subdirectories on both sides
    os.rmdir(mnt / "rmk/s1")
    os.mkdir(mnt / "rmk/s3")
    with open(mnt / "cu/f", "ab") as f:
        f.write(b"more")
    os.rename(mnt / "rn", mnt / "up/rn2")
    os.rmdir(mnt / "op/s")
    os.rmdir(mnt / "op")
    os.mkdir(mnt / "op")
    os.mkdir(mnt / "op/t")


_SYS_GETDENTS64 = 217 if os.uname().machine == "x86_64" else 61


def _dents(path: Path) -> dict[str, int]:
    """name -> d_ino of every entry getdents64 gives, ``.`` and ``..`` too."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(65536)
    out: dict[str, int] = {}
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            n = libc.syscall(_SYS_GETDENTS64, fd, buf, len(buf))
            if n < 0:
                raise OSError(ctypes.get_errno(), "getdents64", str(path))
            if n == 0:
                return out
            at = 0
            while at < n:
                ino, _, reclen = struct.unpack_from("<QqH", buf.raw, at)
                out[os.fsdecode(buf.raw[at + 19:at + reclen].split(b"\0", 1)[0])] = ino
                at += reclen
    finally:
        os.close(fd)


def _paths(mnt: Path) -> list[str]:
    """Every path of the merged tree, the root as ""."""
    out = [""]
    for dirpath, dirnames, filenames in os.walk(mnt):
        rel = os.path.relpath(dirpath, mnt)
        for name in dirnames + filenames:
            out.append(name if rel == "." else f"{rel}/{name}")
    return sorted(out)


class Layout:
    """Which layer object an ``st_ino`` is: ("upper"|"lower", path there)."""

    def __init__(self, upper: Path | None, lower: Path, two_fs: bool) -> None:
        self.two_fs = two_fs
        self.known: dict[tuple[bool, int], tuple[str, str]] = {}
        for role, root in (("lower", lower), ("upper", upper)):
            if root is None:
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                for name in [""] + dirnames + filenames:
                    p = os.path.join(dirpath, name) if name else dirpath
                    rel = os.path.relpath(p, root)
                    self.known[(two_fs and role == "lower", os.lstat(p).st_ino)] = \
                        (role, "" if rel == "." else rel)

    def label(self, ino: int) -> tuple[str, str]:
        # with xino, a lower filesystem's number has its layer in the top bits (the
        # kernel's and overlaypc's schemes differ beyond that); the upper's are bare
        key = (ino >> 48 != 0, ino & ((1 << 48) - 1)) if self.two_fs else (False, ino)
        return self.known.get(key, ("?", hex(ino)))


def observe(mnt: Path, layout: Layout, paths: list[str] | None = None) -> dict:
    """path -> (layer object of its st_ino, st_nlink, st_dev is the mount's) by
    ``lstat`` (``paths``: only these, without listing anything first). Otherwise each
    directory is listed and its entries ``lstat``'ed at once, before any of them is listed:
    what ``stat`` shows then are the listing's (READDIRPLUS) attributes, directories' too
    (listing a directory voids its own: the kernel marks its atime stale)."""
    root_dev = os.lstat(mnt).st_dev
    out = {}

    def see(rel: str) -> os.stat_result:
        st = os.lstat(mnt / rel)
        out[rel] = (layout.label(st.st_ino), st.st_nlink, st.st_dev == root_dev)
        return st

    if paths is not None:
        for rel in paths:
            see(rel)
        return out
    see("")
    todo = [""]
    while todo:
        rel = todo.pop()
        for name in sorted(os.listdir(mnt / rel)):
            child = f"{rel}/{name}" if rel else name
            if stat.S_ISDIR(see(child).st_mode):
                todo.append(child)
    return dict(sorted(out.items()))


def listing_mismatches(mnt: Path, *, root_parent: bool = True) -> list[str]:
    """Every ``d_ino`` (``.`` and ``..`` too) that is not the ``st_ino`` of what it names.
    ``root_parent`` False: the root's ``..`` is not looked at (the kernel overlay gives
    there the upper root's parent's real number, the listing's own ``..``)."""
    bad = []
    for rel in _paths(mnt):
        here = mnt / rel
        if not stat.S_ISDIR(os.lstat(here).st_mode):
            continue
        parent = here if rel == "" else here.parent
        for name, d_ino in _dents(here).items():
            if name == ".." and rel == "" and not root_parent:
                continue
            target = here if name == "." else parent if name == ".." else here / name
            st_ino = os.lstat(target).st_ino
            if d_ino != st_ino:
                bad.append(f"{rel or '/'} {name}: d_ino {d_ino} st_ino {st_ino}")
    return bad


def _sides(run, tree, tmp_path, layers_factory, tmpfs_factory):
    two_fs = RUNS[run][2]
    if two_fs:
        lower_base, upper_base = tmpfs_factory(), tmpfs_factory()
    else:
        lower_base = upper_base = tmp_path
    spec = LOWER if tree == "tree" else {}
    out = {}
    for side in ("kernel", "ours"):
        lower = layers_factory({"l": spec}, where={"l": lower_base / side})["l"]
        upper = layers_factory.empty_dir(f"upper-{side}", upper_base)
        work = layers_factory.empty_dir(f"work-{side}", upper_base)
        out[side] = (lower, upper, work)
    return out, two_fs


@pytest.mark.parametrize("tree", ["tree", "empty"])
@pytest.mark.parametrize("run", sorted(RUNS))
def test_directory_links_and_numbers_as_the_kernel_shows_them(
        run, tree, tmp_path, layers_factory, overlay_mount, kernel_mount, tmpfs_factory):
    """Before: ``'': (('lower', ''), 3, True)`` against the kernel's ``(('upper', ''), 1,
    True)`` (the root), and every merged directory with its real count (``m``: 5 against 1)."""
    ours_opts, kernel_opts, _ = RUNS[run]
    sides, two_fs = _sides(run, tree, tmp_path, layers_factory, tmpfs_factory)
    lower, upper, work = sides["kernel"]
    kmnt = kernel_mount([lower], upper, work, kernel_opts)
    _operations(kmnt, tree)
    theirs = observe(kmnt, Layout(upper, lower, two_fs))
    assert listing_mismatches(kmnt, root_parent=False) == []

    lower, upper, work = sides["ours"]
    m = overlay_mount(stack_options([lower], upper, work, ours_opts))
    _operations(m.path, tree)
    layout = Layout(upper, lower, two_fs)
    listed = observe(m.path, layout)  # (attributes of READDIRPLUS listings)
    assert listed == theirs
    assert listing_mismatches(m.path) == []
    m.unmount()

    # again after a remount, by LOOKUP and GETATTR (nothing listed first), then listed:
    # the same numbers and counts
    m = overlay_mount(stack_options([lower], upper, work, ours_opts))
    assert observe(m.path, layout, sorted(theirs)) == theirs
    assert observe(m.path, layout) == theirs
    assert listing_mismatches(m.path) == []


@pytest.mark.parametrize("kind", ["merged", "lower-only", "upper-only"])
def test_directory_links_of_a_read_only_stack_of_two_lowers(kind, tmp_path, layers_factory,
                                                            overlay_mount, kernel_mount):
    """Without an upper, a directory in two lowers is merged (``st_nlink`` 1, the top lower's
    number); one in a single lower shows its own; the root of two lowers is merged."""
    spec = {"top": {"d": Dir({"t1": Dir(), "t2": Dir()})} if kind != "lower-only" else {"e": File("e")},
            "bot": {"d": Dir({"b1": Dir()})} if kind != "upper-only" else {"e2": File("e")}}
    seen = {}
    for side in ("kernel", "ours"):
        layers = layers_factory(spec, where={"top": tmp_path / side, "bot": tmp_path / side})
        top, bot = layers["top"], layers["bot"]
        mnt = kernel_mount([top, bot]) if side == "kernel" else \
            overlay_mount(f"lowerdir={top}:{bot}").path
        layout_top, layout_bot = Layout(None, top, False), Layout(None, bot, False)
        obs = {}
        for rel in _paths(mnt):
            st = os.lstat(mnt / rel)
            where = layout_top.label(st.st_ino)
            if where[0] == "?":
                where = ("bottom", layout_bot.label(st.st_ino)[1])
            obs[rel] = (where, st.st_nlink)
        seen[side] = obs
        assert listing_mismatches(mnt, root_parent=side == "ours") == []
    assert seen["ours"] == seen["kernel"]


def _core_over(tmp_path: Path, layers: dict):
    """A core driver (no FUSE, redirect_dir=on) over ``layers`` built in ``tmp_path``:
    ``upper`` and the lowers ``l0``, ``l1``... (top first) as given."""
    from core_driver import CoreDriver
    from overlaypc.config import MountConfig, validate
    for name, spec in layers.items():
        helpers.build_layer(tmp_path / name, spec)
    (tmp_path / "work").mkdir()
    (tmp_path / "mnt").mkdir()
    cfg = MountConfig(lowers=[str(tmp_path / n) for n in layers if n != "upper"],
                      upper=str(tmp_path / "upper"), work=str(tmp_path / "work"),
                      mountpoint=str(tmp_path / "mnt"), redirect_dir="on")
    validate(cfg)
    return CoreDriver(cfg)


def _root_directories(fs) -> tuple[dict, dict]:
    """The root's directories as a READDIRPLUS listing gives them ({name: entry}) and as
    GETATTR shows them after it ({name: attributes})."""
    listed = {e.name: e for e in fs.readdir("", plus=True) if stat.S_ISDIR(e.mode)}
    return listed, {name: fs.getattr(name) for name in listed}


def test_listed_directory_attributes_are_what_getattr_shows(tmp_path):
    """READDIRPLUS attributes of directories (core, no FUSE): merged ones (upper over lower,
    two lowers) with ``st_nlink`` 1, opaque and single-layer ones with their own; one with a
    ``redirect`` xattr and no directory of its name below comes without attributes (a
    LOOKUP decides). Before: ``m`` listed with ``st_nlink`` 3 where ``stat`` shows 1."""
    helpers.require("root")  # trusted.* xattrs
    x = "trusted.overlay."
    layers = {
        "upper": {"m": Dir({"u": Dir()}), "pu": Dir({"s": Dir()}),
                  "op": Dir({"s": Dir()}, xattrs={x + "opaque": b"y"}),
                  "rd": Dir({"s": Dir()}, xattrs={x + "redirect": b"/src"})},
        "l0": {"m": Dir({"a": Dir(), "b": Dir()}), "op": Dir({"t": Dir()}), "lm": Dir({"a": Dir()}),
               "lo": Dir({"a": Dir()}), "lop": Dir({"a": Dir()}, opaque="trusted"),
               "lr": Dir(xattrs={x + "redirect": b"/other"}), "src": Dir({"t": Dir()})},
        "l1": {"lm": Dir({"b": Dir(), "c": Dir()}), "lop": Dir({"b": Dir()}),
               "other": Dir({"o": Dir()}), "b1": Dir({"a": Dir()})},
    }
    drv = _core_over(tmp_path, layers)
    try:
        fs = drv.fs
        listed, shown = _root_directories(fs)
        links = {name: attr.st_nlink for name, attr in shown.items()}
        assert links == {"m": 1, "lm": 1, "rd": 1, "lr": 1, "pu": 3, "op": 3, "lo": 3,
                         "lop": 3, "src": 3, "other": 3, "b1": 3}
        assert {n for n, e in listed.items() if e.attr is None} == {"rd", "lr"}
        got = {n: (e.attr.st_nlink, e.attr.ino) for n, e in listed.items() if e.attr is not None}
        assert got == {n: (shown[n].st_nlink, shown[n].ino) for n in got}
        # (``rd``'s d_ino is left out: a redirect without a copy-up origin, which the kernel
        # writes only where the lower filesystem cannot encode file handles, is listed with
        # the upper's own number; ``stat`` shows the lower one's: not this test's concern)
        assert {n for n, e in listed.items() if n != "rd" and e.ino != shown[n].ino} == set()
        assert fs.getattr("").st_nlink == 1
    finally:
        drv.close()


#: review18: a directory over a non-directory in a layer below it, and a directory of the
#: same name further down: the lookup stops at the non-directory (the kernel's
#: ``ovl_lookup_single``: a non-directory below a directory ends the search), so the
#: directory is not merged; a listing must not take the one further down for its lower part
STOPPED = {
    "l0": {"ud": File("x"), "md": Dir({"a": Dir(), "b": Dir()}), "wd": File("y")},
    "l1": {"ud": Dir({"a": Dir()}), "md": File("z"), "wd": Dir({"a": Dir()})},
    "l2": {"md": Dir({"c": Dir()})},
}


def _stopped_operations(mnt: Path) -> None:
    os.unlink(mnt / "ud")  # a whiteout over l0's file; the upper directory made over it
    os.mkdir(mnt / "ud")
    os.mkdir(mnt / "ud/s")
    os.mkdir(mnt / "ud/t")


@pytest.mark.parametrize("crafted", [False, True])
def test_a_directory_over_a_non_directory_below_is_not_merged(
        crafted, tmp_path, layers_factory, overlay_mount, kernel_mount):
    """A lower-only directory (``md``) over a file in the next lower, over a directory
    again, is not merged: its real ``st_nlink`` and own number, listed (READDIRPLUS) as
    ``stat`` shows it; so is an upper directory over a lower file (``crafted``: the
    upper made directly, not opaque, as another tool may leave it). Before: ``md`` listed
    (and then ``stat``) with ``st_nlink`` 1 against the kernel's 4, and the crafted ``ud``
    with the lowest directory's ``st_ino``."""
    seen = {}
    for side in ("kernel", "ours"):
        base = tmp_path / side
        layers = layers_factory(STOPPED, where={name: base for name in STOPPED})
        upper = layers_factory.empty_dir(f"upper-{side}")
        work = layers_factory.empty_dir(f"work-{side}")
        if crafted:
            helpers.build_layer(upper, {"ud": Dir({"s": Dir(), "t": Dir()})})
        lowers = [layers[name] for name in STOPPED]
        if side == "kernel":
            mnt = kernel_mount(lowers, upper, work)
        else:
            mnt = overlay_mount(stack_options(lowers, upper, work, "")).path
        if not crafted:
            _stopped_operations(mnt)
        obs = {}
        # the root listed (READDIRPLUS), each entry's ``stat`` at once: the listing's
        # attributes (listing a directory would void its own: the kernel marks its atime)
        for rel in os.listdir(mnt):
            st = os.lstat(mnt / rel)
            where = "?"
            for role, root in (("upper", upper), *zip(STOPPED, lowers)):
                p = root / rel
                if os.path.lexists(p) and os.lstat(p).st_ino == st.st_ino:
                    where = role
            obs[rel] = (where, st.st_nlink)
        seen[side] = obs
        assert listing_mismatches(mnt, root_parent=side == "ours") == []
    assert seen["ours"] == seen["kernel"]


def test_listed_directory_with_a_redirect_over_its_own_name_below(tmp_path):
    """review18: a directory with a ``redirect`` xattr over a directory of its own name
    below: the lookup follows the redirect, not the name, so whether it is merged is the
    redirect target's to say; the listing gives no attributes (a LOOKUP decides), never
    ``st_nlink`` 1 for a directory ``stat`` shows unmerged (core, no FUSE). Before: ``rb``
    (its redirect names nothing below) listed with ``st_nlink`` 1 where ``stat`` shows 3."""
    helpers.require("root")  # trusted.* xattrs
    x = "trusted.overlay."
    layers = {
        "upper": {"rb": Dir({"s": Dir()}, xattrs={x + "redirect": b"/nowhere"}),
                  "ra": Dir({"s": Dir()}, xattrs={x + "redirect": b"src"})},
        "l0": {"rb": Dir({"a": Dir()}), "ra": Dir({"a": Dir()}), "src": Dir({"t": Dir()})},
    }
    drv = _core_over(tmp_path, layers)
    try:
        listed, shown = _root_directories(drv.fs)
        assert {n: a.st_nlink for n, a in shown.items()} == {"rb": 3, "ra": 1, "src": 3}
        got = {n: e.attr.st_nlink for n, e in listed.items() if e.attr is not None}
        assert got == {n: shown[n].st_nlink for n in got}
    finally:
        drv.close()


def test_a_directory_copied_up_by_a_write_below_it_shows_merged_at_once(
        tmp_path, layers_factory, overlay_mount, kernel_mount):
    """review18: a lower-only directory (real ``st_nlink``), seen by ``stat``, then copied
    up by a write to a file two levels below it: a merged directory from then on, shown
    with ``st_nlink`` 1 at once, as the kernel overlay (no attribute cache may keep the
    count it had while lower-only)."""
    seen = _copied_up_by_a_write_below(tmp_path, layers_factory, overlay_mount, kernel_mount)
    assert seen["ours"] == seen["kernel"]


def test_a_copy_up_drops_cached_attributes_before_its_reply(
        tmp_path, layers_factory, overlay_mount, kernel_mount):
    """notify49: the same, with the notifier's thread dropping whatever it is given
    (``notify.queued=eio``: a notifier that never gets to it, where under load it got to
    it after the OPEN's reply, and 1 run in 12 saw the lower count). The copy-up's
    invalidation of ``lo`` and ``lo/sub`` (attributes only) is written by the OPEN's own
    worker before its reply, so the ``lstat`` right after finds no cached attributes."""
    seen = _copied_up_by_a_write_below(tmp_path, layers_factory, overlay_mount, kernel_mount,
                                       env={"OVERLAYPC_FAULTS": "notify.queued=eio"})
    assert seen["ours"] == seen["kernel"]


def _copied_up_by_a_write_below(tmp_path, layers_factory, overlay_mount, kernel_mount,
                                env=None) -> dict:
    """``st_nlink`` of ``lo`` and ``lo/sub`` before and after ``lo/sub/f`` is appended to,
    on each side (``env``: our daemon's)."""
    spec = {"l": {"lo": Dir({"sub": Dir({"f": File("f"), "d": Dir()}), "e": Dir()})}}
    seen = {}
    for side in ("kernel", "ours"):
        lower = layers_factory(spec, where={"l": tmp_path / side})["l"]
        upper = layers_factory.empty_dir(f"upper-{side}")
        work = layers_factory.empty_dir(f"work-{side}")
        mnt = kernel_mount([lower], upper, work) if side == "kernel" else \
            overlay_mount(stack_options([lower], upper, work), env=env).path
        before = [os.lstat(mnt / rel).st_nlink for rel in ("lo", "lo/sub")]
        os.listdir(mnt)  # (READDIRPLUS attributes of lo too)
        os.listdir(mnt / "lo")
        with open(mnt / "lo/sub/f", "ab") as f:
            f.write(b"more")
        after = [os.lstat(mnt / rel).st_nlink for rel in ("lo", "lo/sub")]
        seen[side] = (before, after)
    return seen
