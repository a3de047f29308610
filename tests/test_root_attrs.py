"""Attribute operations on the mount root (issue 14, defect 1: ``chown`` of the root answered
ENOENT, so no podman container could start). Every operation that changes or reads the
root's attributes runs through a real mount, on identical stacks, under overlaypc and under
the kernel's overlayfs; the answers, the merged root's attributes and the upper directory
itself (which *is* the merged root's backing) must agree. ``truncate`` does not apply to a
directory (both answer EISDIR).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import helpers
from upper_support import stack_options

OLD = (1_300_000_000_111_111_111, 1_300_000_100_222_222_222)


def _try(func, *args):
    try:
        result = func(*args)
    except OSError as e:
        return ("error", errno.errorcode.get(e.errno, e.errno))
    return ("ok", result)


def _root_state(path: Path) -> tuple:
    st = os.stat(path)
    user = sorted((n, os.getxattr(path, n)) for n in os.listxattr(path) if n.startswith("user."))
    return (oct(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, user)


def _exercise(mnt: Path, upper: Path) -> list:
    """Each attribute operation on the root, in order, with what it answered and what the
    merged root and the upper directory show after it."""
    steps = [
        ("chmod 0750", lambda: os.chmod(mnt, 0o750)),
        ("chown 1234:5678", lambda: os.chown(mnt, 1234, 5678)),
        ("chown -1:4321", lambda: os.chown(mnt, -1, 4321)),
        ("chown 0:0", lambda: os.chown(mnt, 0, 0)),
        ("chmod 01777", lambda: os.chmod(mnt, 0o1777)),
        ("utime old", lambda: os.utime(mnt, ns=OLD)),
        ("setxattr", lambda: os.setxattr(mnt, "user.root_note", b"on the root")),
        ("setxattr replace", lambda: os.setxattr(mnt, "user.root_note", b"again", os.XATTR_REPLACE)),
        ("getxattr", lambda: os.getxattr(mnt, "user.root_note")),
        ("listxattr", lambda: sorted(n for n in os.listxattr(mnt) if n.startswith("user.")
                                     and not n.startswith("user.overlaypc."))),
        ("removexattr", lambda: os.removexattr(mnt, "user.root_note")),
        ("getxattr removed", lambda: os.getxattr(mnt, "user.root_note")),
        ("removexattr again", lambda: os.removexattr(mnt, "user.root_note")),
        ("truncate", lambda: os.truncate(mnt, 0)),
    ]
    out = []
    for name, op in steps:
        out.append((name, _try(op), _root_state(mnt), _root_state(upper)))
    # touch: the time becomes "now"; the exact value differs between the two mounts, so
    # the check is that it moved off the old value on both the merged root and the upper
    before = os.stat(mnt).st_mtime_ns
    out.append(("touch", _try(os.utime, mnt),
                os.stat(mnt).st_mtime_ns > before, os.stat(upper).st_mtime_ns > before))
    return out


def test_every_attribute_operation_on_the_root_matches_the_kernel(tmp_path, overlay_mount,
                                                                   kernel_mount):
    results = {}
    for which in ("kernel", "overlaypc"):
        base = tmp_path / which
        lower = helpers.build_layer(base / "lower", {"f.txt": "lower file\n", "d/x": "x"})
        upper, work = base / "upper", base / "work"
        upper.mkdir()
        work.mkdir()
        os.chmod(upper, 0o755)
        os.utime(upper, ns=(1_200_000_000_000_000_000, 1_200_000_000_000_000_000))
        if which == "kernel":
            mnt = kernel_mount([lower], upper, work)
        else:
            mnt = overlay_mount(stack_options([lower], upper, work)).path
        results[which] = _exercise(mnt, upper)
    for kernel_step, ours in zip(results["kernel"], results["overlaypc"]):
        assert ours == kernel_step, f"step {kernel_step[0]!r}: kernel {kernel_step}, overlaypc {ours}"


@pytest.mark.parametrize("op", ["chown", "chmod", "utime"])
def test_root_attribute_change_in_a_read_only_mount_is_erofs(tmp_path, overlay_mount, op):
    lower = helpers.build_layer(tmp_path / "lower", {"f.txt": "x"})
    mnt = overlay_mount(f"lowerdir={lower}").path
    call = {"chown": lambda: os.chown(mnt, 1, 1), "chmod": lambda: os.chmod(mnt, 0o700),
            "utime": lambda: os.utime(mnt, ns=OLD)}[op]
    with pytest.raises(OSError) as e:
        call()
    assert e.value.errno == errno.EROFS


def test_root_chown_under_id_mapping_and_xattr_permissions(tmp_path, overlay_mount):
    """What podman does before a container with --uidmap starts: chown the merged root to
    the container's root, here host 100000 = stored 0."""
    lower = helpers.build_layer(tmp_path / "lower", {"f.txt": "x"})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    os.chown(upper, 5, 5)
    mnt = overlay_mount(stack_options([lower], upper, work, "uidmapping=:0:100000:65536,"
                                      "gidmapping=:0:100000:65536,xattr_permissions=2")).path
    assert os.stat(mnt)[4:6] == (100005, 100005)
    os.chown(mnt, 100000, 100000)
    os.chmod(mnt, 0o750)
    st = os.stat(mnt)
    assert (st.st_uid, st.st_gid, oct(st.st_mode)) == (100000, 100000, oct(0o40750))
    assert os.getxattr(upper, "user.fuseoverlayfs.override_stat") == b"0:0:750"
    assert os.stat(upper)[4:6] == (5, 5)  # the real owner is left alone
