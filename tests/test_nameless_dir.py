"""An open directory whose name is gone (rmdir of it, a rename of another directory over
it) still answers ``fstat`` (hunt8d lead 3), as a plain directory and the kernel overlay
do: FUSE sends GETATTR by node for a directory, without its handle, and that node has no
name left. The kernel opens directories itself here (NO_OPENDIR_SUPPORT: no handle the
daemon could keep an fd in) and an upper directory's inode is freed by the removal: the
node keeps the attributes the removal found (``Node.gone``). Before: ENOENT.

An upper directory answers st_nlink 0 (checked by hand against ``mount -t overlay``: same
mode, st_nlink 0). A directory from a lower layer answers as the kernel overlay's does
(differential; review10): the kernel's answer comes from the lower directory, still there,
so the link count stays as it was (a merged directory's live count differs already, 2 here
against the kernel's 1: the test compares whether it stays). Before that fix: st_nlink 0.

Changes of such a directory through its fd (``fchmod``, ``fchown``, ``futimens``, xattrs)
come by node too. One with an upper part (upper-only, or merged) is changed as the kernel
overlay changes it: its removed upper directory, held by the node until FORGET (review11;
before: ENOENT). A lower-only one answers ESTALE (the kernel copies it up into its workdir,
a leftover): nothing is copied up, the directory that took the name is never touched.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat

import pytest

from helpers import Dir


@contextlib.contextmanager
def _open_taken_away(mnt, name: str, how: str):
    """Open directory ``name`` of the mount and take its name away (``how``: ``rmdir``,
    then a new directory takes the name, or ``rename_over``): yields (stat before, fd)."""
    before = os.stat(mnt / name)
    fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if how == "rmdir":
            os.rmdir(mnt / name)
        else:
            os.mkdir(mnt / "other")
            os.rename(mnt / "other", mnt / name)
        yield before, fd
    finally:
        os.close(fd)


def _taken_away(mnt, name: str, how: str):
    """Open directory ``name`` of the mount, take its name away (``how``): (stat before,
    fstat after, listing after)."""
    with _open_taken_away(mnt, name, how) as (before, fd):
        return before, os.fstat(fd), os.listdir(fd)


def _answer(call):
    try:
        result = call()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok" if result is None else result


def _changed_through(fd: int) -> list:
    """Each change of the directory open as ``fd`` and what ``fstat``/xattrs show after."""
    out = []
    for what, call in [("chmod", lambda: os.chmod(fd, 0o705)),
                       ("chown", lambda: os.chown(fd, 1234, 4321)),
                       ("utime", lambda: os.utime(fd, ns=(10**9, 2 * 10**9))),
                       ("setxattr", lambda: os.setxattr(fd, "user.x", b"1")),
                       ("getxattr", lambda: os.getxattr(fd, "user.x")),
                       ("listxattr", lambda: sorted(os.listxattr(fd))),
                       ("removexattr", lambda: os.removexattr(fd, "user.x")),
                       ("listxattr", lambda: sorted(os.listxattr(fd)))]:
        answer = _answer(call)
        st = os.fstat(fd)
        out.append((what, answer, stat.filemode(st.st_mode), st.st_uid, st.st_gid,
                    "set" if st.st_mtime_ns == 2 * 10**9 else "not set"))
    return out


@pytest.mark.parametrize("how", ["rmdir", "rename_over"])
def test_fstat_of_an_open_directory_with_no_name_left(overlay_mount, layers_factory, how):
    layers = layers_factory({"lower": {"low/f": "x\n"}})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    mnt = overlay_mount(f"lowerdir={layers['lower']},upperdir={upper},workdir={work}").path
    os.mkdir(mnt / "d")
    os.chmod(mnt / "d", 0o751)
    before, st, listing = _taken_away(mnt, "d", how)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o751
    assert st.st_nlink == 0
    assert st.st_ino == before.st_ino
    assert listing == []


@pytest.mark.parametrize("which", ["merged", "lower"])
@pytest.mark.parametrize("how", ["rmdir", "rename_over"])
def test_fstat_of_an_open_lower_directory_with_no_name_left(overlay_mount, kernel_mount,
                                                             layers_factory, how, which):
    """Lower directory ``low`` (``merged``: its one file unlinked, a merged directory now;
    ``lower``: empty below, never copied up), as the kernel overlay answers."""
    answers = []
    for kind in ("kernel", "overlaypc"):
        tree = {"low/f": "x\n"} if which == "merged" else {"low": {}}
        mnt, upper = _mounted(kind, tree, layers_factory, kernel_mount, overlay_mount)
        if which == "merged":
            os.unlink(mnt / "low" / "f")
        before, after, listing = _taken_away(mnt, "low", how)
        answers.append({"mode": stat.filemode(after.st_mode),
                        "nlink_kept": after.st_nlink == before.st_nlink,
                        "same_ino": after.st_ino == before.st_ino, "listing": listing})
    assert answers[1] == answers[0]


def _mounted(kind: str, tree: dict, layers_factory, kernel_mount, overlay_mount):
    """(mount point, upper dir) of a fresh mount of lower ``tree`` by ``kind`` ("kernel":
    the kernel overlay; "overlaypc")."""
    lower = layers_factory({"lower": tree})["lower"]
    upper = layers_factory.empty_dir(f"upper-{kind}")
    work = layers_factory.empty_dir(f"work-{kind}")
    if kind == "kernel":
        return kernel_mount([lower], upper, work), upper
    return overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work}").path, upper


def _new_owner(mnt, name: str) -> tuple:
    st = os.stat(mnt / name)
    return stat.filemode(st.st_mode), st.st_uid, st.st_gid, sorted(os.listxattr(mnt / name))


@pytest.mark.parametrize("which", ["upper", "merged"])
@pytest.mark.parametrize("how", ["rmdir", "rename_over"])
def test_changes_of_an_open_directory_with_no_name_left(overlay_mount, kernel_mount,
                                                        layers_factory, how, which):
    """``d`` (``upper``: made through the mount; ``merged``: a lower directory whose one
    file was unlinked) changed through an fd after its name went: as the kernel overlay,
    which changes its removed upper directory; the directory that took the name is not
    touched."""
    answers = []
    for kind in ("kernel", "overlaypc"):
        tree = {"d/f": "x\n"} if which == "merged" else {"l": "l\n"}
        mnt, upper = _mounted(kind, tree, layers_factory, kernel_mount, overlay_mount)
        if which == "merged":
            os.unlink(mnt / "d" / "f")
        else:
            os.mkdir(mnt / "d")
        with _open_taken_away(mnt, "d", how) as (_, fd):
            if how == "rmdir":
                os.mkdir(mnt / "d")
            owner = _new_owner(mnt, "d")
            changes = _changed_through(fd)
            answers.append({"changes": changes, "new owner kept": _new_owner(mnt, "d") == owner})
    assert answers[1] == answers[0]
    assert answers[1]["changes"][0][1:3] == ("ok", "drwx---r-x")


@pytest.mark.parametrize("how", ["rmdir", "rename_over"])
def test_changes_of_an_open_lower_directory_with_no_name_left(overlay_mount, layers_factory,
                                                              how):
    """A lower-only directory whose name went: reads of its xattrs answer from the lower
    directory, changes answer ESTALE; nothing is copied up, the upper and the directory
    that took the name are left as they were."""
    layers = layers_factory({"lower": {"low": Dir(xattrs={"user.low": b"1"})}})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    mnt = overlay_mount(f"lowerdir={layers['lower']},upperdir={upper},workdir={work}").path
    with _open_taken_away(mnt, "low", how) as (before, fd):
        if how == "rmdir":
            os.mkdir(mnt / "low")
        owner = _new_owner(mnt, "low")
        upper_before = sorted(os.listdir(upper))
        assert _answer(lambda: os.getxattr(fd, "user.low")) == b"1"
        assert _answer(lambda: os.listxattr(fd)) == ["user.low"]
        changes = _changed_through(fd)
        kept = (stat.filemode(before.st_mode), before.st_uid, before.st_gid, "not set")
        assert changes == [
            ("chmod", "ESTALE", *kept), ("chown", "ESTALE", *kept), ("utime", "ESTALE", *kept),
            ("setxattr", "ESTALE", *kept), ("getxattr", "ENODATA", *kept),
            ("listxattr", ["user.low"], *kept), ("removexattr", "ESTALE", *kept),
            ("listxattr", ["user.low"], *kept)]
        assert _new_owner(mnt, "low") == owner
        assert sorted(os.listdir(upper)) == upper_before
        assert os.listdir(upper / "low") == []
        assert os.listdir(work / "work") == []


def _ident(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _fds_to(ident: tuple[int, int]) -> int:
    """How many of this process's fds are open on the object ``ident`` (``_ident``, read
    before) once unlinked. By device and inode, not by the fd's path: the layers are held
    beneath private clones of their mounts, whose fds show paths from the clone's root
    (``layerroots``)."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/self/fd/{fd}")
            found += (st.st_dev, st.st_ino, st.st_nlink) == (*ident, 0)
    return found


