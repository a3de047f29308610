"""The merged view of a mounted overlaypc: layering, whiteouts, opaque dirs, symlinks,
xattrs, read-only mounts, inode numbers, and the ways to start and stop the daemon."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from helpers import OCI_WHITEOUT, WHITEOUT, Dir, File, Symlink

pytestmark = pytest.mark.mount

# A 3-layer stack, top first, exercising overrides and both deletion formats.
THREE_LAYERS = {
    "top": {
        "a.txt": File("top a", mode=0o600),
        "only_top.txt": "only top",
        "dir1/t.txt": "top t",
        "dir1/gone_sub": WHITEOUT,                 # kernel whiteout inside a merged dir
        "gone_k": WHITEOUT,                        # kernel whiteout of a file in mid and bot
        "gone_oci": OCI_WHITEOUT,                  # OCI whiteout of a file in mid and bot
        "gone_dir": OCI_WHITEOUT,                  # OCI whiteout of a whole directory
        "gone_dir_k": WHITEOUT,                    # kernel whiteout of a whole directory
        "never_existed": WHITEOUT,                 # whiteout with nothing beneath
        "readded.txt": "readded by top",           # bot has it, mid whites it out
        "opq_k": Dir({"new.txt": "top new"}, opaque="trusted"),
        "opq_oci": Dir({"new.txt": "top new"}, opaque="oci"),
        "mo/t.txt": "top in mo",                   # mid's mo is opaque: hides bot only
    },
    "mid": {
        "a.txt": "mid a",
        "b.txt": "mid b",
        "gone_k": "mid gone_k",
        "gone_oci": "mid gone_oci",
        "dir1/m.txt": "mid m",
        "dir1/gone_sub": "mid gone_sub",
        "opq_k/old.txt": "mid old",
        "opq_oci/old.txt": "mid old",
        "readded.txt": WHITEOUT,
        "df": "file over a dir",                   # replaces bot's directory df/
        "fd": {"child.txt": "mid child"},          # replaces bot's file fd
        "mo": Dir({"m.txt": "mid in mo"}, opaque="trusted"),
        "gone_dir": {"inner.txt": "x"},
        "gone_dir_k": {"inner.txt": "x"},
    },
    "bot": {
        "a.txt": "bot a",
        "b.txt": "bot b",
        "c.txt": File("bot c", mode=0o755),
        "gone_k": "bot gone_k",
        "gone_oci": "bot gone_oci",
        "dir1/b.txt": "bot b in dir1",
        "dir1/gone_sub": "bot gone_sub",
        "opq_k/old2.txt": "bot old2",
        "opq_oci/old2.txt": "bot old2",
        "readded.txt": "bot readded",
        "df": {"hidden.txt": "hidden"},
        "fd": "file under a dir",
        "mo/b.txt": "bot in mo",
        "gone_dir/other.txt": "y",
        "deep/x/y/z.txt": "deep",
    },
}

EXPECTED_FILES = {
    "a.txt": b"top a", "only_top.txt": b"only top", "b.txt": b"mid b", "c.txt": b"bot c",
    "dir1/t.txt": b"top t", "dir1/m.txt": b"mid m", "dir1/b.txt": b"bot b in dir1",
    "readded.txt": b"readded by top",
    "opq_k/new.txt": b"top new", "opq_oci/new.txt": b"top new",
    "mo/t.txt": b"top in mo", "mo/m.txt": b"mid in mo",
    "df": b"file over a dir", "fd/child.txt": b"mid child", "deep/x/y/z.txt": b"deep",
}
EXPECTED_DIRS = {"dir1", "opq_k", "opq_oci", "mo", "fd", "deep", "deep/x", "deep/x/y"}


def files_and_dirs(snap: dict) -> tuple[dict, set]:
    files = {k: e.content for k, e in snap.items() if e.type == "file"}
    dirs = {k for k, e in snap.items() if e.type == "dir" and k != "."}
    return files, dirs


def assert_no_whiteout_names(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        names = os.listdir(dirpath)
        assert len(names) == len(set(names)), f"duplicate names in {dirpath}: {sorted(names)}"
        for n in names:
            assert not n.startswith(".wh."), f"whiteout name listed: {dirpath}/{n}"
            st = os.lstat(os.path.join(dirpath, n))
            assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), \
                f"kernel whiteout listed: {dirpath}/{n}"


def expect_errno(code: int, fn, *args, **kwargs) -> None:
    with pytest.raises(OSError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == code, \
        f"{fn.__name__}{args}: expected {errno.errorcode[code]}, got {ei.value!r}"


# --- merged listing ------------------------------------------------------------------------

def test_three_layer_merge(layers_factory, overlay_mount):
    layers = layers_factory(THREE_LAYERS)
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    snap = helpers.tree_snapshot(m.path)
    files, dirs = files_and_dirs(snap)
    assert files == EXPECTED_FILES
    assert dirs == EXPECTED_DIRS
    assert set(snap) - {"."} == set(EXPECTED_FILES) | EXPECTED_DIRS, "unexpected entry types"
    assert snap["a.txt"].mode == 0o600, "the top layer's mode wins"
    assert snap["c.txt"].mode == 0o755
    assert_no_whiteout_names(m.path)


def test_mount_type_is_fuse_overlaypc(layers_factory, overlay_mount):
    layers = layers_factory({"l": {"f": "x"}})
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    entry = m.mount_entry()
    assert entry is not None and entry.fstype == helpers.FSTYPE, entry


def test_whiteouts_are_not_reachable_by_name(layers_factory, overlay_mount):
    layers = layers_factory(THREE_LAYERS)
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    for gone in ("gone_k", "gone_oci", "gone_dir", "gone_dir_k", "never_existed",
                 "dir1/gone_sub", "opq_k/old.txt", "opq_k/old2.txt", "opq_oci/old.txt",
                 "opq_oci/old2.txt", "mo/b.txt", ".wh.gone_oci", ".wh.gone_dir",
                 "opq_oci/.wh..wh..opq", "gone_dir/inner.txt"):
        expect_errno(errno.ENOENT, os.lstat, m / gone)
    expect_errno(errno.ENOTDIR, os.lstat, m / "df" / "hidden.txt")


@pytest.mark.parametrize("form", ["trusted", "oci"])
def test_opaque_dir_in_middle_layer(layers_factory, overlay_mount, form):
    layers = layers_factory({
        "top": {"d/t": "t"},
        "mid": {"d": Dir({"m": "m"}, opaque=form)},
        "bot": {"d/b": "b", "d/sub/x": "x"},
    })
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    assert sorted(os.listdir(m / "d")) == ["m", "t"]
    assert_no_whiteout_names(m.path)


def test_userxattr_opaque(layers_factory, overlay_mount):
    layers = layers_factory({
        "top": {"d": Dir({"new": "n"}, opaque="user")},
        "bot": {"d/old": "o", "keep": "k"},
    })
    m = overlay_mount(f"lowerdir={layers.lowerdir},userxattr")
    assert sorted(os.listdir(m / "d")) == ["new"]
    assert sorted(os.listdir(m.path)) == ["d", "keep"]
    assert not any(n.startswith(("user.overlay.", "trusted.overlay."))
                   for n in os.listxattr(m / "d")), os.listxattr(m / "d")


def test_readdir_inodes_and_types_match_lstat(layers_factory, overlay_mount):
    layers = layers_factory(THREE_LAYERS)
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    for dirpath, _dirs, _files in os.walk(m.path):
        with os.scandir(dirpath) as it:
            for e in it:
                st = os.lstat(e.path)
                assert e.inode() == st.st_ino, f"d_ino != st_ino for {e.path}"
                assert e.is_dir(follow_symlinks=False) == stat.S_ISDIR(st.st_mode), e.path
                assert e.is_symlink() == stat.S_ISLNK(st.st_mode), e.path


def test_dot_entries_carry_real_inode_numbers(layers_factory, overlay_mount):
    """Issue 13.9: ``.`` and ``..`` went out with d_ino 0, which glibc's readdir drops, so
    ``ls -a`` never showed them. They carry the directory's and its parent's st_ino."""
    layers = layers_factory(THREE_LAYERS)
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    for rel, parent in (("", None), ("dir1", ""), ("fd", ""), ("mo", "")):
        out = subprocess.run(["ls", "-ai1", str(m / rel)], capture_output=True, text=True,
                             check=True).stdout.split("\n")
        inos = {name: int(ino) for ino, name in (line.split(None, 1) for line in out if line)}
        assert inos["."] == os.stat(m / rel).st_ino, out
        if parent is not None:  # ls shows the mount point's own parent for the root's ..
            assert inos[".."] == os.stat(m / parent).st_ino, out


def test_log_file_is_not_world_writable(layers_factory, overlay_mount, tmp_path):
    """Issue 13.5: the daemon cleared its umask before creating the log file (0666)."""
    layers = layers_factory(RO_SPEC)
    logfile = tmp_path / "daemon.log"
    overlay_mount(f"lowerdir={layers.lowerdir},logfile={logfile}").unmount()
    assert logfile.exists()
    assert stat.S_IMODE(os.stat(logfile).st_mode) & 0o022 == 0, oct(os.stat(logfile).st_mode)


def test_log_file_has_the_mount_and_unmount_lines(layers_factory, overlay_mount, tmp_path):
    """A log file gets "mounted" (written once the first request is answered, when
    ``logging`` is loaded: overlaypc.logs) and "unmounting", and nothing else."""
    layers = layers_factory(RO_SPEC)
    logfile = tmp_path / "daemon.log"
    m = overlay_mount(f"lowerdir={layers.lowerdir},logfile={logfile}")
    os.stat(m.path)
    m.unmount()
    lines = [line.split(" ", 2)[2] for line in logfile.read_text().splitlines()]
    assert lines == [f"INFO overlaypc.fuse: mounted {m.path}",
                     f"INFO overlaypc.fuse: unmounting {m.path}"], logfile.read_text()


# --- symlinks ------------------------------------------------------------------------------

def test_symlinks_are_shown_not_followed(layers_factory, overlay_mount, tmp_path):
    outside = helpers.build_layer(tmp_path / "outside", {"secret.txt": "secret"})
    layers = layers_factory({
        "top": {
            "rel": Symlink("target.txt"),
            "abs": Symlink("/etc/passwd"),
            "up": Symlink("../../.."),
            "dangling": Symlink("/nonexistent/overlaypc-test"),
            "escape": {"inner.txt": "top inner"},     # a dir over a symlink in bot
            "etc": {"mine": "mine"},                  # a dir over a symlink to /etc
        },
        "bot": {
            "target.txt": "target",
            "escape": Symlink(str(tmp_path / "outside")),
            "etc": Symlink("/etc"),
            "linkdir": Symlink(str(tmp_path / "outside")),
        },
    })
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    for name, target in (("rel", "target.txt"), ("abs", "/etc/passwd"), ("up", "../../.."),
                         ("dangling", "/nonexistent/overlaypc-test"),
                         ("linkdir", str(tmp_path / "outside"))):
        st = os.lstat(m / name)
        assert stat.S_ISLNK(st.st_mode), f"{name} is not shown as a symlink: {st}"
        assert os.readlink(m / name) == target
        assert st.st_size == len(target.encode()), f"{name}: size of the link text"
    assert (m / "rel").read_text() == "target"
    # A directory over a lower symlink is not merged with what the symlink points to.
    assert sorted(os.listdir(m / "escape")) == ["inner.txt"]
    assert sorted(os.listdir(m / "etc")) == ["mine"]
    expect_errno(errno.ENOENT, os.lstat, m / "escape" / "secret.txt")
    expect_errno(errno.ENOENT, os.lstat, m / "etc" / "passwd")
    assert (outside / "secret.txt").read_text() == "secret"


# --- xattrs --------------------------------------------------------------------------------

def test_private_xattrs_hidden_user_xattrs_visible(layers_factory, overlay_mount):
    layers = layers_factory({
        "top": {
            "f": File("f", xattrs={"user.visible": b"1", "trusted.overlay.origin": b"junk",
                                   "user.overlay.foo": b"bar", "trusted.overlay.zzz": b"y"}),
            "d": Dir({"x": "x"}, opaque="trusted", xattrs={"user.dirattr": b"d"}),
        },
        "bot": {"d/y": "y"},
    })
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    for path, visible in ((m / "f", {"user.visible": b"1"}), (m / "d", {"user.dirattr": b"d"})):
        names = os.listxattr(path)
        assert not [n for n in names if n.startswith(helpers.PRIVATE_XATTR_PREFIXES)], names
        for k, v in visible.items():
            assert k in names
            assert os.getxattr(path, k) == v
    for name in ("trusted.overlay.origin", "user.overlay.foo", "trusted.overlay.zzz"):
        with pytest.raises(OSError) as ei:
            os.getxattr(m / "f", name)
        assert ei.value.errno in (errno.ENODATA, errno.EOPNOTSUPP), (name, ei.value)
    with pytest.raises(OSError) as ei:
        os.getxattr(m / "d", "trusted.overlay.opaque")
    assert ei.value.errno in (errno.ENODATA, errno.EOPNOTSUPP), ei.value


# --- read-only mounts ------------------------------------------------------------------------

def assert_all_writes_erofs(root: Path) -> None:
    """Every kind of change through the mount gives EROFS."""
    e = errno.EROFS
    expect_errno(e, os.open, root / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    expect_errno(e, os.open, root / "f.txt", os.O_WRONLY)
    expect_errno(e, os.open, root / "f.txt", os.O_RDWR)
    expect_errno(e, os.open, root / "f.txt", os.O_WRONLY | os.O_TRUNC)
    expect_errno(e, os.truncate, root / "f.txt", 0)
    expect_errno(e, os.mkdir, root / "newdir")
    expect_errno(e, os.rmdir, root / "empty")
    expect_errno(e, os.unlink, root / "f.txt")
    expect_errno(e, os.rename, root / "f.txt", root / "g.txt")
    expect_errno(e, os.symlink, "f.txt", root / "sym")
    expect_errno(e, os.link, root / "f.txt", root / "hard")
    expect_errno(e, os.chmod, root / "f.txt", 0o600)
    expect_errno(e, os.chown, root / "f.txt", 1, 1)
    expect_errno(e, os.utime, root / "f.txt", (1, 1))
    expect_errno(e, os.setxattr, root / "f.txt", "user.x", b"1")
    expect_errno(e, os.mknod, root / "fifo", stat.S_IFIFO | 0o644)
    assert (root / "f.txt").read_text() == "content"


RO_SPEC = {"top": {"f.txt": File("content", xattrs={"user.x": b"0"}), "d/x": "x", "empty": {}},
           "bot": {"b.txt": "b"}}


def test_lowers_only_mount_is_read_only(layers_factory, overlay_mount):
    layers = layers_factory(RO_SPEC)
    before = [helpers.dir_state(p) for p in layers.paths]
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    assert_all_writes_erofs(m.path)
    m.unmount()
    assert [helpers.dir_state(p) for p in layers.paths] == before


def test_ro_option_with_upper_is_read_only(layers_factory, overlay_mount, tmp_path):
    layers = layers_factory(RO_SPEC)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work},ro")
    before_upper = helpers.dir_state(upper)
    assert_all_writes_erofs(m.path)
    assert helpers.dir_state(upper) == before_upper
    assert helpers.is_mounted(m.path)
    m.unmount()
    assert helpers.dir_state(upper) == before_upper


def test_statfs(layers_factory, overlay_mount):
    layers = layers_factory(RO_SPEC)
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    st = os.statvfs(m.path)
    assert st.f_bsize > 0 and st.f_blocks > 0
    assert 0 < st.f_namemax <= 255


def test_long_names_give_enametoolong(layers_factory, overlay_mount, tmp_path):
    layers = layers_factory(RO_SPEC)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    for opts in (f"lowerdir={layers.lowerdir}",
                 f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}"):
        m = overlay_mount(opts)
        expect_errno(errno.ENOENT, os.lstat, m / ("n" * 255))
        for name in ("n" * 256, "é" * 128, "n" * 1000):
            expect_errno(errno.ENAMETOOLONG, os.lstat, m / name)
            expect_errno(errno.ENAMETOOLONG, os.lstat, m / "d" / name)
            expect_errno(errno.ENAMETOOLONG, os.open, m / name, os.O_RDONLY)
        if "upperdir" in opts:
            expect_errno(errno.ENAMETOOLONG, os.open, m / ("n" * 256),
                         os.O_WRONLY | os.O_CREAT, 0o644)
            expect_errno(errno.ENAMETOOLONG, os.mkdir, m / ("n" * 256))
        m.unmount()
    assert os.listdir(upper) == []


# --- inode numbers ---------------------------------------------------------------------------

def inode_map(root: Path) -> dict[str, tuple[int, int]]:
    out = {".": (os.lstat(root).st_ino, os.lstat(root).st_dev)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_ino, st.st_dev)
    return out


def assert_inodes_unique_one_dev(inodes: dict[str, tuple[int, int]]) -> None:
    devs = {dev for _ino, dev in inodes.values()}
    assert len(devs) == 1, f"more than one st_dev in one mount: {devs}"
    by_ino: dict[int, list[str]] = {}
    for path, (ino, _dev) in inodes.items():
        by_ino.setdefault(ino, []).append(path)
    clashes = {ino: paths for ino, paths in by_ino.items() if len(paths) > 1}
    assert not clashes, f"distinct files share st_ino: {clashes}"


def test_st_ino_stable_across_remount(layers_factory, overlay_mount, mountpoint):
    layers = layers_factory(THREE_LAYERS)
    mnt = mountpoint()
    m = overlay_mount(f"lowerdir={layers.lowerdir}", mnt=mnt)
    first = inode_map(m.path)
    assert_inodes_unique_one_dev(first)
    m.unmount()
    m2 = overlay_mount(f"lowerdir={layers.lowerdir}", mnt=mnt)
    second = inode_map(m2.path)
    assert {k: v[0] for k, v in second.items()} == {k: v[0] for k, v in first.items()}


def _many_files(tag: str, n: int = 12) -> dict:
    spec: dict = {f"{tag}_f{i}": f"{tag} {i}" for i in range(n)}
    spec[f"{tag}_dir"] = {f"{tag}_sub{i}": "s" for i in range(4)}
    spec["shared_dir"] = {f"{tag}_in_shared": tag}
    return spec


def test_st_ino_unique_across_filesystems(layers_factory, overlay_mount, tmpfs_factory,
                                          xfs_dir, tmp_path, mountpoint):
    # Two fresh tmpfs mounts number their inodes identically: a pass-through st_ino collides.
    t1, t2 = tmpfs_factory(), tmpfs_factory()
    where = {"tmpfs1": t1, "tmpfs2": t2, "xfs": xfs_dir, "ext": tmp_path / "extlayers"}
    layers = layers_factory({name: _many_files(name) for name in where}, where=where)
    real = [os.lstat(p / f"{n}_f0").st_ino for n, p in layers.dirs.items()]
    mnt = mountpoint()
    m = overlay_mount(f"lowerdir={layers.lowerdir}", mnt=mnt)
    first = inode_map(m.path)
    assert len(first) == 1 + 4 * (12 + 1 + 4 + 1) + 1, sorted(first)
    assert_inodes_unique_one_dev(first)
    m.unmount()
    m2 = overlay_mount(f"lowerdir={layers.lowerdir}", mnt=mnt)
    assert {k: v[0] for k, v in inode_map(m2.path).items()} == \
        {k: v[0] for k, v in first.items()}, f"not stable across remount (real inos {real})"


# --- ways to start and stop -----------------------------------------------------------------

GENERIC_OPTIONS = ("rw,defaults,nofail,noatime,relatime,nodev,nosuid,noexec,dev,suid,exec,"
                   "_netdev,x-systemd.automount,x-anything=1")


def test_generic_mount_options_are_accepted(layers_factory, overlay_mount):
    layers = layers_factory(RO_SPEC)
    m = overlay_mount(f"lowerdir={layers.lowerdir},{GENERIC_OPTIONS}")
    assert (m / "f.txt").read_text() == "content"


@pytest.mark.parametrize("extra", ["cache=kernel", "cache=shared", "handles=reopen",
                                   "handles=bind-at-open", "userxattr", "volatile", "rw"])
def test_valid_option_values_mount(layers_factory, overlay_mount, tmp_path, extra):
    layers = layers_factory(RO_SPEC)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work},{extra}")
    assert (m / "f.txt").read_text() == "content"
    assert (m / "d" / "x").read_bytes() == b"x"
    assert sorted(os.listdir(m.path)) == ["b.txt", "d", "empty", "f.txt"]


def test_logfile_option_with_debug(layers_factory, overlay_mount, tmp_path):
    layers = layers_factory(RO_SPEC)
    logfile = tmp_path / "daemon.log"
    m = overlay_mount(f"lowerdir={layers.lowerdir},logfile={logfile}", debug=True)
    assert (m / "f.txt").read_text() == "content"
    m.unmount()
    assert logfile.exists(), "-d with logfile= wrote no log file"
    assert not helpers.unexpected_log_lines(logfile.read_text(errors="replace"))


def test_stack_yaml(layers_factory, overlay_mount, tmp_path):
    layers = layers_factory(THREE_LAYERS)
    stack = tmp_path / "stack.yaml"
    stack.write_text("lowers:\n" + "".join(f"  - {p}\n" for p in layers.paths))
    m = overlay_mount(stack=stack)
    files, dirs = files_and_dirs(helpers.tree_snapshot(m.path))
    assert files == EXPECTED_FILES and dirs == EXPECTED_DIRS


def test_stack_yaml_relative_paths(layers_factory, overlay_mount, tmp_path):
    layers = layers_factory(THREE_LAYERS)
    base = layers.paths[0].parent
    stack = base / "stack.yaml"
    stack.write_text("lowers: [" + ", ".join(p.name for p in layers.paths) + "]\n")
    m = overlay_mount(stack=stack)
    files, _ = files_and_dirs(helpers.tree_snapshot(m.path))
    assert files == EXPECTED_FILES


def test_daemonized_mount_and_umount(layers_factory, overlay_mount):
    layers = layers_factory(RO_SPEC)
    m = overlay_mount(f"lowerdir={layers.lowerdir}", foreground=False)
    assert m.launcher_rc == 0
    assert m.mounted_when_launcher_returned, "launcher returned before the mount was live"
    assert m.daemon_pid is not None, "no process with our mountpoint in its argv"
    assert m.proc is not None and m.daemon_pid != m.proc.pid, "did not daemonize"
    assert (m / "f.txt").read_text() == "content"
    pid = m.daemon_pid
    m.unmount()
    assert not helpers.pid_alive(pid), "daemon still running after umount"
    assert not helpers.is_mounted(m.path)


def test_mount_helper_form(layers_factory, overlay_mount):
    layers = layers_factory(RO_SPEC)
    m = overlay_mount(f"lowerdir={layers.lowerdir}", foreground=False, source="overlaypc")
    assert m.mounted_when_launcher_returned
    assert m.mount_entry().fstype == helpers.FSTYPE
    assert (m / "f.txt").read_text() == "content"


def _check_mount_helper(cmd: list, mnt: Path, env: dict) -> None:
    """Run a mount(8)-style command and check the mount, then take it down."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30,
                       cwd=str(mnt.parent))
    gone = True
    try:
        assert r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr}"
        assert helpers.is_mounted(mnt, helpers.FSTYPE), helpers.mounts_at(mnt)
        assert (mnt / "f.txt").read_text() == "content"
        pids = [p for p in helpers.pids_with_arg(mnt) if helpers.pid_alive(p)]
        assert len(pids) == 1, pids
    finally:
        pids = [p for p in helpers.pids_with_arg(mnt) if helpers.pid_alive(p)]
        helpers.force_unmount(mnt)
        gone = helpers.wait_until(lambda: not any(helpers.pid_alive(p) for p in pids), 10)
        for p in pids:
            if helpers.pid_alive(p):
                os.kill(p, signal.SIGKILL)
    assert gone, "daemon did not exit after umount"


