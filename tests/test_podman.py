"""overlaypc as the ``overlay.mount_program`` of podman and buildah (containers/storage),
rootful and rootless, on an image the suite makes itself (issue 14, item 6).

The image: Debian's static busybox and a small data tree, imported with ``podman import``.
Everything podman and buildah write lives in this session's tmp dir: the storage root,
run root and libpod tmpdir come from a per-session storage.conf and the command line, the
engine settings this machine needs from ``tests/podman/containers.conf``, and every
rootful command runs inside one private mount namespace (``unshare -m``, kept by a
holder process) with tmpfs over /run, /var/lib, /var/log, /var/tmp and /etc/cni, so that
neither the blob-info cache containers/image keeps in /var/lib/containers for root, nor
runc's state, nor a daemon's fallback log, nor CNI's lock file ever reaches the machine,
and no mount made there is visible outside. The mount program is ``tests/podman/mount-program``, which records its
arguments and runs overlaypc with exactly those.

Checks are file by file (type, mode, owner, content, link target, hard links) on
``podman export`` of what a container or a build produced, plus ``podman diff``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

import helpers
import rootless_support as rs

pytestmark = [pytest.mark.slow, pytest.mark.mount]

PODMAN_DIR = Path(__file__).resolve().parent / "podman"
MOUNT_PROGRAM = PODMAN_DIR / "mount-program"
CONTAINERS_CONF = PODMAN_DIR / "containers.conf"
BASE = "localhost/overlaypc-test:base"
ROOTLESS_USER = "overlaypc-rootless"  # made by scripts/bootstrap.sh, with subuid/subgid ranges
TIMEOUT = 120
#: covered by a tmpfs in the holder's mount namespace (where they exist): runc's state,
#: containers/image's blob-info cache (/var/lib/containers for root), a daemon's fallback
#: log, image copies, and the lock CNI takes in its config dir even with netns none
PRIVATE_DIRS = ("/run", "/var/lib", "/var/log", "/var/tmp", "/etc/cni")

# --------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class F:
    """An expected entry: type ('f', 'd', 'l', 'p', 'h' = hard link to ``target``)."""
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    content: Optional[bytes] = None
    target: Optional[str] = None


DATA = {
    "data": F("d", 0o755),
    "data/one": F("f", 0o644, content=b"one\n"),
    "data/one.link": F("h", target="data/one"),
    "data/dir": F("d", 0o755),
    "data/dir/two": F("f", 0o644, content=b"two\n"),
    "data/dir/sub": F("d", 0o755),
    "data/dir/sub/deep": F("f", 0o600, 5, 6, b"deep\n"),
    "data/tree": F("d", 0o755),
    "data/tree/a": F("d", 0o755),
    "data/tree/a/b": F("d", 0o750),
    "data/tree/a/b/t": F("f", 0o644, content=b"t\n"),
    "data/exec": F("f", 0o755, content=b"#!/bin/sh\necho exec\n"),
    "etc/app": F("d", 0o755),
    "etc/app/app.conf": F("f", 0o644, content=b"conf\n"),
}


def _image_tar(path: Path) -> None:
    """busybox (static) with its applets as symlinks, /etc/passwd, and ``DATA``."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox").resolve()
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    with tarfile.open(path, "w") as tar:
        def add(name: str, f: F, data: bytes = b"") -> None:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = f.mode, f.uid, f.gid, 1_700_000_000
            info.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
                         "h": tarfile.LNKTYPE}[f.type]
            if f.type in ("l", "h"):
                info.linkname = f.target or ""
            info.size = len(data) if f.type == "f" else 0
            tar.addfile(info, io.BytesIO(data) if f.type == "f" else None)

        for d in ("bin", "etc", "root", "tmp", "var", "proc", "sys", "dev", "run"):
            add(d, F("d", 0o1777 if d == "tmp" else 0o755))
        add("bin/busybox", F("f", 0o755), busybox.read_bytes())
        for applet in applets:
            if applet != "busybox":
                add(f"bin/{applet}", F("l", 0o777, target="busybox"))
        add("etc/passwd", F("f"), b"root:x:0:0:root:/root:/bin/sh\n")
        add("etc/group", F("f"), b"root:x:0:\n")
        for name, f in DATA.items():
            add(name, f, f.content or b"")


