"""The engine mounted for real: ``engine_support.PassthroughFS`` through ``daemon.run`` in a
subprocess, by root (mount(2)) and by a plain user (fusermount3). Checks what only a
kernel shows: end-to-end file operations, 1 MiB writes in one request, ``.``/``..``,
the daemon's life (SIGTERM, ``umount``, daemonizing only once the mount answers, mount
errors), cloned-fd workers serving at once, cache invalidation by notification, and
fusermount3's ``auto_unmount``."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

import helpers
import rootless_support as rs

pytestmark = pytest.mark.mount

SUPPORT = str(Path(__file__).resolve().parent / "engine_support.py")
FSTYPE = "fuse.enginetest"


@dataclass
class PtMount:
    source: Path
    mountpoint: Path
    log: Path
    proc: Optional[subprocess.Popen] = None   # foreground
    pid: Optional[int] = None                 # the daemon (either way)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def _cmd(src, mnt, log, *extra) -> list[str]:
    return [sys.executable, SUPPORT, str(src), str(mnt), "--log", str(log), *extra]


def _daemon_pids(mnt: Path) -> list[int]:
    return [p for p in helpers.pids_with_arg(mnt) if helpers.pid_alive(p)
            and Path(f"/proc/{p}/comm").read_text().strip() != "fusermount3"]


@pytest.fixture
def pt_mount(tmp_path):
    """Factory: ``pt_mount(daemon=False, workers=None, options="")`` -> a mounted PtMount
    over a fresh source dir. Teardown unmounts, waits for the daemon to exit (killing
    only it, by pid, if it does not), and fails on ERROR/Traceback in its log."""
    helpers.require_fuse_mount()
    mounts: list[PtMount] = []

    def make(*, daemon: bool = False, workers: int | None = None, options: str = "") -> PtMount:
        n = len(mounts)
        src, mnt = tmp_path / f"src{n}", tmp_path / f"mnt{n}"
        src.mkdir()
        mnt.mkdir()
        m = PtMount(src, mnt, tmp_path / f"pt{n}.log")
        mounts.append(m)
        extra = (["--daemon"] if daemon else []) + (["--workers", str(workers)] if workers else []) \
            + (["-o", options] if options else [])
        cmd = _cmd(src, mnt, m.log, *extra)
        env = helpers.overlaypc_env()
        if daemon:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr + m.log_text()
            # the command returned only once INIT was answered: the mount is there now
            assert helpers.is_mounted(mnt, FSTYPE), "daemonized command returned before mounting"
            pids = _daemon_pids(mnt)
            assert len(pids) == 1, pids
            m.pid = pids[0]
        else:
            m.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=open(m.log, "ab"))
            m.pid = m.proc.pid
            ok = helpers.wait_until(lambda: helpers.is_mounted(mnt, FSTYPE)
                                    or m.proc.poll() is not None, helpers.MOUNT_TIMEOUT)
            assert ok and m.proc.poll() is None, f"not mounted (status {m.proc.poll()}): {m.log_text()}"
        return m

    yield make

    problems = []
    for m in mounts:
        helpers.force_unmount(m.mountpoint)
        if m.pid is not None and not helpers.wait_until(lambda: not helpers.pid_alive(m.pid),
                                                        helpers.EXIT_TIMEOUT):
            problems.append(f"daemon {m.pid} did not exit after unmounting:\n"
                            + helpers.thread_report(m.pid))
            os.kill(m.pid, signal.SIGKILL)
        if m.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.proc.wait(timeout=5)
        problems += [f"{m.log}: {line}" for line in helpers.unexpected_log_lines(m.log_text())]
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_end_to_end_file_operations(pt_mount):
    m = pt_mount()
    mnt, src = m.mountpoint, m.source
    (mnt / "f").write_bytes(b"hello world")
    assert (src / "f").read_bytes() == b"hello world"
    with open(mnt / "f", "r+b") as f:
        f.seek(6)
        f.write(b"there")
    assert (mnt / "f").read_bytes() == b"hello there"
    (mnt / "d").mkdir()
    (mnt / "d" / "inner").write_text("in")
    os.rename(mnt / "f", mnt / "d" / "g")
    assert sorted(os.listdir(mnt)) == ["d"]
    assert sorted(os.listdir(mnt / "d")) == ["g", "inner"]
    assert (src / "d" / "g").read_bytes() == b"hello there"
    os.rename(mnt / "d", mnt / "e")   # the nodes below follow (fds, not paths)
    assert (mnt / "e" / "inner").read_text() == "in"
    os.unlink(mnt / "e" / "g")
    assert not (src / "e" / "g").exists()
    os.truncate(mnt / "e" / "inner", 1)
    assert (mnt / "e" / "inner").read_text() == "i"
    os.chmod(mnt / "e" / "inner", 0o600)
    os.utime(mnt / "e" / "inner", ns=(1_000_000_000, 2_000_000_007))
    st = os.stat(mnt / "e" / "inner")
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, 2_000_000_007)
    os.symlink("inner", mnt / "e" / "ln")
    assert os.readlink(mnt / "e" / "ln") == "inner"
    assert (mnt / "e" / "ln").read_text() == "i"
    os.setxattr(mnt / "e" / "inner", "user.k", b"v")
    assert os.getxattr(mnt / "e" / "inner", "user.k") == b"v"
    assert "user.k" in os.listxattr(mnt / "e" / "inner")
    os.unlink(mnt / "e" / "ln")
    os.unlink(mnt / "e" / "inner")
    os.rmdir(mnt / "e")
    assert os.listdir(src) == []
    assert os.statvfs(mnt).f_bsize == os.statvfs(src).f_bsize
    # many entries: READDIRPLUS in several chunks, each name once
    names = {f"file-with-a-long-name-{i:04d}" for i in range(600)}
    for name in names:
        (src / name).write_bytes(b"")
    assert set(os.listdir(mnt)) == names
    assert all(os.stat(mnt / n).st_size == 0 for n in list(names)[:50])


def test_ls_shows_dot_and_dotdot(pt_mount):
    m = pt_mount()
    (m.source / "x").write_text("x")
    r = subprocess.run(["ls", "-a", str(m.mountpoint)], capture_output=True, text=True, check=True)
    assert r.stdout.split() == [".", "..", "x"]


def test_large_write_arrives_as_one_request(pt_mount):
    m = pt_mount()
    data = os.urandom(1 << 20)
    fd = os.open(m.mountpoint / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)
    assert os.getxattr(m.mountpoint / "big", "user.pt.max_write") == b"%d" % (1 << 20)
    assert (m.source / "big").read_bytes() == data
    assert (m.mountpoint / "big").read_bytes() == data


def test_sigterm_unmounts_and_exits_0(pt_mount):
    m = pt_mount()
    os.kill(m.pid, signal.SIGTERM)
    assert m.proc.wait(timeout=helpers.EXIT_TIMEOUT) == 0, m.log_text()
    assert not helpers.is_mounted(m.mountpoint)


def test_daemonized_returns_when_mount_answers_and_umount_ends_it(pt_mount):
    m = pt_mount(daemon=True)   # asserts it is mounted as soon as the command returns
    (m.source / "x").write_text("x")
    assert os.listdir(m.mountpoint) == ["x"]
    assert os.stat(m.mountpoint / "x").st_size == 1
    assert os.getppid() != m.pid and Path(f"/proc/{m.pid}/stat").exists()
    subprocess.run(["umount", str(m.mountpoint)], check=True, capture_output=True)
    assert helpers.wait_until(lambda: not helpers.pid_alive(m.pid), helpers.EXIT_TIMEOUT), \
        helpers.thread_report(m.pid)
    assert "ERROR" not in m.log_text()


def test_daemonized_stat_right_after_return(tmp_path, pt_mount):
    """stat from the same shell line as the command: no window where the mountpoint is
    still the empty directory below."""
    helpers.require_fuse_mount()
    src, mnt = tmp_path / "s", tmp_path / "m"
    src.mkdir()
    mnt.mkdir()
    (src / "marker").write_text("m")
    log = tmp_path / "d.log"
    cmd = " ".join(_cmd(src, mnt, log, "--daemon")) + f" && stat -c %s {mnt}/marker"
    try:
        r = subprocess.run(["sh", "-c", cmd], env=helpers.overlaypc_env(), capture_output=True,
                           text=True, timeout=60)
        assert (r.returncode, r.stdout.strip()) == (0, "1"), r.stderr
    finally:
        pids = _daemon_pids(mnt)
        helpers.force_unmount(mnt)
        for pid in pids:
            helpers.wait_until(lambda: not helpers.pid_alive(pid), helpers.EXIT_TIMEOUT)
    assert not helpers.unexpected_log_lines(log.read_text())


def test_mount_error_is_reported_with_status(tmp_path):
    helpers.require_fuse_mount()
    src = tmp_path / "s"
    src.mkdir()
    missing = tmp_path / "no" / "such"
    for extra in ([], ["--daemon"]):
        r = subprocess.run(_cmd(src, missing, tmp_path / "e.log", *extra), env=helpers.overlaypc_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert str(missing) in r.stderr and "No such file or directory" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not helpers.is_mounted(missing)


def test_cloned_fd_workers_serve_concurrently(pt_mount):
    """Two blocking reads: each waits in the filesystem until the other has arrived, so
    both finish only if two workers serve at once."""
    m = pt_mount(workers=4)
    (m.source / "barrier").write_bytes(b"b" * 100)
    results: list = [None, None]

    def read(i: int) -> None:
        try:
            results[i] = (m.mountpoint / "barrier").read_bytes()
        except OSError as e:
            results[i] = e

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [b"b" * 100, b"b" * 100]


def _within(fn, timeout: float = 15.0):
    """``fn()``'s result, run in a thread: an AssertionError if it has not returned within
    ``timeout`` (a request no worker picks up would hang the test instead)."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # reported below
            box.append((False, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"no answer within {timeout} s"
    ok, value = box[0]
    if not ok:
        raise value
    return value


def test_the_mount_answers_while_more_requests_block_than_it_started_workers(pt_mount):
    """Reads that block in the filesystem (asleep in a system call) tie up a worker each:
    with 2 workers started and 5 reads blocked, the mount still answers a stat and a
    getxattr, because the pool adds a worker whenever the last waiting one picks up a
    request while another is blocked. Before: a fixed pool of 2 (4 by default) stopped
    answering once as many reads were held."""
    m = pt_mount(workers=2)
    count = 5
    for i in range(count):
        (m.source / f"hold{i}").write_bytes(b"%d" % i * 10)
    _answers_while_reads_block(count, m.mountpoint, m.mountpoint, m.source / "fresh",
                               m.mountpoint / "fresh")


def test_the_mount_answers_when_every_worker_blocks_at_once(pt_mount):
    """Two reads held at once on a mount of 2 workers: each worker picked up its read
    while the other one was not blocked yet, so neither saw a reason to add one; the pool's
    watch adds a third, which answers the stat and getxattr. Before: nothing answered until
    a read returned."""
    m = pt_mount(workers=2)
    for i in range(2):
        (m.source / f"hold{i}").write_bytes(b"%d" % i * 10)
    _answers_while_reads_block(2, m.mountpoint, m.mountpoint, m.source / "fresh",
                               m.mountpoint / "fresh", together=True)


def _answers_while_reads_block(count: int, reads: Path, pt: Path, fresh: Path,
                               fresh_seen: Path, together: bool = False) -> None:
    """Read ``reads/hold<i>`` for i < count from threads, each held by the test passthrough
    mounted at ``pt`` until released, each picked up while the earlier ones are held (all
    at once if ``together``); then a name written at ``fresh`` must be seen at
    ``fresh_seen`` (a LOOKUP) with every read still held. Releases them and checks what
    they read (``b"<i>" * 10``, as written)."""
    results: dict = {}

    def read(i: int) -> None:
        try:
            results[i] = (reads / f"hold{i}").read_bytes()
        except OSError as e:
            results[i] = e

    def held() -> int:
        return int(os.getxattr(pt, "user.pt.held"))

    threads = []
    try:
        for i in range(count):
            threads.append(threading.Thread(target=read, args=(i,), daemon=True))
            threads[-1].start()
            if together:
                continue
            # each answer here needs a worker that is not held
            assert _within(lambda: helpers.wait_until(lambda: held() == i + 1, 10)), \
                f"{held()} reads held, {i + 1} expected: the mount stopped picking them up"
            time.sleep(0.01)  # the held ones now count as blocked (2 ms), whatever the load
        assert _within(lambda: helpers.wait_until(lambda: held() == count, 10)), \
            f"{held()} reads held, {count} expected"
        fresh.write_bytes(b"new")
        assert _within(lambda: os.stat(fresh_seen).st_size) == 3  # a LOOKUP
        assert _within(held) == count
    finally:
        # released (each read gives up after 30 s anyway, so the daemon can end)
        with contextlib.suppress(AssertionError, OSError):
            _within(lambda: os.setxattr(pt, "user.pt.release", b"%d" % count))
        for t in threads:
            t.join(60)
    assert results == {i: b"%d" % i * 10 for i in range(count)}


def test_inval_inode_refreshes_cached_data(pt_mount):
    m = pt_mount()
    f = m.mountpoint / "f"
    (m.source / "f").write_bytes(b"old!")
    assert f.read_bytes() == b"old!"          # now in the page cache (keep_cache)
    (m.source / "f").write_bytes(b"new!")     # behind the kernel's back, same size
    assert f.read_bytes() == b"old!", "the kernel did not cache: this test proves nothing"
    os.setxattr(f, "user.pt.inval", b"1")     # the filesystem queues inval_inode(f)
    assert helpers.wait_until(lambda: f.read_bytes() == b"new!", 10), f.read_bytes()


# ==========================================================================================
# A plain user, through fusermount3
# ==========================================================================================
@pytest.fixture
def nobody():
    helpers.require_fuse_mount()
    helpers.require(os.stat("/dev/fuse").st_mode & 0o006 == 0o006, "needs /dev/fuse mode 0666")
    py = rs.user_python(rs.NOBODY, rs.NOBODY)
    helpers.require(py is not None, "no Python interpreter that uid 65534 can run overlaypc with")
    with rs.shared_dir(rs.NOBODY, rs.NOBODY, prefix="overlaypc-engine-") as root:
        for name in ("src", "mnt"):
            (root / name).mkdir()
        (root / "src" / "keep").write_text("keep\n")
        rs.make_tree(root, rs.NOBODY, rs.NOBODY)
        yield root, py


def test_plain_user_mounts_through_fusermount3(nobody):
    root, (python, env) = nobody
    mnt = root / "mnt"
    log = root / "log"
    proc = subprocess.Popen(rs.as_user(rs.NOBODY, rs.NOBODY)
                            + [python, SUPPORT, str(root / "src"), str(mnt), "--log", str(log),
                               "-o", "auto_unmount"],
                            env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        ok = helpers.wait_until(lambda: helpers.is_mounted(mnt, FSTYPE) or proc.poll() is not None,
                                helpers.MOUNT_TIMEOUT)
        assert ok and proc.poll() is None, proc.stderr.read().decode() if proc.poll() is not None else ""
        entry = helpers.mounts_at(mnt)[-1]
        assert "user_id=65534" in entry.super_options
        # the fd came back over the socket: the daemon serves the user
        r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY) + ["cat", str(mnt / "keep")],
                           capture_output=True, text=True)
        assert r.stdout == "keep\n", r.stderr
        r = subprocess.run(rs.as_user(rs.NOBODY, rs.NOBODY)
                           + ["sh", "-c", f"echo new > {mnt}/new && ls -a {mnt}"],
                           capture_output=True, text=True)
        assert r.stdout.split() == [".", "..", "keep", "new"], r.stderr
        # auto_unmount: fusermount3 stayed, watching the socket
        watchers = [p for p in helpers.pids_with_arg(mnt) if helpers.pid_alive(p)
                    and Path(f"/proc/{p}/comm").read_text().strip() == "fusermount3"]
        assert len(watchers) == 1, watchers
        # killed -9: no unmount by the daemon; the mount must still go
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert helpers.wait_until(lambda: not helpers.is_mounted(mnt), 10), \
            f"{mnt} still mounted after its daemon was killed"
        assert helpers.wait_until(lambda: not helpers.pid_alive(watchers[0]), 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        helpers.force_unmount(mnt)
    assert not helpers.unexpected_log_lines(log.read_text() if log.exists() else "")


def test_overlaypc_answers_while_reads_of_a_slow_lower_layer_block(pt_mount, overlay_mount,
                                                                  tmp_path):
    """overlaypc over a lower layer whose reads block (a FUSE file system, the engine's
    test passthrough, holding them): with ``cache=shared`` each read is the daemon's
    ``pread`` of the lower file, asleep in the kernel until the lower layer answers. With
    two more reads held than overlaypc starts workers (one per CPU), it still answers a
    LOOKUP of a new name. Before: a fixed pool of 4 workers stopped answering once four
    reads were held."""
    count = len(os.sched_getaffinity(0)) + 2   # overlaypc starts one worker per usable CPU
    lower = pt_mount(workers=count + 2)   # the lower layer's own workers never run out
    for i in range(count):
        (lower.source / f"hold{i}").write_bytes(b"%d" % i * 10)
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    overlay_mount(f"lowerdir={lower.mountpoint},upperdir={upper},workdir={work},cache=shared",
                  mnt=merged)
    _answers_while_reads_block(count, merged, lower.mountpoint, upper / "fresh", merged / "fresh")

