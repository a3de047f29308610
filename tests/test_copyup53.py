"""copyup53: a change's immutable/append-only check made by the copy-up it needs, from the one
FS_IOC_GETFLAGS of the source the copy-up makes anyway (``CopyUp.ensure_upper``'s ``check``:
the source opened and its flags read before the temporary copy is created), and no chown of a
copy created with the owner it needs (``CopyUp._created``, checked by the stat after the
install: ``_owner_fixed``).

In-process (``CoreDriver``: SETATTR and OPEN requests through ``OverlayOps``, no FUSE) for
what is counted: the system calls a chmod's copy-up makes for its check and its owner. Through
mounts for what a user sees: EPERM for a flagged lower file with nothing left in the upper or
``workdir/work`` (parent copied up already or not), flags carried to the copy, the owner of
copies made for root and for a plain user, and a ``workdir/work`` given another group behind
the mount's back (the learnt owner then wrong: the copy chowned after its install).
"""
from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

import helpers
from overlaypc import copyup as copyup_mod, protattr, sysapi
from overlaypc.layer import Layer

from core_driver import CoreDriver, Walker
from upper_support import stack_options, work_leftovers

CAP = "security.capability"
#: a VFS_CAP_REVISION_2 value: cap_net_bind_service permitted and effective
CAP_VALUE = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")


def _chattr(path: Path, flags: str) -> None:
    subprocess.run(["chattr", flags, str(path)], check=True, capture_output=True)


def _flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return sysapi.get_flags(fd)
    finally:
        os.close(fd)


@pytest.fixture
def lower(tmp_path, request):
    """A lower tree: ``d/`` with plain, flagged and foreign-owned files; flags dropped at the end."""
    helpers.require("root")
    lo = tmp_path / "lower"
    (lo / "d").mkdir(parents=True)
    (lo / "e").mkdir()
    for name in ("plain", "plain2", "plain3", "immutable", "append", "noatime", "owned", "cap",
                 "mine"):
        (lo / "d" / name).write_bytes(b"data of " + name.encode())
        os.chmod(lo / "d" / name, 0o644)
    for name in ("immutable", "append"):
        (lo / "e" / name).write_bytes(b"below")
    os.chown(lo / "d" / "owned", 1234, 5678)
    os.chown(lo / "d" / "mine", 1000, 1000)
    os.chmod(lo / "d" / "mine", 0o644)
    os.setxattr(lo / "d" / "cap", CAP, CAP_VALUE)
    flagged = [lo / "d" / "immutable", lo / "d" / "append", lo / "e" / "immutable",
               lo / "e" / "append"]
    request.addfinalizer(lambda: [_chattr(q, "-ia") for q in flagged])
    for q in flagged:
        _chattr(q, "+i" if q.name == "immutable" else "+a")
    _chattr(lo / "d" / "noatime", "+A")
    return lo


# -- in-process: what the copy-up's check and owner cost ---------------------------------------
@pytest.fixture
def walker(lower, tmp_path):
    (tmp_path / "core").mkdir()
    os.symlink(lower, tmp_path / "core" / "lower")  # (``in_dir`` keeps a lower there)
    d = CoreDriver.in_dir(tmp_path / "core")
    yield Walker(d)
    d.close()


class _Counted:
    """Calls of the system calls a copy-up's check and owner could make, counted."""

    def __init__(self, monkeypatch) -> None:
        self.calls: dict[str, int] = {"statx": 0, "get_flags": 0, "fchown": 0, "create": 0}
        self._wrap(monkeypatch, sysapi, "statx_attributes", "statx")
        self._wrap(monkeypatch, sysapi, "get_flags", "get_flags")
        self._wrap(monkeypatch, Layer, "do_fchown", "fchown")
        self._wrap(monkeypatch, Layer, "create_at", "create")

    def _wrap(self, monkeypatch, owner, attr: str, key: str) -> None:
        real = getattr(owner, attr)

        def counted(*args, **kwargs):
            self.calls[key] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, attr, counted)

    def reset(self) -> None:
        for key in self.calls:
            self.calls[key] = 0


def test_a_chmods_copy_up_reads_the_flags_once_and_makes_no_statx(walker, monkeypatch):
    """A chmod of a lower regular file (its node's flags not known: the change's check asked of
    its lookup) reads the source's flags by one FS_IOC_GETFLAGS, in the copy-up, and no
    ``statx``: before copyup53 the check's ``statx`` came first, then the copy-up's ioctl."""
    walker.setattr("d", mode=0o755)  # (the parent in the upper: the leaf's own copy-up alone)
    counted = _Counted(monkeypatch)
    for name in ("plain", "plain2", "noatime"):
        counted.reset()
        st = walker.setattr(f"d/{name}", mode=0o600)
        assert stat.S_IMODE(st.mode) == 0o600
        # (a source with noatime has the copy's own flags read too, to set it there)
        wanted = (0, 2 if name == "noatime" else 1)
        assert (counted.calls["statx"], counted.calls["get_flags"]) == wanted, (name, counted.calls)
    upper = Path(walker.drv.fs.stack.upper.path)
    assert _flags(upper / "d" / "noatime") & protattr.FS_NOATIME_FL


