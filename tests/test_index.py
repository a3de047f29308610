"""Hard links across copy-up with ``-o index=on`` (issue 9), layers on the session XFS.

The lower file has three names (``a``, ``b``, ``sub/c``). Writing through one name copies
the data once, to ``workdir/index/<hex origin fh>``; the upper names are hard links to
that file; every name, looked up before the write or not, shows the new data, the same
st_ino and the overlay's st_nlink, also after link/unlink through the mount and after a
remount. FUSE gives each name its own kernel inode (docs/ARCHITECTURE.md §6 trap 9): names read or
stat'ed before a change hold cached pages/attributes, which the daemon must invalidate.

Differential with the kernel (``index=on``, everything else pinned off): the same
operations give the same observations (content, inode number, nlink per name), and
each upper is mounted by the other implementation. overlaypc keeps the overlay nlink
in its own xattr and also writes and reads the kernel's relative ``trusted.overlay.nlink``,
so link counts carry over both ways.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import helpers
from features_support import (KERNEL_INDEX, KERNEL_METACOPY, is_whiteout, make_lowers, new_stack,
                              ovl_xattr)

pytestmark = [pytest.mark.mount]

OLD = b"lower data of a hard-linked file\n"
NEW = b"NEW data, longer than the old one so a stale st_size shows\n" * 3
NAMES = ["a", "b", "sub/c"]


def make_linked_lower(layers_factory, base: Path) -> list[Path]:
    lowers = make_lowers(layers_factory, base, {"l": {"a": OLD, "sub": {}, "other": "x"}})
    os.link(lowers[0] / "a", lowers[0] / "b")
    os.link(lowers[0] / "a", lowers[0] / "sub/c")
    assert os.stat(lowers[0] / "a").st_nlink == 3
    return lowers


def observe(root: Path, names) -> dict:
    """name -> (content, st_ino, st_nlink, mode) or None if absent."""
    out = {}
    for name in names:
        p = Path(root) / name
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[name] = None
            continue
        out[name] = (p.read_bytes(), st.st_ino, st.st_nlink, st.st_mode & 0o7777)
    return out


def index_entries(work: Path) -> list[str]:
    """Entries of workdir/index, without the kernel's own temporary ``#<hex>`` names (with
    index=on the kernel keeps its shared whiteout there while mounted)."""
    d = work / "index"
    return sorted(n for n in os.listdir(d) if not n.startswith("#")) if d.is_dir() else []


def run_ops(root: Path) -> list[dict]:
    """The sequence shared by overlaypc and the kernel; one observation per stage."""
    r = Path(root)
    stages = []
    # a and b are looked up (and b's pages cached) before the copy-up; sub/c is not
    os.stat(r / "a")
    assert (r / "b").read_bytes() == OLD
    with open(r / "a", "r+b") as f:
        f.write(NEW)
    stages.append(observe(r, NAMES))
    os.link(r / "a", r / "d")
    stages.append(observe(r, NAMES + ["d"]))
    os.unlink(r / "b")
    stages.append(observe(r, NAMES + ["d"]))
    os.chmod(r / "sub/c", 0o600)           # copies up a third name: must stay the same inode
    stages.append(observe(r, NAMES + ["d"]))
    return stages


def check_stages(stages: list[dict], lower_ino: int) -> None:
    after_write, after_link, after_unlink, after_chmod = stages
    for name in NAMES:
        assert after_write[name] == (NEW, lower_ino, 3, 0o644), name
    for name in NAMES + ["d"]:
        assert after_link[name] == (NEW, lower_ino, 4, 0o644), name
    assert after_unlink["b"] is None
    for name in ("a", "sub/c", "d"):
        assert after_unlink[name] == (NEW, lower_ino, 3, 0o644), name
        assert after_chmod[name] == (NEW, lower_ino, 3, 0o600), name


def test_index_one_copy_shared_by_all_names(xfs_dir, layers_factory, overlay_mount):
    lowers = make_linked_lower(layers_factory, xfs_dir)
    lower_ino = os.stat(lowers[0] / "a").st_ino
    s = new_stack(lowers, xfs_dir, "idx")
    m = overlay_mount(s.options("index=on"))
    # a and b looked up before the copy-up, sub/c not (test_index_names_looked_up_before_
    # copy_up covers every name looked up first)
    assert [os.stat(m / n).st_ino for n in ("a", "b")] == [lower_ino] * 2
    assert [os.stat(m / n).st_nlink for n in ("a", "b")] == [3] * 2

    stages = run_ops(m.path)
    check_stages(stages, lower_ino)

    # one copy of the data, in workdir/index; every upper name is a link to it
    entries = index_entries(s.work)
    assert len(entries) == 1, entries
    index_file = s.work / "index" / entries[0]
    ist = os.stat(index_file)
    assert index_file.read_bytes() == NEW
    assert entries[0] == ovl_xattr(index_file, "origin").hex()
    # SETATTR names a node, not the name it came through: the chmod "of sub/c" is applied
    # through the node's first name (a), so sub/c may stay a lower name of the indexed
    # inode (it shows the index copy, also after the remount below) or be linked in
    linked = ["a", "d"] + (["sub/c"] if os.path.lexists(s.upper / "sub/c") else [])
    for name in linked:
        st = os.lstat(s.upper / name)
        assert (st.st_dev, st.st_ino) == (ist.st_dev, ist.st_ino), f"upper {name} is a copy"
    assert is_whiteout(s.upper / "b")
    assert ist.st_nlink == 1 + len(linked)  # the index and its upper names
    assert (lowers[0] / "a").read_bytes() == OLD and os.stat(lowers[0] / "a").st_nlink == 3

    m.unmount()
    again = overlay_mount(s.options("index=on"))
    assert observe(again.path, NAMES + ["d"]) == stages[-1]


def test_index_not_yet_copied_name_sees_index(xfs_dir, layers_factory, overlay_mount):
    """A name never touched through the mount (never copied up) shows the index copy,
    also after a remount; a copy-up of it later links instead of copying again."""
    lowers = make_linked_lower(layers_factory, xfs_dir)
    s = new_stack(lowers, xfs_dir, "idx2")
    m = overlay_mount(s.options("index=on"))
    with open(m / "sub/c", "r+b") as f:
        f.write(NEW)
    assert sorted(os.listdir(s.upper)) == ["sub"]  # a and b not in the upper yet
    assert (m / "a").read_bytes() == NEW and os.stat(m / "a").st_nlink == 3
    m.unmount()
    m = overlay_mount(s.options("index=on"))
    assert (m / "b").read_bytes() == NEW and os.stat(m / "b").st_nlink == 3
    os.utime(m / "b", ns=(10**18, 10**18))        # metadata change copies up b: a link
    assert os.stat(m / "a").st_mtime_ns == 10**18
    assert len(index_entries(s.work)) == 1
    assert os.stat(s.upper / "b").st_ino == os.stat(s.upper / "sub/c").st_ino


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_index_open_handles_follow(cache, xfs_dir, layers_factory, overlay_mount):
    """fr open on b (lower), write through a: fr reads the new data."""
    lowers = make_linked_lower(layers_factory, xfs_dir)
    s = new_stack(lowers, xfs_dir, f"idx-{cache}")
    m = overlay_mount(s.options(f"index=on,cache={cache}"))
    fr = os.open(m / "b", os.O_RDONLY)
    try:
        assert os.pread(fr, 4096, 0) == OLD
        with open(m / "a", "r+b") as f:
            f.write(NEW)
        if cache == "kernel":
            os.posix_fadvise(fr, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fr, 4096, 0) == NEW
        assert os.fstat(fr).st_size == len(NEW)
    finally:
        os.close(fr)


@pytest.mark.parametrize("cache", ["kernel", "shared"])
@pytest.mark.parametrize("before", ["stat", "read"])
def test_index_names_looked_up_before_copy_up(before, cache, xfs_dir, layers_factory,
                                              overlay_mount):
    """Every name stat'ed (cached attributes in its own FUSE node) or read (cached pages
    too) *before* the first copy-up, then a write through one name: all names show the
    new size, data and nlink."""
    lowers = make_linked_lower(layers_factory, xfs_dir)
    s = new_stack(lowers, xfs_dir, f"idxb-{cache}")
    m = overlay_mount(s.options(f"index=on,cache={cache}"))
    for name in NAMES:
        assert os.stat(m / name).st_size == len(OLD)
        if before == "read":
            assert (m / name).read_bytes() == OLD
    with open(m / "a", "r+b") as f:
        f.write(NEW)
    got = {n: (os.stat(m / n).st_size, (m / n).read_bytes()) for n in NAMES}
    assert got == {n: (len(NEW), NEW) for n in NAMES}
    os.link(m / "b", m / "d")
    assert {n: os.stat(m / n).st_nlink for n in NAMES} == {n: 4 for n in NAMES}


def test_index_kernel_same_observations(xfs_dir, layers_factory, overlay_mount, kernel_mount):
    """The kernel with index=on, same operations on its own upper: same observations."""
    lowers = make_linked_lower(layers_factory, xfs_dir)
    ks, os_ = new_stack(lowers, xfs_dir, "kidx"), new_stack(lowers, xfs_dir, "oidx")
    k = kernel_mount(lowers, ks.upper, ks.work, KERNEL_INDEX)
    theirs = run_ops(k)
    m = overlay_mount(os_.options("index=on"))
    mine = run_ops(m.path)
    assert mine == theirs
    # the kernel's on-disk layout is the one overlaypc copies: one index entry, same name
    assert index_entries(ks.work) == index_entries(os_.work)


@pytest.mark.parametrize("change", ["unlink", "rename_over"])
def test_index_removing_a_lower_name_counts_like_the_kernel(change, xfs_dir, layers_factory,
                                                            overlay_mount, kernel_mount):
    """A name of a lower hard link goes (unlink, or a rename over it) before any name was
    copied up: the kernel copies that name up first (``ovl_nlink_start``), so the index
    entry exists to count the name that goes, and every other name shows one link less,
    also after a remount."""
    lowers = make_linked_lower(layers_factory, xfs_dir)
    ks, os_ = new_stack(lowers, xfs_dir, "krm"), new_stack(lowers, xfs_dir, "orm")

    def run(root: Path) -> dict:
        if change == "unlink":
            os.unlink(Path(root) / "b")
        else:
            os.rename(Path(root) / "other", Path(root) / "b")
        return observe(root, NAMES)

    theirs = run(kernel_mount(lowers, ks.upper, ks.work, KERNEL_INDEX))
    assert [theirs[n][2] for n in ("a", "sub/c")] == [2, 2]  # the oracle counts the name gone
    m = overlay_mount(os_.options("index=on"))
    assert run(m.path) == theirs
    m.unmount()
    assert observe(overlay_mount(os_.options("index=on")).path, NAMES) == theirs


def test_index_metacopy_entry_made_by_the_kernel(xfs_dir, layers_factory, overlay_mount):
    """With index and metacopy the kernel's metadata copy-up of one name of a lower hard
    link makes a metacopy index entry (sparse, marked ``metacopy``): every name, those not
    in the upper too, reads the lower data through it, and a write goes to all names."""
    lowers = make_linked_lower(layers_factory, xfs_dir)
    s = new_stack(lowers, xfs_dir, "imeta")
    with helpers.kernel_overlay(xfs_dir / "imeta-k", lowers, s.upper, s.work,
                                KERNEL_INDEX + KERNEL_METACOPY) as k:
        os.chmod(k / "sub/c", 0o600)  # overlaypc then looks up a lower name first: a
        theirs = observe(k, NAMES)
    [entry] = index_entries(s.work)
    assert ovl_xattr(s.work / "index" / entry, "metacopy") is not None  # the case at hand
    m = overlay_mount(s.options("index=on,redirect_dir=on,metacopy=on"))
    assert observe(m.path, NAMES) == theirs
    assert theirs["b"][0] == OLD
    with open(m / "b", "r+b") as f:
        f.write(NEW)
    assert {n: (m / n).read_bytes() for n in NAMES} == {n: NEW for n in NAMES}


def write_only(root: Path) -> dict:
    """Only ``a`` is copied up; ``b`` and ``sub/c`` stay lower names of the indexed inode."""
    with open(Path(root) / "a", "r+b") as f:
        f.write(NEW)
    return observe(root, NAMES)


def unlink_only(root: Path) -> dict:
    """``b`` goes before any name was copied up: the kernel copies it up first, so the
    index entry is left with no upper name, and counts the two lower names left."""
    os.unlink(Path(root) / "b")
    return observe(root, NAMES)


SEQUENCES = {"write_only": write_only, "unlink_only": unlink_only,
             "full": lambda root: run_ops(root)[-1]}


def _ops_on_both(seq, xfs_dir, layers_factory, overlay_mount):
    """Run ``seq`` on the kernel (own upper) and on overlaypc (own upper); both unmounted."""
    lowers = make_linked_lower(layers_factory, xfs_dir)
    ks, os_ = new_stack(lowers, xfs_dir, "kx"), new_stack(lowers, xfs_dir, "ox")
    with helpers.kernel_overlay(xfs_dir / "kx-mnt", lowers, ks.upper, ks.work,
                                KERNEL_INDEX) as k:
        k_final = SEQUENCES[seq](k)
    m = overlay_mount(os_.options("index=on"))
    o_final = SEQUENCES[seq](m.path)
    m.unmount()
    assert o_final == k_final, "overlaypc and the kernel differ already on their own uppers"
    return lowers, ks, os_, k_final, o_final


def _content_and_links(obs: dict) -> dict:
    """Observations without st_nlink: content, mode, and which names share one inode."""
    inos = {v[1] for v in obs.values() if v}
    return {"content": {n: v and (v[0], v[3]) for n, v in obs.items()},
            "one_inode": len(inos) == 1}


def _nlinks(obs: dict) -> dict:
    return {n: v and v[2] for n, v in obs.items()}


@pytest.mark.parametrize("seq", list(SEQUENCES))
def test_index_kernel_mounts_overlaypc_upper(seq, xfs_dir, layers_factory, overlay_mount,
                                             kernel_mount):
    """Data, modes and inode sharing of overlaypc's indexed upper under the kernel."""
    lowers, ks, os_, k_final, o_final = _ops_on_both(seq, xfs_dir, layers_factory, overlay_mount)
    k = kernel_mount(lowers, os_.upper, os_.work, KERNEL_INDEX)
    got = observe(k, list(o_final))
    assert _content_and_links(got) == _content_and_links(o_final)


