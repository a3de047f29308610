"""``index=on`` refuses an upper used over other lowers, or a workdir used with another upper
(overlaypc/indexroots.py), with the kernel as the oracle both ways.

The kernel records at the first ``index=on`` mount the top lower root's file handle as the
upper root's ``trusted.overlay.origin`` and the upper root's handle as the index dir's
``trusted.overlay.upper``, and refuses (ESTALE) a later mount whose layers do not match.
Each stack here is made by one implementation and mounted by the other: a matching stack
mounts, a mismatched one is refused by both, and a refused overlaypc mount changes nothing.
A layer that cannot encode file handles turns index off in both (no index dir, no xattrs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

import helpers
from features_support import KERNEL_INDEX, make_lowers, new_stack, ovl_xattr

pytestmark = [pytest.mark.mount]


@pytest.fixture
def lowers(layers_factory, tmp_path) -> list[Path]:
    """Two unrelated lower layers A and B."""
    return make_lowers(layers_factory, tmp_path, {"A": {"f": "from A\n"}, "B": {"f": "from B\n"}})


def kernel_refusal(mnt: Path, lowers, upper, work, extra=()) -> Optional[str]:
    """None if the kernel mounts the stack with index=on (unmounted again at once), else
    its mount(8) error."""
    try:
        with helpers.kernel_overlay(mnt, lowers, upper, work, KERNEL_INDEX + tuple(extra)):
            return None
    except AssertionError as e:
        return str(e)


def overlaypc_refusal(tmp_path: Path, mnt: Path, options: str) -> Optional[str]:
    """None if overlaypc (the daemonizing CLI) mounts (unmounted again at once), else its
    one error line."""
    mnt.mkdir(exist_ok=True)
    res = helpers.run_overlaypc(["-o", options, mnt], mnt, tmp_path)
    assert not res.timed_out, res
    if res.wrongly_mounted:  # it mounted (and run_overlaypc took the mount down again)
        assert res.returncode == 0, res
        return None
    assert res.returncode == 2, res
    [line] = [x for x in res.stderr.splitlines() if x.strip()]
    return line


@pytest.mark.parametrize("reused", ["upper", "work"])
def test_kernel_refuses_a_mismatched_stack_overlaypc_made(reused, lowers, tmp_path, overlay_mount):
    a, b = lowers[:1], lowers[1:]
    s = new_stack(a, tmp_path, "o")
    overlay_mount(s.options("index=on")).unmount()
    if reused == "upper":   # the upper (and its workdir) over other lowers
        got = kernel_refusal(tmp_path / "k1", b, s.upper, s.work)
    else:                   # the workdir with another upper, over the same lowers
        other = new_stack(a, tmp_path, "o2").upper
        got = kernel_refusal(tmp_path / "k1", a, other, s.work)
    assert got is not None and "Stale file handle" in got, got
    # written in the kernel's format: the stack it was made with still mounts
    assert kernel_refusal(tmp_path / "k2", a, s.upper, s.work) is None


@pytest.mark.parametrize("ro", [False, True])
@pytest.mark.parametrize("reused", ["upper", "work"])
def test_overlaypc_refuses_a_mismatched_stack_the_kernel_made(reused, ro, lowers, tmp_path,
                                                              overlay_mount):
    a, b = lowers[:1], lowers[1:]
    s = new_stack(a, tmp_path, "k")
    assert kernel_refusal(tmp_path / "k", a, s.upper, s.work) is None
    if reused == "upper":
        bad, named = s.options("index=on").replace(str(a[0]), str(b[0])), [s.upper, b[0]]
    else:
        other = new_stack(a, tmp_path, "k2").upper
        bad, named = s.options("index=on").replace(str(s.upper), str(other)), [s.work, other]
    watched = [s.upper, s.work, *named]
    before = {p: helpers.dir_state(p) for p in watched}
    line = overlaypc_refusal(tmp_path, tmp_path / "mnt-refused", bad + (",ro" if ro else ""))
    assert line is not None, f"overlaypc mounted {bad}"
    assert line.startswith("overlaypc: error: index=on:"), line
    assert all(str(p) in line for p in named), line
    assert {p: helpers.dir_state(p) for p in watched} == before, "a refused mount wrote"
    # the kernel's values read as this stack's: the stack it was made with mounts
    m = overlay_mount(s.options("index=on"))
    assert (m / "f").read_text() == "from A\n"


@pytest.mark.parametrize("ro", [False, True])
def test_root_handles_written_as_the_kernel_writes_them(ro, lowers, tmp_path, overlay_mount):
    """A fresh stack mounted with index=on (also ``-o ro``: the kernel writes them there
    too) gets the same upper root origin from both, and an index dir upper handle."""
    a = lowers[:1]
    ks, os_ = new_stack(a, tmp_path, "k"), new_stack(a, tmp_path, "o")
    extra = ("ro",) if ro else ()
    assert kernel_refusal(tmp_path / "k", a, ks.upper, ks.work, extra) is None
    overlay_mount(os_.options("index=on,ro" if ro else "index=on")).unmount()
    theirs = ovl_xattr(ks.upper, "origin")
    assert theirs is not None
    assert ovl_xattr(os_.upper, "origin") == theirs
    up = ovl_xattr(os_.work / "index", "upper")
    assert up is not None and up[3] & 4, up  # OVL_FH_FLAG_PATH_UPPER
    assert len(up) == len(ovl_xattr(ks.work / "index", "upper"))


# the kernel's ovl_get_fh: a malformed value, an unknown version or flags, the other byte
# order and an empty value read as "origin unknown", which is overwritten; another handle
# refuses
STORED = {
    "garbage": lambda good: b"not a file handle",
    "bad_magic": lambda good: good[:1] + b"\xfa" + good[2:],
    "empty": lambda good: b"",
    "newer_version": lambda good: b"\x01" + good[1:],
    "unknown_flag": lambda good: good[:3] + bytes([good[3] | 0x80]) + good[4:],
    "other_byte_order": lambda good: good[:3] + bytes([good[3] ^ 1]) + good[4:],
    "other_handle": lambda good: good[:-1] + bytes([good[-1] ^ 0xFF]),
}


@pytest.mark.parametrize("stored", list(STORED))
def test_stored_origin_judged_as_the_kernel_judges_it(stored, lowers, tmp_path):
    a = lowers[:1]
    probe = new_stack(a, tmp_path, "p")
    assert kernel_refusal(tmp_path / "kp", a, probe.upper, probe.work) is None
    value = STORED[stored](ovl_xattr(probe.upper, "origin"))
    ks, os_ = new_stack(a, tmp_path, "k"), new_stack(a, tmp_path, "o")
    for s in (ks, os_):
        os.setxattr(s.upper, "trusted.overlay.origin", value)
    theirs = kernel_refusal(tmp_path / "k", a, ks.upper, ks.work)
    mine = overlaypc_refusal(tmp_path, tmp_path / "mnt", os_.options("index=on"))
    assert (mine is None) == (theirs is None), (mine, theirs)
    if theirs is None:  # overwritten with this stack's origin by both
        assert ovl_xattr(os_.upper, "origin") == ovl_xattr(ks.upper, "origin") != value
    else:
        assert "index=on" in mine and str(os_.upper) in mine, mine
        assert ovl_xattr(os_.upper, "origin") == value


def test_lower_without_file_handles_turns_index_off_as_the_kernel(layers_factory, tmp_path,
                                                                  overlay_mount):
    """The lower is a kernel overlay without nfs_export (no file handles): both mount with
    index off (no index dir, no origin), so a write to one name of a lower hard link does
    not reach the other name."""
    base = make_lowers(layers_factory, tmp_path, {"top": {"a": "old\n", "b": helpers.HardLink("a")},
                                                 "bottom": {}})
    with helpers.kernel_overlay(tmp_path / "lower-ovl", base) as lower:
        assert os.stat(lower / "b").st_nlink == 2

        def run(root: Path) -> dict:
            (Path(root) / "a").write_text("new\n")
            st = {n: os.stat(Path(root) / n) for n in "ab"}
            return {"data": {n: (Path(root) / n).read_text() for n in "ab"},
                    "nlink": {n: s.st_nlink for n, s in st.items()},
                    "one_inode": st["a"].st_ino == st["b"].st_ino}

        ks, os_ = new_stack([lower], tmp_path, "k"), new_stack([lower], tmp_path, "o")
        with helpers.kernel_overlay(tmp_path / "k", [lower], ks.upper, ks.work, KERNEL_INDEX) as k:
            theirs = run(k)
        m = overlay_mount(os_.options("index=on"))
        mine = run(m.path)
        m.unmount()
    assert theirs["data"] == {"a": "new\n", "b": "old\n"}  # the oracle ran with index off
    assert mine == theirs
    for s in (ks, os_):
        assert not (s.work / "index").exists(), s.work
        assert ovl_xattr(s.upper, "origin") is None, s.upper
