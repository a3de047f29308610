"""Workers of stress_mount.py for the code main got after soak13 (soak15): O_TMPFILE + linkat,
reopening nameless open files through /proc/self/fd/N, listers that seek back to saved cookies,
and directories held open while another process removes them. Not collected by pytest.

TMPFILE=N: N ``tmper`` processes make O_TMPFILE files in tmp/T0..T2 (T0 merged, T1 lower
only, T2 upper only), write them through the fd and a second fd reopened through
/proc/self/fd/N, link them (linkat /proc/self/fd/N with AT_SYMLINK_FOLLOW, or AT_EMPTY_PATH)
into a directory held open by fd while ``tmp_mover`` renames and moves those directories;
O_EXCL ones must not link (ENOENT). They also unlink named files (upper, and lower ones:
copy-up impossible without a name) while open and reopen them through /proc/self/fd/N.
At the end every linked object is at its names only (``tmp_view``), same inode, data, mode.
REOPENMETA=1 (soak23, with TMPFILE): ``reopen_meta``: a lower file of T1 (m{i}) is chmodded
(under metacopy=on a metacopy copy-up: its data stays below), opened read-only, unlinked, then
changed through its fd: reopened through /proc/self/fd/N ``O_RDWR`` (and written) or
``O_WRONLY|O_TRUNC``, or truncated through that magic link. The kernel overlay's answer is
"ok" (it copies the data into the unlinked upper file: tests/test_nameless_copyup.py); every
fd (one opened before the chmod too) must read the new data, at the chmodded mode, nlink 0
(under handles=bind-at-open the fds open before the change keep the lower data: not read).
SEEKERS=N (with BIGDIR): N ``big_seeker`` processes read big/ with getdents64 on several fds
in small steps, lseek back to saved cookies (seekdir), check telldir (lseek SEEK_CUR) is the
last entry's cookie, rewind; each whole listing: no name twice, every stable name there.
HELDDIRS=1: ``dir_holder`` opens directories of held/ and keeps them open while
``dir_remover`` empties and removes them (and makes them again); a held directory whose
fstat says removed (st_nlink 0) must list empty and refuse creations with ENOENT.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import random
import stat
import struct
import traceback
from pathlib import Path

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
SYS_GETDENTS64 = 217  # x86_64
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100
#: DAEMON_NOFILE set: an open answered ENFILE is skipped (the daemon's fd budget is spent by
#: the filers, which hold an fd on every object they made, hundreds in all)
LOWFD = bool(os.environ.get("DAEMON_NOFILE"))
#: REOPENMETA=1 (soak23): tmpers change nameless (metacopy) copied-up lower files through
#: their fd. Apart so that the sequences of older seeds stay the same
REOPENMETA = bool(os.environ.get("REOPENMETA"))
#: the mount has ``handles=bind-at-open`` (set by stress_mount before the workers fork): an
#: fd opened before a copy-up keeps reading the lower data (the stale read it is for)
BIND_AT_OPEN = False


def budget_spent(e: OSError) -> bool:
    """``e`` is the ENFILE of a daemon whose fd budget is spent, which a worker skips
    under DAEMON_NOFILE (``LOWFD``)."""
    return LOWFD and e.errno == errno.ENFILE


def open_unless_skipped(path, flags: int) -> int | None:
    """``os.open(path, flags)``; None where a worker skips it: the file is gone (another
    worker's change) or the daemon's fd budget is spent (``budget_spent``)."""
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        if not budget_spent(e):
            raise
        return None


class Failure(Exception):
    pass


def getdents(fd: int, size: int) -> list[tuple[str, int]]:
    """One getdents64 call: [(name, d_off)] ('.' and '..' included)."""
    buf = ctypes.create_string_buffer(size)
    n = LIBC.syscall(SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    out, pos, raw = [], 0, buf.raw[:n]
    while pos < n:
        _ino, off, reclen, _typ = struct.unpack_from("QqHB", raw, pos)
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0].decode()
        out.append((name, off))
        pos += reclen
    return out


def linkat_empty(fd: int, dfd: int, name: str) -> None:
    if LIBC.linkat(fd, b"", dfd, name.encode(), AT_EMPTY_PATH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# --- O_TMPFILE and reopen (TMPFILE=N) ------------------------------------------------------

TMP_DIRS = 3


def tmp_paths(i: int) -> list:
    return [f"T{i}", f"T{i}x", f"P/T{i}", f"P/T{i}x"]


def build_tmp(lower: Path, upper: Path) -> None:
    for d in ("tmp", "tmp/P", "tmp/T0", "tmp/T1"):
        (lower / d).mkdir()
    for i in range(40):
        (lower / "tmp" / "T1" / f"l{i}").write_bytes(b"lower %d " % i * (1 + i * 50))
        if REOPENMETA:
            (lower / "tmp" / "T1" / f"m{i}").write_bytes(b"meta %d " % i * (1 + i * 300))
    for d in ("tmp", "tmp/T0", "tmp/T2"):
        (upper / d).mkdir(exist_ok=True)


def _open_dir(top: Path, i: int):
    for _ in range(200):
        for d in tmp_paths(i):
            try:
                return os.open(top / d, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue
    raise Failure(f"T{i} not found at any of its paths")


def tmper(c: int, root: str, seed: int, nops: int, q):
    rng = random.Random(seed)
    top = Path(root) / "tmp"
    objs = {}  # ident -> [data, mode, st_ino, names (set of (dir index, name))]
    log = []
    lowers = [f"l{i}" for i in range(40) if i % 4 == c % 4]
    metas = [f"m{i}" for i in range(40) if i % 4 == c % 4] if REOPENMETA else []

    def check_fd(fd, data, mode, nlink, ino, what):
        st = os.fstat(fd)
        have = (stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink, st.st_ino if ino else None)
        want = (mode, len(data), nlink, ino)
        if have != want:
            raise Failure(f"{what}: fstat (mode, size, nlink, ino) {have} != {want}")
        got = os.pread(fd, len(data) + 10, 0)
        if got != bytes(data):
            raise Failure(f"{what}: read {len(got)} bytes != model {len(data)}")
        return st

    try:
        def one(step):
                op = rng.choice(["tmpfile", "tmpfile", "tmpfile", "reopen", "reopen_lower", "stat"]
                                + (["reopen_meta", "reopen_meta"] if REOPENMETA else []))
                ident = c * 100000 + step
                log.append((op, ident))
                if op == "stat":
                    if objs:
                        o = rng.choice(sorted(objs))
                        data, mode, ino, names = objs[o]
                        i, nm = sorted(names)[0]
                        dfd = _open_dir(top, i)
                        try:
                            fd = os.open(nm, os.O_RDONLY, dir_fd=dfd)
                        finally:
                            os.close(dfd)
                        try:
                            check_fd(fd, data, mode, len(names), ino, f"open of {nm}")
                        finally:
                            os.close(fd)
                    return
                if op == "reopen_meta":
                    if metas:
                        nm = metas.pop(rng.randrange(len(metas)))
                        reopen_meta(_open_dir(top, 1), nm, rng, log)
                    return
                if op == "reopen_lower":  # a lower file unlinked while open, reopened
                    if not lowers:
                        return
                    nm = rng.choice(lowers)
                    dfd = _open_dir(top, 1)
                    try:
                        try:
                            fd = os.open(nm, os.O_RDONLY, dir_fd=dfd)
                        except FileNotFoundError:
                            return  # unlinked before
                        try:
                            data = os.pread(fd, 1 << 20, 0)
                            os.unlink(nm, dir_fd=dfd)
                            lowers.remove(nm)
                            fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
                            try:
                                if os.pread(fd2, 1 << 20, 0) != data:
                                    raise Failure(f"reopened unlinked lower {nm}: other data")
                                if os.fstat(fd2).st_ino != os.fstat(fd).st_ino:
                                    raise Failure(f"reopened unlinked lower {nm}: other inode")
                            finally:
                                os.close(fd2)
                            try:  # write access: the kernel overlay refuses too (no name to copy up)
                                fd3 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
                            except OSError as e:
                                log[-1] += (f"rw reopen {errno.errorcode.get(e.errno)}",)
                            else:
                                log[-1] += ("rw reopen ok",)
                                try:
                                    os.pwrite(fd3, b"X", 0)
                                    if os.pread(fd, 1, 0) != b"X":
                                        raise Failure(f"unlinked lower {nm}: write through reopen "
                                                      f"not seen by the first fd")
                                finally:
                                    os.close(fd3)
                        finally:
                            os.close(fd)
                    finally:
                        os.close(dfd)
                    return
                i = rng.randrange(TMP_DIRS)
                mode = rng.choice([0o644, 0o600, 0o640, 0o755])
                data = bytearray(os.urandom(rng.choice([0, 10, 5000, 70000])))
                dfd = _open_dir(top, i)
                fds = []
                try:
                    if op == "reopen":  # a new upper file, unlinked while open, reopened
                        nm = f"r{ident}"
                        fd = os.open(nm, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode, dir_fd=dfd)
                        fds.append(fd)
                        os.fchmod(fd, mode)
                        os.pwrite(fd, data, 0)
                        if rng.random() < 0.5:  # moved away first, then unlinked at its new name
                            os.rename(nm, nm + "m", src_dir_fd=dfd, dst_dir_fd=dfd)
                            nm += "m"
                        os.unlink(nm, dir_fd=dfd)
                    else:
                        excl = rng.random() < 0.15
                        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | (os.O_EXCL if excl else 0),
                                     mode, dir_fd=dfd)
                        fds.append(fd)
                        os.fchmod(fd, mode)  # the umask
                        os.pwrite(fd, data, 0)
                    st = check_fd(fd, data, mode, 0, None, f"{op} {ident} before reopen")
                    ino = st.st_ino
                    fd2 = os.open(f"/proc/self/fd/{fd}", rng.choice([os.O_RDWR, os.O_RDONLY]))
                    fds.append(fd2)
                    if os.fstat(fd2).st_ino != ino:
                        raise Failure(f"{op} {ident}: reopened fd has inode {os.fstat(fd2).st_ino} != {ino}")
                    if fcntl.fcntl(fd2, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR:
                        extra = os.urandom(rng.choice([1, 100, 9000]))
                        off = rng.randint(0, len(data))
                        os.pwrite(fd2, extra, off)
                        data[off:off + len(extra)] = extra
                        if rng.random() < 0.3:
                            n = rng.randint(0, len(data))
                            os.ftruncate(fd2, n)
                            del data[n:]
                    check_fd(fd, data, mode, 0, ino, f"{op} {ident} after write through reopen")
                    check_fd(fd2, data, mode, 0, ino, f"{op} {ident} reopened fd")
                    # an xattr set through one fd of the nameless file, read through the other
                    xv = os.urandom(rng.choice([0, 8, 300]))
                    os.setxattr(rng.choice([fd, fd2]), "user.t", xv)
                    for x in (fd, fd2):
                        if "user.t" not in os.listxattr(x) or os.getxattr(x, "user.t") != xv:
                            raise Failure(f"{op} {ident}: user.t not read back through fd "
                                          f"{'reopened' if x == fd2 else 'first'}: "
                                          f"{os.listxattr(x)}")
                    # link: an unlinked file (nlink 0, not O_TMPFILE) or an O_EXCL tmpfile must not
                    j = rng.randrange(TMP_DIRS)
                    tdfd = _open_dir(top, j)
                    fds.append(tdfd)
                    name = f"n{ident}"
                    how = rng.choice(["proc", "empty"])
                    try:
                        if how == "proc":
                            os.link(f"/proc/self/fd/{rng.choice([fd, fd2])}", name, dst_dir_fd=tdfd,
                                    follow_symlinks=True)
                        else:
                            linkat_empty(rng.choice([fd, fd2]), tdfd, name)
                    except OSError as e:
                        if op == "reopen" or excl:
                            if e.errno != errno.ENOENT:
                                raise Failure(f"{op} {ident} (excl {excl}) link {how}: "
                                              f"{errno.errorcode.get(e.errno)} != ENOENT")
                            return
                        raise
                    if op == "reopen" or excl:
                        raise Failure(f"{op} {ident} (excl {excl}): link {how} succeeded")
                    names = {(j, name)}
                    objs[ident] = [data, mode, ino, names]
                    check_fd(fd, data, mode, 1, ino, f"tmpfile {ident} after link {how}")
                    st2 = os.stat(name, dir_fd=tdfd, follow_symlinks=False)
                    lp = f"/proc/self/fd/{tdfd}/{name}"
                    if os.getxattr(lp, "user.t") != xv:
                        raise Failure(f"tmpfile {ident}: user.t set before the link not at its name")
                    if (st2.st_ino, st2.st_size, st2.st_nlink) != (ino, len(data), 1):
                        raise Failure(f"tmpfile {ident}: stat of its name {(st2.st_ino, st2.st_size, st2.st_nlink)}"
                                      f" != {(ino, len(data), 1)}")
                    if rng.random() < 0.5:  # write after the link, through either fd
                        w = fd2 if fcntl.fcntl(fd2, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR else fd
                        extra = os.urandom(rng.choice([1, 3000]))
                        os.pwrite(w, extra, len(data))
                        data += extra
                    if rng.random() < 0.3:  # a second name in another directory
                        k = rng.randrange(TMP_DIRS)
                        kdfd = _open_dir(top, k)
                        fds.append(kdfd)
                        os.link(name, name + "b", src_dir_fd=tdfd, dst_dir_fd=kdfd)
                        names.add((k, name + "b"))
                    check_fd(fd, data, mode, len(names), ino, f"tmpfile {ident} end")
                finally:
                    for x in fds:
                        os.close(x)
                    os.close(dfd)
        for step in range(nops):
            try:
                one(step)
            except OSError as e:
                if not budget_spent(e):
                    raise
                log.append(("ENFILE",))
        q.put((f"tmper{c}", "ok", {o: (bytes(v[0]), v[1], v[2], sorted(v[3])) for o, v in objs.items()}))
    except BaseException as e:  # noqa
        q.put((f"tmper{c}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}\nlast ops: {log[-12:]}"))


def reopen_meta(dfd: int, nm: str, rng: random.Random, log: list) -> None:
    """REOPENMETA: lower file ``nm`` of the directory ``dfd`` (closed here) copied up by a
    chmod (metacopy=on: its data stays below), opened read-only, unlinked, changed through
    its fd; the kernel overlay answers each change "ok" (it copies the data up first)."""
    fds = []
    try:
        early = rng.random() < 0.5  # an fd opened before the copy-up (on the lower data)
        if early:
            fds.append(os.open(nm, os.O_RDONLY, dir_fd=dfd))
        mode = rng.choice([0o600, 0o640, 0o604])
        os.chmod(nm, mode, dir_fd=dfd)
        fd = os.open(nm, os.O_RDONLY, dir_fd=dfd)
        fds.append(fd)
        data = bytearray(os.pread(fd, 1 << 20, 0))
        ino = os.fstat(fd).st_ino
        os.unlink(nm, dir_fd=dfd)
        how = rng.choice(["rw", "rw", "wtrunc", "truncate"])
        log[-1] += (nm, how, early, len(data))
        magic = f"/proc/self/fd/{fd}"
        before = len(fds)  # (fds[:before] were open before the change)
        try:
            if how == "rw":
                fds.append(os.open(magic, os.O_RDWR))
                extra = os.urandom(rng.choice([1, 100, 9000]))
                off = rng.randint(0, len(data))
                os.pwrite(fds[-1], extra, off)
                data[off:off + len(extra)] = extra
            elif how == "wtrunc":
                fds.append(os.open(magic, os.O_WRONLY | os.O_TRUNC))
                del data[:]
                extra = os.urandom(rng.choice([0, 7, 5000]))
                os.write(fds[-1], extra)
                data += extra
            else:
                n = rng.randint(0, len(data) + 100)
                os.truncate(magic, n)
                data = data[:n] + bytes(max(0, n - len(data)))
        except OSError as e:
            raise Failure(f"reopen_meta {nm} {how}: {errno.errorcode.get(e.errno)}, the "
                          f"kernel overlay's answer is ok") from e
        for j, x in enumerate(fds):
            which = f"fd {j} of {len(fds)} ({before} open before the change; early fd {early})"
            st = os.fstat(x)
            have = (stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink, st.st_ino)
            if have != (mode, len(data), 0, ino):
                raise Failure(f"reopen_meta {nm} {how}, {which}: fstat (mode, size, "
                              f"nlink, ino) {have} != {(mode, len(data), 0, ino)}")
            if BIND_AT_OPEN and j < before:
                continue  # (bound to the lower data at open)
            if fcntl.fcntl(x, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY:
                got = os.pread(x, len(data) + 10, 0)
                if got != bytes(data):
                    raise Failure(f"reopen_meta {nm} {how}, {which}: read {len(got)} bytes, "
                                  f"not the {len(data)} written")
    finally:
        for x in fds:
            os.close(x)
        os.close(dfd)


def move_dirs(top: Path, paths, count: int, label: str, stop, q, seed: int) -> None:
    """Renames ``top``'s directories 0..count-1 among their names ``paths(i)`` (the first
    is the home name: X{i} <-> X{i}x, into P/ and back) until ``stop``; back home at the
    end (EXDEV, redirect_dir=off: that directory stays). Reports ``(label, "ok", moves)``."""
    rng = random.Random(seed)
    where = {i: paths(i)[0] for i in range(count)}
    stuck = set()
    n = 0
    try:
        while not stop.is_set():
            i = rng.choice([x for x in range(count) if x not in stuck] or [None])
            if i is None:
                break
            new = rng.choice([x for x in paths(i) if x != where[i]])
            try:
                os.rename(top / where[i], top / new)
                where[i] = new
                n += 1
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                stuck.add(i)
        for i in range(count):
            if where[i] != paths(i)[0]:
                os.rename(top / where[i], top / paths(i)[0])
        q.put((label, "ok", n))
    except BaseException as e:  # noqa
        q.put((label, "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}\nwhere {where}"))


def tmp_mover(root: str, stop, q, seed: int):
    """Renames tmp/T{i} <-> T{i}x and moves them into tmp/P and back; back at the end."""
    move_dirs(Path(root) / "tmp", tmp_paths, TMP_DIRS, "tmpmover", stop, q, seed)


def tmp_view(root: Path, made: dict) -> list:
    """The tmpers' linked objects against a view of tmp/ (directories back at T{i})."""
    problems = []
    top = root / "tmp"
    seen = {}
    for i in range(TMP_DIRS):
        for nm in os.listdir(top / f"T{i}"):
            if nm.startswith(("n", "r")):
                seen[(i, nm)] = top / f"T{i}" / nm
    want = {(i, nm) for v in made.values() for i, nm in v[3]}
    for extra in sorted(set(seen) - want)[:10]:
        problems.append(f"tmp: T{extra[0]}/{extra[1]} not made (or unlinked) by any tmper")
    for ident, (data, mode, ino, names) in sorted(made.items()):
        for i, nm in names:
            p = seen.get((i, nm))
            if p is None:
                problems.append(f"tmp: T{i}/{nm} missing")
                continue
            st = os.lstat(p)
            have = (stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink, st.st_ino)
            if have != (mode, len(data), len(names), ino):
                problems.append(f"tmp: T{i}/{nm} (mode, size, nlink, ino) {have} != "
                                f"{(mode, len(data), len(names), ino)}")
            elif p.read_bytes() != data:
                problems.append(f"tmp: T{i}/{nm}: other data")
    return problems


