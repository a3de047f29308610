"""review24: second review of session 9's merges (limits23, soak23, chmod21).

A name in the upper layer that is a mount point (a bind mount of a file or directory
from outside the layer, on the same filesystem, so it passes the lookup's ``st_dev``
check): a change of it through the mount must not reach the bind mount's source, as
the confined ``openat2`` paths refuse it (``RESOLVE_NO_XDEV``).
"""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

import helpers

pytestmark = [pytest.mark.mount]


@pytest.fixture
def bound(tmp_path: Path):
    """(lower, upper, work, outside): ``outside/secret`` (a file, mode 0600) and
    ``outside/sdir`` (a directory, mode 0700) bind-mounted on ``upper/f`` and ``upper/d``."""
    helpers.require("root")
    lower, upper, work, outside = (tmp_path / n for n in ("lower", "upper", "work", "outside"))
    for p in (lower, upper, work, outside):
        p.mkdir()
    (outside / "secret").write_bytes(b"secret")
    os.chmod(outside / "secret", 0o600)
    (outside / "sdir").mkdir(mode=0o700)
    os.chmod(outside / "sdir", 0o700)
    (upper / "f").write_bytes(b"covered")
    (upper / "d").mkdir()
    made = []
    try:
        for src, dst in ((outside / "secret", upper / "f"), (outside / "sdir", upper / "d")):
            subprocess.run(["mount", "--bind", str(src), str(dst)], check=True, capture_output=True)
            made.append(dst)
        yield lower, upper, work, outside
    finally:
        for dst in reversed(made):
            helpers.force_unmount(dst)


_CHANGES = {
    "chmod": lambda p: os.chmod(p, 0o777),
    "chown": lambda p: os.chown(p, 1234, 1234),
    "utime": lambda p: os.utime(p, ns=(10**9, 10**9)),
}


def _shown(st: os.stat_result) -> tuple:
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns


@pytest.mark.parametrize("change", sorted(_CHANGES))
@pytest.mark.parametrize("name,what", [("f", "secret"), ("d", "sdir")])
def test_change_of_a_bind_mounted_upper_name_stays_in_the_layer(name, what, change, bound,
                                                                 overlay_mount):
    lower, upper, work, outside = bound
    m = overlay_mount(f"lowerdir={lower},upperdir={upper},workdir={work}")
    before = _shown(os.lstat(outside / what))
    try:
        _CHANGES[change](m.mountpoint / name)
    except OSError:
        pass  # refused: what the confined paths answer (EXDEV)
    assert _shown(os.lstat(outside / what)) == before, \
        f"{change} through the mount changed {outside / what}, outside the layer"
