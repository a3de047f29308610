"""Stateful model test of the overlaypc core (issue 12), driven without FUSE.

Hypothesis runs sequences of operations (open with O_TRUNC/O_APPEND, read, write,
ftruncate, fstat, release with several files open across steps; truncate, chmod, chown,
mkdir, mknod, symlink, link, unlink, rmdir, rename; remounts, which may switch ``index``
or ``metacopy`` on) through ``core_driver`` — node-style calls, as a FUSE engine makes
them: look a name up, then act on the result — against the in-memory model of
``core_model_support``. After each step the names it touched are looked up afresh and
compared (type, permissions, owner, size, data read through a fresh open, link count,
st_ino class, listings); ``check_tree`` compares everything. Open files read what their
inode holds, whatever happened to its names since. st_ino: the names and open files of
one inode show one number, two live inodes never share one, and a remount keeps the
number of everything but lower hard-link names. At each unmount the lower layers are
unchanged and the upper holds what it should.

Two machines: ``TmpfsModel`` (every operation, over hard links, whiteouts, opaque and
deep directories, a metacopy upper file) and ``ReflinkModel`` (on XFS with
``sharing=on,cache=shared``: the data operations on reflinked files, copied up by
reflink). ``SCENARIOS`` replays known sequences through the same machines.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition, rule,
                                 run_state_machine_as_test)

import helpers
from core_driver import CoreDriver, Stat, Walker
from overlaypc.config import MountConfig, validate
from core_model_support import (DEV, NEXT_LINK, MHandle, MInode, Model, ModelError,
                                build_layers, check_upper, layer_state, split)

pytestmark = [pytest.mark.mount]

STEPS = 50
MAX_HANDLES = 6
OPENED = 7  # files opened are drawn from the first OPENED of a universe's files
#: Hypothesis prefers rules with few arguments, and a remount closes every handle:
#: unbounded, remounts would keep handles from living long
MAX_REMOUNTS = 2
READ_SIZE = 1 << 17

# The paths operations pick from (see ``Universe``).
FILES = ("a", "hl", "d1/h", "b", "b2", "mc", "top", "d1/f", "d1/g", "own",
         "deep/1/2/3/4/5/6/file", "deep/1/2/x", "opq/shown", "opq2/shown2")
SPECIALS = ("fifo1", "fifo2", "dev1", "dev2", "link2")
DIRS = ("d1", "opq", "opq2", "deep/1/2", "deep/1/2/3/4/5/6", "deep")
NEW = ("n1", "d1/n1", "n1/n2", "d1/gone", "d1/oci_gone", "opq/hidden", "opq2/hidden2", "sym",
       "deep/1/2/3/4/5/6/n1", ".wh.n1")

FLAGS = {"RDONLY": os.O_RDONLY, "RDWR": os.O_RDWR, "WRONLY": os.O_WRONLY,
         "RDWR|TRUNC": os.O_RDWR | os.O_TRUNC, "WRONLY|TRUNC": os.O_WRONLY | os.O_TRUNC,
         "RDWR|APPEND": os.O_RDWR | os.O_APPEND, "WRONLY|APPEND": os.O_WRONLY | os.O_APPEND}
CREATE_FLAGS = ("RDWR", "WRONLY", "RDWR|APPEND")
FILE_MODES = ("644", "600", "755", "640")
DIR_MODES = ("755", "700", "2775")
IDS = (0, 1000, 1234)
DATA = (b"BBBB", b"0123456789", b"x", b"\0\1\2" * 5)
OFFSETS = (0, 3, 4096, 65530)
SIZES = (0, 1, 10, 5000, 65536)


# ------------------------------------------------------------------------------------------
# The state machine
# ------------------------------------------------------------------------------------------
@dataclass
class Env:
    lower_fs: Path
    upper_fs: Path
    reflink: bool
    options: dict
    metacopy_file: bool = True


def _errname(e: int | None) -> str:
    return "success" if e is None else errno.errorcode.get(e, str(e))


class CoreModel(RuleBasedStateMachine):
    env: Env  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.base_lower = Path(tempfile.mkdtemp(prefix="ex-", dir=self.env.lower_fs))
        self.base_upper = Path(tempfile.mkdtemp(prefix="ex-", dir=self.env.upper_fs))
        self.layout = build_layers(self.base_lower, self.base_upper, reflink=self.env.reflink,
                                   metacopy_file=self.env.metacopy_file)
        self.lower_state = {p: layer_state(p) for p in self.layout.lowers}
        self.mnt = self.base_upper / "mnt"
        self.mnt.mkdir()
        self.model = Model(metacopy_file=self.env.metacopy_file)
        self.open_handles: list[MHandle] = []
        self.ino_of_token: dict[int, int] = {}
        self.token_of_ino: dict[int, int] = {}
        self.drv: CoreDriver | None = None
        self.remounts = 0
        self._mount()

    # -- mounting ------------------------------------------------------------------------
    def _mount(self) -> None:
        cfg = MountConfig(lowers=[str(p) for p in self.layout.lowers], upper=str(self.layout.upper),
                          work=str(self.layout.work), mountpoint=str(self.mnt),
                          index=self.model.index, metacopy=self.model.metacopy, **self.env.options)
        validate(cfg)
        self.drv = CoreDriver(cfg)
        self.vfs = Walker(self.drv)

    def _unmount(self) -> None:
        for h in self.open_handles:
            self.drv.release(h.fh)
        self.open_handles.clear()
        self.drv.close()
        self.drv = None
        for p, state in self.lower_state.items():
            assert layer_state(p) == state, f"lower layer {p.name} changed"
        check_upper(self.layout, self.model)

    def teardown(self) -> None:
        try:
            if self.drv is not None:
                self._unmount()
        finally:
            if self.drv is not None:
                self.drv.close()
            shutil.rmtree(self.base_lower, ignore_errors=True)
            shutil.rmtree(self.base_upper, ignore_errors=True)

    # -- comparing --------------------------------------------------------------------------
    def _outcome(self, what: str, real, model):
        """Run the real operation and the model's; both must succeed or fail alike."""
        try:
            got, got_err = real(), None
        except OSError as e:
            got, got_err = None, e.errno
        try:
            want, want_errs = model(), frozenset({None})
        except ModelError as e:
            want, want_errs = None, e.errnos
        assert got_err in want_errs, (f"{what}: the core answered {_errname(got_err)}, the model "
                                      f"{' or '.join(sorted(map(_errname, want_errs)))}")
        return got, want, got_err is None

    def _live_tokens(self) -> set[int]:
        live = {ino.token for ino in self.model.names.values()}
        live.update(h.inode.token for h in self.open_handles)
        return live

    def _observe_ino(self, ino: MInode, st_ino: int, what: str) -> None:
        tok = ino.token
        known = self.ino_of_token.get(tok)
        if known is not None:
            assert st_ino == known, (f"{what}: st_ino {st_ino}, but this inode showed {known} "
                                     f"(names now: {self.model.paths_of(ino)})")
            return
        other = self.token_of_ino.get(st_ino)
        if other is not None and other != tok and other in self._live_tokens():
            others = sorted({p for p, i in self.model.names.items() if i.token == other})
            assert False, (f"{what}: st_ino {st_ino} is also shown by another inode "
                           f"({others or 'an open file'})")
        self.ino_of_token[tok] = st_ino
        self.token_of_ino[st_ino] = tok

    def _compare_stat(self, got: Stat, ino: MInode, what: str, *, by_handle: bool = False) -> None:
        kinds = {"reg": stat.S_ISREG, "dir": stat.S_ISDIR, "lnk": stat.S_ISLNK,
                 "fifo": stat.S_ISFIFO, "chr": stat.S_ISCHR}
        assert kinds[ino.kind](got.mode), f"{what}: mode {oct(got.mode)} is not a {ino.kind}"
        if ino.kind != "lnk":
            assert stat.S_IMODE(got.mode) == ino.mode, \
                f"{what}: permissions {oct(stat.S_IMODE(got.mode))}, model {oct(ino.mode)}"
        assert (got.uid, got.gid) == (ino.uid, ino.gid), \
            f"{what}: owner {got.uid}:{got.gid}, model {ino.uid}:{ino.gid}"
        if ino.kind == "reg":
            assert got.size == len(ino.data), f"{what}: size {got.size}, model {len(ino.data)}"
        elif ino.kind == "lnk":
            assert got.size == len(os.fsencode(ino.target)), f"{what}: symlink size {got.size}"
        elif ino.kind == "chr":
            assert got.rdev == ino.rdev, f"{what}: rdev {got.rdev}, model {ino.rdev}"
        if ino.nlink is not None and not by_handle:
            assert got.nlink == ino.nlink, f"{what}: st_nlink {got.nlink}, model {ino.nlink}"
        self._observe_ino(ino, got.ino, what)

    def check_path(self, path: str) -> None:
        """Look ``path`` up afresh and compare everything about it with the model."""
        got, want, ok = self._outcome(f"lookup {path!r}", lambda: self.vfs.node(path),
                                      lambda: self.model.resolve(path))
        if not ok:
            return
        self._compare_stat(got.attr, want, f"stat {path!r}")
        if want.kind == "reg":
            fh = self.drv.open(got, os.O_RDONLY)
            try:
                data = self.drv.read(fh, len(want.data) + 4096, 0)
            finally:
                self.drv.release(fh)
            assert data == want.data, \
                f"fresh open of {path!r} read {data[:64]!r}..., model {want.data[:64]!r}..."
        elif want.kind == "lnk":
            assert self.drv.readlink(got) == want.target, f"readlink {path!r}"
        elif want.kind == "dir":
            names = set(self.drv.readdir(got))
            assert names == self.model.children(path), \
                f"listing of {path!r}: {sorted(names)}, model {sorted(self.model.children(path))}"

    def check_inode_names(self, ino: MInode | None) -> None:
        for path in self.model.paths_of(ino) if ino is not None else ():
            self.check_path(path)

    # -- open files -------------------------------------------------------------------------
    # Rules on open files take ``i``, an index into the open handles (oldest first).
    def handle(self, i: int) -> MHandle:
        return self.open_handles[i % len(self.open_handles)]

    @precondition(lambda self: self.open_handles)
    @rule(i=st.integers(0, MAX_HANDLES - 1), off=st.sampled_from(OFFSETS))
    def read(self, i, off):
        self.read_handle(self.handle(i), off)

    def read_handle(self, h: MHandle, off: int) -> None:
        if not h.readable:
            return
        data = self.drv.read(h.fh, READ_SIZE, off)
        want = h.inode.data[off:off + READ_SIZE]
        assert data == want, (f"read {h!r} at {off}: {len(data)} bytes {data[:48]!r}..., "
                              f"model {len(want)} bytes {want[:48]!r}...")

    @precondition(lambda self: self.open_handles)
    @rule(i=st.integers(0, MAX_HANDLES - 1), data=st.sampled_from(DATA), off=st.sampled_from(OFFSETS))
    def write(self, i, data, off):
        h = self.handle(i)
        if not h.writable:
            return
        if h.flags & os.O_APPEND:
            off = len(h.inode.data)  # the kernel passes the end of the file
        n = self.drv.write(h.fh, data, off)
        assert n == len(data), f"write {h!r}: {n} of {len(data)} bytes"
        self.model.write(h.inode, data, off)
        self._fstat(h)

    @precondition(lambda self: self.open_handles)
    @rule(i=st.integers(0, MAX_HANDLES - 1), size=st.sampled_from(SIZES))
    def ftruncate(self, i, size):
        h = self.handle(i)
        if not h.writable:
            return
        self.drv.ftruncate(h.fh, size)
        h.inode.data = h.inode.data[:size].ljust(size, b"\0")
        self._fstat(h)

    @precondition(lambda self: self.open_handles)
    @rule(i=st.integers(0, MAX_HANDLES - 1))
    def fstat(self, i):
        self._fstat(self.handle(i))

    def _fstat(self, h: MHandle) -> None:
        self._compare_stat(self.drv.fstat(h.fh), h.inode, f"fstat {h!r}", by_handle=True)

    @precondition(lambda self: self.open_handles)
    @rule(i=st.integers(0, MAX_HANDLES - 1))
    def release(self, i):
        h = self.handle(i)
        self.open_handles.remove(h)
        self.drv.release(h.fh)

    # -- the operations behind the path rules (declared by ``machine_for``) ---------------
    def do_open(self, path: str, flags_name: str, then_read: bool = False):
        flags = FLAGS[flags_name]
        known = self.model.names.get(path)
        if known is not None and known.kind not in ("reg", "dir"):
            return  # the kernel opens special files itself and follows symlinks
        if known is not None and known.is_dir and flags & os.O_ACCMODE == os.O_RDONLY:
            return  # that is OPENDIR
        fh, ino, ok = self._outcome(f"open {path!r} {flags_name}", lambda: self.vfs.open(path, flags),
                                    lambda: self.model.open(path, flags))
        if not ok:
            return
        h = MHandle(fh, ino, flags, path, f"{path} {flags_name}")
        self.open_handles.append(h)
        self._fstat(h)
        if then_read:
            self.read_handle(h, 0)

    def do_create(self, path: str, flags_name: str, mode: str):
        flags, perm = FLAGS[flags_name], int(mode, 8)
        got, ino, ok = self._outcome(f"create {path!r}", lambda: self.vfs.create(path, flags, perm),
                                     lambda: self.model.create(path, perm))
        if not ok:
            return
        self.open_handles.append(MHandle(got[1], ino, flags, path, f"{path} {flags_name} (created)"))
        self.check_path(path)

    def do_chmod(self, path: str, mode: str) -> None:
        known = self.model.names.get(path)
        if known is not None and known.kind == "lnk":
            return  # chmod follows symlinks; lchmod is refused by the VFS
        perm = int(mode, 8)
        if known is None or not known.is_dir:
            perm &= ~stat.S_ISGID  # setgid only on directories (chown would clear it)
        self.do_setattr(path, f"chmod {path!r} {oct(perm)}", mode=perm)

    def do_truncate(self, path: str, size: int) -> None:
        known = self.model.names.get(path)
        if known is not None and known.kind != "reg":
            return  # the VFS refuses these itself
        self.do_setattr(path, f"truncate {path!r} {size}", size=size)

    def do_setattr(self, path: str, what: str, **fields) -> None:
        got, ino, ok = self._outcome(what, lambda: self.vfs.setattr(path, **fields),
                                     lambda: self.model.setattr(path, **fields))
        if ok:
            self._compare_stat(got, ino, what)
            self.check_inode_names(ino)

    def do_mkdir(self, path: str, mode: str) -> None:
        self._change(f"mkdir {path!r}", lambda: self.vfs.mkdir(path, int(mode, 8)),
                     lambda: self.model.mkdir(path, int(mode, 8)), [path, split(path)[0]])

    def do_mknod(self, path: str, kind: str, mode: str) -> None:
        fmt = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "reg": stat.S_IFREG, "whiteout": stat.S_IFCHR}[kind]
        rdev = DEV if kind == "chr" else 0
        self._change(f"mknod {path!r} {kind}", lambda: self.vfs.mknod(path, fmt | int(mode, 8), rdev),
                     lambda: self.model.mknod(path, kind, int(mode, 8)), [path, split(path)[0]])

    def do_symlink(self, path: str, target: str) -> None:
        self._change(f"symlink {path!r} -> {target!r}", lambda: self.vfs.symlink(path, target),
                     lambda: self.model.symlink(path, target), [path])

    def do_link(self, src: str, dst: str) -> None:
        self._change(f"link {src!r} {dst!r}", lambda: self.vfs.link(src, dst),
                     lambda: self.model.link(src, dst), [src, dst])

    def do_unlink(self, path: str) -> None:
        ino = self.model.names.get(path)
        self._change(f"unlink {path!r}", lambda: self.vfs.unlink(path),
                     lambda: self.model.unlink(path), [split(path)[0], path])
        self.check_inode_names(ino)

    def do_rmdir(self, path: str) -> None:
        self._change(f"rmdir {path!r}", lambda: self.vfs.rmdir(path),
                     lambda: self.model.rmdir(path), [split(path)[0], path])

    def do_rename(self, old: str, new: str) -> None:
        src, dst = self.model.names.get(old), self.model.names.get(new)
        if src is not None and src is dst and old != new:
            return  # two names of one inode: the VFS does nothing, a path API cannot tell
        self._change(f"rename {old!r} {new!r}", lambda: self.vfs.rename(old, new),
                     lambda: self.model.rename(old, new), [split(old)[0], old, new])
        self.check_inode_names(dst)

    def _change(self, what: str, real, model, paths: list[str]) -> None:
        self._outcome(what, real, model)
        for path in paths:
            self.check_path(path)

    # -- whole-tree checks and remounts -----------------------------------------------------
    @rule()
    def check_tree(self):
        for path in sorted(self.model.names):
            self.check_path(path)
        for h in self.open_handles:
            self._fstat(h)

    @precondition(lambda self: self.remounts < MAX_REMOUNTS)
    @rule(index=st.booleans(), metacopy=st.booleans())
    def remount(self, index, metacopy):
        """Release every handle, unmount, check the layers, mount again (switching
        ``index`` and/or ``metacopy`` on), and compare the whole tree."""
        self.remounts += 1
        self._unmount()
        self.model.remount(index, metacopy)
        live = self._live_tokens()
        self.ino_of_token = {t: i for t, i in self.ino_of_token.items() if t in live}
        self.token_of_ino = {i: t for t, i in self.ino_of_token.items()}
        self._mount()
        self.check_tree()


