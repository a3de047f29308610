"""review50b: the seventeenth round's short paths under the cases their own tests leave out,
each side by side with the generic path (two cores over trees built alike, one session with
the hook set, the other without; driven through the fake kernel, without FUSE).

- ``speed50a`` (a listed lower file opened through its directory's fd): a copy-up by another
  handle between the listing and the open, and after it, and one by a SETATTR of the node
  (no stale read through any handle: the open reaches the upper file; the SETATTR case fails
  with the lookup's kept files not voided at a change); a directory merged through a
  redirect (its lower part at another path); threads shedding the caches while listed files
  open (the directory's fd never closed under an open); the open-foo scenario through a
  mount with a listing before each open.
- ``speed50b`` (short MKDIR and RMDIR in an upper-only directory): the node table, the
  lookup cache and the replies after an RMDIR (the old node's attributes, a LOOKUP, MKDIR and
  CREATE of the same name, an inode number the filesystem hands out again); RMDIR of a
  directory removed or replaced by a file behind the mount or a mount point, of an opaque
  one over a lower directory, of one holding only an OCI opaque marker and whiteouts; each
  hook's short answers counted. Against the kernel overlay (mounted): directories removed
  while held open, a mount point, an upper-only directory moved over a removed lower one.
"""
from __future__ import annotations

import errno
import itertools
import os
import stat
import subprocess
import threading
import time

import pytest

from engine_support import FakeKernel
from overlaypc import fdbudget
from overlaypc.engine import protocol as p
from overlaypc.nodes import ROOT_ID

from test_nodes_unit import make_ops
from test_open_short import _listed

_RD = os.O_RDONLY | os.O_LARGEFILE