@pytest.mark.parametrize("name", ["immutable", "append"])
@pytest.mark.parametrize("parent", ["in the upper", "not in the upper"])
def test_a_flagged_lower_file_is_refused_before_any_copy_is_created(walker, monkeypatch, name,
                                                                     parent):
    """EPERM for a chmod of an immutable or append-only lower file, before the temporary copy
    is created (no ``create_at``), nothing in the upper or ``workdir/work``; with its parent not
    copied up yet, the parent stays below too (the check comes before any ancestor's copy)."""
    d = "d" if parent == "in the upper" else "e"
    if parent == "in the upper":
        walker.setattr("d", mode=0o755)
    node = walker.node(f"{d}/{name}")
    counted = _Counted(monkeypatch)
    with pytest.raises(OSError) as e:
        walker.drv.setattr(node, mode=0o600)
    assert e.value.errno == errno.EPERM
    assert counted.calls["create"] == 0
    upper = Path(walker.drv.fs.stack.upper.path)
    assert not (upper / d / name).exists()
    assert (upper / d).exists() == (parent == "in the upper")
    assert work_leftovers(Path(walker.drv.fs.stack.work.path)) == []
    # the node keeps its flags: a second change is refused without a read
    counted.reset()
    with pytest.raises(OSError) as e:
        walker.drv.setattr(node, mode=0o600)
    assert e.value.errno == errno.EPERM
    assert sum(counted.calls.values()) == 0, counted.calls


def test_an_open_for_writing_checks_in_its_copy_up(walker, monkeypatch):
    """An open for writing of a lower file: the same one read of its flags (an append-only
    file opened ``O_APPEND`` copies up, its flag carried to the copy's ``protattr``; one opened
    for writing without it is refused with nothing copied)."""
    walker.setattr("d", mode=0o755)
    counted = _Counted(monkeypatch)
    with pytest.raises(OSError) as e:
        walker.drv.open(walker.node("d/append"), os.O_WRONLY)
    assert e.value.errno == errno.EPERM
    assert counted.calls["create"] == 0
    counted.reset()
    fh = walker.drv.open(walker.node("d/append"), os.O_WRONLY | os.O_APPEND)
    walker.drv.release(fh)
    assert (counted.calls["statx"], counted.calls["get_flags"]) == (0, 1), counted.calls
    upper = Path(walker.drv.fs.stack.upper.path)
    raw = os.getxattr(upper / "d" / "append", "trusted.overlay.protattr")
    assert protattr.parse(raw) == protattr.FS_APPEND_FL


def test_a_copy_created_with_its_owner_is_not_chowned(walker, monkeypatch):
    """The daemon (root) creates copies owned 0:0: a root-owned source's copy is not chowned
    (learnt from the mount's first copy), a foreign-owned one's is; both end with the source's
    owner. Before copyup53 every copy was chowned."""
    walker.setattr("d", mode=0o755)
    walker.setattr("d/plain3", mode=0o600)  # (the mount's first copy: learns)
    counted = _Counted(monkeypatch)
    walker.setattr("d/plain", mode=0o600)
    assert counted.calls["fchown"] == 0
    walker.setattr("d/owned", mode=0o600)
    assert counted.calls["fchown"] == 1
    upper = Path(walker.drv.fs.stack.upper.path)
    assert (os.stat(upper / "d" / "plain").st_uid, os.stat(upper / "d" / "plain").st_gid) == (0, 0)
    assert (os.stat(upper / "d" / "owned").st_uid, os.stat(upper / "d" / "owned").st_gid) == (1234, 5678)


# -- through mounts ------------------------------------------------------------------------------
def _mounted(overlay_mount, lower: Path, base: Path):
    upper, work = base / "upper", base / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    return overlay_mount(stack_options([lower], upper, work)), upper, work


