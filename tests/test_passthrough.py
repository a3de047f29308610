"""FUSE passthrough through real mounts (issue 16, items 1, 2 and 4).

Proof that a file passes through: the daemon serves none of its reads, so the stats'
``bytes_read`` stays flat while the data is read (and ``passthrough_opens`` counts the
opens). Proof that it does not: ``bytes_read`` grows by what was read.

- an upper file opened twice passes through; a lower file of a writable mount never does,
  nor does its copy while an open from before the copy-up is live (mixing: no EIO,
  coherent); every file of a read-only mount passes through;
- open(2) never fails (EIO is what the kernel answers a mode conflict) under a few
  hundred concurrent opens of one file in mixed modes;
- fallbacks: as uid 0 of a user namespace the kernel refuses passthrough (EPERM), with a
  layer on a kernel overlay it refuses that layer's files (ELOOP, stacking depth); files
  then go through the daemon, still right, and the log says why once;
- cache=shared on XFS: a read-only file whose map equals its canonical file's passes
  through to the canonical file (one cached copy), a partly shared one keeps the daemon
  path, which reads the shared part from the canonical file.
"""
from __future__ import annotations

import os
import pickle
import random
import threading
from pathlib import Path

import pytest

import helpers
import rootless_support as rs
from coherence_support import NEW, NEW_HEAD, OLD, Fds, make_stack, pread_all, released, stats

pytestmark = pytest.mark.mount

DATA = bytes(range(256)) * 1024  # 256 KiB


@pytest.fixture(params=["kernel", "shared"])
def cache(request) -> str:
    return request.param


def _read_twice(path: Path) -> bytes:
    with Fds() as fds:
        a = fds.open(path, os.O_RDONLY)
        b = fds.open(path, os.O_RDONLY)
        first, second = pread_all(a, 1 << 30), pread_all(b, 1 << 30)
    assert first == second
    return first


def test_upper_file_opened_twice_passes_through(overlay_mount, layers_factory, tmp_path, cache):
    st = make_stack(layers_factory, tmp_path, {"low": OLD})
    (st.upper / "up").write_bytes(DATA)
    m = overlay_mount(st.options(cache)).path
    before = stats(m)
    assert _read_twice(m / "up") == DATA
    after = stats(m)
    assert after["bytes_read"] == before["bytes_read"], after
    assert after["passthrough_opens"] - before["passthrough_opens"] == 2, after
    # writes pass through too, and read back through the daemon's view of the file
    with Fds() as fds:
        fw = fds.open(m / "up", os.O_RDWR)
        os.pwrite(fw, NEW_HEAD, 0)
        assert os.fstat(fw).st_size == len(DATA)
    assert stats(m)["bytes_written"] == before["bytes_written"]
    assert (st.upper / "up").read_bytes()[:4] == NEW_HEAD
    assert (m / "up").read_bytes() == NEW_HEAD + DATA[4:]


def _append_as_nobody(root: Path, name: str) -> int:
    """Append a byte to ``root/name`` as uid/gid 65534 with no capabilities (the parent
    directories of a test's tmp dir are 0700: the child opens relative to a dir fd), at
    its end without ``O_APPEND`` (an ``O_APPEND`` open does not pass through)."""
    dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)  # all uids nonzero: capabilities go
                fd = os.open(name, os.O_WRONLY, dir_fd=dirfd)
                os.pwrite(fd, b"x", os.fstat(fd).st_size)
                os.close(fd)
                os._exit(0)
            except BaseException:
                os._exit(1)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        os.close(dirfd)