def test_a_removed_directory_holds_one_fd_until_forget_none_past_the_bound(tmp_path):
    """The removed upper directory's fd is held from the RMDIR to the node's FORGET and
    counts with the open files' fds; a removal while those hold their share keeps none:
    GETATTR answers the removal's attributes, a change ESTALE."""
    from core_driver import CoreDriver
    drv = CoreDriver.in_dir(tmp_path)
    try:
        root = drv.root()
        d = drv.mkdir(root, "d", 0o755)
        d_ident = _ident(f"{tmp_path}/upper/d")
        open_fds = drv.fs.open_fds()
        drv.rmdir(root, "d")
        assert (drv.fs.nameless.fds, drv.fs.open_fds()) == (1, open_fds + 1)
        assert _fds_to(d_ident) == 1
        assert stat.S_IMODE(drv.setattr(d, mode=0o700).mode) == 0o700
        assert stat.S_IMODE(drv.getattr(d).mode) == 0o700
        drv.settle()  # the kernel's FORGET
        assert (drv.fs.nameless.fds, _fds_to(d_ident)) == (0, 0)

        e = drv.mkdir(root, "e", 0o751)
        e_ident = _ident(f"{tmp_path}/upper/e")
        drv.fs.open_file_fds = drv.fs.open_fds()  # open files hold their whole share
        drv.rmdir(root, "e")
        assert (drv.fs.nameless.fds, _fds_to(e_ident)) == (0, 0)
        assert (stat.S_IMODE(drv.getattr(e).mode), drv.getattr(e).nlink) == (0o751, 0)
        with pytest.raises(OSError) as raised:
            drv.setattr(e, mode=0o700)
        assert raised.value.errno == errno.ESTALE
        drv.settle()
    finally:
        drv.close()


