"""FUSE over io_uring on a real mount: with ``fuse.enable_uring=Y`` (set by the fixture, the
old value restored) and ``uring=auto`` the daemon serves through the ring, and the
open-foo scenario, cache=shared reads, writes, listings, passthrough opens and the unmount
work through it. The daemon's log proves the path: the INIT line and the count of requests
the queues served. Root only; a kernel without the parameter (before 6.14, or built
without CONFIG_FUSE_IO_URING) skips, and fails under OVERLAYPC_REQUIRE_MOUNT=1."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import threading

import pytest

import helpers

PARAM = "/sys/module/fuse/parameters/enable_uring"


@pytest.fixture
def enable_uring():
    helpers.require("root")
    helpers.require(os.path.exists(PARAM), "no fuse.enable_uring (FUSE over io_uring: 6.14+)")
    with open(PARAM) as f:
        old = f.read().strip()
    with open(PARAM, "w") as f:
        f.write("Y")
    try:
        yield
    finally:
        with open(PARAM, "w") as f:
            f.write(old)


def _served(m: helpers.Mount) -> int:
    found = re.findall(r"the io_uring queues served (\d+) requests", m.log_text())
    assert found, m.log_text()
    return int(found[-1])


@pytest.mark.parametrize("cache", ["shared", "kernel"])
def test_requests_come_through_the_ring(enable_uring, overlay_mount, layers_factory, cache):
    layers = layers_factory({"low": {"foo": b"lower foo\n", "d": {"a": b"1", "b": b"2"},
                                     "big": os.urandom(1 << 20)}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.dirs['low']},upperdir={upper},workdir={work},"
                      f"cache={cache},uring=auto")
    assert "serving through FUSE over io_uring" in m.log_text()
    mnt = m.mountpoint
    # the open-foo scenario: a reader opened before the copy-up sees the writer's data
    fr = os.open(mnt / "foo", os.O_RDONLY)
    fw = os.open(mnt / "foo", os.O_RDWR)
    try:
        os.pwrite(fw, b"UPPER", 0)
        assert os.pread(fr, 5, 0) == b"UPPER"
        os.fsync(fw)
    finally:
        os.close(fw)
        os.close(fr)
    assert (upper / "foo").read_bytes() == b"UPPER foo\n"
    # reads of a lower file (cache=shared: every one a READ through the daemon)
    want = (layers.dirs["low"] / "big").read_bytes()
    fd = os.open(mnt / "big", os.O_RDONLY)
    try:
        for off in (0, 4096 * 7, (1 << 20) - 4096):
            assert os.pread(fd, 4096, off) == want[off:off + 4096]
    finally:
        with contextlib.suppress(OSError):  # (its FLUSH: ENOTCONN; the fd is closed)
            os.close(fd)
    # writes, a large one too (one request up to max_write), listings, renames, removal
    data = os.urandom(3 << 20)
    (mnt / "new").write_bytes(data)
    assert (mnt / "new").read_bytes() == data
    assert sorted(os.listdir(mnt / "d")) == ["a", "b"]
    os.mkdir(mnt / "d" / "c")
    os.rename(mnt / "d" / "a", mnt / "d" / "z")
    assert sorted(os.listdir(mnt / "d")) == ["b", "c", "z"]
    os.unlink(mnt / "d" / "b")
    assert sorted(e.name for e in os.scandir(mnt / "d")) == ["c", "z"]
    # an upper file opened again: passthrough where the kernel allows it with the ring
    assert (mnt / "foo").read_bytes() == b"UPPER foo\n"
    m.unmount()
    assert _served(m) > 20


def test_unmount_with_files_open_ends_the_queues(enable_uring, overlay_mount, layers_factory):
    layers = layers_factory({"low": {"f": b"x" * 10000}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.dirs['low']},upperdir={upper},workdir={work},"
                      f"cache=shared,uring=auto")
    fd = os.open(m.mountpoint / "f", os.O_RDONLY)
    assert os.pread(fd, 10, 0) == b"x" * 10
    os.close(fd)
    m.unmount()  # checks the daemon exited 0 in time and logged no error
    assert _served(m) > 0


def test_uring_off_stays_classic(enable_uring, overlay_mount, layers_factory):
    layers = layers_factory({"low": {"f": b"x"}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.dirs['low']},upperdir={upper},workdir={work},uring=off")
    assert (m.mountpoint / "f").read_bytes() == b"x"
    m.unmount()
    assert "io_uring" not in m.log_text()


def test_the_daemon_killed_during_reads_leaves_a_mount_that_unmounts(enable_uring, tmp_path,
                                                                      layers_factory):
    """The daemon's end cancels its queues' commands: a reader in flight gets an error (no
    hang), the mount answers ENOTCONN, and ``umount`` returns."""
    helpers.require_fuse_mount()
    layers = layers_factory({"low": {"big": os.urandom(1 << 20)}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = helpers.Mount(tmp_path / "mnt", f"lowerdir={layers.dirs['low']},upperdir={upper},"
                      f"workdir={work},cache=shared,uring=auto", log_dir=tmp_path,
                      allow_daemon_errors=True)
    m.start()
    try:
        assert "serving through FUSE over io_uring" in m.log_text()
        errors: list[int] = []
        reading = threading.Event()
        fd = os.open(m.mountpoint / "big", os.O_RDONLY)

        def read_on() -> None:
            try:
                for i in range(10 ** 7):
                    os.pread(fd, 4096, (i % 256) * 4096)
                    reading.set()
            except OSError as e:
                errors.append(e.errno)

        reader = threading.Thread(target=read_on, daemon=True)
        reader.start()
        assert reading.wait(10)
        m.proc.kill()
        reader.join(30)
        assert not reader.is_alive(), "a read hung after the daemon died"
        with contextlib.suppress(OSError):  # (its FLUSH: ENOTCONN; the fd is closed)
            os.close(fd)
        # (ECANCELED: the request was on its way to a queue whose thread had died)
        assert errors and errors[0] in (errno.ECONNABORTED, errno.ENOTCONN, errno.ECANCELED)
        with pytest.raises(OSError) as e:
            os.stat(m.mountpoint / "big")
        assert e.value.errno == errno.ENOTCONN
        r = subprocess.run(["umount", str(m.mountpoint)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        assert not helpers.is_mounted(m.mountpoint)
    finally:
        m.unmount(check=False)
        helpers.force_unmount(m.mountpoint)