# mount(8) runs helpers with PATH removed; mount.fuse3 then runs `sh -c overlaypc ...`, so
# the executable must be on the shell's default PATH.
SH_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_mount_t_fuse_overlaypc_installed(layers_factory, mountpoint):
    helpers.require_fuse_mount()
    helpers.require("mount_fuse3")
    helpers.require(shutil.which("overlaypc", path=SH_DEFAULT_PATH) is not None,
                    f"needs an `overlaypc` executable in {SH_DEFAULT_PATH}")
    layers = layers_factory(RO_SPEC)
    mnt = mountpoint()
    _check_mount_helper(["mount", "-t", "fuse.overlaypc", "overlaypc", str(mnt),
                         "-o", f"lowerdir={layers.lowerdir}"], mnt, dict(os.environ))


def test_mount_fuse3_helper_via_shim(layers_factory, mountpoint, tmp_path):
    """What mount(8) does for -t fuse.overlaypc: mount.fuse3 runs `overlaypc SOURCE MNT -o
    OPTS,dev,suid` through sh. Here with this checkout behind a tiny shim on PATH."""
    helpers.require_fuse_mount()
    helpers.require("mount_fuse3")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "overlaypc"
    env = helpers.overlaypc_env()
    shim.write_text(f"#!/bin/sh\nexport PYTHONPATH='{env['PYTHONPATH']}'\n"
                    f"exec '{sys.executable}' -m overlaypc \"$@\"\n")
    shim.chmod(0o755)
    env["PATH"] = f"{bindir}:{os.environ.get('PATH', SH_DEFAULT_PATH)}"
    layers = layers_factory(RO_SPEC)
    mnt = mountpoint()
    helper = next(p for p in ("/sbin/mount.fuse3", "/usr/sbin/mount.fuse3") if os.path.exists(p))
    _check_mount_helper([helper, "overlaypc", str(mnt), "-t", "overlaypc",
                         "-o", f"rw,lowerdir={layers.lowerdir}"], mnt, env)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_unmounts_cleanly(layers_factory, overlay_mount, sig):
    layers = layers_factory(RO_SPEC)
    m = overlay_mount(f"lowerdir={layers.lowerdir}")
    assert (m / "f.txt").read_text() == "content"
    assert m.proc is not None
    os.kill(m.proc.pid, sig)
    try:
        m.proc.wait(timeout=helpers.EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"daemon still running 15 s after {sig.name}")
    assert helpers.wait_until(lambda: not helpers.is_mounted(m.path), 5), \
        f"still mounted after {sig.name}"
    m.unmount()  # nothing left to unmount: checks exit status 0 and a clean log