class Side:
    """A core and a fake kernel over ``base``; ``short`` False: the hooks under test unset
    (``hooks``: the ``OverlayOps`` attributes), so the session answers the generic way."""

    def __init__(self, base, short: bool, hooks: tuple[str, ...], **options) -> None:
        self.base = base
        self.ops, self._close = make_ops(base, **options)
        #: each hook's answers that took the short path (not None, not False)
        self.taken: dict[str, int] = dict.fromkeys(hooks, 0)
        for hook in hooks:  # (before the session binds its hooks)
            setattr(self.ops, hook, self._counted(hook, getattr(self.ops, hook)) if short else None)
        self.fk = FakeKernel(self.ops)
        self.fk.start()

    def _counted(self, hook: str, call):
        assert call is not None, hook

        def counted(*args):
            got = call(*args)
            if got is not None and got is not False:
                self.taken[hook] += 1
            return got
        return counted

    def close(self) -> None:
        self.fk.close()
        self._close()

    def entry(self, opcode: int, parent: int, body: bytes) -> tuple:
        """(errno, nodeid, type and permission bits, nlink, size) of an entry reply."""
        r = self.fk.request(opcode, parent, body)
        if r.error:
            return (r.error, 0, None, None, None)
        nodeid = p.ENTRY_HEAD.unpack_from(r.body)[0]
        if not nodeid:
            return (0, 0, None, None, None)
        a = p.unpack_attr(r.body, p.ENTRY_HEAD.size)
        return (0, nodeid, oct(a.mode), a.nlink, a.size)

    def lookup(self, parent: int, name: bytes) -> tuple:
        return self.entry(p.LOOKUP, parent, name + b"\0")

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> tuple:
        return self.entry(p.MKDIR, parent, p.MKDIR_IN.pack(mode, 0) + name + b"\0")

    def rmdir(self, parent: int, name: bytes) -> int:
        return self.fk.request(p.RMDIR, parent, name + b"\0").error

    def unlink(self, parent: int, name: bytes) -> int:
        return self.fk.request(p.UNLINK, parent, name + b"\0").error

    def getattr(self, nodeid: int) -> tuple:
        r = self.fk.request(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0))
        if r.error:
            return (r.error,)
        a = p.unpack_attr(r.body, p.ATTR_HEAD.size)
        return (0, oct(a.mode), a.nlink)

    def create(self, parent: int, name: bytes, data: bytes = b"") -> tuple:
        """CREATE (then WRITE ``data``, RELEASE): the entry's fields."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        r = self.fk.request(p.CREATE, parent, p.CREATE_IN.pack(flags, 0o100644, 0, 0) + name + b"\0")
        if r.error:
            return (r.error, 0, None, None, None)
        nodeid = p.ENTRY_HEAD.unpack_from(r.body)[0]
        fh = p.OPEN_OUT.unpack_from(r.body, p.ENTRY_OUT.size)[0]
        if data:
            assert self.write(nodeid, fh, data) == 0
        assert self.release(nodeid, fh, flags) == 0
        a = p.unpack_attr(r.body, p.ENTRY_HEAD.size)
        return (0, nodeid, oct(a.mode), a.nlink, a.size)

    def open(self, nodeid: int, flags: int) -> tuple:
        r = self.fk.request(p.OPEN, nodeid, p.OPEN_IN.pack(flags, 0))
        return (r.error, None) if r.error else (0, p.OPEN_OUT.unpack(r.body)[0])

    def read(self, nodeid: int, fh: int) -> tuple:
        r = self.fk.request(p.READ, nodeid, p.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        return r.error, r.body

    def write(self, nodeid: int, fh: int, data: bytes) -> int:
        return self.fk.request(p.WRITE, nodeid, p.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0)
                               + data).error

    def release(self, nodeid: int, fh: int, flags: int) -> int:
        return self.fk.request(p.RELEASE, nodeid, p.RELEASE_IN.pack(fh, flags, 0, 0)).error

    def table(self) -> dict:
        nodes = self.ops.nodes
        with nodes._lock:
            return {n.nodeid: (n.nlookup, sorted(n.names), len(n.fhs or ()))
                    for n in nodes._nodes.values()}


@pytest.fixture
def sides(tmp_path):
    made = []

    def make(build, hooks: tuple[str, ...], **options):
        for name in ("short", "generic"):
            build(tmp_path / name)
        for name in ("short", "generic"):
            made.append(Side(tmp_path / name, name == "short", hooks, **options))
        return made[-2], made[-1]
    yield make
    for side in reversed(made):  # (the last made first: each puts back the umask it found)
        side.close()


def _both(pair, run) -> list:
    got = [run(side) for side in pair]
    assert got[0] == got[1]
    return got


# -- speed50a: a listed lower file's OPEN through its directory's fd ----------------------------

def _lower_tree(base) -> None:
    for d in ("lower/l0", "lower/mg", "upper/mg", "work", "mnt"):
        (base / d).mkdir(parents=True)
    for d in ("l0", "mg"):
        for name in ("a", "b"):
            (base / "lower" / d / name).write_bytes(f"lower {d} {name}".encode())


@pytest.mark.parametrize("options", [{}, {"cache": "shared"}])
@pytest.mark.parametrize("dname", [b"l0", b"mg"])
def test_a_copy_up_by_another_handle_reaches_every_later_open(sides, options, dname):
    """The listing kept ``a`` (its lower object, its directory's fd); a reader opens it
    through that (short), a writer opens it read-write (a copy-up) and writes: the reader's
    handle and every open after that, listed again or not, read the upper file's data;
    ``b``, listed before the copy-up, opens (generic: the copy-up voided the kept files)
    with its lower data."""
    def run(side):
        out = []
        d = side.lookup(ROOT_ID, dname)[1]
        listed = _listed(side, d)
        a, b = listed[b"a"], listed[b"b"]
        err, reader = side.open(a, _RD)
        out.append((err, side.read(a, reader)))
        err, writer = side.open(a, os.O_RDWR | os.O_LARGEFILE)
        assert err == 0
        assert side.write(a, writer, b"upper!") == 0
        out.append(side.read(a, reader))  # (the reader's handle follows the copy-up)
        err, late = side.open(a, _RD)
        out.append((err, side.read(a, late)))
        relisted = _listed(side, d)  # (lists the upper ``a`` now)
        err, again = side.open(relisted[b"a"], _RD)
        out.append((relisted[b"a"] == a, err, side.read(a, again)))
        err, fh = side.open(b, _RD)
        out.append((err, side.read(b, fh)))
        for fh in (reader, late, again):
            assert side.release(a, fh, _RD) == 0
        assert side.release(a, writer, os.O_RDWR) == 0
        out.append((side.ops.fs.open_fds(), len(side.ops.fs.handles)))
        return out
    short, generic = sides(_lower_tree, ("open_node",), **options)
    got = _both((short, generic), run)
    name = dname.decode()
    new = b"upper!" + f"{name} a".encode()  # ("upper!" over "lower ")
    assert got[0][:4] == [(0, (0, f"lower {name} a".encode())), (0, new), (0, (0, new)),
                          (True, 0, (0, new))]
    assert got[0][4] == (0, (0, f"lower {name} b".encode()))


@pytest.mark.parametrize("options", [{}, {"cache": "shared"}])
def test_a_copy_up_by_setattr_between_the_listing_and_the_open(sides, options):
    """``a`` listed, then copied up by a SETATTR of its node (a chmod: no LOOKUP keeps the
    upper file in its place), then opened for reading: that open must reach the upper file
    (the kept lower one voided), so a write through another handle after it is read through
    it; were the listed lower file opened, its handle would be on an inode of its own,
    never told of the upper file's writes."""
    def run(side):
        d = side.lookup(ROOT_ID, b"l0")[1]
        a = _listed(side, d)[b"a"]
        side.fk.ok(p.SETATTR, a, p.SetAttr(p.FATTR_MODE, None, 0, None, None, 0o100600, 0, 0).encode())
        err, reader = side.open(a, _RD)
        assert err == 0
        err, writer = side.open(a, os.O_RDWR | os.O_LARGEFILE)
        assert err == 0 and side.write(a, writer, b"upper!") == 0
        got = side.read(a, reader)
        assert side.release(a, reader, _RD) == 0 and side.release(a, writer, os.O_RDWR) == 0
        return got, side.ops.fs.open_fds(), len(side.ops.fs.handles)
    short, generic = sides(_lower_tree, ("open_node",), **options)
    got = _both((short, generic), run)
    assert got[0][0] == (0, b"upper!l0 a")


def _redirect_tree(base) -> None:
    for d in ("lower/src/deep", "upper", "work", "mnt"):
        (base / d).mkdir(parents=True)
    for name in ("a", "b"):
        (base / "lower" / "src" / name).write_bytes(b"src " + name.encode())
        (base / "lower" / "src" / "deep" / name).write_bytes(b"deep " + name.encode())


@pytest.mark.parametrize("which", [b"moved", b"moved/deep"])
def test_a_directory_merged_through_a_redirect_opens_its_lower_files(sides, which):
    """A merged directory renamed through the mount (``redirect_dir=on``: its upper part
    names the lower one by a redirect), and a directory below it (its lower part found at
    the redirect's path): the listed lower files open relative to the lower directory's
    fd, the same files and answers as the generic path's."""
    def run(side):
        side.fk.ok(p.RENAME, ROOT_ID, p.RENAME_IN.pack(ROOT_ID) + b"src\0moved\0")
        d = ROOT_ID
        for name in which.split(b"/"):
            d = side.lookup(d, name)[1]
        listed = _listed(side, d)
        out = []
        for name in (b"a", b"b"):
            err, fh = side.open(listed[name], _RD)
            out.append((name, err, side.read(listed[name], fh)))
            assert side.release(listed[name], fh, _RD) == 0
        return out, side.table(), sorted(os.listdir(side.base / "upper"))
    short, generic = sides(_redirect_tree, ("open_node",), redirect_dir="on")
    through = []
    files = short.ops.fs.files
    lean = files._open_listed

    def counted(rel, flags, layer, lrel, st, dirfd, name):
        through.append((rel, lrel, dirfd is not None))
        return lean(rel, flags, layer, lrel, st, dirfd, name)
    files._open_listed = counted
    got = _both((short, generic), run)
    word = b"deep" if which.endswith(b"deep") else b"src"
    assert got[0][0] == [(n, 0, (0, word + b" " + n)) for n in (b"a", b"b")]
    lower_dir = "src/deep" if which.endswith(b"deep") else "src"
    assert through == [(f"{which.decode()}/{n}", f"{lower_dir}/{n}", True) for n in "ab"]


def test_opens_of_listed_files_while_other_threads_shed_the_caches(tmp_path):
    """Listed lower files opened while two other threads shed every cache (``fdbudget.shed``:
    the lookup cache lets go of the directory's node, its fd closes) and open and close fds
    of their own (a closed number taken again at once): each open answers 0 and reads its
    own file's data; never EBADF, ENOTDIR nor another file's data (an open relative to an
    fd closed or reused in between)."""
    base = tmp_path / "t"
    for d in ("lower", "upper", "work", "mnt"):
        (base / d).mkdir(parents=True)
    dirs = 8
    for i in range(dirs):
        (base / "lower" / f"d{i}").mkdir()
        for name in ("a", "b", "c"):
            (base / "lower" / f"d{i}" / name).write_bytes(f"d{i}/{name}".encode())
    side = Side(base, True, ())
    through = []
    files = side.ops.fs.files
    lean = files._open_listed

    def counted(rel, flags, layer, lrel, st, dirfd, name):
        through.append(dirfd is not None)
        return lean(rel, flags, layer, lrel, st, dirfd, name)
    files._open_listed = counted
    stop = threading.Event()
    errors: list = []

    def shedding() -> None:
        try:
            # (pauses of several lengths: a thread that sheds without one holds the GIL
            # between every listing and its open on a quiet machine, and one that always
            # sheds within 0.5 ms voided every listing on a loaded one (a listing kept at a
            # changed epoch keeps nothing): either way no open went through a directory's
            # fd, ``through`` empty, the race not run)
            for pause in itertools.cycle((0.0005, 0.001, 0.002, 0.005)):
                if stop.is_set():
                    break
                fdbudget.shed()
                side.ops.fs.lookup.invalidate()
                stop.wait(pause)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    def churning() -> None:
        try:
            while not stop.is_set():
                fds = [os.open(str(base / "lower"), os.O_PATH | os.O_DIRECTORY) for _ in range(4)]
                for fd in fds:
                    os.close(fd)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=shedding), threading.Thread(target=churning)]
    for t in threads:
        t.start()
    got = []
    deadline = time.monotonic() + 60
    try:
        rnd = 0
        # (at least 60 rounds, and on until 10 opens went through a directory's fd)
        while rnd < 60 or (sum(through) < 10 and time.monotonic() < deadline):
            i = rnd % dirs
            rnd += 1
            d = side.lookup(ROOT_ID, f"d{i}".encode())[1]
            listed = _listed(side, d)
            for name in (b"a", b"b", b"c"):
                err, fh = side.open(listed[name], _RD)
                data = side.read(listed[name], fh) if err == 0 else None
                got.append((i, name, err, data))
                if err == 0:
                    assert side.release(listed[name], fh, _RD) == 0
    finally:
        stop.set()
        for t in threads:
            t.join()
        side.close()
    assert not errors
    assert sum(through) >= 10, (len(through), sum(through))  # (through an fd the threads close)
    wrong = [g for g in got if g[2] != 0 or g[3] != (0, f"d{g[0]}/{g[1].decode()}".encode())]
    assert not wrong, wrong[:5]


