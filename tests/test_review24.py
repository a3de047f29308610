"""review24: second review of session 9's merges (limits23, soak23, chmod21).

- A name in the upper layer that is a mount point (a bind mount of a file or directory
  from outside the layer, on the same filesystem, so it passes the lookup's ``st_dev``
  check): a chmod, chown or utime of it through the mount must not reach the bind
  mount's source. Failed before: chmod (since chmod21's ``fchmodat2`` on the name), chown
  and utime (always by name) changed ``outside/secret``. Since clone26 the change acts on
  the object the mount covers, as the kernel's overlay (tests/test_layer_mounts.py).
- soak23: a burst of open/unlink/close of nameless metacopy files, index=on hard links
  and O_TMPFILE files leaves no handle, inode or file fd in the daemon.
- limits23: renames (redirected directories, metacopy files, index=on hard links), a
  link and kill_privs (chown; another user's truncate) with metacopy=on as the kernel.
- chmod21: the impure mark removed (or the directory replaced) behind the mount; a
  symlink's chmod as the kernel answers it.
"""
from __future__ import annotations

import ctypes
import os
import stat
import subprocess
from pathlib import Path

import pytest

import helpers

pytestmark = [pytest.mark.mount]


@pytest.fixture
def bound(tmp_path: Path):
    """(lower, upper, work, outside): ``outside/secret`` (a file, mode 0600) and
    ``outside/sdir`` (a directory, mode 0700) bind-mounted on ``upper/f`` and ``upper/d``."""
    helpers.require("root")
    lower, upper, work, outside = (tmp_path / n for n in ("lower", "upper", "work", "outside"))
    for p in (lower, upper, work, outside):
        p.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.chmod(outside / "secret", 0o600)
    (outside / "sdir").mkdir(mode=0o700)
    os.chmod(outside / "sdir", 0o700)
    (upper / "f").write_bytes(b"covered")
    (upper / "d").mkdir()
    made = []
    try:
        for src, dst in ((outside / "secret", upper / "f"), (outside / "sdir", upper / "d")):
            subprocess.run(["mount", "--bind", str(src), str(dst)], check=True, capture_output=True)
            made.append(dst)
        yield lower, upper, work, outside
    finally:
        for dst in reversed(made):
            helpers.force_unmount(dst)


_CHANGES = {
    "chmod": lambda p: os.chmod(p, 0o777),
    "chown": lambda p: os.chown(p, 1234, 1234),
    "utime": lambda p: os.utime(p, ns=(10**9, 10**9)),
}


def _shown(st: os.stat_result) -> tuple:
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns


@pytest.mark.parametrize("change", sorted(_CHANGES))
@pytest.mark.parametrize("name,what", [("f", "secret"), ("d", "sdir")])
def test_change_of_a_bind_mounted_upper_name_stays_in_the_layer(name, what, change, bound,
                                                                 overlay_mount):
    lower, upper, work, outside = bound
    m = overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work}")
    before = _shown(os.lstat(outside / what))
    shown = _shown(os.lstat(m.mountpoint / name))
    # (clone26: as the kernel's overlay, the change acts on the object the bind mount
    # covers, beneath the daemon's private clone of the upper's mount; it was refused)
    _CHANGES[change](m.mountpoint / name)
    assert _shown(os.lstat(outside / what)) == before, \
        f"{change} through the mount changed {outside / what}, outside the layer"
    assert _shown(os.lstat(m.mountpoint / name)) != shown


# -- soak23: nothing left behind after a burst of open/unlink/close ------------------------
def _file_fds(m, roots: tuple[Path, ...]) -> list[str]:
    """The daemon's (of mount ``m``) fds on non-directories of the layers' filesystems (open
    files, a metacopy file's held upper file), its log file aside: none once every file is
    closed (the lookup cache holds directories only). Told by device, not by the fd's
    path: the daemon holds the layers beneath private clones of their mounts, whose fds
    show paths from the clone's root (``layerroots``)."""
    devs = {os.stat(r).st_dev for r in roots}
    log = os.stat(m.log_path)
    found = []
    for n in os.listdir(f"/proc/{m.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{m.proc.pid}/fd/{n}")
            st = os.stat(f"/proc/{m.proc.pid}/fd/{n}")
        except OSError:
            continue
        if (not stat.S_ISDIR(st.st_mode) and st.st_dev in devs
                and (st.st_dev, st.st_ino) != (log.st_dev, log.st_ino)):
            found.append(target)
    return found


