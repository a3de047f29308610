"""A real mount's start-up: what its daemon has imported when the kernel's first request
reaches it (``NEVER_AT_START`` of test_startup_unit, and the slow standard modules of
``SLOW_STDLIB``), so a module made lazy for start-up does not silently come back (an
import moved up, a new eager use) while the in-process tests, which stop before INIT,
would not see it."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys

import helpers
from test_startup_unit import NEVER_AT_START, NOT_AT_START, SLOW_STDLIB

#: the ``overlaypc`` command (``entry.main``, as bin/overlaypc runs it) with the session's
#: ``dispatch`` and ``OverlayOps.served`` wrapped: at the first request, or at ``served``
#: if no request came before (``clone_delay``: it imports the request-only modules), it
#: writes the names in ``sys.modules`` to the file given as its first argument.
#: (``session`` and ``overlay_ops`` are imported first here: the mount imports them
#: before its first request anyway.)
PROBE = r"""
import sys
from overlaypc.engine.session import Session
from overlaypc.overlay_ops import OverlayOps
out = sys.argv.pop(1)
dispatch, served = Session.dispatch, OverlayOps.served
seen = []
def snapshot():
    if not seen:
        seen.append(1)
        with open(out + ".tmp", "w") as f:
            f.write(" ".join(sorted(sys.modules)))
        import os
        os.rename(out + ".tmp", out)
def first(self, *args, **kwargs):
    snapshot()
    return dispatch(self, *args, **kwargs)
def first_served(self):
    snapshot()
    return served(self)
Session.dispatch = first
OverlayOps.served = first_served
from overlaypc.entry import main
sys.argv[0] = "overlaypc"
sys.exit(main())
"""


def test_the_first_request_finds_no_module_start_up_does_not_need(tmp_path):
    """A default mount, run as the command runs it (``-f``), answers the first request of
    its caller (a ``stat`` of the mount point) having imported none of ``NEVER_AT_START``,
    ``NOT_AT_START`` (index=on only) or ``SLOW_STDLIB``: INIT, the first worker and the
    request itself included (or, if no request came within ``clone_delay``, at ``served``,
    which imports the request-only modules)."""
    helpers.require_fuse_mount()
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_bytes(b"x")
    mnt, out = tmp_path / "mnt", tmp_path / "modules"
    opts = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work"
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", PROBE, str(out), "-f", "-o", opts, str(mnt)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=helpers.overlaypc_env(), cwd=str(tmp_path), start_new_session=True)
    try:
        assert helpers.wait_until(lambda: helpers.is_mounted(mnt) or proc.poll() is not None, 30), \
            "no mount within 30 s"
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        assert os.listdir(mnt) == ["f"]             # the first requests
        assert helpers.wait_until(out.exists, 10)
    finally:
        _stop(proc, mnt)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    loaded = set(out.read_text().split())
    assert "overlaypc.overlay_ops" in loaded           # (the probe saw the mount's imports)
    assert sorted(loaded & set(NEVER_AT_START + NOT_AT_START + SLOW_STDLIB)) == []


def test_a_running_mount_needs_no_file_of_its_package(tmp_path):
    """The modules made lazy for start-up (``NEVER_AT_START``'s of the package) are
    imported once the first request is answered (``OverlayOps.served``), not at the first
    request of their kind, which may come hours later: by then the package's files may be
    gone or another version's (an upgrade, a ``git checkout``, a removed worktree), and
    the import would fail that request with EIO (a listing: ``merged_listing``'s stand-in
    tried again at every one) or mix two versions' code. Here the daemon runs from a copy
    of the package moved away once the mount says it is mounted."""
    helpers.require_fuse_mount()
    pkg = tmp_path / "pkg"
    shutil.copytree(helpers.REPO_ROOT / "overlaypc", pkg / "overlaypc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_bytes(b"x")
    (tmp_path / "lower" / "d").mkdir()
    mnt, err_path = tmp_path / "mnt", tmp_path / "stderr"
    opts = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work"
    env = dict(helpers.overlaypc_env(), PYTHONPATH=str(pkg))
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "overlaypc", "-f", "-o", opts, str(mnt)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=env, cwd=str(tmp_path), start_new_session=True)
    try:
        assert helpers.wait_until(lambda: "mounted " in err_path.read_text()
                                  or proc.poll() is not None, 60), "not mounted within 60 s"
        assert proc.poll() is None, err_path.read_text()
        pkg.rename(tmp_path / "pkg-gone")                  # the package's files are gone
        assert sorted(os.listdir(mnt)) == ["d", "f"]      # READDIR: readdir
        (mnt / "new").write_bytes(b"y")                   # CREATE: namespace
        os.rmdir(mnt / "d")                               # RMDIR: namespace, readdir
        os.unlink(mnt / "f")
        assert sorted(os.listdir(mnt)) == ["new"]
    finally:
        _stop(proc, mnt)
    assert proc.returncode == 0, err_path.read_text()
    assert helpers.unexpected_log_lines(err_path.read_text()) == []


def _stop(proc: subprocess.Popen, mnt, conn: str | None = None, scratch=None) -> None:
    """Unmount ``mnt`` and wait for its daemon ``proc``; one that does not end is killed
    (its FUSE connection ``conn`` aborted first through ``scratch``: a daemon waiting on
    its own mount cannot be killed otherwise) and the mount removed."""
    if helpers.is_mounted(mnt):
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False, timeout=30)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        if conn is not None:
            _abort_connection(conn, scratch)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        helpers.force_unmount(mnt)


def _fuse_connection(mnt) -> str | None:
    """The FUSE connection number of the mount at ``mnt`` (its device's minor number in
    /proc/self/mountinfo), read before any request can hang on it."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt) and " - fuse" in line:
                return fields[2].split(":")[1]
    return None


def _abort_connection(conn: str, scratch) -> None:
    """Abort FUSE connection ``conn`` through a private fusectl mount (a daemon waiting on
    its own mount cannot be killed otherwise: its request waits for itself)."""
    ctl = scratch / "fusectl"
    ctl.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "fusectl", "none", str(ctl)], check=False).returncode:
        return
    try:
        with open(ctl / conn / "abort", "w") as f:
            f.write("1")
    except OSError:
        pass
    finally:
        subprocess.run(["umount", str(ctl)], check=False)