# -- speed50b: short MKDIR and RMDIR --------------------------------------------------------------

def _upper_tree(base) -> None:
    for d in ("lower/op/x/deep", "upper", "work", "mnt"):
        (base / d).mkdir(parents=True)
    (base / "lower" / "op" / "x" / "f").write_bytes(b"lower")


_DIR_HOOKS = ("mkdir_name", "rmdir_name")


def test_after_a_short_rmdir_the_name_and_the_old_node_answer_as_rmdirs(sides):
    """``u/x`` made and removed, the kernel keeping the old node (no FORGET): its GETATTR
    (no links), a LOOKUP of the name (absent), a MKDIR of it again (a new node, though ext4
    may give the new directory the old inode number), a directory below it, a CREATE in it,
    RMDIR's ENOTEMPTY, and a file made at the name once the directory is gone: every answer
    and the node table as the generic path's."""
    def run(side):
        out = []
        u = side.mkdir(ROOT_ID, b"u")[1]
        for rnd in range(3):
            out.append(side.lookup(u, b"x"))
            x = side.mkdir(u, b"x")
            out.append(x)
            out.append(side.lookup(x[1], b"y"))
            out.append(side.mkdir(x[1], b"y"))
            out.append(side.rmdir(u, b"x"))  # (ENOTEMPTY)
            out.append(side.rmdir(x[1], b"y"))
            out.append(side.rmdir(u, b"x"))
            out.append((side.getattr(x[1]), side.lookup(u, b"x")))
        out.append(side.create(u, b"x", b"now a file"))
        out.append(side.rmdir(u, b"x"))  # (ENOTDIR)
        out.append(side.unlink(u, b"x"))
        out.append(side.lookup(u, b"x"))
        out.append(side.mkdir(u, b"x"))
        out.append(side.table())
        out.append(sorted(os.listdir(side.base / "upper" / "u")))
        return out
    short, generic = sides(_upper_tree, _DIR_HOOKS)
    got = _both((short, generic), run)
    assert -errno.ENOTEMPTY in got[0] and -errno.ENOTDIR in got[0]
    # (every MKDIR below ``u``; an RMDIR's ENOTEMPTY drops ``u/x`` from the lookup cache,
    # as the generic one's, so ``x/y`` goes the generic way, which caches ``u/x`` again)
    assert short.taken == {"mkdir_name": 7, "rmdir_name": 3}, short.taken