@pytest.mark.mount
@pytest.mark.parametrize("op", ["chmod", "chown", "utime", "setxattr", "truncate", "open_w"])
def test_changes_of_flagged_lower_files_answer_eperm_and_leave_nothing(overlay_mount, lower,
                                                                       tmp_path, op):
    """Through the mount: EPERM for each change of an immutable lower file (and of an
    append-only one but ``open_w``... which an append-only file refuses too), with the upper
    and ``workdir/work`` left as they were."""
    m, upper, work = _mounted(overlay_mount, lower, tmp_path / "s")
    mnt = Path(m.path)
    os.chmod(mnt / "d", 0o755)  # (d copied up: the file's own copy-up would be next)
    acts = {
        "chmod": lambda p: os.chmod(p, 0o600),
        "chown": lambda p: os.chown(p, 1000, 1000),
        "utime": lambda p: os.utime(p, (1, 1)),
        "setxattr": lambda p: os.setxattr(p, "user.k", b"v"),
        "truncate": lambda p: os.truncate(p, 0),
        "open_w": lambda p: os.close(os.open(p, os.O_WRONLY)),
    }
    for d in ("d", "e"):
        for name in ("immutable", "append"):
            with pytest.raises(OSError) as e:
                acts[op](mnt / d / name)
            assert e.value.errno == errno.EPERM, (d, name)
    assert sorted(os.listdir(upper)) == ["d"]
    assert os.listdir(upper / "d") == []
    assert work_leftovers(work) == []


@pytest.mark.mount
def test_flags_owner_and_capability_are_carried_to_copies(overlay_mount, lower, tmp_path):
    """Copies made by a chmod through the mount: noatime on the copy, an append-only file
    appended to keeps its flag (then refuses a chmod), each copy's owner the source's (root's not
    chowned, 1234's chowned), a root-owned file's capability kept; and a plain user's chmod of
    its own file leaves a copy owned by that user."""
    m, upper, work = _mounted(overlay_mount, lower, tmp_path / "s")
    mnt = Path(m.path)
    for name in ("plain", "noatime", "owned", "cap"):
        os.chmod(mnt / "d" / name, 0o640)
    with open(mnt / "d" / "append", "ab") as f:
        f.write(b" more")
    with pytest.raises(OSError) as e:
        os.chmod(mnt / "d" / "append", 0o600)
    assert e.value.errno == errno.EPERM
    # (in the mount's ``d`` as root first: the test's base directory is 0700)
    r = subprocess.run(["python3", "-c", "import os; os.chmod('mine', 0o600)"], cwd=mnt / "d",
                       preexec_fn=lambda: (os.setgroups([]), os.setgid(1000), os.setuid(1000)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    owners = {name: (os.stat(upper / "d" / name).st_uid, os.stat(upper / "d" / name).st_gid,
                     stat.S_IMODE(os.stat(upper / "d" / name).st_mode))
              for name in ("plain", "noatime", "owned", "cap", "mine")}
    assert owners == {"plain": (0, 0, 0o640), "noatime": (0, 0, 0o640), "owned": (1234, 5678, 0o640),
                      "cap": (0, 0, 0o640), "mine": (1000, 1000, 0o600)}
    assert _flags(upper / "d" / "noatime") & protattr.FS_NOATIME_FL
    assert os.getxattr(upper / "d" / "cap", CAP) == CAP_VALUE
    assert protattr.parse(os.getxattr(upper / "d" / "append", "trusted.overlay.protattr")) \
        == protattr.FS_APPEND_FL
    assert (upper / "d" / "append").read_bytes() == b"data of append more"
    assert work_leftovers(work) == []


@pytest.mark.mount
def test_a_workdir_given_another_group_behind_the_mounts_back_still_gives_the_right_owner(
        overlay_mount, lower, tmp_path):
    """The owner copies are created with is learnt from the mount's first copy; ``workdir/work``
    made setgid with another group afterwards (behind the mount's back) creates copies of that
    group: the stat after the install sees it and the copy is chowned then, its setuid/setgid
    bits and its capability put back, and the next copies are chowned from the start."""
    m, upper, work = _mounted(overlay_mount, lower, tmp_path / "s")
    mnt = Path(m.path)
    os.chmod(mnt / "d" / "plain", 0o640)  # (the first copy: learns 0:0)
    os.chown(work / "work", 0, 4321)
    os.chmod(work / "work", 0o2700)
    try:
        os.chmod(mnt / "d" / "cap", 0o6755)
        os.chmod(mnt / "d" / "plain2", 0o2750)
        os.chmod(mnt / "d" / "plain3", 0o640)
    finally:
        os.chown(work / "work", 0, 0)
        os.chmod(work / "work", 0o700)
    for name, mode in (("cap", 0o6755), ("plain2", 0o2750), ("plain3", 0o640)):
        st = os.stat(upper / "d" / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode), name
        st = os.stat(mnt / "d" / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode), name
    assert os.getxattr(upper / "d" / "cap", CAP) == CAP_VALUE
    assert work_leftovers(work) == []
    assert "chowned after its install" in m.log_text()
    assert copyup_mod  # (the module under test)