def _is_static(path: str) -> bool:
    """An ELF64 executable without a PT_INTERP program header (no dynamic loader)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:5] != b"\x7fELF\x02":
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


# --------------------------------------------------------------------------------------
# Running podman and buildah
# --------------------------------------------------------------------------------------

class Engine:
    """Runs podman/buildah for one storage (rootful in the holder's mount namespace, or
    rootless as a user), with the environment the mount program needs."""

    def __init__(self, base: Path, env: dict, prefix: list[str], tmpdir: Path) -> None:
        self.base, self.env, self.prefix, self.tmpdir = base, env, prefix, tmpdir
        self.argv_log = Path(env["OVERLAYPC_ARGV_LOG"])

    def run(self, tool: str, *args: str, check: bool = True, input: Optional[bytes] = None
            ) -> subprocess.CompletedProcess:
        cmd = self.prefix + [tool] + (["--tmpdir", str(self.tmpdir)] if tool == "podman" else []) + list(args)
        r = subprocess.run(cmd, env=self.env, input=input, capture_output=True, timeout=TIMEOUT, cwd="/")
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n"
                                 f"{r.stderr.decode(errors='replace')}\n{self.daemon_log_tail()}")
        return r

    def podman(self, *args: str, **kw) -> str:
        return self.run("podman", *args, **kw).stdout.decode()

    def export(self, image: str) -> dict[str, tarfile.TarInfo | tuple]:
        """``podman export`` of a container made from ``image``: path -> (TarInfo, data)."""
        name = f"export-{time.monotonic_ns()}"
        self.podman("create", "--name", name, image, "true")
        out_file = self.base / f"{name}.tar"  # not stdout: a rootless podman cannot reopen root's pipe
        try:
            self.podman("export", "--output", str(out_file), name)
            raw = out_file.read_bytes()
        finally:
            self.podman("rm", "-f", name)
            with contextlib.suppress(OSError):
                out_file.unlink()
        out = {}
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for info in tar.getmembers():
                data = tar.extractfile(info).read() if info.isreg() else None
                out[info.name.strip("./").rstrip("/")] = (info, data)
        return out

    def argv_calls(self) -> list[list[str]]:
        if not self.argv_log.exists():
            return []
        calls = []
        for line in self.argv_log.read_bytes().split(b"\n"):
            if line:
                calls.append([a.decode() for a in line.split(b"\0")[:-1]])
        return calls

    log_path: Optional[Path] = None
    holder: Optional[int] = None  # the rootful engine's mount namespace keeper

    def daemon_log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        return ""

    def daemon_log_tail(self) -> str:
        return "--- overlaypc log (tail) ---\n" + "\n".join(self.daemon_log().splitlines()[-30:])


def _check_tree(got: dict, expected: dict[str, Optional[F]]) -> None:
    """Each expected path as described (None: absent); hard links ('h') as tar records
    them: one entry a regular file, the other a link to it, in either order."""
    problems = []
    for path, f in expected.items():
        entry = got.get(path)
        if f is None:
            if entry is not None:
                problems.append(f"{path}: present, expected absent")
            continue
        if entry is None:
            problems.append(f"{path}: absent")
            continue
        info, data = entry
        if f.type == "h":
            target = f.target
            linked = (info.islnk() and info.linkname.strip("./") == target) or \
                (info.isreg() and got.get(target) and got[target][0].islnk()
                 and got[target][0].linkname.strip("./") == path)
            if not linked:
                problems.append(f"{path}: not a hard link of {target} ({info.type!r} {info.linkname!r})")
            continue
        kind = {"f": info.isreg() and not info.islnk(), "d": info.isdir(), "l": info.issym(),
                "p": info.isfifo()}[f.type]
        if not kind:
            problems.append(f"{path}: type {info.type!r}, expected {f.type}")
            continue
        have = (stat.S_IMODE(info.mode), info.uid, info.gid)
        want = (f.mode, f.uid, f.gid)
        if f.type != "l" and have != want:
            problems.append(f"{path}: mode/uid/gid {oct(have[0])} {have[1]}:{have[2]}, "
                            f"expected {oct(want[0])} {want[1]}:{want[2]}")
        if f.content is not None and data != f.content:
            problems.append(f"{path}: content {data!r}, expected {f.content!r}")
        if f.type == "l" and info.linkname != f.target:
            problems.append(f"{path}: -> {info.linkname!r}, expected {f.target!r}")
    assert not problems, "\n".join(problems)


def _only(got: dict, below: str, names: set[str]) -> None:
    """The directory ``below`` holds exactly ``names`` (deleted files did not come back)."""
    found = {p[len(below) + 1:] for p in got if p.startswith(below + "/")}
    assert found == names, f"{below}: {sorted(found)}, expected {sorted(names)}"


# --------------------------------------------------------------------------------------
# The session: a private mount namespace, a storage, the image
# --------------------------------------------------------------------------------------

def _require_engines() -> None:
    helpers.require("root")
    helpers.require_fuse_mount()
    for tool in ("podman", "buildah", "runc", "conmon", "nsenter", "unshare"):
        helpers.require(shutil.which(tool) is not None or os.path.exists(f"/usr/bin/{tool}"),
                        f"needs {tool} (scripts/bootstrap.sh installs it)")
    busybox = shutil.which("busybox")
    helpers.require(busybox is not None and _is_static(busybox),
                    "needs a static busybox (Debian's busybox-static)")


def _storage_conf(path: Path, root: Path) -> None:
    path.write_text(f"""[storage]