@pytest.mark.parametrize("behind", ["removed", "a file", "another directory", "emptied",
                                    "a mount point"])
def test_an_rmdir_after_a_change_behind_the_mount(sides, behind):
    """``u/x`` (with ``u/x/y``) changed in the upper layer behind the mount's back before
    the RMDIR (a tmpfs mounted on it: the kernel overlay's VFS answers EBUSY): the answers
    and what is left as the generic path's."""
    def run(side):
        if behind != "a mount point":
            return change(side)
        try:
            return change(side)
        finally:
            path = side.base / "upper" / "u" / "x"
            if os.path.ismount(path):
                subprocess.run(["umount", str(path)], check=True)

    def change(side):
        u = side.mkdir(ROOT_ID, b"u")[1]
        side.lookup(u, b"x")
        x = side.mkdir(u, b"x")[1]
        side.lookup(x, b"y")
        side.mkdir(x, b"y")
        path = side.base / "upper" / "u" / "x"
        os.rmdir(path / "y")
        if behind not in ("emptied", "a mount point"):
            os.rmdir(path)
        if behind == "a file":
            path.write_bytes(b"file")
        elif behind == "another directory":
            os.mkdir(path)
            (path / "z").write_bytes(b"z")
        elif behind == "a mount point":
            # (cached: its removal's ``fstatat`` then finds the tmpfs root)
            subprocess.run(["mount", "-t", "tmpfs", "review50b", str(path)], check=True)
        out = [side.rmdir(u, b"x"), side.lookup(u, b"x")]
        out.append(sorted(os.listdir(side.base / "upper" / "u")))
        return out
    short, generic = sides(_upper_tree, _DIR_HOOKS)
    got = _both((short, generic), run)
    assert short.taken == {"mkdir_name": 2, "rmdir_name": int(behind == "emptied")}, short.taken
    assert got[0][0] == {"removed": -errno.ENOENT, "a file": -errno.ENOTDIR, "emptied": 0,
                         "another directory": -errno.ENOTEMPTY, "a mount point": -errno.EBUSY}[behind]


