"""File-descriptor bounds and paths near PATH_MAX (issue 12, defects 4 and 5).

- A daemon started under ``ulimit -n 256`` walks 5,000 merged directories over 3 lowers and
  then creates files and directories: every fd cache has a budget and evicts, and an open
  that meets EMFILE empties the caches and retries instead of failing.
- With the caller's cwd inside the mount, every operation on a legal 4095-byte relative
  path works, though the daemon's path from the mount root is longer than PATH_MAX: with
  the deep chain made through the mount, and with it in a lower (copy-up of deep
  ancestors); same results and same trees as the kernel's overlay. So does a path of
  2,045 components (no recursion per level).
- A creation that fails after its object was made (an injected EIO on its chown) leaves
  nothing in any layer, at a deep path and at a short one; a failed rename leaves no
  redirect behind.
- Without root (``-m "not mount"``): the budget and the raised limit, the lookup cache
  bounded by the fds it holds, the EMFILE fallback, an ``OverlayFS`` walking a thousand
  directories at a 128-fd limit, and long layer paths that never leave the layer.
"""
from __future__ import annotations

import errno
import gc
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import helpers
from upper_support import NOBODY, child_python, stack_options, work_leftovers

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------
# Deep paths: a cwd two levels down, and below it 20 components of 200 bytes plus a leaf
# name, 4095 bytes in all; the daemon sees 401 + 1 + 4095 bytes from the mount root.
# --------------------------------------------------------------------------------------
COMP = 200


def comp(i: int) -> str:
    return f"c{i:02d}".ljust(COMP, "x")


CWD = [comp(0), comp(1)]
CHAIN = [comp(i) for i in range(2, 22)]
LEAF = 4095 - len("/".join(CHAIN)) - 1


def leaf(tag: str) -> str:
    return tag.ljust(LEAF, "_")


def short(path: str) -> str:
    """A deep path for messages: long components abbreviated."""
    return "/".join(p[:3] + "…" if len(p) > 40 else p for p in path.split("/"))


def open_deep(root: os.PathLike | str, parts: list[str], flags: int = os.O_RDONLY | os.O_DIRECTORY) -> int:
    """An fd of ``root/parts...``, walked one component at a time (no path over PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for part in parts:
        try:
            nfd = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def make_chain(root: os.PathLike | str, parts: list[str], *, files: dict[str, bytes] = {},
               dirs: tuple[str, ...] = (), mode: int = 0o755) -> None:
    """mkdir ``root/parts...`` one level at a time; files and dirs in the last one."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            os.mkdir(part, 0o755, dir_fd=fd)
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        for name, data in files.items():
            f = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=fd)
            os.write(f, data)
            os.close(f)
        for name in dirs:
            os.mkdir(name, 0o755, dir_fd=fd)
        os.chmod(fd, mode)
    finally:
        os.close(fd)


def fd_snapshot(fd: int, *, xattrs: bool = False) -> dict[str, tuple]:
    """Everything below the directory ``fd`` by relative path, read through fds only."""
    out: dict[str, tuple] = {}

    def visit(dfd: int, rel: str) -> None:
        for name in sorted(os.listdir(dfd)):
            path = f"{rel}/{name}" if rel else name
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            kind = stat.S_IFMT(st.st_mode)
            content = target = rdev = size = None
            if stat.S_ISREG(st.st_mode):
                f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    content = os.read(f, 1 << 16)
                finally:
                    os.close(f)
                size = st.st_size
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=dfd)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[path] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, content,
                         target, rdev)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    visit(sub, path)
                finally:
                    os.close(sub)

    visit(fd, "")
    return out


def snapshot_of(root: os.PathLike | str) -> dict[str, tuple]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return fd_snapshot(fd)
    finally:
        os.close(fd)


def tree_diff(a: dict, b: dict, names=("overlaypc", "kernel")) -> str:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{short(k)}:\n   {names[0]}: {a.get(k)}\n   {names[1]}: {b.get(k)}")
    return "\n".join(lines)


#: Run in a child: chdir into the mount one component at a time, then each step on a path
#: relative to that cwd; prints [[step, errno or 0], ...].
OPS_SCRIPT = r"""
import json, os, stat, sys
root, spec = sys.argv[1], json.loads(sys.argv[2])
os.umask(0o022)
os.chdir(root)
results = []

def step(name, fn):
    try:
        fn()
        results.append([name, 0])
    except OSError as e:
        results.append([name, e.errno])

for c in spec["cwd"]:
    if spec["build"]:
        step("mkdir-cwd", lambda: os.mkdir(c, 0o755))
    os.chdir(c)
chain = spec["chain"]
if spec["build"]:
    for i in range(1, len(chain) + 1):
        step("mkdir-chain", lambda: os.mkdir("/".join(chain[:i]), 0o755))
P = "/".join(chain)

def n(tag):
    path = P + "/" + tag.ljust(spec["leaf"], "_")
    assert len(os.fsencode(path)) == spec["length"], len(os.fsencode(path))
    return path

def write_new(path, data):
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)

def rewrite(path):
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"OPENED", 0)
        if os.pread(fd, 6, 0) != b"OPENED":
            raise OSError(0, "read back wrong data")
    finally:
        os.close(fd)

def check_stat(path, kind):
    if stat.S_IFMT(os.lstat(path).st_mode) != kind:
        raise OSError(0, "wrong type")

if spec["build"]:  # what the lower-chain variant finds in its lower
    step("setup-data", lambda: write_new(n("data"), b"lower data\n"))
    step("setup-gone", lambda: write_new(n("gone"), b"gone\n"))
    step("setup-ldir", lambda: os.mkdir(n("ldir"), 0o755))
step("create", lambda: write_new(n("create"), b"created\n"))
step("mkdir", lambda: os.mkdir(n("mkdir"), 0o750))
step("mkfifo", lambda: os.mkfifo(n("fifo"), 0o620))
step("mknod", lambda: os.mknod(n("chr"), stat.S_IFCHR | 0o600, os.makedev(1, 7)))
step("open", lambda: rewrite(n("data")))
step("symlink", lambda: os.symlink("../target", n("symlink")))
step("link", lambda: os.link(n("create"), n("link")))
step("rename", lambda: os.rename(n("data"), n("renamed")))
step("chmod", lambda: os.chmod(n("renamed"), 0o604))
step("chown", lambda: os.chown(n("renamed"), 1234, 5678))
step("truncate", lambda: os.truncate(n("renamed"), 3))
step("stat", lambda: check_stat(n("renamed"), stat.S_IFREG))
step("readlink", lambda: os.readlink(n("symlink")))
step("unlink", lambda: os.unlink(n("link")))
step("unlink-lower", lambda: os.unlink(n("gone")))
step("rmdir", lambda: os.rmdir(n("mkdir")))
step("rmdir-lower", lambda: os.rmdir(n("ldir")))
listing = {}
try:
    for name in sorted(os.listdir(P)):  # what the deepest directory shows afterwards
        st = os.lstat(P + "/" + name)
        data = None
        if stat.S_ISREG(st.st_mode):
            with open(P + "/" + name, "rb") as f:
                data = f.read().decode()
        elif stat.S_ISLNK(st.st_mode):
            data = os.readlink(P + "/" + name)
        listing[name] = [st.st_mode, st.st_uid, st.st_gid, st.st_size, data]
except OSError as e:
    results.append(["listing", e.errno])
print(json.dumps({"results": results, "listing": listing}))
"""