@pytest.mark.parametrize("handles", ["follow", "bind-at-open"])
def test_burst_of_nameless_metacopy_files_leaves_no_fd_or_inode(handles, tmp_path, overlay_mount):
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    files = 96
    helpers.build_layer(lower, {f"f{i}": f"lower data {i}\n" * 50 for i in range(files)})
    upper.mkdir()
    work.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},metacopy=on"
    if handles != "follow":
        opts += f",handles={handles}"
    m = overlay_mount(opts)
    mnt = m.mountpoint
    with open(mnt / "f0", "rb"):  # (the check sees an open file's fd)
        assert _file_fds(m, (lower, upper, work)) != []

    def one(i: int) -> None:
        p = mnt / f"f{i}"
        os.chmod(p, 0o640)  # a metacopy upper file
        fds = [os.open(p, os.O_RDONLY), os.open(p, os.O_RDONLY)]
        try:
            os.unlink(p)
            assert os.fstat(fds[0]).st_nlink == 0
            if i % 3:
                fds.append(os.open(f"/proc/self/fd/{fds[0]}", os.O_RDWR))  # data copied in
                os.pwrite(fds[-1], b"W", 0)
                os.fchmod(fds[-1], 0o600)
                assert stat.S_IMODE(os.fstat(fds[0]).st_mode) == 0o600
            if i % 2:
                os.fstat(fds[1])
        finally:
            for fd in fds:
                os.close(fd)

    _burst_leaves_nothing(one, files, m, (lower, upper, work))


@pytest.mark.parametrize("handles", ["follow", "bind-at-open"])
def test_burst_of_index_links_and_tmpfiles_leaves_no_fd_or_inode(handles, tmp_path, xfs_dir,
                                                                 overlay_mount):
    """index=on: lower hard links opened by one name, written by the other (copied up into
    the index), unlinked while open, given a name again through the open fd (LINK of a
    nameless node), and O_TMPFILE files named by linkat; all closed, nothing is held."""
    base = xfs_dir
    lower, upper, work = (base / n for n in ("lower", "upper", "work"))
    files = 48
    helpers.build_layer(lower, {"d": {}})
    for i in range(files):
        (lower / f"a{i}").write_bytes(b"lower %d\n" % i * 20)
        os.link(lower / f"a{i}", lower / f"b{i}")
    upper.mkdir()
    work.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},index=on,metacopy=on"
    if handles != "follow":
        opts += f",handles={handles}"
    m = overlay_mount(opts)
    mnt = m.mountpoint
    linkat = ctypes.CDLL(None, use_errno=True).linkat

    def link_fd(fd: int, dst: Path) -> None:
        if linkat(-100, f"/proc/self/fd/{fd}".encode(), -100, str(dst).encode(), 0x400) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(dst))

    def one(i: int) -> None:
        a, b = mnt / f"a{i}", mnt / f"b{i}"
        fds = [os.open(a, os.O_RDONLY)]
        try:
            fds.append(os.open(b, os.O_RDWR))  # copied up into the index
            os.pwrite(fds[1], b"W", 0)
            os.unlink(a)
            if i % 2:
                link_fd(fds[0], mnt / f"c{i}")  # a name through a nameless name's node
                os.unlink(mnt / f"c{i}")
            os.unlink(b)
            os.fstat(fds[0])
            t = os.open(mnt / "d", os.O_TMPFILE | os.O_RDWR, 0o644)
            fds.append(t)
            os.write(t, b"tmp")
            link_fd(t, mnt / "d" / f"t{i}")
            os.unlink(mnt / "d" / f"t{i}")
        finally:
            for fd in fds:
                os.close(fd)

    _burst_leaves_nothing(one, files, m, (lower, upper, work))


