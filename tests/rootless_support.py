"""Running overlaypc the ways an unprivileged user does: as a plain user (through
fusermount3) and as uid 0 of a user namespace (``unshare -Urm``, as rootless podman runs
its mount program).

What this module owns:
- ``user_python()``: a Python interpreter and environment with which another user can run
  this checkout's overlaypc (the suite's own interpreter may live where only root can read,
  e.g. a pyenv under /root: then the system python3 of the same version, given the venv's
  site-packages);
- ``shared_dir()``: a scratch directory outside pytest's 0700 tmp tree, owned by a user,
  removed (after unmounting anything left below it) at the end;
- ``as_user()``: the ``setpriv`` prefix that runs a command as that user;
- this file run as a script inside ``unshare -Urm`` (``userns_session``): mount overlaypc
  in the foreground, run shell steps in the merged view, snapshot it, unmount, and report
  (a pickle), all inside the namespace, where the mount lives.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
NOBODY = 65534


def package_root() -> str:
    """Where the daemons import overlaypc from: this checkout, or the copy named by
    ``OVERLAYPC_TEST_PYTHONPATH`` (as ``helpers.overlaypc_env``)."""
    return os.environ.get("OVERLAYPC_TEST_PYTHONPATH") or str(REPO_ROOT)


def as_user(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def _python_works(python: str, env: dict, uid: int, gid: int) -> bool:
    # through sh: setpriv itself execs with root's capabilities still effective, so it
    # can start an interpreter whose files the user cannot read (a pyenv under /root),
    # which then runs on whatever stdlib it finds; a process of the user cannot
    r = subprocess.run(as_user(uid, gid) + ["sh", "-c", 'exec "$0" -c "import yaml, overlaypc"',
                                            python], env=env, cwd="/", capture_output=True)
    return r.returncode == 0


def user_python(uid: int, gid: int) -> Optional[tuple[str, dict]]:
    """(interpreter, environment) with which ``uid`` runs this checkout's overlaypc, or
    None when there is none."""
    paths = [package_root()]
    env = dict(os.environ, PYTHONPATH=package_root(), PYTHONUNBUFFERED="1")
    if _python_works(sys.executable, env, uid, gid):
        return sys.executable, env
    paths += site.getsitepackages()  # the venv's packages, for an interpreter of its version
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (shutil.which(version), f"/usr/bin/{version}"):
        if candidate and _python_works(candidate, env, uid, gid):
            return candidate, env
    return None


def mounts_below(root: Path) -> list[str]:
    import helpers  # (tests/ is on the path of every process that calls this)

    prefix = str(root) + "/"
    return [mnt for mnt in helpers.mount_points() if mnt.startswith(prefix)]


@contextlib.contextmanager
def shared_dir(uid: int, gid: int, prefix: str = "overlaypc-rootless-") -> Iterator[Path]:
    """A fresh directory under /tmp owned by ``uid:gid`` (its parents are searchable by
    everyone); unmounts whatever is left below it, then removes it."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chown(root, uid, gid)
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        for mnt in reversed(mounts_below(root)):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def make_tree(root: Path, uid: int, gid: int) -> None:
    """chown -R, without following symlinks."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None] + dirnames + filenames:
            os.chown(dirpath if name is None else os.path.join(dirpath, name), uid, gid,
                     follow_symlinks=False)


# --------------------------------------------------------------------------------------
# Inside a user namespace
# --------------------------------------------------------------------------------------

def userns_session(options: str, mountpoint: str, steps: Sequence[str], report: str,
                   env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``session`` below in a new user and mount namespace (uid 0 inside)."""
    spec = pickle.dumps({"options": options, "mountpoint": mountpoint, "steps": list(steps),
                         "report": report})
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount",
                           sys.executable, __file__, "session"], input=spec,
                          env=dict(os.environ, **(env or {}), PYTHONPATH=package_root()),
                          capture_output=True, timeout=120)


def _is_mounted(path: str) -> bool:
    import helpers

    return path in helpers.mount_points()


def session() -> int:
    sys.path.insert(0, str(TESTS_DIR))
    import helpers  # noqa: E402  (the snapshot format the tests compare)

    spec = pickle.loads(sys.stdin.buffer.read())
    mnt = spec["mountpoint"]
    out: dict = {"uid_map": Path("/proc/self/uid_map").read_text(), "steps": []}
    with open(spec["report"] + ".log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "overlaypc", "-f", "-o", spec["options"], mnt],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not _is_mounted(mnt):
            if daemon.poll() is not None or time.monotonic() > deadline:
                out["error"] = f"not mounted (daemon status {daemon.poll()})"
                return _report(spec, out)
        for step in spec["steps"]:
            r = subprocess.run(["sh", "-c", step], cwd=mnt, capture_output=True, text=True)
            out["steps"].append((step, r.returncode, r.stdout + r.stderr))
        out["snapshot"] = helpers.tree_snapshot(mnt)
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        try:
            out["daemon_status"] = daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            out["daemon_status"] = "killed"
    return _report(spec, out)


def _report(spec: dict, out: dict) -> int:
    with open(spec["report"], "wb") as f:
        pickle.dump(out, f)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["session"]:
        sys.exit(session())
    sys.exit(f"usage: {sys.argv[0]} session")
