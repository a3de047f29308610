"""A creation right after a lookup that found its name absent (the kernel's negative LOOKUP
before a CREATE, MKDIR...: one per file of an untar) reuses that lookup (``Lookup.absent``)
while no change of the namespace ran since; a name taken behind the mount's back meanwhile
is decided as a fresh lookup decides it. Driven on a real ``OverlayFS`` over plain
directories (no FUSE), as test_kept_lookups.py."""
from __future__ import annotations

import errno
import os
import random
import stat
import threading

import pytest

from overlaypc.core import OverlayFS
from test_kept_lookups import counting_lookups, fs_factory, read_all, write_new  # noqa: F401 (a fixture)


def negative_lookup(fs, rel: str) -> None:
    """What the kernel's LOOKUP of an absent name does."""
    with pytest.raises(FileNotFoundError):
        fs.lookup_attr(rel)


CREATIONS = {
    "create": lambda fs, rel: write_new(fs, rel, b"made\n"),
    "mkdir": lambda fs, rel: fs.mkdir(rel, 0o755),
    "symlink": lambda fs, rel: fs.symlink("target", rel),
}


@pytest.mark.parametrize("how", CREATIONS)
def test_a_creation_after_a_negative_lookup_does_not_look_up_again(fs_factory, monkeypatch, how):
    fs = fs_factory({"d/x": b"lower\n"}, upper={"d/keep": b"upper\n"})  # (d merged, in the upper)
    negative_lookup(fs, "d/new")
    seen = counting_lookups(fs, monkeypatch)
    CREATIONS[how](fs, "d/new")
    assert "d/new" not in seen
    assert fs.lookup.lookup("d/new").exists


def test_a_change_between_the_lookup_and_the_creation_voids_it(fs_factory, monkeypatch):
    fs = fs_factory({"d/x": b"lower\n"}, upper={"d/keep": b"upper\n"})
    negative_lookup(fs, "d/new")
    write_new(fs, "d/other", b"other\n")  # a change of the namespace
    seen = counting_lookups(fs, monkeypatch)
    write_new(fs, "d/new", b"made\n")
    assert "d/new" in seen
    assert read_all(fs, "d/new") == b"made\n"


def test_a_lookup_is_reused_once(fs_factory):
    fs = fs_factory({"d/x": b"lower\n"})
    negative_lookup(fs, "d/new")
    assert fs.lookup.absent("d/new") is not None
    assert fs.lookup.absent("d/new") is None


@pytest.mark.parametrize("how", CREATIONS)
def test_a_name_taken_behind_the_mounts_back_after_the_lookup_fails_eexist(fs_factory, how):
    """As a fresh lookup would have found: the upper object made meanwhile is not touched."""
    fs = fs_factory({"d/x": b"lower\n"}, upper={"d/keep": b"upper\n"})
    negative_lookup(fs, "d/new")
    (fs.root / "upper/d/new").write_bytes(b"theirs\n")
    with pytest.raises(OSError) as e:
        CREATIONS[how](fs, "d/new")
    assert e.value.errno == errno.EEXIST
    assert (fs.root / "upper/d/new").read_bytes() == b"theirs\n"


def test_a_whiteout_made_behind_the_mounts_back_after_the_lookup_is_created_over(fs_factory):
    """The name's whiteout (made in the upper meanwhile) makes the upper's create fail
    EEXIST; decided afresh, the new file replaces the whiteout, as without the kept lookup."""
    fs = fs_factory({"d/x": b"lower\n"}, upper={"d/keep": b"upper\n"})
    negative_lookup(fs, "d/new")
    os.mknod(fs.root / "upper/d/new", stat.S_IFCHR | 0o600, 0)
    write_new(fs, "d/new", b"made\n")
    assert read_all(fs, "d/new") == b"made\n"
    assert stat.S_ISREG(os.lstat(fs.root / "upper/d/new").st_mode)


def test_a_whiteout_found_by_the_lookup_is_not_kept(fs_factory):
    """A name whose lower object is whited out is absent, but its creation replaces the
    whiteout: that lookup is not kept (the creation looks again, under the lock)."""
    fs = fs_factory({"d/x": b"lower\n", "d/gone": b"lower\n"})
    fs.unlink("d/gone")
    negative_lookup(fs, "d/gone")
    assert fs.lookup.absent("d/gone") is None
    write_new(fs, "d/gone", b"made\n")
    assert read_all(fs, "d/gone") == b"made\n"


