"""The short OPEN of a lower file a listing kept goes through the fd its directory was listed
through (``Files._open_listed``, ``lookup.ListedDir``: its entry held weakly), and answers as the generic
path in every case its guard tells apart: the fd still held (opened relative to it); the
parent renamed, copied up or removed, the entry whited out, a file made in the parent after
the listing (the kept files voided: generic); the fd shed at the fd budget or evicted by the
lookup cache's bound between the listing and the open (opened by its path; kept files hold no
fds). Two cores over trees built alike, one session asking the short path, the other with
the hook unset (``test_open_short.Side``), driven through the fake kernel, without FUSE.
"""
from __future__ import annotations

import errno
import os

import pytest

from overlaypc import fdbudget
from overlaypc.engine import protocol as p
from overlaypc.nodes import ROOT_ID

from test_open_short import Side, _both, _listed

_FLAGS = os.O_RDONLY | os.O_LARGEFILE
_NAMES = (b"a", b"b", b"c")


def _tree(base, dirs: int = 1) -> None:
    """``l0``.. (lower only: the one-layer listing) of files a, b, c; ``d`` merged (an upper
    part: the merging listing) with lower files a, b, c."""
    for d in ("upper/d", "work", "mnt"):
        (base / d).mkdir(parents=True)
    for d in [f"l{i}" for i in range(dirs)] + ["d"]:
        (base / "lower" / d).mkdir(parents=True)
        for name in _NAMES:
            (base / "lower" / d / name.decode()).write_bytes(f"{d} {name.decode()}".encode())


@pytest.fixture
def sides(tmp_path):
    made = []

    def make(dirs: int = 1, **options):
        for name in ("short", "generic"):
            _tree(tmp_path / name, dirs)
        for name in ("short", "generic"):
            side = Side(tmp_path / name, name == "short", **options)
            made.append(side)
            side.listed_opens = []  # (whether each ``_open_listed`` had its directory's fd)
            files = side.ops.fs.files
            lean = files._open_listed

            def counted(rel, flags, layer, lrel, st, dirfd, name, side=side, lean=lean):
                side.listed_opens.append((rel, dirfd is not None))
                return lean(rel, flags, layer, lrel, st, dirfd, name)
            files._open_listed = counted
        return made[-2], made[-1]
    yield make
    for side in reversed(made):
        side.close()


def _open_all(side, listed: dict[bytes, int]) -> list:
    """OPEN, READ and RELEASE of each listed file: (name, error, open flags, read)."""
    out = []
    for name in sorted(listed):
        got = side.open(listed[name], _FLAGS)
        out.append((name, got[0], got[2:], side.read(listed[name], got[1]) if got[0] == 0 else None))
        if got[0] == 0:
            assert side.release(listed[name], got[1], _FLAGS) == 0
    return out


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("options", [{}, {"cache": "shared"}, {"handles": "bind-at-open"}])
def test_a_listed_lower_file_opens_through_its_directorys_fd(sides, options):
    """A lower-only directory (one-layer listing) and a merged one (the merging listing):
    each listed lower file is opened relative to the fd its directory was listed through;
    the same answers, data and state as the generic path; no fd left open after RELEASE."""
    def run(side):
        out = []
        for dname in (b"l0", b"d"):
            dnode = side.lookup(ROOT_ID, dname)
            listed = _listed(side, dnode)
            before = _fds()
            out.append(_open_all(side, listed))
            assert _fds() == before
        return out, side.state()
    short, generic = sides(**options)
    got = _both((short, generic), run)
    assert got[0][0][0][0] == (b"a", 0, got[0][0][0][0][2], (0, b"l0 a"))
    assert short.listed_opens == [(f"{d}/{n.decode()}", True) for d in ("l0", "d") for n in _NAMES]
    assert short.generic_opens == 0 and generic.generic_opens == 6


def _rename(side, l0: int) -> None:
    side.fk.ok(p.RENAME, ROOT_ID, p.RENAME_IN.pack(ROOT_ID) + b"l0\0moved\0")


def _copy_up(side, l0: int) -> None:
    side.fk.ok(p.SETATTR, l0, p.SetAttr(p.FATTR_MODE, None, 0, None, None, 0o40700, 0, 0).encode())


def _whiteout(side, l0: int) -> None:
    side.fk.ok(p.UNLINK, l0, b"a\0")


def _remove(side, l0: int) -> None:
    for name in _NAMES:
        side.fk.ok(p.UNLINK, l0, name + b"\0")
    side.fk.ok(p.RMDIR, ROOT_ID, b"l0\0")


def _create(side, l0: int) -> None:
    r = side.fk.ok(p.CREATE, l0, p.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o100644, 0, 0)
                   + b"new\0")
    nodeid = p.ENTRY_HEAD.unpack_from(r)[0]
    fh = p.OPEN_OUT.unpack_from(r, p.ENTRY_OUT.size)[0]
    assert side.release(nodeid, fh, os.O_WRONLY) == 0


@pytest.mark.parametrize("change", [_rename, _copy_up, _whiteout, _remove, _create],
                         ids=["renamed", "copied-up", "whited-out", "removed", "made-in"])
def test_a_change_after_the_listing_sends_the_open_the_generic_way(sides, change):
    """The parent renamed, copied up (a chmod) or removed, one entry whited out, a file made
    in the parent, through the mount, between the listing and the opens: no kept file of the
    listing is used (the change moved the lookup epoch); each open answers as the generic
    path's (the data at the name's new place, ENOENT for a name gone)."""
    def run(side):
        l0 = side.lookup(ROOT_ID, b"l0")
        listed = _listed(side, l0)
        change(side, l0)
        return _open_all(side, listed), side.state()
    short, generic = sides()
    got = _both((short, generic), run)
    answers = {name: (err, data) for name, err, _, data in got[0][0]}
    if change is _whiteout:
        assert answers[b"a"][0] == -errno.ENOENT and answers[b"b"] == (0, (0, b"l0 b"))
    elif change is _remove:
        assert {err for err, _ in answers.values()} == {-errno.ENOENT}
    else:
        assert answers[b"a"] == (0, (0, b"l0 a"))
    assert short.listed_opens == []  # (nothing kept survived the change)