@pytest.mark.parametrize("seq", list(SEQUENCES))
def test_index_overlaypc_mounts_kernel_upper(seq, xfs_dir, layers_factory, overlay_mount):
    """Data, modes and inode sharing of the kernel's indexed upper under overlaypc."""
    lowers, ks, os_, k_final, o_final = _ops_on_both(seq, xfs_dir, layers_factory, overlay_mount)
    m = overlay_mount(ks.options("index=on"))
    got = observe(m.path, list(k_final))
    assert _content_and_links(got) == _content_and_links(k_final)




@pytest.mark.parametrize("seq", SEQUENCES)
def test_index_nlink_kernel_on_overlaypc_upper(seq, xfs_dir, layers_factory,
                                               overlay_mount, kernel_mount):
    lowers, ks, os_, k_final, o_final = _ops_on_both(seq, xfs_dir, layers_factory, overlay_mount)
    k = kernel_mount(lowers, os_.upper, os_.work, KERNEL_INDEX)
    got = _nlinks(observe(k, list(o_final)))
    assert got == _nlinks(o_final), f"kernel shows {got}, overlaypc showed {_nlinks(o_final)}"


@pytest.mark.parametrize("seq", [
    "write_only",  # names not copied up yet: needs the kernel's relative nlink xattr
    "unlink_only",  # the index entry has no upper name: its own link count is 1
    "full",  # every remaining name is in the upper: the index file's link count is right
])
def test_index_nlink_overlaypc_on_kernel_upper(seq, xfs_dir, layers_factory, overlay_mount):
    lowers, ks, os_, k_final, o_final = _ops_on_both(seq, xfs_dir, layers_factory, overlay_mount)
    m = overlay_mount(ks.options("index=on"))
    got = _nlinks(observe(m.path, list(k_final)))
    assert got == _nlinks(k_final), f"overlaypc shows {got}, the kernel showed {_nlinks(k_final)}"


