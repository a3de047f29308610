"""review43: review of compat41 (metacopy=on renames of lower files copy metadata only;
index=on lower hard links copied up metadata-only; the lookup past a lower layer's
metacopy file).

- A rename of a file whose top lower is a metacopy file of a lower layer (a former upper,
  ``u1/x``: the kernel's rename of ``y``, redirect ``y``, a whiteout at ``u1/y``): the
  redirect must name the file as the merged namespace reaches it at its old place (the
  kernel's ``ovl_get_redirect``: the dentry's name, or its path with the upper
  ancestors' redirects), whose lookup then follows ``u1/x``'s own redirect; not the data's
  path at the bottom layer (``y``), which the lookup meets in ``u1`` first: a whiteout.
  And across directories the kernel's ``/q/z`` (``q`` redirected to ``p`` in ``u1``):
  overlaypc's lookup of an absolute redirect has to walk ``u1``'s ``q`` and take its
  redirect for the layers below, as the kernel's ``ovl_lookup_layer``.
- Such a walk stops at an opaque directory (after its layer) or a whiteout on the way,
  as the kernel's: before, a lower file hidden by a middle layer was read.
- Checked, no defect found: a shared mapping and fstat of a lower file renamed
  metadata-only, then written through its new name (cache=kernel, shared); renames,
  unlinks and a write of an index=on lower hard link (four names) against the kernel,
  with an open handle; a chain of two former uppers' metacopy renames, renamed again and
  written (and refused, EPERM, without metacopy=on); a kill -9 during the rename of an
  index=on lower hard link (before its copy lands in the index, before the move).
"""
from __future__ import annotations

import os

import pytest

import helpers
from features_support import KERNEL_METACOPY, new_stack, ovl_xattr

pytestmark = [pytest.mark.mount]

DATA = bytes(range(256)) * 300


def _former_upper(tmp_path, kernel_mount):
    """(l2, u1): ``l2`` holds ``y``, ``p/z`` and the dir ``d``; ``u1`` is the upper of the
    kernel's renames ``y`` -> ``x`` and ``p`` -> ``q`` over it (metacopy ``x``, redirect
    ``y``; ``q`` redirect ``p``; whiteouts at ``y`` and ``p``)."""
    l2 = helpers.build_layer(tmp_path / "l2", {"y": DATA, "p": {"z": DATA[::-1]},
                                               "d": helpers.Dir()})
    u1, w1 = tmp_path / "u1", tmp_path / "w1"
    u1.mkdir()
    w1.mkdir()
    k = kernel_mount([l2], u1, w1, KERNEL_METACOPY)
    os.rename(k / "y", k / "x")
    os.rename(k / "p", k / "q")
    helpers.force_unmount(k)
    assert ovl_xattr(u1 / "x", "redirect") == b"y" and ovl_xattr(u1 / "q", "redirect") == b"p"
    return l2, u1


#: renames over the former upper: (old, new)
CHAIN_RENAMES = [("x", "x2"), ("q/z", "d/z2")]


def test_rename_over_a_former_upper_metacopy_file_as_the_kernel(tmp_path, overlay_mount,
                                                                kernel_mount):
    l2, u1 = _former_upper(tmp_path, kernel_mount)
    stacks = {side: new_stack([u1, l2], tmp_path, side) for side in ("kernel", "ours")}
    k = kernel_mount([u1, l2], stacks["kernel"].upper, stacks["kernel"].work, KERNEL_METACOPY)
    m = overlay_mount(stacks["ours"].options("metacopy=on"))
    for old, new in CHAIN_RENAMES:
        os.rename(k / old, k / new)
        os.rename(m / old, m / new)
    expect = {"x2": DATA, "d/z2": DATA[::-1]}
    assert {new: (k / new).read_bytes() for new in expect} == expect  # (the oracle)
    # (the kernel's: the old name; the old merged path, not the data's "/p/z")
    assert {new: ovl_xattr(stacks["kernel"].upper / new, "redirect") for new in expect} == \
        {"x2": b"x", "d/z2": b"/q/z"}
    assert {new: (m / new).read_bytes() for new in expect} == expect
    helpers.force_unmount(k)
    m.unmount()
    redirects = {side: {new: ovl_xattr(s.upper / new, "redirect") for new in expect}
                 for side, s in stacks.items()}
    assert redirects["ours"] == redirects["kernel"]
    for side, s in stacks.items():  # each side's upper read by the other
        k = kernel_mount([u1, l2], s.upper, s.work, KERNEL_METACOPY)
        assert {new: (k / new).read_bytes() for new in expect} == expect, side
        helpers.force_unmount(k)
        m = overlay_mount(s.options("metacopy=on"))
        assert {new: (m / new).read_bytes() for new in expect} == expect, side
        m.unmount()


