"""A rename of a lower regular file under ``-o metacopy=on`` copies its metadata only, as
the kernel overlay's (compat41): the upper file is sparse, marked
``trusted.overlay.metacopy``, carries the lower file's ``origin`` and a redirect to its
data, relative (the old name) for a rename within one directory and absolute across
directories, as the kernel 6.x writes them. Cases: within a directory, across directories,
over an existing lower name; with ``index=on`` also a lower hard link (the kernel copies it
metadata-only into ``workdir/index`` too), and a lower hard link within its directory (an
absolute redirect: the kernel's ``ovl_need_absolute_redirect``). Then an open for write and
a truncate of renamed files (their data copy-up reads the data through the redirect and
keeps it).

Differential, the kernel overlay as the oracle: each side over its own copy of the same
lower, the upper files' marks compared after the renames and after the writes; each
side's upper is read back through the *other* implementation's mount after each phase.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import helpers
from coherence_support import dontneed
from reliability_support import kill_at_pause
from upper_support import stack_options

pytestmark = [pytest.mark.mount]

SIZE = 256 << 10
DATA = {name: bytes((i * 7 + n) % 251 for i in range(SIZE)) for n, name in enumerate("fgse")}
LOWER = {"f": DATA["f"], "g": DATA["g"], "s": DATA["s"], "t": "old target\n", "d": helpers.Dir(),
         "c": {"e": DATA["e"]}, "hl": DATA["f"][:SIZE // 2], "hl2": helpers.HardLink("hl"),
         "x": DATA["g"], "k": DATA["e"], "k2": helpers.HardLink("k"), "j": DATA["s"],
         "j2": helpers.HardLink("j")}
#: the renames of lower files (after ``c`` was renamed to ``c2``): (old, new, the redirect
#: the kernel writes: the old name within one directory, else the data's absolute path; for
#: a lower hard link always that, ``ovl_need_absolute_redirect``)
RENAMES = [("f", "f2", b"f"), ("g", "d/g", b"/g"), ("s", "t", b"s"), ("c2/e", "c2/e2", b"e"),
           ("j", "j3", b"/j")]
#: run: (overlaypc's options, the kernel's, renames)
RUNS = {"plain": ("metacopy=on", ("redirect_dir=on", "metacopy=on"), RENAMES),
        "index": ("metacopy=on,index=on", ("redirect_dir=on", "metacopy=on", "index=on"),
                  RENAMES + [("hl", "d/hl", b"/hl"), ("x", "k2", b"x")])}
OVL = "trusted.overlay."


def _renamed(m: str, renames) -> None:
    os.rename(f"{m}/c", f"{m}/c2")  # (a redirected directory: its files' data is below c)
    for old, new, _ in renames:
        os.rename(f"{m}/{old}", f"{m}/{new}")


def _written(m: str) -> None:
    """The data copy-ups of renamed metacopy files: an open for write, a truncate; with
    ``d/hl`` (index=on) a write through the other name of that hard link (not renamed:
    its data copy-up fills the metacopy index entry). Known difference, left (not this
    change's): the kernel links ``hl2`` up to the index entry there, overlaypc writes the
    index entry through the lower name, as it always did, so the upper link counts differ
    (3 links "U-1" against 2 "U+0", the same overlay count: 2)."""
    with open(f"{m}/d/g", "r+b") as f:
        f.seek(SIZE // 2)
        f.write(b"W")
    os.truncate(f"{m}/f2", 5)
    if os.path.exists(f"{m}/d/hl"):
        with open(f"{m}/hl2", "r+b") as f:
            f.write(b"H")


def _contents(m, renames) -> dict:
    return {new: Path(m, new).read_bytes() for _, new, _ in renames} | \
        {old: Path(m, old).exists() for old, _, _ in renames}


def _marks(upper: Path, renames) -> dict:
    """Each renamed upper file's overlay xattrs (``origin``'s presence only: handles of two
    lower copies differ) and whether it is sparse (holds less than half its size)."""
    out = {}
    for _, new, _ in renames:
        path = upper / new
        st = os.lstat(path)
        names = os.listxattr(path, follow_symlinks=False)
        marks = {n[len(OVL):]: os.getxattr(path, n, follow_symlinks=False)
                 for n in names if n.startswith(OVL) and n != OVL + "origin"
                 and not n.startswith(OVL + "overlaypc.")}  # (overlaypc's own)
        out[new] = (marks, OVL + "origin" in names, st.st_blocks * 512 < st.st_size // 2,
                    st.st_nlink)
    return out


def _index(work: Path) -> list:
    """The index entries: (metacopy mark, redirect, sparse) each."""
    index = work / "index"
    out = []
    for name in os.listdir(index) if index.is_dir() else ():
        path = index / name
        names = os.listxattr(path, follow_symlinks=False)
        redirect = os.getxattr(path, OVL + "redirect") if OVL + "redirect" in names else None
        st = os.lstat(path)
        out.append((OVL + "metacopy" in names, redirect, st.st_blocks * 512 < st.st_size // 2))
    return sorted(out, key=repr)  # (the names, file handles, differ between the sides)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_rename_of_lower_file_copies_metadata_only(run, tmp_path, overlay_mount, kernel_mount):
    ours_opts, kernel_opts, renames = RUNS[run]
    stacks = {}
    for side in ("kernel", "ours"):
        base = tmp_path / side
        lower = helpers.build_layer(base / "lower", LOWER)
        (base / "upper").mkdir()
        (base / "work").mkdir()
        stacks[side] = (lower, base / "upper", base / "work")

    def mount(side: str, on: str):
        """``side``'s implementation over ``on``'s layers: (mountpoint, unmount)."""
        lower, upper, work = stacks[on]
        if side == "kernel":
            k = kernel_mount([lower], upper, work, kernel_opts)
            return str(k), lambda: helpers.force_unmount(k)
        m = overlay_mount(stack_options([lower], upper, work, ours_opts))
        return str(m.path), m.unmount

    def phase(step, check, unlinked=()) -> None:
        """``step`` by each side on its own layers, its upper marks compared; then both
        uppers read through the other side's mount. ``unlinked``: names whose link counts
        are left out (the known difference at ``_written``)."""
        got = {}
        for side in ("kernel", "ours"):
            m, unmount = mount(side, side)
            step(m)
            marks = _marks(stacks[side][1], renames)
            for name in unlinked:
                xattrs, *rest, _ = marks[name]
                marks[name] = ({k: v for k, v in xattrs.items() if k != "nlink"}, *rest)
            got[side] = (_contents(m, renames), marks, _index(stacks[side][2]))
            unmount()
        assert got["ours"][0] == got["kernel"][0] == check  # (the oracle reads what it wrote)
        assert got["ours"][1] == got["kernel"][1]
        assert got["ours"][2] == got["kernel"][2]
        for side, other in (("kernel", "ours"), ("ours", "kernel")):
            m, unmount = mount(side, other)
            assert _contents(m, renames) == check, f"{side} reading {other}'s upper"
            unmount()

    expect = {"f2": DATA["f"], "d/g": DATA["g"], "t": DATA["s"], "c2/e2": DATA["e"], "j3": DATA["s"],
              "d/hl": DATA["f"][:SIZE // 2], "k2": DATA["g"]}
    expect = {new: expect[new] for _, new, _ in renames} | {old: False for old, _, _ in renames}
    phase(lambda m: _renamed(m, renames), expect)
    kernels = _marks(stacks["kernel"][1], renames)
    # (the oracle: metadata-only copies with a redirect, relative within one directory)
    assert {new: m[0].get("redirect") for new, m in kernels.items()} == \
        {new: redirect for _, new, redirect in renames}
    assert {new: (m[0].get("metacopy"), m[2]) for new, m in kernels.items()} == \
        {new: (b"", True) for new in kernels}  # (origin: none on a broken lower hard link)

    g = bytearray(DATA["g"])
    g[SIZE // 2] = ord("W")
    written = {"d/g": bytes(g), "f2": DATA["f"][:5]}
    if run == "index":
        written["d/hl"] = b"H" + DATA["f"][1:SIZE // 2]
    phase(_written, expect | written, ("d/hl",) if run == "index" else ())


#: kill -9 points of a rename: the metadata-only copy complete in the workdir, not yet at
#: the old name (``copyup.rename``); at the old name with its redirect (which names its
#: own data there), not yet moved (``layer.rename`` of the new name)
KILLS = {"before-copy-up-lands": "copyup.rename~mvsrc=pause",
         "before-the-move": "layer.rename~mvdst=pause"}


@pytest.mark.parametrize("new", ["mvdst", "d/mvdst"], ids=["same-dir", "other-dir"])
@pytest.mark.parametrize("kill", sorted(KILLS))
def test_kill9_during_metacopy_rename(kill, new, tmp_path, overlay_mount, kernel_mount):
    """After a kill -9 at either point the old name holds the lower data, read by a fresh
    overlaypc and by the kernel over the upper left, and the new name does not exist."""
    lower = helpers.build_layer(tmp_path / "lower", {"mvsrc": DATA["f"], "d": helpers.Dir()})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    opts = stack_options([lower], upper, work, "metacopy=on")
    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS": KILLS[kill]})
    rc, out, err = kill_at_pause(m, f"""
        os.rename({str(m / 'mvsrc')!r}, {str(m / new)!r})
        sys.exit(0)
    """, KILLS[kill])
    assert rc != 0, f"the rename blocked in the killed daemon succeeded: {out} {err}"
    if kill == "before-the-move":  # (the case at hand: a metacopy file with its redirect)
        assert os.getxattr(upper / "mvsrc", OVL + "metacopy") == b""
        assert os.getxattr(upper / "mvsrc", OVL + "redirect") == \
            (b"/mvsrc" if "/" in new else b"mvsrc")
    m2 = overlay_mount(opts)
    assert (m2 / "mvsrc").read_bytes() == DATA["f"] and not (m2 / new).exists()
    m2.unmount()
    k = kernel_mount([lower], upper, work, ("redirect_dir=on", "metacopy=on"))
    assert (k / "mvsrc").read_bytes() == DATA["f"] and not (k / new).exists()
    helpers.force_unmount(k)
    m3 = overlay_mount(opts)  # the rename again, to its end
    os.rename(m3 / "mvsrc", m3 / new)
    assert (m3 / new).read_bytes() == DATA["f"]


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_reader_of_renamed_lower_file_sees_later_writes(cache, tmp_path, overlay_mount):
    """A read handle opened on the lower file before its (metadata-only) rename reads the
    lower data until a write through the new name copies the data up, then the write."""
    lower = helpers.build_layer(tmp_path / "lower", {"f": DATA["f"], "d": helpers.Dir()})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(stack_options([lower], upper, work, f"metacopy=on,cache={cache}"))
    fr = os.open(m / "f", os.O_RDONLY)
    try:
        assert os.pread(fr, 8, SIZE // 2) == DATA["f"][SIZE // 2:SIZE // 2 + 8]
        os.rename(m / "f", m / "d/f2")
        assert os.getxattr(upper / "d/f2", OVL + "metacopy") == b""
        if cache == "kernel":
            dontneed(fr)
        assert os.pread(fr, 8, SIZE // 2) == DATA["f"][SIZE // 2:SIZE // 2 + 8]
        with open(m / "d/f2", "r+b") as f:
            f.seek(SIZE // 2)
            f.write(b"WRITTEN!")
        if cache == "kernel":
            dontneed(fr)
        assert os.pread(fr, 8, SIZE // 2) == b"WRITTEN!"
    finally:
        os.close(fr)
    assert OVL + "metacopy" not in os.listxattr(upper / "d/f2")
    assert os.getxattr(upper / "d/f2", OVL + "redirect") == b"/f"
    assert (lower / "f").read_bytes() == DATA["f"]


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_readers_of_renamed_lower_hard_link_see_later_writes(cache, tmp_path, overlay_mount):
    """index=on: read handles on both names of a lower hard link, opened before one name's
    rename (a metacopy index entry); a write through the other name (its data copy-up
    fills the index entry) is seen through both, and through the new name."""
    lower = helpers.build_layer(tmp_path / "lower", {"hl": DATA["f"], "hl2": helpers.HardLink("hl"),
                                                     "d": helpers.Dir()})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(stack_options([lower], upper, work, f"metacopy=on,index=on,cache={cache}"))
    at = SIZE // 2
    readers = [os.open(m / "hl", os.O_RDONLY), os.open(m / "hl2", os.O_RDONLY)]
    try:
        for fr in readers:
            assert os.pread(fr, 8, at) == DATA["f"][at:at + 8]
        os.rename(m / "hl", m / "d/hl")
        os.chmod(m / "hl2", 0o640)  # (an attribute change of the index entry, still metacopy)
        [entry] = os.listdir(work / "index")
        assert os.getxattr(work / "index" / entry, OVL + "metacopy") == b""
        assert os.lstat(work / "index" / entry).st_blocks * 512 < SIZE // 2
        for fr in readers:
            if cache == "kernel":
                dontneed(fr)
            assert os.pread(fr, 8, at) == DATA["f"][at:at + 8]
        with open(m / "hl2", "r+b") as f:
            f.seek(at)
            f.write(b"WRITTEN!")
        for fr in readers:
            if cache == "kernel":
                dontneed(fr)
            assert os.pread(fr, 8, at) == b"WRITTEN!"
        with open(m / "d/hl", "rb") as f:
            f.seek(at)
            assert f.read(8) == b"WRITTEN!"
    finally:
        for fr in readers:
            os.close(fr)
    assert OVL + "metacopy" not in os.listxattr(work / "index" / entry)
    assert os.getxattr(upper / "d/hl", OVL + "redirect") == b"/hl"
    assert stat.S_IMODE(os.stat(upper / "d/hl").st_mode) == 0o640
    assert (lower / "hl").read_bytes() == DATA["f"]


def _metacopy_layer(mid: Path, name: str, size: int, links: int) -> None:
    """A former upper's metacopy file ``name`` in layer ``mid`` (sparse, ``size`` bytes,
    its data at the same path below), with ``links`` names (``name``, ``name``.2, ...,
    one inode: each carries the absolute redirect to the data)."""
    path = mid / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    os.setxattr(path, OVL + "metacopy", b"")
    os.setxattr(path, OVL + "redirect", b"/" + name.encode())
    for k in range(2, links + 1):
        os.link(path, f"{path}.{k}")


@pytest.mark.parametrize("linked", ["the-metacopy-lower", "the-data"])
def test_redirect_of_renamed_file_over_a_lower_metacopy_file_as_the_kernel(
        linked, tmp_path, overlay_mount, kernel_mount):
    """A lower file with its data further down (a former upper's metacopy file ``d/f``
    over the data file), copied up metadata-only (chmod), then renamed within its
    directory: the kernel's redirect is absolute when its *first* lower is a hard link
    (``ovl_need_absolute_redirect``: ``ovl_dentry_lower``, the metacopy file), else the old
    name; overlaypc decided on the data file's link count."""
    marks, contents = {}, {}
    for side in ("kernel", "ours"):
        base = tmp_path / side
        bottom = helpers.build_layer(base / "bottom", {"d": {"f": DATA["f"]}})
        if linked == "the-data":
            os.link(bottom / "d/f", bottom / "d/f.9")
        mid = base / "mid"
        _metacopy_layer(mid, "d/f", SIZE, 2 if linked == "the-metacopy-lower" else 1)
        (base / "upper").mkdir()
        (base / "work").mkdir()
        lowers = [mid, bottom]
        if side == "kernel":
            mnt = kernel_mount(lowers, base / "upper", base / "work", ("redirect_dir=on", "metacopy=on"))
            unmount = lambda: helpers.force_unmount(mnt)  # noqa: E731
        else:
            m = overlay_mount(stack_options(lowers, base / "upper", base / "work", "metacopy=on"))
            mnt, unmount = m.path, m.unmount
        os.chmod(mnt / "d/f", 0o600)
        os.rename(mnt / "d/f", mnt / "d/g")
        contents[side] = (mnt / "d/g").read_bytes() == DATA["f"], os.path.lexists(mnt / "d/f")
        unmount()
        g = base / "upper/d/g"
        marks[side] = (OVL + "metacopy" in os.listxattr(g), os.getxattr(g, OVL + "redirect"))
    assert contents["kernel"] == (True, False)
    assert marks["kernel"] == (True, b"/d/f" if linked == "the-metacopy-lower" else b"f")
    assert marks["ours"] == marks["kernel"]
    assert contents["ours"] == contents["kernel"]
