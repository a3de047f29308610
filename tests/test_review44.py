"""review44: review of review43's lookup change (an absolute redirect walked directory by
directory in each lower layer, through the directories' own redirects, stopped at an
opaque directory, a whiteout or a non-directory, as the kernel's ``ovl_lookup_layer``).

Directory renames with redirect_dir=on (metacopy off) against the kernel: renamed within
a directory and across, renamed again, a parent renamed; nested renamed directories; a
renamed directory of a former upper (its own redirect, an opaque or whited-out old place
in that layer); with a remount between the renames. Compared: the merged tree, each
object's inode number class (which names share an inode, before and after the renames),
and the upper as the other implementation mounts it.

- Defect found: the walk took a lower layer's OCI whiteout (``.wh.w``) of a directory on
  the way for an absent name, and merged in the hidden ``w`` of the layer below
  (``test_absolute_redirect_through_an_oci_whiteout``).
- Checked, no defect: odd redirects (a symlink on the way or at the end, a file on the
  way or at the end, a missing path, 2000 bytes long, to a directory with its own
  redirect, a loop of two, through an opaque or whited-out directory, OCI-opaque); a
  20-deep chain of nested absolute redirects, also at 128 fds and in a former upper.
- A malformed redirect (an empty component, a trailing slash, ``.``/``..``, two relative
  names, a NUL, an over-long name; in a lower directory on the way, in the bottom layer, in
  an upper-only parent, on a metacopy file) fails the lookup where the kernel's does, with
  its errno (parity45; before: overlaypc followed its names or ignored it,
  ``test_malformed_redirects_as_the_kernel``, ``test_malformed_redirect_places_as_the_kernel``).
"""
from __future__ import annotations

import errno
import os
import stat

import pytest

import helpers
from features_support import mount_side, new_stack, ovl_xattr

pytestmark = [pytest.mark.mount]

ON = ("redirect_dir=on",)

BOTTOM = {"a": {"b": {"c": {"f": "cf", "d": {"g": "dg"}}, "h": "bh"}, "i": "ai"},
          "x": {"y": "xy"}, "p": {"q": {"r": {"s": "pqrs"}}}}

#: renames, in phases (a remount between phases)
SCENARIOS = {
    "within-across-again-parent": [[("a/b/c", "a/b/c2")], [("a/b/c2", "x/c3")],
                                   [("x/c3", "x/c4"), ("x", "x2")], [("a", "a2")]],
    "nested": [[("a/b", "x/b2")], [("x/b2/c", "x/b2/c5"), ("x/b2/c5", "p/c6")],
               [("x", "z"), ("p", "p2")], [("p2/c6/d", "z/b2/d7")]],
    "deep-then-parents": [[("p/q/r", "a/b/c/d/r2")], [("a/b/c", "x/c8")], [("x", "a/b/x9")],
                          [("a", "p/q/a3")]],
    "swap-names": [[("a/b", "x/t")], [("x/y", "a/b")], [("x/t", "x/y")], [("a", "x/y/a4")]],
}


def _renames(mnt, phases, remount):
    seen = []
    for k, phase in enumerate(phases):
        if k:
            mnt = remount()
        for old, new in phase:
            try:
                os.rename(mnt / old, mnt / new)
                seen.append(("ok", old, new))
            except OSError as e:
                seen.append(("err", old, new, e.errno))
    return mnt, seen


def _inodes(mnt):
    """path -> inode class (the sorted names sharing its st_ino)."""
    by = {}
    for dirpath, dirs, files in os.walk(mnt):
        for n in dirs + files + ["."]:
            p = os.path.join(dirpath, n)
            by.setdefault(os.lstat(p).st_ino, []).append(os.path.relpath(os.path.normpath(p), mnt))
    return sorted(sorted(v) for v in by.values())