def test_an_opaque_directory_over_a_lower_one_made_and_removed_again(sides):
    """``op`` (merged) removed and made again (opaque over the lower ``op``, whose ``x``
    holds ``deep`` and ``f``): in it, ``x`` made and removed, twice, and ``x/deep``; no
    whiteout is left, the lower ``x`` stays hidden; the same answers, table and upper."""
    def run(side):
        out = []
        op = side.lookup(ROOT_ID, b"op")[1]
        x = side.lookup(op, b"x")[1]
        side.lookup(x, b"deep")
        out.append(side.rmdir(x, b"deep"))
        out.append(side.unlink(x, b"f"))
        out.append(side.rmdir(op, b"x"))
        out.append(side.rmdir(ROOT_ID, b"op"))
        op = side.mkdir(ROOT_ID, b"op")
        out.append(op)
        for _ in range(2):
            out.append(side.lookup(op[1], b"x"))
            x = side.mkdir(op[1], b"x")
            out.append(x)
            out.append(side.lookup(x[1], b"deep"))
            out.append(side.mkdir(x[1], b"deep"))
            out.append(side.rmdir(x[1], b"deep"))
            out.append(side.rmdir(op[1], b"x"))
            out.append(side.lookup(op[1], b"x"))
        upper = side.base / "upper" / "op"
        out.append((sorted(os.listdir(upper)),
                    sorted(n for n in os.listxattr(upper) if n.startswith("trusted.overlay."))))
        out.append(side.table())
        return out
    short, generic = sides(_upper_tree, _DIR_HOOKS)
    _both((short, generic), run)
    assert short.taken == {"mkdir_name": 4, "rmdir_name": 4}, short.taken


