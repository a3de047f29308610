"""A real mount's start-up: what its daemon has imported when the kernel's first request
reaches it (``NEVER_AT_START`` of test_startup_unit, and the slow standard modules of
``SLOW_STDLIB``), so a module made lazy for start-up does not silently come back (an
import moved up, a new eager use) while the in-process tests, which stop before INIT,
would not see it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import helpers
from test_startup_unit import NEVER_AT_START, NOT_AT_START, SLOW_STDLIB

#: the ``overlaypc`` command (``entry.main``, as bin/overlaypc runs it) with the session's
#: ``dispatch`` wrapped: at the first request it writes the names in ``sys.modules`` to
#: the file given as its first argument. (``session`` is imported first here: the mount
#: imports it before its first request anyway.)
PROBE = r"""
import sys
from overlaypc.engine.session import Session
out = sys.argv.pop(1)
dispatch = Session.dispatch
seen = []
def first(self, *args, **kwargs):
    if not seen:
        seen.append(1)
        with open(out + ".tmp", "w") as f:
            f.write(" ".join(sorted(sys.modules)))
        import os
        os.rename(out + ".tmp", out)
    return dispatch(self, *args, **kwargs)
Session.dispatch = first
from overlaypc.entry import main
sys.argv[0] = "overlaypc"
sys.exit(main())
"""


def test_the_first_request_finds_no_module_start_up_does_not_need(tmp_path):
    """A default mount, run as the command runs it (``-f``), answers the first request of
    its caller (a ``stat`` of the mount point) having imported none of ``NEVER_AT_START``,
    ``NOT_AT_START`` (index=on only) or ``SLOW_STDLIB``: INIT, the first worker and the
    request itself included."""
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
        if helpers.is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            helpers.force_unmount(mnt)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    loaded = set(out.read_text().split())
    assert "overlaypc.overlay_ops" in loaded           # (the probe saw the mount's imports)
    assert sorted(loaded & set(NEVER_AT_START + NOT_AT_START + SLOW_STDLIB)) == []