def _run(side, lowers, phases, tmp_path, overlay_mount, kernel_mount):
    s = new_stack(lowers, tmp_path, side)
    state = {}

    def mount():
        if side == "kernel":
            return kernel_mount(lowers, s.upper, s.work, ON)
        state["m"] = overlay_mount(s.options("redirect_dir=on"))
        return state["m"].path

    def remount():
        if side == "kernel":
            helpers.force_unmount(state["mnt"])
        else:
            state["m"].unmount()
        state["mnt"] = mount()
        return state["mnt"]

    state["mnt"] = mount()
    before = {p: os.lstat(state["mnt"] / p).st_ino
              for p in ("a/b/c/f", "a/b/c/d", "p/q/r/s", "x/y", "a/b", "x/b1/c/d", "r1/s")
              if os.path.lexists(state["mnt"] / p)}
    mnt, seen = _renames(state["mnt"], phases, remount)
    snap = helpers.tree_snapshot(mnt, xattrs=False)
    inos = _inodes(mnt)
    kept = sorted(p for p, ino in before.items()
                  if any(os.lstat(os.path.join(dp, n)).st_ino == ino
                         for dp, ds, fs in os.walk(mnt) for n in ds + fs))
    mnt = remount()
    again = helpers.tree_snapshot(mnt, xattrs=False)
    assert again == snap, helpers.diff_snapshots(snap, again, ("before remount", "after"))
    if side == "kernel":
        helpers.force_unmount(mnt)
    else:
        state["m"].unmount()
    return s, (seen, snap, inos, kept)


def _cross(side, s, tmp_path, overlay_mount, kernel_mount):
    """The tree of ``s`` mounted by the other implementation than ``side``."""
    if side == "kernel":
        m = overlay_mount(s.options("redirect_dir=on"))
        try:
            return helpers.tree_snapshot(m.path, xattrs=False)
        finally:
            m.unmount()
    mnt = kernel_mount(s.lowers, s.upper, s.work, ON)
    try:
        return helpers.tree_snapshot(mnt, xattrs=False)
    finally:
        helpers.force_unmount(mnt)


def _compare(lowers, phases, tmp_path, overlay_mount, kernel_mount):
    got, stacks = {}, {}
    for side in ("kernel", "ours"):
        stacks[side], got[side] = _run(side, lowers, phases, tmp_path, overlay_mount, kernel_mount)
    for i, what in enumerate(("renames", "tree", "inode classes", "inodes kept")):
        if what == "tree":
            assert got["ours"][i] == got["kernel"][i], helpers.diff_snapshots(
                got["kernel"][i], got["ours"][i], ("kernel", "ours"))
        else:
            assert got["ours"][i] == got["kernel"][i], what
    for side in ("kernel", "ours"):
        other = _cross(side, stacks[side], tmp_path, overlay_mount, kernel_mount)
        assert other == got[side][1], helpers.diff_snapshots(got[side][1], other,
                                                             (side, f"{side}'s upper, other mount"))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_directory_renames_as_the_kernel(scenario, tmp_path, overlay_mount, kernel_mount):
    lower = helpers.build_layer(tmp_path / "lower", BOTTOM)
    _compare([lower], SCENARIOS[scenario], tmp_path, overlay_mount, kernel_mount)


#: what the kernel does in a former upper (used as the top lower) over BOTTOM
MIDDLE = {
    "renamed": lambda k: (os.rename(k / "a/b", k / "x/b1"), os.rename(k / "p/q", k / "x/b1/q1")),
    "renamed-old-place-opaque": lambda k: (
        os.rename(k / "a/b", k / "x/b1"), os.rename(k / "a/i", k / "i"), os.rmdir(k / "a"),
        os.mkdir(k / "a"), os.mkdir(k / "a/b")),
    "renamed-old-place-whiteout": lambda k: (
        os.rename(k / "p/q/r", k / "r1"), os.rename(k / "p/q", k / "a/q1"),
        os.rename(k / "x", k / "p/q")),
    "renamed-parent-renamed": lambda k: (
        os.rename(k / "a/b/c", k / "x/c1"), os.rename(k / "x", k / "a/b/x1")),
}