#: a ``sitecustomize`` for the daemon: the main thread's first ``import logging`` (the mount's
#: first record, "mounted", in ``served``) sends the daemon SIGTERM before the module's body
#: runs, so the signal's handler runs while ``logging`` is half made
_SIGNAL_DURING_LOGGING_IMPORT = """
import importlib.machinery, os, signal, sys, threading

class _SignalDuringImport:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "logging" or threading.current_thread() is not threading.main_thread():
            return None
        sys.meta_path.remove(cls)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real = spec.loader.exec_module

        def exec_module(module):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100000):  # the handler runs at one of these bytecodes' ends
                pass
            real(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _SignalDuringImport)
"""


def test_a_signal_while_logging_is_imported_unmounts_cleanly(layers_factory, overlay_mount,
                                                             tmp_path):
    """A SIGTERM that came while the daemon's main thread imported ``logging`` for its first
    record: the handler's own record met the half-made module (AttributeError raised into the
    import), the handler never reached its unmount, and the daemon served on (15 s later:
    still running; found by a suite run under load)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SIGNAL_DURING_LOGGING_IMPORT)
    layers = layers_factory(RO_SPEC)
    path = os.pathsep.join([helpers.overlaypc_env()["PYTHONPATH"], str(hook)])
    m = overlay_mount(f"lowerdir={layers.lowerdir}", env={"PYTHONPATH": path})
    assert m.proc is not None
    try:
        m.proc.wait(timeout=helpers.EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("daemon still running 15 s after a SIGTERM during its logging import")
    assert helpers.wait_until(lambda: not helpers.is_mounted(m.path), 5), "still mounted"
    m.unmount()  # nothing left to unmount: checks exit status 0 and a clean log
    assert "stopped by signal" in m.log_text()


# --- the sample stack shipped in layers/ --------------------------------------------------------

def test_sample_readonly_stack(overlay_mount):
    stack = helpers.REPO_ROOT / "layers" / "readonly.yaml"
    helpers.require(stack.exists(), "layers/readonly.yaml not present")
    m = overlay_mount(stack=stack)
    names = helpers.merged_names(m.path)
    for present in ("etc/app/app.conf", "etc/app/defaults.conf", "etc/hostname", "etc/motd",
                    "etc/os-release", "opt/app/app.py", "opt/app/config.yaml", "usr/bin/hello",
                    "usr/share/doc/base", "var/cache/old/fresh.bin", "var/lib/data/seed.txt"):
        assert present in names, present
    for absent in ("etc/app/legacy.conf", "usr/share/doc/base/README", "var/cache/old/a.bin",
                   "var/cache/old/b.bin"):
        assert absent not in names, absent
    assert not [n for n in names if os.path.basename(n).startswith(".wh.")]
    assert os.listdir(m / "usr/share/doc/base") == []
    assert os.stat(m / "usr/bin/hello").st_mode & 0o111


def test_execve_of_lower_and_upper_files(layers_factory, overlay_mount):
    """execve's open reaches the daemon with the kernel's ``__FMODE_EXEC`` bit in its
    flags, which openat2 refuses (EINVAL): every program on the mount failed to start
    (issue 14: no container could run)."""
    layers = layers_factory({"low": {
        "bin/true": File(Path("/bin/true").read_bytes(), mode=0o755),
        "bin/script": File("#!/bin/sh\necho from script\n", mode=0o755)}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}")
    assert subprocess.run([str(m.path / "bin/true")]).returncode == 0
    r = subprocess.run([str(m.path / "bin/script")], capture_output=True, text=True)
    assert r.stdout == "from script\n", r.stderr
    shutil.copy(m.path / "bin/true", m.path / "bin/true2")  # a file of the upper
    os.chmod(m.path / "bin/true2", 0o755)
    assert subprocess.run([str(m.path / "bin/true2")]).returncode == 0


def test_readahead_raised_and_an_immediate_umount_is_never_busy(layers_factory, mountpoint, tmp_path):
    """The bdi's read_ahead_kb is raised to 1024 once INIT is answered, without touching the
    mount: a daemon thread that stat'ed the root just after INIT made a quick ``umount``
    fail with EBUSY now and then (seen as flaky teardowns)."""
    from overlaypc.engine.autounmount import fuse_device
    helpers.require_fuse_mount()
    layers = layers_factory(RO_SPEC)
    for i in range(15):
        mnt = mountpoint()
        try:
            r = subprocess.run(helpers.overlaypc_cmd("-o", f"lowerdir={layers.lowerdir}", mnt),
                               env=helpers.overlaypc_env(), stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            if i == 0:
                dev = fuse_device(str(mnt))
                assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == "1024"
            u = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
            assert u.returncode == 0, f"cycle {i}: {u.stderr}"
        finally:
            helpers.force_unmount(mnt)


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_stats_into_a_closed_pipe_ends_quietly(layers_factory, overlay_mount, fmt):
    """``overlaypc stats MNT | head`` where the reader is gone: no traceback, status 0
    (it printed a BrokenPipeError traceback before)."""
    layers = layers_factory({"top": {"a": "a\n"}})
    m = overlay_mount(f"lowerdir={layers.paths[0]}")
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        proc = subprocess.run(helpers.overlaypc_cmd("stats", m.path, *fmt), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")
