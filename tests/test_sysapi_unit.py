"""Unit tests of ``overlaypc.sysapi`` (no mount, no root)."""

from __future__ import annotations

import errno
import importlib
import os
import platform

import pytest

from overlaypc import sysapi


def test_renameat2_flags(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sysapi.renameat2(fd, "a", fd, "b", sysapi.RENAME_EXCHANGE)
        assert (tmp_path / "a").read_bytes() == b"b" and (tmp_path / "b").read_bytes() == b"a"
        with pytest.raises(OSError) as e:
            sysapi.renameat2(fd, "a", fd, "b", sysapi.RENAME_NOREPLACE)
        assert e.value.errno == errno.EEXIST
        sysapi.renameat2(fd, "a", fd, "c", sysapi.RENAME_NOREPLACE)
        assert (tmp_path / "c").read_bytes() == b"b"
    finally:
        os.close(fd)


def test_no_syscall_number_guessed_for_an_unknown_architecture(monkeypatch):
    """Issue 13.10: on an architecture it did not know, sysapi used x86_64's renameat2
    number, which is another system call there. The number now comes from glibc."""
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    try:
        fresh = importlib.reload(sysapi)
        assert getattr(fresh, "_SYS_RENAMEAT2", None) != 316
        assert fresh._renameat2 is not None
    finally:
        monkeypatch.undo()
        importlib.reload(sysapi)


def _module_level_names(path) -> list[str]:
    """The names a module's top level binds (assignments, their tuple targets, functions,
    classes), once per binding."""
    import ast
    names: list[str] = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
            continue
        else:
            continue
        for target in targets:
            elts = target.elts if isinstance(target, ast.Tuple) else [target]
            names += [t.id for t in elts if isinstance(t, ast.Name)]
    return names


def test_one_file_system_encoding_pair_for_the_package():
    """fix50: ``sysapi.FS_ENCODING, FS_ERRORS`` (``os.fsencode``'s) are the package's one
    pair, which ``overlay_ops`` uses too; no other module binds one of its own. Two private
    ``_FS_ENCODING`` in sysapi, one the encoding, one the pair, merged without a conflict
    and broke every ``openat2`` of a str path (e714d8a); overlay_ops had a third."""
    import sys
    from pathlib import Path

    from overlaypc import overlay_ops
    assert (sysapi.FS_ENCODING, sysapi.FS_ERRORS) == (sys.getfilesystemencoding(),
                                                      sys.getfilesystemencodeerrors())
    assert (overlay_ops.FS_ENCODING, overlay_ops.FS_ERRORS) == (sysapi.FS_ENCODING, sysapi.FS_ERRORS)
    package = Path(sysapi.__file__).parent
    own = sorted((str(p.relative_to(package)), n) for p in package.rglob("*.py")
                 for n in _module_level_names(p) if "FS_ENCODING" in n or "FS_ERRORS" in n)
    assert own == [("sysapi.py", "FS_ENCODING"), ("sysapi.py", "FS_ERRORS")]


def test_no_module_binds_a_top_level_name_twice():
    """A module-level name bound twice in one module (two branches each adding one, merged
    without a conflict: e714d8a) leaves the later binding for every use, the earlier
    one's callers broken. The package binds each once."""
    from collections import Counter
    from pathlib import Path
    package = Path(sysapi.__file__).parent
    twice = {str(p.relative_to(package)): sorted(n for n, c in Counter(_module_level_names(p)).items()
                                                   if c > 1)
             for p in sorted(package.rglob("*.py"))}
    assert {k: v for k, v in twice.items() if v} == {}