MIDDLE_PHASES = {
    "renamed": [[("x/b1", "b2")], [("b2/q1", "a/q2"), ("a", "x/a5")]],
    "renamed-old-place-opaque": [[("x/b1", "a/b/b3")], [("a/b/b3/c", "c4")]],
    "renamed-old-place-whiteout": [[("r1", "x9")], [("a/q1", "x9/q5")], [("p", "x9/p6")]],
    "renamed-parent-renamed": [[("a/b/x1/c1", "c2")], [("a/b", "b7")], [("c2/d", "b7/d8")]],
}


@pytest.mark.parametrize("middle", sorted(MIDDLE))
def test_renames_over_a_former_upper_as_the_kernel(middle, tmp_path, overlay_mount, kernel_mount):
    lower = helpers.build_layer(tmp_path / "lower", BOTTOM)
    mid = new_stack([lower], tmp_path, "mid")
    k = kernel_mount([lower], mid.upper, mid.work, ON)
    MIDDLE[middle](k)
    helpers.force_unmount(k)
    _compare([mid.upper, lower], MIDDLE_PHASES[middle], tmp_path, overlay_mount, kernel_mount)


#: an upper directory ``n``'s redirect, odd ones included
ODD = {
    "plain": b"/a/b", "symlink-dir": b"/sl/b", "symlink-last": b"/a/bl",
    "file-on-the-way": b"/a/i/b", "file-at-end": b"/a/i", "missing": b"/nope/b",
    "long": b"/" + b"/".join([b"L" * 200] * 10), "relative": b"b",
    "to-redirected": b"/m", "loop": b"/lp1", "through-opaque": b"/o/b", "through-whiteout": b"/w/b",
}
#: malformed ones (never written by the kernel or overlaypc), and how the kernel's lookup
#: of ``n`` answers (``ovl_get_redirect_xattr``: EINVAL for an empty value, an empty
#: component of an absolute one, a ``/`` in a relative one, also in a lower directory on
#: the way; the value ends at a NUL; then EACCES for a ``.``, ``..`` or empty name looked
#: up in a lower layer; a name over 255 bytes is absent there)
MALFORMED = {"trailing-slash": (b"/a/b/", errno.EINVAL), "double-slash": (b"//a/b", errno.EINVAL),
             "inner-double": (b"/a//b", errno.EINVAL), "root": (b"/", errno.EINVAL),
             "empty": (b"", errno.EINVAL), "relative-two": (b"a/b", errno.EINVAL),
             "relative-slash": (b"b/", errno.EINVAL), "dot": (b"/a/./b", errno.EACCES),
             "dotdot": (b"/a/../x", errno.EACCES), "relative-dot": (b".", errno.EACCES),
             "relative-dotdot": (b"..", errno.EACCES), "nul-first": (b"\0b", errno.EACCES),
             "nul-after": (b"/a/b\0/zz", None), "relative-nul": (b"x\0/y", None),
             "long-name": (b"L" * 300, None), "long-last": (b"/a/" + b"L" * 300, None),
             "malformed-on-the-way": (b"/bad/b", errno.EINVAL),
             "malformed-in-the-bottom-layer": (b"/q", None)}


def _probe(mnt):
    out = []
    for p in ("n", "n/f", "n/c", "n/c/f"):
        try:
            st = os.lstat(mnt / p)
            kind = "dir" if os.path.isdir(mnt / p) and not os.path.islink(mnt / p) else "other"
            out.append((p, kind, sorted(os.listdir(mnt / p)) if kind == "dir" else
                        (mnt / p).read_bytes() if os.path.isfile(mnt / p) else None))
            del st
        except OSError as e:
            out.append((p, "err", e.errno))
    return out