@dataclass(frozen=True)
class Universe:
    """The paths a machine's operations pick from (interesting ones first: Hypothesis
    shrinks towards them)."""
    files: tuple[str, ...]
    specials: tuple[str, ...]
    dirs: tuple[str, ...]
    new: tuple[str, ...]

    @property
    def any(self) -> tuple[str, ...]:
        return self.files + self.specials + self.dirs + self.new


def machine_for(u: Universe, name: str, *, namespace: bool = True) -> type[CoreModel]:
    """``CoreModel`` with its path operations drawing from ``u``; ``namespace=False``
    leaves out the operations that create or remove names (the data paths get the steps)."""
    room = precondition(lambda self: len(self.open_handles) < MAX_HANDLES)

    opened = st.sampled_from(u.files[:OPENED] + u.new[:2] + u.dirs[:1] + u.specials[:1])

    class Machine(CoreModel):
        # every example starts with two files open, so that operations on open files
        # meet changes made through other handles and names from the first step on
        @initialize(path=opened, flags=st.sampled_from(list(FLAGS)), then_read=st.booleans())
        def open_first(self, path, flags, then_read):
            self.do_open(path, flags, then_read)

        @initialize(path=opened, flags=st.sampled_from(list(FLAGS)), then_read=st.booleans())
        def open_second(self, path, flags, then_read):
            self.do_open(path, flags, then_read)

        @room
        @rule(path=opened, flags=st.sampled_from(list(FLAGS)), then_read=st.booleans())
        def open_file(self, path, flags, then_read):
            self.do_open(path, flags, then_read)

        @room
        @precondition(lambda self: self.open_handles)
        @rule(i=st.integers(0, MAX_HANDLES - 1), flags=st.sampled_from(list(FLAGS)), then_read=st.booleans())
        def open_again(self, i, flags, then_read):
            """Another open of the name an open file was opened by (whatever it names now)."""
            self.do_open(self.handle(i).path, flags, then_read)

        if set(u.files) & set(NEXT_LINK):
            @room
            @precondition(lambda self: any(h.path in NEXT_LINK for h in self.open_handles))
            @rule(i=st.integers(0, MAX_HANDLES - 1), flags=st.sampled_from(list(FLAGS)),
                  then_read=st.booleans())
            def open_next_link(self, i, flags, then_read):
                """An open of the next name of the lower hard link an open file was opened by."""
                linked = [h for h in self.open_handles if h.path in NEXT_LINK]
                self.do_open(NEXT_LINK[linked[i % len(linked)].path], flags, then_read)

        @room
        @rule(path=st.sampled_from(u.new + u.files[:2]), flags=st.sampled_from(CREATE_FLAGS),
              mode=st.sampled_from(FILE_MODES))
        def create_file(self, path, flags, mode):
            self.do_create(path, flags, mode)

        @rule(path=st.sampled_from(u.files + u.specials + u.dirs + u.new[:1]),
              mode=st.sampled_from(FILE_MODES + DIR_MODES))
        def chmod(self, path, mode):
            self.do_chmod(path, mode)

        @rule(path=st.sampled_from(u.files + u.specials + u.dirs), uid=st.sampled_from(IDS),
              gid=st.sampled_from(IDS))
        def chown(self, path, uid, gid):
            self.do_setattr(path, f"chown {path!r} {uid}:{gid}", uid=uid, gid=gid)

        @rule(path=st.sampled_from(u.files + u.new[:1]), size=st.sampled_from(SIZES))
        def truncate(self, path, size):
            self.do_truncate(path, size)

        if namespace:
            @rule(path=st.sampled_from(u.new + u.dirs[:1] + u.files[:1]), mode=st.sampled_from(DIR_MODES))
            def mkdir(self, path, mode):
                self.do_mkdir(path, mode)

            @rule(path=st.sampled_from(u.new + u.files[:1]), mode=st.sampled_from(FILE_MODES),
                  kind=st.sampled_from(("fifo", "chr", "reg", "whiteout")))
            def mknod(self, path, kind, mode):
                self.do_mknod(path, kind, mode)

            @rule(path=st.sampled_from(u.new + u.files[:1]), to=st.sampled_from(("a", "d1/f", "nowhere")))
            def symlink(self, path, to):
                self.do_symlink(path, to)

            @rule(src=st.sampled_from(u.files + u.specials + u.dirs[:1]),
                  dst=st.sampled_from(u.new + u.files[:2]))
            def link(self, src, dst):
                self.do_link(src, dst)

            @rule(path=st.sampled_from(u.files + u.specials + u.new + u.dirs[:1]))
            def unlink(self, path):
                self.do_unlink(path)

            @rule(path=st.sampled_from(u.dirs + u.new[:3] + u.files[:1]))
            def rmdir(self, path):
                self.do_rmdir(path)

            @rule(old=st.sampled_from(u.any), new=st.sampled_from(u.any))
            def rename(self, old, new):
                self.do_rename(old, new)

        @rule(path=st.sampled_from(u.files + u.specials + u.dirs))
        def lookup(self, path):
            self.check_path(path)

    Machine.__name__ = Machine.__qualname__ = name
    return Machine


