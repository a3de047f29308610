"""Manual tool (not collected by pytest): kill -9 of the daemon at random moments of a busy
mixed workload, then recovery and checks (hunt8c).

Run as root from the checkout:
  python tests/stress_crash.py BASE OPTIONS SEED [ROUNDS] [WORKERS]
  e.g. python tests/stress_crash.py /tmp/scratch/c1 "index=on,metacopy=on" 3 8 3
BASE is deleted first. Each seed builds its own layers (lower files 0 B .. 6 MiB, lower
directories, with index=on lower hard links, some upper files, whiteouts), then ROUNDS times:
  1. mount overlaypc; WORKERS processes run a random workload of single syscalls in their own
     trees w{k} (copy-up by chmod/chown/open-for-write/truncate/setxattr, writes through held
     fds, fsync, renames of files and lower directories, mkdir/rmdir, link, symlink, unlink);
     each logs every syscall's outcome to BASE/log-{k} (not on the mount);
  2. after a random 0-300 ms, kill -9 of the daemon; ``umount -l`` of the dead mount (as the
     stale-mount error tells a user);
  3. remount overlaypc on the same layers: it must mount, and leave ``workdir/work`` empty;
     the merged view must hold no ``#ovlpc-`` names, no duplicate names in a listing, no
     overlay xattr;
  4. the oracle: the same syscalls replayed on a plain directory (a copy of the merged view
     made at the start): the ops answered before the kill give state A, the op in flight at
     the kill (the one answered ENOTCONN/ECONNABORTED) applied too gives state B; each
     worker's tree must equal A or B, or either with the ops answered after the one in flight
     applied too (soak23: I/O on a passthrough fd needs no daemon), (type, mode, owner, content, symlink target, user
     xattrs, which names share an inode, st_nlink of files); every outcome the workload saw
     must be the replay's too (but for the known differences ``accepted`` lists);
  5. the kernel overlay mounted read-only and read-write on the same layers with matching
     options must mount and show what overlaypc shows (under ``xattr_permissions`` but for
     owners and modes, which the kernel reads from the objects themselves, not from the
     override xattrs, and which it lists).
Environment: DAEMON_NOFILE=N (soak13) starts each daemon under ``ulimit -n N``; KEEP=1 keeps BASE; NOKERNEL=1 skips step 5; NOKILL=1: no kill (the leads of
hunt8 came from a live daemon): each worker runs NOPS ops (default 400) to the end, the mount is
unmounted cleanly, and every answer must be the replay's and each tree must equal A. Exit status
1 on any problem.

Each round's starting layers are kept (``layers-start-{round}``, ``cp -a --reflink=auto``) until
the round passes, so the failing round's are there for ``--replay``:
  python tests/stress_crash.py --replay BASE OPTIONS K N [ROUND]
runs, on a copy of them (of the upper and work: over the round's own lower, whose file
handles ``index=on`` needs) through a fresh mount, every worker's logged ops in the order their
answers were logged (ALL=0: worker K's alone) up to worker K's op N, and prints worker K's ops
with both outcomes. Caveat: a copy has other inode numbers than the layers the round ran on;
a defect that depends on which inode number the upper filesystem hands out again may need
the exact interleaving, or may not come back at all.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import multiprocessing as mp
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers  # noqa: E402
from overlaypc.ownership import OVERRIDE_NAMES  # noqa: E402
from reliability_support import daemon_pid, lazy_detach  # noqa: E402

DIRS = ["", "a", "a/b", "c", "n", "a/m", "c/x"]
FILES = [f"{d}/{f}".lstrip("/") for d in DIRS for f in ("f0", "f1", "f2", "f3")]
LINKNAMES = [f"{d}/s0".lstrip("/") for d in ("", "a", "c")]
MODES = [0o644, 0o600, 0o755, 0o640, 0o4755]
SIZES = [0, 5, 4096, 70_000, 1 << 20, 6 << 20]
SLOTS = 4
#: the daemon's RLIMIT_NOFILE (DAEMON_NOFILE=N, soak13), else the tool's own
NOFILE = int(os.environ["DAEMON_NOFILE"]) if os.environ.get("DAEMON_NOFILE") else None
DEAD = (errno.ENOTCONN, errno.ECONNABORTED)
#: the mount has ``handles=bind-at-open`` (set in main and replay_main from OPTIONS): an fd
#: opened before its file's copy-up reads the lower data (``accepted``)
BIND_AT_OPEN = False
#: EXTRA=1 (soak11) adds ops for O_APPEND toggled by fcntl (``open_append``, ``setfl``, and
#: ``write`` at the file offset after an lseek), directories held open while removed then
#: changed through the fd (``opendir``, then ``fchmod``/``fsetxattr`` on its slot) and
#: listings (``listdir``). Off by default so that the sequences of older seeds stay the same
#: (the replay reads the same environment)
EXTRA_KINDS = (["open_append", "open_append", "setfl", "setfl", "write", "write", "opendir",
                "opendir", "fsetxattr", "fsetxattr", "listdir"] if os.environ.get("EXTRA") else [])
#: EXTRA2=1 (soak15) adds O_TMPFILE files in a slot (``tmpfile``), links of a slot's file
#: through /proc/self/fd/N (``linkslot``: a tmpfile gets a name, an unlinked file ENOENT) and
#: reopens of a slot's file through /proc/self/fd/N into the next slot (``reopen``), named
#: or not. Apart from EXTRA for the same reason
EXTRA2_KINDS = (["tmpfile", "tmpfile", "linkslot", "linkslot", "reopen", "reopen"]
                if os.environ.get("EXTRA2") else [])


# ---------------------------------------------------------------------------------------
# The workload: a deterministic sequence of single syscalls (choices depend on the seed
# only; fd slots on the outcomes, which the replay must reproduce)
# ---------------------------------------------------------------------------------------

def _ename(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


class Runner:
    """Runs op ``i`` of a worker's sequence under ``root``; keeps the fd slots."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.slots: list[int | None] = [None] * SLOTS
        #: the last fchmod's file had no name left (``accepted``)
        self.nameless = False

    def close_all(self) -> None:
        for i, fd in enumerate(self.slots):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                self.slots[i] = None

    def p(self, rel: str) -> str:
        return str(self.root / rel) if rel else str(self.root)

    def next_op(self) -> tuple:
        """The next op, a tuple of plain values (drawn before it runs: replay draws the same)."""
        r = self.rng
        kind = r.choice(["chmod", "chmod", "chown", "truncate", "setxattr", "removexattr",
                         "open_rw", "open_rw", "open_ro", "open_trunc", "create", "pwrite",
                         "pwrite", "pwrite", "fsync", "ftruncate", "pread", "close", "rename",
                         "rename", "renamedir", "renamedir", "mkdir", "rmdir", "rmdir",
                         "unlink", "unlink", "link", "symlink", "fchmod"] + EXTRA_KINDS + EXTRA2_KINDS)
        f, g = r.choice(FILES), r.choice(FILES + LINKNAMES)
        d, e = r.choice(DIRS[1:]), r.choice(DIRS[1:] + ["z", "a/z", "c/x/z", "n/y"])
        slot = r.randrange(SLOTS)
        size = r.choice(SIZES)
        off = r.randrange(0, 8 << 20) if r.random() < 0.3 else r.randrange(0, 80_000)
        n = r.choice([1, 100, 5000, 70_000])
        mode = r.choice(MODES)
        uid = r.choice([0, 1000, 1001])
        xname = f"user.k{r.randrange(3)}"
        dseed = r.randrange(1 << 30)
        return (kind, f, g, d, e, slot, size, off, n, mode, uid, xname, dseed)

    def run(self, op: tuple) -> str:
        kind, f, g, d, e, slot, size, off, n, mode, uid, xname, dseed = op
        p = self.p
        fd = self.slots[slot]
        try:
            if kind == "chmod":
                os.chmod(p(f), mode)
            elif kind == "fchmod":
                if fd is None:
                    return "skip"
                self.nameless = _nameless(fd)
                os.fchmod(fd, mode)
            elif kind == "fsetxattr":
                if fd is None:
                    return "skip"
                self.nameless = _nameless(fd)
                os.setxattr(fd, xname, random.Random(dseed).randbytes(20))
            elif kind == "opendir":
                if fd is not None:
                    return "skip"
                self.slots[slot] = os.open(p(d), os.O_RDONLY | os.O_DIRECTORY)
            elif kind == "open_append":
                if fd is not None:
                    return "skip"
                self.slots[slot] = os.open(p(f), os.O_RDWR | os.O_APPEND)
            elif kind == "setfl":
                if fd is None:
                    return "skip"
                fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, fl ^ os.O_APPEND)
                return f"ok:{bool(fl & os.O_APPEND)}"
            elif kind == "write":  # at the fd's offset after a seek: at the end under O_APPEND
                if fd is None or stat.S_ISDIR(os.fstat(fd).st_mode):
                    return "skip"
                os.lseek(fd, off, os.SEEK_SET)
                got = os.write(fd, random.Random(dseed).randbytes(n))
                return f"ok:{got}:{os.lseek(fd, 0, os.SEEK_CUR)}"
            elif kind == "tmpfile":
                if fd is not None:
                    return "skip"
                self.slots[slot] = os.open(p(d), os.O_TMPFILE | os.O_RDWR, 0o640)
            elif kind == "linkslot":
                if fd is None:
                    return "skip"
                # (os.link calls link(2), which does not follow /proc's link, without dir fds)
                dfd = os.open(os.path.dirname(p(g)), os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.link(f"/proc/self/fd/{fd}", os.path.basename(p(g)), dst_dir_fd=dfd,
                            follow_symlinks=True)
                finally:
                    os.close(dfd)
            elif kind == "reopen":
                to = (slot + 1) % SLOTS
                if fd is None or self.slots[to] is not None:
                    return "skip"
                self.nameless = os.fstat(fd).st_nlink == 0
                self.slots[to] = os.open(f"/proc/self/fd/{fd}",
                                         os.O_RDWR if n > 100 else os.O_RDONLY)
            elif kind == "listdir":
                names = sorted(os.listdir(p(d)))
                return f"ok:{len(names)}:{hashlib.sha256(chr(0).join(names).encode()).hexdigest()[:12]}"
            elif kind == "chown":
                os.chown(p(f), uid, uid)
            elif kind == "truncate":
                os.truncate(p(f), size)
            elif kind == "setxattr":
                os.setxattr(p(f), xname, random.Random(dseed).randbytes(20))
            elif kind == "removexattr":
                os.removexattr(p(f), xname)
            elif kind in ("open_rw", "open_ro", "open_trunc", "create"):
                if fd is not None:
                    return "skip"
                flags = {"open_rw": os.O_RDWR, "open_ro": os.O_RDONLY,
                         "open_trunc": os.O_RDWR | os.O_TRUNC,
                         "create": os.O_RDWR | os.O_CREAT | os.O_EXCL}[kind]
                self.slots[slot] = os.open(p(f), flags, 0o640)
            elif kind == "pwrite":
                if fd is None:
                    return "skip"
                return f"ok:{os.pwrite(fd, random.Random(dseed).randbytes(n), off)}"
            elif kind == "fsync":
                if fd is None:
                    return "skip"
                os.fsync(fd)
            elif kind == "ftruncate":
                if fd is None:
                    return "skip"
                os.ftruncate(fd, size)
            elif kind == "pread":
                if fd is None:
                    return "skip"
                got = os.pread(fd, 8 << 20, 0)
                return f"ok:{len(got)}:{hashlib.sha256(got).hexdigest()[:12]}"
            elif kind == "close":
                if fd is None:
                    return "skip"
                self.slots[slot] = None
                os.close(fd)
            elif kind == "rename":
                os.rename(p(f), p(g))
            elif kind == "renamedir":
                os.rename(p(d), p(e))
            elif kind == "mkdir":
                os.mkdir(p(e), 0o755)
            elif kind == "rmdir":
                os.rmdir(p(d))
            elif kind == "unlink":
                os.unlink(p(g))
            elif kind == "link":
                os.link(p(f), p(g), follow_symlinks=False)
            elif kind == "symlink":
                os.symlink(f"target-{dseed % 7}", p(g))
        except OSError as ex:
            return _ename(ex)
        return "ok"


def _nameless(fd: int) -> bool:
    """Whether the file open as ``fd`` has no name left: its magic link says "(deleted)"
    (not its link count: an unlinked lower file shows the lower file's own, as on the
    kernel overlay, and a removed lower directory keeps its count)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)")
    except OSError:
        return False


def accepted(op: tuple, seen: str, got: str, rn: Runner) -> bool:
    """A known difference from the plain directory, not a defect: ``fchmod`` through an
    fd of a file with no name left answers EEXIST when it is a lower file (its copy-up
    needs a name: ``files._on_nameless``; the kernel overlay answers so too), where the
    replay changed the mode. Caveat: the replay cannot tell a lower file from a copied-up
    one, so an EEXIST for an unlinked upper file would pass here too."""
    if BIND_AT_OPEN and op[0] == "pread" and seen.startswith("ok:") and got.startswith("ok:"):
        # the stale read ``handles=bind-at-open`` is for: a read-only fd opened before its
        # file's copy-up still reads the lower data (soak26 seed 9479: 5 bytes, the replay's
        # file had been written since). Not compared (the views still compare by name)
        return True
    if op[0] in ("fchmod", "fsetxattr") and got == "ok" and rn.nameless:
        # EEXIST as above; ESTALE: a directory of the lower alone, removed (``nameless``:
        # the kernel overlay copies it up into its workdir)
        return seen in ("EEXIST", "ESTALE")
    if op[0] == "reopen" and got == "ok" and rn.nameless and op[8] > 100 and seen == "EEXIST":
        # write access to a lower file with no name left: EEXIST, as the kernel overlay's
        # copy-up finds the name taken (README, test_reopen_nameless); the same caveat. The
        # replay drops its new fd, so that its slots stay the mount's
        to = (op[5] + 1) % SLOTS
        os.close(rn.slots[to])
        rn.slots[to] = None
        return True
    return False


def worker(k: int, root: str, seed: int, logpath: str, nops: int, ready) -> None:
    """Run the sequence in the mount until the daemon dies (or nops), logging outcomes."""
    rn = Runner(Path(root), seed)
    log = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    ready.release()
    for i in range(nops):
        op = rn.next_op()
        out = rn.run(op)
        os.write(log, f"{i} {time.monotonic():.6f} {out}\n".encode())
        if out in ("ENOTCONN", "ECONNABORTED"):
            break
    os.close(log)
    os._exit(0)


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------

def build(base: Path, workers: int, rng: random.Random, index: bool) -> tuple[Path, Path, Path]:
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for x in (lower, upper, work):
        x.mkdir(parents=True)
    for k in range(workers):
        t = lower / f"w{k}"
        for d in DIRS:
            if d and rng.random() < 0.8:
                (t / d).mkdir(parents=True, exist_ok=True)
        t.mkdir(exist_ok=True)
        for f in FILES:
            if (t / f).parent.is_dir() and rng.random() < 0.5:
                (t / f).write_bytes(rng.randbytes(rng.choice(SIZES)))
                os.chmod(t / f, rng.choice(MODES))
                if rng.random() < 0.3:
                    os.setxattr(t / f, "user.k0", b"lower")
        if index:  # hard links in the lower, within the tree
            names = [f for f in FILES if (t / f).is_file()]
            for f in names[:6]:
                g = rng.choice(FILES)
                if not (t / g).exists() and (t / g).parent.is_dir():
                    os.link(t / f, t / g)
        u = upper / f"w{k}"
        u.mkdir()
        for f in FILES:  # upper files over lower ones, whiteouts of some lower names
            if (t / f).parent.is_dir() and (u / f).parent != u and not (u / f).parent.exists():
                continue
            if (t / f).is_file() and rng.random() < 0.15 and (t / f).stat().st_nlink == 1:
                if rng.random() < 0.5:
                    (u / f).parent.mkdir(parents=True, exist_ok=True)
                    (u / f).write_bytes(b"upper " + f.encode())
                else:
                    (u / f).parent.mkdir(parents=True, exist_ok=True)
                    os.mknod(u / f, stat.S_IFCHR | 0o600, 0)
    return lower, upper, work


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------

def view(root: Path, problems: list[str] | None = None, label: str = "",
         shown: tuple[str, ...] = (), ignore_vanished: bool = False,
         attrs: dict | None = None, excused=None) -> dict:
    """rel -> (type, mode, uid, gid, content hash/target, user xattrs, nlink, link group).
    ``shown``: xattr names that may be listed (else a problem, but for user.k*).
    ``ignore_vanished`` (the kernel's views, soak13): a listed name whose lookup says ENOENT
    is left out: the kernel lists a whiteout in a directory it does not merge (an opaque
    one), which a kill between a rename's exchange with a whiteout and the removal of
    that whiteout from the source leaves (the kernel overlay's rename has the same window).
    ``attrs`` (soak19) gets rel -> (st_ino, st_nlink of a directory, else None), compared
    with the kernel's; with ``problems``, every listed d_ino must be the st_ino lstat gives,
    but where ``excused(rel)`` says why not."""
    out: dict = {}
    inos: dict = {}

    def visit(path: str, rel: str, d_ino: int | None = None) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if ignore_vanished and rel:
                return
            raise
        if problems is not None and d_ino is not None and d_ino != st.st_ino \
                and not (excused and excused(rel)):
            problems.append(f"{label}: {rel}: listed d_ino {d_ino}, st_ino {st.st_ino}")
        if attrs is not None:
            attrs[rel] = (st.st_ino, st.st_nlink if stat.S_ISDIR(st.st_mode) else None)
        xs = []
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            names = []
        for x in sorted(names):
            if problems is not None and not x.startswith(("user.k", "security.", "system.")) \
                    and x not in shown:
                problems.append(f"{label}: xattr {x} visible on {rel}")
            if x.startswith("user.k"):
                try:
                    xs.append((x, os.getxattr(path, x, follow_symlinks=False)))
                except OSError as ex:
                    xs.append((x, _ename(ex)))
        kind = stat.S_IFMT(st.st_mode)
        body = None
        nlink = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as fh:
                data = fh.read()
            if len(data) != st.st_size and problems is not None:
                problems.append(f"{label}: {rel}: read {len(data)} bytes, st_size {st.st_size}")
            body = f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"
            nlink = st.st_nlink
            inos.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(path)
        out[rel] = [kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body, tuple(xs), nlink, None]
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as it:
                listed = [(e.name, e.inode()) for e in it]
            names = [nm for nm, _ in listed]
            if problems is not None:
                if len(set(names)) != len(names):
                    problems.append(f"{label}: {rel or '.'} lists a name twice: {sorted(names)}")
                for nm in names:
                    if nm.startswith(("#ovlpc", ".wh.")):
                        problems.append(f"{label}: internal name {rel}/{nm} visible")
            for nm, d_ino in sorted(dict(listed).items()):
                visit(os.path.join(path, nm), f"{rel}/{nm}".lstrip("/"), d_ino)

    visit(str(root), "")
    for rels in inos.values():
        group = tuple(sorted(rels))
        for r_ in rels:
            out[r_][7] = group
    return {k: tuple(v) for k, v in out.items()}


def overrides(mopts: str) -> bool:
    """Whether the options make overlaypc keep owners and modes in override xattrs."""
    return any(o.split("=", 1)[0] == "xattr_permissions" and o.split("=", 1)[1] not in ("", "0")
               for o in mopts.split(","))


def without_owners(v: dict) -> dict:
    """A view without owners and modes (what the kernel cannot know under overrides)."""
    return {k: (e[0], None, None, None, *e[4:]) for k, e in v.items()}


def sub(v: dict, prefix: str) -> dict:
    return {k[len(prefix):].lstrip("/"): (*e[:7], tuple(x[len(prefix):].lstrip("/") for x in e[7])
                                           if e[7] else None)
            for k, e in v.items() if k == prefix or k.startswith(prefix + "/")}


def diff(a: dict, b: dict, names=("a", "b"), limit=30) -> str:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"  {k}:\n    {names[0]}: {a.get(k)}\n    {names[1]}: {b.get(k)}")
    return "\n".join(lines[:limit])


def copy_view(src: Path, dst: Path) -> None:
    """A plain copy of a merged view: modes, owners, user xattrs, hard links, symlinks."""
    if dst.exists():
        shutil.rmtree(dst)
    r = subprocess.run(["cp", "-a", "--preserve=all", str(src), str(dst)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cp -a failed: {r.stderr}")


# ---------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------

def partly_written(op: tuple, a_dir: Path, a_view: dict, mine: dict) -> bool:
    """Whether ``mine`` is state A (``a_dir``, ``a_view``; or A2, A with the ops answered
    after it) with a leading part of the ``pwrite`` (or ``write``) in flight applied:
    the kernel splits a write into several WRITE requests (at page boundaries through the
    page cache, at max_write in direct I/O), and a kill between them leaves the first ones
    done. Only the written file (all its names) may differ, in its content alone; the part
    ends at a page boundary. (Linux's pwrite on an O_APPEND fd writes at the end: both
    starts are tried.)"""
    if op[0] not in ("pwrite", "write"):  # (``write``: at its seek, or at the end under O_APPEND)
        return False
    differ = [k for k in set(a_view) | set(mine) if a_view.get(k) != mine.get(k)]
    if not differ or any(k not in a_view or k not in mine for k in differ):
        return False
    if any(a_view[k][:4] + a_view[k][5:] != mine[k][:4] + mine[k][5:] for k in differ):
        return False
    if len({mine[k][4] for k in differ}) != 1 or a_view[differ[0]][0] != stat.S_IFREG:
        return False
    want = mine[differ[0]][4]
    old = (a_dir / differ[0]).read_bytes()
    off, n, dseed = op[7], op[8], op[12]
    data = random.Random(dseed).randbytes(n)
    for start in {off, len(old)}:
        for end in range((start // 4096 + 1) * 4096, start + n, 4096):
            body = bytearray(old)
            if start > len(body):
                body.extend(bytes(start - len(body)))
            body[start:end] = data[:end - start]
            if f"{len(body)}:{hashlib.sha256(body).hexdigest()[:16]}" == want:
                return True
    return False


def mnt_copy_of(base: Path, rnd: int, opts: str, tree: str) -> Path:
    """A plain copy of ``tree`` as overlaypc shows it now (a fresh mount of the layers)."""
    mnt, out = base / "mnt", base / "P"
    with helpers.Mount(mnt, opts, log_dir=base / f"logs-{rnd}" / "remount"):
        copy_view(mnt / tree, out)
    return out


def run_ops(root: Path, seed: int, count: int, seen: list[str] | None = None,
            skip: int | None = None) -> None:
    """The first ``count`` ops but op ``skip``; ``seen``: the mount's answers, whose
    ``accepted`` differences the replay follows (its fd slots)."""
    rn = Runner(root, seed)
    for i in range(count):
        op = rn.next_op()
        if i == skip:
            continue
        got = rn.run(op)
        if seen is not None and i < len(seen) and got != seen[i]:
            accepted(op, seen[i], got, rn)
    rn.close_all()


def round_(base: Path, opts: str, mopts: str, seed: int, rnd: int, workers: int, problems: list[str],
           kopts: list[str], layers) -> bool:
    lower, upper, work = layers
    mnt = base / "mnt"
    model = base / "model"
    rng = random.Random(seed * 1000 + rnd)
    nokill = bool(os.environ.get("NOKILL"))
    nops = int(os.environ.get("NOPS", "400")) if nokill else 100000
    saved = base / f"layers-start-{rnd}"  # for --replay of a failing round (dropped once it passed)
    if saved.exists():
        shutil.rmtree(saved)
    saved.mkdir()
    # one cp: index=on's hard links between the upper and workdir/index stay links
    subprocess.run(["cp", "-a", "--preserve=all", "--reflink=auto", str(lower), str(upper), str(work),
                    str(saved)], check=True)
    (saved / "round").write_text(f"{rnd} {' '.join(map(str, [seed * 7919 + rnd * 104729 + k for k in range(workers)]))}\n")
    logs = base / f"logs-{rnd}"  # each daemon's log, kept
    logs.mkdir(exist_ok=True)
    m = helpers.Mount(mnt, opts, log_dir=logs, nofile=NOFILE)
    m.start()
    pre = base / f"pre-{rnd}"  # the model before the round (to replay A and B from)
    copy_view(model, pre)
    ready = mp.Semaphore(0)
    seeds = [seed * 7919 + rnd * 104729 + k for k in range(workers)]
    procs = [mp.Process(target=worker, args=(k, str(mnt / f"w{k}"), seeds[k], str(base / f"log-{k}"),
                                             nops, ready)) for k in range(workers)]
    for pr in procs:
        pr.start()
    for _ in procs:
        ready.acquire(timeout=30)
    if nokill:
        delay = 0.0
        killed_at = float("inf")  # every answer must be the replay's
        for pr in procs:
            pr.join(600)
            if pr.exitcode is None:
                problems.append(f"round {rnd}: worker {pr.pid} hung")
                pr.kill()
        problems += m.unmount(check=False)
    else:
        delay = rng.uniform(0, 0.3)
        time.sleep(delay)
        pid = daemon_pid(m)  # (checked against our mountpoint before the clock is read)
        killed_at = time.monotonic()  # an op answered after this may not have reached the daemon
        os.kill(pid, signal.SIGKILL)
        m.returncode = m.proc.wait(timeout=15)
        m.active = False
        # the workers stop at their first ENOTCONN; only then the dead mount is detached (after
        # it, their paths would name the empty mountpoint directory)
        for pr in procs:
            pr.join(60)
            if pr.exitcode is None:
                problems.append(f"round {rnd}: worker {pr.pid} hung after the kill")
                pr.kill()
        lazy_detach(mnt)
    counts = []
    # 3. remount
    try:
        (logs / "remount").mkdir(exist_ok=True)
        m2 = helpers.Mount(mnt, opts, log_dir=logs / "remount", allow_daemon_errors=False,
                           nofile=NOFILE)
        m2.start()
    except helpers.MountError as ex:
        problems.append(f"round {rnd}: remount failed: {ex}")
        return False
    left = sorted(os.listdir(work / "work")) if (work / "work").is_dir() else []
    left = [x for x in left if x != "incompat"]
    if left:
        problems.append(f"round {rnd}: workdir/work not cleaned at mount: {left}")
    ov_attrs: dict = {}
    try:
        ov = view(mnt, problems, f"round {rnd} overlaypc", attrs=ov_attrs)
    finally:
        problems += m2.unmount(check=False)
    # 4. oracle per worker
    for k in range(workers):
        # ops answered before the kill must have the replay's answers. After it, an op may
        # still work without the daemon (I/O on a passthrough fd, an answer from the kernel's
        # caches): such ops are taken while their answers are the replay's; the first one
        # that differs (ENOTCONN, ECONNABORTED, EIO, a short read or write of a direct I/O
        # in several requests) is the one in flight, which may or may not have happened
        logged = [ln.split(" ", 2) for ln in (base / f"log-{k}").read_text().splitlines()]
        counts.append(len(logged))
        tree = f"w{k}"
        a_dir = base / "A"
        copy_view(pre / tree, a_dir)
        rn = Runner(a_dir, seeds[k])
        inflight = None
        ok = True
        for i, (_, when, seen) in enumerate(logged):
            op = rn.next_op()
            got = rn.run(op)
            if got == seen or accepted(op, seen, got, rn):
                continue
            if float(when) >= killed_at:
                inflight = (i, op)
            else:
                problems.append(f"round {rnd} w{k} op {i} {op[:5]}: mount answered {seen}, replay {got}")
                ok = False
            break
        rn.close_all()
        if inflight is not None:  # A without it, B with it
            copy_view(pre / tree, a_dir)
            answers = [x[2] for x in logged]
            run_ops(a_dir, seeds[k], inflight[0], answers)
            b_dir = base / "B"
            copy_view(pre / tree, b_dir)
            run_ops(b_dir, seeds[k], inflight[0] + 1, answers)
        # ops answered after the one in flight (soak23: a pwrite through a passthrough fd
        # needs no daemon): A and B with them too (A2 and B2)
        done = len(logged) - (1 if logged and logged[-1][2] in ("ENOTCONN", "ECONNABORTED") else 0)
        later = inflight is not None and done > inflight[0] + 1
        if later:
            for name, skip in (("A2", inflight[0]), ("B2", None)):
                copy_view(pre / tree, base / name)
                run_ops(base / name, seeds[k], done, [x[2] for x in logged], skip)
        outs = logged
        mine = sub(ov, tree)
        a_view = view(a_dir)
        b_view = view(base / "B") if inflight is not None else None
        if not ok:
            continue
        if mine == a_view:
            chosen = a_dir
        elif b_view is not None and mine == b_view:
            chosen = base / "B"
        elif later and mine == view(base / "A2"):
            chosen = base / "A2"
        elif later and mine == view(base / "B2"):
            chosen = base / "B2"
        elif inflight is not None and (
                partly_written(inflight[1], a_dir, a_view, mine)
                or later and partly_written(inflight[1], base / "A2", view(base / "A2"), mine)):
            # (A, or A2, with a part of the write in flight: the model goes on from the
            # mount's. A2: a later pwrite through a passthrough fd, answered without the
            # daemon, changed another file (soak26 seed 9456 round 0: the write in flight
            # split at a page boundary, then a 1-byte pwrite after the kill))
            copy_view(mnt_copy_of(base, rnd, opts, tree), model / tree)
            continue
        else:
            last = f"in flight: op {inflight[0]} {inflight[1][:6]}" if inflight else "nothing in flight"
            problems.append(f"round {rnd} w{k}: state after the kill is neither A nor B, with or without the later answered ops ({last}; "
                            f"{len(outs)} ops, kill after {delay * 1000:.0f} ms):\n"
                            + diff(a_view, mine, ("A (answered ops)", "overlaypc"))
                            + ("\n  vs B:\n" + diff(b_view, mine, ("B (+in flight)", "overlaypc"))
                               if b_view is not None else ""))
            continue
        # the model goes on from the state seen
        copy_view(chosen, model / tree)
    shutil.rmtree(pre)
    # 5. kernel overlay on the same layers
    if not os.environ.get("NOKERNEL"):
        kmnt = base / "kmnt"
        # under xattr_permissions the kernel shows the objects' own owners and modes, and
        # lists the override xattrs: those are not compared
        masked = overrides(mopts)
        # merged directories the tool made in the upper (``build``: no origin xattr), taken
        # before the kernel mounts: its first listing of their parent shows the upper's
        # number while its lookup (which writes the origin and marks the parent impure,
        # ``ovl_fix_origin``, even on a read-only overlay) gives them the lower's in stat;
        # overlaypc writes no origin on a lookup
        handmade = {os.path.relpath(d, upper) for d, _, _ in os.walk(upper)
                    if d != str(upper) and (lower / os.path.relpath(d, upper)).is_dir()
                    and not os.path.islink(d) and "trusted.overlay.origin" not in os.listxattr(d)}
        for ro in (True, False):
            ko = kopts + (["ro"] if ro else [])
            k_attrs: dict = {}

            try:
                with helpers.kernel_overlay(kmnt, [lower], upper, work, ko) as km:
                    kv = view(km, problems, f"round {rnd} kernel {'ro' if ro else 'rw'}",
                              OVERRIDE_NAMES if masked else (), ignore_vanished=True,
                              attrs=k_attrs, excused=handmade.__contains__ if ro else None)
            except AssertionError as ex:
                problems.append(f"round {rnd}: kernel {'ro' if ro else 'rw'} mount: {ex}")
                continue
            ours = ov
            if masked:
                kv, ours = without_owners(kv), without_owners(ov)
            if kv != ours:
                problems.append(f"round {rnd}: kernel ({'ro' if ro else 'rw'}) view differs from "
                                f"overlaypc's:\n" + diff(kv, ours, ("kernel", "overlaypc")))
            # (st_ino, st_nlink of directories) of the names both show (soak19)
            odd = [f"{r_}: kernel {k_attrs[r_]}, overlaypc {ov_attrs[r_]}"
                   for r_ in sorted(set(k_attrs) & set(ov_attrs)) if k_attrs[r_] != ov_attrs[r_]]
            if odd:
                problems.append(f"round {rnd}: kernel ({'ro' if ro else 'rw'}) (st_ino, dir nlink) "
                                f"differ from overlaypc's:\n  " + "\n  ".join(odd[:30]))
        # the kernel's rw mount may leave its own work dir: overlaypc's next mount takes it
    print(f"  round {rnd}: " + ("no kill" if nokill else f"kill after {delay * 1000:.0f} ms")
          + f", ops per worker {counts}, problems so far {len(problems)}", flush=True)
    if not problems:  # (a failing round's layers stay for --replay)
        shutil.rmtree(saved)
    return True


def replay_main(base: Path, mopts: str, k: int, upto: int, rnd: int | None = None) -> int:
    """``--replay BASE OPTIONS K N [ROUND]``: the failing round again (the last one kept if
    ROUND is not given), on a copy of its starting layers, through a fresh mount, without a
    kill: every worker's logged ops in the order their answers were logged (``ALL=0``: worker
    K's alone), up to worker K's op N; prints worker K's ops with both outcomes (the logged
    one, the one now) and any other worker's that differ."""
    if rnd is None:
        kept = sorted(base.glob("layers-start-*"), key=lambda x: int(x.name.rsplit("-", 1)[1]))
        saved = kept[-1]
    else:
        saved = base / f"layers-start-{rnd}"
    rnd, *seeds = map(int, (saved / "round").read_text().split())
    print(f"replaying round {rnd} from {saved}")
    run = base.parent / (base.name + "-replay")
    if run.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(run)], check=True)
    run.mkdir()
    subprocess.run(["cp", "-a", "--preserve=all", "--reflink=auto", str(saved / "upper"),
                    str(saved / "work"), str(run)], check=True)  # (one cp: index=on's links)
    # the round's own lower (no mount changes it): a copy has other file handles, which the
    # upper's origin xattrs and index entries name (index=on refuses to mount over a copy);
    # the index's record of its upper names the round's upper: gone, a mount writes it anew
    try:
        os.removexattr(run / "work" / "index", "trusted.overlay.upper")
    except OSError:
        pass
    opts = f"lowerdir={base}/lower,upperdir={run}/upper,workdir={run}/work" + (f",{mopts}" if mopts else "")
    every = os.environ.get("ALL", "1") != "0"
    order = []  # (time answered, worker, op index, outcome logged)
    for w in range(len(seeds)) if every else (k,):
        for ln in (base / f"log-{w}").read_text().splitlines():
            i, when, seen = ln.split(" ", 2)
            order.append((float(when), w, int(i), seen))
    order.sort()
    with helpers.Mount(run / "mnt", opts, log_dir=run) as m:
        runners = {w: Runner(m.path / f"w{w}", seeds[w]) for w in {o[1] for o in order} | {k}}
        done = 0
        for _, w, i, seen in order:
            if w == k and i >= upto:
                break
            rn = runners[w]
            op = rn.next_op()
            got = rn.run(op)
            if w == k:
                done = i + 1
            if w == k or seen != got:
                print(f"w{w} {i} {op[:6]} logged={seen} now={got}" + ("   <<<" if seen != got else ""))
        rn = runners[k]
        for i in range(done, upto):  # beyond what was logged
            op = rn.next_op()
            print(f"w{k} {i} {op[:6]} logged=- now={rn.run(op)}")
        for rn in runners.values():
            rn.close_all()
    return 0


