"""Self-tests of the test infrastructure (helpers.py), so a broken harness cannot pass
silently. The mount cases use a fake `overlaypc` package in tmp_path, not the real one."""

from __future__ import annotations

import os
import shutil
import stat
import textwrap
from pathlib import Path

import pytest

import helpers
from helpers import OCI_WHITEOUT, WHITEOUT, Dir, File, Symlink


def test_require_skips_normally_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("OVERLAYPC_REQUIRE_MOUNT", raising=False)
    with pytest.raises(pytest.skip.Exception):
        helpers.require(False, "no such thing")
    helpers.require(True, "present")
    monkeypatch.setenv("OVERLAYPC_REQUIRE_MOUNT", "1")
    with pytest.raises(pytest.fail.Exception):
        helpers.require(False, "no such thing")


def test_mountinfo_unescape():
    assert helpers._unescape_mountinfo(r"/tmp/a\040b\011c\134d") == "/tmp/a b\tc\\d"
    assert helpers._unescape_mountinfo("/plain") == "/plain"


def test_build_layer_and_raw_snapshot(tmp_path):
    helpers.require("root")
    root = helpers.build_layer(tmp_path / "l", {
        "f": File("data", mode=0o640, xattrs={"user.k": b"v"}),
        "d": Dir({"inner": "i"}, opaque="trusted"),
        "u": Dir(opaque="user"),
        "o": Dir({"x": "x"}, opaque="oci"),
        "s": Symlink("../target"),
        "w": WHITEOUT,
        "gone": OCI_WHITEOUT,
        "nested": {"a": {"b": "deep"}},
    })
    snap = helpers.tree_snapshot(root)
    assert snap["f"].type == "file" and snap["f"].content == b"data" and snap["f"].mode == 0o640
    assert ("user.k", b"v") in snap["f"].xattrs
    assert ("trusted.overlay.opaque", b"y") in snap["d"].xattrs
    assert ("user.overlay.opaque", b"y") in snap["u"].xattrs
    assert snap["o/.wh..wh..opq"].type == "file"
    assert snap["s"].target == "../target"
    assert snap["w"].type == "chr" and snap["w"].rdev == (0, 0)
    assert snap[".wh.gone"].type == "file" and "gone" not in snap
    assert snap["nested/a/b"].content == b"deep"
    st = os.lstat(root / "w")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_snapshot_hashes_large_files(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * (helpers.SMALL_CONTENT + 1))
    (tmp_path / "small").write_bytes(b"x" * helpers.SMALL_CONTENT)
    snap = helpers.tree_snapshot(tmp_path)
    assert isinstance(snap["big"].content, str) and snap["big"].content.startswith("sha256:")
    assert snap["small"].content == b"x" * helpers.SMALL_CONTENT


# --- Mount against a fake daemon -------------------------------------------------------------

def fake_package(tmp_path: Path, body: str) -> dict:
    pkg = tmp_path / "fakepkg" / "overlaypc"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(body))
    return {"PYTHONPATH": str(pkg.parent)}


FAKE_FUSE_OVERLAYFS = """
    import os, sys
    args = sys.argv[1:]
    opts = args[args.index("-o") + 1]
    print("%s: pretend something broke", file=sys.stderr, flush=True)
    os.execvp("fuse-overlayfs", ["fuse-overlayfs", "-f", "-o", opts, args[-1]])
"""


def test_mount_reports_daemon_errors_in_log(tmp_path, mountpoint):
    helpers.require_fuse_mount()
    helpers.require(shutil.which("fuse-overlayfs") is not None, "needs fuse-overlayfs")
    lower = helpers.build_layer(tmp_path / "lower", {"f": "x"})
    env = fake_package(tmp_path, FAKE_FUSE_OVERLAYFS % "ERROR")
    m = helpers.Mount(mountpoint(), f"lowerdir={lower}", env=env, log_dir=tmp_path).start()
    try:
        assert (m / "f").read_text() == "x"
    finally:
        problems = m.unmount(check=False)
    assert any("unexpected daemon errors" in p for p in problems), problems
    assert not helpers.is_mounted(m.path)

    m2 = helpers.Mount(mountpoint(), f"lowerdir={lower}", env=env, log_dir=tmp_path,
                       allow_daemon_errors=True).start()
    assert m2.unmount(check=False) == []


def test_mount_clean_daemon_has_no_problems(tmp_path, mountpoint):
    helpers.require_fuse_mount()
    helpers.require(shutil.which("fuse-overlayfs") is not None, "needs fuse-overlayfs")
    lower = helpers.build_layer(tmp_path / "lower", {"f": "x"})
    env = fake_package(tmp_path, FAKE_FUSE_OVERLAYFS % "info")
    with helpers.Mount(mountpoint(), f"lowerdir={lower}", env=env, log_dir=tmp_path) as m:
        assert helpers.is_mounted(m.path)
    assert not helpers.is_mounted(m.path) and m.returncode == 0


def test_mount_fails_with_log_when_daemon_exits_early(tmp_path, mountpoint):
    helpers.require_fuse_mount()
    env = fake_package(tmp_path, """
        import sys
        print("fake daemon gives up", file=sys.stderr)
        sys.exit(3)
    """)
    m = helpers.Mount(mountpoint(), "lowerdir=/nonexistent", env=env, log_dir=tmp_path)
    with pytest.raises(helpers.MountError, match="fake daemon gives up"):
        m.start()
    assert not helpers.is_mounted(m.path)


def test_run_overlaypc_undoes_a_wrong_mount(tmp_path, mountpoint, monkeypatch):
    """A CLI call that mounts although it should have failed is detected and cleaned up."""
    helpers.require_fuse_mount()
    helpers.require(shutil.which("fuse-overlayfs") is not None, "needs fuse-overlayfs")
    lower = helpers.build_layer(tmp_path / "lower", {"f": "x"})
    env = fake_package(tmp_path, """
        import os, sys
        args = sys.argv[1:]
        opts = args[args.index("-o") + 1]
        os.execvp("fuse-overlayfs", ["fuse-overlayfs", "-o", opts, args[-1]])
    """)
    monkeypatch.setenv("OVERLAYPC_TEST_PYTHONPATH", env["PYTHONPATH"])
    mnt = mountpoint()
    res = helpers.run_overlaypc(["-o", f"lowerdir={lower}", mnt], mnt, tmp_path)
    assert res.wrongly_mounted and res.returncode == 0
    assert not helpers.is_mounted(mnt)
    assert helpers.wait_until(
        lambda: not [p for p in helpers.pids_with_arg(mnt) if helpers.pid_alive(p)], 10)
