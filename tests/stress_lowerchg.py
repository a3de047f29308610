"""Workers of stress_mount.py for changes by path of lower files never copied up (race40):
the copy-up hand-over (``CopyUp.handing_over``), which the other modes take once per file at
most. Not collected by pytest.

LOWERCHG=N: lc/ holds a big lower tree, directories C0..C{LC_DIRS-1} of files f{k}_{j} (k the
changer that owns them; C0 merged with the second lower, some of its files there), some
setuid (a chown strips that), some owned by uid 1000. N ``lc_changer`` processes take their
files in a random order, each file untouched before, and change it by path: chmod, chown,
utime, truncate to a new size, setxattr user.*, an open with O_TRUNC (written or not); then
up to two changes more (metacopy=on: a chmod's metadata-only copy, then a truncate: its data
copy-up), each checked by stat against the changer's model. Before the first change a read
fd is often opened on the lower file (the open-foo case): after the changes its fstat must
show the model's mode and size, and its reads the model's data (handles=bind-at-open: its
data and size stay the lower file's, not checked). Some files get a hard link (g{k}_{j}, same
directory) and lose a name. Meanwhile ``lc_mover`` renames the directories and moves them
into lc/P and back, ``lc_namer`` renames the f* files (f -> fr and back, or into another
directory: a file rename copies it up, so it races with the changes' copy-ups),
``lc_holder`` keeps random files open for reading (reads and fstats; only errors count), and
``lc_remover`` unlinks every victim (f{k}_{j}, j % 8 == 7) while its changer changes it (the
changer then only needs each change to succeed or find no name; victims are in no model).
At the end every changer's files are checked against its model at their current names
(``lc_view``: data, mode, owner, mtime when set, nlink, user xattrs), on overlaypc's view and
on the kernel's read-only view of the layers; stress_mount compares the whole trees too.
"""
from __future__ import annotations

import errno
import os
import random
import stat
import time
import traceback
from pathlib import Path

import stress_extra

LC_DIRS = 3
#: files per changer
LC_FILES = int(os.environ.get("LOWERCHG_FILES", "120"))
LC_MODES = [0o644, 0o600, 0o755, 0o640, 0o4755]
#: shown IDs are the layers' + SHIFT (stress_mount's IDSHIFT, set before the workers fork)
SHIFT = 0


class LcFile:
    """A changer's model of one file (single writer: its changer)."""

    def __init__(self, data: bytes, mode: int, uid: int, names: set[str]) -> None:
        self.data = bytearray(data)
        self.mode = mode
        self.uid = self.gid = uid
        self.mtime: int | None = None
        self.xattrs: dict[str, bytes] = {}
        self.names = names

    def out(self) -> tuple:
        return (bytes(self.data), self.mode, self.uid, self.mtime, dict(self.xattrs), len(self.names))


def lc_paths(i: int) -> list[str]:
    return [f"C{i}", f"C{i}x", f"P/C{i}", f"P/C{i}x"]


def build_lowerchg(lower: Path, lower2: Path, nchangers: int, rng: random.Random) -> list[dict]:
    """lc/ in the lower layers; each changer's model: name -> ``LcFile``."""
    top = lower / "lc"
    (top / "P").mkdir(parents=True)
    for i in range(LC_DIRS):
        (top / f"C{i}").mkdir()
    (lower2 / "lc" / "C0").mkdir(parents=True)  # (C0 merges the two lowers)
    models = []
    for k in range(nchangers):
        files = {}
        for j in range(LC_FILES):
            name = f"f{k}_{j}"
            i = j % LC_DIRS
            layer = lower2 if i == 0 and j % 2 == 0 else lower
            data = os.urandom(rng.choice([0, 10, 4096, 70000, 200000]))
            mode = rng.choice(LC_MODES)
            uid = rng.choice([0, 0, 1000])
            p = layer / "lc" / f"C{i}" / name
            p.write_bytes(data)
            os.chown(p, uid, uid)
            os.chmod(p, mode)
            files[name] = LcFile(data, mode, uid + SHIFT, {name})
        models.append(files)
    for d in [top, *top.iterdir(), lower2 / "lc", lower2 / "lc" / "C0"]:
        os.chmod(d, 0o755)
    return models


def _dirs(top: Path) -> list[Path]:
    return [top / d for i in range(LC_DIRS) for d in lc_paths(i)]


