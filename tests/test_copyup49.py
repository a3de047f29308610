"""copyup49: a copy-up with fewer system calls and less Python, the same result.

A copy-up reads the debug level once for its changes (``layer.debugging``), and each change
is still logged at DEBUG. Driven without FUSE (``CoreDriver``)."""
from __future__ import annotations

import logging
import os

import pytest

import helpers
from core_driver import CoreDriver


@pytest.fixture
def drv(tmp_path):
    helpers.require("root")  # (trusted.overlay.origin, as every copy-up of the mount)
    lower = tmp_path / "lower"
    (lower / "d" / "e").mkdir(parents=True)
    for name in ("f", "g", "h"):
        (lower / "d" / name).write_bytes(b"lower " + name.encode())
    (lower / "d" / "e" / "k").write_bytes(b"below")
    (lower / "top").write_bytes(b"at the root")
    d = CoreDriver.in_dir(tmp_path)
    yield d
    d.close()


def test_a_copy_up_logs_each_of_its_changes_at_debug(drv, caplog):
    """The debug level read once per copy-up (``CopyUpContext.debug``) still has every
    change of the copy-up logged when it is on, and none built when it is off."""
    with caplog.at_level(logging.DEBUG, logger="overlaypc.layer"):
        drv.fs.copyup.ensure_upper("d/f")
    lines = [r.getMessage() for r in caplog.records if r.name == "overlaypc.layer"]
    for what in ("create", "chown", "chmod", "utime", "rename"):
        assert any(f": {what} " in line for line in lines), (what, lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="overlaypc.layer"):
        drv.fs.copyup.ensure_upper("d/g")
    assert not [r for r in caplog.records if r.name == "overlaypc.layer"]
    assert os.path.isfile(drv.fs.stack.upper.path + "/d/g")