def test_a_change_during_the_negative_lookup_voids_it(fs_factory, monkeypatch):
    """Another thread makes the name while the kernel's LOOKUP of it runs (after that
    lookup read the layers): the absence it found is not kept for the creation."""
    fs = fs_factory({"d/x": b"lower\n"}, upper={"d/keep": b"upper\n"})
    real = fs.lookup._lookup_in
    raced = []

    def racing(parent, rel):
        node = real(parent, rel)
        if rel == "d/new" and not raced:
            raced.append(True)
            other = threading.Thread(target=write_new, args=(fs, "d/new", b"theirs\n"))
            other.start()
            other.join()
        return node

    monkeypatch.setattr(fs.lookup, "_lookup_in", racing)
    assert not fs.lookup.lookup("d/new").exists  # found absent, before the other's create
    assert raced
    monkeypatch.setattr(fs.lookup, "_lookup_in", real)
    assert fs.lookup.absent("d/new") is None
    with pytest.raises(OSError) as e:
        fs.mkdir("d/new", 0o755)
    assert e.value.errno == errno.EEXIST
    assert read_all(fs, "d/new") == b"theirs\n"


@pytest.mark.parametrize("how", CREATIONS)
def test_a_parent_renamed_over_after_the_lookup_is_not_taken_for_the_new_one(fs_factory, how):
    """The name was absent in an empty directory; a merged directory holding a lower
    object of that name is then renamed over that directory (a redirect): the creation of
    the name in it fails EEXIST and the lower object shows, as a fresh lookup decides."""
    fs = fs_factory({"e/new": b"lower\n"}, upper={"d/.keep": b""}, redirect_dir="on")
    fs.unlink("d/.keep")
    negative_lookup(fs, "d/new")
    fs.rename("e", "d")
    with pytest.raises(OSError) as e:
        CREATIONS[how](fs, "d/new")
    assert e.value.errno == errno.EEXIST
    assert read_all(fs, "d/new") == b"lower\n"


def test_a_burst_of_negative_lookups_keeps_the_last_absent_max(fs_factory):
    """The bound: a burst of lookups of distinct absent names keeps the last ``ABSENT_MAX``
    of them, no more; each is taken by its creation."""
    from overlaypc.lookup import ABSENT_MAX
    fs = fs_factory({"d/x": b"lower\n"})
    names = [f"d/n{i}" for i in range(3 * ABSENT_MAX)]
    for rel in names:
        negative_lookup(fs, rel)
    assert len(fs.lookup._absent) == ABSENT_MAX
    assert list(fs.lookup._absent) == names[-ABSENT_MAX:]
    assert fs.lookup.absent(names[0]) is None
    write_new(fs, names[-1], b"made\n")
    assert read_all(fs, names[-1]) == b"made\n"


def _two_lowers(tmp_path, hide: str) -> OverlayFS:
    """Upper d (merged) over two lowers: the bottom holds directory d/n with a file; the top
    hides it by ``hide``: a 0/0 device, an OCI ``.wh.n``, or an opaque d (OCI marker)."""
    from overlaypc.config import MountConfig, validate
    root = tmp_path / f"two-{hide}"
    top, bottom, upper = root / "top", root / "bottom", root / "upper"
    (bottom / "d/n").mkdir(parents=True)
    (bottom / "d/n/f").write_bytes(b"hidden\n")
    (bottom / "d/m").write_bytes(b"hidden too\n")
    (top / "d").mkdir(parents=True)
    (top / "d/x").write_bytes(b"top\n")
    if hide == "device":
        os.mknod(top / "d/n", stat.S_IFCHR | 0o600, 0)
        os.mknod(top / "d/m", stat.S_IFCHR | 0o600, 0)
    elif hide == "oci":
        (top / "d/.wh.n").write_bytes(b"")
        (top / "d/.wh.m").write_bytes(b"")
    else:
        (top / "d/.wh..wh..opq").write_bytes(b"")
    (upper / "d").mkdir(parents=True)
    for name in ("work", "mnt"):
        (root / name).mkdir()
    cfg = MountConfig(lowers=[str(top), str(bottom)], upper=str(upper), work=str(root / "work"),
                      mountpoint=str(root / "mnt"))
    validate(cfg)
    fs = OverlayFS(cfg)
    fs.start()
    fs.root = root  # type: ignore[attr-defined]
    return fs