def test_unprivileged_passthrough_write_strips_setuid_and_setgid(overlay_mount, layers_factory,
                                                                tmp_path, cache):
    """A passthrough write reaches neither the daemon nor its kill flag: what the kernel
    overlay strips at the first write by a caller without CAP_FSETID (setuid; setgid with
    group-exec) must go anyway, here at the writable open. Root's write keeps both."""
    st = make_stack(layers_factory, tmp_path, {"low": OLD})
    for name in ("nobody", "root"):
        (st.upper / name).write_bytes(DATA)
        os.chmod(st.upper / name, 0o6777)
    os.chmod(st.upper, 0o755)
    m = overlay_mount(st.options(cache)).path
    before = stats(m)["passthrough_opens"]
    assert _append_as_nobody(m, "nobody") == 0
    with open(m / "root", "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"x")
    assert stats(m)["passthrough_opens"] - before == 2  # both writes passed through
    assert oct(os.stat(m / "nobody").st_mode & 0o7777) == "0o777"
    assert oct(os.stat(st.upper / "nobody").st_mode & 0o7777) == "0o777"
    assert oct(os.stat(m / "root").st_mode & 0o7777) == "0o6777"


def test_passthrough_off_serves_every_read(overlay_mount, layers_factory, tmp_path):
    st = make_stack(layers_factory, tmp_path, {"low": OLD})
    (st.upper / "up").write_bytes(DATA)
    m = overlay_mount(st.options("kernel", extra="passthrough=off")).path
    before = stats(m)
    assert _read_twice(m / "up") == DATA
    after = stats(m)
    assert after["passthrough_opens"] == 0
    assert after["bytes_read"] - before["bytes_read"] >= len(DATA), after


def test_lower_file_of_a_writable_mount_never_passes_through(overlay_mount, layers_factory,
                                                             tmp_path, cache):
    st = make_stack(layers_factory, tmp_path, {"low": DATA})
    m = overlay_mount(st.options(cache)).path
    before = stats(m)
    assert _read_twice(m / "low") == DATA
    after = stats(m)
    assert after["passthrough_opens"] == 0, after
    assert after["bytes_read"] - before["bytes_read"] >= len(DATA), after


def test_copy_up_under_an_open_file_mixes_without_eio(overlay_mount, layers_factory, tmp_path,
                                                      cache):
    """A lower file opened, then written (copied up) and opened again while the first open
    is live: the new opens cannot pass through (the first is cached), nothing fails, every
    handle reads the new data. Once all are closed, the upper file passes through."""
    st = make_stack(layers_factory, tmp_path, {"foo": OLD})
    m = overlay_mount(st.options(cache)).path
    with Fds() as fds:
        fr = fds.open(m / "foo", os.O_RDONLY)
        assert pread_all(fr) == OLD
        fw = fds.open(m / "foo", os.O_RDWR)          # copy-up
        os.pwrite(fw, NEW_HEAD, 0)
        f3 = fds.open(m / "foo", os.O_RDONLY)        # upper now, but fr is cached
        f4 = fds.open(m / "foo", os.O_RDWR)
        assert pread_all(fr) == NEW and pread_all(f3) == NEW and pread_all(f4) == NEW
        assert stats(m)["passthrough_opens"] == 0
    before = released(m)
    assert _read_twice(m / "foo") == NEW
    after = stats(m)
    assert after["passthrough_opens"] == 2 and after["bytes_read"] == before["bytes_read"], after
    assert sum(after["copy_ups"].values()) == 1


def test_read_only_mount_passes_everything_through(overlay_mount, layers_factory, cache):
    layers = layers_factory({"top": {"a": DATA, "d/b": OLD}, "bottom": {"c": DATA[::-1]}})
    m = overlay_mount(f"lowerdir={layers.lowerdir},cache={cache}").path
    before = stats(m)
    assert _read_twice(m / "a") == DATA
    assert _read_twice(m / "d/b") == OLD
    assert _read_twice(m / "c") == DATA[::-1]
    after = stats(m)
    assert after["bytes_read"] == before["bytes_read"], after
    assert after["passthrough_opens"] == 6, after


def test_concurrent_opens_in_mixed_modes_never_fail(overlay_mount, layers_factory, tmp_path,
                                                    cache):
    """Threads open one file (lower at first: the first write open copies it up) read-only
    and read-write, keep some opens a while, and map some (a MAP_SHARED mapping of a
    direct-io file makes the inode cached for the kernel): no open may fail."""
    import mmap
    st = make_stack(layers_factory, tmp_path, {"foo": OLD})
    m = overlay_mount(st.options(cache)).path
    path = m / "foo"
    errors: list[str] = []
    opens = [0]
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[int] = []
        try:
            for _ in range(60):
                flags = rng.choice([os.O_RDONLY, os.O_RDONLY, os.O_RDWR])
                fd = os.open(path, flags)
                held.append(fd)
                with lock:
                    opens[0] += 1
                data = os.pread(fd, len(OLD), 0)
                if data not in (OLD, NEW):
                    errors.append(f"read {data[:16]!r}")
                if flags == os.O_RDWR and rng.random() < 0.3:
                    os.pwrite(fd, NEW_HEAD, 0)
                if rng.random() < 0.2:
                    mp = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
                    if mp[:4] not in (OLD[:4], NEW_HEAD):
                        errors.append(f"mapped {mp[:4]!r}")
                    mp.close()
                if len(held) > rng.randrange(1, 4):
                    os.close(held.pop(rng.randrange(len(held))))
        except OSError as e:
            errors.append(f"{e!r}")
        finally:
            for fd in held:
                os.close(fd)

    helpers.run_threads(worker, 5)
    assert not errors, errors[:5]
    assert opens[0] == 300
    assert (m / "foo").read_bytes() in (OLD, NEW)
    s = released(m)
    assert sum(s["copy_ups"].values()) == 1, s


# --------------------------------------------------------------------------------------
# Fallbacks
# --------------------------------------------------------------------------------------

EPERM_LOG = "FUSE passthrough is not permitted here"
ELOOP_LOG = "FUSE passthrough is off for files on device"


def test_user_namespace_falls_back_to_the_daemon(tmp_path, layers_factory):
    """uid 0 of a user namespace has no CAP_SYS_ADMIN in the initial namespace: the
    kernel refuses to register backing files (EPERM); every file goes through the daemon."""
    helpers.require_fuse_mount()
    import shutil
    import subprocess
    helpers.require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    r = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    helpers.require(r.returncode == 0, f"cannot make user namespaces: {r.stderr.decode().strip()}")
    layers = layers_factory({"low": {"keep": "keep\n"}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    mnt = tmp_path / "nsmnt"
    mnt.mkdir()
    report = tmp_path / "report.pickle"
    steps = ["echo one > new && cat new new > twice && cat twice > copy",
             "echo more >> keep && cat keep keep > keep2",
             "getfattr --only-values -n user.overlaypc.stats . > stats.json"]
    opts = f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}"
    r = rs.userns_session(opts, str(mnt), steps, str(report))
    assert r.returncode == 0, r.stderr.decode()
    out = pickle.loads(report.read_bytes())
    log = Path(str(report) + ".log").read_text()
    assert "error" not in out, f"{out['error']}\n{log}"
    for step, rc, text in out["steps"]:
        assert rc == 0, f"{step!r} failed: {text}\n{log}"
    assert out["daemon_status"] == 0, log
    snap = out["snapshot"]
    assert snap["copy"].content == b"one\none\n"
    assert snap["keep2"].content == b"keep\nmore\n" * 2
    assert log.count(EPERM_LOG) == 1, log
    import json
    s = json.loads(snap["stats.json"].content)
    # the daemon served the data (cat copies with copy_file_range, counted as bytes_copied)
    assert s["passthrough_opens"] == 0 and s["bytes_read"] + s["bytes_copied"] > 0, s


def test_layer_on_a_kernel_overlay_falls_back_for_its_files(overlay_mount, layers_factory,
                                                             kernel_mount, cache):
    """A lower layer on a kernel overlay (stacking depth 1, the negotiated maximum): the
    kernel refuses its files (ELOOP) and they go through the daemon; files of the other
    layer still pass through."""
    helpers.require("kernel_overlay")
    layers = layers_factory({"plain": {"p": DATA}, "under": {"o1": OLD, "o2": DATA[::-1]},
                             "under2": {"o3": OLD}})
    k = kernel_mount([layers["under"], layers["under2"]])  # a lower-only overlay needs two
    m = overlay_mount(f"lowerdir={layers['plain']}:{k},cache={cache}")
    before = stats(m.path)
    assert _read_twice(m.path / "o1") == OLD
    assert _read_twice(m.path / "o2") == DATA[::-1]
    mid = stats(m.path)
    assert mid["bytes_read"] - before["bytes_read"] >= len(OLD) + len(DATA), mid
    assert _read_twice(m.path / "p") == DATA
    after = stats(m.path)
    assert after["bytes_read"] == mid["bytes_read"], after
    assert after["passthrough_opens"] == 2, after
    assert m.log_text().count(ELOOP_LOG) == 1, m.log_text()


# --------------------------------------------------------------------------------------
# cache=shared on reflinked files (XFS)
# --------------------------------------------------------------------------------------

@pytest.mark.reflink
def test_reflinked_copies_pass_through_to_one_canonical_file(overlay_mount, xfs_dir):
    """A read-only cache=shared mount over reflinked copies: a full copy (same map, same
    size) passes through to the canonical file, so the lower pages are cached once; a
    partly rewritten copy keeps the daemon path, which serves its shared part from the
    canonical file."""
    from test_sharing import _data, _reflink, _resident, _write_synced
    import shutil
    helpers.require(shutil.which("fincore") is not None, "needs fincore (util-linux)")
    lower = xfs_dir / "lower"
    lower.mkdir()
    size = 4 << 20
    data = _data(size, 3)
    _write_synced(lower / "a", data)
    _reflink(lower / "a", lower / "b")
    _reflink(lower / "a", lower / "c")
    patch = b"\x5a" * 65536
    fd = os.open(lower / "c", os.O_WRONLY)
    try:
        os.pwrite(fd, patch, size // 2)
        os.fsync(fd)
    finally:
        os.close(fd)
    for name in "abc":
        helpers.evict(lower / name)
    m = overlay_mount(f"lowerdir={lower},cache=shared").path
    before = stats(m)
    assert _read_twice(m / "b") == data   # b is seen first: the canonical owner
    assert _read_twice(m / "a") == data   # a's map equals b's: through to b
    mid = stats(m)
    assert mid["bytes_read"] == before["bytes_read"], mid
    assert mid["passthrough_opens"] == 4, mid
    assert _resident(lower / "a") == 0
    assert _resident(lower / "b") >= size
    expected = data[:size // 2] + patch + data[size // 2 + len(patch):]
    assert (m / "c").read_bytes() == expected
    after = stats(m)
    assert after["passthrough_opens"] == 4, after
    assert after["bytes_read"] - mid["bytes_read"] >= size, after
    assert after["bytes_shared"] - mid["bytes_shared"] >= size - len(patch) - (64 << 10), after
    assert _resident(lower / "c") <= len(patch) + (64 << 10)
