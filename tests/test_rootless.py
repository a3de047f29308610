"""Rootless overlaypc, in both of its forms (issue 14, item 5):

- uid 0 of a user namespace (``unshare -Urm``, as rootless podman runs its mount program):
  FUSE mount(2) works there, ``trusted.*`` xattrs cannot be set, so the mount falls back to
  the ``user.overlay.*`` format (as ``-o userxattr``), and to ``.wh.NAME`` whiteout files
  where 0/0 devices cannot be made; what it wrote reads back the same from a root mount;
- a plain user (uid 65534) mounting through fusermount3: no ``allow_other`` unless
  /etc/fuse.conf allows it, ``fusermount3 -u`` unmounts, and a killed daemon leaves no
  dead mount;
- layers written by fuse-overlayfs in rootless mode (``.wh.NAME`` in the upper,
  ``.wh..wh..opq``, ``user.fuseoverlayfs.opaque``, ``user.fuseoverlayfs.origin``) read
  right, checked against fuse-overlayfs itself.
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

import helpers
import rootless_support as rs
from helpers import File

pytestmark = pytest.mark.mount

IMAGE = {
    "img/dir/a": "a", "img/dir/b": "b", "img/dir/sub/c": "c",
    "img/file": "file",
    "img/tree/x/y": "y", "img/tree/z": "z",
    "keep": File("keep\n", mode=0o640),
}
# what a container does to an image: rm -rf and recreate, delete, rename an image
# directory, append (copy-up), a symlink
STEPS = [
    "rm -rf img/tree && mkdir img/tree && echo new > img/tree/new",
    "rm img/file",
    "mv img/dir img/moved",
    "echo more >> keep",
    "ln -s keep link",
]


def _require_userns() -> None:
    helpers.require_fuse_mount()
    helpers.require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    r = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    helpers.require(r.returncode == 0, f"cannot make user namespaces: {r.stderr.decode().strip()}")


def _session(tmp_path: Path, layers, options: str, steps, env=None) -> dict:
    mnt = tmp_path / "nsmnt"
    mnt.mkdir(exist_ok=True)
    report = tmp_path / "report.pickle"
    r = rs.userns_session(options, str(mnt), steps, str(report), env)
    assert r.returncode == 0, r.stderr.decode()
    out = pickle.loads(report.read_bytes())
    log = Path(str(report) + ".log").read_text()
    assert "error" not in out, f"{out['error']}\n{log}"
    assert out["uid_map"].split()[:2] == ["0", "0"], out["uid_map"]  # uid 0 of a user namespace
    for step, rc, text in out["steps"]:
        assert rc == 0, f"{step!r} failed in the user namespace: {text}\n{log}"
    assert out["daemon_status"] == 0, log
    assert not helpers.unexpected_log_lines(log), log
    return out


def _check_view(snap: dict) -> None:
    names = {k for k in snap if k != "."}
    assert {"img/tree", "img/tree/new"} <= names and not any(
        k.startswith(("img/tree/x", "img/tree/z")) for k in names), sorted(names)
    assert "img/file" not in names
    assert not any(k == "img/dir" or k.startswith("img/dir/") for k in names), sorted(names)
    assert snap["img/moved/sub/c"].content == b"c" and snap["img/moved/a"].content == b"a"
    assert snap["keep"].content == b"keep\nmore\n" and snap["keep"].mode == 0o640
    assert snap["link"].target == "keep"
    assert not any(os.path.basename(k).startswith(".wh.") for k in names)


def _private_xattrs(root: Path) -> dict[str, list[str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None] + dirnames + filenames:
            p = dirpath if name is None else os.path.join(dirpath, name)
            found = [x for x in os.listxattr(p, follow_symlinks=False)
                     if x.startswith(("trusted.overlay.", "user.overlay."))]
            if found:
                out[os.path.relpath(p, root)] = sorted(found)
    return out


def _chardevs(root: Path) -> list[str]:
    return [os.path.relpath(os.path.join(d, n), root) for d, _, files in os.walk(root)
            for n in files if stat.S_ISCHR(os.lstat(os.path.join(d, n)).st_mode)]


def test_user_namespace_writes_user_xattrs_and_reads_back_as_root(
        tmp_path, layers_factory, overlay_mount, kernel_mount):
    """In a user namespace trusted.* xattrs cannot be set: before the format probe, the
    ``mkdir`` after ``rm -rf`` (opaque) and the rename of an image directory (redirect)
    failed with EPERM."""
    _require_userns()
    layers = layers_factory({"low": IMAGE})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    opts = f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}"
    out = _session(tmp_path, layers, opts, STEPS)
    _check_view(out["snapshot"])
    marks = _private_xattrs(upper)
    assert marks, "nothing marked in the upper"
    assert not [k for k, names in marks.items() if any(n.startswith("trusted.") for n in names)], marks
    assert os.getxattr(upper / "img/tree", "user.overlay.opaque") == b"y"
    assert os.getxattr(upper / "img/moved", "user.overlay.redirect") == b"dir"
    assert os.getxattr(upper / "keep", "user.overlay.origin")  # a file handle, kernel format
    assert sorted(_chardevs(upper)) == ["img/dir", "img/file"]  # whiteouts: 0/0 devices
    # a root mount reads it back the same (given userxattr, as the kernel needs it)
    m = overlay_mount(opts + ",userxattr")
    snap = helpers.tree_snapshot(m.path)
    assert snap == out["snapshot"], helpers.diff_snapshots(out["snapshot"], snap, ("userns", "root"))
    m.unmount()
    # the kernel reads it too; it ignores user.overlay.redirect (userxattr forces
    # redirect_dir=nofollow), so the renamed directory shows only its upper part there
    # The kernel reads it too (under userxattr), except the renamed directory: it refuses
    # to follow user.overlay.redirect (userxattr forces redirect_dir=nofollow: EPERM).
    k = kernel_mount(layers.paths, upper, work, extra_options=("userxattr", "redirect_dir=nofollow"))
    assert sorted(os.listdir(k)) == ["img", "keep", "link"]
    # img is marked impure (copy-ups in it, ``impure.py``): the kernel's listing of it looks
    # every name up, and leaves out the one whose lookup fails (without the mark it listed
    # "moved", whose lookup then failed as here)
    assert sorted(os.listdir(k / "img")) == ["tree"]
    with pytest.raises(PermissionError):
        os.listdir(k / "img/moved")
    ours = out["snapshot"]
    for sub in ("img/tree", "keep", "link"):
        ksnap = helpers.tree_snapshot(k / sub, ignore_vanished=True)
        for key, b in ksnap.items():
            a = ours[sub if key == "." else f"{sub}/{key}"]
            assert (a.type, a.mode, a.size, a.content, a.target) == \
                (b.type, b.mode, b.size, b.content, b.target), (sub, key)


def test_user_namespace_without_mknod_writes_wh_files(tmp_path, layers_factory, overlay_mount):
    """Where 0/0 devices cannot be made (old kernels, some filesystems: injected here, as
    this kernel allows them in user namespaces), deletions are ``.wh.NAME`` files, as
    fuse-overlayfs writes them, and read back, by a root mount too."""
    _require_userns()
    layers = layers_factory({"low": IMAGE})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    opts = f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}"
    fault = {"OVERLAYPC_FAULTS": "whiteout.mknod=eperm"}
    out = _session(tmp_path, layers, opts, STEPS + ["mkdir img/file && touch img/file/inside"], fault)
    snap0 = dict(out["snapshot"])
    assert snap0.pop("img/file").type == "dir" and snap0.pop("img/file/inside").size == 0
    _check_view(snap0)
    assert _chardevs(upper) == []
    wh = sorted(os.path.relpath(os.path.join(d, n), upper) for d, _, files in os.walk(upper)
                for n in files if n.startswith(".wh."))
    # img/file came back as a directory: its marker went; img/tree's contents went with
    # the old upper dir
    assert wh == ["img/.wh.dir"], wh
    assert os.getxattr(upper / "img/file", "user.overlay.opaque") == b"y"
    # root reads it back, and recreating a name deleted by a marker removes the marker
    m = overlay_mount(opts + ",userxattr", env=fault)
    snap = helpers.tree_snapshot(m.path)
    assert snap == out["snapshot"], helpers.diff_snapshots(out["snapshot"], snap, ("userns", "root"))
    os.mkdir(m / "img/dir")
    assert os.listdir(m / "img/dir") == []  # the lower img/dir stays hidden: opaque
    assert not (upper / "img/.wh.dir").exists()
    os.rename(m / "img/moved", m / "img/dir2")  # moves again, with its redirect
    assert sorted(os.listdir(m / "img")) == ["dir", "dir2", "file", "tree"]
    assert sorted(os.listdir(m / "img/dir2")) == ["a", "b", "sub"]
    os.rename(m / "keep", m / "kept")  # the copy of a lower file moves: marker at the old name
    assert (upper / ".wh.keep").is_file() and not (upper / "keep").exists()
    assert "keep" not in os.listdir(m.path) and (m / "kept").read_text() == "keep\nmore\n"
    (m / "keep").write_text("back\n")
    assert (m / "keep").read_text() == "back\n" and not (upper / ".wh.keep").exists()
    os.unlink(m / "keep")  # an upper file over a lower one: marker first, then the unlink
    assert (upper / ".wh.keep").is_file() and not (upper / "keep").exists()
    shutil.rmtree(m / "img/dir2/sub")
    assert (upper / "img/dir2/.wh.sub").is_file() and sorted(os.listdir(m / "img/dir2")) == ["a", "b"]
    assert sorted(os.listdir(m.path)) == ["img", "kept", "link"]
    assert _chardevs(upper) == []


# --------------------------------------------------------------------------------------
# A plain user, through fusermount3
# --------------------------------------------------------------------------------------

def _fuse_conf_allows_other() -> bool:
    from overlaypc.mounting import user_allow_other
    return user_allow_other()


def test_mount_mode_follows_fuse_conf(tmp_path):
    from overlaypc.mounting import mount_mode
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    assert mount_mode(0, str(conf)) == {"allow_other": True}
    assert mount_mode(1000, str(conf)) == {"auto_unmount": True}
    conf.write_text("user_allow_other\n")
    assert mount_mode(1000, str(conf)) == {"auto_unmount": True, "allow_other": True}
    assert mount_mode(1000, str(tmp_path / "missing")) == {"auto_unmount": True}


@pytest.fixture
def nobody_setup():
    helpers.require_fuse_mount()
    helpers.require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    helpers.require(os.stat("/dev/fuse").st_mode & 0o006 == 0o006,
                    "needs /dev/fuse usable by every user (mode 0666, as Debian makes it; "
                    "scripts/bootstrap.sh sets it)")
    py = rs.user_python(rs.NOBODY, rs.NOBODY)
    helpers.require(py is not None, "no Python interpreter that uid 65534 can run overlaypc with")
    with rs.shared_dir(rs.NOBODY, rs.NOBODY) as root:
        helpers.build_layer(root / "low", IMAGE)
        for name in ("upper", "work", "mnt"):
            (root / name).mkdir()
        rs.make_tree(root, rs.NOBODY, rs.NOBODY)
        yield root, py


def _mount_as_nobody(root: Path, py, extra: str = "") -> subprocess.CompletedProcess:
    python, env = py
    opts = f"lowerdir={root}/low,upperdir={root}/upper,workdir={root}/work,logfile={root}/log"
    opts += "," + extra if extra else ""
    return subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + [python, "-m", "overlaypc", "-o", opts,
                                                              str(root / "mnt")],
                          env=env, cwd=str(root), capture_output=True, text=True, timeout=60)


def _snapshot_as_nobody(py, mnt: Path) -> dict:
    """``tree_snapshot`` of a mount only its owner may read."""
    python, env = py
    code = ("import pickle, sys; sys.path.insert(0, sys.argv[1]); import helpers; "
            "sys.stdout.buffer.write(pickle.dumps(helpers.tree_snapshot(sys.argv[2], xattrs=False)))")
    r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + [python, "-c", code, str(rs.TESTS_DIR), str(mnt)],
                       env=env, cwd="/", capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    return pickle.loads(r.stdout)


def _daemon_pid(root: Path) -> int:
    """The daemon (fusermount3's watcher is root's; our watcher, once it has exec'ed, no
    longer shows the mountpoint in its argv)."""
    def ours() -> list[int]:
        return [p for p in helpers.pids_with_arg(root / "mnt") if helpers.pid_alive(p)
                and os.stat(f"/proc/{p}").st_uid == rs.NOBODY]
    helpers.wait_until(lambda: len(ours()) == 1, 5)
    pids = ours()
    assert len(pids) == 1, pids
    return pids[0]


def test_plain_user_mounts_through_fusermount3(nobody_setup):
    """Before: the mount wrote trusted.* xattrs it may not set (EPERM on ``mkdir`` after
    ``rm -rf``, on renaming an image directory)."""
    root, py = nobody_setup
    mnt = root / "mnt"
    r = _mount_as_nobody(root, py)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        entry = helpers.mounts_at(mnt)[-1]
        assert entry.fstype == helpers.FSTYPE
        assert "user_id=65534" in entry.super_options
        assert ("allow_other" in entry.super_options) == _fuse_conf_allows_other()
        pid = _daemon_pid(root)
        steps = " && ".join([f"cd {mnt}"] + STEPS)
        r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["sh", "-c", steps], cwd="/",
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        _check_view(_snapshot_as_nobody(py, mnt))
        if not _fuse_conf_allows_other():
            with pytest.raises(PermissionError):
                os.listdir(mnt)  # not even root may look in
        assert os.getxattr(root / "upper/img/tree", "user.overlay.opaque") == b"y"
        # the owner unmounts it with fusermount3 -u, and the daemon exits
        r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["fusermount3", "-u", str(mnt)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not helpers.is_mounted(mnt)
        assert helpers.wait_until(lambda: not helpers.pid_alive(pid), helpers.EXIT_TIMEOUT)
    finally:
        helpers.force_unmount(mnt)
    log = (root / "log").read_text()
    assert not helpers.unexpected_log_lines(log), log
    assert "writing user.overlay.* xattrs" in log


def test_plain_user_killed_daemon_leaves_no_mount(nobody_setup):
    """libfuse's auto_unmount watcher checks for ENOTCONN by opening the mountpoint as
    root, which the kernel refuses (EACCES) on a mount without allow_other: a killed
    daemon left a dead mount ('Transport endpoint is not connected')."""
    root, py = nobody_setup
    mnt = root / "mnt"
    r = _mount_as_nobody(root, py)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        pid = _daemon_pid(root)
        assert subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["cat", str(mnt / "keep")],
                              capture_output=True, text=True).stdout == "keep\n"
        os.kill(pid, signal.SIGKILL)
        assert helpers.wait_until(lambda: not helpers.is_mounted(mnt), 10), \
            f"{mnt} still mounted after its daemon was killed"
        # and the same user mounts it again
        r = _mount_as_nobody(root, py)
        assert r.returncode == 0, r.stdout + r.stderr
        assert helpers.is_mounted(mnt)
    finally:
        subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["fusermount3", "-u", str(mnt)],
                       capture_output=True)
        helpers.force_unmount(mnt)


@pytest.mark.parametrize("mode", [0o300, 0o333], ids=oct)
def test_plain_user_volatile_copy_up_into_an_unreadable_upper_directory(nobody_setup, mode):
    """A copy-up keeps its parent's times; through a cached parent it sets them through a
    readable fd of it (``Layer.readable_dir``, copyup49), which a plain user's daemon may
    not open on an upper directory of its own without read permission (mode 0300). With
    ``volatile`` (no fsync of the parent, which needs that fd) the times are set by name
    there, as before copyup49: the copy-up succeeds and the times stay."""
    root, py = nobody_setup
    mnt, upper_dir = root / "mnt", root / "upper/img/dir"
    upper_dir.parent.mkdir()
    upper_dir.mkdir()
    rs.make_tree(root / "upper", rs.NOBODY, rs.NOBODY)
    os.chmod(upper_dir, mode)
    os.utime(upper_dir, ns=(1_000_000_000_000_000_000, 1_100_000_000_000_000_000))
    r = _mount_as_nobody(root, py, "volatile")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        # the first copy-up into it caches its fds, the second uses them
        for name in ("a", "b"):
            r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY)
                               + ["sh", "-c", f"echo more >> {mnt}/img/dir/{name}"],
                               cwd="/", capture_output=True, text=True)
            assert r.returncode == 0, (r.stderr, sorted(os.listdir(upper_dir)),
                                       (root / "log").read_text()[-3000:])
            assert (upper_dir / name).read_text() == f"{name}more\n"
            st = os.stat(upper_dir)
            assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_000_000_000,
                                                        1_100_000_000_000_000_000), name
    finally:
        subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["fusermount3", "-u", str(mnt)],
                       capture_output=True)
        helpers.force_unmount(mnt)
    log = (root / "log").read_text()
    assert not helpers.unexpected_log_lines(log), log


T_PARENT = 1_100_000_000_000_000_000


def test_plain_user_copy_up_into_an_unreadable_upper_directory_is_made_durable(nobody_setup):
    """Without ``volatile`` a copy-up fsyncs its parent, which needs a readable fd that a
    plain user's daemon may not open on an upper directory of its own of mode 0300: EACCES
    reached the caller after the copy took its name (review50a; the kernel overlay fsyncs
    nothing there). ``Layer.fsync_dir`` makes it durable by ``sync`` instead: the chmod (a
    copy-up's one pass) and an append (a data copy-up) succeed, the parent's times kept."""
    root, py = nobody_setup
    mnt, upper_dir = root / "mnt", root / "upper/img/dir"
    upper_dir.parent.mkdir()
    upper_dir.mkdir()
    rs.make_tree(root / "upper", rs.NOBODY, rs.NOBODY)
    os.chmod(upper_dir, 0o300)
    os.utime(upper_dir, ns=(1_000_000_000_000_000_000, T_PARENT))
    lower_mode = stat.S_IMODE(os.stat(root / "low/img/dir/a").st_mode)
    assert lower_mode != 0o600
    r = _mount_as_nobody(root, py)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["chmod", "600", f"{mnt}/img/dir/a"],
                           cwd="/", capture_output=True, text=True)
        assert (r.returncode, r.stderr) == (0, "")
        assert oct(stat.S_IMODE(os.stat(upper_dir / "a").st_mode)) == oct(0o600)
        r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY)
                           + ["sh", "-c", f"echo more >> {mnt}/img/dir/b"],
                           cwd="/", capture_output=True, text=True)
        assert (r.returncode, r.stderr) == (0, "")
        assert (upper_dir / "b").read_text() == "bmore\n"
        assert os.stat(upper_dir).st_mtime_ns == T_PARENT
    finally:
        subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["fusermount3", "-u", str(mnt)],
                       capture_output=True)
        helpers.force_unmount(mnt)
    log = (root / "log").read_text()
    assert not helpers.unexpected_log_lines(log), log


def _kernel_copy_up_as_nobody(root: Path, upper: Path, work: Path, mnt: Path) -> tuple:
    """The kernel overlay mounted by uid 65534 in a user namespace of its own (where it
    is root, and root's files are nobody's), then ``echo more >> img/dir/a`` in it: the
    shell's status, the file's content, the parent's mtime in the upper."""
    script = (f"mount -t overlay overlay -o userxattr,lowerdir={root}/low,upperdir={upper},"
              f"workdir={work} {mnt} || exit 99; echo more >> {mnt}/img/dir/a; echo $?; "
              f"cat {mnt}/img/dir/a")
    r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["unshare", "-Urm", "sh", "-c", script],
                       cwd="/", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    status, content = r.stdout.split("\n", 1)
    return int(status), content, os.stat(upper / "img/dir").st_mtime_ns != T_PARENT


def test_plain_user_copy_up_into_an_upper_directory_of_another_user_as_the_kernel(nobody_setup):
    """The kernel sets a copy-up's parent's times back as best effort
    (``ovl_set_timestamps``' error ignored). An upper directory owned by root, mode 0777,
    whose times a plain user may not set (EPERM): the kernel overlay mounted by that user
    (in a user namespace) copies up into it and leaves its mtime moved; so does
    overlaypc (before: EPERM to the caller, the copy already in place)."""
    helpers.require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    root, py = nobody_setup
    got = {}
    for side in ("kernel", "ours"):
        upper, work, mnt = ((root / "upper", root / "work", root / "mnt") if side == "ours" else
                            (root / "kupper", root / "kwork", root / "kmnt"))
        for d in (upper, work, mnt):
            d.mkdir(exist_ok=True)
            os.chown(d, rs.NOBODY, rs.NOBODY)
        (upper / "img").mkdir()
        os.chown(upper / "img", rs.NOBODY, rs.NOBODY)
        (upper / "img/dir").mkdir(mode=0o777)
        os.chmod(upper / "img/dir", 0o777)  # (root's, as mkdir made it)
        os.utime(upper / "img/dir", ns=(T_PARENT, T_PARENT))
        if side == "kernel":
            got[side] = _kernel_copy_up_as_nobody(root, upper, work, mnt)
            continue
        r = _mount_as_nobody(root, py)
        assert r.returncode == 0, r.stdout + r.stderr
        try:
            r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY)
                               + ["sh", "-c", f"echo more >> {mnt}/img/dir/a; echo $?; "
                                              f"cat {mnt}/img/dir/a"],
                               cwd="/", capture_output=True, text=True)
            status, content = r.stdout.split("\n", 1)
            got[side] = (int(status), content, os.stat(upper / "img/dir").st_mtime_ns != T_PARENT)
        finally:
            subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["fusermount3", "-u", str(mnt)],
                           capture_output=True)
            helpers.force_unmount(mnt)
    assert got["kernel"] == (0, "amore\n", True)
    assert got["ours"] == got["kernel"]
    log = (root / "log").read_text()
    assert not helpers.unexpected_log_lines(log), log