@pytest.mark.parametrize("hide", ["device", "oci", "opaque"])
def test_a_name_hidden_below_is_created_as_a_fresh_lookup_would(tmp_path, hide):
    """A name hidden by a lower layer (its whiteout, either format, or an opaque parent
    there) is absent with nothing in the upper: its creations take the kept lookup, and
    what is below stays hidden (the new directory lists nothing of the lower one)."""
    fs = _two_lowers(tmp_path, hide)
    try:
        for rel in ("d/n", "d/m"):
            negative_lookup(fs, rel)
            assert fs.lookup._absent.get(rel) is not None
        fs.mkdir("d/n", 0o755)
        write_new(fs, "d/m", b"made\n")
        assert [e.name for e in fs.readdir("d/n")] in ([], [".", ".."])
        assert read_all(fs, "d/m") == b"made\n"
        assert len(fs.lookup.lookup("d/n").entries) == 1
        assert sorted(e.name for e in fs.readdir("d") if e.name not in (".", "..")) == ["m", "n", "x"]
    finally:
        fs.close()


@pytest.mark.parametrize("devices", [True, False], ids=["devices", "markers"])
def test_creations_answer_as_the_model_while_lookups_keep_absences(fs_factory, devices):
    """A random sequence of changes (creations, removals, renames of names and of their
    directories: a redirect shows another lower directory's names), each after a lookup of
    its name as the kernel's, while three threads look names up all along (keeping
    absences): each creation answers EEXIST exactly when the name exists in a model of the
    merged view (exact: the changes run one at a time), and the view ends as the model.
    Whiteouts in either form (``.wh.NAME`` files: a name the creation must clear)."""
    rng = random.Random(45)
    names = [f"n{i}" for i in range(6)]
    dirs = ["d0", "d1", "d2"]
    lower = {f"d0/{n}": b"lower\n" for n in names[:3]} | {f"d1/{n}": b"lower\n" for n in names[3:]}
    fs = fs_factory(lower, redirect_dir="on")
    fs.format.devices = devices  # False: whiteouts as .wh.NAME files (rootless, fuse-overlayfs)
    model = {"d0": "d", "d1": "d"} | {rel: "f" for rel in lower}
    stop = threading.Event()

    def looker(k: int) -> None:
        r = random.Random(k)
        while not stop.is_set():
            try:
                fs.lookup.lookup(f"{r.choice(dirs)}/{r.choice(names)}")
            except OSError:
                pass

    threads = [threading.Thread(target=looker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    wrong = []
    try:
        for step in range(800):
            rel = f"{rng.choice([d for d in dirs if d in model])}/{rng.choice(names)}"
            try:
                fs.lookup.lookup(rel)
            except OSError:
                pass
            op = rng.choice(["create", "create", "mkdir", "symlink", "unlink", "rename",
                             "dirmove", "dirmove", "dirmove"])
            exists = rel in model
            try:
                if op == "create":
                    write_new(fs, rel, b"made\n")
                elif op == "mkdir":
                    fs.mkdir(rel, 0o755)
                elif op == "symlink":
                    fs.symlink("t", rel)
                elif op == "unlink":
                    if model.get(rel) not in ("f", "l"):
                        continue
                    fs.unlink(rel)
                    del model[rel]
                elif op == "rename":
                    src = rng.choice(sorted(p for p in model if model[p] in ("f", "l")) or [rel])
                    if src == rel or model.get(rel) == "d":
                        continue
                    fs.rename(src, rel)
                    model[rel] = model.pop(src)
                else:
                    a = rng.choice([d for d in dirs if d in model])
                    b = rng.choice([d for d in dirs if d not in model])
                    fs.rename(a, b)
                    for p in sorted(model):
                        if p == a or p.startswith(a + "/"):
                            model[b + p[len(a):]] = model.pop(p)
                got = "ok"
            except OSError as e:
                got = errno.errorcode[e.errno]
                assert op in CREATIONS, f"step {step}: {op} {rel}: {got}"
            if op in ("create", "mkdir", "symlink"):
                if got != ("EEXIST" if exists else "ok"):
                    wrong.append(f"step {step}: {op} {rel}: {got} (exists: {exists})")
                if got == "ok":
                    model[rel] = {"create": "f", "mkdir": "d", "symlink": "l"}[op]
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert wrong == []
    for d in dirs:
        for n in names:
            try:
                there = fs.lookup.lookup(f"{d}/{n}").exists
            except OSError:
                there = False
            assert there == (f"{d}/{n}" in model), f"{d}/{n}"