driver = "overlay"
graphroot = "{root}/storage"
runroot = "{root}/run"
rootless_storage_path = "{root}/storage"

[storage.options.overlay]
mount_program = "{MOUNT_PROGRAM}"
""")


def _ns_of(pid: int) -> Optional[str]:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/ns/mnt")
    return None


def _daemons_in(ns: str) -> list[int]:
    """overlaypc daemons living in mount namespace ``ns`` (ours: podman started them)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_of(int(entry)) == ns and helpers.pid_alive(int(entry)):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if b"overlaypc" in argv and b"-m" in argv:
                    pids.append(int(entry))
    return pids


#: Run first in the holder's new namespace: detaches its copies of the mounts it does
#: not need that would pin another test's state (``_holder``). /proc/self/mounts escapes
#: space, tab, newline and backslash as \ooo: awk's ``un`` turns them back.
DETACH_COPIES = (
    "awk 'function un(s, out) { out = \"\"; while (match(s, /\\\\[0-7][0-7][0-7]/)) {"
    " out = out substr(s, 1, RSTART - 1) sprintf(\"%c\", substr(s, RSTART + 1, 1) * 64"
    " + substr(s, RSTART + 2, 1) * 8 + substr(s, RSTART + 3, 1)); s = substr(s, RSTART + 4) }"
    " return out s }"
    " $3 ~ /^fuse/ || ($3 == \"overlay\" && $2 ~ /^\\/tmp\\//) {print un($2)}' /proc/self/mounts | "
    "while read -r m; do umount -l \"$m\" 2>/dev/null; done")


@contextlib.contextmanager
def _holder() -> Iterator[int]:
    """A process in a new private mount namespace with tmpfs over ``PRIVATE_DIRS``.

    The namespace starts with a copy of every mount there is, other test runs' on this
    machine included; copies that would pin their state are detached (``DETACH_COPIES``):
    a FUSE mount's copy keeps its connection alive after the owner unmounts it, so that
    daemon would never see the unmount; a kernel overlay's copy under /tmp keeps its
    superblock, and with it the kernel's lock on its upperdir and workdir, so that test's
    next mount over them failed EBUSY (index=on) for as long as this namespace lived."""
    script = DETACH_COPIES + "; " + "; ".join(f"if [ -d {d} ]; then mount -t tmpfs -o mode={'1777' if d == '/var/tmp' else '0755'} "
                       f"tmpfs {d} || exit 1; fi" for d in PRIVATE_DIRS)
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--",
                             "sh", "-c", script + "; echo ready; exec sleep 86400"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line == b"ready\n", proc.stderr.read().decode()
        yield proc.pid
    finally:
        ns = _ns_of(proc.pid)
        proc.kill()
        proc.wait()
        # podman unmounted what it mounted; a daemon still there would keep the
        # namespace (and its mounts) alive: ours, so stop it
        for pid in _daemons_in(ns) if ns else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclasses.dataclass
class Session:
    engine: Engine
    root: Path
    holder: int


@pytest.fixture(scope="session")
def podman_session() -> Iterator[Session]:
    _require_engines()
    # not under pytest's 0700 tmp dir: with --uidmap the container's root (host uid
    # 100000) must reach its rootfs, as containers/storage arranges below its graphroot
    with rs.shared_dir(0, 0, "overlaypc-podman-") as root:
        yield from _session(root)