def test_the_directorys_fd_shed_between_listing_and_open(sides):
    """The process out of fds between the listing and the opens (``fdbudget.shed``): the
    lookup cache lets go of the directory's node and the kept files do not hold it (their
    reference to its entry is weak), so its fd is closed; the opens resolve the path from the layer's root
    instead, with the same answers and nothing left open."""
    def run(side):
        l0 = side.lookup(ROOT_ID, b"l0")
        listed = _listed(side, l0)
        kept = side.ops.fs.lookup._recent.get("l0")
        where = None if kept is None else kept[b"a".decode()][0]
        held = None if where is None else where.entry()
        fd = None if held is None else held.dirfd.fd
        del held
        fdbudget.shed()
        if fd is not None:
            assert where.entry() is None  # (gone with the cache's node, its fd closed)
            with pytest.raises(OSError) as e:
                os.fstat(fd)
            assert e.value.errno == errno.EBADF
        before = _fds()
        out = _open_all(side, listed)
        assert _fds() == before
        return out, side.state()
    short, generic = sides()
    got = _both((short, generic), run)
    assert [data for _, _, _, data in got[0][0]] == [(0, b"l0 " + n) for n in _NAMES]
    assert short.listed_opens == [(f"l0/{n.decode()}", False) for n in _NAMES]
    assert short.generic_opens == 0


def test_kept_files_hold_no_fds_past_the_lookup_caches_bound(sides):
    """More listed directories than the lookup cache keeps fds for: the cache evicts the
    oldest, and their fds close although their kept files remain (the process holds no fd
    the cache does not count); those files open by their paths, the rest through their
    directories' fds, every one with the answer of the generic path."""
    dirs = fdbudget.LOOKUP_FLOOR + 8

    def run(side):
        fs = side.ops.fs
        fs.lookup.max_fds = fdbudget.LOOKUP_FLOOR
        fdbudget.shed()
        base = _fds()
        listed = {}
        for i in range(dirs):
            dnode = side.lookup(ROOT_ID, f"l{i}".encode())
            listed[i] = _listed(side, dnode)
        held = _fds() - base
        assert held <= fs.lookup.cached_fds <= fdbudget.LOOKUP_FLOOR, (held, fs.lookup.cached_fds)
        return [_open_all(side, listed[i]) for i in range(dirs)], side.state()
    short, generic = sides(dirs=dirs)
    _both((short, generic), run)
    through = [by_fd for _, by_fd in short.listed_opens]
    assert len(through) == 3 * dirs and not all(through) and any(through)
    assert short.generic_opens == 0


def test_at_the_process_fd_limit_a_listed_file_answers_as_open(sides):
    """EMFILE from the system (the soft limit at the lowest free fd number) at the open of a
    listed file: ``retrying`` sheds the caches and tries once more, as the generic path
    does; each answer an open or EMFILE (which one depends on the fds the shed frees in the
    whole process, both sides' caches and what earlier tests left: not compared), nothing
    left open by a failed open (fds, handles), and every file opens and reads as by the
    generic path once the limit is back (by its path where the shed closed its directory's fd),
    with the same state after."""
    import resource

    def run(side):
        fdbudget.shed()  # (every cache in the process: the other side's too)
        l0 = side.lookup(ROOT_ID, b"l0")
        listed = _listed(side, l0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        got = []
        before = _fds()
        try:
            for name in _NAMES:
                free = os.open(os.devnull, os.O_RDONLY)  # (the lowest free fd number)
                os.close(free)
                resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))  # (no new fd)
                try:
                    answer = side.open(listed[name], _FLAGS)
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                got.append(answer[0])
                if answer[0] == 0:
                    assert side.release(listed[name], answer[1], _FLAGS) == 0
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert _fds() <= before and len(side.ops.fs.handles) == 0
        assert set(got) <= {0, -errno.EMFILE}, got
        # (not the open flags: KEEP_CACHE follows whether a limited open of the file passed)
        return [(name, err, data) for name, err, _, data in _open_all(side, listed)], side.state()
    short, generic = sides()
    got = _both((short, generic), run)
    assert [data for _, _, data in got[0][0]] == [(0, b"l0 " + n) for n in _NAMES]
    assert short.generic_opens == 0


def test_a_kept_directory_is_gone_before_its_fd_closes(monkeypatch):
    """``ListedDir.entry`` is a weak reference to the lookup's ``Entry``, not to its
    ``DirFd``: when the last holder lets go, the reference is already dead by the time
    ``DirFd.__del__`` closes the fd (a weak reference to the ``DirFd`` itself would still
    answer while its finalizer runs, and another thread could take an fd being closed)."""
    from overlaypc.layer import DirFd
    from overlaypc.lookup import Entry, ListedDir

    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    entry = Entry(None, "x", os.fstat(fd), DirFd(fd))
    where = ListedDir(None, "x", entry)
    assert where.entry() is entry
    seen = []
    close = os.close

    def closing(n: int) -> None:
        if n == fd:
            seen.append(where.entry())
        close(n)
    monkeypatch.setattr(os, "close", closing)
    del entry
    assert seen == [None]
    assert ListedDir(None, "x", None).entry() is None
