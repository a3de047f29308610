"""parity46: kernel-parity items left open by index45/review45, each against the kernel.

- An ``index=on`` entry with no upper name whose upper file lacks the kernel's count
  (``trusted.overlay.nlink``): the kernel's ``ovl_get_nlink`` falls back to 0, an orphan,
  and its clean-up removes the entry. overlaypc matches that where no count is there at all;
  where only overlaypc's own count is (an older overlaypc wrote no other: before d5a0e4a
  ``trusted.overlay.overlaypc.nlink``, before d71628d ``trusted.overlaypc.nlink``), that
  count stands in, so the names the entry still serves keep their data, and the kernel's
  count is written from it, so a kernel mounting the stack next keeps the entry too.
- A handle that fails to decode with another error than ESTALE: the kernel's
  ``ovl_indexdir_cleanup`` aborts the mount (only ESTALE and ENOENT, an orphan, are
  cleaned); so does overlaypc, writing nothing.
- A lowerdir that a live kernel overlay holds as its upperdir or workdir: EBUSY under
  index=on (``ovl_report_in_use``), as for upperdir and workdir.
- A metacopy file in a mount without metacopy=on: its redirect is read first (malformed:
  EINVAL), then the lookup is refused (EPERM).
- A redirect that cannot be written at a move or link: EXDEV (``ovl_set_redirect``).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import helpers
from features_support import (KERNEL_INDEX, KERNEL_METACOPY, link_through_fd, make_lowers, mount_side,
                              new_stack)
from test_index_roots import kernel_refusal, overlaypc_refusal
from test_index_stale import index_name

pytestmark = [pytest.mark.mount]

OLD = b"lower data\n"
NEW = b"new data, longer than the old\n" * 3
READ = ("a", "b", "sub/c")


def _lowers(layers_factory, base: Path) -> list[Path]:
    lowers = make_lowers(layers_factory, base, {"l": {"a": OLD, "sub": {}}})
    for dst in ("b", "sub/c"):
        os.link(lowers[0] / "a", lowers[0] / dst)
    return lowers


def _read(root: Path) -> dict:
    out = {}
    for n in READ:
        try:
            out[n] = (root / n).read_bytes()
        except OSError as e:
            out[n] = errno.errorcode[e.errno]
    return out


def _served_by_the_index(s, overlay_mount) -> Path:
    """overlaypc writes ``a`` (copied up into the index) and removes the name ``a``: the
    entry, one link, is what ``b`` and ``sub/c`` show. Its path."""
    m = overlay_mount(s.options("index=on"))
    with open(m / "a", "r+b") as f:
        f.write(NEW)
    os.unlink(m / "a")
    assert _read(m.path) == {"a": "ENOENT", "b": NEW, "sub/c": NEW}
    m.unmount()
    entry = s.work / "index" / index_name(s.lowers[0] / "b")
    assert os.stat(entry).st_nlink == 1
    assert os.getxattr(entry, "trusted.overlay.nlink") == b"U+1"  # (2 names: b, sub/c)
    return entry


def _counts_as(entry: Path, written_by: str) -> None:
    """Leave the entry's counts as ``written_by`` would have: none at all, overlaypc's own
    only (d71628d..d5a0e4a), or the pre-d71628d own one only."""
    own = os.getxattr(entry, "trusted.overlay.overlaypc.nlink")
    assert own == b"2"
    os.removexattr(entry, "trusted.overlay.nlink")
    if written_by != "own":
        os.removexattr(entry, "trusted.overlay.overlaypc.nlink")
    if written_by == "pre_d71628d":
        os.setxattr(entry, "trusted.overlaypc.nlink", own)


@pytest.mark.parametrize("written_by", ["nothing", "own", "pre_d71628d"])
def test_index_count_missing(written_by, xfs_dir, layers_factory, overlay_mount, kernel_mount):
    lowers = _lowers(layers_factory, xfs_dir)
    ks, os_ = new_stack(lowers, xfs_dir, "k"), new_stack(lowers, xfs_dir, "o")
    for s in (ks, os_):
        _counts_as(_served_by_the_index(s, overlay_mount), written_by)
    k = kernel_mount(lowers, ks.upper, ks.work, KERNEL_INDEX)
    theirs = _read(k)
    helpers.force_unmount(k)
    assert theirs == {"a": "ENOENT", "b": OLD, "sub/c": OLD}  # (the oracle: removed, count 0)
    assert os.listdir(ks.work / "index") == []
    m = overlay_mount(os_.options("index=on"))
    ours = _read(m.path)
    m.unmount()
    if written_by == "nothing":
        assert ours == theirs
        assert os.listdir(os_.work / "index") == []
        return
    # an older overlaypc's count stands in: the data the entry holds stays shown ...
    assert ours == {"a": "ENOENT", "b": NEW, "sub/c": NEW}
    # ... and is the kernel's now: the kernel mounting the stack next keeps it too
    k = kernel_mount(lowers, os_.upper, os_.work, KERNEL_INDEX)
    assert _read(k) == ours
    assert os.stat(k / "b").st_nlink == 2


def test_index_decode_error_refuses_the_mount(xfs_dir, layers_factory, overlay_mount,
                                              tmp_path, monkeypatch):
    """The entry's origin fails to decode with EIO (injected; the kernel's exportfs answers
    ESTALE or ENOMEM, and ``ovl_indexdir_cleanup`` aborts the mount on any error but ESTALE
    and an orphan): refused, nothing written; the next mount keeps the entry."""
    lowers = _lowers(layers_factory, xfs_dir)
    s = new_stack(lowers, xfs_dir, "o")
    _served_by_the_index(s, overlay_mount)
    before = {p: helpers.dir_state(p) for p in (s.upper, s.work)}
    monkeypatch.setenv("OVERLAYPC_FAULTS", "indexclean.decode=eio")
    line = overlaypc_refusal(tmp_path, tmp_path / "mnt", s.options("index=on"))
    assert line is not None and "index=on" in line and "Input/output error" in line, line
    assert {p: helpers.dir_state(p) for p in (s.upper, s.work)} == before, "a refused mount wrote"
    monkeypatch.delenv("OVERLAYPC_FAULTS")
    m = overlay_mount(s.options("index=on"))
    assert _read(m.path) == {"a": "ENOENT", "b": NEW, "sub/c": NEW}


@pytest.mark.parametrize("index", [True, False])
@pytest.mark.parametrize("held", ["upper", "work"])
def test_lower_of_a_live_kernel_mount(held, index, xfs_dir, layers_factory, overlay_mount,
                                      kernel_mount, tmp_path):
    """A lowerdir that a live kernel overlay holds as its upperdir or workdir: the kernel
    refuses an index=on mount (``ovl_get_layers`` -> ``ovl_report_in_use``: EBUSY), and
    only warns under index=off; so does overlaypc."""
    lowers = _lowers(layers_factory, xfs_dir)
    live = new_stack(lowers, xfs_dir, "live")
    k = kernel_mount(lowers, live.upper, live.work, KERNEL_INDEX)
    (k / "up").write_bytes(b"in the upper\n")
    lower = live.upper if held == "upper" else live.work
    s = new_stack([lower], xfs_dir, "o")
    opts = "index=on" if index else "index=off"
    got = kernel_refusal(tmp_path / "k2", [lower], s.upper, s.work, () if index else (opts,))
    if index:  # (the oracle; mount(8) says EBUSY so)
        assert got is not None and "already mounted" in got, got
    else:
        assert got is None, got
    before = {p: helpers.dir_state(p) for p in (s.upper, s.work, lower)}
    line = overlaypc_refusal(tmp_path, tmp_path / "mnt", s.options(opts))
    if not index:
        assert line is None, line
        return
    assert line is not None and "in use" in line and str(lower) in line, line
    assert {p: helpers.dir_state(p) for p in (s.upper, s.work, lower)} == before, \
        "a refused mount wrote"



#: a metacopy file (where, its redirect or None) in a mount without metacopy=on
METACOPY_OFF = {"upper": ("u", "f", None), "upper-abs": ("u", "f", b"/g"),
                "upper-rel": ("u", "f", b"g"), "upper-slash-in-rel": ("u", "f", b"a/b"),
                "upper-empty": ("u", "f", b""), "upper-empty-part": ("u", "f", b"//g"),
                "upper-trailing-slash": ("u", "f", b"/g/"), "upper-nul": ("u", "f", b"\0"),
                "upper-only-dir": ("u", "d/f", None), "upper-only-dir-bad": ("u", "d/f", b"a/b"),
                "mid": ("mid", "f", None), "mid-bad": ("mid", "f", b"a/b"),
                "bottom": ("bottom", "h", None), "bottom-bad": ("bottom", "h", b"a/b")}


@pytest.mark.parametrize("redirect_dir", ["on", "nofollow"])
@pytest.mark.parametrize("case", sorted(METACOPY_OFF))
def test_metacopy_without_metacopy_on_as_the_kernel(case, redirect_dir, tmp_path, overlay_mount,
                                                    kernel_mount):
    """The kernel's lookup (6.18) reads a metacopy file's redirect as any (a malformed one
    fails it: EINVAL) and refuses the metacopy file only after its layers are searched
    (EPERM, "refusing to follow metacopy origin"), before it searches the next layer;
    overlaypc refused it before reading the redirect, EPERM where the kernel said EINVAL.
    (A listing's READDIRPLUS still gives such a file attributes: see README.)"""
    where, rel, redirect = METACOPY_OFF[case]
    got: dict = {}
    for side in ("kernel", "ours"):
        mid = helpers.build_layer(tmp_path / f"mid-{side}", {"m": "m\n"})
        bottom = helpers.build_layer(tmp_path / f"bottom-{side}", {"f": "lower f\n",
                                                                    "g": "lower g\n"})
        s = new_stack([mid, bottom], tmp_path, side)
        base = {"u": s.upper, "mid": mid, "bottom": bottom}[where]
        path = base / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
        os.truncate(path, 7)
        os.setxattr(path, "trusted.overlay.metacopy", b"")
        if redirect is not None:
            os.setxattr(path, "trusted.overlay.redirect", redirect)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount,
                                  (f"redirect_dir={redirect_dir}", "metacopy=off"))
        try:
            got[side] = _attempt(lambda: os.stat(mnt / rel).st_size)
        finally:
            unmount()
    assert got["kernel"] in ("EPERM", "EINVAL"), got  # (the oracle)
    assert got["ours"] == got["kernel"]