def find(top: Path, name: str, fn, tries: int = 400):
    """``[fn(path)]`` at ``name``'s current path (its directory moved, it renamed or moved
    by ``lc_namer``): retried on ENOENT; None when not found in ``tries`` rounds."""
    names = (name, name + "r") if name.startswith("f") else (name,)
    for _ in range(tries):
        for d in _dirs(top):
            for nm in names:
                try:
                    return [fn(d / nm)]
                except FileNotFoundError:
                    continue
    return None


def victim(name: str) -> bool:
    """A file ``lc_remover`` unlinks."""
    return name.startswith("f") and int(name.split("_")[1]) % 8 == 7


def lc_changer(k: int, root: str, files: dict, seed: int, q, bind_at_open: bool,
               metacopy: bool) -> None:
    rng = random.Random(seed)
    top = Path(root) / "lc"
    log: list = []

    def found(name, fn, what):
        got = find(top, name, fn)
        if got is None:
            raise stress_extra.Failure(f"{what}: {name} not found")
        return got[0]

    class Gone(Exception):
        """A victim ``lc_remover`` unlinked."""

    def find_victim(name, fn, what):
        try:
            got = find(top, name, fn, tries=3)
        except FileExistsError:
            # (the node's name went between the path's lookup and the change: a lower file
            # with no name left is copied up by no change, EEXIST as the kernel overlay
            # answers, tests/test_nameless_copyup.py)
            raise Gone(name) from None
        if got is None:
            raise Gone(name)
        return got[0]

    def check_stat(st, f: LcFile, what: str, fd: bool = False, gone: bool = False) -> None:
        want = (stat.S_IMODE(f.mode), f.uid, f.gid, len(f.data), len(f.names))
        have = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink)
        if gone and have[4] == 0:  # (a victim, unlinked between the stat's lookup and getattr)
            have = have[:4] + want[4:]
        if fd and bind_at_open:
            want, have = want[:3], have[:3]
        if want != have:
            raise stress_extra.Failure(f"{what}: (mode, uid, gid, size, nlink) {have} != model {want}")
        if f.mtime is not None and st.st_mtime_ns != f.mtime:
            raise stress_extra.Failure(f"{what}: mtime {st.st_mtime_ns} != {f.mtime}")

    def check_data(got: bytes, f: LcFile, what: str) -> None:
        if got != bytes(f.data):
            at = next((i for i, (a, b) in enumerate(zip(got, f.data)) if a != b),
                      min(len(got), len(f.data)))
            raise stress_extra.Failure(f"{what}: {len(got)} bytes != model's {len(f.data)}, "
                                       f"first difference at {at}")

    def change(name: str, f: LcFile, op: str) -> None:
        log.append((op, name))
        # (a victim, unlinked meanwhile: the change may find no name)
        look = find_victim if victim(name) else found
        if op == "chmod":
            m = rng.choice(LC_MODES)
            look(name, lambda p: os.chmod(p, m), op)
            f.mode = m
        elif op == "chown":
            u = rng.choice([0, 1000, 1001]) + SHIFT
            look(name, lambda p: os.chown(p, u, u), op)
            f.uid = f.gid = u
            f.mode &= ~stat.S_ISUID  # (a chown strips setuid, root's too)
        elif op == "utime":
            t = rng.randint(10**18, 2 * 10**18)
            look(name, lambda p: os.utime(p, ns=(t, t)), op)
            f.mtime = t
        elif op == "truncate":
            n = rng.choice([0, 1, len(f.data) // 2, len(f.data) + 1, len(f.data) + 5000])
            if n == len(f.data):
                n += 7  # (a new size)
            look(name, lambda p: os.truncate(p, n), op)
            f.data = (f.data + bytearray(max(0, n - len(f.data))))[:n]
            f.mtime = None
        elif op == "setxattr":
            xn, xv = f"user.lc{rng.randrange(3)}", os.urandom(rng.randrange(1, 40))
            look(name, lambda p: os.setxattr(p, xn, xv), op)
            f.xattrs[xn] = xv
        elif op == "otrunc":
            data = os.urandom(rng.choice([0, 0, 10, 5000]))

            def otrunc(p):
                fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
                try:
                    if data:
                        os.write(fd, data)
                finally:
                    os.close(fd)
            try:
                look(name, otrunc, op)
            except OSError as e:
                if not stress_extra.budget_spent(e):
                    raise
                log.append(("ENFILE",))
                return
            f.data = bytearray(data)
            f.mtime = None
        st = look(name, os.lstat, f"stat after {op}")
        check_stat(st, f, f"stat after {op} of {name}", gone=victim(name))
        if op == "setxattr":
            for xn, xv in f.xattrs.items():
                got = look(name, lambda p: os.getxattr(p, xn), "getxattr")
                if got != xv:
                    raise stress_extra.Failure(f"getxattr {xn} of {name}: {got!r} != {xv!r}")

    def open_read(name: str) -> int | None:
        try:
            got = find(top, name, lambda p: os.open(p, os.O_RDONLY), 3 if victim(name) else 400)
        except OSError as e:
            if not stress_extra.budget_spent(e):
                raise
            return None
        if got is None and not victim(name):
            raise stress_extra.Failure(f"open: {name} not found")
        return None if got is None else got[0]

    try:
        order = sorted(files)
        rng.shuffle(order)
        kinds = ["chmod", "chown", "utime", "truncate", "setxattr", "otrunc"]
        for name in order:
            f = files[name]
            fd = open_read(name) if rng.random() < 0.4 else None
            if metacopy and rng.random() < 0.4:
                ops = ["chmod", "truncate"]  # (a metacopy copy, then its data's: review28)
            else:
                ops = [rng.choice(kinds) for _ in range(rng.choice([1, 1, 2, 3]))]
            try:
                for op in ops:
                    change(name, f, op)
            except Gone:
                log.append(("gone", name))
            if victim(name):
                del files[name]
                if fd is not None:
                    os.close(fd)
                continue
            if fd is not None:
                try:
                    check_stat(os.fstat(fd), f, f"fstat of the fd opened before {ops} of {name}",
                               fd=True)
                    if not bind_at_open:
                        check_data(os.pread(fd, len(f.data) + 10, 0), f,
                                   f"read of the fd opened before {ops} of {name}")
                finally:
                    os.close(fd)
            if rng.random() < 0.3:
                check_data(found(name, lambda p: p.read_bytes(), "read"), f, f"read of {name}")
            r = rng.random()
            if r < 0.08:  # a hard link beside it; sometimes the first name goes
                g = "g" + name[1:]
                log.append(("link", name, g))
                found(name, lambda p: os.link(p, p.parent / g), "link")
                f.names.add(g)
                files[g] = f
                if rng.random() < 0.5:
                    log.append(("unlink", name))
                    found(name, os.unlink, "unlink")
                    f.names.discard(name)
                    del files[name]
                check_stat(found(g, os.lstat, "stat"), f, f"stat of link {g}")
            elif r < 0.12:
                log.append(("unlink", name))
                found(name, os.unlink, "unlink")
                f.names.discard(name)
                del files[name]
        q.put((f"lc{k}", "ok", {n: f.out() for n, f in files.items()}))
    except BaseException as e:  # noqa
        q.put((f"lc{k}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}\n"
               f"last ops: {log[-12:]}"))
    finally:  # (BASE/oplog-lc{k}.txt: the final views may find what the changer did not)
        with open(Path(root).parent / f"oplog-lc{k}.txt", "w") as out:
            out.write("\n".join(map(repr, log)))


def lc_mover(root: str, stop, q, seed: int) -> None:
    """lc/C{i} <-> C{i}x, into lc/P and back; back home at the end."""
    stress_extra.move_dirs(Path(root) / "lc", lc_paths, LC_DIRS, "lcmover", stop, q, seed)


def lc_namer(root: str, stop, q, seed: int) -> None:
    """Renames f* files in lc/'s directories (f <-> fr) or moves them into another one."""
    rng = random.Random(seed)
    top = Path(root) / "lc"
    n = 0
    try:
        while not stop.is_set():
            d = rng.choice(_dirs(top))
            try:
                names = [x for x in os.listdir(d) if x.startswith("f")]
            except FileNotFoundError:
                continue
            if not names:
                continue
            nm = rng.choice(names)
            if rng.random() < 0.7:
                dst = d / (nm[:-1] if nm.endswith("r") else nm + "r")
            else:
                dst = rng.choice(_dirs(top)) / nm
            try:
                os.rename(d / nm, dst)
                n += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EXDEV:  # (redirect_dir=off: a merged directory's moves)
                    raise
            time.sleep(rng.random() * 0.004)
        q.put(("lcnamer", "ok", n))
    except BaseException as e:  # noqa
        q.put(("lcnamer", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def lc_remover(root: str, nchangers: int, stop, q, seed: int) -> None:
    """Unlinks every changer's victims (``victim``), in a random order, all before it ends."""
    rng = random.Random(seed)
    top = Path(root) / "lc"
    left = [f"f{k}_{j}" for k in range(nchangers) for j in range(LC_FILES) if victim(f"f{k}_{j}")]
    rng.shuffle(left)
    try:
        for name in left:
            if find(top, name, os.unlink, tries=100000) is None:
                raise stress_extra.Failure(f"victim {name} not found")
            time.sleep(rng.random() * 0.08)  # (spread over the changers' run)
        q.put(("lcremover", "ok", len(left)))
    except BaseException as e:  # noqa
        q.put(("lcremover", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def lc_holder(root: str, stop, q, seed: int, bind_at_open: bool) -> None:
    """Keeps a few lc/ files open for reading, reads and fstats them, closes them (fstats
    only under handles=bind-at-open: a read through a handle opened before a copy-up fills
    the inode's page cache with the lower data, which later opens keep on purpose, the
    fuse-overlayfs failure it reproduces: test_coherence's check 4)."""
    rng = random.Random(seed)
    top = Path(root) / "lc"
    held: list[int] = []
    n = 0
    try:
        while not stop.is_set():
            d = rng.choice(_dirs(top))
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            if names:
                fd = stress_extra.open_unless_skipped(d / rng.choice(names), os.O_RDONLY)
                if fd is not None:
                    held.append(fd)
                    n += 1
            while len(held) > 6 or (held and rng.random() < 0.3):
                fd = held.pop(rng.randrange(len(held)))
                try:
                    os.fstat(fd)
                    if not bind_at_open:
                        os.pread(fd, 1 << 18, 0)
                finally:
                    os.close(fd)
            time.sleep(rng.random() * 0.003)
        for fd in held:
            os.close(fd)
        q.put(("lcholder", "ok", n))
    except BaseException as e:  # noqa
        q.put(("lcholder", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def lc_view(root: Path, made: dict, owners: bool = True, shift: int = 0,
            xattrs: bool = True) -> list[str]:
    """The changers' files (name -> ``LcFile.out()``) against a view of lc/ (directories back
    home): each name once, data, mode, owner (the view shows IDs - ``shift``), mtime when
    set, nlink, user xattrs; no other name."""
    problems = []
    at: dict[str, Path] = {}
    top = root / "lc"
    for i in range(LC_DIRS):
        for nm in os.listdir(top / f"C{i}"):
            key = nm[:-1] if nm.startswith("f") and nm.endswith("r") else nm
            if key in at:
                problems.append(f"{key} at two names: {at[key]} and {top / f'C{i}' / nm}")
            at[key] = top / f"C{i}" / nm
    for name, (data, mode, uid, mtime, xs, nlink) in made.items():
        p = at.pop(name, None)
        if p is None:
            problems.append(f"lc {name} missing")
            continue
        st = os.lstat(p)
        have = (stat.S_IMODE(st.st_mode), st.st_uid + shift, st.st_gid + shift, st.st_size,
                st.st_nlink)
        want = (stat.S_IMODE(mode), uid, uid, len(data), nlink)
        if not owners:
            have, want = have[3:], want[3:]
        if have != want:
            problems.append(f"{p}: (mode, uid, gid, size, nlink) {have} != model {want}")
        if p.read_bytes() != data:
            problems.append(f"{p}: data differs from the model's")
        if mtime is not None and st.st_mtime_ns != mtime:
            problems.append(f"{p}: mtime {st.st_mtime_ns} != model {mtime}")
        if xattrs:
            got = {x: os.getxattr(p, x) for x in os.listxattr(p) if x.startswith("user.lc")}
            if got != xs:
                problems.append(f"{p}: user xattrs {sorted(got)} != model {sorted(xs)}")
    for name, p in sorted(at.items())[:20]:
        problems.append(f"{p}: in the view, in no model")
    return problems