def _odd_probe(value, tmp_path, overlay_mount, kernel_mount):
    """{side: _probe} of an upper directory ``n`` redirected by ``value`` (layers in a new
    directory of ``tmp_path``)."""
    tmp_path = tmp_path / f"probe-{os.urandom(3).hex()}"
    tmp_path.mkdir()
    bottom = helpers.build_layer(tmp_path / "bottom", {
        "a": {"b": {"f": "abf", "c": {"f": "abcf"}}, "i": "ai"}, "x": {"f": "xf"},
        "out": {"b": {"f": "escaped"}}, "o": {"b": {"f": "hidden-o"}}, "w": {"b": {"f": "hidden-w"}},
        "m2": {"f": "m2f"}, "lp2": {"f": "lp2f"}, "L" * 200: helpers.Dir(), "q": {"f": "qf"}})
    os.setxattr(bottom / "q", "trusted.overlay.redirect", b"//")  # (the last layer: not read)
    os.symlink(str(tmp_path / "bottom/out"), bottom / "sl")
    os.symlink("b", bottom / "a/bl")
    deep = bottom / "/".join(["L" * 200] * 10)
    deep.mkdir(parents=True, exist_ok=True)
    (deep / "f").write_text("long")
    mid = helpers.build_layer(tmp_path / "mid", {"m": helpers.Dir(), "lp1": helpers.Dir(),
                                                  "lp2": helpers.Dir(), "o": helpers.Dir(),
                                                  "w": helpers.Dir(), "bad": {"b": helpers.Dir()}})
    os.setxattr(mid / "bad", "trusted.overlay.redirect", b"a//b")
    os.setxattr(mid / "m", "trusted.overlay.redirect", b"/m2")
    os.setxattr(mid / "lp1", "trusted.overlay.redirect", b"/lp2")
    os.setxattr(mid / "lp2", "trusted.overlay.redirect", b"/lp1")
    os.setxattr(mid / "o", "trusted.overlay.opaque", b"y")
    os.rmdir(mid / "w")
    os.mknod(mid / "w", 0o600 | 0o020000, 0)
    return {side: _through_redirected_n(side, new_stack([mid, bottom], tmp_path, side), value,
                                        _probe, overlay_mount, kernel_mount)
            for side in ("kernel", "ours")}


def _through_redirected_n(side, s, value, probe, overlay_mount, kernel_mount):
    """``probe(mnt)`` of stack ``s`` mounted by ``side`` (the kernel or overlaypc,
    redirect_dir=on) with an upper directory ``n`` whose redirect is ``value``."""
    (s.upper / "n").mkdir()
    os.setxattr(s.upper / "n", "trusted.overlay.redirect", value)
    mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
    try:
        return probe(mnt)
    finally:
        unmount()


@pytest.mark.parametrize("odd", sorted(ODD))
def test_odd_redirects_as_the_kernel(odd, tmp_path, overlay_mount, kernel_mount):
    got = _odd_probe(ODD[odd], tmp_path, overlay_mount, kernel_mount)
    assert got["ours"] == got["kernel"]


@pytest.mark.parametrize("odd", sorted(MALFORMED))
def test_malformed_redirects_as_the_kernel(odd, tmp_path, overlay_mount, kernel_mount):
    """The lookup fails where the kernel's does (before: overlaypc followed the names an
    empty component left, ignored the rest, and read a bottom layer's redirect)."""
    value, refused = MALFORMED[odd]
    got = _odd_probe(value, tmp_path, overlay_mount, kernel_mount)
    if refused is not None:
        assert got["kernel"][0] == ("n", "err", refused)
    else:
        assert got["kernel"][0][1] == "dir"
    assert got["ours"] == got["kernel"]



#: where a malformed redirect sits (a directory in a parent with no lower part, which the
#: kernel reads all the same; an opaque directory's and a plain file's, which it never
#: reads; a metacopy file's, metacopy=on), and the probed path
PLACES = {"upper-only-parent": "u/n", "opaque": "n", "file": "n", "metacopy-file": "a/i"}


def _place(where, upper, value):
    if where == "upper-only-parent":
        (upper / "u/n").mkdir(parents=True)
    elif where == "opaque":
        (upper / "n").mkdir()
        os.setxattr(upper / "n", "trusted.overlay.opaque", b"y")
    elif where == "file":
        (upper / "n").write_text("upper n")
    else:
        (upper / "a").mkdir()
        with open(upper / "a/i", "wb") as f:
            f.truncate(2)
        os.setxattr(upper / "a/i", "trusted.overlay.metacopy", b"")
    os.setxattr(upper / PLACES[where], "trusted.overlay.redirect", value)


