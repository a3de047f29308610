"""A READDIRPLUS listing of a directory found in one layer only takes one pass
(``readdir._one_layer_plus``): the same entries, in the same order, with the same
attributes, and the same files kept for the opens that follow, as the general merging pass
(``merged_listing`` with that pass left out). Lower directories holding what the general
pass treats apart: hard links, a symlink, a fifo, a character device, a whiteout and OCI
names (in a lower layer too), subdirectories with and without a ``redirect`` xattr in a
lower layer above the bottom one and in the bottom one; under metacopy, mapped IDs
(``squash_to_uid``) and inode numbers through xino (the lowers on a tmpfs of their own).
Upper directories (upper-only, and opaque over a lower one) holding the same, plus what
only an upper's numbers depend on: objects the mount made (their numbers kept with no
origin), copied-up files renamed there (an origin's number, and a second copy naming the
same origin: its own), one changed behind the mount's back (nothing kept: its xattrs read).
"""
from __future__ import annotations

import os
import stat

import pytest

from overlaypc import readdir
from overlaypc.config import MountConfig, validate
from overlaypc.core import OverlayFS
from overlaypc.readdir import merged_listing

PREFIX = "trusted.overlay."


def _lower(d, redirects: bool) -> None:
    d.mkdir(parents=True)
    for i in range(12):
        (d / f"f{i}").write_bytes(b"x" * i)
    (d / "hard1").write_text("h")
    os.link(d / "hard1", d / "hard2")
    os.symlink("f1", d / "link")
    os.mkfifo(d / "fifo")
    os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(d / "gone", stat.S_IFCHR | 0o600, 0)  # a whiteout (of nothing below)
    (d / ".wh.oci").write_text("")
    (d / ".wh..wh..opq").write_text("")
    for sub in ("plain", "moved"):
        (d / sub).mkdir()
    if redirects:
        os.setxattr(d / "moved", PREFIX + "redirect", b"/elsewhere")


def _listings(fs, rel: str, monkeypatch) -> list:
    got = []
    for one in (True, False):
        if not one:
            monkeypatch.setattr(readdir, "_one_layer_plus", lambda *a: None)
        files: dict = {}
        entries = merged_listing(fs.lookup.directory(rel), fs.inos, fs.prefix, plus=True,
                                 ownership=fs.ownership if fs.ownership.active else None,
                                 files=files, metacopy=fs.config.metacopy)
        got.append((entries, files))
    monkeypatch.undo()
    return got


@pytest.fixture
def stack_of(tmp_path):
    """``stack_of(lowers, options)``: a core over ``lowers`` (top first) with an upper."""
    made = []

    def make(lowers, options):
        for d in ("upper", "work", "mnt"):
            (tmp_path / d).mkdir()
        cfg = MountConfig(lowers=[str(x) for x in lowers], upper=str(tmp_path / "upper"),
                          work=str(tmp_path / "work"), mountpoint=str(tmp_path / "mnt"), **options)
        validate(cfg)
        fs = OverlayFS(cfg)
        fs.start()
        made.append(fs)
        return fs
    yield make
    for fs in made:
        fs.close()


@pytest.mark.parametrize("options", [{}, {"metacopy": True}, {"squash_to_uid": 4321}, "xino"])
def test_one_lower_pass_lists_as_the_merging_pass(tmp_path, tmpfs_factory, stack_of,
                                                  monkeypatch, options):
    lowers_at = tmpfs_factory() if options == "xino" else tmp_path
    top, bottom = lowers_at / "l1", lowers_at / "l2"
    _lower(top / "d", redirects=True)  # (above the bottom layer: its redirect is read)
    _lower(bottom / "e", redirects=True)  # (the bottom layer: never)
    fs = stack_of([top, bottom], {} if options == "xino" else options)
    if options == "xino":
        assert fs.inos.xino.bits  # (inode numbers through xino: the lowers' own tmpfs)
    for rel in ("d", "e"):
        (one, one_files), (general, general_files) = _listings(fs, rel, monkeypatch)
        assert one == general and one_files == general_files
        names = [e.name for e in one]
        assert "gone" not in names and ".wh.oci" not in names and ".wh..wh..opq" not in names
        without = {e.name for e in one if e.attr is None}
        assert {"hard1", "hard2"} <= without
        assert ("moved" in without) is (rel == "d")  # (a redirect read above the bottom only)



@pytest.mark.parametrize("options", [{}, {"metacopy": True}, {"squash_to_uid": 4321}, "xino"])
def test_one_upper_pass_lists_as_the_merging_pass(tmp_path, tmpfs_factory, monkeypatch, options):
    at = tmpfs_factory() if options == "xino" else tmp_path  # (xino: upper and lower apart)
    low, upper = at / "l1", tmp_path / "upper"
    for i in range(3):
        (low / "src").mkdir(parents=True, exist_ok=True)
        (low / "src" / f"c{i}").write_text("lower")
    _lower(low / "opaque", redirects=False)  # (hidden by the opaque upper directory)
    _lower(upper / "u", redirects=True)  # (made before the mount: nothing kept for them)
    _lower(upper / "opaque", redirects=True)
    os.setxattr(upper / "opaque", PREFIX + "opaque", b"y")
    for d in ("work", "mnt"):
        (tmp_path / d).mkdir()
    cfg = MountConfig(lowers=[str(low)], upper=str(upper), work=str(tmp_path / "work"),
                      mountpoint=str(tmp_path / "mnt"), **({} if options == "xino" else options))
    validate(cfg)
    fs = OverlayFS(cfg)
    fs.start()
    try:
        if options == "xino":
            assert fs.inos.xino.bits
        fs.mkdir("made", 0o755)  # upper-only, made by the mount
        for i in range(3):
            fs.chmod(f"src/c{i}", 0o600)  # copied up, their origins recorded
        fs.rename("src/c0", "made/c0")
        fs.rename("src/c1", "u/c1")
        fs.rename("src/c2", "opaque/c2")
        os.link(upper / "made" / "c0", upper / "made" / "c0-copy")  # (another name: no attr)
        fh = fs.create("made/new", os.O_WRONLY, 0o644).fh
        fs.release(fh)
        fs.mkdir("made/sub", 0o755)
        fs.symlink("new", "made/link")
        # one origin named by two upper files: the second listed shows its own number
        os.system(f"cp -a {upper / 'u' / 'c1'} {upper / 'u' / 'c1-twin'}")
        (upper / "made" / "new").chmod(0o640)  # changed behind the mount: its stat's ctime moved
        for rel in ("made", "u", "opaque"):
            (one, one_files), (general, general_files) = _listings(fs, rel, monkeypatch)
            assert one == general and one_files == general_files
            names = [e.name for e in one]
            assert "gone" not in names and ".wh.oci" not in names and ".wh..wh..opq" not in names
            without = {e.name for e in one if e.attr is None}
            if rel == "made":
                assert {"c0", "c0-copy"} <= without  # (two links now)
            else:
                assert {"hard1", "hard2", "moved"} <= without  # (a redirect of an upper dir: read)
            if rel == "opaque":
                assert "c2" in names and "f0" in names
        shown = {e.name: e.ino for e in fs.readdir("u", plus=True)}
        assert shown["c1"] != shown["c1-twin"]  # (one origin: one object shows it)
    finally:
        fs.close()
