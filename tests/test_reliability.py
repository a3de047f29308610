"""Crash and fault safety (issue 8): kill -9 during copy-up, a full upper, EIO and crashes
injected in the daemon, stale mounts, two daemons on one upper.

Every test checks the backing dirs as well as the merged view: the lower byte for byte,
the upper for half-copied files, ``workdir/work`` for leftovers. Faults are armed with
``OVERLAYPC_FAULTS`` (see ``overlaypc/faults.py``); ``pause`` makes the daemon SIGSTOP
itself at the named point so the kill -9 lands exactly there.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import subprocess
from pathlib import Path

import pytest

import helpers
from reliability_support import (MiB, errno_name, free_bytes, kill_at_pause, kill_daemon,
                                 lazy_detach, loop_fs, outcome, pattern, sha256_file)
from coherence_support import stats
from upper_support import stack_options, work_leftovers

pytestmark = pytest.mark.mount

BIG = 64 * MiB


def _stack(base: Path, lower_files: dict[str, bytes]) -> tuple[Path, Path, Path]:
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    for rel, data in lower_files.items():
        p = lower / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return lower, upper, work


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _assert_alive(m: helpers.Mount) -> None:
    assert m.proc is not None and m.proc.poll() is None, f"daemon died:\n{m.log_text()}"


# --------------------------------------------------------------------------------------
# kill -9 during copy-up
# --------------------------------------------------------------------------------------

# point armed with "pause" -> what must be in workdir/work when the daemon stops there
KILL_POINTS = {
    "copyup.data@0": "temp created, no data yet",
    f"copyup.data@{24 * MiB}": "temp holds a partial copy",
    "copyup.fsync": "temp complete, not yet fsynced",
    "copyup.rename": "temp complete and fsynced, not yet renamed",
    # the source's open (through its parent's held fd since copyup49: Layer.open_at); since
    # copyup53 before the temp's creation (the source's flags are read first, for the change's
    # check): nothing in workdir/work yet
    "layer.open": "source not opened yet, no temp created",
}


@pytest.mark.parametrize("point", list(KILL_POINTS), ids=lambda p: p.replace("copyup.", ""))
def test_kill9_during_copyup_leaves_lower_or_complete_copy(point, tmpfs_factory, overlay_mount):
    """kill -9 at a deterministic point of a 64 MiB non-reflink copy-up (tmpfs): after a lazy
    unmount and a fresh mount the file is the complete lower data, the temp is gone, the
    lower is unchanged, and a new copy-up then works."""
    base = tmpfs_factory("200m")
    data = pattern(BIG, seed=8)
    lower, upper, work = _stack(base, {"dir/big.bin": data, "small.txt": b"small\n"})
    lower_state, lower_hash = helpers.dir_state(lower), sha256_file(lower / "dir/big.bin")
    opts = stack_options([lower], upper, work)

    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS": f"{point}~big=pause"})

    def the_temp_copy_so_far() -> None:
        temps = work_leftovers(work)
        if point == "layer.open":
            assert temps == [], KILL_POINTS[point]
            return
        assert len(temps) == 1, temps
        tmp_size = os.lstat(work / "work" / temps[0]).st_size
        if point.startswith("copyup.data@") and not point.endswith("@0"):
            threshold = int(point.split("@")[1])
            assert threshold <= tmp_size < BIG, f"{KILL_POINTS[point]}: temp size {tmp_size}"
        elif point == "copyup.data@0":
            assert tmp_size == 0
        else:
            assert tmp_size == BIG and sha256_file(work / "work" / temps[0]) == lower_hash
    rc, out, err = kill_at_pause(m, f"""
        try:
            fd = os.open({str(m / 'dir/big.bin')!r}, os.O_RDWR)
        except OSError as e:
            print(errno.errorcode.get(e.errno, e.errno)); sys.exit(1)
        os.pwrite(fd, b"NEW", 0)
        print("opened"); sys.exit(0)
    """, point, the_temp_copy_so_far)
    assert rc != 0, f"the open blocked in the killed daemon succeeded: {out} {err}"

    assert not (upper / "dir/big.bin").exists(), "copy landed in upper although never renamed"
    m2 = overlay_mount(opts)
    assert work_leftovers(work) == [], "workdir/work not cleaned at mount"
    assert sha256_file(m2 / "dir/big.bin") == lower_hash, "merged view shows a partial copy"
    assert _read(m2 / "small.txt") == b"small\n"
    # the next copy-up completes normally
    with open(m2 / "dir/big.bin", "r+b") as f:
        f.write(b"NEW")
    assert _read(upper / "dir/big.bin") == b"NEW" + data[3:]
    m2.unmount()
    assert helpers.dir_state(lower) == lower_state and sha256_file(lower / "dir/big.bin") == lower_hash
    assert work_leftovers(work) == []


def test_kill9_after_completed_copyup_and_fsync_keeps_new_data(tmpfs_factory, overlay_mount):
    """The other outcome: once copy-up finished and the caller's write was fsynced, a kill -9
    leaves the complete new data (and still no leftovers, lower unchanged)."""
    base = tmpfs_factory("200m")
    data = pattern(BIG, seed=9)
    lower, upper, work = _stack(base, {"big.bin": data})
    lower_state = helpers.dir_state(lower)
    opts = stack_options([lower], upper, work)
    m = overlay_mount(opts)
    new = pattern(MiB, seed=10)
    fd = os.open(m / "big.bin", os.O_RDWR)
    try:
        os.pwrite(fd, new, 5 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    kill_daemon(m)
    expected = data[:5 * MiB] + new + data[6 * MiB:]
    m2 = overlay_mount(opts)
    assert _read(m2 / "big.bin") == expected
    assert work_leftovers(work) == []
    m2.unmount()
    assert helpers.dir_state(lower) == lower_state


def test_kill9_leaves_a_deep_tree_in_the_workdir_the_next_mount_removes(tmp_path, overlay_mount):
    """A tree 3,000 directories deep in workdir/work when the daemon is killed (deeper than
    Python's recursion limit): the next mount's clean-up removes it and leaves work/ empty.
    Before: the clean-up recursed per level (RecursionError) and the mount failed."""
    lower, upper, work = _stack(tmp_path / "s", {"keep.txt": b"keep\n"})
    opts = stack_options([lower], upper, work)
    m = overlay_mount(opts)
    fd = os.open(work / "work", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir("#left", dir_fd=fd)
        for level in range(3000):
            below = os.open("#left" if level == 0 else "d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
            os.mkdir("d", dir_fd=fd)
            if level % 1000 == 0:
                os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    kill_daemon(m)
    try:
        m2 = overlay_mount(opts)
        assert work_leftovers(work) == []
        assert _read(m2 / "keep.txt") == b"keep\n"
        m2.unmount()
        assert m2.returncode == 0
    finally:
        # (a tree left behind would fail pytest's own clean-up of old base directories)
        subprocess.run(["rm", "-rf", str(work / "work" / "#left")], check=True)


CREATIONS = {  # what a non-root user makes in d/, as a child that blocks on the mount
    "create": "fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)",
    "mkdir": "os.mkdir(p, 0o750)",
    "symlink": "os.symlink('target', p)",
}


@pytest.mark.parametrize("kind", list(CREATIONS))
def test_kill9_during_creation_by_another_user_leaves_no_daemon_owned_object(
        kind, tmp_path, overlay_mount):
    """A user's new object gets its owner from the daemon after it is made (chown); kill -9
    at that chown (hunt8c's random crashes as one deterministic point): after recovery the
    name is absent or the object is the user's, never root's (the kernel makes it with the
    caller's fsuid at once). Built in workdir/work and renamed into place, it is."""
    lower, upper, work = _stack(tmp_path / "s", {"keep.txt": b"keep\n"})
    (upper / "d").mkdir(mode=0o777)
    os.chmod(upper / "d", 0o777)
    opts = stack_options([lower], upper, work)
    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS": "layer.chown~new=pause"})
    rc, out, err = kill_at_pause(m, f"""
        os.chdir({str(m / 'd')!r})  # as root: the test's base directory is 0700
        os.setgid(1000); os.setuid(1000)
        p = "new"
        {CREATIONS[kind]}
        print("made")
    """, "the chown")
    assert rc != 0, f"the creation blocked in the killed daemon succeeded: {out} {err}"
    m2 = overlay_mount(opts)
    assert work_leftovers(work) == []
    names = os.listdir(m2 / "d")
    assert names in ([], ["new"]), names
    if names:
        st = os.lstat(m2 / "d" / "new")
        assert (st.st_uid, st.st_gid) == (1000, 1000), \
            f"{kind}: a kill -9 left the user's new object owned by {st.st_uid}:{st.st_gid}"
    (m2 / "d" / "after").write_bytes(b"after\n")  # the directory still takes new names
    assert sorted(os.listdir(m2 / "d")) == sorted(names + ["after"])


# --------------------------------------------------------------------------------------
# Stale mounts and a second daemon
# --------------------------------------------------------------------------------------

def test_stale_mount_is_refused_with_recovery_hint(tmp_path, overlay_mount, mountpoint):
    """A mount whose daemon was killed: mounting over it (or using it as a layer) exits 2
    naming ``umount -l`` and ``fusermount3 -u -z``; after that recovery a mount works."""
    lower, upper, work = _stack(tmp_path / "s", {"f.txt": b"lower\n"})
    opts = stack_options([lower], upper, work)
    m = overlay_mount(opts)
    kill_daemon(m, detach=False)
    try:
        with pytest.raises(OSError) as ei:
            os.stat(m.mountpoint / "f.txt")
        assert ei.value.errno == errno.ENOTCONN
        upper_before = helpers.dir_state(upper)

        r = helpers.run_overlaypc(["-o", opts, m.mountpoint], m.mountpoint, tmp_path)
        assert r.returncode == 2 and not r.wrongly_mounted, r
        assert "umount -l" in r.stderr and "fusermount3 -u -z" in r.stderr, r.stderr
        assert str(m.mountpoint) in r.stderr

        other = mountpoint()
        r2 = helpers.run_overlaypc(["-o", f"lowerdir={m.mountpoint}", other], other, tmp_path)
        assert r2.returncode == 2 and not r2.wrongly_mounted, r2
        assert "umount -l" in r2.stderr and "fusermount3 -u -z" in r2.stderr, r2.stderr
        assert helpers.dir_state(upper) == upper_before
    finally:
        lazy_detach(m.mountpoint)
    m2 = overlay_mount(opts, mnt=m.mountpoint)
    assert _read(m2 / "f.txt") == b"lower\n"


@pytest.mark.parametrize("share", ["upper+work", "upper", "work"])
def test_second_daemon_on_same_upper_or_workdir_is_refused(share, tmp_path, overlay_mount,
                                                           mountpoint):
    lower, upper, work = _stack(tmp_path / "s", {"f.txt": b"lower\n"})
    upper2, work2 = tmp_path / "s" / "upper2", tmp_path / "s" / "work2"
    upper2.mkdir()
    work2.mkdir()
    m = overlay_mount(stack_options([lower], upper, work))
    with open(m / "before.txt", "w") as f:
        f.write("first\n")
    second = {"upper+work": (upper, work), "upper": (upper, work2), "work": (upper2, work)}[share]
    other = mountpoint()
    upper_before = helpers.dir_state(upper)
    r = helpers.run_overlaypc(["-o", stack_options([lower], *second), other], other, tmp_path)
    assert r.returncode == 2 and not r.wrongly_mounted, r
    assert "in use" in r.stderr, r.stderr
    assert helpers.dir_state(upper) == upper_before
    # the first daemon is unharmed: it reads, writes and copies up
    _assert_alive(m)
    assert _read(m / "before.txt") == b"first\n"
    with open(m / "f.txt", "a") as f:
        f.write("appended\n")
    with open(m / "after.txt", "w") as f:
        f.write("still writable\n")
    assert _read(upper / "f.txt") == b"lower\nappended\n"
    assert _read(upper / "after.txt") == b"still writable\n"
    m.unmount()
    assert work_leftovers(work) == []


# --------------------------------------------------------------------------------------
# Full upper
# --------------------------------------------------------------------------------------

def test_full_upper_enospc(tmp_path, overlay_mount):
    """A 32 MiB ext4 upper: copy-up of a 48 MiB lower file fails with ENOSPC and leaves
    nothing behind; writes that fill the disk get ENOSPC; the daemon keeps serving, and
    once space is freed copy-up works again. The lower is unchanged throughout."""
    big, mid, tiny = pattern(48 * MiB, 1), pattern(6 * MiB, 2), pattern(200_000, 3)
    lower = tmp_path / "lower"
    for rel, data in {"big.bin": big, "mid.bin": mid, "tiny.bin": tiny,
                      "deep/a/b/c.bin": tiny, "small.txt": b"small\n"}.items():
        (lower / rel).parent.mkdir(parents=True, exist_ok=True)
        (lower / rel).write_bytes(data)
    lower_state = helpers.dir_state(lower)
    with loop_fs(tmp_path / "loop", 32, "ext4") as fs:
        upper, work = fs / "upper", fs / "work"
        upper.mkdir()
        work.mkdir()
        m = overlay_mount(stack_options([lower], upper, work))
        free0 = free_bytes(fs)
        assert free0 < len(big)

        # copy-up bigger than the free space
        with pytest.raises(OSError) as ei:
            os.open(m / "big.bin", os.O_RDWR)
        assert ei.value.errno == errno.ENOSPC, errno_name(ei.value)
        assert not (upper / "big.bin").exists() and work_leftovers(work) == []
        assert sha256_file(m / "big.bin") == sha256_file(lower / "big.bin")
        assert free_bytes(fs) >= free0 - MiB, "space of the failed copy not given back"
        _assert_alive(m)

        # a copy-up that fits still works
        with open(m / "mid.bin", "r+b") as f:
            f.write(b"M")
        assert _read(upper / "mid.bin") == b"M" + mid[1:]

        # fill the disk with writes (again and again: ext4 gives back preallocated blocks
        # at close, so one file rarely fills it to the last block)
        written = 0
        for i in itertools.count():
            assert i < 50, "the disk never filled up"
            first = True
            with pytest.raises(OSError) as ei:
                with open(m / f"fill{i}.bin", "wb", buffering=0) as f:
                    while written < 64 * MiB:
                        written += f.write(b"F" * (MiB if first else 4096))
                        first = False
            assert ei.value.errno == errno.ENOSPC, errno_name(ei.value)
            assert (m / f"fill{i}.bin").stat().st_size == (upper / f"fill{i}.bin").stat().st_size
            if first:
                break
        assert written < 32 * MiB
        fills = sorted(n for n in os.listdir(m.path) if n.startswith("fill"))

        # disk full: copy-ups (data, and with ancestors) fail cleanly, the rest is served
        for rel in ("tiny.bin", "deep/a/b/c.bin"):
            with pytest.raises(OSError) as ei:
                with open(m / rel, "r+b") as f:
                    f.write(b"T")
            assert ei.value.errno == errno.ENOSPC, (rel, errno_name(ei.value))
            assert not (upper / rel).exists(), f"half-copied {rel} in upper"
            assert _read(m / rel) == tiny
        assert work_leftovers(work) == []
        assert _read(m / "small.txt") == b"small\n"
        assert sorted(os.listdir(m.path)) == sorted(["big.bin", "deep", "mid.bin", "small.txt",
                                                "tiny.bin", *fills])
        _assert_alive(m)

        # space freed: everything works again
        for name in fills:
            os.unlink(m / name)
        with open(m / "tiny.bin", "r+b") as f:
            f.write(b"T")
        assert _read(m / "tiny.bin") == b"T" + tiny[1:] == _read(upper / "tiny.bin")
        m.unmount()
        assert work_leftovers(work) == []
    assert helpers.dir_state(lower) == lower_state


# --------------------------------------------------------------------------------------
# Injected errors and crashes
# --------------------------------------------------------------------------------------

def test_eio_from_backing_file_reaches_caller_daemon_keeps_serving(tmp_path, overlay_mount):
    lower, upper, work = _stack(tmp_path / "s", {"broken.bin": pattern(300_000, 5),
                                                  "ok.bin": pattern(300_000, 6)})
    # passthrough=off: the faults are injected into the daemon's reads, which never see an
    # upper file's I/O with passthrough (the kernel reads the backing file itself)
    m = overlay_mount(stack_options([lower], upper, work, "passthrough=off"),
                      env={"OVERLAYPC_FAULTS": "file.read~broken=eio"})
    for _ in range(2):  # not cached as success, not fatal
        with pytest.raises(OSError) as ei:
            _read(m / "broken.bin")
        assert ei.value.errno == errno.EIO
        assert _read(m / "ok.bin") == (lower / "ok.bin").read_bytes()
    assert os.stat(m / "broken.bin").st_size == 300_000
    # after copy-up the fault still applies to the (upper) backing file, and only to it
    with open(m / "broken.bin", "r+b") as f:
        f.write(b"x")
    with pytest.raises(OSError) as ei:
        _read(m / "broken.bin")
    assert ei.value.errno == errno.EIO
    with open(m / "new.txt", "w") as f:
        f.write("new\n")
    assert _read(m / "new.txt") == b"new\n"
    _assert_alive(m)


FAULTED_ERRNO_CASES = {
    # fault spec -> (operation on MNT, expected errno)
    "copyup.fsync~nospace=enospc": ("copyup", "nospace.bin", errno.ENOSPC),
    "copyup.data~nospace=enospc": ("copyup", "nospace.bin", errno.ENOSPC),
    "layer.rename~nospace=eio": ("copyup", "nospace.bin", errno.EIO),
    "file.write~nospace=enospc": ("write", "nospace.bin", errno.ENOSPC),
}


@pytest.mark.parametrize("spec", list(FAULTED_ERRNO_CASES))
def test_injected_errno_during_copyup_and_write_leaves_no_trace(spec, tmp_path, overlay_mount):
    op, rel, code = FAULTED_ERRNO_CASES[spec]
    data = pattern(3 * MiB, 7)
    lower, upper, work = _stack(tmp_path / "s", {rel: data, "other.bin": b"other\n"})
    lower_state = helpers.dir_state(lower)
    # passthrough=off: a write through the open that copied the file up is the daemon's
    m = overlay_mount(stack_options([lower], upper, work, "passthrough=off"),
                      env={"OVERLAYPC_FAULTS": spec})
    with pytest.raises(OSError) as ei:
        with open(m / rel, "r+b", buffering=0) as f:
            f.write(b"W")
    assert ei.value.errno == code, errno_name(ei.value)
    assert work_leftovers(work) == []
    if op == "copyup":
        assert not (upper / rel).exists()
    else:  # the copy-up itself succeeded; the write did not change a byte
        assert (upper / rel).read_bytes() == data
    assert _read(m / rel) == data
    with open(m / "other.bin", "r+b") as f:  # other copy-ups are unaffected
        f.write(b"O")
    assert _read(upper / "other.bin") == b"Other\n"
    _assert_alive(m)
    m.unmount()
    assert helpers.dir_state(lower) == lower_state


@pytest.mark.parametrize("action", ["eio", "eperm"])
def test_a_copy_up_is_done_when_its_parents_times_cannot_be_set(action, tmp_path, overlay_mount):
    """A copy-up sets its parent's times back after the copy took its name; the kernel
    does that as best effort (``ovl_set_timestamps``' error ignored), so a failure there
    (injected at ``layer.utime`` of the parent, ``keep``) is no failure of the copy-up:
    the open for writing succeeds, the copy holds the write, the parent's mtime moved."""
    lower, upper, work = _stack(tmp_path / "s", {"keep/f.bin": b"lower\n", "keep/g": b"g\n"})
    (upper / "keep").mkdir()  # (merged: the copy-up of f goes into it at once)
    os.utime(upper / "keep", ns=(10**18, 10**18))
    m = overlay_mount(stack_options([lower], upper, work),
                      env={"OVERLAYPC_FAULTS": f"layer.utime~keep={action}"})
    with open(m / "keep/f.bin", "ab") as f:
        f.write(b"more\n")
    assert (upper / "keep/f.bin").read_bytes() == b"lower\nmore\n"
    assert _read(m / "keep/f.bin") == b"lower\nmore\n"
    assert os.stat(upper / "keep").st_mtime_ns != 10**18  # (the injected failure was hit)
    _assert_alive(m)
    m.unmount()
    assert m.returncode == 0


def test_eio_at_the_sources_open_fails_the_copy_up_and_leaves_no_trace(tmp_path, overlay_mount):
    """The copy-up opens its source through the parent's fd its lookup found it in
    (``Layer.open_at``, copyup49), at ``layer.open``'s fault point as every layer open:
    EIO there fails the open for writing, leaves no copy and no temp, and other copy-ups
    work (the file itself stays unreadable through the mount while the fault is armed)."""
    data = pattern(3 * MiB, 7)
    lower, upper, work = _stack(tmp_path / "s", {"dir/nospace.bin": data, "dir/other.bin": b"other\n"})
    lower_state = helpers.dir_state(lower)
    m = overlay_mount(stack_options([lower], upper, work),
                      env={"OVERLAYPC_FAULTS": "layer.open~nospace=eio"})
    assert sorted(os.listdir(m / "dir")) == ["nospace.bin", "other.bin"]
    with pytest.raises(OSError) as ei:
        with open(m / "dir/nospace.bin", "r+b", buffering=0) as f:
            f.write(b"W")
    assert ei.value.errno == errno.EIO, errno_name(ei.value)
    assert work_leftovers(work) == []
    assert not (upper / "dir/nospace.bin").exists()
    with open(m / "dir/other.bin", "r+b") as f:
        f.write(b"O")
    assert _read(upper / "dir/other.bin") == b"Other\n"
    _assert_alive(m)
    m.unmount()
    assert helpers.dir_state(lower) == lower_state


def test_rmdir_is_done_when_the_workdir_cleanup_fails(tmp_path, overlay_mount):
    """rmdir moves the upper directory into workdir/work, then removes it there. When that
    cleanup fails (injected EIO) the directory is gone from the merged view all the same:
    rmdir answers 0 (the kernel's overlay only warns, ovl_cleanup), the lookup cache holds
    no fd of the moved directory (a file made under the old name would land in the
    workdir, invisible), and the name takes a new directory."""
    lower, upper, work = _stack(tmp_path / "s", {"keep.txt": b"k\n"})
    m = overlay_mount(stack_options([lower], upper, work),
                      env={"OVERLAYPC_FAULTS": "layer.rmdir~ovlpc-new=eio"})
    os.mkdir(m / "d")
    try:
        os.rmdir(m / "d")
        answer = 0
    except OSError as e:
        answer = e.errno
    assert not (upper / "d").exists()
    # whatever the answer was, nothing may be made in the directory that is no longer there
    with pytest.raises(FileNotFoundError):
        with open(m / "d" / "f", "xb") as f:
            f.write(b"lost\n")
    assert [p for p in (work / "work").rglob("f")] == []
    assert answer == 0, errno_name(OSError(answer, ""))
    os.mkdir(m / "d")
    (m / "d" / "f").write_bytes(b"f\n")
    assert (upper / "d" / "f").read_bytes() == b"f\n"
    assert os.listdir(m / "d") == ["f"]
    _assert_alive(m)
    m.unmount()
    assert m.returncode == 0


def test_rename_over_a_whiteout_is_done_when_its_cleanup_fails(tmp_path, overlay_mount):
    """A directory renamed over a whiteout swaps places with it; the whiteout, now at the
    old name, is then removed when no lower has that name. When that removal fails
    (injected EIO) the rename has happened all the same: answered 0 (the kernel's
    ovl_rename only warns, ovl_cleanup), and nothing is made through the old name (the
    lookup cache held the moved directory's fd under it: a file landed in the new one)."""
    lower, upper, work = _stack(tmp_path / "s", {"gone/keep.txt": b"k\n"})
    m = overlay_mount(stack_options([lower], upper, work, "redirect_dir=on"),
                      env={"OVERLAYPC_FAULTS": "layer.unlink~srcdir=eio"})
    (m / "gone" / "keep.txt").unlink()
    os.rmdir(m / "gone")  # a whiteout in the upper: the lower has the name
    os.mkdir(m / "srcdir")
    (m / "srcdir" / "inside.txt").write_bytes(b"i\n")
    try:
        os.rename(m / "srcdir", m / "gone")
        answer = 0
    except OSError as e:
        answer = e.errno
    assert (upper / "gone" / "inside.txt").read_bytes() == b"i\n"
    with pytest.raises(FileNotFoundError):
        with open(m / "srcdir" / "new.txt", "xb") as f:
            f.write(b"lost\n")
    assert not (upper / "gone" / "new.txt").exists()
    assert answer == 0, errno_name(OSError(answer, ""))
    assert sorted(os.listdir(m.path)) == ["gone"]
    assert os.listdir(m / "gone") == ["inside.txt"]
    _assert_alive(m)
    m.unmount()
    assert m.returncode == 0


def test_rename_over_a_merged_empty_dir_hides_its_lowers_when_emptying_fails(tmp_path, overlay_mount):
    """A directory renamed over a merged-empty one: the target's whiteouts must go first
    (rename(2) replaces only an empty directory). When removing one fails (injected EIO),
    the rename fails, and the target still shows none of the lower entries it had hidden:
    it is made opaque before its whiteouts go, as the kernel's ovl_clear_empty replaces it
    with an opaque directory before the rename."""
    names = [f"n{i:02d}" for i in range(8)]
    lower, upper, work = _stack(tmp_path / "s", {f"t/{n}": b"lower\n" for n in names})
    (upper / "t").mkdir()
    for n in names:
        os.mknod(upper / "t" / n, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    last = os.listdir(upper / "t")[-1]  # the daemon removes them in this order: all but one go
    m = overlay_mount(stack_options([lower], upper, work, "redirect_dir=on"),
                      env={"OVERLAYPC_FAULTS": f"layer.unlink~t/{last}=eio"})
    assert os.listdir(m / "t") == []
    os.mkdir(m / "src")
    (m / "src" / "inside.txt").write_bytes(b"i\n")
    assert outcome(lambda: os.rename(m / "src", m / "t")) == "EIO"
    # no lower entry shows again (looked up: the kernel may keep the listing read above)
    assert [n for n in names if os.path.lexists(m / "t" / n)] == []
    assert (m / "src" / "inside.txt").read_bytes() == b"i\n"
    _assert_alive(m)
    m.unmount()
    assert m.returncode == 0
    m = overlay_mount(stack_options([lower], upper, work, "redirect_dir=on"))
    assert os.listdir(m / "t") == []
    assert sorted(os.listdir(m.path)) == ["src", "t"]


def test_changes_over_a_wh_marker_are_done_when_its_removal_fails(tmp_path, overlay_mount):
    """Where whiteouts are .wh.NAME files (0/0 devices refused: injected), a name made
    again (create, mkdir) or renamed onto makes its marker inert; removing it then is
    cleanup. When that fails (injected EIO) the change is done all the same and answered
    0 (it was answered EIO though the object was in place)."""
    lower, upper, work = _stack(tmp_path / "s", {"f": b"f\n", "g": b"g\n", "d/x": b"x\n"})
    m = overlay_mount(stack_options([lower], upper, work, "redirect_dir=on"),
                      env={"OVERLAYPC_FAULTS": "whiteout.mknod=eperm,layer.unlink~.wh.=eio"})
    os.unlink(m / "f")
    os.unlink(m / "g")
    os.unlink(m / "d" / "x")
    os.rmdir(m / "d")
    assert sorted(p.name for p in upper.iterdir()) == [".wh.d", ".wh.f", ".wh.g"]
    assert sorted(os.listdir(m.path)) == []

    def create() -> None:
        with open(m / "f", "xb") as f:
            f.write(b"new f\n")

    (m / "src").write_bytes(b"moved\n")
    answers = {"create": outcome(create), "mkdir": outcome(lambda: os.mkdir(m / "d")),
               "rename": outcome(lambda: os.rename(m / "src", m / "g"))}
    assert (upper / "f").read_bytes() == b"new f\n"
    assert (upper / "g").read_bytes() == b"moved\n" and not (upper / "src").exists()
    assert answers == {"create": "ok", "mkdir": "ok", "rename": "ok"}
    assert sorted(os.listdir(m.path)) == ["d", "f", "g"]
    assert os.listdir(m / "d") == []  # opaque: the lower d/x stays hidden
    assert (m / "f").read_bytes() == b"new f\n" and (m / "g").read_bytes() == b"moved\n"
    assert "cannot remove" in m.log_text()
    _assert_alive(m)
    m.unmount()
    assert m.returncode == 0


def test_link_count_changes_are_done_when_the_index_update_fails(tmp_path, overlay_mount):
    """index=on: link, unlink and a rename over a name of an indexed inode also record the
    overlay's link count on the index entry. When that fails (injected EIO) the change is
    done all the same and answered 0 (the kernel keeps its count relative to the upper
    inode's, so an upper link change needs no update; a missed one only miscounts)."""
    lower, upper, work = _stack(tmp_path / "s", {"a": b"shared\n"})
    os.link(lower / "a", lower / "b")
    os.link(lower / "a", lower / "c")
    opts = stack_options([lower], upper, work, "index=on")
    m = overlay_mount(opts)
    with open(m / "a", "r+b") as f:  # copied up into workdir/index, upper/a a link to it
        f.write(b"S")
    os.chmod(m / "b", 0o600)  # b linked too
    m.unmount()
    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS": "index.adjust=eio"})
    (m / "src").write_bytes(b"src\n")
    answers = {"link": outcome(lambda: os.link(m / "a", m / "d")),
               "unlink": outcome(lambda: os.unlink(m / "b")),
               "rename": outcome(lambda: os.rename(m / "src", m / "a"))}
    assert os.path.samefile(upper / "d", work / "index" / os.listdir(work / "index")[0])
    assert (upper / "b").is_char_device() and (upper / "a").read_bytes() == b"src\n"
    assert answers == {"link": "ok", "unlink": "ok", "rename": "ok"}
    assert sorted(os.listdir(m.path)) == ["a", "c", "d"]
    assert (m / "d").read_bytes() == b"Shared\n"
    _assert_alive(m)
    m.unmount()
    assert m.returncode == 0


def test_rename_without_rename_whiteout_is_undone_when_the_whiteout_cannot_be_placed(
        tmp_path, overlay_mount):
    """Where the upper refuses RENAME_WHITEOUT (injected), a name that a lower also has
    is moved in steps: a whiteout made in workdir/work, then placed. When a step fails
    (injected EIO) the rename is answered EIO and changes nothing: the old name shows
    the upper object, never the lower one again, and a replaced target is still there
    (the object was moved first and the whiteout put at the old name after: the lower
    showed through the old name). The steps: the object moves (exchanged with a target it
    replaces), then the whiteout takes the old name; a crash between them loses nothing."""
    lower, upper, work = _stack(tmp_path / "s", {n: f"lower {n}\n".encode()
                                                  for n in ("mover", "mover2", "go", "go2")})
    opts = stack_options([lower], upper, work)
    m = overlay_mount(opts)
    for name in ("mover", "mover2", "go", "go2"):  # copied up here: the fault below hits renames
        (m / name).write_bytes(f"upper {name}\n".encode())
    (m / "target").write_bytes(b"target\n")
    (m / "target2").write_bytes(b"target 2\n")
    m.unmount()
    m = overlay_mount(opts, env={"OVERLAYPC_FAULTS":
                                 "namespace.rename_whiteout=eperm,namespace.place_whiteout~mover=eio"})
    answers = {"new name": outcome(lambda: os.rename(m / "mover", m / "dest")),
               "replace": outcome(lambda: os.rename(m / "mover2", m / "target"))}
    assert (m / "mover").read_bytes() == b"upper mover\n"
    assert (m / "mover2").read_bytes() == b"upper mover2\n"
    assert (m / "target").read_bytes() == b"target\n"
    assert answers == {"new name": "EIO", "replace": "EIO"}
    assert work_leftovers(work) == []
    # the same steps without a failure: moved, a whiteout at the old name
    os.rename(m / "go", m / "gone")
    os.rename(m / "go2", m / "target2")
    assert sorted(os.listdir(m.path)) == ["gone", "mover", "mover2", "target", "target2"]
    assert (m / "gone").read_bytes() == b"upper go\n"
    assert (m / "target2").read_bytes() == b"upper go2\n"
    assert work_leftovers(work) == []
    _assert_alive(m)
    m.unmount()
    assert m.returncode == 0
    assert sorted(os.listdir(upper)) == ["go", "go2", "gone", "mover", "mover2", "target", "target2"]
    assert (upper / "go").is_char_device() and (upper / "go2").is_char_device()


CRASH_CASES = {
    # fault spec -> what to do through the mount (must fail with EIO)
    "file.read~crashme=crash": lambda mnt: _read(mnt / "crashme.bin"),
    "file.write~crashme=crash": lambda mnt: (mnt / "crashme.bin").write_bytes(b"x"),
    "layer.mkdir~crashdir=crash": lambda mnt: os.mkdir(mnt / "crashdir"),
    "layer.unlink~crashme=crash": lambda mnt: os.unlink(mnt / "crashme_upper_only.bin"),
    "copyup.rename~crashme=crash": lambda mnt: os.chmod(mnt / "crashme.bin", 0o600),
}


@pytest.mark.daemon_errors_ok
@pytest.mark.parametrize("spec", list(CRASH_CASES), ids=lambda s: s.split("~")[0])
def test_unexpected_exception_is_logged_and_answered_eio(spec, tmp_path, overlay_mount):
    """An exception that is not an OSError (injected RuntimeError) becomes EIO, is logged at
    ERROR with its traceback, and the daemon goes on serving."""
    lower, upper, work = _stack(tmp_path / "s", {"crashme.bin": b"crash me\n",
                                                  "ok.txt": b"ok\n"})
    # passthrough=off: a write through the open that copied the file up is the daemon's
    m = overlay_mount(stack_options([lower], upper, work, "passthrough=off"),
                      env={"OVERLAYPC_FAULTS": spec})
    if spec.startswith("layer.unlink"):
        (m / "crashme_upper_only.bin").write_bytes(b"in upper\n")  # unlinked, no whiteout
    with pytest.raises(OSError) as ei:
        CRASH_CASES[spec](m.mountpoint)
    assert ei.value.errno == errno.EIO, errno_name(ei.value)
    _assert_alive(m)
    assert stats(m.path)["errors"] >= 1  # counted, as README's stats promise
    assert _read(m / "ok.txt") == b"ok\n"
    (m / "fresh.txt").write_bytes(b"fresh\n")
    assert _read(upper / "fresh.txt") == b"fresh\n"
    assert work_leftovers(work) == []
    log = m.log_text()
    assert "ERROR" in log and "Traceback" in log and "injected crash" in log, log
    m.unmount()
    assert m.returncode == 0
