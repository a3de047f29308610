"""Manual tool (not collected by pytest): concurrency stress through a real overlaypc mount.

Written in hunt5; found the metacopy link mtime and the LOOKUP-during-directory-rename
defects (see test_metacopy, test_moved_paths). Run as root from the checkout:
  python tests/stress_mount.py /tmp/scratch/run1 "cache=shared,metacopy=on,index=on" 21 600 4
Usage: stress_mount.py BASE OPTIONS SEED [OPS_PER_WORKER] [WORKERS] (BASE is deleted first).
Environment: ONLY=k,.. (those writers), NOAUX=1 (no lister/reader), NODIRRENAME=1
(redirect_dir=off), oplogs of failing writers go to BASE/../oplog-K.txt.
PAIRS=N (hunt7) adds N pair trees p{j}: a mover renames their directories (and moves two
into the others) while a filer writes through long-lived fds, links across the moving
directories, renames files over open files and unlinks, and a watcher lists them (ls -l);
with index=on the lowers hold hard links across two directories. Their model is checked
on overlaypc's view, the kernel's read-only view and (index=on) the kernel mounted with the
same upper, work and index; oplogs of failing filers go to BASE/../oplog-pJ.txt. Found the
GETATTR-after-rename-over and index=on open-file link-count defects (test_getattr_renamed_name,
test_index_open_names).
BIGDIR=N (soak11) adds a directory big/ of N lower names (some whited out) and N/10 upper
ones, changed by a mutator while two listers list it, several listings open at once read in
interleaved steps (``big_lister``: no name twice, every untouched name there).
uidmapping=0:H:N,gidmapping=0:H:N (soak13) in OPTIONS: the model's owners are shown + H,
the kernel's views (the layers' IDs) are compared shifted. DAEMON_NOFILE=N (soak13) starts
the daemon under ``ulimit -n N``. LOWER3=1 (soak19): a third lower (names w{k}L4, w{k}L5).
At the end (soak19) every listed d_ino must be the st_ino lstat gives (overlaypc, kernel ro).
TMPFILE=N, SEEKERS=N (with BIGDIR), HELDDIRS=1 (soak15): O_TMPFILE + linkat and reopens through
/proc/self/fd, seekdir/telldir listers, directories held open while removed (``stress_extra``).
RACE=N (soak13): N creators (odd ones as another uid) make objects in directories that
another process renames and moves, while a third renames the new names (``race_creator``).
LOWERCHG=N (race40): N changers change lower files never copied up by path (chmod, chown,
utime, truncate, setxattr, O_TRUNC opens: the copy-up hand-over), fds opened on them before,
while their directories move, their names are renamed and moved, holders keep them open
(``stress_lowerchg``; LOWERCHG_FILES=M files per changer, 120). WORKERS may be 0 with it.
Each writer process owns its files (single writer per file) and keeps a model; it checks
every read/stat against the model.  Listing and reader processes run concurrently.
At the end: model vs merged view, stat vs fstat, kernel overlay (ro) on the same layers.
"""
import dataclasses
import errno
import multiprocessing as mp
import os
import random
import shutil
import stat
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers  # noqa: E402
import stress_extra  # noqa: E402
import stress_lowerchg  # noqa: E402

MODES = [0o644, 0o600, 0o755, 0o640]
UIDS = [0, 1000, 1001]
#: uidmapping=C:H:N (soak13): shown IDs are the layers' + IDSHIFT (H - C, one range, the
#: same for gids); the tool's IDs are the layers' (set in main, before the workers fork)
IDSHIFT = 0
#: the shown owner of an object a root caller creates: root has no stored form under a
#: mapping, so the layers get the overflow ID (``ownership.new_owner``)
NEWUID = 0


budget_spent = stress_extra.budget_spent  # (DAEMON_NOFILE: a spent daemon fd budget's ENFILE)
open_unless_skipped = stress_extra.open_unless_skipped
#: LOWER3=1 (soak19): a third lower layer below the two
LOWER3 = bool(os.environ.get("LOWER3"))


def id_shift(options: str) -> tuple[int, int]:
    """(IDSHIFT, NEWUID) for the mount options (uidmapping/gidmapping of one range each)."""
    maps = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in options.split(",")
            if o.startswith(("uidmapping=", "gidmapping="))}
    if not maps:
        return 0, 0
    shifts = set()
    for v in maps.values():
        c, h, _n = map(int, v.lstrip(":").split(":"))
        shifts.add(h - c)
    if len(maps) != 2 or len(shifts) != 1:
        raise SystemExit("stress_mount: uidmapping and gidmapping of one range, the same shift")
    shift = shifts.pop()
    return shift, shift + 65534


class Inode:
    def __init__(self, data=b"", mode=0o644, uid=0, gid=0):
        self.data = bytearray(data)
        self.mode = mode
        self.uid = uid + IDSHIFT
        self.gid = gid + IDSHIFT
        self.mtime = None  # known mtime_ns after utime, else None
        self.names = set()


def build(base: Path, workers: int, rng: random.Random):
    lower = base / "lower"
    lower2 = base / "lower2"
    upper = base / "upper"
    work = base / "work"
    for d in (lower, lower2, upper, work) + ((base / "lower3",) if LOWER3 else ()):
        d.mkdir(parents=True)
    (lower / "s").mkdir()
    (upper / "s").mkdir()
    (lower2 / "s").mkdir()
    models = []

    def put(files: dict, layer: Path, name: str) -> None:
        """A file of random size and mode at ``name`` in ``layer`` (its directories made),
        and its model in ``files``."""
        data = os.urandom(rng.choice([0, 10, 4096, 70000]))
        mode = rng.choice(MODES)
        p = layer / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
        ino = Inode(data, mode)
        ino.names.add(name)
        files[name] = ino

    for k in range(workers):
        files = {}
        (lower / f"d{k}").mkdir()
        (lower / f"d{k}" / "sub").mkdir()
        for i in range(4):
            for layer, where in ((lower, "L"), (upper, "U"), (lower2, "M")):
                for d in ("", "s/", f"d{k}/", f"d{k}/sub/"):
                    if d.startswith("d") and layer is not lower:
                        continue
                    if rng.random() < 0.5:
                        continue
                    put(files, layer, f"{d}w{k}{where}{i}")
        if LOWER3:  # a third lower below the others: names L4, L5, merged s/ and d{k}/
            bottom = base / "lower3"
            for i in (4, 5):
                for d in ("", "s/", f"d{k}/", f"d{k}/sub/"):
                    if rng.random() < 0.5:
                        continue
                    put(files, bottom, f"{d}w{k}L{i}")
        models.append(files)
    return lower, lower2, upper, work, models


def lowers(base: Path) -> list[Path]:
    """The lower layers, top first (``LOWER3=1``: three)."""
    return [base / "lower2", base / "lower"] + ([base / "lower3"] if LOWER3 else [])


def listed_inos(root: Path) -> list[str]:
    """Every listed d_ino against the st_ino lstat gives afterwards (soak19): what differs.
    A name gone between the listing and the lstat is left out."""
    bad = []
    for dirpath, dirnames, _ in os.walk(root):
        with os.scandir(dirpath) as it:
            listed = [(e.path, e.inode()) for e in it]
        for path, d_ino in listed:
            try:
                st_ino = os.lstat(path).st_ino
            except FileNotFoundError:
                continue
            if st_ino != d_ino:
                bad.append(f"{os.path.relpath(path, root)}: listed d_ino {d_ino}, st_ino {st_ino}")
    return bad


class Failure(Exception):
    pass


class Skipped(Exception):
    """An open a writer skips: the daemon's fd budget is spent (DAEMON_NOFILE), so its
    OPEN or CREATE failed with ENFILE before it did anything (the model stays)."""