def _attempt(f):
    try:
        return f()
    except OSError as e:
        return errno.errorcode[e.errno]


def _fill(tmpfs: Path) -> None:
    """No inode and no xattr space left on ``tmpfs`` (mounted with ``nr_inodes``: its xattrs
    take from the same space)."""
    fill = tmpfs / "fill"
    fill.mkdir()
    i = 0
    try:
        while True:
            (fill / str(i)).touch()
            i += 1
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    for value in (b"x" * 64, b"x"):
        try:
            for j in range(10_000):
                os.setxattr(fill / "0", f"trusted.f{len(value)}.{j}", value)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


#: a move whose redirect cannot be written: (mount options, prepared, the move)
#: (``e/x`` copied up: ``e`` is impure already, which a move into it would write first)
NO_ROOM = {"dir-same-dir": ("metacopy=off", "chmod d", "rename d d2"),
           "dir-other-dir": ("metacopy=off", "chmod d; chmod e/x", "rename d e/d"),
           "metacopy-file": ("metacopy=on", "chmod f; chmod e/x", "rename f e/f"),
           "metacopy-link": ("metacopy=on", "chmod f; chmod e/x", "link f e/f")}


@pytest.mark.parametrize("case", sorted(NO_ROOM))
def test_redirect_not_written_answers_exdev(case, xfs_dir, tmpfs_factory, overlay_mount,
                                           kernel_mount):
    """The upper has no room for the redirect xattr (ENOSPC): the kernel's
    ``ovl_set_redirect`` answers EXDEV whatever the error ("failed to set redirect"; "Fall
    back to userspace copy-up"), so ``mv`` copies; overlaypc gave the raw errno. Both leave
    the same view. (``ln`` fails too: a link of a metacopy file writes one first.)"""
    opts, prepare, move = NO_ROOM[case]
    lower = helpers.build_layer(xfs_dir / "l", {"d": {"sub": {"f": "deep\n"}}, "e": {"x": "x\n"},
                                                "f": "file data\n"})
    got = {}
    for side in ("kernel", "ours"):
        t = tmpfs_factory("16m", "nr_inodes=64")
        (t / "u").mkdir()
        (t / "w").mkdir()
        s = new_stack([lower], xfs_dir, side)
        s.upper, s.work = t / "u", t / "w"
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount,
                                  ("redirect_dir=on", opts))
        try:
            for step in prepare.split("; "):
                os.chmod(mnt / step.split()[1], 0o750)
            _fill(t)
            what, src, dst = move.split()
            call = os.rename if what == "rename" else os.link
            answer = _attempt(lambda: call(mnt / src, mnt / dst))
            _free(t)
            got[side] = (answer, _tree(mnt))
        finally:
            unmount()
    assert got["kernel"][0] == "EXDEV", got  # (the oracle)
    assert got["ours"] == got["kernel"]


