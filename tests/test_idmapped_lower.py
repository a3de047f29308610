"""Lower layers on kernel idmapped mounts under ``uidmapping=``/``gidmapping=`` (issue 14,
items 3 and 6: what Debian 12's containers/storage passes for ``podman run --uidmap``).

containers/storage 1.45 mounts each lower of a ``--uidmap`` container through an idmapped
mount (``lowerdir=.../mapped/N/...``) *and* passes ``uidmapping=``: stats through such a
lower show host IDs already. overlaypc detects it per layer at mount (mount ID of the layer
root, ``idmapped`` in its mountinfo options) and shows those IDs as they are; the upper
keeps container-side IDs, so a copy-up maps the lower's host IDs back; override xattrs
hold container-side IDs in every layer; ACL entries are what the kernel shows through the
idmapped mount, copied as read. A real idmapped mount is made (``idmap_support``).
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from idmap_support import idmapped_bind
from ownership_support import build_owned, mount_options, stored

pytestmark = pytest.mark.mount

MAPPING = "0:100000:65536"
MAP = f"uidmapping=:{MAPPING},gidmapping=:{MAPPING}"
CONTAINERS = "user.containers.override_stat"
PERMS2 = "user.fuseoverlayfs.override_stat"

IDMAPPED_SPEC = {"f": "f\n", "five": "5\n", "d/g": "g\n", "acl": "a\n", "far": "x\n",
                 "ovr": "o\n", "sg": {}}
IDMAPPED_OWNERS = {  # container-side, as unpacked on disk (force_mask: override xattrs)
    "": (0, 0, 0o755, {CONTAINERS: b"0:0:755"}),
    "f": (0, 0, 0o644, {}),
    "five": (5, 6, 0o640, {}),
    "d": (1, 2, 0o755, {}),
    "d/g": (3, 4, 0o644, {}),
    "acl": (0, 0, 0o644, {}),
    "far": (70000, 70000, 0o644, {}),          # outside the idmapped mount's map too
    "ovr": (0, 0, 0o600, {CONTAINERS: b"8:9:755"}),
    "sg": (0, 9, 0o2777, {}),
}
PLAIN_SPEC = {"plain": "p\n", "d/h": "h\n"}
PLAIN_OWNERS = {"": (0, 0, 0o755, {}), "plain": (5, 6, 0o644, {}), "d": (1, 2, 0o755, {}),
                "d/h": (11, 12, 0o644, {})}

SHOWN = {  # host side, through the overlay
    "f": (100000, 100000), "five": (100005, 100006), "d": (100001, 100002),
    "d/g": (100003, 100004), "acl": (100000, 100000),
    "far": (65534, 65534),                       # the kernel's overflow ID, shown as it is
    "ovr": (100008, 100009),                     # the override xattr: container-side, mapped
    "sg": (100000, 100009),
    "plain": (100005, 100006), "d/h": (100011, 100012),  # the plain lower: mapped as ever
}


@pytest.fixture
def idmapped_stack(tmp_path: Path):
    """(idmapped lower, plain lower, upper, work): the top lower seen through an idmapped
    mount of map ``MAPPING``, which the fixture takes down even when the test fails."""
    base = tmp_path / "stack"
    disk = build_owned(base / "disk", IDMAPPED_SPEC, IDMAPPED_OWNERS)
    subprocess.run(["setfacl", "-m", "u:7:r", str(disk / "acl")], check=True)
    plain = build_owned(base / "plain", PLAIN_SPEC, PLAIN_OWNERS)
    upper, work, mapped = base / "upper", base / "work", base / "mapped"
    for d in (upper, work, mapped):
        d.mkdir()
    with idmapped_bind(disk, mapped, MAPPING):
        assert os.stat(mapped / "five")[4:6] == (100005, 100006)  # the kernel maps it
        yield mapped, plain, upper, work


def _ids(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def _acl_users(path: Path) -> list[str]:
    out = subprocess.run(["getfacl", "-n", "-c", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return [line for line in out.split() if line.startswith("user:") and line != "user::rw-"
            and line.split(":")[1]]


@pytest.mark.parametrize("extra", ["", "xattr_permissions=2"])
def test_idmapped_lower_is_shown_as_is_and_copied_up_container_side(idmapped_stack, overlay_mount,
                                                                     extra):
    mapped, plain, upper, work = idmapped_stack
    options = mount_options([mapped, plain], upper, work, MAP + ("," + extra if extra else ""))
    m = overlay_mount(options)
    mnt = m.path
    # every way a stat is answered: lookup, READDIRPLUS, fstat through a handle
    assert {rel: _ids(mnt / rel) for rel in SHOWN} == SHOWN
    listed = {e.name: e.stat(follow_symlinks=False)[4:6] for e in os.scandir(mnt / "d")}
    assert listed == {"g": SHOWN["d/g"], "h": SHOWN["d/h"]}
    with open(mnt / "f") as f:
        assert os.fstat(f.fileno())[4:6] == SHOWN["f"]
    assert stat.S_IMODE(os.lstat(mnt / "ovr").st_mode) == 0o755
    assert _acl_users(mnt / "acl") == ["user:100007:r--"]  # as the kernel maps it
    log = m.log_text()
    assert log.count("is on an idmapped mount") == 1 and f"lower0 {mapped} is on" in log, log

    # copy-ups: the upper holds container-side IDs, the view does not change
    os.chmod(mnt / "five", 0o600)
    with open(mnt / "d/g", "a") as f:
        f.write("more\n")
    os.utime(mnt / "ovr")
    os.utime(mnt / "acl")
    os.utime(mnt / "far")
    os.chown(mnt / "f", 100007, -1)
    os.chown(mnt / "plain", -1, 100013)
    os.mkdir(mnt / "sg/sub")                # a setgid parent's group, stored container-side
    after = {rel: _ids(mnt / rel) for rel in SHOWN}
    assert after == dict(SHOWN, f=(100007, 100000), plain=(100005, 100013),
                         far=(165534, 165534))  # host 65534 has no container ID: overflow
    assert _ids(mnt / "sg/sub") == (165534, 100009)  # host root: not in the mapping
    assert _acl_users(mnt / "acl") == ["user:100007:r--"]
    expected_disk = {"five": (5, 6, 0o600), "d": (1, 2, 0o755), "d/g": (3, 4, 0o644),
                     "ovr": (8, 9, 0o755), "acl": (0, 0, 0o644), "far": (65534, 65534, 0o644),
                     "f": (7, 0, 0o644), "plain": (5, 13, 0o644), "sg": (0, 9, 0o2777),
                     "sg/sub": (65534, 9, 0o2755)}
    for rel, (uid, gid, mode) in expected_disk.items():
        real_uid, real_gid, real_mode, xattrs = stored(upper, rel)
        if extra:  # xattr_permissions=2: owner and mode in the upper's override xattr
            assert xattrs.get(PERMS2) == f"{uid}:{gid}:{mode:o}".encode(), (rel, xattrs)
        else:
            assert (real_uid, real_gid, real_mode) == (uid, gid, mode), rel
            assert CONTAINERS not in xattrs and PERMS2 not in xattrs, (rel, xattrs)
    assert _acl_users(upper / "acl") == ["user:100007:r--"]  # ACL entries: copied as read

    with pytest.raises(OSError) as e:  # the mapping still decides what a chown can store
        os.chown(mnt / "five", 7, -1)
    assert e.value.errno == errno.EOVERFLOW


def test_idmapped_lower_without_mapping_is_shown_as_it_is(idmapped_stack, overlay_mount):
    """Without uidmapping= nothing is mapped, an idmapped lower or not: the kernel's IDs
    are shown and copied up as they are."""
    mapped, plain, upper, work = idmapped_stack
    mnt = overlay_mount(mount_options([mapped, plain], upper, work)).path
    assert _ids(mnt / "five") == (100005, 100006) and _ids(mnt / "plain") == (5, 6)
    os.chmod(mnt / "five", 0o600)
    assert stored(upper, "five")[:3] == (100005, 100006, 0o600)


def test_a_mount_point_named_in_other_bytes_than_utf8_does_not_stop_a_mount(tmp_path, overlay_mount):
    """Every mount reads mountinfo (is a lower on an idmapped mount?): a mount point
    elsewhere on the machine whose name is not UTF-8 made that read raise
    UnicodeDecodeError, and no mount could be made while it was there."""
    odd = os.path.join(os.fsencode(tmp_path), b"mnt-\xff\xfe")
    os.mkdir(odd)
    subprocess.run([b"mount", b"-t", b"tmpfs", b"-o", b"size=1m", b"tmpfs", odd], check=True)
    try:
        lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
        for d in (lower, upper, work):
            d.mkdir()
        (lower / "f").write_text("lower")
        mnt = overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work}").path
        assert (mnt / "f").read_text() == "lower"
    finally:
        subprocess.run([b"umount", odd], check=True)
