"""Owner and mode kept in xattrs (issue 14, item 4): containers/storage's ``force_mask``
layers carry ``user.containers.override_stat``; ``xattr_permissions=1|2`` keeps the upper's
owners and modes in ``security.``/``user.fuseoverlayfs.override_stat``, written by chmod,
chown, creation and copy-up instead of the real ones. Format ``uid:gid:octal-mode[:type]``.

fuse-overlayfs 1.10 is the oracle for what both promise, and each side must read the
upper the other wrote. (fuse-overlayfs 1.10 answers ENODATA for any object of an override
layer that lacks the xattr; overlaypc shows the real owner and mode there, so such objects
are left out of the comparisons.)
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from ownership_support import owned_stack, fuse_overlayfs, mount_options, override_of, shown, stored
from upper_support import run_as

pytestmark = pytest.mark.mount

CONTAINERS = "user.containers.override_stat"
USER = "user.fuseoverlayfs.override_stat"
PRIVILEGED = "security.fuseoverlayfs.override_stat"

SPEC = {"f": "f\n", "exe": "#!/bin/sh\n", "d/inner": "i\n", "pub": {}, "plain": "p\n",
        "secret": "s\n"}
# a layer unpacked with force_mask=0700: real files root's and 0700, the truth in the xattr
FORCE_MASK = {
    "": (0, 0, 0o700, {CONTAINERS: b"0:0:0755:dir"}),
    "f": (0, 0, 0o700, {CONTAINERS: b"1000:1001:0640:file"}),
    "exe": (0, 0, 0o700, {CONTAINERS: b"0:0:0755"}),
    "d": (0, 0, 0o700, {CONTAINERS: b"5:6:0750:dir"}),
    "d/inner": (0, 0, 0o700, {CONTAINERS: b"5:6:0604:file"}),
    "pub": (0, 0, 0o700, {CONTAINERS: b"0:0:01777:dir"}),
    "secret": (0, 0, 0o777, {CONTAINERS: b"4000:4000:0600"}),
    "plain": (7, 8, 0o644, {}),  # no xattr: its real owner and mode
}
SHOWN = {
    "": (0, 0, stat.S_IFDIR | 0o755), "f": (1000, 1001, stat.S_IFREG | 0o640),
    "exe": (0, 0, stat.S_IFREG | 0o755), "d": (5, 6, stat.S_IFDIR | 0o750),
    "d/inner": (5, 6, stat.S_IFREG | 0o604), "pub": (0, 0, stat.S_IFDIR | 0o1777),
    "secret": (4000, 4000, stat.S_IFREG | 0o600), "plain": (7, 8, stat.S_IFREG | 0o644),
}


def _view(mnt: Path) -> dict:
    return {r: (v[0], v[1], int(v[2], 8)) for r, v in shown(mnt).items()}


def _stats(mnt: Path, rels) -> dict:
    """(uid, gid, mode) of each path by a plain stat: fuse-overlayfs 1.10 cannot list a
    directory of an override layer in which any object lacks the xattr."""
    out = {}
    for rel in rels:
        st = os.lstat(mnt / rel)
        out[rel] = (st.st_uid, st.st_gid, st.st_mode)
    return out


def _stack(tmp_path: Path, name: str, owners=FORCE_MASK):
    return owned_stack(tmp_path, name, SPEC, owners)


@pytest.mark.parametrize("writable", [False, True], ids=["image", "container"])
def test_force_mask_layers_show_the_owner_and_mode_of_their_xattr(tmp_path, overlay_mount, writable):
    lower, upper, work = _stack(tmp_path, "ours")
    opts = mount_options([lower], upper, work, "xattr_permissions=2") if writable \
        else f"lowerdir={lower}"
    mnt = overlay_mount(opts).path
    assert os.stat(mnt / "d/inner")[0:1] + os.stat(mnt / "d/inner")[4:6] == \
        (stat.S_IFREG | 0o604, 5, 6)                                     # lookup, not listed
    assert _view(mnt) == SHOWN                                           # READDIRPLUS
    with fuse_overlayfs(tmp_path / "fmnt", mount_options([lower], upper, work, "xattr_permissions=2")
                        if writable else mount_options([lower], None, None),
                        tmp_path / "fuse-overlayfs.log") as fmnt:
        if writable:  # fuse-overlayfs reads force_mask layers only with xattr_permissions
            both = [r for r in SHOWN if r not in ("plain", "")]
            assert _stats(fmnt, both) == {r: SHOWN[r] for r in both}


def test_override_xattrs_are_hidden_and_protected(tmp_path, overlay_mount):
    lower, upper, work = _stack(tmp_path, "h")
    mnt = overlay_mount(mount_options([lower], upper, work, "xattr_permissions=2")).path
    assert not [n for n in os.listxattr(mnt / "f") if "override" in n]
    for name in (CONTAINERS, USER, PRIVILEGED):
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / "f", name)
        assert e.value.errno == errno.ENODATA
        for call in (lambda: os.setxattr(mnt / "f", name, b"0:0:777"),
                     lambda: os.removexattr(mnt / "f", name)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EPERM, name
    assert not (upper / "f").exists()


def test_a_layer_is_read_for_overrides_only_if_its_root_has_one_or_under_xattr_permissions(
        tmp_path, overlay_mount):
    """fuse-overlayfs's per-layer rule: a layer whose root carries no override xattr is read
    as it is (no cost per stat), unless the mount says xattr_permissions."""
    owners = dict(FORCE_MASK)
    owners[""] = (0, 0, 0o755, {})
    lower, upper, work = _stack(tmp_path, "g", owners)
    plain = overlay_mount(f"lowerdir={lower}").path
    assert os.stat(plain / "f")[4:6] == (0, 0) and stat.S_IMODE(os.stat(plain / "f").st_mode) == 0o700
    forced = overlay_mount(mount_options([lower], upper, work, "xattr_permissions=2")).path
    assert os.stat(forced / "f")[4:6] == (1000, 1001)


def _changes(mnt: Path) -> None:
    os.chmod(mnt / "f", 0o600)
    os.chown(mnt / "exe", 33, 34)
    os.chmod(mnt / "exe", 0o4755)
    os.chown(mnt / "d/inner", -1, 77)
    with open(mnt / "plain", "a") as f:   # copy-up of an object without an override
        f.write("more\n")
    run_as("open('mine', 'w').write('x')\nos.mkdir('mydir', 0o750)", uid=4000, gid=4001,
           cwd=mnt / "pub")


CHANGED = {
    "f": (1000, 1001, stat.S_IFREG | 0o600),
    "exe": (33, 34, stat.S_IFREG | 0o4755),
    "d/inner": (5, 77, stat.S_IFREG | 0o604),
    "plain": (7, 8, stat.S_IFREG | 0o644),
    "pub/mine": (4000, 4001, stat.S_IFREG | 0o644),
    "pub/mydir": (4000, 4001, stat.S_IFDIR | 0o750),
}


@pytest.mark.parametrize("level, name", [(2, USER), (1, PRIVILEGED)])
def test_xattr_permissions_keeps_owner_and_mode_in_the_xattr(tmp_path, overlay_mount, level, name):
    lower, upper, work = _stack(tmp_path, "w")
    opts = mount_options([lower], upper, work, f"xattr_permissions={level}")
    m = overlay_mount(opts)
    _changes(m.path)
    view = _view(m.path)
    assert {r: view[r] for r in CHANGED} == CHANGED
    for rel, (uid, gid, mode) in CHANGED.items():
        real_uid, real_gid, real_mode, xattrs = stored(upper, rel)
        assert xattrs == {name: f"{uid}:{gid}:{stat.S_IMODE(mode):o}".encode()}, rel
        assert (real_uid, real_gid) == (0, 0), f"{rel}: the real owner is the daemon's"
        assert not real_mode & 0o7000, f"{rel}: real special bits {oct(real_mode)}"
    assert CONTAINERS not in override_of(upper / "f"), "copy-up copied the lower's override"
    # the kernel's checks use what is shown: 4000 owns secret (0600), 4001 may not read it
    read = "print(open('secret').read(), end='')"
    assert run_as(read, uid=4000, gid=4000, cwd=m.path) == "s\n"
    with pytest.raises(AssertionError, match="PermissionError"):
        run_as(read, uid=4001, gid=4000, cwd=m.path)
    m.unmount()
    again = overlay_mount(opts).path
    assert _view(again) == view


def test_uppers_are_read_alike_by_fuse_overlayfs_and_overlaypc(tmp_path, overlay_mount):
    lower, upper, work = _stack(tmp_path, "ours")
    opts = mount_options([lower], upper, work, "xattr_permissions=2")
    m = overlay_mount(opts)
    _changes(m.path)
    m.unmount()
    with fuse_overlayfs(tmp_path / "f1", opts, tmp_path / "f1.log") as fmnt:
        assert _stats(fmnt, CHANGED) == CHANGED

    lower2, upper2, work2 = _stack(tmp_path, "theirs")
    opts2 = mount_options([lower2], upper2, work2, "xattr_permissions=2")
    # fuse-overlayfs 1.10 writes owner 0 on chmod (the real owner, not the override's) and
    # "-1" for an unchanged ID on chown (both fixed in 1.14): only full chowns are compared
    with fuse_overlayfs(tmp_path / "f2", opts2, tmp_path / "f2.log") as fmnt:
        os.chown(fmnt / "exe", 33, 34)
        os.chown(fmnt / "d/inner", 5, 77)
        written = _stats(fmnt, ("exe", "d/inner"))
    assert override_of(upper2 / "exe")[USER] == b"33:34:100755"  # their format: type bits too
    ours_of_theirs = _stats(overlay_mount(opts2).path, written)
    assert ours_of_theirs == written == {"exe": (33, 34, stat.S_IFREG | 0o755),
                                         "d/inner": CHANGED["d/inner"]}


def test_override_ids_go_through_the_id_mapping(tmp_path, overlay_mount):
    lower, upper, work = _stack(tmp_path, "m")
    opts = mount_options([lower], upper, work, "xattr_permissions=2,uidmapping=0:100000:65536,"
                                               "gidmapping=0:100000:65536")
    mnt = overlay_mount(opts).path
    assert os.stat(mnt / "f")[4:6] == (101000, 101001)
    os.chown(mnt / "f", 100007, -1)
    assert stored(upper, "f")[3] == {USER: b"7:1001:640"}
    assert os.stat(mnt / "f")[4:6] == (100007, 101001)


def test_chmod_of_an_open_file_without_a_name(tmp_path, overlay_mount):
    lower, upper, work = _stack(tmp_path, "n")
    mnt = overlay_mount(mount_options([lower], upper, work, "xattr_permissions=2,timeout=0")).path
    with open(mnt / "f", "r+") as f:
        os.unlink(mnt / "f")
        os.fchmod(f.fileno(), 0o604)
        os.fchown(f.fileno(), 12, -1)
        st = os.fstat(f.fileno())
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12, 1001, 0o604)


def test_an_upper_marked_at_its_root_is_written_through_its_xattr(tmp_path, overlay_mount):
    """An upper left by a fuse-overlayfs xattr_permissions=2 mount (it marks the upper's
    root), mounted without the option: chmod must still change what is shown."""
    lower, upper, work = _stack(tmp_path, "r")
    os.setxattr(upper, USER, b"0:0:40755")
    (upper / "old").write_text("written through fuse-overlayfs\n")
    os.setxattr(upper / "old", USER, b"50:50:100600")
    mnt = overlay_mount(mount_options([lower], upper, work)).path
    assert _stats(mnt, ("old",)) == {"old": (50, 50, stat.S_IFREG | 0o600)}
    os.chmod(mnt / "old", 0o640)
    assert _stats(mnt, ("old",)) == {"old": (50, 50, stat.S_IFREG | 0o640)}
    os.chmod(mnt / "f", 0o604)
    os.chown(mnt / "exe", 9, 9)
    assert _stats(mnt, ("f", "exe")) == {"f": (1000, 1001, stat.S_IFREG | 0o604),
                                         "exe": (9, 9, stat.S_IFREG | 0o755)}
    assert override_of(upper / "f") == {USER: b"1000:1001:604"}
    assert stored(upper, "exe")[:2] == (0, 0)
