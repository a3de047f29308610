"""Directory listings through a real mount, served with handle 0 (``overlaypc.listings``).
A large directory is read in many READDIRPLUS chunks; each listing continues in its own
snapshot (named by the cookies), so readers running while another process changes the
directory see every unchanged entry exactly once.

The kernel's listing cache tests run in both modes of the session too: the normal one and
a plain user's ``allow_root`` mount (``deny_others``: other users refused, and
NO_OPENDIR_SUPPORT not offered to the filesystem), reached here as a root mount with
``OVERLAYPC_DENY_OTHERS`` (``engine.daemon``: the very session setting that option makes;
a plain user's mount would need ``user_allow_other`` in /etc/fuse.conf)."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

import helpers
import rootless_support as rs

pytestmark = pytest.mark.mount

#: the owner a root daemon serves as under ``deny_others``: root and it may, others not
OWNER = 4242
OTHER = 4343

LOWER = [f"lower-{i:04d}-{'x' * 40}" for i in range(3000)]   # ~20 chunks of a 4 KiB getdents
UPPER = [f"upper-{i:03d}" for i in range(100)]


@pytest.fixture(params=["plain", "deny-others"])
def mode_env(request) -> dict | None:
    """The daemon's environment: the normal session, or a plain user's ``allow_root`` one."""
    return {"OVERLAYPC_DENY_OTHERS": str(OWNER)} if request.param == "deny-others" else None


def _big(layers_factory, overlay_mount, env=None):
    layers = layers_factory({"low": {"big": {n: "" for n in LOWER}}})
    upper = layers_factory.empty_dir("upper")
    (upper / "big").mkdir()
    for n in UPPER:
        (upper / "big" / n).write_text("")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}", env=env)
    return m.path / "big"


@pytest.fixture
def big(layers_factory, overlay_mount):
    return _big(layers_factory, overlay_mount)


@pytest.fixture
def big_in_mode(layers_factory, overlay_mount, mode_env):
    return _big(layers_factory, overlay_mount, mode_env)


def _listing(path) -> list[str]:
    with os.scandir(path) as it:   # getdents64 with a 32 KiB buffer: several requests
        return [e.name for e in it]


def test_large_directory_from_several_readers(big):
    expected = sorted(LOWER + UPPER)
    got: list[list[str]] = []

    def reader(_i: int) -> None:
        for _ in range(5):
            got.append(sorted(_listing(big)))

    helpers.run_threads(reader, 4, timeout=120)
    assert len(got) == 20 and all(g == expected for g in got)


def test_readers_see_unchanged_entries_once_while_the_directory_changes(big):
    stop = threading.Event()
    bad: list[str] = []

    def changer() -> None:
        i = 0
        while not stop.is_set():
            p = big / f"churn-{i % 50}"
            if p.exists():
                p.unlink()
            else:
                p.write_text("")
            i += 1

    t = threading.Thread(target=changer)
    t.start()
    try:
        def reader(_i: int) -> None:
            for _ in range(8):
                names = [n for n in _listing(big) if not n.startswith("churn-")]
                if sorted(names) != sorted(LOWER + UPPER):
                    dup = len(names) - len(set(names))
                    bad.append(f"{len(names)} names, {dup} twice")

        helpers.run_threads(reader, 3, timeout=120)
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:5]


def test_a_reader_of_the_kernels_cached_listing_misses_nothing_after_a_change(big_in_mode):
    """soak13 (stress_mount BIGDIR: hundreds of unchanged names missing from a listing).
    A whole listing fills the kernel's cache of the directory (CACHE_DIR) with the cookies
    of its snapshot, which is dropped at its end; a second reader reads part of it from
    that cache. Names go, and a third listing voids the cache: the second reader goes on
    with READDIR at the gone snapshot's cookie, which the daemon served from that position
    in a fresh reading, so that as many unchanged names as had gone before it were missed.
    fix15a: the same in ``deny_others`` mode, whose directory handles' cookies were
    positions in the handle's listing read anew."""
    big = big_in_mode
    assert sorted(_listing(big)) == sorted(LOWER + UPPER)   # the cache filled, snapshot done
    it = os.scandir(big)
    try:
        got = [next(it).name for _ in range(1500)]          # from the cache: 2 getdents
        for n in UPPER[:60]:
            os.unlink(big / n)
        assert len(_listing(big)) == len(LOWER) + 40        # the cache read anew
        got += [e.name for e in it]
    finally:
        it.close()
    stable = set(LOWER) | set(UPPER[60:])
    assert not stable - set(got), f"{len(stable - set(got))} unchanged names missed"
    assert len(got) == len(set(got))