def _session(root: Path) -> Iterator[Session]:
    for d in ("tmp", "libpod", "ctx"):
        (root / d).mkdir()
    _storage_conf(root / "storage.conf", root)
    _image_tar(root / "image.tar")
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF),
               CONTAINERS_STORAGE_CONF=str(root / "storage.conf"), TMPDIR=str(root / "tmp"),
               OVERLAYPC_PYTHON=sys.executable, OVERLAYPC_ARGV_LOG=str(root / "argv.log"),
               PYTHONPATH=rs.package_root())
    with _holder() as pid:
        engine = Engine(root, env, ["nsenter", f"--target={pid}", "--mount", "--"], root / "libpod")
        engine.holder = pid
        engine.log_path = Path(f"/proc/{pid}/root/var/log/overlaypc.log")  # the fallback log
        engine.podman("import", "--quiet", str(root / "image.tar"), BASE)
        # containers/storage makes its graphroot 0700; a --uidmap container's root (host
        # uid 100000) must pass it to reach its rootfs, as with any mount program
        for d in ("storage", "storage/overlay"):
            os.chmod(root / d, 0o711)
        try:
            yield Session(engine, root, pid)
        finally:
            engine.run("podman", "rm", "--all", "--force", check=False)
            leftovers = _daemons_in(_ns_of(pid) or "")
            assert not leftovers, f"overlaypc daemons left after podman rm: {leftovers}"


@pytest.fixture
def engine(podman_session) -> Iterator[Engine]:
    """The session's engine; fails the test on ERROR/Traceback in the daemons' log."""
    e = podman_session.engine
    before = len(e.daemon_log())
    yield e
    bad = helpers.unexpected_log_lines(e.daemon_log()[before:])
    assert not bad, "daemon errors:\n" + "\n".join(bad[:20])


