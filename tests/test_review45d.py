"""review45d: review of peer45 (a hard link under metacopy=on is a metadata-only copy-up
with an absolute redirect set on the source before the link, ``Namespace.link``) and of
review45c's listing of redirected directories, with the kernel overlay as the oracle.
No defect found. Checked (each scenario on the kernel's mount and on overlaypc's over one
lower, fresh uppers, index=off and on: the merged views, the uppers' redirects and
metacopy marks, then each mount reading the other's upper):

- links of a lower file, of a lower hard link (nlink 2), of a metacopy file renamed
  within its directory (relative redirect) and in a renamed directory (relative in
  relative), of a file of a directory renamed in the upper and in a lower layer (two
  lowers, the top one's redirect), into a renamed directory, over the whiteout of a
  renamed lower file, of an empty file and a symlink; then renames and unlinks of either
  name, the other lower name linked (index=on), all names gone but one;
- a link failing after the redirect was set (the new name's link ENOSPC, kill -9 just
  before it): the source reads its data, the kernel too, a link after works;
- EEXIST from a name made behind the mount's back (refused before any copy-up);
- metacopy=off: the link copies the data (no mark, no redirect); an upper with metacopy
  files mounted without metacopy: EPERM at the link, as the kernel's;
- an fd opened before the link reads the data written through the new name;
- links racing a data copy-up and a chmod, and racing a rename of the source;
- ``ls -l`` of directories holding renamed directories, then ``stat`` of each: the
  kernel's attributes and inode numbers, ``d_ino`` == ``st_ino``, one LOOKUP per
  redirected directory (and per lower hard link name) after READDIRPLUS.

Known difference (README, Hard links): under index=on a LINK names no source, so the
daemon links through the name it knows; the kernel links the other lower name up too.
"""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

import helpers
from features_support import KERNEL_METACOPY, new_stack, ovl_xattr, upper_redirects

pytestmark = [pytest.mark.mount]

LOWER = {"f": "lower f data\n" * 100, "h1": "hard link data\n" * 50, "h2": helpers.HardLink("h1"), "a": {"f": "a/f data\n" * 30},
         "d": {"x": "x"}, "e": {}, "z": "",
         "s": helpers.Symlink("f")}


@pytest.fixture
def lower(xfs_dir):
    root = xfs_dir / "l"
    return helpers.build_layer(root, LOWER)


def view(root: Path) -> dict:
    """Every file: (sha of data, nlink, mode) and the groups of names sharing an inode."""
    out, inos = {}, {}
    for dirpath, dirs, files in os.walk(root):
        for n in sorted(files):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = (os.readlink(p), st.st_nlink, "symlink")
            else:
                with open(p, "rb") as f:
                    out[rel] = (hashlib.sha256(f.read()).hexdigest()[:12], st.st_nlink,
                                oct(stat.S_IMODE(st.st_mode)))
            inos.setdefault(st.st_ino, []).append(rel)
    return {"files": out, "links": sorted(sorted(v) for v in inos.values() if len(v) > 1)}


def data(v: dict) -> dict:
    return {k: sha for k, (sha, _, _) in v["files"].items()}