def open_or_skip(path, flags: int, mode: int = 0o777) -> int:
    """``os.open``; ``Skipped`` where the daemon's fd budget is spent (``budget_spent``):
    the pair filers and tmpers hold an fd on every object they made until their end, and
    at 1500 ops that is past a 256-fd daemon's budget for open files (soak26 seed 9415)."""
    try:
        return os.open(path, flags, mode)
    except OSError as e:
        if budget_spent(e):
            raise Skipped from e
        raise


def open_when_room(path, flags: int) -> int:
    """``os.open`` for the final checks, waiting while the daemon's fd budget is spent
    (``budget_spent``: the pair filers still hold theirs until they end)."""
    deadline = time.monotonic() + 300
    while True:
        try:
            return os.open(path, flags)
        except OSError as e:
            if not budget_spent(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def read_all(fd: int) -> bytes:
    """The whole content of ``fd`` from offset 0 (and close it)."""
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def writer(k, root: str, files: dict, seed: int, nops: int, q):
    rng = random.Random(seed)
    root = Path(root)
    dirname = f"d{k}"  # current name of own dir
    fds = []  # (fd, inode)
    names = [f"{d}w{k}{t}{i}" for t in "LUMN" for i in range(6)
             for d in ("", "s/", "@/", "@/sub/")]
    log = []

    def path(name):
        return root / name.replace("@", dirname)

    def mname(name):  # model key uses d{k}
        return name.replace("@", f"d{k}")

    def check_content(got, ino, what):
        if bytes(got) != bytes(ino.data):
            raise Failure(f"{what}: content len {len(got)} != model len {len(ino.data)}; "
                          f"first diff at {next((i for i, (a, b) in enumerate(zip(got, ino.data)) if a != b), min(len(got), len(ino.data)))}")

    def check_stat(st, ino, what):
        want = (stat.S_IMODE(ino.mode), ino.uid, ino.gid, len(ino.data), len(ino.names))
        have = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink)
        if what.startswith("fstat") and not ino.names:
            want = want[:4] + (0,)
        if want != have:
            raise Failure(f"{what}: stat {have} != model {want}")
        if ino.mtime is not None and st.st_mtime_ns != ino.mtime:
            raise Failure(f"{what}: mtime {st.st_mtime_ns} != {ino.mtime}")

    def writer_op(op, name, key, ino):
        """One step of the loop below (``Skipped``: an open the daemon's spent fd budget
        refused, nothing done)."""
        nonlocal dirname
        if op == "fdop":
            if not fds:
                return
            fd, fino = rng.choice(fds)
            sub = rng.choice(["pwrite", "read", "fstat", "ftruncate", "fchmod", "fchown",
                              "futime", "fsync"])
            log[-1] = ("fd" + sub, sorted(fino.names))
            if sub == "pwrite":
                off = rng.randint(0, len(fino.data) + 100)
                data = os.urandom(rng.choice([1, 100, 5000, 70000]))
                os.pwrite(fd, data, off)
                if off > len(fino.data):
                    fino.data.extend(b"\0" * (off - len(fino.data)))
                fino.data[off:off + len(data)] = data
                fino.mtime = None
            elif sub == "read":
                got = os.pread(fd, len(fino.data) + 10, 0)
                check_content(got, fino, f"fd read of {sorted(fino.names)}")
            elif sub == "fstat":
                check_stat(os.fstat(fd), fino, f"fstat of {sorted(fino.names)}")
            elif sub == "ftruncate":
                n = rng.randint(0, len(fino.data) + 100)
                os.ftruncate(fd, n)
                fino.data = (fino.data + bytearray(max(0, n - len(fino.data))))[:n]
                fino.mtime = None
            elif sub == "fchmod":
                m = rng.choice(MODES)
                os.fchmod(fd, m)
                fino.mode = m
            elif sub == "fchown":
                u = rng.choice(UIDS) + IDSHIFT
                os.fchown(fd, u, u)
                fino.uid = fino.gid = u
            elif sub == "futime":
                t = rng.randint(10**18, 2 * 10**18)
                os.utime(fd, ns=(t, t))
                fino.mtime = t
            else:
                os.fsync(fd)
            return
        if op == "close":
            if fds:
                fd, _ = fds.pop(rng.randrange(len(fds)))
                os.close(fd)
            return
        if op == "dirrename":
            if os.environ.get("NODIRRENAME"):
                return
            new = f"d{k}x" if dirname == f"d{k}" else f"d{k}"
            os.rename(root / dirname, root / new)
            dirname = new
            return
        if op == "create":
            if ino is not None:
                return
            m = rng.choice(MODES)
            fd = open_or_skip(path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, m)
            os.fchmod(fd, m)
            ino = Inode(b"", m)
            ino.uid = ino.gid = NEWUID
            ino.names.add(key)
            files[key] = ino
            if len(fds) < 6:
                fds.append((fd, ino))
            else:
                os.close(fd)
            return
        if ino is None:
            if op in ("link", "rename"):
                pass
            else:
                try:
                    os.lstat(path(name))
                except FileNotFoundError:
                    return
                raise Failure(f"{name} exists but model says no")
        if op == "open":
            if len(fds) >= 6:
                return
            fd = open_or_skip(path(name), os.O_RDWR)
            fds.append((fd, ino))
        elif op == "write":
            off = rng.randint(0, len(ino.data) + 100)
            data = os.urandom(rng.choice([1, 100, 5000, 70000]))
            fd = open_or_skip(path(name), os.O_WRONLY)
            try:
                os.pwrite(fd, data, off)
            finally:
                os.close(fd)
            if off > len(ino.data):
                ino.data.extend(b"\0" * (off - len(ino.data)))
            ino.data[off:off + len(data)] = data
            ino.mtime = None
        elif op == "append":
            data = os.urandom(rng.choice([1, 100, 5000]))
            # (the flags of open(..., "ab"))
            with open(open_or_skip(path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666),
                      "ab") as f:
                f.write(data)
            ino.data.extend(data)
            ino.mtime = None
        elif op == "truncate":
            n = rng.randint(0, len(ino.data) + 100)
            os.truncate(path(name), n)
            ino.data = (ino.data + bytearray(max(0, n - len(ino.data))))[:n]
            ino.mtime = None
        elif op == "chmod":
            m = rng.choice(MODES)
            os.chmod(path(name), m)
            ino.mode = m
        elif op == "chown":
            u = rng.choice(UIDS) + IDSHIFT
            os.chown(path(name), u, u)
            ino.uid = ino.gid = u
        elif op == "utime":
            t = rng.randint(10**18, 2 * 10**18)
            os.utime(path(name), ns=(t, t))
            ino.mtime = t
        elif op == "read":
            check_content(read_all(open_or_skip(path(name), os.O_RDONLY)), ino, f"read {name}")
        elif op == "stat":
            check_stat(os.lstat(path(name)), ino, f"stat {name}")
        elif op == "fsync":
            fd = open_or_skip(path(name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        elif op in ("rename", "link"):
            src = rng.choice([n for n in names if mname(n) in files] or [None])
            if src is None or mname(src) == key:
                return
            sino = files[mname(src)]
            log[-1] = (op, mname(src), key)
            if op == "link":
                if ino is not None:
                    return
                os.link(path(src), path(name))
                sino.names.add(key)
                files[key] = sino
            else:
                if ino is sino:
                    os.rename(path(src), path(name))  # same inode: no-op
                    return
                os.rename(path(src), path(name))
                if ino is not None:
                    ino.names.discard(key)
                sino.names.discard(mname(src))
                del files[mname(src)]
                sino.names.add(key)
                files[key] = sino
        elif op == "unlink":
            os.unlink(path(name))
            ino.names.discard(key)
            del files[key]

    try:
        for step in range(nops):
            name = rng.choice(names)
            key = mname(name)
            ino = files.get(key)
            op = rng.choice(["open", "write", "write", "append", "truncate", "chmod", "chown",
                             "utime", "rename", "unlink", "link", "read", "read", "stat",
                             "fsync", "create", "close", "dirrename", "fdop", "fdop", "fdop"])
            log.append((op, key))
            try:
                writer_op(op, name, key, ino)
            except Skipped:
                log.append(("ENFILE",))
        # final: everything by name and by fd
        for fd, fino in fds:
            check_content(os.pread(fd, len(fino.data) + 10, 0), fino, f"final fd read {sorted(fino.names)}")
            check_stat(os.fstat(fd), fino, f"fstat final {sorted(fino.names)}")
            os.close(fd)
        for key, ino in files.items():
            p = path(key.replace(f"d{k}/", "@/", 1) if key.startswith(f"d{k}/") else key)
            check_content(read_all(open_when_room(p, os.O_RDONLY)), ino, f"final read {key}")
            check_stat(os.lstat(p), ino, f"final stat {key}")
            fd = open_when_room(p, os.O_RDONLY)
            check_stat(os.fstat(fd), ino, f"fstat final open {key}")
            os.close(fd)
        # report the final model (in d{k} naming: rename dir back)
        if dirname != f"d{k}":
            os.rename(root / dirname, root / f"d{k}")
        out = {key: (bytes(i.data), i.mode, i.uid, i.mtime, len(i.names)) for key, i in files.items()}
        q.put((k, "ok", out))
    except BaseException as e:  # noqa
        q.put((k, "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}\nlast ops: {log[-12:]}"))
        with open(Path(root).parent.parent / f"oplog-{k}.txt", "w") as f:
            f.write("\n".join(map(repr, log)))


def lister(root: str, stop, q, idx):
    n = 0
    try:
        while not stop.is_set():
            for dirpath, dirnames, filenames in os.walk(root):
                for e in list(dirnames) + filenames:
                    try:
                        os.lstat(os.path.join(dirpath, e))
                    except FileNotFoundError:
                        continue
                    if e.startswith(".wh.") or e.startswith("#"):
                        raise Failure(f"internal name listed {dirpath}/{e}")
                try:
                    with os.scandir(dirpath) as it:
                        for de in it:
                            try:
                                de.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                pass
                except FileNotFoundError:
                    pass
                n += 1
        q.put((f"lister{idx}", "ok", n))
    except BaseException as e:  # noqa
        q.put((f"lister{idx}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def reader(root: str, stop, q, seed):
    rng = random.Random(seed)
    n = 0
    try:
        while not stop.is_set():
            for dirpath, dirnames, filenames in os.walk(root):
                for f in filenames:
                    if rng.random() < 0.3:
                        # regular files only (RACE's FIFOs would block an open, its
                        # devices refuse one): O_NONBLOCK, and the fd's own type decides
                        try:
                            fd = os.open(os.path.join(dirpath, f),
                                         os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
                        except (FileNotFoundError, PermissionError):
                            continue
                        except OSError as e:
                            if e.errno != errno.ELOOP and not budget_spent(e):
                                raise  # (ELOOP: a symlink)
                            continue
                        try:
                            if stat.S_ISREG(os.fstat(fd).st_mode):
                                with open(fd, "rb", closefd=False) as fh:
                                    fh.read()
                        finally:
                            os.close(fd)
                        n += 1
        q.put(("reader", "ok", n))
    except BaseException as e:  # noqa
        q.put(("reader", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))



# --- pair groups (PAIRS=N): one process renames directories while another writes, links and
# renames files in them through long-lived fds; a watcher lists them (ls -l) meanwhile.
# Each file object carries a fixed identity: its first 8 bytes "ID%05d\n", uid = gid = 2000+ID
# and mode PAIR_MODES[ID % 4], none ever changed; so any stat or read can say which object it saw.
PAIR_MODES = [0o640, 0o755, 0o600, 0o644]
PAIR_HDR = 8
TOP_DIRS = ("A", "C")      # renamed X <-> X2 at the top of p{j}
SUB_DIRS = ("E", "G")      # renamed X <-> X2 and moved between the top and into A/A2/C/C2


def pair_header(ident: int) -> bytes:
    return b"ID%05d\n" % ident


def pair_dir_paths(did: str) -> list:
    names = [did, did + "2"]
    if did in TOP_DIRS:
        return names
    parents = [""] + [t + "/" for d in TOP_DIRS for t in (d, d + "2")]
    return [par + n for par in parents for n in names]


def build_pairs(base: Path, lower: Path, upper: Path, npairs: int, rng: random.Random, links: bool):
    """Pair trees p{j}: A, C, E in the lower (E moves: needs redirect_dir), G upper-only.
    Returns per pair {ident: (data, names)} with names as (dir id, file name)."""
    models = []
    ident = 0
    for j in range(npairs):
        objs = {}
        for did, layer in (("A", lower), ("C", lower), ("E", lower), ("G", upper)):
            (layer / f"p{j}" / did).mkdir(parents=True)
        (upper / f"p{j}" / "A").mkdir(parents=True, exist_ok=True)  # A merged
        for did, layer in (("A", lower), ("A", upper), ("C", lower), ("E", lower), ("G", upper)):
            for i in range(3):
                data = pair_header(ident) + os.urandom(rng.choice([0, 10, 4096, 70000]))
                name = f"f{ident}"
                pth = layer / f"p{j}" / did / name
                pth.write_bytes(data)
                os.chown(pth, 2000 + ident, 2000 + ident)
                os.chmod(pth, PAIR_MODES[ident % 4])
                objs[ident] = (bytearray(data), {(did, name)})
                ident += 1
        if links:  # lower hard links across two directories (index=on unites them)
            for ident_ in [i for i, (_, n) in objs.items() if next(iter(n))[0] in ("A", "C")
                           and (lower / f"p{j}" / next(iter(n))[0] / next(iter(n))[1]).exists()][:4]:
                did, name = next(iter(objs[ident_][1]))
                other = "C" if did == "A" else "A"
                os.link(lower / f"p{j}" / did / name, lower / f"p{j}" / other / f"l{name}")
                objs[ident_][1].add((other, f"l{name}"))
        models.append(objs)
    return models, ident


def pair_mover(j: int, root: str, stop, q, seed: int):
    """Renames p{j}'s directories until stopped, then puts them back (A, C, E, G at the top)."""
    rng = random.Random(seed)
    top = Path(root) / f"p{j}"
    where = {d: d for d in TOP_DIRS + SUB_DIRS}  # dir id -> path below p{j}
    stuck = set()  # dirs whose rename said EXDEV (redirect_dir=off)
    n = 0
    try:
        def move(did, new):
            os.rename(top / where[did], top / new)
            where[did] = new
            if did in TOP_DIRS:  # sub dirs inside it moved along
                for s_ in SUB_DIRS:
                    head, _, tail = where[s_].partition("/")
                    if tail and head.rstrip("2") == did:
                        where[s_] = new + "/" + tail
        while not stop.is_set():
            did = rng.choice([d for d in TOP_DIRS + SUB_DIRS if d not in stuck] or [None])
            if did is None:
                break
            cur = where[did]
            if did in TOP_DIRS:
                new = did if cur.endswith("2") else did + "2"
            else:
                new = rng.choice([p_ for p_ in pair_dir_paths(did) if p_ != cur
                                  and (p_.count("/") == 0 or p_.split("/")[0] in
                                       (where["A"], where["C"]))])
            try:
                move(did, new)
                n += 1
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                stuck.add(did)
        for did in SUB_DIRS:
            if where[did] != did:
                move(did, did)
        for did in TOP_DIRS:
            if where[did] != did:
                move(did, did)
        q.put((f"mover{j}", "ok", n))
    except BaseException as e:  # noqa
        q.put((f"mover{j}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}\nwhere {where}"))


def pair_watcher(j: int, root: str, stop, q):
    """ls -l of p{j} while it churns: an inode number always names the same object, and an
    object read through a fd has that object's owner and mode."""
    top = Path(root) / f"p{j}"
    seen = {}  # st_ino -> uid
    n = 0
    try:
        while not stop.is_set():
            for dirpath, _dirs, files in os.walk(top):
                for f in files:
                    pth = os.path.join(dirpath, f)
                    try:
                        st = os.lstat(pth)
                    except FileNotFoundError:
                        continue
                    if st.st_uid < 2000 + IDSHIFT or st.st_uid == NEWUID:
                        if f.startswith("n") and st.st_uid == NEWUID:
                            continue  # being created (pair_filer sets the owner last)
                        raise Failure(f"lstat {pth}: uid {st.st_uid}")
                    if seen.setdefault(st.st_ino, st.st_uid) != st.st_uid:
                        raise Failure(f"lstat {pth}: ino {st.st_ino} uid {st.st_uid}, "
                                      f"before uid {seen[st.st_ino]}")
                    if stat.S_IMODE(st.st_mode) != PAIR_MODES[(st.st_uid - 2000 - IDSHIFT) % 4]:
                        raise Failure(f"lstat {pth}: mode {oct(st.st_mode)} uid {st.st_uid}")
                    fd = open_unless_skipped(pth, os.O_RDONLY)
                    if fd is None:
                        continue
                    try:
                        hdr = os.pread(fd, PAIR_HDR, 0)
                        fst = os.fstat(fd)
                    finally:
                        os.close(fd)
                    if fst.st_uid == NEWUID and f.startswith("n"):
                        continue
                    if hdr != pair_header(fst.st_uid - 2000 - IDSHIFT):
                        raise Failure(f"open {pth}: header {hdr!r} but uid {fst.st_uid}")
                    if seen.setdefault(fst.st_ino, fst.st_uid) != fst.st_uid:
                        raise Failure(f"fstat {pth}: ino {fst.st_ino} uid {fst.st_uid}, "
                                      f"before uid {seen[fst.st_ino]}")
                    n += 1
        q.put((f"watcher{j}", "ok", n))
    except BaseException as e:  # noqa
        q.put((f"watcher{j}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def pair_filer(j: int, root: str, objs: dict, next_id: int, seed: int, nops: int, q, done):
    """Writes through long-lived fds, stats, reads, renames, links and unlinks files of p{j}
    while the mover renames their directories; every fd stays open until the end, so no
    inode is freed (the watcher's inode numbers stay unique)."""
    rng = random.Random(seed)
    top = Path(root) / f"p{j}"
    objs = {i: [bytearray(d), set(n)] for i, (d, n) in objs.items()}
    fds = []  # (fd, ident)
    log = []
    dids = TOP_DIRS + SUB_DIRS

    def names_of(i):
        return objs[i][1]

    def at(did, fname, fn, tries=400):
        """fn(path) at the first candidate path of dir `did` that exists (the mover renames).
        Under DAEMON_NOFILE an ENFILE counts as not done (the final views check that)."""
        for _ in range(tries):
            for cand in pair_dir_paths(did):
                try:
                    return True, fn(top / cand / fname)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if budget_spent(e):
                        log.append(("ENFILE",))
                        return False, None
                    raise
        return False, None

    def at2(a, b, fn, tries=60):
        for _ in range(tries):
            for ca in pair_dir_paths(a[0]):
                for cb in pair_dir_paths(b[0]):
                    try:
                        return True, fn(top / ca / a[1], top / cb / b[1])
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        if budget_spent(e):
                            log.append(("ENFILE",))
                            return False, None
                        raise
        return False, None

    def check(st, i, what, byfd=False):
        data, names = objs[i]
        want = (PAIR_MODES[i % 4], 2000 + IDSHIFT + i, len(data), len(names) if names or not byfd else 0)
        have = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_size, st.st_nlink)
        if want != have:
            raise Failure(f"{what} of ID {i} {sorted(names)}: (mode, uid, size, nlink) {have} != {want}")

    def check_data(got, i, what):
        if bytes(got) != bytes(objs[i][0]):
            raise Failure(f"{what} of ID {i} {sorted(names_of(i))}: {len(got)} bytes "
                          f"(header {bytes(got[:PAIR_HDR])!r}) != model {len(objs[i][0])}")

    def owner(loc):
        return next((i for i, (_, n) in objs.items() if loc in n), None)

    try:
        for i in list(objs):  # a long-lived fd on every object
            ok, fd = at(*next(iter(names_of(i))), lambda p_: os.open(p_, os.O_RDWR))
            if not ok:
                if log and log[-1] == ("ENFILE",):
                    # (soak30: under a small DAEMON_NOFILE, 128, the long-lived fds of every
                    # pair, writer and creator spend the daemon's budget: that object has none)
                    continue
                raise Failure(f"open of ID {i}: no path found")
            fds.append((fd, i))
        for step in range(nops):
            op = rng.choice(["pwrite", "pwrite", "fstat", "fread", "stat", "read", "rename",
                             "rename", "link", "unlink", "create", "truncate"])
            live = [i for i in objs if names_of(i)]
            if op in ("pwrite", "fstat", "fread"):
                if not fds:  # (every first open found the daemon's fd budget spent)
                    continue
                fd, i = rng.choice(fds)
                log.append((op, i, sorted(names_of(i))))
                if op == "pwrite":
                    off = rng.randint(PAIR_HDR, len(objs[i][0]) + 100)
                    data = os.urandom(rng.choice([1, 100, 5000, 70000]))
                    os.pwrite(fd, data, off)
                    d = objs[i][0]
                    if off > len(d):
                        d.extend(b"\0" * (off - len(d)))
                    d[off:off + len(data)] = data
                elif op == "fstat":
                    check(os.fstat(fd), i, "fstat", byfd=True)
                else:
                    check_data(os.pread(fd, len(objs[i][0]) + 10, 0), i, "fd read")
                continue
            if op == "create":
                did = rng.choice(dids)
                i = next_id
                loc = (did, f"n{i}")
                log.append((op, i, loc))

                def mk(p_, i=i):
                    # the owner last: the watcher skips a file owned by root (not made yet)
                    fd_ = os.open(p_, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                    os.fchmod(fd_, PAIR_MODES[i % 4])
                    os.pwrite(fd_, pair_header(i), 0)
                    os.fchown(fd_, 2000 + IDSHIFT + i, 2000 + IDSHIFT + i)
                    return fd_
                ok, fd = at(did, loc[1], mk)
                if ok:
                    next_id += 1
                    objs[i] = [bytearray(pair_header(i)), {loc}]
                    fds.append((fd, i))
                continue
            if not live:
                continue
            i = rng.choice(live)
            loc = rng.choice(sorted(names_of(i)))
            log.append((op, i, loc))
            if op == "stat":
                ok, st = at(*loc, os.lstat)
                if ok:
                    check(st, i, f"lstat {loc}")
            elif op == "read":
                ok, got = at(*loc, lambda p_: p_.read_bytes())
                if ok:
                    check_data(got, i, f"read {loc}")
            elif op == "truncate":
                n = rng.randint(PAIR_HDR, len(objs[i][0]) + 100)
                ok, _ = at(*loc, lambda p_: os.truncate(p_, n))
                if ok:
                    d = objs[i][0]
                    objs[i][0] = (d + bytearray(max(0, n - len(d))))[:n]
            elif op == "unlink":
                if len(names_of(i)) < 2 and rng.random() < 0.7:
                    continue
                ok, _ = at(*loc, os.unlink)
                if ok:
                    names_of(i).discard(loc)
            elif op in ("rename", "link"):
                # to a name in another (or the same) dir: a new name, or another object's name
                did = rng.choice(dids)
                tgt_obj = rng.choice(live) if rng.random() < 0.4 else None
                dst = (rng.choice(sorted(names_of(tgt_obj))) if tgt_obj is not None
                       else (did, f"{'r' if op == 'rename' else 'h'}{i}_{step}"))
                if op == "link" and owner(dst) is not None:
                    continue
                log[-1] = (op, i, loc, dst)
                try:
                    ok, _ = at2(loc, dst, os.rename if op == "rename" else os.link)
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    log[-1] += ("EXDEV",)
                    continue
                if ok:
                    prev = owner(dst)
                    if op == "rename" and prev == i:
                        continue  # a link of the same object: no-op
                    if prev is not None:
                        names_of(prev).discard(dst)
                    if op == "rename":
                        names_of(i).discard(loc)
                    names_of(i).add(dst)
        done.set()  # stop the mover: final checks at the canonical names
        for fd, i in fds:
            check_data(os.pread(fd, len(objs[i][0]) + 10, 0), i, "final fd read")
            check(os.fstat(fd), i, "final fstat", byfd=True)
        out = {i: (bytes(d), sorted(n)) for i, (d, n) in objs.items()}
        q.put((f"filer{j}", "ok", out))
    except BaseException as e:  # noqa
        done.set()
        q.put((f"filer{j}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}\nlast ops: {log[-12:]}"))
        with open(Path(root).parent.parent / f"oplog-p{j}.txt", "w") as f:
            f.write("\n".join(map(repr, log)))


def pair_view(root: Path, j: int, out: dict, owners: bool = True, shift: int = 0) -> list:
    """The model of pair j against a view: content, owner, mode (unless not ``owners``),
    nlink and which names share one inode (by st_ino). ``shift``: shown owners are the
    layers' + shift (overlaypc's view under uidmapping; the kernel's views show the layers')."""
    problems = []
    for i, (data, names) in out.items():
        inos = set()
        for did, fname in names:
            p_ = root / f"p{j}" / did / fname
            try:
                st = os.lstat(p_)
                got = p_.read_bytes()
            except OSError as e:
                problems.append(f"{p_}: {e}")
                continue
            inos.add(st.st_ino)
            have = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_nlink, got == data)
            want = (PAIR_MODES[i % 4], 2000 + shift + i, len(names), True)
            if not owners:
                have, want = have[2:], want[2:]
            if have != want:
                problems.append(f"{p_} (ID {i}): (mode, uid, nlink, same data) {have} != {want}"
                                f" size {len(got)} vs {len(data)}")
        if len(inos) > 1:
            problems.append(f"ID {i} {names}: names on {len(inos)} inode numbers {sorted(inos)}")
    want_names = {f"{did}/{fname}" for _, names in out.values() for did, fname in names}
    for dirpath, _dirs, files in os.walk(root / f"p{j}"):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root / f"p{j}")
            if rel not in want_names:
                problems.append(f"p{j}/{rel} listed, not in the model")
    return problems


# --- a large directory (BIGDIR=N, soak11): listed while it changes. The lower holds b0..b{N-1},
# the upper (merged) u0..u{N/10-1} and whiteouts of every b{i} with i % 17 == 0. "Stable" names
# (b{i} with i < N/2 not whited out, even u{i}) are never touched; a mutator unlinks, creates
# and renames among the others and c0..c{N/10-1}; listers hold several listings open at once,
# read them in steps interleaved with each other, and check each whole one: no name twice,
# every stable name there, nothing outside the names that can exist, no internal name.

def big_names(n: int) -> tuple[set, set]:
    """(stable names, every name that can exist) of the large directory."""
    m = max(1, n // 10)
    stable = {f"b{i}" for i in range(n // 2) if i % 17} | {f"u{i}" for i in range(0, m, 2)}
    universe = ({f"b{i}" for i in range(n) if i % 17} | {f"u{i}" for i in range(m)}
                | {f"c{i}" for i in range(m)})
    return stable, universe


def build_big(lower: Path, upper: Path, n: int) -> None:
    (lower / "big").mkdir()
    (upper / "big").mkdir()
    for i in range(n):
        (lower / "big" / f"b{i}").write_bytes(b"")
        if i % 17 == 0:
            os.mknod(upper / "big" / f"b{i}", stat.S_IFCHR | 0o600, 0)
    for i in range(max(1, n // 10)):
        (upper / "big" / f"u{i}").write_bytes(b"u")


def big_mutator(root: str, n: int, stop, q, seed: int):
    rng = random.Random(seed)
    stable, universe = big_names(n)
    volatile = sorted(universe - stable)
    top = Path(root) / "big"
    done = 0
    try:
        while not stop.is_set():
            a, b = rng.choice(volatile), rng.choice(volatile)
            op = rng.choice(["unlink", "create", "rename", "rename"])
            try:
                if op == "unlink":
                    os.unlink(top / a)
                elif op == "create":
                    os.close(os.open(top / a, os.O_CREAT | os.O_WRONLY, 0o644))
                else:
                    os.rename(top / a, top / b)
                done += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                if not budget_spent(e):
                    raise
        q.put(("bigmutator", "ok", done))
    except BaseException as e:  # noqa
        q.put(("bigmutator", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def big_lister(root: str, n: int, stop, q, idx: int, seed: int):
    rng = random.Random(seed)
    stable, universe = big_names(n)
    top = Path(root) / "big"
    listed = 0

    def check(names, how):
        stress_extra.check_listing(names, how, stable, universe)
    try:
        while not stop.is_set():
            its = [(os.scandir(top), []) for _ in range(rng.randint(1, 6))]
            while its:  # interleaved, a random number of entries of one at a time
                j = rng.randrange(len(its))
                it, got = its[j]
                end = False
                for _ in range(rng.choice([1, 50, 500])):
                    de = next(it, None)
                    if de is None:
                        end = True
                        break
                    got.append(de.name)
                if end:
                    it.close()
                    its.pop(j)
                    check(got, f"lister{idx} scandir ({len(got)} entries)")
                    listed += 1
            check(os.listdir(top), f"lister{idx} listdir")
        q.put((f"biglister{idx}", "ok", listed))
    except BaseException as e:  # noqa
        q.put((f"biglister{idx}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))

# --- creations racing renames (RACE=N, soak13): N creators make objects (mkdir, mknod of a
# FIFO or (as root) of /dev/null's numbers, symlink, link of one of their files, O_CREAT|O_EXCL)
# named n{id} in race/D0..D3 (D0 merged, D1 D2 lower, D3 upper only) while race_mover renames
# those directories and moves them into race/P and back, and race_namer renames the new
# names (n{id} <-> n{id}r). Odd creators run as uid 1000+c (+IDSHIFT) through setresuid (the
# directories are 0777). Each creator checks its object right after making it (type, mode,
# owner, nlink: what the creation's reply entry gave the kernel) and records its inode
# number; at the end each object is at one of its names (no other), with the same inode
# number, type, mode, owner, target, link group, and no name made by a failed creation.

RACE_DIRS = 4


def race_paths(i: int) -> list:
    return [f"D{i}", f"D{i}x", f"P/D{i}", f"P/D{i}x"]


def build_race(lower: Path, upper: Path) -> None:
    for d in ("race", "race/P", "race/D0", "race/D1", "race/D2"):
        (lower / d).mkdir()
        os.chmod(lower / d, 0o777)
    (lower / "race" / "D2" / "l0").write_bytes(b"lower l0")
    for d in ("race", "race/D0", "race/D3"):
        (upper / d).mkdir()
        os.chmod(upper / d, 0o777)


def race_owner(c: int) -> int:
    """The uid creator c runs as (shown side)."""
    return 0 if c % 2 == 0 else 1000 + c + IDSHIFT


def race_creator(c: int, root: str, seed: int, nops: int, q):
    rng = random.Random(seed)
    top = Path(root) / "race"
    uid = race_owner(c)
    shown = NEWUID if uid == 0 else uid  # root has no stored form under a mapping
    objs = {}  # id -> [kind, dir index, mode, target, st_ino, link group (ids)]
    log = []
    try:
        if uid:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        os.umask(0)

        def where(i, ident):
            return [top / d / f"n{ident}{r}" for d in race_paths(i) for r in ("", "r")]

        def find(i, ident, fn, tries=200):
            """fn(path) at the object's current path (dir moved, name renamed)."""
            for _ in range(tries):
                for pth in where(i, ident):
                    try:
                        return fn(pth)
                    except FileNotFoundError:
                        continue
            return None

        def check(st, ident, what):
            kind, _i, mode, _t, ino, group = objs[ident]
            want = (kind, mode, shown, shown, len(group))
            have = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    st.st_nlink if kind == stat.S_IFREG else len(group))
            if want != have:
                raise Failure(f"{what} n{ident}: (type, mode, uid, gid, nlink) {have} != {want}")
            if ino is not None and st.st_ino != ino:
                raise Failure(f"{what} n{ident}: st_ino {st.st_ino} != {ino} seen before")

        for step in range(nops):
            kind = rng.choice(["mkdir", "mknod", "symlink", "link", "create", "create", "stat"])
            i = rng.randrange(RACE_DIRS)
            ident = c * 100000 + step
            mode = rng.choice([0o755, 0o700, 0o640, 0o604])
            log.append((kind, i, ident))
            if kind == "stat":
                if objs:
                    o = rng.choice(sorted(objs))
                    st = find(objs[o][1], o, os.lstat)
                    if st is None:
                        raise Failure(f"n{o} (D{objs[o][1]}) not found")
                    check(st, o, "lstat")
                continue
            srcs = [o for o, v in objs.items() if v[0] == stat.S_IFREG]
            if kind == "link" and not srcs:
                continue
            made, spent = None, False
            for _ in range(50):  # the directory moves: ENOENT until a path of it is hit
                for d in race_paths(i):
                    pth = top / d / f"n{ident}"
                    try:
                        if kind == "mkdir":
                            os.mkdir(pth, mode)
                            made = [stat.S_IFDIR, i, mode, None, None, (ident,)]
                        elif kind == "mknod":
                            dev = c % 2 == 0 and rng.random() < 0.5
                            os.mknod(pth, (stat.S_IFCHR if dev else stat.S_IFIFO) | mode,
                                     os.makedev(1, 3) if dev else 0)
                            made = [stat.S_IFCHR if dev else stat.S_IFIFO, i, mode, None, None, (ident,)]
                        elif kind == "symlink":
                            tgt = f"t{ident}/{'x' * rng.randrange(50)}"
                            os.symlink(tgt, pth)
                            made = [stat.S_IFLNK, i, 0o777, tgt, None, (ident,)]
                        elif kind == "create":
                            fd = os.open(pth, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
                            try:
                                os.pwrite(fd, b"n%d" % ident, 0)
                                made = [stat.S_IFREG, i, mode, b"n%d" % ident, None, (ident,)]
                                objs[ident] = made
                                st = os.fstat(fd)
                                check(st, ident, "fstat after create")
                                made[4] = st.st_ino
                            finally:
                                os.close(fd)
                        elif kind == "link":
                            src = rng.choice(srcs)
                            # the source's path, then the link in its own directory
                            sp = next((x for x in where(objs[src][1], src) if os.path.lexists(x)), None)
                            if sp is None:
                                continue
                            os.link(sp, pth)
                            group = objs[src][5] + (ident,)
                            made = list(objs[src])
                            made[1] = i
                            made[5] = group
                            for g in group[:-1]:
                                objs[g][5] = group
                        break
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        # DAEMON_NOFILE: not made (nothing else named n*: the final views)
                        if not budget_spent(e):
                            raise
                        spent = True
                        break
                if made is not None or spent:
                    break
            if made is None:
                log[-1] += ("ENFILE" if spent else "not made",)
                continue
            objs[ident] = made
            if kind != "create":  # right away: what the creation's reply left in the kernel
                st = find(i, ident, os.lstat)
                if st is not None:
                    check(st, ident, f"lstat after {kind}")
                    made[4] = st.st_ino
                    if kind == "link" and st.st_ino != objs[made[5][0]][4]:
                        raise Failure(f"link n{ident} of n{made[5][0]}: st_ino {st.st_ino} != "
                                      f"{objs[made[5][0]][4]}")
        q.put((f"creator{c}", "ok", {o: tuple(v) for o, v in objs.items()}))
    except BaseException as e:  # noqa
        q.put((f"creator{c}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}\nlast ops: {log[-12:]}"))
        try:  # (an odd creator's uid may not write there; the last ops went with the report)
            with open(Path(root).parent.parent / f"oplog-creator{c}.txt", "w") as f:
                f.write("\n".join(map(repr, log)))
        except OSError:
            pass


def race_mover(root: str, stop, q, seed: int):
    """Renames race/D{i} <-> D{i}x and moves them into race/P and back; puts them back at
    the end (EXDEV, redirect_dir=off: that directory stays)."""
    stress_extra.move_dirs(Path(root) / "race", race_paths, RACE_DIRS, "racemover", stop, q, seed)


def race_namer(root: str, stop, q):
    """Renames the new names in race/'s directories, n{id} <-> n{id}r, as it finds them."""
    top = Path(root) / "race"
    n = 0
    try:
        while not stop.is_set():
            for dirpath, _dirs, files in os.walk(top):
                if os.path.basename(dirpath).startswith("n"):
                    continue
                for nm in list(_dirs) + files:
                    if not nm.startswith("n"):
                        continue
                    new = nm[:-1] if nm.endswith("r") else nm + "r"
                    try:
                        os.rename(os.path.join(dirpath, nm), os.path.join(dirpath, new))
                        n += 1
                    except FileNotFoundError:
                        pass
                _dirs[:] = [x for x in _dirs if not x.startswith("n")]
        q.put(("racenamer", "ok", n))
    except BaseException as e:  # noqa
        q.put(("racenamer", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def race_view(root: Path, made: dict, shown_of: dict, owners: bool = True, shift: int = 0,
              inos: bool = False) -> list:
    """The creators' objects against a view: each at one name, same type, mode, owner (the
    view shows IDs - ``shift``), target or content, link group (st_ino, nlink); nothing else
    named n*. ``made``: id -> record; ``shown_of``: id -> the creator's shown uid; ``inos``:
    the st_ino seen when made must be the view's (overlaypc's own, same mount)."""
    problems = []
    found = {}
    top = root / "race"
    for i in range(RACE_DIRS):
        d = top / f"D{i}"
        for nm in os.listdir(d):
            if not nm.startswith("n"):
                if (i, nm) != (2, "l0"):  # (the lower's own)
                    problems.append(f"race/D{i}/{nm}: not made by a creator")
                continue
            ident = int(nm[1:].rstrip("r"))
            if ident in found:
                problems.append(f"n{ident} at two names: {found[ident]} and {d / nm}")
            found[ident] = d / nm
    for ident, (kind, i, mode, tgt, ino, group) in made.items():
        pth = found.pop(ident, None)
        if pth is None:
            problems.append(f"n{ident} (D{i}, type {oct(kind)}) missing")
            continue
        if pth.parent.name != f"D{i}":
            problems.append(f"n{ident} in {pth.parent.name}, made in D{i}")
        st = os.lstat(pth)
        uid = shown_of[ident] - shift
        have = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        want = (kind, mode, uid, uid)
        if not owners:
            have, want = have[:1], want[:1]
        if have != want:
            problems.append(f"{pth}: (type, mode, uid, gid) {have} != {want}")
        if kind == stat.S_IFLNK and os.readlink(pth) != tgt:
            problems.append(f"{pth}: target {os.readlink(pth)!r} != {tgt!r}")
        if kind == stat.S_IFREG:
            if pth.read_bytes() != tgt:
                problems.append(f"{pth}: content {pth.read_bytes()[:20]!r} != {tgt!r}")
            if st.st_nlink != len(group):
                problems.append(f"{pth}: nlink {st.st_nlink} != {len(group)} {group}")
            others = {os.lstat(found_path).st_ino for g in group if g != ident
                      for found_path in [next((top / f"D{made[g][1]}" / f"n{g}{r}" for r in ("", "r")
                                               if os.path.lexists(top / f"D{made[g][1]}" / f"n{g}{r}")),
                                              None)] if found_path is not None}
            if others - {st.st_ino}:
                problems.append(f"{pth}: link group {group} on inode numbers {others | {st.st_ino}}")
        if ino is not None and inos and st.st_ino != ino:
            problems.append(f"{pth}: st_ino {st.st_ino} != {ino} when made")
    for ident, pth in found.items():
        problems.append(f"{pth}: listed, made by no creation that succeeded")
    return problems


def snapshot_model(models_out):
    snap = {}
    for k, files in models_out.items():
        for key, v in files.items():
            snap[key] = v
    return snap


def main():
    global IDSHIFT, NEWUID
    base = Path(sys.argv[1])
    options = sys.argv[2]
    IDSHIFT, NEWUID = id_shift(options)
    stress_extra.BIND_AT_OPEN = "handles=bind-at-open" in options.split(",")
    seed = int(sys.argv[3])
    nops = int(sys.argv[4]) if len(sys.argv) > 4 else 400
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    rng = random.Random(seed)
    lower, lower2, upper, work, models = build(base, workers, rng)
    npairs = int(os.environ.get("PAIRS", "0"))
    pair_models, next_id = build_pairs(base, lower, upper, npairs, random.Random(seed + 7),
                                       links="index=on" in options)
    nbig = int(os.environ.get("BIGDIR", "0"))
    if nbig:
        build_big(lower, upper, nbig)
    nrace = int(os.environ.get("RACE", "0"))
    race_ok, race_made, race_shown = False, {}, {}
    if nrace:
        build_race(lower, upper)
    ntmp = int(os.environ.get("TMPFILE", "0"))
    nseek = int(os.environ.get("SEEKERS", "0")) if nbig else 0
    nheld = bool(os.environ.get("HELDDIRS"))
    if ntmp:
        stress_extra.build_tmp(lower, upper)
    if nheld:
        stress_extra.build_held(lower, upper)
    nlc = int(os.environ.get("LOWERCHG", "0"))
    stress_lowerchg.SHIFT = IDSHIFT
    lc_models = stress_lowerchg.build_lowerchg(lower, lower2, nlc, random.Random(seed + 11)) \
        if nlc else []
    lc_ok, lc_made = False, {}
    opts = f"lowerdir={':'.join(map(str, lowers(base)))},upperdir={upper},workdir={work}"
    if options:
        opts += "," + options
    mnt = base / "mnt"
    problems = []
    nofile = int(os.environ["DAEMON_NOFILE"]) if os.environ.get("DAEMON_NOFILE") else None
    m = helpers.Mount(mnt, opts, log_dir=base, nofile=nofile)
    m.start()
    results = {}
    try:
        q = mp.Queue()
        stop = mp.Event()
        only = os.environ.get("ONLY")
        ks = [int(x) for x in only.split(",")] if only else range(workers)
        procs = [mp.Process(target=writer, args=(k, str(mnt), models[k], seed * 100 + k, nops, q))
                 for k in ks]
        aux = [] if os.environ.get("NOAUX") else [mp.Process(target=lister, args=(str(mnt), stop, q, 0)),
               mp.Process(target=reader, args=(str(mnt), stop, q, seed))]
        pair_procs, pair_aux = [], []
        for j in range(npairs):
            done = mp.Event()
            pair_procs.append(mp.Process(target=pair_filer, args=(
                j, str(mnt), pair_models[j], next_id + 10000 * j, seed * 100 + 50 + j, nops, q, done)))
            pair_aux += [mp.Process(target=pair_mover, args=(j, str(mnt), done, q, seed * 100 + 70 + j)),
                         mp.Process(target=pair_watcher, args=(j, str(mnt), stop, q))]
        if nbig:
            aux += [mp.Process(target=big_mutator, args=(str(mnt), nbig, stop, q, seed * 100 + 90))]
            aux += [mp.Process(target=big_lister, args=(str(mnt), nbig, stop, q, i, seed * 100 + 91 + i))
                    for i in range(2)]
        if nrace:
            procs += [mp.Process(target=race_creator, args=(c, str(mnt), seed * 100 + 30 + c, nops, q))
                      for c in range(nrace)]
            aux += [mp.Process(target=race_mover, args=(str(mnt), stop, q, seed * 100 + 40)),
                    mp.Process(target=race_namer, args=(str(mnt), stop, q))]
        if ntmp:
            procs += [mp.Process(target=stress_extra.tmper, args=(c, str(mnt), seed * 100 + 60 + c, nops, q))
                      for c in range(ntmp)]
            aux += [mp.Process(target=stress_extra.tmp_mover, args=(str(mnt), stop, q, seed * 100 + 65))]
        aux += [mp.Process(target=stress_extra.big_seeker, args=(
            str(mnt), nbig, stop, q, i, seed * 100 + 80 + i, big_names)) for i in range(nseek)]
        if nlc:
            procs += [mp.Process(target=stress_lowerchg.lc_changer, args=(
                c, str(mnt), lc_models[c], seed * 100 + 20 + c, q, stress_extra.BIND_AT_OPEN,
                "metacopy=on" in options)) for c in range(nlc)]
            aux += [mp.Process(target=stress_lowerchg.lc_mover, args=(str(mnt), stop, q, seed * 100 + 17)),
                    mp.Process(target=stress_lowerchg.lc_namer, args=(str(mnt), stop, q, seed * 100 + 18)),
                    mp.Process(target=stress_lowerchg.lc_holder, args=(str(mnt), stop, q, seed * 100 + 19,
                                                                   stress_extra.BIND_AT_OPEN)),
                    mp.Process(target=stress_lowerchg.lc_remover, args=(str(mnt), nlc, stop, q, seed * 100 + 16))]
        if nheld:
            aux += [mp.Process(target=stress_extra.dir_remover, args=(str(mnt), stop, q, seed * 100 + 85)),
                    mp.Process(target=stress_extra.dir_holder, args=(str(mnt), stop, q, seed * 100 + 86))]
        for p in procs + aux + pair_procs + pair_aux:
            p.start()
        for _ in range(len(procs) + len(pair_procs) + npairs):  # writers, filers, movers
            k, status, out = q.get(timeout=600)
            results[k] = (status, out)
        stop.set()
        aux += pair_aux[1::2]
        procs += pair_procs + pair_aux[0::2]
        for _ in aux:
            k, status, out = q.get(timeout=120)
            results[k] = (status, out)
        for p in procs + aux:
            p.join(30)
        for k, (status, out) in results.items():
            if status != "ok":
                problems.append(f"{k}: {out}")
        try:
            merged_before = helpers.tree_snapshot(mnt, xattrs=False, times=True)
        except FileNotFoundError as e:
            problems.append(f"snapshot: {e}")
            root_list = sorted(os.listdir(mnt))
            problems.append(f"root listing now: {root_list}")
            time.sleep(2)
            problems.append(f"root listing 2s later: {sorted(os.listdir(mnt))}")
            merged_before = helpers.tree_snapshot(mnt, xattrs=False, times=True, ignore_vanished=True)
        # model vs merged view (for writers that finished ok)
        for k in range(workers):
            st_, out = results.get(k, ("fail", None))
            if st_ != "ok":
                continue
            for key, (data, mode, uid, mtime, nlink) in out.items():
                e = merged_before.get(key)
                if e is None:
                    problems.append(f"model file {key} missing in merged view")
        # no stray owned names
        for key in merged_before:
            base_name = key.rsplit("/", 1)[-1]
            if base_name.startswith("w") and len(base_name) >= 4:
                k = int(base_name[1])
                st_, out = results.get(k, ("fail", None))
                if st_ == "ok" and key not in out:
                    problems.append(f"merged view has {key}, model does not")
        for j in range(npairs):
            st_, out = results.get(f"filer{j}", ("fail", None))
            if st_ == "ok" and results.get(f"mover{j}", ("fail",))[0] == "ok":
                problems += [f"overlaypc: {x}" for x in pair_view(mnt, j, out, shift=IDSHIFT)]
        race_made, race_shown = {}, {}
        for c in range(nrace):
            st_, out = results.get(f"creator{c}", ("fail", None))
            if st_ == "ok":
                race_made.update(out)
                race_shown.update({o: NEWUID if race_owner(c) == 0 else race_owner(c) for o in out})
        race_ok = nrace and len(race_made) and all(
            results.get(f"creator{c}", ("fail",))[0] == "ok" for c in range(nrace)) \
            and results.get("racemover", ("fail",))[0] == "ok"
        if race_ok:
            problems += [f"overlaypc race: {x}" for x in race_view(mnt, race_made, race_shown, inos=True)]
        tmp_made = {}
        for c in range(ntmp):
            out = results.get(f"tmper{c}", ("fail", None))[1]
            tmp_made.update(out if isinstance(out, dict) else {})
        if ntmp and all(results.get(k, ("fail",))[0] == "ok"
                        for k in [f"tmper{c}" for c in range(ntmp)] + ["tmpmover"]):
            problems += [f"overlaypc tmp: {x}" for x in stress_extra.tmp_view(mnt, tmp_made)]
        lc_made = {}
        for c in range(nlc):
            out = results.get(f"lc{c}", ("fail", None))[1]
            lc_made.update(out if isinstance(out, dict) else {})
        lc_ok = nlc and all(results.get(k_, ("fail",))[0] == "ok" for k_ in
                            [f"lc{c}" for c in range(nlc)] + ["lcmover", "lcnamer", "lcremover"])
        if lc_ok:
            problems += [f"overlaypc lc: {x}" for x in stress_lowerchg.lc_view(mnt, lc_made)]
        problems += [f"overlaypc: {x}" for x in listed_inos(mnt)]
    finally:
        p2 = m.unmount(check=False)
        problems += p2
    # workdir empty (work/work), index entries allowed
    for sub in work.iterdir():
        if sub.name == "work":
            left = list(sub.iterdir())
            if left:
                problems.append(f"workdir not empty: {left[:5]}")
        elif sub.name != "index":
            problems.append(f"unexpected in workdir: {sub}")
    # kernel overlay on the same layers (read-only: the upper as a lower on top)
    kopts = ["metacopy=on", "redirect_dir=on"] if "metacopy=on" in options else (
        ["redirect_dir=on"] if "redirect_dir=off" not in options else ["redirect_dir=follow"])
    kmnt = base / "kmnt"
    try:
        with helpers.kernel_overlay(kmnt, [upper, *lowers(base)], None, None, kopts) as km:
            ksnap = helpers.tree_snapshot(km, xattrs=False, times=True, ignore_vanished=True)
            problems += [f"kernel ro: {x}" for x in listed_inos(km)]
    except AssertionError as e:
        problems.append(f"kernel mount: {e}")
        ksnap = None
    if ksnap is not None and IDSHIFT:  # the kernel shows the layers' IDs
        ksnap = {k_: dataclasses.replace(v, uid=v.uid + IDSHIFT, gid=v.gid + IDSHIFT)
                 for k_, v in ksnap.items()}
    if ksnap is not None and npairs and "index=on" in options:
        # lower hard links of the pair trees: a name not copied up shows the lower's data to a
        # kernel without the index; pair_view checks them with the kernel's index below
        ksnap = {k_: v for k_, v in ksnap.items() if not k_.startswith("p")}
        merged_before = {k_: v for k_, v in merged_before.items() if not k_.startswith("p")}
    # under xattr_permissions overlaypc keeps owners and modes in override xattrs, which the
    # kernel knows nothing of: it shows the objects' own, so those are not compared with it
    masked = any(o.split("=", 1)[0] == "xattr_permissions" and o.split("=", 1)[-1] not in ("", "0")
                 for o in options.split(","))
    if ksnap is not None and masked:
        ksnap = {k_: dataclasses.replace(v, mode=0, uid=0, gid=0) for k_, v in ksnap.items()}
        merged_before = {k_: dataclasses.replace(v, mode=0, uid=0, gid=0)
                         for k_, v in merged_before.items()}
    if ksnap is not None and ksnap != merged_before:
        problems.append("kernel view differs from overlaypc's:\n" +
                        helpers.diff_snapshots(ksnap, merged_before, ("kernel", "overlaypc"))[:4000])
    if ksnap is not None:  # the model against the kernel's view of the layers
        for k in range(workers):
            st_, out = results.get(k, ("fail", None))
            if st_ != "ok":
                continue
            for key, (data, mode, uid, mtime, nlink) in out.items():
                e = ksnap.get(key)
                if e is None:
                    problems.append(f"kernel: {key} missing")
                    continue
                import hashlib
                want = data if len(data) <= 4096 else "sha256:" + hashlib.sha256(data).hexdigest()
                if masked:
                    mode = uid = 0
                if (e.content, e.mode, e.uid, e.gid) != (want, mode, uid, uid):
                    problems.append(f"kernel: {key}: {(e.mode, e.uid, e.gid, e.size)} vs model "
                                    f"{(mode, uid, uid, len(data))}, content same: {e.content == want}")
                if mtime is not None and e.mtime_ns != mtime:
                    problems.append(f"kernel: {key}: mtime {e.mtime_ns} vs model {mtime}")
    if race_ok and ksnap is not None:  # the kernel's read-only view of the layers
        with helpers.kernel_overlay(kmnt, [upper, *lowers(base)], None, None, kopts) as km:
            problems += [f"kernel ro race: {x}" for x in race_view(
                km, race_made, race_shown, owners=not masked, shift=IDSHIFT)]
    if lc_ok and ksnap is not None:  # the kernel's read-only view of the layers
        with helpers.kernel_overlay(kmnt, [upper, *lowers(base)], None, None, kopts) as km:
            problems += [f"kernel ro lc: {x}" for x in stress_lowerchg.lc_view(
                km, lc_made, owners=not masked, shift=IDSHIFT)]
    pairs_ok = [j for j in range(npairs) if results.get(f"filer{j}", ("fail",))[0] == "ok"
                and results.get(f"mover{j}", ("fail",))[0] == "ok"]
    if pairs_ok and ksnap is not None:  # the kernel reads the same objects at the same names
        with helpers.kernel_overlay(kmnt, [upper, *lowers(base)], None, None, kopts) as km:
            for j in pairs_ok:
                found = pair_view(km, j, results[f"filer{j}"][1], owners=not masked)
                if "index=on" in options:  # no index read-only: lower links not copied up split
                    found = [x for x in found if "nlink" not in x and "inode numbers" not in x]
                problems += [f"kernel ro: {x}" for x in found]
    if pairs_ok and "index=on" in options:  # the kernel with the same upper, work and index
        kw = ["index=on"] + kopts + [o for o in options.split(",") if o.startswith("xino")]
        try:
            with helpers.kernel_overlay(kmnt, lowers(base), upper, work, kw) as km:
                for j in pairs_ok:
                    problems += [f"kernel index=on: {x}" for x in pair_view(
                        km, j, results[f"filer{j}"][1], owners=not masked)]
        except AssertionError as e:
            problems.append(f"kernel index=on mount: {e}")
    print(f"options={options!r} seed={seed}: {len(problems)} problems; results "
          + ", ".join(f"{k}:{v[0]}" + (f"({v[1]})" if isinstance(v[1], int) else "")
                      for k, v in results.items()))
    for p in problems:
        print("PROBLEM:", p[:6000])
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