#: 40-byte names: a cached entry (``struct fuse_dirent``) takes 64 bytes, "." and ".." 32
#: each, so 2047 names and the dots fill 32 pages of the kernel's listing cache exactly
ALIGNED = [f"aligned-{i:04d}-{'y' * 27}" for i in range(2048)]
_SYS_GETDENTS64 = 217 if os.uname().machine == "x86_64" else 61


def _getdents(fd: int, size: int = 1024) -> list[str]:
    """One getdents64(2) with a ``size``-byte buffer: the names it gave ([] at the end)."""
    import ctypes
    import struct
    buf = ctypes.create_string_buffer(size)
    n = ctypes.CDLL(None, use_errno=True).syscall(_SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    names, at = [], 0
    while at < n:
        reclen = struct.unpack_from("<H", buf.raw, at + 16)[0]
        names.append(buf.raw[at + 19:at + reclen].split(b"\0", 1)[0].decode())
        at += reclen
    return names


def test_a_reader_in_the_kernels_cache_is_not_cut_short_when_another_refills_it(
        layers_factory, overlay_mount, mode_env):
    """dircache14 (stress_mount BIGDIR: a listing ended at a chunk's boundary, the daemon
    never asked for the next chunk). Reader A reads part of the directory from the kernel's
    cached listing; the name at A's position goes; reader B, at offset 0, sees the change,
    voids the cache and fills it anew to its end. A's next getdents starts the new cache
    from its beginning looking for A's cookie; no entry has it, and where the cache ends at
    a page's end (the names here are sized so) the kernel answers the end of the directory
    instead of asking the daemon: every name after A's position was missed. fix15a: the
    same in ``deny_others`` mode, where every directory handle got the cache."""
    assert len(ALIGNED[0]) == 40
    layers = layers_factory({"low": {"big": {n: "" for n in ALIGNED}}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}", env=mode_env)
    big = m.path / "big"
    assert sorted(os.listdir(big)) == ALIGNED               # the cache filled, complete
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got: list[str] = []
        while len(got) < 1000:                              # A: from the cache
            got += _getdents(fd)
        gone = got[-1]
        os.unlink(big / gone)                               # the name at A's cookie goes
        assert len(os.listdir(big)) == len(ALIGNED) - 1     # B: voids the cache, refills it
        while chunk := _getdents(fd):                       # A goes on
            got += chunk
    finally:
        os.close(fd)
    names = [n for n in got if n not in (".", "..")]
    missed = set(ALIGNED) - {gone} - set(names)
    assert not missed, f"{len(missed)} unchanged names missed ({len(names)} listed)"
    assert len(names) == len(set(names))



def test_in_deny_others_mode_another_user_gets_no_listing(layers_factory, overlay_mount):
    """A plain user's ``allow_root`` mount refuses other users at OPENDIR; their listings
    would come with handle 0 (exempt from the check, like every request on a handle), but
    the kernel sends none without a successful OPENDIR of that file, nor lists from its
    cache of the listing (filled by root here) without one. Root and the owner may list."""
    helpers.require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    layers = layers_factory({"low": {"d": {n: "" for n in LOWER[:300]}}})
    upper, work = layers_factory.empty_dir("upper"), layers_factory.empty_dir("work")
    m = overlay_mount(f"lowerdir={layers.lowerdir},upperdir={upper},workdir={work}",
                      env={"OVERLAYPC_DENY_OTHERS": str(OWNER)})
    assert sorted(os.listdir(m.path / "d")) == LOWER[:300]   # root: the kernel's cache filled

    def as_user(uid: int, *cmd: str) -> subprocess.CompletedProcess:
        # from the mount's root (the way to it is root's 0700 test directories)
        return subprocess.run(rs.as_user(uid, uid) + list(cmd), cwd=m.path,
                              capture_output=True, text=True, timeout=60)

    opened = as_user(OWNER, "sh", "-c", ': < d')     # an open of a directory: OPENDIR
    assert opened.returncode == 0, opened.stderr
    listed = as_user(OWNER, "ls", "-f", "d")
    assert listed.returncode == 0 and len(listed.stdout.split()) == 302, listed.stderr
    refused = as_user(OTHER, "sh", "-c", ': < d')
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    refused = as_user(OTHER, "ls", "-f", "d")
    assert refused.returncode != 0 and not refused.stdout.strip(), refused.stdout[:200]
    assert len(os.listdir(m.path / "d")) == 300