def test_a_directory_holding_an_oci_opaque_marker_and_whiteouts_goes(sides):
    """An upper-only directory holding a former mount's OCI opaque marker, an OCI whiteout
    and a 0/0 device (nothing in the merged view): RMDIR removes it; a directory holding
    a real entry beside them is ENOTEMPTY; as the generic path."""
    def run(side):
        u = side.mkdir(ROOT_ID, b"u")[1]
        out = []
        for name in (b"x", b"y"):
            side.lookup(u, name)
            side.mkdir(u, name)
            path = side.base / "upper" / "u" / name.decode()
            (path / ".wh..wh..opq").write_bytes(b"")
            (path / ".wh.gone").write_bytes(b"")
            os.mknod(path / "w", stat.S_IFCHR, 0)
        (side.base / "upper" / "u" / "y" / "real").write_bytes(b"r")
        out.append(side.rmdir(u, b"x"))
        out.append(side.rmdir(u, b"y"))
        out.append(sorted(os.listdir(side.base / "upper" / "u")))
        out.append(os.listdir(side.base / "work" / "work"))
        return out
    short, generic = sides(_upper_tree, _DIR_HOOKS)
    got = _both((short, generic), run)
    assert got[0][:2] == [0, -errno.ENOTEMPTY]
    assert short.taken == {"mkdir_name": 2, "rmdir_name": 1}, short.taken


# -- speed50b against the kernel overlay -----------------------------------------------------

