"""Copy-up and extended attributes, the kernel's rule (issue 13.6, ``ovl_copy_xattr``).

Any error but EOPNOTSUPP fails the copy-up, for any xattr; EOPNOTSUPP fails it for POSIX ACLs and
``security.*`` only (a lost ACL could widen access), and is ignored for other xattrs.
The upper here is a real btrfs mounted ``noacl`` on a loop device, where setting an ACL
gives EOPNOTSUPP while other xattrs work; the kernel overlay over the same kind of upper
is the oracle.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import helpers

pytestmark = [pytest.mark.mount]


def _loop_fs(tmp_path: Path, name: str, size: int, mkfs: list[str], options: str):
    """A fresh filesystem of ``size`` bytes made by ``mkfs`` (the image path appended) and
    loop-mounted with ``options`` at ``tmp_path/name``; unmounted and removed after."""
    helpers.require("root")
    helpers.require(shutil.which(mkfs[0]) is not None, f"needs {mkfs[0]}")
    image, mnt = tmp_path / f"{name}.img", tmp_path / name
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    r = subprocess.run(["mount", "-o", options, str(image), str(mnt)], capture_output=True, text=True)
    helpers.require(r.returncode == 0, f"cannot loop-mount {name}: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        helpers.force_unmount(mnt)
        with contextlib.suppress(OSError):
            image.unlink()


@pytest.fixture
def noacl_fs(tmp_path: Path):
    """A small btrfs mounted with ``noacl``: ACL xattrs answer EOPNOTSUPP."""
    yield from _loop_fs(tmp_path, "noacl", 128 << 20, ["mkfs.btrfs", "-q"], "loop,noacl")


def lower_with_acl(base: Path) -> Path:
    lower = base / "lower"
    lower.mkdir()
    (lower / "secret").write_bytes(b"not for nobody\n")
    os.chmod(lower / "secret", 0o644)
    subprocess.run(["setfacl", "-m", "u:nobody:---", str(lower / "secret")], check=True)
    (lower / "plain").write_bytes(b"plain\n")
    os.setxattr(lower / "plain", "user.note", b"kept")
    return lower


def upper_and_work(base: Path, tag: str) -> tuple[Path, Path]:
    upper, work = base / f"upper-{tag}", base / f"work-{tag}"
    upper.mkdir()
    work.mkdir()
    return upper, work


def assert_copy_up_refused(mnt: Path, upper: Path, work: Path, name: str, errno_: int) -> None:
    """A chmod of lower file ``name`` (a copy-up) fails with ``errno_`` and leaves nothing in
    the upper or the workdir."""
    with pytest.raises(OSError) as refused:
        os.chmod(mnt / name, 0o600)
    assert refused.value.errno == errno_, refused.value
    assert not (upper / name).exists(), "a copy without all its xattrs reached the upper"
    assert os.listdir(work / "work") == []


def assert_kernel_refuses_alike(kernel_mount, lower: Path, fs: Path, name: str, errno_: int) -> None:
    """The kernel overlay, with upper and workdir on the same filesystem, refuses the same."""
    kupper, kwork = upper_and_work(fs, "kernel")
    k = kernel_mount([lower], kupper, kwork)
    with pytest.raises(OSError) as refused:
        os.chmod(k / name, 0o600)
    assert refused.value.errno == errno_, refused.value
    assert not (kupper / name).exists()


def test_acl_that_cannot_be_copied_fails_the_copy_up(tmp_path, noacl_fs, overlay_mount,
                                                     kernel_mount):
    lower = lower_with_acl(tmp_path)
    upper, work = upper_and_work(noacl_fs, "ours")
    m = overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work}")
    assert_copy_up_refused(m, upper, work, "secret", errno.EOPNOTSUPP)
    assert (m / "secret").read_bytes() == b"not for nobody\n"
    os.chmod(m / "plain", 0o600)  # no ACL: copies up fine, user xattr included
    assert os.getxattr(upper / "plain", "user.note") == b"kept"
    assert_kernel_refuses_alike(kernel_mount, lower, noacl_fs, "secret", errno.EOPNOTSUPP)



@pytest.fixture
def ext4_fs(tmp_path: Path):
    """A small ext4 (without ea_inode) on a loop device: all of an inode's xattrs must fit
    in one 4 KiB block, so a large value fails with ENOSPC."""
    yield from _loop_fs(tmp_path, "ext4", 64 << 20,
                        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^ea_inode"], "loop")


def test_any_other_xattr_error_fails_the_copy_up(tmp_path, xfs_dir, ext4_fs, overlay_mount,
                                                kernel_mount):
    """Not only ACLs: an error other than EOPNOTSUPP fails the copy-up for any xattr. A
    user.* value of 8000 bytes fits an XFS lower but not an ext4 upper (ENOSPC); a copy
    without it must not reach the upper, and the kernel overlay answers the same."""
    lower = xfs_dir / "lower"
    lower.mkdir()
    (lower / "big").write_bytes(b"big xattr\n")
    os.setxattr(lower / "big", "user.big", b"x" * 8000)
    (lower / "small").write_bytes(b"small xattr\n")
    os.setxattr(lower / "small", "user.small", b"kept")
    upper, work = upper_and_work(ext4_fs, "ours")
    m = overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work}")
    assert_copy_up_refused(m, upper, work, "big", errno.ENOSPC)
    assert (m / "big").read_bytes() == b"big xattr\n"
    assert os.getxattr(m / "big", "user.big") == b"x" * 8000
    os.chmod(m / "small", 0o600)  # a small one copies up fine
    assert os.getxattr(upper / "small", "user.small") == b"kept"
    assert_kernel_refuses_alike(kernel_mount, lower, ext4_fs, "big", errno.ENOSPC)