@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_mmap_of_renamed_lower_file_sees_later_writes(cache, tmp_path, overlay_mount):
    """A shared mapping of the lower file made before its metadata-only rename shows a write
    through the new name (its data copy-up through the redirect), as does fstat's size."""
    import mmap
    lower = helpers.build_layer(tmp_path / "lower", {"f": DATA, "d": helpers.Dir()})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work},metacopy=on,cache={cache}")
    fd = os.open(m / "f", os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, len(DATA), mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            assert mm[4096:4104] == DATA[4096:4104]
            os.rename(m / "f", m / "d/f2")
            assert ovl_xattr(upper / "d/f2", "metacopy") == b""
            with open(m / "d/f2", "r+b") as f:
                f.seek(4096)
                f.write(b"WRITTEN!")
                f.seek(0, os.SEEK_END)
                f.write(b"tail")
            assert mm[4096:4104] == b"WRITTEN!"
            assert os.fstat(fd).st_size == len(DATA) + 4
        finally:
            mm.close()
    finally:
        os.close(fd)
    assert (m / "d/f2").read_bytes()[4096:4104] == b"WRITTEN!"


def _hard_link_steps(m: str) -> list:
    """Steps over the lower hard link ``a``, ``b``, ``c``, ``e/a4`` (index=on, metacopy=on):
    what each name shows after each (size, nlink, the first bytes), or None where gone."""
    names = ("a", "b", "c", "e/a4", "d/a2", "d/b2")

    def seen():
        out = {}
        for n in names:
            try:
                st = os.stat(f"{m}/{n}")
            except FileNotFoundError:
                out[n] = None
                continue
            with open(f"{m}/{n}", "rb") as f:
                out[n] = (st.st_size, st.st_nlink, f.read(8))
        return out

    fd = os.open(f"{m}/c", os.O_RDONLY)
    try:
        got = [seen()]
        os.rename(f"{m}/a", f"{m}/d/a2")  # metadata only: a metacopy index entry
        got.append(seen())
        os.chmod(f"{m}/e/a4", 0o600)
        os.rename(f"{m}/b", f"{m}/d/b2")
        os.unlink(f"{m}/e/a4")
        got.append(seen())
        with open(f"{m}/d/b2", "r+b") as f:  # the data copy-up, through a redirected name
            f.write(b"WRITTEN!")
        got.append(seen())
        got.append((os.fstat(fd).st_nlink, os.pread(fd, 8, 0)))
    finally:
        os.close(fd)
    os.unlink(f"{m}/d/a2")
    got.append(seen())
    return got


def test_lower_hard_link_renames_and_unlinks_as_the_kernel(tmp_path, overlay_mount, kernel_mount):
    spec = {"a": DATA, "b": helpers.HardLink("a"), "c": helpers.HardLink("a"),
            "e": {"a4": helpers.HardLink("a")}, "d": helpers.Dir()}
    got = {}
    for side in ("kernel", "ours"):
        lower = helpers.build_layer(tmp_path / side / "lower", spec)
        s = new_stack([lower], tmp_path / side, side)
        if side == "kernel":
            k = kernel_mount([lower], s.upper, s.work, KERNEL_METACOPY + ("index=on",))
            got[side] = _hard_link_steps(str(k))
            helpers.force_unmount(k)
        else:
            m = overlay_mount(s.options("metacopy=on,index=on"))
            got[side] = _hard_link_steps(str(m.path))
            m.unmount()
    assert got["ours"] == got["kernel"]


def test_chain_of_metacopy_layers_as_the_kernel(tmp_path, overlay_mount, kernel_mount):
    """Two former uppers of the kernel's renames (``y`` -> ``x`` over ``l3``, then ``x`` ->
    ``d/w`` over both): overlaypc reads ``d/w`` through both redirects, renames it again
    and writes it as the kernel; a mount without metacopy=on refuses it (EPERM)."""
    l3 = helpers.build_layer(tmp_path / "l3", {"y": DATA, "d": helpers.Dir()})
    u2, w2, u1, w1 = (tmp_path / n for n in ("u2", "w2", "u1", "w1"))
    for p in (u2, w2, u1, w1):
        p.mkdir()
    k = kernel_mount([l3], u2, w2, KERNEL_METACOPY)
    os.rename(k / "y", k / "x")
    helpers.force_unmount(k)
    k = kernel_mount([u2, l3], u1, w1, KERNEL_METACOPY)
    os.rename(k / "x", k / "d/w")
    helpers.force_unmount(k)
    assert ovl_xattr(u1 / "d/w", "redirect") == b"/x"
    got = {}
    for side in ("kernel", "ours"):
        s = new_stack([u1, u2, l3], tmp_path, side)
        if side == "kernel":
            mnt = kernel_mount([u1, u2, l3], s.upper, s.work, KERNEL_METACOPY)
        else:
            m = overlay_mount(s.options("metacopy=on"))
            mnt = m.path
        seen = [(mnt / "d/w").read_bytes() == DATA]
        os.rename(mnt / "d/w", mnt / "w2")
        seen.append((mnt / "w2").read_bytes() == DATA)
        seen.append(ovl_xattr(s.upper / "w2", "redirect"))
        with open(mnt / "w2", "r+b") as f:
            f.write(b"W")
        seen.append((mnt / "w2").read_bytes() == b"W" + DATA[1:])
        got[side] = seen
        if side == "kernel":
            helpers.force_unmount(mnt)
        else:
            m.unmount()
    assert got["ours"] == got["kernel"] == [True, True, b"/d/w", True]
    s = new_stack([u1, u2, l3], tmp_path, "off")
    m = overlay_mount(s.options("redirect_dir=on"))
    with pytest.raises(PermissionError):
        (m / "d/w").read_bytes()
    assert (l3 / "y").read_bytes() == DATA


@pytest.mark.parametrize("middle", ["opaque", "whiteout"])
def test_absolute_redirect_through_a_hiding_middle_layer_as_the_kernel(middle, tmp_path,
                                                                       overlay_mount, kernel_mount):
    """An upper metacopy file redirected to ``/p/z`` (the kernel's move of ``p/z``), put over
    a middle layer where ``p`` is opaque (removed and made again) or whited out: the data
    below is hidden there, and the kernel's lookup stops (EIO, no data); so does
    overlaypc's. Before: the absolute path was looked up whole in each layer, past the
    middle layer's ``p``, and the hidden ``l2/p/z`` was read."""
    l2 = helpers.build_layer(tmp_path / "l2", {"p": {"z": DATA}})
    top, middle_upper = new_stack([l2], tmp_path, "top"), new_stack([l2], tmp_path, "mid")
    k = kernel_mount([l2], top.upper, top.work, KERNEL_METACOPY)
    os.rename(k / "p/z", k / "w")
    helpers.force_unmount(k)
    assert ovl_xattr(top.upper / "w", "redirect") == b"/p/z"
    k = kernel_mount([l2], middle_upper.upper, middle_upper.work, KERNEL_METACOPY)
    os.unlink(k / "p/z")
    os.rmdir(k / "p")
    if middle == "opaque":
        os.mkdir(k / "p")
    helpers.force_unmount(k)
    got = {}
    for side in ("kernel", "ours"):
        s = new_stack([middle_upper.upper, l2], tmp_path, side)
        os.link(top.upper / "w", s.upper / "w")  # (the file, read only: the same inode)
        if side == "kernel":
            mnt = kernel_mount([middle_upper.upper, l2], s.upper, s.work, KERNEL_METACOPY)
        else:
            m = overlay_mount(s.options("metacopy=on"))
            mnt = m.path
        try:
            got[side] = (mnt / "w").read_bytes()[:4]
        except OSError as e:
            got[side] = e.errno
        if side == "kernel":
            helpers.force_unmount(mnt)
        else:
            m.unmount()
    assert got["ours"] == got["kernel"]


@pytest.mark.parametrize("kill", ["copyup.rename~mvsrc=pause", "layer.rename~mvdst=pause"],
                         ids=["before-copy-up-lands", "before-the-move"])
def test_kill9_during_rename_of_lower_hard_link(kill, tmp_path, overlay_mount, kernel_mount):
    """index=on + metacopy=on: a kill -9 while a lower hard link's name is renamed (its
    metadata-only copy into the index) leaves both names reading the data, through a fresh
    overlaypc and the kernel; the rename then, and a write through the other name, seen
    through the new name."""
    from reliability_support import kill_at_pause
    lower = helpers.build_layer(tmp_path / "lower", {"mvsrc": DATA, "mvsrc2": helpers.HardLink("mvsrc"),
                                                     "d": helpers.Dir()})
    s = new_stack([lower], tmp_path, "s")
    opts = s.options("metacopy=on,index=on")
    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS": kill})
    rc, out, err = kill_at_pause(m, f"""
        os.rename({str(m / 'mvsrc')!r}, {str(m / 'd/mvdst')!r})
        sys.exit(0)
    """, kill)
    assert rc != 0, f"the rename blocked in the killed daemon succeeded: {out} {err}"
    want = {"mvsrc": DATA, "mvsrc2": DATA}
    m2 = overlay_mount(opts)
    assert {n: (m2 / n).read_bytes() for n in want} == want and not (m2 / "d/mvdst").exists()
    assert os.stat(m2 / "mvsrc").st_nlink == 2
    m2.unmount()
    k = kernel_mount([lower], s.upper, s.work, KERNEL_METACOPY + ("index=on",))
    assert {n: (k / n).read_bytes() for n in want} == want and not (k / "d/mvdst").exists()
    assert os.stat(k / "mvsrc").st_nlink == 2
    helpers.force_unmount(k)
    m3 = overlay_mount(opts)
    os.rename(m3 / "mvsrc", m3 / "d/mvdst")
    with open(m3 / "mvsrc2", "r+b") as f:
        f.write(b"W")
    assert (m3 / "d/mvdst").read_bytes() == b"W" + DATA[1:]
    assert os.stat(m3 / "d/mvdst").st_nlink == 2
    m3.unmount()
    k = kernel_mount([lower], s.upper, s.work, KERNEL_METACOPY + ("index=on",))
    assert (k / "d/mvdst").read_bytes() == (k / "mvsrc2").read_bytes() == b"W" + DATA[1:]
    helpers.force_unmount(k)
    assert (lower / "mvsrc").read_bytes() == DATA