def main() -> int:
    global BIND_AT_OPEN
    BIND_AT_OPEN = "handles=bind-at-open" in sys.argv[2 if sys.argv[1] != "--replay" else 3].split(",")
    if sys.argv[1] == "--replay":
        return replay_main(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                           int(sys.argv[6]) if len(sys.argv) > 6 else None)
    base = Path(sys.argv[1])
    mopts = sys.argv[2]
    seed = int(sys.argv[3])
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    if base.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=True)
    base.mkdir(parents=True)
    index = "index=on" in mopts
    layers = build(base, workers, random.Random(seed), index)
    lower, upper, work = layers
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}" + (f",{mopts}" if mopts else "")
    kopts = ["redirect_dir=on"] + [o for o in mopts.split(",") if o.split("=")[0] in ("index", "metacopy", "xino")]
    # the model starts as the kernel's read-only view of the layers
    kmnt = base / "kmnt"
    with helpers.kernel_overlay(kmnt, [upper, lower], None, None, ["redirect_dir=on"]) as km:
        copy_view(km, base / "model")
    problems: list[str] = []
    print(f"options={mopts!r} seed={seed}", flush=True)
    for rnd in range(rounds):
        if not round_(base, opts, mopts, seed, rnd, workers, problems, kopts, layers):
            break
        if problems:
            break
    print(f"options={mopts!r} seed={seed}: {len(problems)} problems")
    for p in problems:
        print("PROBLEM:", p[:8000])
    if not os.environ.get("KEEP") and not problems:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)])
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