def _kernel_session(mnt) -> dict:
    """Directories made and removed in an upper-only directory while a process holds one
    open (its attributes and listing after the removal, a new directory at its name), one
    that is a mount point (the VFS's EBUSY), one holding a file made and removed, and
    ``mkdir`` over each kind of name."""
    from pathlib import Path

    from test_fifteenth_round_kernel import _err

    mnt = Path(mnt)
    got = {}
    u = mnt / "u"
    os.mkdir(u)
    for rnd in range(2):
        os.mkdir(u / "x", 0o750)
        fd = os.open(u / "x", os.O_RDONLY | os.O_DIRECTORY)
        try:
            got[f"{rnd} rmdir held"] = _err(lambda: os.rmdir(u / "x"))
            st = os.fstat(fd)
            got[f"{rnd} held after"] = (oct(st.st_mode), st.st_nlink, os.listdir(fd))
            got[f"{rnd} mkdir in removed"] = _err(lambda: os.mkdir(f"/proc/self/fd/{fd}/y"))
            got[f"{rnd} stat x"] = _err(lambda: os.stat(u / "x"))
            os.mkdir(u / "x", 0o700)
            st2 = os.stat(u / "x")
            got[f"{rnd} new x"] = (oct(st2.st_mode), st2.st_nlink, (st2.st_dev, st2.st_ino) == (st.st_dev, st.st_ino))
            got[f"{rnd} rmdir new"] = _err(lambda: os.rmdir(u / "x"))
        finally:
            os.close(fd)
    os.mkdir(u / "m")
    subprocess.run(["mount", "-t", "tmpfs", "review50b", str(u / "m")], check=True)
    try:
        got["rmdir mount point"] = _err(lambda: os.rmdir(u / "m"))
    finally:
        subprocess.run(["umount", str(u / "m")], check=True)
    got["rmdir after umount"] = _err(lambda: os.rmdir(u / "m"))
    os.mkdir(u / "f")
    (u / "f" / "file").write_bytes(b"x")
    got["rmdir with a file"] = _err(lambda: os.rmdir(u / "f"))
    os.unlink(u / "f" / "file")
    got["rmdir emptied"] = _err(lambda: os.rmdir(u / "f"))
    (u / "file").write_bytes(b"x")
    os.symlink("nowhere", u / "link")
    os.mkdir(u / "dir")
    for name in ("file", "link", "dir", "x", "."):
        got[f"mkdir over {name}"] = _err(lambda: os.mkdir(u / name))
    got["ls u"] = sorted(os.listdir(u))
    return got


@pytest.mark.mount
@pytest.mark.kernel_overlay
def test_directories_removed_while_held_as_the_kernel(tmp_path, overlay_mount, kernel_mount):
    from test_protattr import _each_side

    lower = tmp_path / "lower"
    (lower / "l").mkdir(parents=True)
    got = _each_side(tmp_path, lower, _kernel_session, overlay_mount, kernel_mount)
    assert got["kernel"]["rmdir mount point"] == "EBUSY"
    assert got["overlaypc"] == got["kernel"]


def _moved_session(mnt) -> dict:
    """An upper-only directory (its directories made and removed by the short paths) moved
    over a removed lower directory of a merged one, and the other way: what each then
    shows, what MKDIR and RMDIR in it do, and its lower counterpart staying hidden."""
    from pathlib import Path

    from test_fifteenth_round_kernel import _err

    mnt = Path(mnt)
    got = {}
    u = mnt / "u"
    os.mkdir(u)
    for name in ("x", "ld", "gone"):
        os.mkdir(u / name)
    os.rmdir(u / "gone")
    got["rm -rf mg/u"] = subprocess.run(["rm", "-rf", str(mnt / "mg" / "u")]).returncode
    got["mv u mg/u"] = _err(lambda: os.rename(u, mnt / "mg" / "u"))
    moved = mnt / "mg" / "u"
    got["ls moved"] = _err(lambda: sorted(os.listdir(moved)))
    got["ls moved/ld"] = _err(lambda: sorted(os.listdir(moved / "ld")))
    got["rmdir moved/ld"] = _err(lambda: os.rmdir(moved / "ld"))
    got["mkdir moved/ld"] = _err(lambda: os.mkdir(moved / "ld"))
    got["ls moved/ld again"] = _err(lambda: sorted(os.listdir(moved / "ld")))
    got["mkdir moved/lowerfile"] = _err(lambda: os.mkdir(moved / "lowerfile"))
    got["rmdir moved/x"] = _err(lambda: os.rmdir(moved / "x"))
    got["ls moved after"] = _err(lambda: sorted(os.listdir(moved)))
    # a merged directory's upper-only child moved out into an upper-only directory
    os.mkdir(mnt / "v")
    os.mkdir(mnt / "mg" / "new")
    os.mkdir(mnt / "mg" / "new" / "in")
    got["mv mg/new v/new"] = _err(lambda: os.rename(mnt / "mg" / "new", mnt / "v" / "new"))
    got["rmdir v/new/in"] = _err(lambda: os.rmdir(mnt / "v" / "new" / "in"))
    got["rmdir v/new"] = _err(lambda: os.rmdir(mnt / "v" / "new"))
    got["ls v"] = sorted(os.listdir(mnt / "v"))
    got["ls mg"] = sorted(os.listdir(mnt / "mg"))
    return got


