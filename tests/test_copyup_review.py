"""Review of copy-up and index changes (session 5): integrity across the steps of a copy-up.

- metacopy=on: the data copy-up of a metadata-only copy (the first open for write) keeps
  the file's ``security.capability``; writing the data into the upper file drops it (a
  write kills privileges, even the root daemon's), so the kernel reads it before and
  sets it again after (``ovl_copy_up_meta_inode_data``). The kernel is the oracle.
- index=on: a kill -9 between a link-up and the rewrite of the link count, or between a
  lower name's removal and the count's rewrite, leaves the count right (the kernel,
  mounting the same layers afterwards, agrees).
- a copy-up that does not fit in the upper fails ENOSPC, never installs a short copy.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import helpers
from features_support import KERNEL_INDEX, KERNEL_METACOPY, new_stack

pytestmark = [pytest.mark.mount]

#: a v2 file capability (cap_net_raw permitted+effective)
CAP = bytes.fromhex("0100000200200000000000000000000000000000")


def _lower_with_capability(base: Path) -> Path:
    lower = base / "lower"
    lower.mkdir()
    f = lower / "ping"
    f.write_bytes(b"binary data\n" * 1000)
    os.chmod(f, 0o755)
    os.setxattr(f, "security.capability", CAP)
    return lower


def _chmod_then_write(root: Path) -> tuple[bytes | None, bytes | None]:
    """chmod (a metadata-only copy-up), then an open for write (the data copy-up): the
    capability after each. The open writes nothing: only the copy-up may drop it."""
    os.chmod(root / "ping", 0o750)
    after_chmod = os.getxattr(root / "ping", "security.capability")
    os.close(os.open(root / "ping", os.O_WRONLY))
    try:
        after_open = os.getxattr(root / "ping", "security.capability")
    except OSError:
        after_open = None
    return after_chmod, after_open


def test_metacopy_data_copy_up_keeps_the_capability(tmp_path, overlay_mount, kernel_mount):
    helpers.require("root")
    lower = _lower_with_capability(tmp_path)
    ks = new_stack([lower], tmp_path, "k")
    theirs = _chmod_then_write(kernel_mount([lower], ks.upper, ks.work, KERNEL_METACOPY))
    ours_stack = new_stack([lower], tmp_path, "o")
    m = overlay_mount(ours_stack.options("metacopy=on"))
    mine = _chmod_then_write(m.path)
    assert theirs == (CAP, CAP)
    assert mine == theirs
    m.unmount()
    assert os.getxattr(ours_stack.upper / "ping", "security.capability") == CAP


# --------------------------------------------------------------------------------------
# index=on: kill -9 while a name of a lower hard link is linked to its index entry
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("point, linked", [("layer.link~hl/a", False), ("layer.utime~hl", True)],
                         ids=["before_link", "after_link"])
def test_kill9_around_a_link_up_keeps_the_link_count(point, linked, tmp_path, overlay_mount,
                                                     kernel_mount):
    """index=on, the first copy-up of a name of a lower hard link (``hl/a``, ``hl/b``): the
    copy becomes the index entry, then ``hl/a`` is linked to it. The kernel's relative
    count (``trusted.overlay.nlink`` "U%+d", relative to the index inode's links) was
    written for one link and rewritten after the link: a kill -9 between the two left
    it one too high for good, and every name showed st_nlink 3 after the next mount (the
    kernel mounting that upper too). The pauses: just before the link, and the parent's
    times being put back, just after it."""
    from reliability_support import kill_at_pause
    from upper_support import stack_options

    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower / "hl", upper, work):
        d.mkdir(parents=True)
    (lower / "hl" / "a").write_bytes(b"shared\n")
    os.link(lower / "hl" / "a", lower / "hl" / "b")
    opts = stack_options([lower], upper, work) + ",index=on"
    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS": f"{point}=pause"})

    def linked_yet() -> None:
        assert (upper / "hl" / "a").exists() == linked  # (linked to its index entry)
    kill_at_pause(m, f"os.chmod({str(m / 'hl' / 'a')!r}, 0o600)", point, linked_yet)
    again = overlay_mount(opts)
    assert {n: os.lstat(again / "hl" / n).st_nlink for n in ("a", "b")} == {"a": 2, "b": 2}
    again.unmount()
    kernel = kernel_mount([lower], upper, work, KERNEL_INDEX)  # the same count
    assert {n: os.lstat(kernel / "hl" / n).st_nlink for n in ("a", "b")} == {"a": 2, "b": 2}
    os.unlink(kernel / "hl" / "b")
    assert os.lstat(kernel / "hl" / "a").st_nlink == 1


@pytest.mark.parametrize("how", ["unlink", "rename_over"])
def test_kill9_after_removing_a_lower_name_of_an_indexed_file_keeps_the_count(
        how, tmp_path, overlay_mount, kernel_mount):
    """index=on, a lower hard link of three names whose index entry exists (``hl/a`` was
    copied up): ``hl/b`` goes (unlink, or a rename over it) by a whiteout, and the count
    was rewritten after it (-1, the index inode's links unchanged). A kill -9 between the
    two left the count one too high for good (3 names shown for 2). As the kernel's
    ``ovl_nlink_start``, the name is linked up first, so what goes is an upper name, whose
    unlink moves the index inode's links with the count (the relative count holds)."""
    from reliability_support import kill_at_pause
    from upper_support import stack_options

    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower / "hl", upper, work):
        d.mkdir(parents=True)
    (lower / "hl" / "a").write_bytes(b"shared\n")
    os.link(lower / "hl" / "a", lower / "hl" / "b")
    os.link(lower / "hl" / "a", lower / "hl" / "c")
    (lower / "hl" / "new").write_bytes(b"other\n")
    opts = stack_options([lower], upper, work) + ",index=on"
    m = overlay_mount(opts)
    os.chmod(m / "hl" / "a", 0o600)  # the index entry, hl/a linked to it
    m.unmount()
    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS": "index.adjust=pause"})
    change = (f"os.unlink({str(m / 'hl' / 'b')!r})" if how == "unlink"
              else f"os.rename({str(m / 'hl' / 'new')!r}, {str(m / 'hl' / 'b')!r})")
    kill_at_pause(m, change, "index.adjust")
    again = overlay_mount(opts)
    names = ("a", "c")
    assert {n: os.lstat(again / "hl" / n).st_nlink for n in names} == {"a": 2, "c": 2}
    again.unmount()
    kernel = kernel_mount([lower], upper, work, KERNEL_INDEX)  # the same count
    assert {n: os.lstat(kernel / "hl" / n).st_nlink for n in names} == {"a": 2, "c": 2}


# --------------------------------------------------------------------------------------
# a short write in the chunked copy (the upper runs out of space partway through a chunk)
# --------------------------------------------------------------------------------------
def test_copy_up_that_does_not_fit_fails_enospc_not_short(tmp_path, tmpfs_factory, overlay_mount):
    """Copy-up of a 5 MiB lower file to a 4 MiB tmpfs upper, by the chunked copy (another
    filesystem: copy_file_range says EXDEV). The one pwrite(2) of the chunk wrote what
    fitted and returned that count, which was taken for the whole chunk: the copy-up
    "succeeded" with a file short of its data (before the copy ended at the size, it was
    extended with zeros instead). The kernel answers ENOSPC, and so must we, leaving no
    copy behind."""
    data = os.urandom(5 << 20)
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f.bin").write_bytes(data)
    fs = tmpfs_factory("4m")
    upper, work = fs / "upper", fs / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work}")
    with pytest.raises(OSError) as refused:
        os.chmod(m / "f.bin", 0o600)
    assert refused.value.errno == errno.ENOSPC, refused.value
    assert not (upper / "f.bin").exists()
    assert os.listdir(work / "work") == []
    with open(m / "f.bin", "rb") as f:
        assert f.read() == data


def test_failed_metacopy_data_copy_up_keeps_the_capability(tmp_path, tmpfs_factory, overlay_mount):
    """metacopy=on, a data copy-up that fails partway (ENOSPC: the upper fills up) leaves
    the metadata-only copy as it was, its capability too: the part of the data written
    had dropped it, and it was put back only after a complete copy."""
    lower = tmp_path / "lower"
    lower.mkdir()
    f = lower / "ping"
    f.write_bytes(os.urandom(5 << 20))
    os.chmod(f, 0o755)
    os.setxattr(f, "security.capability", CAP)
    fs = tmpfs_factory("4m")
    upper, work = fs / "upper", fs / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work},metacopy=on,redirect_dir=on")
    os.chmod(m / "ping", 0o750)  # metadata only: fits
    with pytest.raises(OSError) as refused:
        os.close(os.open(m / "ping", os.O_WRONLY))
    assert refused.value.errno == errno.ENOSPC, refused.value
    assert os.getxattr(m / "ping", "security.capability") == CAP
    assert os.getxattr(upper / "ping", "security.capability") == CAP
