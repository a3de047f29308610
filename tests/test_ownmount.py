"""ownmount.shield, without a mount: a directory on ``sys.path`` that the mount will cover
is replaced (renamed away, an empty directory put at its name, as a mount hides it), and
imports and tracebacks still find what was there. Each case runs in a fresh interpreter:
``shield`` changes ``sys.path`` and ``linecache`` for good."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import helpers

SCRIPT = textwrap.dedent("""
    import os, sys, traceback
    code, covered = sys.argv[1], sys.argv[2]
    sys.path.insert(0, code)
    from pkgx import mod
    from overlaypc import ownmount
    held = ownmount.shield(covered)
    os.rename(code, code + "-hidden")          # what the mount does to the name
    os.mkdir(code)
    print("path", sys.path[0] == f"/proc/self/fd/{held[0]}" if held else sys.path[0])
    import late                                 # (a module imported after the mount)
    print("late", late.VALUE)
    try:
        mod.boom()
    except ValueError:
        print("source", "raise ValueError" in traceback.format_exc())
""")


def _run(tmp_path, covered_name: str, script: str = SCRIPT) -> subprocess.CompletedProcess:
    code = tmp_path / "code"
    (code / "pkgx").mkdir(parents=True)
    (code / "pkgx" / "__init__.py").write_text("")
    (code / "pkgx" / "mod.py").write_text("def boom():\n    raise ValueError('x')\n")
    (code / "late.py").write_text("VALUE = 7\n")
    (tmp_path / covered_name).mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-I", "-B", "-c", script, str(code),
                           str(tmp_path / covered_name)],
                          capture_output=True, text=True,
                          env={"PYTHONPATH": str(helpers.REPO_ROOT)}, cwd=str(tmp_path))


def test_a_covered_sys_path_entry_is_read_through_the_directory_it_named(tmp_path):
    """The mount covers the code's directory: a later import finds the module there, and
    a traceback shows the source of a module loaded before (without ``shield``, the
    import searched the empty directory at that name: ModuleNotFoundError)."""
    result = _run(tmp_path, "code")
    assert result.stdout.splitlines() == ["path True", "late 7", "source True"], result.stderr


def test_a_mount_elsewhere_changes_nothing(tmp_path):
    """A mount over a directory holding none of the code: ``sys.path`` kept as it was and
    no fd held (that ``shield`` imports nothing slow there, ``linecache`` with ``re`` and
    ``enum``, test_startup_mount checks). The import after the rename then fails, as it
    would without ``shield``."""
    result = _run(tmp_path, "elsewhere")
    assert result.stdout.splitlines() == [f"path {tmp_path / 'code'}"]
    assert "ModuleNotFoundError: No module named 'late'" in result.stderr