def _free(tmpfs: Path) -> None:
    import shutil
    shutil.rmtree(tmpfs / "fill")


def _tree(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in sorted(files):
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = p.read_bytes()
        for n in sorted(dirs):
            out[str((Path(dirpath) / n).relative_to(root)) + "/"] = None
    return out


def _made_by_the_kernel_link(base: Path, kernel_mount) -> None:
    """``f`` a metacopy file (chown), and ``g`` a link of it, made by the kernel: its upper
    file has the absolute redirect ``/f`` the kernel's link wrote."""
    k = kernel_mount([base / "l"], base / "u", base / "w", KERNEL_METACOPY)
    os.chown(k / "f", 1, 1)
    os.link(k / "f", k / "g")
    helpers.force_unmount(k)


def test_link_of_an_open_nameless_metacopy_file_copies_no_data(tmp_path, overlay_mount,
                                                               kernel_mount):
    """``f`` opened, its name unlinked (its upper file keeps the name ``g``, which the mount
    never looked up), then linked through its fd as ``d/h``: the kernel links the upper file
    as it is, metadata only (it has an absolute redirect already: ``ovl_set_link_redirect``
    writes nothing); overlaypc copied the data in first."""
    got = {}
    for side in ("kernel", "ours"):
        base = tmp_path / side
        helpers.build_layer(base / "l", {"f": "lower data\n" * 100, "d": {}})
        (base / "u").mkdir()
        (base / "w").mkdir()
        _made_by_the_kernel_link(base, kernel_mount)
        s = new_stack([base / "l"], tmp_path, side)
        s.upper, s.work = base / "u", base / "w"
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, KERNEL_METACOPY)
        try:
            fd = os.open(mnt / "f", os.O_RDONLY)
            try:
                os.unlink(mnt / "f")
                linked = link_through_fd(fd, mnt / "d", "h")
                data = (mnt / "d/h").read_bytes(), os.pread(fd, 11, 0)
            finally:
                os.close(fd)
        finally:
            unmount()
        marks = {n: sorted(x for x in os.listxattr(s.upper / n)
                           if x.startswith("trusted.overlay.") and "overlaypc" not in x)
                 for n in ("g", "d/h")}
        got[side] = (linked, data, marks, os.getxattr(s.upper / "d/h", "trusted.overlay.redirect"))
    assert got["kernel"][2]["d/h"] == ["trusted.overlay.metacopy", "trusted.overlay.origin",
                                       "trusted.overlay.redirect"]  # (the oracle)
    assert got["ours"] == got["kernel"]