#: a ``sitecustomize`` for a daemon mounted over its own code: once the mount at
#: ``OWN_MOUNT`` is up, it writes to stderr each import searched while a ``sys.path``
#: entry lies under the mount and each file opened there (what Python does by itself: an
#: import's directory scan, a traceback's source lines), as a line with ``ERROR``.
OWN_MOUNT_AUDIT = r"""
import os, sys
top = os.environ["OWN_MOUNT"]
busy = []
def mounted():
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == top for line in f)
def under(path):
    return isinstance(path, str) and (path == top or path.startswith(top + "/"))
def hook(event, args):
    if busy or event not in ("import", "open"):
        return
    busy.append(1)
    try:
        if event == "import" and any(map(under, args[2] or ())):
            what = "import " + args[0]
        elif event == "open" and under(args[0]):
            what = "open " + args[0]
        else:
            return
        if mounted():
            sys.stderr.write(f"ERROR through its own mount: {what}\n")
    finally:
        busy.pop()
sys.addaudithook(hook)
"""


def test_a_mount_over_the_directory_holding_its_own_code_is_served(tmp_path):
    """The daemon's package lies in the lower directory the mount covers (mounted over
    its own code): the request-only modules are loaded before mount(2) there, and no
    later import nor a logged traceback's source reads through the mount it serves
    (``ownmount``: ``sys.path`` re-pointed at the covered directory, the loaded modules'
    source kept). Such a read waits for a worker of the same daemon: a hang when none is
    free or the read holds a lock the lookup needs (Python asks ``isatty`` of each file
    it opens: an IOCTL, whose ``fileattrs`` import then waited for itself; a suite run
    hung with its daemon importing ``logging`` for its first record). A crash injected
    into one LOOKUP makes a traceback. The client runs in a subprocess with a timeout,
    and a hung connection is aborted before the client is killed, so a failure cannot
    hang the suite."""
    helpers.require_fuse_mount()
    lower = tmp_path / "lower"
    shutil.copytree(helpers.REPO_ROOT / "overlaypc", lower / "pkg" / "overlaypc",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (lower / "d").mkdir()
    (lower / "f").write_bytes(b"x")
    for d in ("upper", "work", "site"):
        (tmp_path / d).mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(OWN_MOUNT_AUDIT)
    err_path = tmp_path / "stderr"
    opts = f"lowerdir={lower},upperdir={tmp_path}/upper,workdir={tmp_path}/work"
    env = dict(helpers.overlaypc_env(), PYTHONPATH=f"{lower / 'pkg'}:{tmp_path / 'site'}",
               OWN_MOUNT=str(lower), OVERLAYPC_FAULTS="ops.lookup~crashes=crash")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "overlaypc", "-f", "-o", opts, str(lower)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=env, cwd=str(tmp_path), start_new_session=True)
    conn = None
    try:
        assert helpers.wait_until(lambda: helpers.is_mounted(lower) or proc.poll() is not None,
                                  60), "not mounted within 60 s"
        conn = _fuse_connection(lower)
        assert proc.poll() is None, err_path.read_text()
        client = _client(["sh", "-c", f"ls {lower} && echo y > {lower}/new && rmdir {lower}/d && "
                                      f"lsattr {lower}/f >/dev/null && ! stat {lower}/crashes "
                                      f"2>/dev/null && ls {lower}"], conn, tmp_path)
        assert (client.returncode, client.stdout) == (0, "d\nf\npkg\nf\nnew\npkg\n"), \
            client.stderr
    finally:
        _stop(proc, lower, conn, tmp_path)
    assert proc.returncode == 0, err_path.read_text()
    log = err_path.read_text()
    assert "injected crash at ops.lookup" in log and "faults.hit(" in log  # (source shown)
    assert [line for line in helpers.unexpected_log_lines(log)
            if "in LOOKUP" not in line and not line.startswith("Traceback")] == []


def _client(argv: list[str], conn: str | None, scratch) -> subprocess.CompletedProcess:
    """Run ``argv`` (requests to a mount on FUSE connection ``conn``) for at most 30 s. On
    timeout the connection is aborted before the client is killed: a client waiting for
    an answer already sent to the daemon is not ended by SIGKILL, and waiting for it would
    hang the suite."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        if conn is not None:
            _abort_connection(conn, scratch)
        proc.kill()
        proc.communicate()
        raise AssertionError("the client's requests hung (30 s)") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