def test_the_holder_keeps_no_copy_of_a_kernel_overlay_under_tmp(tmp_path):
    """A kernel overlay (index=on) up when the holder starts: the holder's namespace
    keeps no copy of it, so its upper and work are free again once it is unmounted here
    (failed before: the copy was found in the holder's namespace). No podman needed."""
    lower, upper, work = (tmp_path / n for n in ("lower", "up per", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    with helpers.kernel_overlay(tmp_path / "m 1", [lower], upper, work, ("index=on",)):
        with _holder() as pid:
            held = helpers.overlay_holders(upper, work)
            assert [h.ours for h in held] == [True], [str(h) for h in held]
            assert _ns_of(pid) != os.readlink("/proc/self/ns/mnt")


# --------------------------------------------------------------------------------------
# Rootful
# --------------------------------------------------------------------------------------

CONTAINER_WRITES = r"""
set -e
ln /data/dir/two /data/two.hard
mv /data/dir /data/dir.renamed
chmod 600 /data/one
chown 12:34 /data/dir.renamed/sub/deep
echo suid > /data/suid && chmod 4711 /data/suid
chmod g+s /data/dir.renamed
rm -rf /data/tree && mkdir /data/tree && echo new > /data/tree/new
mkfifo /data/fifo && ln -s ../one /data/tree/link
echo append >> /etc/app/app.conf
/data/exec > /data/exec.out
stat -c '%n %a %u:%g %h' /data/one /data/one.link /data/suid /data/dir.renamed \
    /data/dir.renamed/sub/deep /data/two.hard /data/dir.renamed/two
ls -a /data/tree
"""

AFTER_WRITES = {
    "data/one": F("f", 0o600, content=b"one\n"),
    "data/one.link": F("f", 0o644, content=b"one\n"),  # copy-up broke the link, as the kernel
    "data/dir": None,
    "data/dir.renamed": F("d", 0o2755),
    "data/dir.renamed/two": F("f", 0o644, content=b"two\n"),
    "data/two.hard": F("h", target="data/dir.renamed/two"),
    "data/dir.renamed/sub/deep": F("f", 0o600, 12, 34, b"deep\n"),
    "data/suid": F("f", 0o4711, content=b"suid\n"),
    "data/tree": F("d", 0o755),
    "data/tree/new": F("f", 0o644, content=b"new\n"),
    "data/tree/link": F("l", target="../one"),
    "data/tree/a": None,
    "data/fifo": F("p", 0o644),
    "etc/app/app.conf": F("f", 0o644, content=b"conf\nappend\n"),
    "data/exec.out": F("f", 0o644, content=b"exec\n"),
}


def test_base_image_as_made(engine):
    got = engine.export(BASE)
    _check_tree(got, DATA)
    assert got["bin/sh"][0].linkname == "busybox"


def test_container_writes_diff_commit(engine):
    name = "writes"
    out = engine.podman("run", "--name", name, BASE, "sh", "-c", CONTAINER_WRITES)
    try:
        lines = out.splitlines()
        # the copy-up of one broke its link (as the kernel's without index): the other
        # name keeps the lower file and its link count; the renamed directory is merged
        # (a redirect to the lower one): st_nlink 1, as the kernel overlay shows it
        assert lines[:7] == ["/data/one 600 0:0 1", "/data/one.link 644 0:0 2", "/data/suid 4711 0:0 1",
                             "/data/dir.renamed 2755 0:0 1", "/data/dir.renamed/sub/deep 600 12:34 1",
                             "/data/two.hard 644 0:0 2", "/data/dir.renamed/two 644 0:0 2"], out
        assert lines[7:] == [".", "..", "link", "new"], out
        diff = set(engine.podman("diff", name).splitlines())
        for line in ("C /data", "C /data/one", "A /data/suid", "D /data/dir", "A /data/dir.renamed",
                     "A /data/dir.renamed/sub/deep", "A /data/two.hard", "C /data/tree",
                     "D /data/tree/a", "A /data/tree/new", "A /data/fifo", "C /etc/app/app.conf"):
            assert line in diff, f"{line!r} missing from podman diff:\n{sorted(diff)}"
        engine.podman("commit", "--quiet", name, "localhost/overlaypc-test:writes")
    finally:
        engine.podman("rm", "-f", name)
    got = engine.export("localhost/overlaypc-test:writes")
    _check_tree(got, AFTER_WRITES)
    _only(got, "data/tree", {"new", "link"})
    _only(got, "data/dir.renamed", {"two", "sub", "sub/deep"})
    # the committed image runs, and shows the same
    out = engine.podman("run", "--rm", "localhost/overlaypc-test:writes", "sh", "-c",
                        "cat /data/one /etc/app/app.conf; stat -c '%a %u:%g' /data/suid; ls /data/tree")
    assert out == "one\nconf\nappend\n4711 0:0\nlink\nnew\n", out


CONTAINERFILE = f"""FROM {BASE}
RUN mkdir -p /b/keep /b/gone && echo k > /b/keep/k && echo g > /b/gone/g && ln /b/keep/k /b/keep/k2
RUN rm -rf /data/tree && mkdir /data/tree && echo fresh > /data/tree/fresh
RUN mv /data/dir /data/moved && chmod 700 /data/moved && chown 7:8 /data/moved/two
RUN rm /b/gone/g && rmdir /b/gone && echo again > /b/keep/k
RUN touch /b/s && chmod 6755 /b/s && mkfifo /b/p && ln -s keep /b/l
COPY add.txt /b/add.txt
RUN rm -rf /etc/app && mkdir /etc/app && echo new > /etc/app/other && rm /data/one.link
"""

AFTER_BUILD = {
    "b": F("d", 0o755),
    "b/keep/k": F("f", 0o644, content=b"again\n"),
    "b/keep/k2": F("f", 0o644, content=b"k\n"),  # a later step's copy-up of k broke the link
    "b/gone": None,
    "b/s": F("f", 0o6755, content=b""),
    "b/p": F("p", 0o644),
    "b/l": F("l", target="keep"),
    "b/add.txt": F("f", 0o644, content=b"added\n"),
    "data/tree/fresh": F("f", 0o644, content=b"fresh\n"),
    "data/tree/a": None,
    "data/dir": None,
    "data/moved": F("d", 0o700),
    "data/moved/two": F("f", 0o644, 7, 8, b"two\n"),
    "data/moved/sub/deep": F("f", 0o600, 5, 6, b"deep\n"),
    "etc/app/other": F("f", 0o644, content=b"new\n"),
    "etc/app/app.conf": None,
    "data/one": F("f", 0o644, content=b"one\n"),
    "data/one.link": None,
}


@pytest.mark.parametrize("builder", ["buildah", "podman"])
def test_multistep_build(engine, podman_session, builder):
    """A 7-step build, each RUN step a container on overlaypc; ``rm -rf`` of an image
    directory and ``mkdir`` of the same name in one step (fuse-overlayfs 1.10 brings the
    deleted files back there)."""
    ctx = podman_session.root / f"ctx-{builder}"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    (ctx / "add.txt").write_text("added\n")
    image = f"localhost/overlaypc-test:built-{builder}"
    args = ["bud", "--layers=false"] if builder == "buildah" else ["build"]
    engine.run(builder, *args, "--quiet", "--tag", image, str(ctx))
    got = engine.export(image)
    expected = dict(AFTER_BUILD)
    if builder == "buildah":
        # without --layers, buildah runs every step in one container: k and k2 are one
        # upper file by then, and stay linked
        expected["b/keep/k"] = F("f", 0o644, content=b"again\n")
        expected["b/keep/k2"] = F("h", target="b/keep/k")
    _check_tree(got, expected)
    _only(got, "data/tree", {"fresh"})
    _only(got, "etc/app", {"other"})
    _only(got, "b", {"keep", "keep/k", "keep/k2", "s", "p", "l", "add.txt"})
    _only(got, "data/moved", {"two", "sub", "sub/deep"})


def _rm_after_userns_run(engine: Engine, name: str) -> None:
    """``podman rm -f`` of a container that ran in a user namespace. podman 4.3 races with
    itself there (the exit command's cleanup and ``rm`` both unmount ``userdata/shm``): the
    first ``rm`` can answer EBUSY on that directory, and a second one, a moment later,
    removes it. Only that error is retried."""
    for _ in range(10):
        r = engine.run("podman", "rm", "-f", name, check=False)
        if r.returncode == 0:
            return
        if b"userdata/shm: device or resource busy" not in r.stderr:
            break
        time.sleep(0.3)
    engine.podman("rm", "-f", name)  # fails the test with podman's message


def test_uidmap(engine):
    """``--uidmap``: containers/storage passes ``uidmapping=:0:100000:65536`` (and gid)
    *and* mounts each lower through a kernel idmapped mount (``lowerdir=.../mapped/N/...``:
    Debian 12's containers/storage 1.45 does both); overlaypc shows such a lower's IDs as
    the kernel maps them (host IDs) and maps only the upper's. The layers keep
    container-side owners, the container (in its user namespace) sees them as they are
    stored."""
    name = "uidmap"
    script = ("stat -c '%u:%g' /data/one /data/dir/sub/deep; touch /data/new; "
              "stat -c '%u:%g' /data/new; chown 5:6 /data/one; stat -c '%u:%g' /data/one")
    out = engine.podman("run", "--name", name, "--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536",
                        BASE, "sh", "-c", script)
    try:
        assert out.split() == ["0:0", "5:6", "0:0", "5:6"], out
        upper = Path(engine.podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", name).strip())
        for rel, owner in (("data/new", (0, 0)), ("data/one", (5, 6))):
            st = os.lstat(upper / rel)
            assert (st.st_uid, st.st_gid) == owner, (rel, st.st_uid, st.st_gid)
    finally:
        _rm_after_userns_run(engine, name)
    calls = [c for c in engine.argv_calls() if any("uidmapping=" in a for a in c)]
    assert calls, engine.argv_calls()[-3:]
    assert any("/mapped/" in a for c in calls for a in c), calls  # the idmapped lowers
    assert "is on an idmapped mount" in engine.daemon_log(), engine.daemon_log_tail()


def _layer_tar(entries: list[tuple[str, str, bytes]]) -> bytes:
    """A layer tar: (name, 'd' or 'f', content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 1_700_000_000, 0o755 if kind == "d" else 0o644
            info.type, info.size = (tarfile.DIRTYPE, 0) if kind == "d" else (tarfile.REGTYPE, len(data))
            tar.addfile(info, io.BytesIO(data) if kind == "f" else None)
    return buf.getvalue()


def _docker_archive(path: Path, base: bytes, layers: list[bytes], tag: str) -> None:
    """``podman load`` input: a docker-archive of ``base`` and ``layers``, bottom first."""
    blobs = [base] + layers
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers",
                                    "diff_ids": ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]},
                         "history": [{"created_by": f"layer {i}"} for i in range(len(blobs))]}).encode()
    files = {"config.json": config,
             "manifest.json": json.dumps([{"Config": "config.json", "RepoTags": [tag],
                                           "Layers": [f"{i}.tar" for i in range(len(blobs))]}]).encode()}
    files.update({f"{i}.tar": b for i, b in enumerate(blobs)})
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_loaded_image_oci_whiteouts(engine, podman_session):
    """An image made elsewhere (``podman load``) keeps its layers' OCI whiteouts as they
    are under a mount program: ``.wh..wh..opq``, and ``.wh.NAME`` of a directory that a
    later layer makes again without an opaque marker (the whiteout still hides the old
    one). The merged view is the kernel's (checked against the storage driver without a
    mount program), and so is a commit on top of it. (``.wh.NAME`` and a directory NAME in
    one layer are left out: containers/storage itself merges that NAME with the lower one,
    with or without a mount program.)"""
    d, f = "d", "f"
    low = _layer_tar([("o", d, b""), ("o/a", d, b""), ("o/a/1", f, b"1"), ("o/b", d, b""), ("o/b/x", f, b"x"),
                      ("k", d, b""), ("k/sub", d, b""), ("k/sub/old", f, b"old")])
    mid = _layer_tar([("o", d, b""), ("o/.wh..wh..opq", f, b""), ("o/new", f, b"new"),
                      ("k", d, b""), ("k/.wh.sub", f, b""), ("k/.wh.nothing", f, b"")])
    top = _layer_tar([("o", d, b""), ("o/a", d, b""), ("o/a/3", f, b"3"),
                      ("k", d, b""), ("k/sub", d, b""), ("k/sub/n", f, b"n")])
    archive = podman_session.root / "whiteouts.tar"
    _docker_archive(archive, (podman_session.root / "image.tar").read_bytes(), [low, mid, top],
                    "localhost/overlaypc-test:whiteouts")
    engine.podman("load", "--quiet", "--input", str(archive))
    listing = "find /o /k | sort"
    want = ["/k", "/k/sub", "/k/sub/n", "/o", "/o/a", "/o/a/3", "/o/new"]
    out = engine.podman("run", "--rm", "localhost/overlaypc-test:whiteouts", "sh", "-c", listing)
    assert out.split() == want, out
    name = "whiteouts"
    engine.podman("run", "--name", name, "localhost/overlaypc-test:whiteouts", "sh", "-c",
                  "rm -rf /o/a && mkdir /o/a && echo 4 > /o/a/4 && mv /k/sub /k/sub.m")
    try:
        engine.podman("commit", "--quiet", name, "localhost/overlaypc-test:whiteouts2")
    finally:
        engine.podman("rm", "-f", name)
    out = engine.podman("run", "--rm", "localhost/overlaypc-test:whiteouts2", "sh", "-c", listing)
    assert out.split() == ["/k", "/k/sub.m", "/k/sub.m/n", "/o", "/o/a",
                           "/o/a/4", "/o/new"], out


def test_mount_program_arguments(engine):
    """What containers/storage passes reaches overlaypc unchanged, and is accepted: the
    empty element (``workdir=W,,volatile``), read-only image mounts, ``--version``."""
    before = len(engine.argv_calls())
    assert engine.podman("run", "--rm", BASE, "cat", "/data/one") == "one\n"
    mnt = engine.podman("image", "mount", BASE).strip()
    try:
        assert (Path(f"/proc/{engine.holder}/root") / mnt.lstrip("/") / "data/one").read_text() == "one\n"
    finally:
        engine.podman("image", "unmount", BASE)
    assert "overlaypc" in engine.podman("info", "--format", "{{.Store.GraphOptions}}")
    calls = engine.argv_calls()[before:]
    rw = [c for c in calls if c[:1] == ["-o"] and "upperdir=" in c[1]]
    ro = [c for c in calls if c[:1] == ["-o"] and "upperdir=" not in c[1]]
    assert ["--version"] in calls, calls
    assert len(rw) == 1 and ",,volatile" in rw[0][1], rw  # the empty element
    assert len(ro) == 1 and ro[0][-1] == mnt and ":" in ro[0][1], ro  # lowerdir=ID/diff:ID/empty


# --------------------------------------------------------------------------------------
# Rootless
# --------------------------------------------------------------------------------------

def _rootless_user() -> tuple[int, int]:
    import pwd
    try:
        pw = pwd.getpwnam(ROOTLESS_USER)
    except KeyError:
        helpers.require(False, f"needs user {ROOTLESS_USER} (scripts/bootstrap.sh makes it)")
    for path in ("/etc/subuid", "/etc/subgid"):
        text = Path(path).read_text() if os.path.exists(path) else ""
        helpers.require(any(line.startswith(ROOTLESS_USER + ":") for line in text.splitlines()),
                        f"needs a {path} range for {ROOTLESS_USER} (scripts/bootstrap.sh)")
    helpers.require(shutil.which("newuidmap") is not None, "needs newuidmap (Debian's uidmap)")
    helpers.require(os.stat("/dev/fuse").st_mode & 0o006 == 0o006,
                    "needs /dev/fuse usable by every user (scripts/bootstrap.sh)")
    return pw.pw_uid, pw.pw_gid


ROOTLESS_WRITES = r"""
set -e
rm -rf /data/tree && mkdir /data/tree && echo new > /data/tree/new
mv /data/dir /data/moved
chown 12:34 /data/moved/two && chmod 640 /data/moved/two
ln /data/moved/two /data/two.hard
rm /data/one.link
echo append >> /etc/app/app.conf
stat -c '%n %a %u:%g %h' /data/moved/two /data/moved/sub/deep
"""


def test_rootless_podman(podman_session):
    """Rootless podman runs the mount program as uid 0 of its user namespace, where
    trusted.* xattrs cannot be set: renaming an image directory and ``mkdir`` after
    ``rm -rf`` failed with EPERM."""
    uid, gid = _rootless_user()
    py = rs.user_python(uid, gid)
    helpers.require(py is not None, f"no Python interpreter {ROOTLESS_USER} can run overlaypc with")
    python, pyenv = py
    with rs.shared_dir(uid, gid, "overlaypc-podman-") as root:
        for d in ("home", "xdg", "tmp", "libpod"):
            (root / d).mkdir()
        os.chmod(root / "xdg", 0o700)
        _storage_conf(root / "storage.conf", root)
        shutil.copy(podman_session.root / "image.tar", root / "image.tar")
        rs.make_tree(root, uid, gid)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(root / "home"),
               "XDG_RUNTIME_DIR": str(root / "xdg"), "XDG_CONFIG_HOME": str(root / "home/.config"),
               "XDG_DATA_HOME": str(root / "home/.local/share"), "TMPDIR": str(root / "tmp"),
               "CONTAINERS_CONF": str(CONTAINERS_CONF), "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
               "OVERLAYPC_PYTHON": python, "PYTHONPATH": pyenv["PYTHONPATH"],
               "OVERLAYPC_ARGV_LOG": str(root / "argv.log")}
        prefix = ["nsenter", f"--target={podman_session.holder}", "--mount", "--"] + rs.as_user(uid, gid)
        engine = Engine(root, env, prefix, root / "libpod")
        try:
            engine.podman("import", "--quiet", str(root / "image.tar"), BASE)
            out = engine.podman("run", "--name", "rl", BASE, "sh", "-c", ROOTLESS_WRITES)
            assert out.splitlines() == ["/data/moved/two 640 12:34 2", "/data/moved/sub/deep 600 5:6 1"], out
            diff = set(engine.podman("diff", "rl").splitlines())
            for line in ("D /data/dir", "A /data/moved", "D /data/tree/a", "A /data/tree/new",
                         "D /data/one.link"):
                assert line in diff, f"{line!r} missing from podman diff:\n{sorted(diff)}"
            upper = Path(engine.podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", "rl").strip())
            engine.podman("commit", "--quiet", "rl", "localhost/overlaypc-test:rootless")
            got = engine.export("localhost/overlaypc-test:rootless")
            _check_tree(got, {
                "data/tree/new": F("f", 0o644, content=b"new\n"), "data/tree/a": None,
                "data/dir": None, "data/moved": F("d", 0o755),
                "data/moved/two": F("f", 0o640, 12, 34, b"two\n"),
                "data/two.hard": F("h", target="data/moved/two"),
                "data/moved/sub/deep": F("f", 0o600, 5, 6, b"deep\n"),
                "data/one.link": None, "data/one": F("f", 0o644, content=b"one\n"),
                "etc/app/app.conf": F("f", 0o644, content=b"conf\nappend\n")})
            _only(got, "data/tree", {"new"})
            # the upper holds the user.overlay.* format, nothing trusted.*
            assert os.getxattr(upper / "data/tree", "user.overlay.opaque") == b"y"
            assert os.getxattr(upper / "data/moved", "user.overlay.redirect") == b"dir"
            assert not [n for n in os.listxattr(upper / "data/tree") if n.startswith("trusted.")]
            assert engine.argv_calls(), "the mount program was not run"
        finally:
            engine.run("podman", "rm", "--all", "--force", check=False)
            # rootless podman's namespace keeper (its pid file is in the tmpdir given)
            for pause in (root / "libpod/pause.pid", root / "xdg/libpod/tmp/pause.pid"):
                with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                    os.kill(int(pause.read_text()), signal.SIGKILL)
