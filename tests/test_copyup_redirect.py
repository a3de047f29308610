"""The data copy-up of a renamed metacopy file keeps its ``trusted.overlay.redirect``, as
the kernel overlay's (``ovl_copy_up_meta_inode_data`` removes only the metacopy mark; a
redirect of a file without the mark is never followed, by either), with and without
``index=on``: a file written, one given a second name through the mount first (an upper
hard link: its data copied in at the write, by both since peer45), and a
lower hard link (without index: with it, overlaypc's copy-up of a lower hard link copies
its data at once, the kernel's copies metadata only). left26: overlaypc removed it.
Differential with the kernel overlay (``upper_support.on_both``): the upper files'
redirect and metacopy mark after the same changes, each side over its own lower copy.
"""
from __future__ import annotations

import os

import pytest

import helpers
from upper_support import on_both

LOWER = {"f": "single file\n", "g": "linked up\n", "hl": "hard link\n",
         "hl2": helpers.HardLink("hl"), "d": helpers.Dir()}
#: run: (overlaypc's options, the kernel's, the lower files moved into d)
RUNS = {"plain": ("metacopy=on,redirect_dir=on", ("redirect_dir=on", "metacopy=on"),
                  ("f", "g", "hl")),
        "index": ("metacopy=on,redirect_dir=on,index=on",
                  ("redirect_dir=on", "metacopy=on", "index=on"), ("f", "g"))}


def _moved_then_written(names):
    """Each lower file of ``names`` chmod-ed (a metacopy copy-up), renamed into ``d`` (an
    absolute redirect to its data), ``g`` linked to ``d/g2`` then, then each written (its
    data copy-up): what it reads."""
    def scenario(m: str) -> list:
        out = []
        for name in names:
            os.chmod(f"{m}/{name}", 0o640)
            os.rename(f"{m}/{name}", f"{m}/d/{name}")
            if name == "g":
                os.link(f"{m}/d/g", f"{m}/d/g2")
            with open(f"{m}/d/{name}", "r+b") as f:
                f.write(b"W")
            with open(f"{m}/d/{name}", "rb") as f:
                out.append((name, f.read()))
        return out
    return scenario


def _marks(upper, names) -> dict:
    """Each moved file's redirect and whether it is still marked metacopy, in ``upper``."""
    out = {}
    for name in names:
        path = upper / "d" / name
        found = os.listxattr(path, follow_symlinks=False)
        redirect = os.getxattr(path, "trusted.overlay.redirect", follow_symlinks=False) \
            if "trusted.overlay.redirect" in found else None
        out[name] = (redirect, "trusted.overlay.metacopy" in found)
    return out


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_data_copy_up_keeps_the_redirect(run, tmp_path, overlay_mount, kernel_mount):
    """Before: overlaypc's upper files had no redirect left (the kernel's kept ``/f``...)."""
    ours_opts, kernel_opts, names = RUNS[run]
    kernel, ours = on_both(tmp_path, overlay_mount, kernel_mount, LOWER, ours_opts,
                           kernel_opts, _moved_then_written(names))
    assert ours == kernel
    theirs = _marks(tmp_path / "kernel" / "upper", names)
    assert theirs == {n: (os.fsencode("/" + n), False) for n in names}  # (the oracle)
    assert _marks(tmp_path / "ours" / "upper", names) == theirs
