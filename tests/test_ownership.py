"""fuse-overlayfs's ID mapping and squashing options through real mounts (issue 14, item 3),
with fuse-overlayfs 1.10 as the oracle where both promise the same.

``uidmapping=C:H:N`` / ``gidmapping``: the layers hold container-side IDs; a stored ID in
``[C, C+N)`` is shown as ``H + (id - C)``, others as the overflow ID 65534; chown and new
objects store the shown (host) IDs mapped back. Every way the daemon answers a stat is
checked: a lookup, READDIRPLUS, ``fstat`` through a file handle, an open file without a
name. The kernel's permission checks must see the shown owner. Where overlaypc decides
differently from fuse-overlayfs (a chown to an ID outside the mapping: EOVERFLOW, not the
overflow ID) the test says so.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

import helpers
from ownership_support import owned_stack, fuse_overlayfs, mount_options, shown, stored
from upper_support import run_as

pytestmark = pytest.mark.mount

MAP = "uidmapping=:0:100000:65536,gidmapping=:0:100000:65536"
SPEC = {"f": "f\n", "five": "5\n", "top": "65535\n", "far": "70000\n", "secret": "s\n",
        "d/g": "g\n", "pub": {}, "sg": {}, "bin/tool": "t\n"}
OWNERS = {
    "": (0, 0, 0o755, {}),
    "f": (0, 0, 0o644, {}),
    "five": (5, 6, 0o640, {}),
    "top": (65535, 65535, 0o644, {}),
    "far": (70000, 70001, 0o644, {}),     # outside the mapping
    "secret": (5, 5, 0o600, {}),
    "d": (1, 2, 0o755, {}),
    "d/g": (3, 4, 0o644, {}),
    "pub": (0, 0, 0o777, {}),
    "sg": (0, 9, 0o2777, {}),
    "bin": (0, 0, 0o755, {}),
    "bin/tool": (0, 0, 0o4755, {}),
}
EXPECTED = {
    "": (100000, 100000), "f": (100000, 100000), "five": (100005, 100006),
    "top": (165535, 165535), "far": (65534, 65534), "secret": (100005, 100005),
    "d": (100001, 100002), "d/g": (100003, 100004), "pub": (100000, 100000),
    "sg": (100000, 100009), "bin": (100000, 100000), "bin/tool": (100000, 100000),
}


def _stack(tmp_path: Path, name: str):
    return owned_stack(tmp_path, name, SPEC, OWNERS)


def _changes(mnt: Path) -> dict:
    """The same changes through either mount; what each answered."""
    out = {}

    def attempt(name, func):
        try:
            func()
            out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode[e.errno]

    attempt("chown five", lambda: os.chown(mnt / "five", 100007, 100008))
    attempt("chgrp d/g", lambda: os.chown(mnt / "d/g", -1, 165535))
    attempt("touch new", lambda: (mnt / "new").write_text("by host root\n"))
    attempt("mkdir newdir", lambda: os.mkdir(mnt / "newdir"))
    # (a child reaches the mount through its cwd: the test's tmp dir is root's alone)
    attempt("create as 100020", lambda: run_as("open('mine', 'w').write('x')", uid=100020,
                                               gid=100021, cwd=mnt / "pub"))
    attempt("setgid dir", lambda: run_as("open('in', 'w').write('x')\nos.mkdir('sub')",
                                         uid=100030, gid=100031, cwd=mnt / "sg"))
    return out


CHANGED = ("five", "d", "d/g", "new", "newdir", "pub", "pub/mine", "sg", "sg/in", "sg/sub")


def test_mapped_owners_and_changes_match_fuse_overlayfs(tmp_path, overlay_mount):
    lower, upper, work = _stack(tmp_path, "ours")
    mnt = overlay_mount(mount_options([lower], upper, work, MAP)).path
    ours = (shown(mnt), _changes(mnt), shown(mnt), {r: stored(upper, r)[:2] for r in CHANGED})

    lower2, upper2, work2 = _stack(tmp_path, "theirs")
    with fuse_overlayfs(tmp_path / "fmnt", mount_options([lower2], upper2, work2, MAP),
                        tmp_path / "fuse-overlayfs.log") as fmnt:
        theirs = (shown(fmnt), _changes(fmnt), shown(fmnt),
                  {r: stored(upper2, r)[:2] for r in CHANGED})

    before, answers, after, on_disk = ours
    assert {rel: v[:2] for rel, v in before.items()} == EXPECTED
    assert {rel: v[:2] for rel, v in before.items()} == {rel: v[:2] for rel, v in theirs[0].items()}
    assert answers == theirs[1] == {k: "ok" for k in answers}
    # fuse-overlayfs 1.10 gives new objects in a setgid directory the caller's group, where
    # Linux gives them the directory's: those are checked against Linux's rule only
    setgid = ("sg/in", "sg/sub")
    ids = {rel: v[:2] for rel, v in after.items()}
    assert {r: v for r, v in ids.items() if r not in setgid} == \
        {r: v[:2] for r, v in theirs[2].items() if r not in setgid}
    assert ids["five"] == (100007, 100008) and ids["pub/mine"] == (100020, 100021)
    assert ids["new"] == ids["newdir"] == (165534, 165534)  # host root: the overflow ID stored
    assert ids["sg/in"] == ids["sg/sub"] == (100030, 100009)
    assert {r: v for r, v in on_disk.items() if r not in setgid} == \
        {r: v for r, v in theirs[3].items() if r not in setgid}
    assert on_disk["five"] == (7, 8) and on_disk["new"] == (65534, 65534)
    assert on_disk["pub/mine"] == (20, 21) and on_disk["sg/in"] == (30, 9)
    assert os.stat(upper / "sg/sub").st_mode & stat.S_ISGID


def test_every_stat_path_shows_mapped_ids(tmp_path, overlay_mount):
    lower, upper, work = _stack(tmp_path, "s")
    # timeout=0: the kernel asks the daemon for every stat, so fstat goes through the handle
    mnt = overlay_mount(mount_options([lower], upper, work, MAP + ",timeout=0")).path
    assert os.stat(mnt / "five")[4:6] == (100005, 100006)             # lookup + getattr
    listed = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(mnt / "d")}
    assert listed["g"][4:6] == (100003, 100004)                          # READDIRPLUS
    with open(mnt / "five", "r+") as f:                                 # copies it up
        assert os.fstat(f.fileno())[4:6] == (100005, 100006)             # getattr with fh
        os.unlink(mnt / "five")
        st = os.fstat(f.fileno())                                        # no name left
        assert (st.st_uid, st.st_gid, st.st_nlink) == (100005, 100006, 0)
        os.fchown(f.fileno(), 100011, -1)
        assert os.fstat(f.fileno())[4:6] == (100011, 100006)
        with pytest.raises(OSError) as e:
            os.fchown(f.fileno(), 7, -1)
        assert e.value.errno == errno.EOVERFLOW


def test_chown_outside_the_mapping_is_eoverflow_and_changes_nothing(tmp_path, overlay_mount):
    """fuse-overlayfs stores the overflow ID for such a chown; overlaypc refuses it, as the
    kernel's idmapped mounts do: the caller asked for an owner that cannot be stored."""
    lower, upper, work = _stack(tmp_path, "e")
    mnt = overlay_mount(mount_options([lower], upper, work, MAP)).path
    for uid, gid in ((0, -1), (-1, 99999), (165536, 100000)):
        with pytest.raises(OSError) as e:
            os.chown(mnt / "d/g", uid, gid)
        assert e.value.errno == errno.EOVERFLOW
    assert not (upper / "d").exists(), "a refused chown copied something up"
    assert os.stat(mnt / "d/g")[4:6] == (100003, 100004)


