"""overlaypc as containers/storage's ``mount_program`` (issue 14, item 2): every option of
fuse-overlayfs is accepted, with its meaning or with a log line saying it has no effect;
the option strings containers/storage builds mount; ``--version`` answers.

Options with an effect are each checked through a real mount here (``noacl``,
``noxattrs``, ``fsync=0``; ID mapping, squashing, ``static_nlink`` and
``xattr_permissions`` in ``test_ownership.py`` and ``test_override_stat.py``).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import helpers
from ownership_support import mount_options
from upper_support import NOBODY, STATS_XATTR, run_as

pytestmark = pytest.mark.mount

ALL_OPTIONS = ("uidmapping=:0:100000:65536,gidmapping=:0:100000:65536,squash_to_uid=0,"
               "static_nlink,noacl,fsync=0,threaded=1,xattr_permissions=2,noxattrs=0,"
               "plugins=/usr/libexec/fuse-overlayfs,max_idle_threads=10,fast_ino=1,writeback=1,"
               "ino32_t,allow_root,timeout=1000000000,"
               'context="system_u:object_r:container_file_t:s0:c1,c2"')
NO_EFFECT = ("threaded=1", "plugins=/usr/libexec/fuse-overlayfs", "max_idle_threads=10",
             "fast_ino=1", "writeback=1", "ino32_t", "allow_root")


def test_every_fuse_overlayfs_option_mounts_and_says_what_it_ignores(tmp_path, overlay_mount):
    helpers.require(not os.path.exists("/sys/fs/selinux/enforce"),
                    "this test checks that context= is dropped where SELinux is off")
    lower = helpers.build_layer(tmp_path / "lower", {"f": "lower\n", "d/x": "x"})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    # the daemonizing form, as containers/storage runs it
    m = overlay_mount(mount_options([lower], upper, work, ALL_OPTIONS), foreground=False)
    assert (m.path / "f").read_text() == "lower\n"
    assert os.stat(m.path / "f").st_uid == 0  # squash_to_uid=0 over the mapping
    assert os.stat(m.path / "d").st_nlink == 1  # static_nlink
    (m.path / "new").write_text("new\n")
    log = m.log_text()
    for option in NO_EFFECT:
        assert f"option {option} has no effect: " in log, option
    assert ("option context=system_u:object_r:container_file_t:s0:c1,c2 has no effect: "
            "SELinux is not enabled") in log
    for option in ("uidmapping", "static_nlink", "noacl", "fsync", "xattr_permissions", "timeout"):
        assert f"option {option}" not in log, f"{option} has an effect, yet was logged as not"


def _storage(tmp_path: Path) -> Path:
    """containers/storage's overlay directory: layers ID/diff, links l/SHORT -> ../ID/diff."""
    home = tmp_path / "overlay"
    for layer, content in (("base", {"etc/os-release": "base\n", "bin/sh": "sh\n"}),
                           ("app", {"app/run": "run\n", "etc/os-release": "app\n"})):
        helpers.build_layer(home / layer / "diff", content)
    (home / "l").mkdir()
    os.symlink("../base/diff", home / "l" / "BASE")
    os.symlink("../app/diff", home / "l" / "APP")
    for d in ("ctr/diff", "ctr/work", "ctr/merged"):
        (home / d).mkdir(parents=True)
    return home


@pytest.mark.parametrize("options", [
    "lowerdir=l/APP:l/BASE,upperdir=ctr/diff,workdir=ctr/work,,volatile",
    "lowerdir=l/APP:l/BASE,upperdir=ctr/diff,workdir=ctr/work,",
    "lowerdir=l/APP:l/BASE,upperdir=ctr/diff,workdir=ctr/work,uidmapping=:0:100000:65536,"
    "gidmapping=:0:100000:65536,xattr_permissions=2,fsync=0,",
    "lowerdir=app/diff:base/diff",
    "lowerdir=app/diff:base/diff,",
], ids=["empty-element", "trailing-comma", "userns-force-mask", "image", "image-trailing-comma"])
def test_option_strings_of_containers_storage(tmp_path, overlay_mount, options):
    home = _storage(tmp_path)
    # relative layer paths, resolved in the directory containers/storage runs us in
    m = overlay_mount(options, mnt=home / "ctr" / "merged", foreground=False, log_dir=home)
    assert (m.path / "etc/os-release").read_text() == "app\n"
    assert sorted(os.listdir(m.path)) == ["app", "bin", "etc"]
    if "upperdir" in options:
        (m.path / "etc/hostname").write_text("ctr\n")
        assert (home / "ctr/diff/etc/hostname").read_text() == "ctr\n"
    else:
        with pytest.raises(OSError) as e:
            (m.path / "etc/hostname").write_text("ctr\n")
        assert e.value.errno == errno.EROFS