def _burst_leaves_nothing(one, files: int, m, layers) -> None:
    """``one(i)`` for every ``i < files`` on 4 threads (a thread's failure fails the test);
    then the mount ``m`` holds no handle, no inode and no fd of a file in ``layers``."""
    from features_support import overlay_stats
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(t, files, 4):
                one(i)
        except BaseException as e:  # (reported below)
            errors.append(e)

    helpers.run_threads(worker, 4, timeout=120)
    assert [repr(e) for e in errors] == []

    def held() -> dict:
        stats = overlay_stats(m.mountpoint)
        return {"open_handles": stats["open_handles"], "live_inodes": stats["live_inodes"],
                "file_fds": _file_fds(m, layers)}

    # RELEASE comes after close(2) returns, and a RELEASE takes its handle out of the table
    # before it drops the inode's reference and closes the fds (``Files.release``): all
    # three are waited for, as one (a leak stays, and the wait ends showing it)
    nothing = {"open_handles": 0, "live_inodes": 0, "file_fds": []}
    assert helpers.wait_until(lambda: held() == nothing, 20), \
        f"held 20 s after the last close: {held()}"


# -- limits23: renames, links and kill_privs with fd-less nodes, against the kernel ---------
_LIMITS_LOWER = {
    "m": helpers.File(b"metacopy data\n" * 100, mode=0o644),
    "D": {"x": "x in D", "z": helpers.File(b"z data\n" * 50), "sub": {"q": "q"}},
    "dst": {},
    "h1": "hard linked\n",
    "h2": helpers.HardLink("h1"),
    "s": helpers.File(b"setuid\n" * 30, mode=0o4755),
    "s2": helpers.File(b"setuid writable\n" * 30, mode=0o4777),
}


def _limits_sequence(r: Path) -> None:
    os.chmod(r / "m", 0o600)                      # a metacopy copy-up ...
    os.rename(r / "m", r / "dst/m2")              # ... moved: redirect "/m"
    os.rename(r / "dst/m2", r / "dst/m3")         # ... within its directory
    os.rename(r / "D", r / "E")                   # a directory below: redirect "D"
    os.rename(r / "E/x", r / "E/y")
    os.chmod(r / "E/z", 0o600)                    # metacopy inside a redirected directory
    os.rename(r / "E/z", r / "dst/z2")            # ... moved out: "/D/z"
    os.rename(r / "E/sub", r / "dst/sub2")        # a directory out of a redirected one
    os.rename(r / "h1", r / "h3")                 # index=on: a lower hard link's copy-up
    os.link(r / "h3", r / "dst/h4")
    os.rename(r / "h2", r / "dst/h4")             # a link renamed over another of its names
    os.chown(r / "s", 0, 0)                       # kill_privs of a lower setuid file
    pid = os.fork()
    if pid == 0:  # another user truncates a world-writable setuid file
        code = 1
        try:
            os.chdir(r)  # (the test's directories above are 0700)
            os.setresgid(1000, 1000, 1000)
            os.setresuid(1000, 1000, 1000)
            os.truncate("s2", 7)
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def _seen(root: Path) -> dict:
    from features_support import snapshot
    snap = snapshot(root, kernel=True)
    nlinks = {k: os.lstat(root / k).st_nlink for k, e in snap.items() if e.type == "file"}
    return {"tree": snap, "nlink": nlinks}