def _upper_marks(upper) -> list:
    """The upper's directories below the root's and their overlay marks (not those made
    in the merged root: the kernel (6.18) makes a new directory opaque there, an
    optimization overlaypc's generic MKDIR does not copy, ``_made_in_upper`` of
    ``test_seventeenth_round_kernel``), origin and impure aside."""
    out = []
    for path in sorted(upper.rglob("*/*")):
        if path.is_dir() and not path.is_symlink():
            names = sorted(n for n in os.listxattr(path) if n.startswith("trusted.overlay.")
                           and n != "trusted.overlay.origin")
            out.append((str(path.relative_to(upper)), names))
    return out


@pytest.mark.mount
@pytest.mark.kernel_overlay
def test_an_upper_only_directory_moved_over_a_lower_one_as_the_kernel(tmp_path, overlay_mount,
                                                                       kernel_mount):
    from test_protattr import _each_side

    lower = tmp_path / "lower"
    for d in ("mg/u/ld", "mg/u/x", "mg/keep"):
        (lower / d).mkdir(parents=True)
    (lower / "mg" / "u" / "lowerfile").write_bytes(b"lower")
    (lower / "mg" / "u" / "ld" / "inner").write_bytes(b"lower")
    stacks: dict = {}
    got = _each_side(tmp_path, lower, _moved_session, overlay_mount, kernel_mount, stacks=stacks)
    assert got["kernel"]["ls moved"] == ["ld", "x"]
    assert got["overlaypc"] == got["kernel"]
    assert _upper_marks(stacks["overlaypc"].upper) == _upper_marks(stacks["kernel"].upper)


@pytest.mark.mount
@pytest.mark.parametrize("cache", ["kernel", "shared"])
def test_listed_files_read_fresh_across_a_copy_up_through_a_mount(overlay_mount, layers_factory,
                                                                  tmp_path, cache):
    """The open-foo scenario where each open follows a listing (``ls``: READDIRPLUS keeps the
    lower files for the short OPEN through the directory's fd): a reader opened that way,
    a writer's copy-up and write, then the reader's reads (its own pages dropped), an open
    after a new listing and one after every fd closed and the caches dropped read the new
    data; the other listed file its own."""
    from coherence_support import NEW, NEW_HEAD, OLD, Fds, dontneed, drop_caches, make_stack, pread_all

    st = make_stack(layers_factory, tmp_path, {"d/a": OLD, "d/b": OLD})
    m = overlay_mount(st.options(cache, "reopen")).path
    d = m / "d"
    with Fds() as fds:
        assert sorted(os.listdir(d)) == ["a", "b"]
        fr = fds.open(d / "a", os.O_RDONLY)
        assert pread_all(fr) == OLD
        assert sorted(os.listdir(d)) == ["a", "b"]
        fw = fds.open(d / "a", os.O_RDWR)
        os.pwrite(fw, NEW_HEAD, 0)
        dontneed(fr)
        assert pread_all(fr) == NEW
        late = fds.open(d / "a", os.O_RDONLY)  # (no listing since the copy-up)
        dontneed(late)
        assert pread_all(late) == NEW
        assert sorted(os.listdir(d)) == ["a", "b"]
        assert pread_all(fds.open(d / "a", os.O_RDONLY)) == NEW
        assert pread_all(fds.open(d / "b", os.O_RDONLY)) == OLD
    drop_caches()
    assert sorted(os.listdir(d)) == ["a", "b"]
    with Fds() as fds:
        assert pread_all(fds.open(d / "a", os.O_RDONLY)) == NEW
    assert (st.upper / "d" / "a").read_bytes() == NEW and (st.lower / "d" / "a").read_bytes() == OLD