@pytest.mark.parametrize("value", [b"", b"a/b", b"/a//b", b"..", b"i"], ids=repr)
@pytest.mark.parametrize("where", sorted(PLACES))
def test_malformed_redirect_places_as_the_kernel(where, value, tmp_path, overlay_mount, kernel_mount):
    bottom = helpers.build_layer(tmp_path / "bottom", {"a": {"b": {"f": "abf"}, "i": "ai"}})
    got = {}
    for side in ("kernel", "ours"):
        s = new_stack([bottom], tmp_path, side)
        _place(where, s.upper, value)
        if side == "kernel":
            mnt = kernel_mount(s.lowers, s.upper, s.work, ON + ("metacopy=on",))
            unmount = lambda: helpers.force_unmount(mnt)  # noqa: E731
        else:
            m = overlay_mount(s.options("redirect_dir=on,metacopy=on"))
            mnt, unmount = m.path, m.unmount
        try:
            path = mnt / PLACES[where]
            got[side] = (sorted(os.listdir(path)) if path.is_dir() else path.read_bytes())
        except OSError as e:
            got[side] = errno.errorcode[e.errno]
        finally:
            unmount()
    assert got["ours"] == got["kernel"]



def test_rename_below_an_opaque_directory_with_a_redirect_as_the_kernel(tmp_path, overlay_mount,
                                                                       kernel_mount):
    """An opaque upper directory ``o`` with a (stale) redirect, which the kernel never reads
    (``ovl_lookup_single`` stops at an opaque directory before ``ovl_check_redirect``, so
    its inode holds none for ``ovl_get_redirect``): a directory below it with lower parts
    (``o/c``, absolute redirect to ``/a/b``) and one in that (``o/c/d``) renamed across
    directories get the same redirects from both (the walk up from ``o/c/d`` stops at
    ``o/c``'s absolute one; an object below an opaque directory has lower parts only
    through an absolute redirect of its own or of an ancestor below it, so the opaque
    one's is never reached)."""
    bottom = helpers.build_layer(tmp_path / "bottom", {
        "a": {"b": {"d": {"f": "abdf"}, "e": {"f": "abef"}}}, "zz": {"f": "zzf"}})
    got = {}
    for side in ("kernel", "ours"):
        s = new_stack([bottom], tmp_path, side)
        (s.upper / "o/c").mkdir(parents=True)
        os.setxattr(s.upper / "o", "trusted.overlay.opaque", b"y")
        os.setxattr(s.upper / "o", "trusted.overlay.redirect", b"/zz")
        os.setxattr(s.upper / "o/c", "trusted.overlay.redirect", b"/a/b")
        (s.upper / "a").mkdir()
        os.mknod(s.upper / "a/b", 0o600 | stat.S_IFCHR, 0)  # (moved: its old name whited out)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
        try:
            os.rename(mnt / "o/c/d", mnt / "o/d2")
            os.rename(mnt / "o/c/e", mnt / "e2")
            snap = helpers.tree_snapshot(mnt, xattrs=False)
        finally:
            unmount()
        got[side] = (snap, ovl_xattr(s.upper / "o/d2", "redirect"), ovl_xattr(s.upper / "e2", "redirect"))
    assert got["kernel"][1:] == (b"/a/b/d", b"/a/b/e")
    assert got["ours"] == got["kernel"]



#: redirect_dir=nofollow: where a directory with a redirect sits (its probed path)
NOFOLLOW = {"upper": "n", "upper-only-parent": "u/n", "middle-layer": "n", "bottom-layer": "n"}


