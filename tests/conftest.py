"""pytest wiring: Hypothesis profiles, markers, and the fixtures that mount things.

Fixtures (all clean up after themselves, even when the test fails):
- ``mountpoint``: a factory for unique, empty mountpoint dirs under tmp_path.
- ``layers_factory``: build layer trees from dict specs (see helpers.build_layer).
- ``overlay_mount``: start an overlaypc mount (helpers.Mount); teardown always unmounts, and
  fails the test on a non-zero daemon exit or ``ERROR``/``Traceback`` in the daemon's log,
  unless the test is marked ``@pytest.mark.daemon_errors_ok``.
- ``kernel_mount``: the kernel's overlayfs, with pinned options.
- ``tmpfs_factory``: fresh tmpfs mounts (each one its own filesystem, own inode numbers).
- ``xfs_fs`` (session) / ``xfs_dir``: a reflink-capable XFS on a loop device, and a
  per-test directory in it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))
sys.path.insert(0, str(TESTS_DIR.parent))  # the checkout's overlaypc package, for unit tests

import helpers  # noqa: E402

# --------------------------------------------------------------------------------------
# Hypothesis
# --------------------------------------------------------------------------------------
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=30, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile(
    "dev", deadline=None, max_examples=20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
#: defect hunts: dev's settings with a large budget (``OVERLAYPC_HUNT_EXAMPLES``, default 500);
#: pass ``--hypothesis-seed=<n>`` for another seed
settings.register_profile(
    "hunt", settings.get_profile("dev"),
    max_examples=int(os.environ.get("OVERLAYPC_HUNT_EXAMPLES", "500")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# --------------------------------------------------------------------------------------
# Markers
# --------------------------------------------------------------------------------------
MOUNT_FIXTURES = {"overlay_mount", "kernel_mount", "xfs_fs", "xfs_dir", "tmpfs_factory"}


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "mount: needs a real FUSE mount (root and /dev/fuse)",
        "reflink: needs a reflink-capable filesystem (XFS, e.g. on a loop image)",
        "kernel_overlay: compares against kernel overlayfs (mount -t overlay)",
        "slow: takes long; deselect with -m 'not slow'",
        "daemon_errors_ok: the test provokes daemon errors; do not fail on ERROR lines in its log",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & MOUNT_FIXTURES:
            item.add_marker(pytest.mark.mount)
        if "kernel_mount" in names:
            item.add_marker(pytest.mark.kernel_overlay)
        if names & {"xfs_fs", "xfs_dir"}:
            item.add_marker(pytest.mark.reflink)


# --------------------------------------------------------------------------------------
# Directories and layers
# --------------------------------------------------------------------------------------
@pytest.fixture
def mountpoint(tmp_path: Path):
    """Factory: ``mountpoint(name="mnt")`` -> a new empty directory, unique per call."""
    counter = itertools.count()

    def make(name: str = "mnt") -> Path:
        p = tmp_path / f"{name}{next(counter)}"
        p.mkdir()
        return p

    return make


@pytest.fixture
def layers_factory(tmp_path: Path):
    """Factory: ``layers_factory({"top": {...}, "mid": {...}, "bot": {...}}, where={...})``.

    Layers are listed top first (as in lowerdir=). `where` maps a layer name to a base dir
    (e.g. a tmpfs or the XFS fixture); default is tmp_path/layers-N. Returns helpers.Layers.
    Also offers ``layers_factory.empty_dir(name, base=None)`` for upper/work dirs.
    """
    counter = itertools.count()

    def make(spec, where=None) -> helpers.Layers:
        n = next(counter)
        where = where or {}
        dirs = {}
        for name, layer_spec in spec.items():
            base = Path(where.get(name, tmp_path / f"layers{n}"))
            dirs[name] = helpers.build_layer(base / name, layer_spec)
        return helpers.Layers(dirs)

    def empty_dir(name: str, base=None) -> Path:
        p = Path(base or tmp_path) / name
        p.mkdir(parents=True)
        return p

    make.empty_dir = empty_dir  # type: ignore[attr-defined]
    return make


# --------------------------------------------------------------------------------------
# overlaypc mounts
# --------------------------------------------------------------------------------------
@pytest.fixture
def overlay_mount(request: pytest.FixtureRequest, tmp_path: Path, mountpoint):
    """Factory: ``overlay_mount("lowerdir=A:B,upperdir=U,workdir=W", **Mount kwargs)``.

    Returns a started helpers.Mount. A test may unmount itself (``m.unmount()``) to check
    the result; whatever is left mounted is unmounted at teardown, and problems found then
    (bad exit status, ERROR/Traceback in the log) fail the test.
    """
    helpers.require_fuse_mount()
    mounts: list[helpers.Mount] = []
    allow = request.node.get_closest_marker("daemon_errors_ok") is not None

    def make(options="", *, mnt=None, **kwargs) -> helpers.Mount:
        kwargs.setdefault("allow_daemon_errors", allow)
        kwargs.setdefault("log_dir", tmp_path)
        m = helpers.Mount(mnt or mountpoint(), options, **kwargs)
        mounts.append(m)
        return m.start()

    yield make

    problems = []
    for m in reversed(mounts):
        try:
            problems += [f"{m.mountpoint}: {p}" for p in m.unmount(check=False)]
        except Exception as e:  # never leave a mount behind because one unmount raised
            problems.append(f"{m.mountpoint}: teardown raised {e!r}")
            helpers.force_unmount(m.mountpoint)
    if problems:
        logs = "\n".join(f"--- {m.log_path} ---\n{m.log_text()}" for m in mounts)
        pytest.fail("overlaypc teardown problems:\n" + "\n".join(problems) + "\n" + logs,
                    pytrace=False)


# --------------------------------------------------------------------------------------
# Kernel overlayfs
# --------------------------------------------------------------------------------------
@pytest.fixture
def kernel_mount(mountpoint):
    """Factory: ``kernel_mount(lowers, upper=None, work=None)`` -> mounted Path."""
    helpers.require("root")
    helpers.require("kernel_overlay")
    with contextlib.ExitStack() as stack:
        def make(lowers, upper=None, work=None, extra_options=()) -> Path:
            return stack.enter_context(helpers.kernel_overlay(
                mountpoint("kmnt"), lowers, upper, work, extra_options))
        yield make


# --------------------------------------------------------------------------------------
# Scratch filesystems
# --------------------------------------------------------------------------------------
@pytest.fixture
def tmpfs_factory(tmp_path: Path):
    """Factory: ``tmpfs_factory(size, options)`` -> Path of a fresh tmpfs mount (unmounted
    at teardown); ``options``: more mount options (``nr_inodes=N``)."""
    helpers.require("root")
    made: list[Path] = []
    counter = itertools.count()

    def make(size: str = "64m", options: str = "") -> Path:
        p = tmp_path / f"tmpfs{next(counter)}"
        p.mkdir()
        opts = f"size={size},mode=0755" + (f",{options}" if options else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(p)],
                       check=True, capture_output=True)
        made.append(p)
        return p

    yield make
    for p in reversed(made):
        helpers.force_unmount(p)


@pytest.fixture(scope="session")
def xfs_fs(tmp_path_factory: pytest.TempPathFactory):
    """A 1 GiB sparse XFS (reflink=1) on a direct-io loop device, for the whole session."""
    helpers.require("root")
    helpers.require("xfs")
    base = tmp_path_factory.mktemp("xfs")
    image, mnt = base / "xfs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    r = subprocess.run(["losetup", "--direct-io=on", "--find", "--show", str(image)],
                       capture_output=True, text=True)
    helpers.require(r.returncode == 0, f"losetup failed: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", dev], check=True,
                       capture_output=True)
        subprocess.run(["mount", "-t", "xfs", dev, str(mnt)], check=True, capture_output=True)
        try:
            yield mnt
        finally:
            helpers.force_unmount(mnt)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)  # only our device
        with contextlib.suppress(OSError):
            image.unlink()


@pytest.fixture
def xfs_dir(xfs_fs: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory of this test's own on the session XFS."""
    prefix = "".join(c if c.isalnum() else "_" for c in request.node.name)[:60] + "-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=xfs_fs))


@pytest.fixture(autouse=True)
def _umask_unchanged():
    """A test leaves the process umask as it found it: cores made in-process set it to 0
    (as the daemon does) and restore it at close, so cores closed in the wrong order leaked
    0 to the tests after them (a later differential test then built its two sides' lower
    layers with different modes). The test that changes it fails, not a later one."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    after = os.umask(before)
    assert after == before, f"the test left the umask {after:#o} (it found {before:#o})"