# --- round trips that change the link count on the other implementation's index ----------

def _nlinks_now(root: Path, names) -> dict:
    return {n: os.stat(Path(root) / n).st_nlink for n in names if os.path.lexists(Path(root) / n)}


def test_index_nlink_after_the_kernel_links(xfs_dir, layers_factory, overlay_mount):
    lowers = make_linked_lower(layers_factory, xfs_dir)
    s = new_stack(lowers, xfs_dir, "rt1")
    m = overlay_mount(s.options("index=on"))
    with open(m / "a", "r+b") as f:
        f.write(NEW)
    m.unmount()
    with helpers.kernel_overlay(xfs_dir / "rt1-k", lowers, s.upper, s.work, KERNEL_INDEX) as k:
        os.link(k / "a", k / "d")
        theirs = _nlinks_now(k, NAMES + ["d"])
    assert theirs == {n: 4 for n in NAMES + ["d"]}
    again = overlay_mount(s.options("index=on"))
    assert _nlinks_now(again.path, NAMES + ["d"]) == theirs


@pytest.mark.parametrize("change", ["link", "copy_up"])
def test_index_nlink_changes_on_a_kernel_index(change, xfs_dir, layers_factory, overlay_mount):
    lowers = make_linked_lower(layers_factory, xfs_dir)
    s = new_stack(lowers, xfs_dir, f"rt2-{change}")
    with helpers.kernel_overlay(xfs_dir / f"rt2-{change}-k", lowers, s.upper, s.work,
                                KERNEL_INDEX) as k:
        with open(k / "a", "r+b") as f:
            f.write(NEW)
    m = overlay_mount(s.options("index=on"))
    if change == "link":
        os.link(m / "a", m / "d")          # 3 -> 4
        expected = {n: 4 for n in NAMES + ["d"]}
    else:
        os.chmod(m / "b", 0o600)           # copies b up as a link: stays 3
        expected = {n: 3 for n in NAMES}
    assert _nlinks_now(m.path, NAMES + ["d"]) == expected


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_index_keeps_special_file_links_like_the_kernel(kind, xfs_dir, layers_factory,
                                                        overlay_mount):
    item = helpers.Fifo(0o644) if kind == "fifo" else helpers.Device("chr", 1, 3, 0o644)
    lowers = make_lowers(layers_factory, xfs_dir, {"l": {"p": item, "q": helpers.HardLink("p")}})

    def run(root: Path) -> dict:
        os.chmod(Path(root) / "p", 0o600)  # copies p up
        st = {n: os.stat(Path(root) / n) for n in "pq"}
        return {n: (s.st_mode & 0o777, s.st_nlink, s.st_ino == st["p"].st_ino) for n, s in st.items()}

    ks, os_ = new_stack(lowers, xfs_dir, f"sp-k-{kind}"), new_stack(lowers, xfs_dir, f"sp-o-{kind}")
    with helpers.kernel_overlay(xfs_dir / f"sp-{kind}-k", lowers, ks.upper, ks.work, KERNEL_INDEX) as k:
        theirs = run(k)
    assert theirs == {"p": (0o600, 2, True), "q": (0o600, 2, True)}
    assert run(overlay_mount(os_.options("index=on")).path) == theirs