def test_kernel_permission_checks_see_the_shown_owner(tmp_path, overlay_mount):
    lower, upper, work = _stack(tmp_path, "p")
    mnt = overlay_mount(mount_options([lower], upper, work, MAP)).path
    read = "print(open('secret').read(), end='')"
    assert run_as(read, uid=100005, gid=100005, cwd=mnt) == "s\n"
    with pytest.raises(AssertionError, match="PermissionError"):
        run_as(read, uid=5, gid=5, cwd=mnt)  # the stored owner is not the shown one


def test_unmapped_callers_and_lower_ids_without_mapping_are_unchanged(tmp_path, overlay_mount):
    """Only uidmapping: gids are shown and stored as they are."""
    lower, upper, work = _stack(tmp_path, "u")
    mnt = overlay_mount(mount_options([lower], upper, work, "uidmapping=0:100000:65536")).path
    assert os.stat(mnt / "five")[4:6] == (100005, 6)
    assert os.stat(mnt / "far")[4:6] == (65534, 70001)
    run_as("open('x', 'w')", uid=100002, gid=4242, cwd=mnt / "pub")
    assert stored(upper, "pub/x")[:2] == (2, 4242)


@pytest.mark.parametrize("options, expected", [
    ("squash_to_root", (0, 0)),
    ("squash_to_uid=1000,squash_to_gid=2000", (1000, 2000)),
    ("squash_to_root,squash_to_uid=7", (7, 0)),
    ("squash_to_gid=3," + MAP, None),  # gid squashed, uid mapped
])
def test_squashing_matches_fuse_overlayfs(tmp_path, overlay_mount, options, expected):
    lower, upper, work = _stack(tmp_path, "ours")
    mnt = overlay_mount(mount_options([lower], upper, work, options)).path
    ours = shown(mnt)
    lower2, upper2, work2 = _stack(tmp_path, "theirs")
    with fuse_overlayfs(tmp_path / "fmnt", mount_options([lower2], upper2, work2, options),
                        tmp_path / "fuse-overlayfs.log") as fmnt:
        theirs = shown(fmnt)
    assert {r: v[:2] for r, v in ours.items()} == {r: v[:2] for r, v in theirs.items()}
    if expected is not None:
        assert set(v[:2] for v in ours.values()) == {expected}
    else:
        assert {(v[0], v[1]) for v in ours.values()} >= {(100005, 3), (65534, 3)}


def test_squash_keeps_stored_owners(tmp_path, overlay_mount):
    lower, upper, work = _stack(tmp_path, "k")
    mnt = overlay_mount(mount_options([lower], upper, work, "squash_to_root," + MAP)).path
    os.chown(mnt / "five", 100040, 100041)
    assert stored(upper, "five")[:2] == (40, 41)
    assert os.stat(mnt / "five")[4:6] == (0, 0)


def test_static_nlink_shows_directories_with_one_link(tmp_path, overlay_mount):
    lower = helpers.build_layer(tmp_path / "lower", {"d/a/x": "x", "d/b/y": "y", "f": "f"})
    plain = overlay_mount(f"lowerdir={lower}").path
    assert os.stat(plain / "d").st_nlink == 4
    static = overlay_mount(f"lowerdir={lower},static_nlink").path
    assert os.stat(static / "d").st_nlink == 1
    assert {e.name: e.stat().st_nlink for e in os.scandir(static / "d")} == {"a": 1, "b": 1}
    assert os.stat(static / "f").st_nlink == 1