def run_ops(mnt: Path, *, build: bool, chain: list[str] = CHAIN, cwd: list[str] = CWD,
            leaf_len: int = LEAF, length: int = 4095) -> tuple[list[list], dict]:
    """The steps' results ([name, errno or 0]) and the deepest directory's listing after."""
    spec = {"cwd": cwd, "chain": chain, "build": build, "leaf": leaf_len, "length": length}
    r = subprocess.run([sys.executable, "-c", OPS_SCRIPT, str(mnt), json.dumps(spec)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"ops child failed:\n{r.stderr}"
    out = json.loads(r.stdout)
    return out["results"], out["listing"]


def failures(results: list[list]) -> list[str]:
    return [f"{name}: {errno.errorcode.get(code, code)}" for name, code in results if code]


def deep_lower(root: Path) -> None:
    make_chain(root, CWD + CHAIN, files={leaf("data"): b"lower data\n", leaf("gone"): b"gone\n"},
               dirs=(leaf("ldir"),))


@pytest.mark.parametrize("chain_in", ["upper", "lower"])
def test_every_op_on_a_4095_byte_relative_path(chain_in, layers_factory, overlay_mount, kernel_mount):
    """cwd two levels down, each op on a 4095-byte path relative to it (the daemon's path
    from the root is 4497 bytes); the chain made through the mount, or found in a lower
    (every op then copies up 22 deep ancestors first). Same per-op results, merged tree
    and upper tree as the kernel's overlay."""
    assert len(os.fsencode("/".join(CHAIN) + "/" + leaf("x"))) == 4095
    results, merged, uppers = {}, {}, {}
    for side in ("overlaypc", "kernel"):
        lower = layers_factory.empty_dir(f"{side}-lower")
        upper = layers_factory.empty_dir(f"{side}-upper")
        work = layers_factory.empty_dir(f"{side}-work")
        if chain_in == "lower":
            deep_lower(lower)
        if side == "overlaypc":
            mnt = overlay_mount(stack_options([lower], upper, work)).path
        else:
            mnt = kernel_mount([lower], upper, work)
        results[side], _ = run_ops(mnt, build=chain_in == "upper")
        assert not failures(results[side]), f"{side}: failed steps {failures(results[side])}"
        merged[side] = snapshot_of(mnt)
        uppers[side] = snapshot_of(upper)
        if side == "overlaypc":
            assert work_leftovers(work) == []
    assert results["overlaypc"] == results["kernel"]
    assert merged["overlaypc"] == merged["kernel"], tree_diff(merged["overlaypc"], merged["kernel"])
    assert uppers["overlaypc"] == uppers["kernel"], tree_diff(uppers["overlaypc"], uppers["kernel"])
    deep = "/".join(CWD + CHAIN) + "/"
    kinds = {k[len(deep):]: v[0] for k, v in merged["overlaypc"].items() if k.startswith(deep)}
    assert kinds == {leaf("create"): stat.S_IFREG, leaf("fifo"): stat.S_IFIFO,
                     leaf("chr"): stat.S_IFCHR, leaf("symlink"): stat.S_IFLNK,
                     leaf("renamed"): stat.S_IFREG}
    assert merged["overlaypc"][deep + leaf("renamed")][1:6] == (0o604, 1234, 5678, 3, b"OPE")


#: Remove trees of any depth (a child chdirs down: no recursion, no fd per level). pytest's
#: own clean-up of old temporary dirs (``shutil.rmtree``) recurses per level and would fail
#: on them, in every later session.
RMTREE_SCRIPT = r"""
import os, sys
for top in sys.argv[1:]:
    if not os.path.isdir(top):
        continue
    os.chdir(top)
    names = []
    while True:
        sub = None
        with os.scandir(".") as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    sub = e.name
                    break
                os.unlink(e.name)
        if sub is not None:
            os.chdir(sub)
            names.append(sub)
        elif names:
            os.chdir("..")
            os.rmdir(names.pop())
        else:
            break
    os.chdir("/")
    os.rmdir(top)
"""


@pytest.fixture
def deep_trees(tmp_path):
    """A list to add directories to; they are removed, however deep, after the test and its
    mounts are gone (request this fixture before the mount fixtures), and before pytest
    removes ``tmp_path`` (whose ``shutil.rmtree`` recurses per level: set up first, so torn
    down last)."""
    roots: list[Path] = []
    yield roots
    subprocess.run([sys.executable, "-c", RMTREE_SCRIPT, *map(str, roots)], check=True, timeout=300)


def test_2045_component_relative_path(deep_trees, layers_factory, overlay_mount, kernel_mount):
    """A 4095-byte relative path of 2,044 one-byte directories and a leaf name, below a
    cwd two levels down, all in a lower: the daemon walks and copies up 2,047 levels
    (neither lookup nor copy-up may recurse per level). Same results as the kernel's."""
    chain = ["d"] * 2044
    leaf_len = 4095 - len("/".join(chain)) - 1
    assert leaf_len == len("symlink")
    results, listings = {}, {}
    for side in ("overlaypc", "kernel"):
        lower = layers_factory.empty_dir(f"{side}-lower")
        upper = layers_factory.empty_dir(f"{side}-upper")
        work = layers_factory.empty_dir(f"{side}-work")
        deep_trees += [lower, upper, work]
        make_chain(lower, ["a", "b"] + chain, files={"data".ljust(leaf_len, "_"): b"lower data\n",
                                                     "gone".ljust(leaf_len, "_"): b"gone\n"},
                   dirs=("ldir".ljust(leaf_len, "_"),))
        if side == "overlaypc":
            mnt = overlay_mount(stack_options([lower], upper, work) + ",volatile").path
        else:
            mnt = kernel_mount([lower], upper, work)
        results[side], listings[side] = run_ops(mnt, build=False, cwd=["a", "b"], chain=chain,
                                                leaf_len=leaf_len)
        assert not failures(results[side]), f"{side}: failed steps {failures(results[side])}"
    assert results["overlaypc"] == results["kernel"]
    assert listings["overlaypc"] == listings["kernel"]
    assert sorted(n.rstrip("_") for n in listings["overlaypc"]) == ["chr", "create", "fifo", "renamed", "symlink"]


#: As NOBODY, from a cwd given as components: each creation of a name containing
#: "notrace" must fail (the daemon's chown of it is made to fail with EIO).
NOTRACE_SCRIPT = r"""
import json, os, sys
cwd, prefix = json.loads(sys.argv[1]), sys.argv[2]
for c in cwd:  # from the mount root (the child's cwd)
    os.chdir(c)
out = {}
for what, fn in (("mkdir", lambda p: os.mkdir(p, 0o755)),
                 ("create", lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))),
                 ("mkfifo", lambda p: os.mkfifo(p, 0o644)),
                 ("symlink", lambda p: os.symlink("target", p))):
    try:
        fn(prefix + f"notrace-{what}")
        out[what] = 0
    except OSError as e:
        out[what] = e.errno
print(json.dumps(out))
"""


@pytest.mark.parametrize("depth", ["deep", "short"])
def test_failed_creation_leaves_no_trace(depth, layers_factory, overlay_mount):
    """mkdir, create, mkfifo and symlink by a non-root caller whose chown fails (injected
    EIO): each reports the error, and nothing of it is left in the upper or the workdir,
    nor visible through the mount. (Such objects are built in workdir/work, so that a kill
    -9 never leaves one the daemon's: the chown there is the one that fails.)"""
    lower = layers_factory.empty_dir("lower")
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    parts = CWD + CHAIN if depth == "deep" else ["pub"]
    make_chain(lower, parts, mode=0o777)
    m = overlay_mount(stack_options([lower], upper, work),
                      env={"OVERLAYPC_FAULTS": "layer.chown~#ovlpc-new=eio"})
    cwd, prefix = (CWD, "/".join(CHAIN) + "/") if depth == "deep" else (["pub"], "")
    r = subprocess.run([child_python(), "-c", NOTRACE_SCRIPT, json.dumps(cwd), prefix],
                       cwd=m.path, capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: (os.setgroups([]), os.setgid(NOBODY), os.setuid(NOBODY)))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"mkdir": errno.EIO, "create": errno.EIO, "mkfifo": errno.EIO,
                   "symlink": errno.EIO}
    for root in (upper, m.path):
        names = [k for k in snapshot_of(root) if "notrace" in k]
        assert names == [], f"left in {root}: {[short(n) for n in names]}"
    assert work_leftovers(work) == []


def test_failed_rename_leaves_no_mark(layers_factory, overlay_mount):
    """A rename of a lower directory sets a redirect on its upper copy before the move; when
    the move fails (injected EIO), the copy keeps no redirect (the copy-up itself stays, as
    on the kernel's overlay)."""
    layers = layers_factory({"lower": {"pub/ldir/f": "f\n"}})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(stack_options(layers.paths, upper, work),
                      env={"OVERLAYPC_FAULTS": "layer.rename~notrace=eio"})
    with pytest.raises(OSError) as e:
        os.rename(m.path / "pub" / "ldir", m.path / "pub" / "notrace-moved")
    assert e.value.errno == errno.EIO
    assert (upper / "pub" / "ldir").is_dir()
    assert [x for x in os.listxattr(upper / "pub" / "ldir") if x.endswith(".redirect")] == []
    assert sorted(os.listdir(m.path / "pub")) == ["ldir"]
    assert (m.path / "pub" / "ldir" / "f").read_text() == "f\n"
    assert work_leftovers(work) == []


# --------------------------------------------------------------------------------------
# Open files that copy-ups switch, under a low fd limit (mounted)
# --------------------------------------------------------------------------------------
def test_150_open_files_renamed_under_them_at_256_fds(layers_factory, overlay_mount):
    """The daemon runs under ``ulimit -n 256`` with 150 lower files open read-only through
    the mount (what open files may hold there: ``FdBudget.open_files``); each is then
    renamed (a copy-up: its handle follows the copy), and every open file still reads its
    data. A handle kept the fd it replaced until its release, so the daemon needed 300 fds
    and the reads, renames and opens failed with EMFILE (hunt7: 900 files open at
    ``ulimit -n 1024`` while another process renamed them)."""
    lower = layers_factory.empty_dir("lower")
    for i in range(10):
        for j in range(15):
            helpers.build_layer(lower, {f"d{i}/f{j}": f"{i}/{j}\n"})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(stack_options([lower], upper, work), nofile=256)
    fds = {}
    try:
        for i in range(10):
            for j in range(15):
                fds[(i, j)] = os.open(m.path / f"d{i}" / f"f{j}", os.O_RDONLY)
        for (i, j) in fds:
            os.rename(m.path / f"d{i}" / f"f{j}", m.path / f"d{i}" / f"g{j}")
        for (i, j), fd in fds.items():
            assert os.pread(fd, 100, 0) == f"{i}/{j}\n".encode()
            assert os.fstat(fd).st_size == len(f"{i}/{j}\n")
    finally:
        for fd in fds.values():
            os.close(fd)
    assert sorted(os.listdir(m.path / "d3")) == sorted(f"g{j}" for j in range(15))


# --------------------------------------------------------------------------------------
# Many directories under a low fd limit (mounted)
# --------------------------------------------------------------------------------------
TOPS, SUBS = 50, 99  # 50 + 50 * 99 = 5,000 directories, each in all three lowers


def test_walk_5000_dirs_over_3_lowers_at_256_fds(layers_factory, overlay_mount):
    """The daemon runs under ``ulimit -n 256``: a full walk (listdir and lstat of every
    entry) of 5,000 directories merged from 3 lowers, then creations of files and
    directories across the tree, then the walk again."""
    lowers = [layers_factory.empty_dir(f"lower{i}") for i in range(3)]
    for i, low in enumerate(lowers):
        for t in range(TOPS):
            for s_ in range(SUBS):
                os.makedirs(low / f"t{t:02d}" / f"s{s_:02d}")
            (low / f"t{t:02d}" / f"f{i}").write_text(f"{i}\n")
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(stack_options(lowers, upper, work), nofile=256)

    def walk() -> int:
        dirs = 0

        def fail(e: OSError) -> None:
            raise e

        for dirpath, dirnames, filenames in os.walk(m.path, onerror=fail):
            dirs += 1
            assert sorted(os.listdir(dirpath)) == sorted(dirnames + filenames)
            for name in dirnames + filenames:
                os.lstat(os.path.join(dirpath, name))
        return dirs

    assert walk() == 1 + TOPS + TOPS * SUBS
    for t in range(0, TOPS, 3):
        top = m.path / f"t{t:02d}"
        (top / "new").mkdir()
        (top / "new" / "file").write_text(f"new {t}\n")
        (top / f"s{t:02d}" / "file").write_text(f"sub {t}\n")
        os.rename(top / "f0", top / "f0-renamed")
        os.rmdir(top / "s98")
    for t in range(0, TOPS, 3):
        top = m.path / f"t{t:02d}"
        assert (top / "new" / "file").read_text() == f"new {t}\n"
        assert (top / f"s{t:02d}" / "file").read_text() == f"sub {t}\n"
        assert (top / "f0-renamed").read_text() == "0\n"
        assert (upper / f"t{t:02d}" / "new" / "file").read_text() == f"new {t}\n"
    assert walk() == 1 + TOPS + TOPS * SUBS  # in each top changed: one dir made, one removed


# --------------------------------------------------------------------------------------
# Without root: the budget, the lookup cache, the EMFILE fallback, long layer paths
# --------------------------------------------------------------------------------------
def _child(code: str, nofile: tuple[int, int] | None = None, setup: str = "") -> str:
    """Run ``setup`` then ``code`` (dedented) in a child Python with this checkout's
    package, optionally under an fd limit; return its stdout."""
    prelude = "import resource\n"
    if nofile:
        prelude += f"resource.setrlimit(resource.RLIMIT_NOFILE, {nofile!r})\n"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", prelude + setup + textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_budget_splits_the_limit():
    from overlaypc.fdbudget import LOOKUP_CAP, SHARING_CAP, FdBudget
    for limit in (32, 64, 256, 1024, 4096, 20000, 1 << 20):
        b = FdBudget.from_limit(limit)
        assert b.lookup + 2 * b.sharing + b.reserve == limit
        assert 1 <= b.lookup <= min(limit // 2, LOOKUP_CAP) or limit < 2
        assert 1 <= b.sharing <= SHARING_CAP
        assert b.reserve >= limit * 3 // 8, b  # open files keep at least 3/8 of the limit
    assert FdBudget.from_limit(1024).lookup == 512


def test_core_reserves_fds_for_the_workers_it_is_told_of_and_imports_no_engine(tmp_path):
    """The open-file bound keeps ``PER_REQUEST + 1`` fds per worker thread: ``OverlayFS``
    is told how many (the mount passes the engine's bound); the core is driven without
    the engine and imports none of it (hunt8a's bound imported ``engine.pool``)."""
    lower = tmp_path / "lower"
    lower.mkdir()
    out = _child(f"""
        import sys
        from overlaypc.config import MountConfig, validate
        from overlaypc.core import OverlayFS
        from overlaypc.fdbudget import PER_REQUEST
        print(sorted(m for m in sys.modules if m.startswith("overlaypc.engine")))
        cfg = MountConfig(lowers=[{str(lower)!r}], mountpoint={str(tmp_path)!r})
        validate(cfg)
        bounds = []
        for workers in (4, 6):
            fs = OverlayFS(cfg, workers=workers)
            bounds.append(fs.open_file_fds)
            fs.close()
        print(bounds[0] - bounds[1] == 2 * (PER_REQUEST + 1))
    """, nofile=(1024, 1024))
    assert out.split("\n")[:2] == ["[]", "True"]


def test_raise_limit_lifts_soft_to_hard():
    out = _child("""
        from overlaypc import fdbudget
        print(fdbudget.raise_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))
        print(fdbudget.FdBudget.for_process().lookup)
    """, nofile=(100, 800))
    assert out.split("\n")[:2] == ["800 (800, 800)", "400"]


def _wide_layers(base: Path, layers: int, dirs: int) -> list[Path]:
    out = []
    for i in range(layers):
        root = base / f"layer{i}"
        for d in range(dirs):
            (root / f"d{d:04d}" / "sub").mkdir(parents=True)
        out.append(root)
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_lookup_cache_is_bounded_by_the_fds_it_holds(tmp_path):
    from overlaypc.lookup import Lookup
    from overlaypc.stack import LayerStack
    roots = _wide_layers(tmp_path, 3, 200)
    stack = LayerStack([str(r) for r in roots], None, None)
    try:
        gc.collect()
        before = _open_fds()
        lookup = Lookup(stack, "trusted.overlay.", max_fds=30)
        for d in range(200):
            node = lookup.directory(f"d{d:04d}/sub")
            assert len(node.entries) == 3
        del node
        gc.collect()
        assert lookup.cached_fds <= 30
        assert _open_fds() - before <= 30
        assert len(lookup) <= 10  # three fds per directory
        # the most recently used are kept; an evicted one is looked up again
        assert lookup._cached("d0199/sub") is not None
        assert lookup._cached("d0000/sub") is None
        assert len(lookup.directory("d0000/sub").entries) == 3
        assert lookup.shed_fds() > 0 and lookup.cached_fds == 0
        gc.collect()
        assert _open_fds() == before
    finally:
        stack.close()


def test_emfile_empties_the_caches_and_retries(tmp_path):
    """The lookup cache's budget is computed from a limit that other fds then eat up (here
    dup'ed ones): the walk meets EMFILE, empties the cache and goes on."""
    roots = _wide_layers(tmp_path, 3, 150)
    out = _child(f"""
        import os
        from overlaypc.lookup import Lookup
        from overlaypc.stack import LayerStack
        stack = LayerStack({[str(r) for r in roots]!r}, None, None)
        lookup = Lookup(stack, "trusted.overlay.")  # budget: half of 256
        hog = []
        try:
            while True:
                hog.append(os.dup(0))
        except OSError:
            pass
        for fd in hog[:40]:  # leave 40 fds free: fewer than the cache's budget
            os.close(fd)
        for d in range(150):
            assert len(lookup.directory(f"d{{d:04d}}/sub").entries) == 3
            assert len(lookup.directory(f"d{{d:04d}}").entries) == 3
        print("ok", lookup.max_fds)
    """, nofile=(256, 256))
    assert out.split() == ["ok", "128"]


def test_overlayfs_walks_a_thousand_dirs_at_128_fds(tmp_path):
    """``OverlayFS`` without FUSE, read-only over 3 lowers, under a 128-fd limit: getattr,
    readdir and a file read in each of 1,000 directories."""
    roots = _wide_layers(tmp_path, 3, 500)
    (roots[1] / "d0000" / "f").write_text("x\n")
    out = _child(f"""
        import os
        from overlaypc.config import MountConfig, validate
        from overlaypc.core import OverlayFS
        cfg = MountConfig(lowers={[str(r) for r in roots]!r}, mountpoint={str(tmp_path)!r})
        validate(cfg)
        fs = OverlayFS(cfg)
        fs.start()
        n = 0
        for d in range(500):
            for rel in (f"d{{d:04d}}", f"d{{d:04d}}/sub"):
                fs.getattr(rel)
                fs.readdir(rel, plus=True)
                n += 1
        h = fs.open("d0000/f", os.O_RDONLY)
        assert fs.read(h.fh, 10, 0) == b"x\\n"
        fs.release(h.fh)
        fs.close()
        print(n)
    """, nofile=(128, 128))
    assert out.strip() == "1000"


def test_layer_paths_longer_than_path_max(tmp_path):
    """A writable ``Layer`` acts on paths of 6,000+ bytes (walked in steps), and a symlink
    at any depth of such a path, at every step boundary included, is never followed."""
    from overlaypc.layer import Layer, do_rename
    root = tmp_path / "layer"
    root.mkdir()
    parts = [comp(i) for i in range(30)]  # 30 * 201 - 1 = 6029 bytes
    make_chain(root, parts, files={"f": b"data"})
    deep = "/".join(parts)
    layer = Layer(str(root), 0, writable=True)
    try:
        assert layer.lstat(deep + "/f").st_size == 4
        layer.do_mkdir(deep + "/new", 0o700)
        fd = layer.do_create(deep + "/new/file", os.O_WRONLY | os.O_EXCL, 0o600)
        os.write(fd, b"hello")
        os.close(fd)
        do_rename(layer, deep + "/new/file", layer, deep + "/moved")
        layer.do_chmod(deep + "/moved", 0o640)
        layer.do_truncate(deep + "/moved", 2)
        layer.do_symlink("t", deep + "/ln")
        assert layer.readlink(deep + "/ln") == "t"
        assert sorted(n for n, _ in layer.listdir(deep)) == sorted(["f", "new", "moved", "ln"])
        st = layer.lstat(deep + "/moved")
        assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o640, 2)
        layer.do_unlink(deep + "/moved")
        layer.do_rmdir(deep + "/new")
        assert layer.lstat(deep + "/new") is None

        outside = tmp_path / "outside"
        outside.mkdir()
        for k in range(1, len(parts)):
            head = "/".join(parts[:k])
            fd = open_deep(root, parts[:k])
            try:
                os.symlink(str(outside), "abs", dir_fd=fd)
                os.symlink("../" * (k + 2) + "outside", "rel", dir_fd=fd)
            finally:
                os.close(fd)
            for link in ("abs", "rel"):
                # the link as an intermediate component, long path or short
                tail = "/".join([link] + parts[k:]) if k < len(parts) else link
                assert layer.lstat(f"{head}/{link}/x") is None
                assert layer.lstat(f"{head}/{tail}") is None
                with pytest.raises(OSError):
                    layer.do_mkdir(f"{head}/{tail}/made", 0o755)
                with pytest.raises(OSError):
                    layer.do_mkdir(f"{head}/{link}/made", 0o755)
        assert os.listdir(outside) == []
    finally:
        layer.close()


def test_steps_cut_long_paths_between_components():
    from overlaypc.layer import STEP_BYTES, steps
    for path in ("/".join(comp(i) for i in range(30)) + "/f", "/".join(["d"] * 5000),
                 "é" * 120 + "/" + "/".join(["ü" * 127] * 40), "short/path"):
        pieces = steps(path)
        assert "/".join(pieces) == path
        assert all(0 < len(os.fsencode(p)) <= STEP_BYTES for p in pieces)
        assert len(pieces) == -(-len(os.fsencode(path)) // (STEP_BYTES + 1)) or len(pieces) > 1


# --------------------------------------------------------------------------------------
# A client holding as many files as the daemon's limit allows (mounted)
# --------------------------------------------------------------------------------------
def test_files_held_to_the_limit_leave_other_requests_their_fds(layers_factory, overlay_mount):
    """The daemon runs under ``ulimit -n 256``; a client opens lower files until an open
    fails. That open fails with ENFILE (the daemon's open files have their share), and
    every other request still has the fds it needs: copy-ups (chmod, truncate, rename),
    mkdir, listings of directories not looked up yet, hard links; the held files read
    right, and once they are closed opens work again. Open files took every fd, so all of
    those failed with EMFILE (hunt8a: 1,009 files held through a daemon at 1024)."""
    lower = layers_factory.empty_dir("lower")
    helpers.build_layer(lower, {**{f"held/f{i:03d}": f"{i}\n" for i in range(300)},
                                **{f"other/d{i}/f": f"other {i}\n" for i in range(20)}})
    upper = layers_factory.empty_dir("upper")
    work = layers_factory.empty_dir("work")
    m = overlay_mount(stack_options([lower], upper, work), nofile=256)
    held: list[int] = []
    refused = None
    try:
        for i in range(300):
            try:
                held.append(os.open(m.path / "held" / f"f{i:03d}", os.O_RDONLY))
            except OSError as e:
                refused = e.errno
                break
        assert refused is not None, "300 files opened through a daemon limited to 256 fds"
        other = m.path / "other"
        done = []
        for i in range(20):
            d = other / f"d{i}"
            assert os.listdir(d) == ["f"]
            os.chmod(d / "f", 0o600)            # a copy-up (data and all: metacopy is off)
            os.truncate(d / "f", 3)
            os.link(d / "f", d / "g")
            os.rename(d / "g", d / "h")
            os.mkdir(d / "new")
            done.append(i)
        assert done == list(range(20))
        assert (upper / "other" / "d7" / "h").read_text() == "oth"
        assert refused == errno.ENFILE, errno.errorcode[refused]
        for i, fd in enumerate(held):
            assert os.pread(fd, 10, 0) == f"{i}\n".encode()
    finally:
        for fd in held:
            os.close(fd)
    assert (m.path / "held" / "f299").read_text() == "299\n"


def test_a_walk_at_the_fd_limit_waits_for_another_to_let_go(tmp_path):
    """Two walks down directories merged across 60 layers, with room for one: the second
    meets EMFILE while the first's directory is held, lets go of what it opened and waits
    (``fdbudget.patiently``) until the first lets go, then answers (walk17: lookups at
    once of such directories answered EMFILE). The holder lets go only once the waiting
    walk has met the limit (its cache emptying is the signal), so the wait is exercised."""
    roots = _wide_layers(tmp_path, 60, 2)
    out = _child(f"""
        import os, threading
        from overlaypc import fdbudget
        from overlaypc.lookup import Lookup
        from overlaypc.stack import LayerStack
        stack = LayerStack({[str(r) for r in roots]!r}, None, None)
        lookup = Lookup(stack, "trusted.overlay.", max_fds=16)

        met = threading.Event()
        class Signal:  # a registered cache: emptied when a walk meets the limit, once by
            calls = 0  # ``retrying``, then by each try of a waiting walk
            def shed_fds(self):
                Signal.calls += 1
                if Signal.calls >= 2:
                    met.set()
                return 0
        signal = Signal()
        fdbudget.register(signal)
        held = [lookup.directory("d0000/sub")]  # 120 fds: the walk's, then the node's 60
        assert len(held[0].entries) == 60
        hog = []
        try:
            while True:
                hog.append(os.dup(0))
        except OSError:
            pass
        for fd in hog[:100]:  # room for one walk (120), not while another's 60 are held
            os.close(fd)
        result = []
        def walk():
            try:
                result.append(len(lookup.directory("d0001/sub").entries))
            except OSError as e:
                result.append(os.strerror(e.errno))
            met.set()
        walker = threading.Thread(target=walk)
        walker.start()
        met.wait(60)
        held.clear()  # the first operation is done: its fds close
        walker.join()
        print(result[0], Signal.calls >= 2)
    """, nofile=(512, 512))
    assert out.strip() == "60 True"


def test_patiently_tries_again_until_fds_are_free_and_then_gives_up():
    """``patiently``: EMFILE/ENFILE are tried again, other errors at once; past its wait
    it fails with EMFILE."""
    import errno

    from overlaypc.fdbudget import patiently
    tries = []

    def short(n: int, code: int):
        def fn() -> str:
            tries.append(code)
            if len(tries) <= n:
                raise OSError(code, "no")
            return "done"
        return fn

    assert patiently(short(3, errno.EMFILE), seconds=30) == "done" and len(tries) == 4
    tries.clear()
    assert patiently(short(2, errno.ENFILE), seconds=30) == "done" and len(tries) == 3
    tries.clear()
    with pytest.raises(FileNotFoundError):
        patiently(short(3, errno.ENOENT), seconds=30)
    assert len(tries) == 1
    tries.clear()
    with pytest.raises(OSError) as e:
        patiently(short(10 ** 9, errno.EMFILE), seconds=0.05)
    assert e.value.errno == errno.EMFILE and len(tries) > 1


def test_a_lookup_waiting_for_the_namespace_lock_holds_no_walk_fds(tmp_path):
    """A LOOKUP of a directory merged across 60 layers that waits for the namespace lock
    (``OverlayOps._take`` registers the node under it) holds none of the directory's fds
    meanwhile: the lock's holder may be a change that looks another such directory up at
    the fd limit and waits for fds (``fdbudget.patiently``), which the LOOKUP would then
    hold until the wait gave up (review19: the holder answered EMFILE after the whole wait,
    every other change stalled behind it)."""
    roots = _wide_layers(tmp_path, 60, 2)
    (tmp_path / "mnt").mkdir()
    out = _child(f"""
        import os, threading
        from overlaypc import fdbudget
        from overlaypc.config import MountConfig, validate
        from overlaypc.core import OverlayFS
        from overlaypc.engine.ops import Request
        from overlaypc.overlay_ops import OverlayOps
        fdbudget.WAIT_SECONDS = 1.0  # (the holder's wait: EMFILE after it on failure)
        cfg = MountConfig(lowers={[str(r) for r in roots]!r}, mountpoint={str(tmp_path / "mnt")!r})
        validate(cfg)
        fs = OverlayFS(cfg)
        fs.start()
        ops = OverlayOps(fs)
        lock = fs.ns_lock
        waiting = threading.Event()
        class Watched:  # the namespace lock, telling when the LOOKUP's thread waits for it
            def __enter__(self):
                if threading.current_thread() is not threading.main_thread():
                    waiting.set()
                return lock.__enter__()
            def __exit__(self, *exc):
                return lock.__exit__(*exc)
        fs.ns_lock = Watched()
        result = []
        def look():
            try:
                result.append(ops.lookup(Request(0, 0, os.getpid()), 1, b"d0000").nodeid > 0)
            except OSError as e:
                result.append(os.strerror(e.errno))
        with lock:  # a change's hold
            looker = threading.Thread(target=look)
            looker.start()
            assert waiting.wait(60)
            hog = []
            try:
                while True:
                    hog.append(os.dup(0))
            except OSError:
                pass
            for fd in hog[:30]:  # a walk of 60 fits once the LOOKUP's 60 are let go
                os.close(fd)
            try:
                found = len(fs.lookup.lookup("d0001").entries)
            except OSError as e:
                found = os.strerror(e.errno)
            for fd in hog[30:]:
                os.close(fd)
        looker.join()
        print(found, result[0])
    """, nofile=(400, 400))
    assert out.strip() == "60 True"


def test_a_listing_at_the_fd_limit_waits_once_not_once_per_level(tmp_path, monkeypatch):
    """A listing whose directory cannot be looked up at the fd limit waits at most
    ``WAIT_SECONDS`` in all: ``readdir`` waits (``patiently``) and so does each try's
    ``Lookup.directory`` inside it; the inner wait, in the outer one's turn, must not start
    a wait of its own (review19: 20 s of the clock, then EMFILE). The clock is a fake one
    that only sleeps advance, so the count is exact whatever the machine's load."""
    import errno
    import types

    from core_driver import CoreDriver
    from overlaypc import fdbudget

    clock = [0.0]
    monkeypatch.setattr(fdbudget, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    driver = CoreDriver.in_dir(tmp_path)
    try:
        def exhausted(rel: str):
            raise OSError(errno.EMFILE, "out of fds", rel)
        monkeypatch.setattr(driver.fs.lookup, "_directory", exhausted)
        with pytest.raises(OSError) as e:
            driver.fs.readdir("")
        assert e.value.errno == errno.EMFILE
        assert clock[0] <= fdbudget.WAIT_SECONDS + fdbudget.WAIT_STEP, clock[0]
    finally:
        driver.close()


def _fake_clock_core(tmp_path: Path, roots: list[Path], options: str = "") -> str:
    """Child code (``_child``'s ``setup``): ``fdbudget``'s clock a fake one that only its
    waits' sleeps advance (``clock[0]``), umask 0, and ``fs``, a started ``OverlayFS`` over
    ``roots`` with ``tmp_path``'s upper, work and mnt (``options``: more ``MountConfig``
    keywords, as code)."""
    return textwrap.dedent(f"""\
        import os, threading, types
        from overlaypc import fdbudget
        from overlaypc.config import MountConfig, validate
        from overlaypc.core import OverlayFS
        clock = [0.0]
        fdbudget.time = types.SimpleNamespace(
            monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s))
        os.umask(0)
        cfg = MountConfig(lowers={[str(r) for r in roots]!r}, upper={str(tmp_path / "upper")!r},
                          work={str(tmp_path / "work")!r}, mountpoint={str(tmp_path / "mnt")!r},
                          {options})
        validate(cfg)
        fs = OverlayFS(cfg)
        fs.start()
        """)


def test_a_change_at_the_fd_limit_does_not_wait_under_the_namespace_lock(tmp_path):
    """A change that holds the namespace lock and meets the fd limit fails with EMFILE at
    once: it does not wait for fds (``fdbudget.patiently``), which may be held by a thread
    waiting for that lock. Here a copy-up of a directory merged across 60 layers (a chmod)
    holds an fd in each while it waits to install its copy (``CopyUp._install``; the
    copy-up's callers keep its node too). Before (review19): the holder waited its whole
    time, every change behind it (a FUSE mount with 24 listings and 4 such chmods at once
    at the lowest admitted limit: a mkdir answered after 30-40 s). The clock is a fake one
    that only the wait's sleeps advance: it stays at 0 unless the holder waited."""
    roots = _wide_layers(tmp_path, 60, 2)
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    out = _child(f"""
        lock = fs.ns_lock
        waiting = threading.Event()
        class Watched:  # the namespace lock, telling when the copy-up's thread waits for it
            def __enter__(self):
                if threading.current_thread() is not threading.main_thread():
                    waiting.set()
                return lock.__enter__()
            def __exit__(self, *exc):
                return lock.__exit__(*exc)
        fs.ns_lock = fs.copyup.ns_lock = Watched()
        result = []
        def chmod():
            try:
                fs.chmod("d0000", 0o700)
                result.append("done")
            except OSError as e:
                result.append(os.strerror(e.errno))
        with lock:  # a change's hold
            changer = threading.Thread(target=chmod)
            changer.start()
            assert waiting.wait(60)
            hog = []
            try:
                while True:
                    hog.append(os.dup(0))
            except OSError:
                pass
            for fd in hog[:30]:  # a walk of 60 fits only once the copy-up's 60 are let go
                os.close(fd)
            try:
                found = len(fs.lookup.lookup("d0001").entries)
            except OSError as e:
                found = os.strerror(e.errno)
            for fd in hog[30:]:
                os.close(fd)
        changer.join()
        print(found, clock[0], result[0], oct(os.stat({str(tmp_path / "upper" / "d0000")!r}).st_mode & 0o777))
    """, nofile=(400, 400), setup=_fake_clock_core(tmp_path, roots))
    assert out.split() == ["Too", "many", "open", "files", "0.0", "done", "0o700"]


#: how the copy-up of a directory merged across 60 layers is asked for: the action's code
#: (``ops``, ``fs``, ``nodeid`` of d0000) and the upper path it makes
_COPY_UP_ASKS = {
    # refused under the namespace lock (``CopyUpFirst``), run after it: the refused call
    # kept the node looked up under the lock
    "refused": ("ops._at_node(nodeid, lambda rel: fs.chmod(rel, 0o700))", "d0000"),
    # the core's chmod, no lock held: the copy-up's call kept the node
    "chmod": ("fs.chmod('d0000', 0o700)", "d0000"),
    # a rename's copy-up of its source, which it had looked up to check it
    "rename": ("fs.rename('d0000', 'moved')", "moved"),
}


@pytest.mark.parametrize("how", sorted(_COPY_UP_ASKS))
def test_a_copy_up_holds_no_node_while_it_waits_for_fds(how, tmp_path):
    """A copy-up of a directory merged across 60 layers whose name is looked up again (the
    epoch moved meanwhile), outside the namespace lock, holds none of the node its caller
    looked up before while it waits for fds at the limit: it kept that node (one fd per
    layer), and the thread queued for the wait with them, so the thread whose turn it was,
    needing them, gave up after the whole wait with EMFILE (stall20). Here that thread is
    the main one, in its wait (it holds the turn) when the copy-up reaches its lookup; it
    goes on once the copy-up has queued for the turn or done its copy. The clock is a fake
    one that only the waits' sleeps advance."""
    act, made = _COPY_UP_ASKS[how]
    roots = _wide_layers(tmp_path, 60, 2)
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    out = _child(f"""
        from overlaypc.engine.ops import Request
        from overlaypc.overlay_ops import OverlayOps
        ops = OverlayOps(fs)
        main = threading.main_thread()
        at_copy, go, queued, copied, main_done = (threading.Event() for _ in range(5))
        turn = fdbudget._waiting
        mine = []  # the main thread holds the turn
        class Turn:  # ``fdbudget``'s turn, telling who waits for it
            def acquire(self, timeout=-1):
                if threading.current_thread() is main:
                    got = turn.acquire(timeout=timeout)
                    mine.append(got)
                    return got
                queued.set()
                return turn.acquire(timeout=timeout)
            def release(self):
                if threading.current_thread() is main:
                    mine.clear()
                turn.release()
        fdbudget._waiting = Turn()
        class Signal:  # a registered cache: emptied at each try of the main thread's wait
            def shed_fds(self):
                if mine and not go.is_set():
                    go.set()  # the copy-up goes on to its lookup, at the limit
                    while not (queued.wait(0.01) or copied.is_set()):
                        pass
                return 0
        signal = Signal()
        fdbudget.register(signal)
        copy_one = fs.copyup._copy_one
        def paused(*args, **kwargs):  # the copy-up's own step, after the namespace lock
            at_copy.set()
            go.wait(60)
            entry = copy_one(*args, **kwargs)
            copied.set()
            main_done.wait(60)
            return entry
        fs.copyup._copy_one = paused
        nodeid = ops.lookup(Request(0, 0, os.getpid()), 1, b"d0000").nodeid
        fs.lookup.shed_fds()
        before = len(os.listdir("/proc/self/fd"))
        result = []
        def chmod():
            try:
                {act}
                result.append("done")
            except OSError as e:
                result.append(os.strerror(e.errno))
        changer = threading.Thread(target=chmod)
        changer.start()
        assert at_copy.wait(60)  # refused under the lock (the node kept), run after it
        with fs.ns_lock:
            fs.lookup.changed()  # a change meanwhile: the copy-up looks the name up again
        fs.lookup.shed_fds()  # (that lookup walks: the cache's fds close with the node)
        held = len(os.listdir("/proc/self/fd")) - before  # the node the copy-up's thread holds
        hog = []
        try:
            while True:
                hog.append(os.dup(0))
        except OSError:
            pass
        free = 30 + 60 - held  # a walk of 60 fits only once what that thread holds is let go
        for fd in hog[:free]:
            os.close(fd)
        try:
            found = len(fs.lookup.lookup("d0001").entries)
        except OSError as e:
            found = os.strerror(e.errno)
        go.set()  # (if the main thread did not wait)
        main_done.set()
        for fd in hog[free:]:
            os.close(fd)
        changer.join()
        copy = os.path.join({str(tmp_path / "upper")!r}, {made!r})
        print(found, clock[0] < fdbudget.WAIT_SECONDS, result[0], os.path.isdir(copy))
    """, nofile=(400, 400), setup=_fake_clock_core(tmp_path, roots, 'redirect_dir="on"'))
    assert out.split() == ["60", "True", "done", "True"]
    if how != "rename":
        assert stat.S_IMODE((tmp_path / "upper" / made).stat().st_mode) == 0o700


#: requests that kept a node while they looked another name up or copied up, and may wait
#: for fds there (limits23): where the request is paused (an attribute of ``fs``, wrapped: the
#: lookup or copy-up that may wait), for which first argument (None: any), the request's
#: code, what it leaves in the upper (the path, and the mode bits it must not have), and
#: the fds of the node it kept; optionally (``_Holding``) more ``MountConfig`` keywords, code
#: run first (in the main thread), and the function the paused call must be made from
_HOLDING_ASKS = {
    # a rename between two directories merged across all layers: it held the old name's
    # node (an fd per layer) while it looked the new one up
    "rename": ("lookup.lookup", "d0001/moved", "fs.rename('d0000/sub', 'd0001/moved')",
               "d0001/moved", 0, 60),
    # a truncate's or chown's kill of privileges by path: it held the file's node (an fd
    # of its parent in its layer) during the copy-up (metadata only where allowed)
    "kill_privs": ("copyup.ensure_upper", None,
                   "fs.kill_privs('d0000/f', None, Writer(1000, 1000, os.getpid()))",
                   "d0000/f", stat.S_ISUID, 1),
    # a hard link of a lower file into another merged directory: it held the source's node
    # while it looked the new name up (and during the copy-up)
    "link": ("lookup.lookup", "d0001/f2", "fs.link('d0000/f', 'd0001/f2')", "d0001/f2", 0, 1),
    # an open for writing of a lower file: it held the file's node during the copy-up
    "open": ("copyup.ensure_data", None, "fs.release(fs.open('d0000/f', os.O_WRONLY).fh)",
             "d0000/f", 0, 1),
    # an open for writing of a metacopy file: ``CopyUp.ensure_data`` held the upper entry
    # ``_ensure`` gave (its parent's fd) while it looked the name up again (left26)
    "open_metacopy": ("lookup.lookup", "d0000/f", "fs.release(fs.open('d0000/f', os.O_WRONLY).fh)",
                      "d0000/f", 0, 1, 'metacopy=True', "fs.chmod('d0000/f', 0o4750)",
                      "ensure_data"),
    # a truncate by path of a metacopy file: ``CopyUp.ensure_data`` held the node the
    # truncate looked up (its upper's parent fd), boxed in its ``seen``, while it looked
    # the name up again (review28)
    "truncate_metacopy": ("lookup.lookup", "d0000/f", "fs.truncate('d0000/f', 2)",
                          "d0000/f", 0, 1, 'metacopy=True', "fs.chmod('d0000/f', 0o4750)",
                          "ensure_data"),
}


def _holding(ask: tuple) -> tuple:
    """An ``_HOLDING_ASKS`` entry with its optional fields filled in."""
    return ask + ("", "", None)[len(ask) - 6:]


@pytest.mark.parametrize("how", sorted(_HOLDING_ASKS))
def test_a_request_holds_no_node_while_it_waits_for_fds(how, tmp_path):
    """A request that looked a name up and then looks another up, or copies up, at the fd
    limit (``fdbudget.patiently``) holds none of the first node's fds while it waits: it
    kept them (an fd per layer of a merged directory, a file's parent fd), and the thread
    whose turn it was, needing them, answered EMFILE after the whole wait (limits23). The
    main thread holds the turn, in its wait, when the request reaches its lookup; its walk
    fits (its need measured one fd at a time) only if the request does not hold that node
    then. The clock is a fake one that only the waits' sleeps advance."""
    where, arg, act, made, gone, kept, options, prep, caller = _holding(_HOLDING_ASKS[how])
    roots = _wide_layers(tmp_path, 60, 3)
    (roots[0] / "d0000" / "f").write_text("data\n")
    (roots[0] / "d0000" / "f").chmod(0o4755)
    for d in ("upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    out = _child(f"""
        import errno, sys
        from overlaypc.killpriv import Writer
        {prep}
        main = threading.main_thread()
        at_point, go, queued, passed, main_done = (threading.Event() for _ in range(5))
        turn = fdbudget._waiting
        mine = []  # the main thread holds the turn
        class Turn:  # ``fdbudget``'s turn, telling who waits for it
            def acquire(self, timeout=-1):
                if threading.current_thread() is main:
                    got = turn.acquire(timeout=timeout)
                    mine.append(got)
                    return got
                queued.set()
                got = turn.acquire(timeout=timeout)
                main_done.wait(60)  # (its tries once the main thread let go of its fds)
                return got
            def release(self):
                if threading.current_thread() is main:
                    mine.clear()
                turn.release()
        fdbudget._waiting = Turn()
        class Signal:  # a registered cache: emptied at each try of the main thread's wait
            def shed_fds(self):
                if mine and not go.is_set():
                    go.set()  # the request goes on to its lookup, at the limit
                    while not (queued.wait(0.01) or passed.is_set()):
                        pass
                return 0
        signal = Signal()
        fdbudget.register(signal)
        owner, name = {where!r}.split(".")
        owner = getattr(fs, owner)
        call = getattr(owner, name)
        def paused(*args, **kwargs):  # the request's lookup or copy-up that may wait
            if threading.current_thread() is not main and not at_point.is_set() \\
                    and {arg!r} in (None, args[0]) \\
                    and {caller!r} in (None, sys._getframe(1).f_code.co_name):
                at_point.set()
                go.wait(60)
                done = call(*args, **kwargs)
                passed.set()
                main_done.wait(60)  # (nothing more of the request while the main thread tries)
                return done
            return call(*args, **kwargs)
        setattr(owner, name, paused)
        fs.lookup.shed_fds()
        before = len(os.listdir("/proc/self/fd"))
        result = []
        def request():
            try:
                {act}
                result.append("done")
            except OSError as e:
                result.append(os.strerror(e.errno))
        changer = threading.Thread(target=request)
        changer.start()
        assert at_point.wait(60)
        fs.lookup.shed_fds()  # (the request's walk walks again: the cache's fds close)
        held = len(os.listdir("/proc/self/fd")) - before  # what the request holds now
        hog = []
        try:
            while True:
                hog.append(os.dup(0))
        except OSError:
            pass
        while True:  # the fewest free fds the main thread's walk fits in, now
            try:
                fs.lookup._lookup("d0002")
                break
            except OSError as e:
                assert e.errno == errno.EMFILE, e
            fs.lookup.shed_fds()
            os.close(hog.pop())
        fs.lookup.shed_fds()
        # the walk's need less one, and the fds of the node the request kept (``kept``) if it
        # holds none of them now: it fits only if the request lets go of that node
        for _ in range({kept} - held - 1):
            os.close(hog.pop())
        for _ in range(held + 1 - {kept}):
            hog.append(os.dup(0))
        try:
            found = len(fs.lookup.lookup("d0002").entries)
        except OSError as e:
            found = os.strerror(e.errno)
        # the fds first: a main thread whose walk fitted without waiting (its need measured
        # one fd less than it came to) lets the request go on here, and with none free its
        # copy-up's install answered EMFILE at once under the namespace lock (review24: 3 runs
        # in 10 of the open case)
        for fd in hog:
            os.close(fd)
        go.set()  # (if the main thread did not wait)
        main_done.set()
        changer.join()
        st = os.lstat(os.path.join({str(tmp_path / "upper")!r}, {made!r}))
        print(found, clock[0] < fdbudget.WAIT_SECONDS, result[0], st.st_mode & {gone} == 0)
    """, nofile=(400, 400), setup=_fake_clock_core(tmp_path, roots,
                                                   ", ".join(('redirect_dir="on"', options)).rstrip(", ")))
    assert out.split() == ["60", "True", "done", "True"], out