# --------------------------------------------------------------------------------------
# What fuse-overlayfs writes in rootless mode
# --------------------------------------------------------------------------------------

FOO_LOWER = {
    "d/a": "a", "d/b": "b", "e/x": "x", "o/old": "old", "p/old": "old", "q/old": "old",
    "gone": "gone", "f": "lower f", "dir/in": "in",
}


def _foo_upper(upper: Path, lower: Path) -> None:
    """An upper as fuse-overlayfs 1.10 leaves it where it may neither mknod 0/0 nor set
    trusted.* xattrs: ``.wh.NAME`` files, user.fuseoverlayfs.opaque with a .wh..wh..opq
    file, user.fuseoverlayfs.origin naming the lower path a copy came from."""
    (upper / ".wh.gone").write_bytes(b"")
    (upper / "d").mkdir()
    (upper / "d/.wh.a").write_bytes(b"")
    for name, xattr, marker in (("o", True, True), ("p", False, True), ("q", True, False)):
        (upper / name).mkdir()
        (upper / name / "new").write_text("new")
        if xattr:
            os.setxattr(upper / name, "user.fuseoverlayfs.opaque", b"y")
        if marker:
            (upper / name / ".wh..wh..opq").write_bytes(b"")
    (upper / "f").write_text("upper f")
    os.setxattr(upper / "f", "user.fuseoverlayfs.origin", b"f\0")
    (upper / "moved").write_text("x")  # "mv e/x moved": copy-up then rename
    os.setxattr(upper / "moved", "user.fuseoverlayfs.origin", b"e/x\0")
    (upper / "e").mkdir()
    (upper / "e/.wh.x").write_bytes(b"")