@pytest.mark.parametrize("value", [b"x", b"/x", b"nope", b"..", b"a/b"], ids=repr)
@pytest.mark.parametrize("where", sorted(NOFOLLOW))
def test_nofollow_refuses_redirected_directories_as_the_kernel(where, value, tmp_path,
                                                              overlay_mount, kernel_mount):
    """Under redirect_dir=nofollow the kernel (6.18) fails the lookup of a directory whose
    redirect it reads (one with a layer below holding its parent, ``d->last`` false):
    EPERM, "refusing to follow redirect", whatever the redirect names; EINVAL for a
    malformed one. overlaypc ignored the redirect (the directory without what it names)."""
    bottom = helpers.build_layer(tmp_path / "bottom", {"x": {"f": "xf"}, "n": {"own": "o"}})
    got = {}
    for side in ("kernel", "ours"):
        mid = helpers.build_layer(tmp_path / f"mid-{side}", {"m": helpers.Dir()})
        # (bottom-layer: ``mid`` the only lower, nothing below it)
        s = new_stack([mid] if where == "bottom-layer" else [mid, bottom], tmp_path, side)
        path = (s.upper if where.startswith("upper") else mid) / NOFOLLOW[where]
        path.mkdir(parents=True)
        os.setxattr(path, "trusted.overlay.redirect", value)
        if side == "kernel":
            mnt = kernel_mount(s.lowers, s.upper, s.work, ("redirect_dir=nofollow",))
            unmount = lambda: helpers.force_unmount(mnt)  # noqa: E731
        else:
            m = overlay_mount(s.options("redirect_dir=nofollow"))
            mnt, unmount = m.path, m.unmount
        try:
            got[side] = sorted(os.listdir(mnt / NOFOLLOW[where]))
        except OSError as e:
            got[side] = errno.errorcode[e.errno]
        finally:
            unmount()
    assert got["ours"] == got["kernel"]


DEPTH = 20


def _deep_moves(mnt):
    """Each level of the chain ``d1/.../d20`` moved into a new sibling ``s<k>`` (absolute
    redirects, each one level deeper than the last); the path of the innermost one."""
    at = ""
    for k in range(1, DEPTH + 1):
        os.mkdir(mnt / at / f"s{k}")
        os.rename(mnt / at / f"d{k}", mnt / at / f"s{k}/d{k}")
        at = f"{at}s{k}/d{k}/"
    return at


@pytest.mark.parametrize("nofile", [None, 128])
def test_deep_renamed_tree_as_the_kernel(nofile, tmp_path, overlay_mount, kernel_mount):
    """A chain of 20 directories, each level moved across directories (20 nested absolute
    redirects, the deepest 80 names long): the tree, before and after a remount, as the
    kernel's; the daemon runs with 128 fds at most (the least it mounts with)."""
    spec, at = {}, ""
    for k in range(1, DEPTH + 1):
        at = f"{at}d{k}/"
        spec[f"{at}f{k}"] = f"file {k}"
    lower = helpers.build_layer(tmp_path / "lower", spec)
    got = {}
    for side in ("kernel", "ours"):
        s = new_stack([lower], tmp_path, side)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, nofile=nofile)
        inner = _deep_moves(mnt)
        ino = os.lstat(mnt / inner / f"f{DEPTH}").st_ino
        snap = helpers.tree_snapshot(mnt, xattrs=False)
        unmount()
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount, nofile=nofile)
        assert helpers.tree_snapshot(mnt, xattrs=False) == snap
        assert os.lstat(mnt / inner / f"f{DEPTH}").st_ino == ino
        got[side] = (snap, ovl_xattr(s.upper / inner.rstrip("/"), "redirect"))
        unmount()
    assert len(got["ours"][0]) == 2 * DEPTH + DEPTH + 1
    assert got["ours"] == got["kernel"]