def test_version_answers_one_line_and_exits_0(tmp_path):
    r = subprocess.run(helpers.overlaypc_cmd("--version"), capture_output=True, text=True,
                       env=helpers.overlaypc_env(), cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("overlaypc ") and lines[0].split()[1][0].isdigit()


def _acl_stack(tmp_path: Path) -> Path:
    shutil.which("setfacl") or helpers.require(False, "needs setfacl (Debian package acl)")
    lower = helpers.build_layer(tmp_path / "lower", {"shared": "for nobody\n"})
    os.chmod(lower / "shared", 0o600)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:r", str(lower / "shared")], check=True)
    return lower


def test_noacl_turns_posix_acls_off(tmp_path, overlay_mount):
    lower = _acl_stack(tmp_path)
    read = "print(open('shared').read(), end='')"
    with_acls = overlay_mount(f"lowerdir={lower}").path
    assert run_as(read, cwd=with_acls) == "for nobody\n"  # the ACL's named-user entry
    for option in ("noacl", "noxattrs=1"):
        mnt = overlay_mount(f"lowerdir={lower},{option}").path
        with pytest.raises(AssertionError, match="PermissionError"):
            run_as(read, cwd=mnt)  # mode 0600 alone decides


def test_noxattrs_refuses_xattr_operations(tmp_path, overlay_mount):
    lower = helpers.build_layer(tmp_path / "lower", {"f": helpers.File("x", xattrs={"user.k": b"v"})})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    mnt = overlay_mount(mount_options([lower], upper, work, "noxattrs=1")).path
    for call in (lambda: os.getxattr(mnt / "f", "user.k"), lambda: os.listxattr(mnt / "f"),
                 lambda: os.setxattr(mnt / "f", "user.new", b"1"),
                 lambda: os.removexattr(mnt / "f", "user.k")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOTSUP
    assert not (upper / "f").exists()
    assert json.loads(os.getxattr(mnt, STATS_XATTR))["copy_ups"] is not None  # still readable
    with open(mnt / "f", "a") as f:  # a copy-up keeps the layer's xattrs all the same
        f.write("y")
    assert os.getxattr(upper / "f", "user.k") == b"v"


def _fsyncs_of(pid: int, action, out: Path) -> int:
    """fsync/fdatasync calls made by process ``pid`` (all its threads) during ``action``."""
    helpers.require(shutil.which("strace") is not None, "needs strace")
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(out),
                               "-p", str(pid)], stderr=subprocess.PIPE, text=True)
    try:
        # strace writes nothing until something is traced: probe with a syscall we count
        assert helpers.wait_until(lambda: _attached(pid), 10), "strace did not attach"
        action()
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=10)
    return sum(1 for line in out.read_text().splitlines() if "fsync(" in line or "fdatasync(" in line)


def _attached(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)


@pytest.mark.parametrize("fsync", [True, False], ids=["default", "fsync=0"])
def test_fsync_0_skips_every_fsync(tmp_path, overlay_mount, fsync):
    lower = helpers.build_layer(tmp_path / "lower", {"f": "lower\n", "d/g": "g\n"})
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(mount_options([lower], upper, work, "" if fsync else "fsync=0"))

    def action() -> None:
        with open(m.path / "f", "a") as f:  # copy-up: file and parent directory synced
            f.write("more\n")
            f.flush()
            os.fsync(f.fileno())             # the caller's own fsync
        with open(m.path / "d/new", "w") as f:
            f.write("x")
            f.flush()
            os.fdatasync(f.fileno())

    count = _fsyncs_of(m.proc.pid, action, tmp_path / "strace.out")
    assert (count > 0) if fsync else (count == 0), count
    assert (upper / "f").read_text() == "lower\nmore\n"
    assert not (work / "work" / "incompat").exists(), "fsync=0 is not volatile: no marker"