# --- seekdir/telldir/rewinddir on big/ (SEEKERS=N) ------------------------------------------

def check_listing(names: list, how: str, stable: set, universe: set) -> None:
    """A listing of big/: no name twice, none that cannot exist, every stable name there."""
    if len(set(names)) != len(names):
        twice = sorted({x for x in names if names.count(x) > 1})[:10]
        raise Failure(f"{how}: names listed twice: {twice}")
    bad = [x for x in names if x not in universe]
    if bad:
        raise Failure(f"{how}: names that cannot exist listed: {sorted(bad)[:10]}")
    missing = stable - set(names)
    if missing:
        raise Failure(f"{how}: {len(missing)} stable names missing, e.g. {sorted(missing)[:10]}")


def big_seeker(root: str, n: int, stop, q, idx: int, seed: int, names_of):
    rng = random.Random(seed)
    stable, universe = names_of(n)
    top = Path(root) / "big"
    done = 0

    def check(names, how):
        check_listing(names, how, stable, universe)
    try:
        while not stop.is_set():
            fds = {}  # fd -> (entries [(name, cookie)], history)
            for _ in range(rng.randint(1, 5)):
                try:
                    fds[os.open(top, os.O_RDONLY | os.O_DIRECTORY)] = ([], [])
                except OSError as e:
                    if not budget_spent(e):
                        raise
            while fds:
                fd = rng.choice(sorted(fds))
                got, hist = fds[fd]
                # at most 4 seeks or rewinds a listing, so that each one comes to its end
                moves = sum(1 for a, _ in hist if a in ("seek", "rewind"))
                act = rng.choice(["read", "read", "read", "read", "seek", "tell", "rewind"]
                                 if moves < 4 else ["read", "tell"])
                hist.append((act, len(got)))
                if act == "read":
                    ents = getdents(fd, rng.choice([100, 1024, 4096, 32768, 32768, 32768]))
                    if not ents and moves < 4 and got and rng.random() < 0.3:
                        # seekdir back after the end: that listing's snapshot is dropped, the
                        # rest comes from a fresh reading after the cookie's key
                        p = rng.randrange(len(got) + 1)
                        os.lseek(fd, got[p - 1][1] if p else 0, os.SEEK_SET)
                        del got[p:]
                        hist.append(("seek", p))
                        continue
                    if not ents:
                        os.close(fd)
                        del fds[fd]
                        names = [x for x, _ in got if x not in (".", "..")]
                        check(names, f"seeker{idx} ({len(names)} entries, history {hist[-30:]})")
                        done += 1
                        continue
                    got += ents
                elif act == "tell":
                    pos = os.lseek(fd, 0, os.SEEK_CUR)
                    want = got[-1][1] if got else 0
                    if pos != want:
                        raise Failure(f"seeker{idx}: telldir {pos} != last entry's cookie {want} "
                                      f"(history {hist[-30:]})")
                elif act == "seek" and got:  # seekdir to a cookie read before
                    p = rng.randrange(len(got) + 1)
                    os.lseek(fd, got[p - 1][1] if p else 0, os.SEEK_SET)
                    del got[p:]
                else:
                    os.lseek(fd, 0, os.SEEK_SET)
                    got.clear()
        q.put((f"seeker{idx}", "ok", done))
    except BaseException as e:  # noqa
        q.put((f"seeker{idx}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


# --- directories held open while removed (HELDDIRS=1) ---------------------------------------

HELD = 12


def build_held(lower: Path, upper: Path) -> None:
    (lower / "held").mkdir()
    (upper / "held").mkdir()
    for i in range(HELD):
        layer = lower if i % 3 else upper
        d = layer / "held" / f"h{i}"
        d.mkdir()
        for j in range(i % 4):
            (d / f"f{j}").write_bytes(b"x" * j)
    (lower / "held" / "h1" / "sub").mkdir()


def dir_remover(root: str, stop, q, seed: int):
    """Empties and removes held/h{i} (files first, one level of subdirectories), makes them
    again with a file or two, renames them to h{i}m and back."""
    rng = random.Random(seed)
    top = Path(root) / "held"
    n = 0
    try:
        while not stop.is_set():
            d = top / f"h{rng.randrange(HELD)}"
            op = rng.choice(["remove", "remove", "make", "rename"])
            try:
                if op == "remove":
                    for nm in os.listdir(d):
                        p = d / nm
                        if p.is_dir() and not p.is_symlink():
                            for x in os.listdir(p):
                                os.unlink(p / x)
                            os.rmdir(p)
                        else:
                            os.unlink(p)
                    os.rmdir(d)
                elif op == "make":
                    os.mkdir(d)
                    for j in range(rng.randrange(3)):
                        (d / f"g{j}").write_bytes(b"g")
                else:
                    os.rename(d, str(d) + "m")
                    os.rename(str(d) + "m", d)
                n += 1
            except (FileNotFoundError, FileExistsError):
                pass
            except OSError as e:
                if e.errno != errno.ENOTEMPTY and not budget_spent(e):  # the holder made a file in it meanwhile
                    raise
        q.put(("dirremover", "ok", n))
    except BaseException as e:  # noqa
        q.put(("dirremover", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _dead(fd: int) -> bool:
    """Whether held directory ``fd`` was removed: the kernel marks a removed directory dead
    and answers its listings ENOENT itself (its st_nlink need not be 0 on an overlay: a lower
    directory's is the lower's)."""
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        getdents(fd, 100)
        return False
    except FileNotFoundError:
        return True
    finally:
        os.lseek(fd, pos, os.SEEK_SET)


def dir_holder(root: str, stop, q, seed: int):
    """Opens held/h{i}, keeps up to 20 open, reads them partly and wholly, fstats, fchmods,
    sets an xattr and makes files in them through the fd, whether or not removed meanwhile:
    nothing but ENOENT (removed) may fail, a listing has no name twice and no internal name,
    and one removed before must refuse a creation."""
    rng = random.Random(seed)
    top = Path(root) / "held"
    held = []
    n = removed_seen = 0
    try:
        while not stop.is_set():
            if len(held) < 20 and rng.random() < 0.4:
                fd = open_unless_skipped(top / f"h{rng.randrange(HELD)}", os.O_RDONLY | os.O_DIRECTORY)
                if fd is None:
                    continue
                try:
                    getdents(fd, rng.choice([100, 4096]))  # a listing left half read
                except FileNotFoundError:
                    pass  # removed already
                held.append(fd)
                continue
            if not held:
                continue
            fd = rng.choice(held)
            op = rng.choice(["list", "list", "fchmod", "fstat", "fsetxattr", "create", "close"])
            gone = _dead(fd)
            try:
                if op == "list":
                    pos = os.lseek(fd, 0, os.SEEK_CUR) if rng.random() < 0.5 else 0
                    os.lseek(fd, pos, os.SEEK_SET)
                    names = []
                    while True:
                        ents = getdents(fd, 4096)
                        if not ents:
                            break
                        names += [x for x, _ in ents if x not in (".", "..")]
                    if len(set(names)) != len(names):
                        raise Failure(f"held dir listing has names twice: {names}")
                    bad = [x for x in names if x.startswith((".wh.", "#ovlpc"))]
                    if bad:
                        raise Failure(f"held dir listing shows internal names {bad}")
                elif op == "fchmod":
                    m = rng.choice([0o755, 0o700, 0o775])
                    os.fchmod(fd, m)
                    if stat.S_IMODE(os.fstat(fd).st_mode) != m:
                        raise Failure(f"held dir (removed: {gone}): fchmod {m:o} then fstat "
                                      f"{stat.S_IMODE(os.fstat(fd).st_mode):o}")
                elif op == "fstat":
                    st = os.fstat(fd)
                    if not stat.S_ISDIR(st.st_mode):
                        raise Failure(f"held dir (removed: {gone}): fstat mode {st.st_mode:o}")
                elif op == "fsetxattr":
                    v = os.urandom(8)
                    os.setxattr(fd, "user.held", v)
                    if os.getxattr(fd, "user.held") != v:
                        raise Failure(f"held dir (removed: {gone}): xattr not read back")
                elif op == "create":
                    nm = f"c{rng.randrange(3)}"
                    try:
                        f = os.open(nm, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
                    except FileNotFoundError:
                        pass  # removed meanwhile (checked below if it was before)
                    else:
                        os.close(f)
                        if gone:
                            raise Failure(f"created {nm} in a removed dir")
                else:
                    os.close(fd)
                    held.remove(fd)
                if gone:
                    removed_seen += 1
                n += 1
            except OSError as e:
                # removed before or meanwhile: a dead directory lists and creates ENOENT
                if e.errno in (errno.ENOENT, errno.ESTALE) and (gone or _dead(fd)):
                    continue
                if budget_spent(e):
                    continue
                raise Failure(f"held dir {op} (removed: {gone}): {e!r}") from e
        for fd in held:
            os.close(fd)
        q.put(("dirholder", "ok", n * 1000 + removed_seen))
    except BaseException as e:  # noqa
        q.put(("dirholder", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