def test_deep_renamed_tree_of_a_former_upper_as_the_kernel(tmp_path, overlay_mount, kernel_mount):
    """The 20 nested moves made by the kernel in a former upper; over it the innermost
    directory and then each level moved to the root: each lookup walks the former
    upper's 20 redirects on the way, as the kernel's."""
    spec, at = {}, ""
    for k in range(1, DEPTH + 1):
        at = f"{at}d{k}/"
        spec[f"{at}f{k}"] = f"file {k}"
    lower = helpers.build_layer(tmp_path / "lower", spec)
    mid = new_stack([lower], tmp_path, "mid")
    k = kernel_mount([lower], mid.upper, mid.work, ON)
    inner = _deep_moves(k).rstrip("/")
    helpers.force_unmount(k)
    got = {}
    for side in ("kernel", "ours"):
        s = new_stack([mid.upper, lower], tmp_path, side)
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
        path, seen = inner, []
        while "/" in path:
            name = f"top{path.count('/')}"
            os.rename(mnt / path, mnt / name)
            seen.append(ovl_xattr(s.upper / name, "redirect"))
            path = path.rsplit("/", 2)[0]
        snap = helpers.tree_snapshot(mnt, xattrs=False)
        unmount()
        mnt, unmount = mount_side(side, s, overlay_mount, kernel_mount)
        assert helpers.tree_snapshot(mnt, xattrs=False) == snap
        got[side] = (seen, snap)
        unmount()
    assert sum(e.type == "file" for e in got["kernel"][1].values()) == DEPTH
    assert got["ours"] == got["kernel"]


@pytest.mark.parametrize("where", ["on-the-way", "last"])
def test_absolute_redirect_through_an_oci_whiteout(where, tmp_path, overlay_mount, kernel_mount):
    """A middle layer whites ``w`` out in the OCI format (``.wh.w``; the kernel, which reads
    no OCI markers, gets a 0/0 device there): an upper directory redirected to ``/w/b``
    (or ``/w``) must not reach the hidden ``w`` of the layer below, as the kernel's
    ``ovl_lookup_layer`` stops at the whiteout on the way."""
    bottom = helpers.build_layer(tmp_path / "bottom", {"w": {"b": {"f": "hidden"}, "f": "hidden"}})
    target = b"/w/b" if where == "on-the-way" else b"/w"
    got = {}
    for side, mark in (("kernel", helpers.Whiteout()), ("ours", helpers.OciWhiteout())):
        mid = helpers.build_layer(tmp_path / f"mid-{side}", {"w": mark, "keep": "k"})
        got[side] = _through_redirected_n(
            side, new_stack([mid, bottom], tmp_path, side), target,
            lambda mnt: (sorted(os.listdir(mnt / "n")), sorted(os.listdir(mnt))),
            overlay_mount, kernel_mount)
    assert got["ours"] == got["kernel"] == ([], ["keep", "n"])


def test_absolute_redirect_through_an_oci_opaque_directory(tmp_path, overlay_mount, kernel_mount):
    """The same with ``w`` opaque in the middle layer (``.wh..wh..opq`` for overlaypc, the
    xattr for the kernel): the search ends below that layer."""
    bottom = helpers.build_layer(tmp_path / "bottom", {"w": {"b": {"f": "hidden"}}})
    got = {}
    for side in ("kernel", "ours"):
        mid = helpers.build_layer(tmp_path / f"mid-{side}", {"w": helpers.Dir(), "keep": "k"})
        if side == "kernel":
            os.setxattr(mid / "w", "trusted.overlay.opaque", b"y")
        else:
            (mid / "w/.wh..wh..opq").write_bytes(b"")
        s = new_stack([mid, bottom], tmp_path, side)
        (s.upper / "n").mkdir()
        os.setxattr(s.upper / "n", "trusted.overlay.redirect", b"/w/b")
        if side == "kernel":
            mnt = kernel_mount(s.lowers, s.upper, s.work, ON)
        else:
            m = overlay_mount(s.options("redirect_dir=on"))
            mnt = m.path
        got[side] = (sorted(os.listdir(mnt / "n")), sorted(os.listdir(mnt / "w")))
        if side == "kernel":
            helpers.force_unmount(mnt)
        else:
            m.unmount()
    assert got["ours"] == got["kernel"] == ([], [])