#: Everything, on tmpfs: the namespace operations over hard links, whiteouts, opaque dirs.
TmpfsModel = machine_for(Universe(FILES, SPECIALS, DIRS, NEW), "TmpfsModel")
#: On XFS: fewer names, so the data operations meet on the reflinked files.
ReflinkModel = machine_for(Universe(("big", "d1/big3"), (), (), ("n1",)),
                           "ReflinkModel", namespace=False)


def tmpfs_env(tmpfs_factory) -> Env:
    """Lowers on one tmpfs, upper and workdir on another (inode numbers through xino)."""
    return Env(tmpfs_factory(), tmpfs_factory(), reflink=False, options={})


def xfs_env(xfs_dir: Path) -> Env:
    """Every layer on one XFS: reflinked lower files, copy-up by reflink, extent sharing,
    ``cache=shared``."""
    return Env(xfs_dir, xfs_dir, reflink=True, options={"sharing": True, "cache": "shared"},
               metacopy_file=False)  # metacopy is the tmpfs machine's; here it would hide the rest


def test_core_model_tmpfs(tmpfs_factory):
    helpers.require("root")
    TmpfsModel.env = tmpfs_env(tmpfs_factory)
    run_state_machine_as_test(TmpfsModel, settings=settings(stateful_step_count=STEPS))