def test_fuse_overlayfs_rootless_markers(tmp_path, layers_factory, overlay_mount, mountpoint):
    """Before: ``.wh.NAME`` and ``.wh..wh..opq`` counted only in lower layers and
    user.fuseoverlayfs.* were neither read nor hidden."""
    helpers.require(shutil.which("fuse-overlayfs") is not None, "needs fuse-overlayfs (the oracle)")
    layers = layers_factory({"low": FOO_LOWER})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    _foo_upper(upper, layers["low"])
    # the oracle: fuse-overlayfs itself, read-only on copies of the same layers
    ref = tmp_path / "ref"
    ref.mkdir()
    for name, src in (("low", layers["low"]), ("upper", upper)):
        subprocess.run(["cp", "-a", str(src), str(ref / name)], check=True)
    fmnt = mountpoint("foo")
    subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={ref}/upper:{ref}/low", str(fmnt)], check=True)
    try:
        expected = helpers.tree_snapshot(fmnt, xattrs=False)
    finally:
        helpers.force_unmount(fmnt)
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}")
    got = helpers.tree_snapshot(m.path, xattrs=False)
    assert got == expected, helpers.diff_snapshots(expected, got, ("fuse-overlayfs", "overlaypc"))
    assert sorted(os.listdir(m.path)) == ["d", "dir", "e", "f", "moved", "o", "p", "q"]
    for name in ("o", "p", "q"):
        assert os.listdir(m / name) == ["new"], name
    assert os.listdir(m / "d") == ["b"] and os.listdir(m / "e") == []
    assert os.listxattr(m / "f") == [] and os.listxattr(m / "o") == []  # hidden like ours
    # a copy names its origin by path: it shows the origin's inode number
    assert os.stat(m / "f").st_ino == os.stat(layers["low"] / "f").st_ino
    assert os.stat(m / "moved").st_ino == os.stat(layers["low"] / "e/x").st_ino
    # writing over the markers: the name comes back, the marker goes (this mount makes
    # devices: a new whiteout is the kernel's)
    (m / "gone").write_text("again")
    assert (m / "gone").read_text() == "again" and not (upper / ".wh.gone").exists()
    os.mkdir(m / "d/a")
    assert os.listdir(m / "d/a") == [] and not (upper / "d/.wh.a").exists()
    os.rename(m / "dir", m / "e/x")  # a lower dir onto a name deleted by a marker
    assert os.listdir(m / "e/x") == ["in"] and not (upper / "e/.wh.x").exists()
    assert "dir" not in os.listdir(m.path)
    os.unlink(m / "d/b")
    assert os.listdir(m / "d") == ["a"]