def test_renames_links_and_kill_privs_match_the_kernel(xfs_dir, layers_factory, overlay_mount,
                                                       kernel_mount):
    from features_support import make_lowers, new_stack, ovl_xattr, upper_redirects
    lowers = make_lowers(layers_factory, xfs_dir, {"lower": _LIMITS_LOWER})
    extra = ("redirect_dir=on", "metacopy=on", "index=on")
    ks = new_stack(lowers, xfs_dir, "k")
    kmnt = kernel_mount(ks.lowers, ks.upper, ks.work, extra)
    _limits_sequence(kmnt)
    expected = _seen(kmnt)
    os_ = new_stack(lowers, xfs_dir, "o")
    m = overlay_mount(os_.options(",".join(extra)))
    _limits_sequence(m.mountpoint)
    got = _seen(m.mountpoint)
    assert (expected["tree"]["s"].mode, expected["tree"]["s2"].mode) == (0o755, 0o777)
    assert got["nlink"] == expected["nlink"]
    from features_support import assert_same
    assert_same(expected["tree"], got["tree"], ("kernel", "overlaypc"))
    ours, theirs = upper_redirects(os_.upper), upper_redirects(ks.upper)
    # (the renames of lower files are metadata-only copy-ups with a redirect, as the
    # kernel's, since compat41: before, overlaypc copied the data and set neither mark)
    assert ours == theirs == {"E": b"D", "dst/m3": b"/m", "dst/z2": b"/D/z",
                              "dst/sub2": b"/D/sub", "E/y": b"x", "h3": b"/h1", "dst/h4": b"/h1"}
    # (h3, dst/h4 too: a LINK of a metacopy file copies no data, as the kernel's, since peer45)
    marked = set(ours)
    assert {k: ovl_xattr(os_.upper / k, "metacopy") for k in marked} == \
        {k: ovl_xattr(ks.upper / k, "metacopy") for k in marked}


# -- chmod21: the impure mark read once per held directory ---------------------------------
def test_impure_mark_removed_or_directory_replaced_behind_the_mount(tmp_path, overlay_mount):
    """The mark removed from a held upper directory, or the directory replaced, while
    mounted (undefined, as for the kernel: nothing may crash, every change stays in the
    layer); removed between mounts: the next mount's copy-up marks it again."""
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    helpers.build_layer(lower, {"d": {f"f{i}": f"f{i}" for i in range(6)}, "e": {"g": "g"}})
    (upper / "d").mkdir(parents=True)
    (upper / "e").mkdir()
    work.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    impure = "trusted.overlay.impure"
    m = overlay_mount(opts)
    os.chmod(m.mountpoint / "d/f0", 0o600)
    assert os.getxattr(upper / "d", impure) == b"y"
    os.removexattr(upper / "d", impure)                    # behind the mount
    os.chmod(m.mountpoint / "d/f1", 0o600)
    os.rename(upper / "e", tmp_path / "e.moved")           # replaced behind the mount
    (upper / "e").mkdir()
    for p in (m.mountpoint / "e/g", m.mountpoint / "d/f2"):
        try:
            os.chmod(p, 0o600)
        except OSError:
            pass  # (undefined: an error is an answer)
    assert sorted(os.listdir(m.mountpoint / "d")) == [f"f{i}" for i in range(6)]
    m.unmount()  # (its teardown checks fail the test on a traceback in the daemon's log)
    if impure in os.listxattr(upper / "d"):
        os.removexattr(upper / "d", impure)               # between mounts
    m2 = overlay_mount(opts)
    os.chmod(m2.mountpoint / "d/f3", 0o600)
    assert os.getxattr(upper / "d", impure) == b"y"
    assert stat.S_IMODE(os.lstat(upper / "d/f3").st_mode) == 0o600


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_chmod_of_a_symlink_answers_as_the_kernel(where, tmp_path, overlay_mount, kernel_mount):
    """``fchmodat2(AT_SYMLINK_NOFOLLOW)`` of a symlink through the mount: the kernel
    overlay's answer, the link and its target unchanged."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def lchmod(path: Path) -> int:
        if libc.syscall(452, -100, str(path).encode(), 0o600, 0x100) == 0:
            return 0
        return ctypes.get_errno()

    answers = []
    for kernel in (True, False):
        base = tmp_path / ("k" if kernel else "o")
        lower, upper, work = (base / n for n in ("lower", "upper", "work"))
        helpers.build_layer(lower, {"t": helpers.File(b"t", mode=0o644), "ln": helpers.Symlink("t")})
        upper.mkdir()
        work.mkdir()
        if where == "upper":
            os.symlink("t", upper / "ln2")
        name = "ln" if where == "lower" else "ln2"
        mnt = kernel_mount([lower], upper, work) if kernel else \
            overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work}").mountpoint
        answers.append((lchmod(mnt / name), stat.S_IMODE(os.stat(mnt / "t").st_mode)))
    assert answers[1] == answers[0]