def test_core_model_xfs_reflink(xfs_dir):
    """Fewer operations and names, so each example is cheap: twice the steps and examples
    (the reflink defects need a copy-up, a read, a second open and a read, in that order)."""
    helpers.require("root")
    ReflinkModel.env = xfs_env(xfs_dir)
    run_state_machine_as_test(ReflinkModel, settings=settings(
        stateful_step_count=2 * STEPS, max_examples=2 * settings.default.max_examples))


# ------------------------------------------------------------------------------------------
# Known scenarios, replayed through the same machine (and so checked by the same model):
# the defects of issue 12 and what this test found, whether or not a random run meets them.
# ------------------------------------------------------------------------------------------
def step(rule_name: str, **args) -> tuple[str, dict]:
    return rule_name, args


SCENARIOS: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    # defect 1: index=off, each name of a lower hard link is its own inode
    "lower-hard-link-names-index-off": ("tmpfs", [
        step("open_file", path="a", flags="RDONLY", then_read=True),
        step("open_file", path="hl", flags="RDWR", then_read=False),
        step("write", i=1, data=b"BBBB", off=0),
        step("read", i=0, off=0),                 # a's old fd: the lower data
        step("lookup", path="a"),                 # a fresh open of a too; hl shows its own st_ino
        step("open_file", path="a", flags="RDWR", then_read=False),
        step("write", i=2, data=b"x", off=0),     # through a: its own upper file
        step("read", i=1, off=0),
    ]),
    # ... and with index=on all names are one inode
    "lower-hard-link-names-index-on": ("tmpfs", [
        step("remount", index=True, metacopy=False),
        step("open_file", path="a", flags="RDONLY", then_read=True),
        step("open_file", path="hl", flags="RDWR", then_read=False),
        step("write", i=1, data=b"BBBB", off=0),
        step("read", i=0, off=0),
        step("lookup", path="d1/h"),
    ]),
    # defect 2a: O_TRUNC after a reflink copy-up must drop the shared-extent map
    "truncating-open-after-reflink-copy-up": ("xfs", [
        step("open_file", path="big", flags="RDWR", then_read=False),    # reflink copy-up
        step("open_file", path="big", flags="RDONLY", then_read=True),   # a reader reads
        step("open_file", path="big", flags="WRONLY|TRUNC", then_read=False),
        step("write", i=2, data=b"0123456789", off=0),
        step("read", i=1, off=0),                                        # 10 bytes
    ]),
    # defect 3: an upper metacopy file under metacopy=off is EPERM, then readable with it on
    "metacopy-upper-file-with-metacopy-off": ("tmpfs", [
        step("lookup", path="mc"),
        step("remount", index=False, metacopy=True),
        step("lookup", path="mc"),
    ]),
    # found by this test (hunt, seed 2): fstat through an open metacopy file whose name was
    # replaced, moved or removed showed its lower data file's permissions (0o644, not 0o600)
    "metacopy-open-file-replaced-by-rename": ("tmpfs", [
        step("remount", index=False, metacopy=True),
        step("open_file", path="mc", flags="RDONLY", then_read=False),
        step("rename", old="a", new="mc"),
    ]),
    "metacopy-open-file-renamed": ("tmpfs", [
        step("remount", index=False, metacopy=True),
        step("open_file", path="mc", flags="RDONLY", then_read=True),
        step("rename", old="mc", new="n1"),
    ]),
    "metacopy-open-file-unlinked": ("tmpfs", [
        step("remount", index=False, metacopy=True),
        step("open_file", path="mc", flags="RDONLY", then_read=False),
        step("unlink", path="mc"),
    ]),
    # found by this test: index=on merges lower hard links of any non-directory
    "index-on-special-file-hard-links": ("tmpfs", [
        step("remount", index=True, metacopy=False),
        step("chmod", path="fifo1", mode="600"),
        step("chown", path="dev2", uid=1000, gid=0),
    ]),
    # found by this test: a 0/0 character device would be a whiteout
    "mknod-of-a-whiteout-device": ("tmpfs", [
        step("mknod", path="n1", kind="whiteout", mode="644"),
    ]),
    # found by this test: the group and setgid bit of a directory changed after its
    # structure was cached must still be inherited by new names in it
    "setgid-directory-changed-after-lookup": ("tmpfs", [
        step("chmod", path="d1", mode="2775"),
        step("chown", path="d1", uid=0, gid=1234),
        step("mkdir", path="d1/n1", mode="755"),
    ]),
    # found by this test: reading an index=on hard link whose copy shares extents
    "index-on-hard-link-with-shared-extents": ("xfs", [
        step("remount", index=True, metacopy=False),
        step("chown", path="a", uid=1000, gid=0),
    ]),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_core_model_scenario(name, request):
    helpers.require("root")
    where, steps = SCENARIOS[name]
    if where == "xfs":
        machine, env = ReflinkModel, xfs_env(request.getfixturevalue("xfs_dir"))
    else:
        machine, env = TmpfsModel, tmpfs_env(request.getfixturevalue("tmpfs_factory"))
    # only the metacopy scenario has the metacopy upper file: it would fail every other one
    env.metacopy_file = name.startswith("metacopy")
    machine.env = env
    state = machine()
    try:
        for rule_name, args in steps:
            getattr(state, rule_name)(**args)
        state.check_tree()
    finally:
        state.teardown()