def uview(upper: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(upper):
        for n in files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[os.path.relpath(p, upper)] = ovl_xattr(p, "metacopy") is not None
    return {"redirects": upper_redirects(upper), "metacopy": out}


def s_link_hardlink(r):
    os.link(r / "h1", r / "d/n")


def s_link_rename(r):
    os.link(r / "f", r / "d/n")
    os.rename(r / "f", r / "e/f2")
    os.rename(r / "d/n", r / "a/n2")


def s_link_rename_new(r):
    os.link(r / "f", r / "d/n")
    os.rename(r / "d/n", r / "e/n2")


def s_link_unlink(r):
    os.link(r / "f", r / "d/n")
    os.unlink(r / "f")


def s_link_unlink_new(r):
    os.link(r / "f", r / "d/n")
    os.unlink(r / "d/n")


def s_renamed_dir(r):
    os.rename(r / "a", r / "b")
    os.link(r / "b/f", r / "d/n")


def s_renamed_dir_deep(r):
    os.rename(r / "a", r / "d/b")
    os.link(r / "d/b/f", r / "n")
    os.rename(r / "d", r / "e/dd")


def s_chmod_rename_link(r):
    os.chmod(r / "f", 0o600)
    os.rename(r / "f", r / "g")         # relative redirect "f"
    os.link(r / "g", r / "d/n")


def s_link_twice(r):
    os.link(r / "f", r / "d/n")
    os.link(r / "d/n", r / "e/m")
    os.unlink(r / "f")


def s_hard_both(r):
    os.link(r / "h1", r / "d/n")
    os.link(r / "h2", r / "e/m")


def s_link_write(r):
    os.link(r / "h1", r / "d/n")
    with open(r / "d/n", "ab") as f:
        f.write(b"more\n")


def s_hard_rename_unlink(r):
    os.link(r / "h1", r / "d/n")
    os.rename(r / "h2", r / "e/h2r")
    os.link(r / "e/h2r", r / "a/k")
    os.unlink(r / "h1")
    os.rename(r / "d/n", r / "n")


def s_hard_all_gone(r):
    os.link(r / "h1", r / "d/n")
    os.unlink(r / "h1")
    os.unlink(r / "h2")
    os.rename(r / "d", r / "e/d")


def s_link_over_renamed_lower(r):
    os.rename(r / "f", r / "d/x")          # over a lower file: the redirect "/f"
    os.link(r / "d/x", r / "f")            # the old name again


def s_relative_twice(r):
    os.rename(r / "a", r / "c")
    os.chmod(r / "c/f", 0o600)
    os.rename(r / "c/f", r / "c/g")        # relative "f" in a relative "a"
    os.link(r / "c/g", r / "n")
    os.rename(r / "c", r / "e/c2")
    os.link(r / "n", r / "e/c2/h")


def s_chmod_other_name(r):
    os.chmod(r / "h2", 0o600)              # index=on: the index entry, h2 linked to it
    os.rename(r / "h2", r / "d/h2")        # its redirect "/h2" (a lower hard link's)
    os.link(r / "h1", r / "e/n")           # h1 linked up: the shared redirect stays
    os.unlink(r / "d/h2")


def s_link_empty_and_symlink(r):
    os.link(r / "z", r / "d/z")
    os.link(r / "s", r / "d/s", follow_symlinks=False)
    os.rename(r / "z", r / "e/z")


def s_link_into_renamed_dir(r):
    os.rename(r / "d", r / "e/d2")
    os.link(r / "f", r / "e/d2/n")
    os.link(r / "h1", r / "e/d2/m")
    os.rename(r / "e", r / "e3")


SCEN = {f.__name__[2:]: f for f in (
    s_link_into_renamed_dir, s_link_empty_and_symlink, s_chmod_other_name, s_relative_twice,
    s_hard_rename_unlink, s_hard_all_gone, s_link_over_renamed_lower, s_link_hardlink, s_link_rename,
    s_link_rename_new, s_link_unlink, s_link_unlink_new, s_renamed_dir, s_renamed_dir_deep,
    s_chmod_rename_link, s_link_twice, s_hard_both, s_link_write)}


@pytest.mark.parametrize("index", ["off", "on"])
@pytest.mark.parametrize("name", list(SCEN))
def test_link_scenario(name, index, lower, xfs_dir, overlay_mount, kernel_mount):
    run = SCEN[name]
    ks = new_stack([lower], xfs_dir, "k")
    k = kernel_mount([lower], ks.upper, ks.work, KERNEL_METACOPY + (f"index={index}",))
    run(k)
    kview = view(k)
    helpers.force_unmount(k)
    os_ = new_stack([lower], xfs_dir, "o")
    m = overlay_mount(os_.options(f"metacopy=on,index={index}"))
    run(m.path)
    mview = view(m.path)
    m.unmount()
    assert mview == kview
    if not (name in ("hard_both", "chmod_other_name") and index == "on"):
        # (README, Hard links: LINK names no source, the daemon links through the name it
        # knows (h1 or d/n; d/h2); the kernel links the other lower name up too: one upper
        # link fewer, the same view)
        assert uview(os_.upper) == uview(ks.upper)
    # each reads the other's upper
    k = kernel_mount([lower], os_.upper, os_.work, KERNEL_METACOPY + (f"index={index}",))
    assert view(k) == kview
    helpers.force_unmount(k)
    m = overlay_mount(ks.options(f"metacopy=on,index={index}"))
    assert view(m.path) == kview
    m.unmount()


@pytest.mark.parametrize("name", ["link_hardlink", "link_rename", "link_unlink", "renamed_dir"])
def test_link_metacopy_off(name, lower, xfs_dir, overlay_mount, kernel_mount):
    run = SCEN[name]
    ks = new_stack([lower], xfs_dir, "k")
    k = kernel_mount([lower], ks.upper, ks.work, ("redirect_dir=on",))
    run(k)
    kview = view(k)
    helpers.force_unmount(k)
    os_ = new_stack([lower], xfs_dir, "o")
    m = overlay_mount(os_.options("redirect_dir=on"))
    run(m.path)
    assert view(m.path) == kview
    m.unmount()
    assert uview(os_.upper) == uview(ks.upper)


@pytest.mark.parametrize("index", ["off", "on"])
@pytest.mark.parametrize("action", ["enospc", "pause"])
def test_link_fails_after_the_redirect(action, index, lower, xfs_dir, overlay_mount, kernel_mount):
    """The new name's link fails (ENOSPC) or the daemon is killed just before it, the
    redirect of the source set: the source still reads its data, here and in the kernel."""
    from reliability_support import kill_at_pause
    s = new_stack([lower], xfs_dir, "o")
    opts = s.options(f"metacopy=on,index={index}")
    want = data(view(lower))  # (index=off: a copy-up of h1 leaves h2's inode, as the kernel's)
    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS": f"layer.link~d/n={action}"})
    if action == "enospc":
        for src in ("f", "h1"):
            with pytest.raises(OSError) as e:
                os.link(m / src, m / "d/n")
            assert e.value.errno == 28
        assert data(view(m.path)) == want
        m.unmount()
    else:
        kill_at_pause(m, f"os.link({str(m / 'h1')!r}, {str(m / 'd/n')!r})", "layer.link")
    print(uview(s.upper))
    m = overlay_mount(opts)
    assert data(view(m.path)) == want
    os.link(m / "h1", m / "d/n")
    got = view(m.path)
    m.unmount()
    k = kernel_mount([lower], s.upper, s.work, KERNEL_METACOPY + (f"index={index}",))
    assert view(k) == got
    helpers.force_unmount(k)


def test_link_in_a_lower_renamed_dir(xfs_dir, overlay_mount, kernel_mount):
    """Two lowers: the top one renamed a/ to b/ (its redirect "a"), a/f in the bottom one."""
    l1 = helpers.build_layer(xfs_dir / "l1", {"a": {"f": "deep data\n"}, "d": {}})
    l2 = helpers.build_layer(xfs_dir / "l2", {"a": helpers.Whiteout(), "b": {}})
    os.setxattr(l2 / "b", "trusted.overlay.redirect", b"a")
    lowers = [l2, l1]
    out, uppers = [], []
    for kernel in (True, False):
        s = new_stack(lowers, xfs_dir, "kk" if kernel else "oo")
        uppers.append(s)
        if kernel:
            r = kernel_mount(lowers, s.upper, s.work, KERNEL_METACOPY)
        else:
            r = overlay_mount(s.options("metacopy=on")).path
        assert (r / "b/f").read_bytes() == b"deep data\n"
        os.link(r / "b/f", r / "d/n")
        os.link(r / "d/n", r / "b/g")
        out.append((view(r), uview(s.upper)))
        if kernel:
            helpers.force_unmount(r)
    assert out[0] == out[1]
    assert out[0][1]["redirects"] == {"b/f": b"/b/f", "d/n": b"/b/f", "b/g": b"/b/f"}
    k = kernel_mount(lowers, uppers[1].upper, uppers[1].work, KERNEL_METACOPY)  # ours
    assert view(k) == out[0][0]


def _renamed_dirs_listed(r: Path) -> dict:
    os.rename(r / "a", r / "c")                 # relative redirect
    os.mkdir(r / "x")
    os.rename(r / "d", r / "x/d2")              # absolute redirect
    os.rename(r / "e", r / "x/e")               # lower dir, empty
    os.mkdir(r / "x/new")
    os.rename(r / "x/new", r / "x/new2")        # upper-only, no redirect
    out = {}
    for d in ("", "x"):
        listed = {e.name: (e.inode(), e.is_dir()) for e in os.scandir(r / d)}
        subprocess.run(["ls", "-l", str(r / d)], check=True, capture_output=True)
        for name, (dino, isdir) in listed.items():
            st = os.lstat(r / d / name)
            out[f"{d}/{name}"] = (dino == st.st_ino, st.st_ino, st.st_nlink, oct(st.st_mode), isdir,
                                  sorted(os.listdir(r / d / name)) if isdir else None)
    return out


def test_listing_of_renamed_dirs_then_stat(lower, xfs_dir, overlay_mount, kernel_mount):
    ks = new_stack([lower], xfs_dir, "k")
    k = kernel_mount([lower], ks.upper, ks.work, ("redirect_dir=on",))
    theirs = _renamed_dirs_listed(k)
    helpers.force_unmount(k)
    s = new_stack([lower], xfs_dir, "o")
    m = overlay_mount(s.options())
    mine = _renamed_dirs_listed(m.path)
    m.unmount()
    m = overlay_mount(s.options())
    again = {}
    for d in ("", "x"):
        subprocess.run(["ls", "-l", str(m / d)], check=True, capture_output=True)
        for e in os.scandir(m / d):
            st = os.lstat(m / d / e.name)
            again[f"{d}/{e.name}"] = (e.inode() == st.st_ino, st.st_ino, st.st_nlink)
    assert {k: v[:3] for k, v in mine.items()} == again
    def ino_free(v):
        return {k: (x[0],) + x[2:] for k, x in v.items()}
    assert ino_free(mine) == ino_free(theirs)
    fresh = {"/x", "x/new2"}  # upper-only: numbers of each upper's own
    assert {k: v for k, v in mine.items() if k not in fresh} == \
        {k: v for k, v in theirs.items() if k not in fresh}


def _metacopy_upper_then_link(r: Path) -> dict:
    out = {}
    for src, dst in (("f", "d/n"), ("h1", "e/m")):
        try:
            os.link(r / src, r / dst)
            out[src] = (view(r)["files"].get(dst), view(r)["files"].get(src))
        except OSError as e:
            out[src] = e.errno
    return out


@pytest.mark.parametrize("index", ["off", "on"])
def test_link_of_metacopy_file_mounted_without_metacopy(index, lower, xfs_dir, overlay_mount,
                                                        kernel_mount):
    """An upper the kernel made with metacopy=on (f, h1 metacopy files), mounted with
    metacopy=off: a link of each, as the kernel's."""
    got = []
    for kernel in (True, False):
        s = new_stack([lower], xfs_dir, "u")
        k = kernel_mount([lower], s.upper, s.work, KERNEL_METACOPY + (f"index={index}",))
        os.chmod(k / "f", 0o600)
        os.chmod(k / "h1", 0o640)
        helpers.force_unmount(k)
        if kernel:
            r = kernel_mount([lower], s.upper, s.work, ("redirect_dir=on", f"index={index}"))
        else:
            r = overlay_mount(s.options(f"index={index}")).path
        got.append((_metacopy_upper_then_link(r), uview(s.upper)))
    print(got)
    assert got[1] == got[0]


def _open_link_write(r: Path) -> list:
    out = []
    for src, dst in (("f", "d/n"), ("h1", "e/m")):
        fr = os.open(r / src, os.O_RDONLY)
        try:
            out.append(os.pread(fr, 8, 0))
            os.link(r / src, r / dst)
            out.append(os.pread(fr, 8, 0))
            with open(r / dst, "r+b") as f:
                f.write(b"WRITTEN!")
            out.append(os.pread(fr, 8, 0))
            out.append((r / src).read_bytes()[:8])
            os.chmod(r / dst, 0o600)
            out.append((oct(os.fstat(fr).st_mode), os.fstat(fr).st_nlink, os.stat(r / src).st_nlink))
        finally:
            os.close(fr)
    return out


@pytest.mark.parametrize("index", ["off", "on"])
def test_open_then_link_then_write(index, lower, xfs_dir, overlay_mount, kernel_mount):
    got = []
    for kernel in (True, False):
        s = new_stack([lower], xfs_dir, "u")
        if kernel:
            r = kernel_mount([lower], s.upper, s.work, KERNEL_METACOPY + (f"index={index}",))
        else:
            r = overlay_mount(s.options(f"metacopy=on,index={index}")).path
        got.append(_open_link_write(r))
    print(got)
    assert got[1] == got[0]


def test_listing_of_renamed_dirs_costs_one_lookup_each(lower, xfs_dir, overlay_mount):
    """After ``ls -l`` of a directory holding three redirected directories (and plain ones,
    files, lower hard links) and a ``stat`` of every entry: one LOOKUP per redirected
    directory and per name of a lower hard link (README: they come without attributes),
    none for the others (READDIRPLUS gave their attributes). Counted on a fresh mount
    during which the kernel dropped no cache (``helpers.undisturbed``): a drop (another
    test's or process's drop_caches, memory pressure) made it FORGET the listed entries
    and look them up again ('assert (16 - 0) == (3 + 2)' on main; with drop_caches in a
    loop 12 and 15, 2 runs of 5)."""
    s = new_stack([lower], xfs_dir, "o")
    m = overlay_mount(s.options())
    os.rename(m / "a", m / "c")
    os.rename(m / "d", m / "d2")
    os.mkdir(m / "x")
    os.rename(m / "x", m / "x2")
    os.rename(m / "e", m / "x2/e")
    os.rename(m / "x2/e", m / "e3")
    m.unmount()

    def listed_lookups() -> int:
        m = overlay_mount(s.options(), debug=True)
        before = m.log_text().count("LOOKUP(")
        subprocess.run(["ls", "-l", str(m.path)], check=True, capture_output=True)
        for e in os.scandir(m.path):
            os.lstat(e.path)
        lookups = [ln for ln in m.log_text().splitlines() if "LOOKUP(" in ln]
        m.unmount()
        print("\n".join(lookups))
        return len(lookups) - before

    assert helpers.undisturbed(listed_lookups) == 3 + 2  # c, d2, e3; h1, h2


def test_link_eexist_behind_the_back_after_the_redirect(lower, xfs_dir, overlay_mount, kernel_mount):
    """The new name, absent at the kernel's LOOKUP, made in the upper behind the mount's
    back: the link fails EEXIST (before any copy-up: the new name is looked up again
    first); the source reads its data, here and in the kernel."""
    s = new_stack([lower], xfs_dir, "o")
    m = overlay_mount(s.options("metacopy=on"))
    (m / "d/t").write_bytes(b"t")                 # d in the upper
    for src in ("f", "h1"):
        assert not (m / "d/n").exists()
        (s.upper / "d/n").write_bytes(b"behind")
        with pytest.raises(FileExistsError):
            os.link(m / src, m / "d/n")
        assert (m / src).read_bytes() == (lower / src).read_bytes()
        assert (m / "d/n").read_bytes() == b"behind"
        os.unlink(m / "d/n")
    print(uview(s.upper))
    m.unmount()
    k = kernel_mount([lower], s.upper, s.work, KERNEL_METACOPY)
    for src in ("f", "h1"):
        assert (k / src).read_bytes() == (lower / src).read_bytes()



@pytest.mark.parametrize("index", ["off", "on"])
def test_link_racing_a_data_copy_up(index, xfs_dir, overlay_mount, kernel_mount):
    """A link of each lower file racing an open for writing of it (the data copy-up) and
    a chmod: every pair of names shows the written data, and the kernel reads the upper
    the same."""
    import threading
    n = 100
    low = helpers.build_layer(xfs_dir / "l", {**{f"f{i}": f"data {i}\n" * 500 for i in range(n)},
                                             "d": {}})
    s = new_stack([low], xfs_dir, "o")
    m = overlay_mount(s.options(f"metacopy=on,index={index}"))
    errors = []

    def linker():
        for i in range(n):
            try:
                os.link(m / f"f{i}", m / f"d/n{i}")
            except OSError as e:
                errors.append(("link", i, e))

    def writer():
        for i in range(n):
            try:
                with open(m / f"f{i}", "r+b") as f:
                    f.write(b"X")
            except OSError as e:
                errors.append(("write", i, e))

    def chmodder():
        for i in reversed(range(n)):
            os.chmod(m / f"f{i}", 0o600)

    threads = [threading.Thread(target=t) for t in (linker, writer, chmodder)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    mine = view(m.path)
    for i in range(n):
        want = hashlib.sha256(b"X" + (f"data {i}\n" * 500).encode()[1:]).hexdigest()[:12]
        assert mine["files"][f"f{i}"] == mine["files"][f"d/n{i}"] == (want, 2, "0o600"), i
    m.unmount()
    k = kernel_mount([low], s.upper, s.work, KERNEL_METACOPY + (f"index={index}",))
    assert view(k) == mine


@pytest.mark.parametrize("index", ["off", "on"])
def test_link_racing_a_rename_of_the_source(index, xfs_dir, overlay_mount, kernel_mount):
    """A link of each lower file racing its rename to another directory: the link is made
    (both names read the data) or fails ENOENT; the kernel reads the upper the same."""
    import threading
    n = 100
    data = {i: f"data {i}\n".encode() * 500 for i in range(n)}
    low = helpers.build_layer(xfs_dir / "l", {**{f"f{i}": data[i] for i in range(n)},
                                             "d": {}, "e": {}})
    s = new_stack([low], xfs_dir, "o")
    m = overlay_mount(s.options(f"metacopy=on,index={index}"))
    errors = []

    def linker():
        for i in range(n):
            try:
                os.link(m / f"f{i}", m / f"d/n{i}")
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append(("link", i, e))

    def renamer():
        for i in range(n):
            os.rename(m / f"f{i}", m / f"e/g{i}")

    threads = [threading.Thread(target=t) for t in (linker, renamer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    mine = view(m.path)
    want = {i: hashlib.sha256(data[i]).hexdigest()[:12] for i in range(n)}
    linked = 0
    for i in range(n):
        assert mine["files"][f"e/g{i}"][0] == want[i]
        if f"d/n{i}" in mine["files"]:
            linked += 1
            assert mine["files"][f"d/n{i}"] == mine["files"][f"e/g{i}"] == (want[i], 2, "0o644")
    print("linked", linked)
    m.unmount()
    k = kernel_mount([low], s.upper, s.work, KERNEL_METACOPY + (f"index={index}",))
    assert view(k) == mine