def test_removed_directories_hold_at_most_a_quarter_of_the_open_files_share(tmp_path):
    """Removed directories the kernel still holds keep fds only up to a quarter of the
    open files' share (``nameless.SHARE``): past it a removal keeps none, so held removed
    directories never take the fds open files need."""
    from core_driver import CoreDriver
    drv = CoreDriver.in_dir(tmp_path)
    try:
        root = drv.root()
        drv.fs.open_file_fds = 40
        assert drv.fs.open_fds() < 20  # (room is not what stops them)
        nodes = [drv.mkdir(root, f"d{i}", 0o755) for i in range(12)]
        for i in range(12):
            drv.rmdir(root, f"d{i}")
        assert drv.fs.nameless.fds == 10  # 40 // 4
        assert all(drv.getattr(n).nlink == 0 for n in nodes)
        drv.settle()
        assert drv.fs.nameless.fds == 0
    finally:
        drv.close()


def _open_until_refused(mnt, names: list[str], most: int = 4000) -> list[int]:
    """Read-only opens of ``names`` in turn until the mount refuses one (ENFILE)."""
    fds: list[int] = []
    try:
        while len(fds) < most:
            fds.append(os.open(mnt / names[len(fds) % len(names)], os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.ENFILE, e
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("full_first", [False, True], ids=["room", "budget_full"])
def test_rm_rf_with_removed_directories_held_under_a_low_fd_limit(overlay_mount,
                                                                  layers_factory,
                                                                  full_first):
    """review11: under ``ulimit -n 256``, ``rm -rf`` of a tree of 300 directories, 100 of
    them held open by this process ("budget_full": while open files hold the whole
    open-file budget). The removal succeeds; the held ones answer fstat, and fchmod
    (ESTALE for those removed with no room for their fd, or past a quarter of the open
    files' fds: open files keep three quarters); once they are closed (FORGET),
    open files get the whole budget back: nothing keeps the fds of removed directories."""
    import shutil
    import time
    files = [f"f{i}" for i in range(20)]
    layers = layers_factory({"lower": {name: "x" for name in files}})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers['lower']},upperdir={upper},workdir={work}", nofile=256)
    budget = _open_until_refused(m.path, files)
    _close_all(budget)
    top = m.path / "top"
    for i in range(300):
        (top / f"s{i}" / "below").mkdir(parents=True)
        (top / f"s{i}" / "file").write_text("y")
    held = [os.open(top / f"s{i}", os.O_RDONLY | os.O_DIRECTORY) for i in range(0, 300, 3)]
    full = _open_until_refused(m.path, files) if full_first else []
    try:
        shutil.rmtree(top)
        answers = []
        for fd in held:
            assert stat.S_ISDIR(os.fstat(fd).st_mode)
            answers.append(_answer(lambda: os.fchmod(fd, 0o700)))
        if full_first:
            assert answers == ["ESTALE"] * len(held)
        else:  # each held removed directory takes one open file's fd, up to a quarter of
            # them (``nameless.SHARE``); past it, changes answer ESTALE (the others'
            # FORGETs, queued by the kernel, may not all have come yet)
            kept = answers.count("ok")
            assert 0 < kept <= len(budget) // 4 + 1 and set(answers) <= {"ok", "ESTALE"}
            fewer = _open_until_refused(m.path, files)
            _close_all(fewer)
            assert len(budget) * 3 // 4 - 1 <= len(fewer) <= len(budget) - kept
    finally:
        _close_all(full)
        _close_all(held)
    time.sleep(0.2)  # (FORGETs are queued)
    after = []
    for _ in range(50):  # the kernel's FORGETs of the closed ones reach the daemon
        after = _open_until_refused(m.path, files)
        _close_all(after)
        if len(after) == len(budget):
            break
        time.sleep(0.1)
    assert len(after) == len(budget)
    assert not (upper / "top").exists()


@pytest.mark.parametrize("options", ["xattr_permissions=1", "xattr_permissions=2", "index=on"])
def test_changes_of_a_renamed_over_directory_under_options(overlay_mount, layers_factory,
                                                          options):
    """review11: an open upper directory renamed over, then changed through its fd under
    ``xattr_permissions`` (the owner and mode kept in an override xattr, never listed)
    and ``index=on``: the changes show through the fd, and the directory that took the
    name keeps its own."""
    layers = layers_factory({"lower": {"l": "l\n"}})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers['lower']},upperdir={upper},workdir={work},{options}")
    os.mkdir(m.path / "d", 0o755)
    os.mkdir(m.path / "e", 0o755)
    fd = os.open(m.path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(m.path / "e", m.path / "d")
        os.fchmod(fd, 0o710)
        os.fchown(fd, 1234, 4321)
        os.setxattr(fd, "user.x", b"1")
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o710, 1234, 4321)
        assert os.listxattr(fd) == ["user.x"]
        now = os.stat(m.path / "d")
        assert (stat.S_IMODE(now.st_mode), now.st_uid, now.st_gid) == (0o755, 0, 0)
        assert os.listxattr(m.path / "d") == []
    finally:
        os.close(fd)
