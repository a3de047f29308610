"""Which new directories get the ``opaque`` mark, the kernel overlay (6.18) as the oracle
(parity50). Each session runs on a fresh stack per side over one lower; the merged answers and
the upper layer's directories (their overlay marks other than ``origin``, ``impure`` and
``uuid``) must match.

The kernel marks a directory opaque
- when MKDIR makes it in a merged parent (``ovl_create_upper``: "just an optimization", it
  spares the lookups below), only where the mount's options forbid offline changes of the
  lower layers (``ovl_allow_offline_changes``: ``redirect_dir=on``, ``index=on``,
  ``metacopy=on`` or ``xino=on``); never in an upper-only or opaque parent;
- when a rename moves an upper-only directory that is not opaque into a merged parent
  (``ovl_rename``), whatever the options, within that parent too;
- when MKDIR makes it over a whiteout (``ovl_create_over_whiteout``, always).
A directory's copy-up (a chmod, a name made in it) marks nothing.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from test_fifteenth_round_kernel import _err
from test_protattr import _each_side

pytestmark = [pytest.mark.mount, pytest.mark.kernel_overlay]

#: the same options on both sides (the kernel's pinned ones first: a later one wins)
OPTIONS = {
    "redirect_off": ("redirect_dir=off",),
    "redirect_on": ("redirect_dir=on",),
    "xino_on": ("redirect_dir=off", "xino=on"),
    "index": ("redirect_dir=on", "index=on"),
    "metacopy": ("redirect_dir=on", "metacopy=on"),
    "userxattr": ("userxattr", "redirect_dir=nofollow"),
    "userxattr_xino_on": ("userxattr", "redirect_dir=nofollow", "xino=on"),
}
#: the marks compared (a copy-up's ``origin`` differs by value, ``impure`` and ``uuid`` are
#: other tests')
MARKS = ("opaque", "redirect")


def _lower(root: Path) -> Path:
    lower = root / "lower"
    for d in ("m", "r", "c", "w", "w2", "p/deep"):
        (lower / d).mkdir(parents=True)
    for d in ("m", "r", "c", "p"):
        (lower / d / "f").write_bytes(b"lower " + d.encode())
    return lower


def _session(mnt: Path) -> dict:
    got = {}
    os.mkdir(mnt / "new")                     # in the merged root
    os.mkdir(mnt / "m" / "new")               # in a lower directory, copied up by it
    os.mkdir(mnt / "new" / "inner")           # in an upper-only directory
    got["rm -rf p"] = subprocess.run(["rm", "-rf", str(mnt / "p")]).returncode
    os.mkdir(mnt / "p")                       # over a whiteout
    os.mkdir(mnt / "p" / "x")                 # in an opaque directory
    os.rmdir(mnt / "w")
    os.mkdir(mnt / "w")                       # over a whiteout (an empty lower directory)
    os.chmod(mnt / "c", 0o750)                # a directory's copy-up
    os.mkdir(mnt / "c" / "x")                 # in the copied-up (merged) directory
    for n in ("mv1", "mv2", "mv3", "mv4"):
        os.mkdir(mnt / "new" / n)
    got["rename into merged"] = _err(lambda: os.rename(mnt / "new" / "mv1", mnt / "m" / "mv1"))
    got["rename into root"] = _err(lambda: os.rename(mnt / "new" / "mv2", mnt / "mv2"))
    os.rmdir(mnt / "w2")
    got["rename over a whiteout"] = _err(lambda: os.rename(mnt / "new" / "mv3", mnt / "w2"))
    got["rename within upper-only"] = _err(lambda: os.rename(mnt / "new" / "mv4",
                                                             mnt / "new" / "inner" / "mv4"))
    os.mkdir(mnt / "a")
    got["rename within root"] = _err(lambda: os.rename(mnt / "a", mnt / "b"))
    got["rename lower r"] = _err(lambda: os.rename(mnt / "r", mnt / "new" / "r"))
    got["mkdir in moved r"] = _err(lambda: os.mkdir(mnt / "new" / "r" / "x"))
    got["tree"] = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
    return got


def _marks(upper: Path) -> dict:
    """The upper layer's directories: the overlay marks ``MARKS`` each has (names only, in
    either xattr namespace)."""
    out = {}
    for p in sorted(upper.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            names = sorted(n.split(".", 2)[2] for n in os.listxattr(p)
                           if n.startswith(("trusted.overlay.", "user.overlay."))
                           and n.split(".", 2)[2] in MARKS)
            out[str(p.relative_to(upper))] = names
    return out


@pytest.mark.parametrize("opts", sorted(OPTIONS))
def test_new_directories_opaque_as_the_kernel(opts, tmp_path, overlay_mount, kernel_mount):
    """Before (parity50): overlaypc set ``opaque`` on a new directory only over a whiteout
    and on a directory renamed onto a lower name: ``'new': (['opaque'], [])`` (the
    kernel's, overlaypc's; redirect_dir=on), ``'mv2': (['opaque'], [])`` (a rename into the
    root)."""
    lower = _lower(tmp_path)
    stacks: dict = {}
    got = _each_side(tmp_path, lower, _session, overlay_mount, kernel_mount, stacks=stacks,
                     opts=OPTIONS[opts])
    assert got["overlaypc"] == got["kernel"]
    kernel, ours = _marks(stacks["kernel"].upper), _marks(stacks["overlaypc"].upper)
    assert kernel["mv2"] == ["opaque"]  # (the kernel's rule as this test reads it)
    assert sorted(ours) == sorted(kernel)
    assert {d: (marks, ours[d]) for d, marks in kernel.items() if ours[d] != marks} == {}, \
        "(kernel's, overlaypc's) marks where they differ"
