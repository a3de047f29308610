"""A file marked known-clean of privileges at its first capability question
(speed10, ``Files._capability_fd``) is checked again after privileges came back through
another name of the same inode: an upper hard link's other name, an index=on lower hard
link's other name (the change reaches the shared index entry), the file's new name
after a rename over another file. Each path:
chmod u+s and setxattr security.capability; then a killing write through the handle marked
clean must strip them. Driven without FUSE (``core_driver``)."""
from __future__ import annotations

import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver
from test_killpriv_core import _capability
from overlaypc.engine import protocol as p
from overlaypc.engine.ops import Request

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep, v2
WRITER = Request(uid=65534, gid=65534, pid=os.getpid())


@pytest.mark.parametrize("change", ["chmod", "setcap"])
@pytest.mark.parametrize("how", ["upper_link", "index_link", "renamed_over"])
def test_privileges_through_another_name_void_the_clean_mark(tmp_path, how, change):
    helpers.require("root")
    lower = {"d/x": "x"}
    if how == "index_link":
        lower.update({"f": "data", "g": helpers.HardLink("f")})
    helpers.build_layer(tmp_path / "lower", lower)
    drv = CoreDriver.in_dir(tmp_path, index=how == "index_link")
    try:
        root = drv.root()
        if how == "upper_link":
            node, fh0 = drv.create(root, "f", os.O_WRONLY, 0o644)
            drv.release(fh0)
            drv.link(node, root, "g")
        if how == "renamed_over":
            for name in ("f", "g"):
                drv.release(drv.create(root, name, os.O_WRONLY, 0o644)[1])
        f = drv.lookup(root, "f")
        fh = drv.open(f, os.O_WRONLY)       # (index=on: f copied up, g still the index's)
        assert _capability(drv, f.nodeid) is None   # the kernel's question: marked clean
        assert drv.fs.files.privileges_known_clean(fh)
        if how == "renamed_over":  # f's file now named g (over an upper g), f gone
            drv.rename(root, "f", root, "g")
            upper_f = tmp_path / "upper" / "g"
        else:
            upper_f = tmp_path / "upper" / "f"
        g = drv.lookup(root, "g")
        if change == "chmod":
            drv.setattr(g, mode=0o4755)
        else:
            drv.ops.setxattr(REQ, g.nodeid, "security.capability", CAP, 0)
        st = os.lstat(upper_f)  # (the change reached f's inode: one file, two names)
        assert st.st_mode & stat.S_ISUID or "security.capability" in os.listxattr(upper_f)
        drv.ops.write(WRITER, f.nodeid, fh, memoryview(b"y"), 0, p.WRITE_KILL_SUIDGID)
        assert not os.lstat(upper_f).st_mode & stat.S_ISUID, oct(os.lstat(upper_f).st_mode)
        assert "security.capability" not in os.listxattr(upper_f)
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()
