"""A cached lower-only directory renamed away (redirect_dir): its name is free at once.

``Lookup`` keeps the structure of the directories it looked up; a lookup of a cached one
re-reads only the layers the entry holds (``_still_there``), so an upper whiteout made at
its name must drop the entry (the rename's ``_done``), or ``mkdir`` at the name answers
EEXIST and a listing shows the old contents (hunt9, suspect of lead 2: seed 125 of
tests/stress_crash.py saw ``mkdir c`` answer EEXIST after the lower ``c`` was renamed to
``a/z``; not reproduced there, and these pass on the code as it was). Driven without FUSE
(``core_driver``), the directory cached by each of the ways a lookup stores one.
"""
from __future__ import annotations

import errno
import os
import stat

import pytest

import helpers
from core_driver import CoreDriver, Walker


@pytest.fixture
def walker(tmp_path):
    helpers.build_layer(tmp_path / "lower", {"w/c/f0": "c", "w/c/x/f1": "x", "w/a/f2": "a"})
    d = CoreDriver.in_dir(tmp_path)
    yield Walker(d)
    d.close()


#: how the directory ``w/c`` comes into the lookup cache before the rename
CACHED_BY = {
    "lookup": lambda w: w.stat("w/c"),
    "parent_of_lookup": lambda w: w.stat("w/c/f0"),
    "listing": lambda w: w.listdir("w/c"),
    "deeper": lambda w: w.listdir("w/c/x"),
}


@pytest.mark.parametrize("cached_by", sorted(CACHED_BY))
def test_mkdir_at_the_name_of_a_cached_lower_directory_renamed_away(walker, tmp_path, cached_by):
    CACHED_BY[cached_by](walker)
    walker.rename("w/c", "w/a/z")
    st = os.lstat(tmp_path / "upper" / "w" / "c")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # the upper's whiteout at the name
    with pytest.raises(OSError) as e:
        walker.stat("w/c")
    assert e.value.errno == errno.ENOENT
    walker.mkdir("w/c", 0o755)  # EEXIST if the cache still showed the lower c
    assert walker.listdir("w/c") == []
    assert sorted(walker.listdir("w/a/z")) == ["f0", "x"]
    assert walker.listdir("w/a/z/x") == ["f1"]


@pytest.mark.parametrize("cached_by", sorted(CACHED_BY))
def test_a_cached_lower_directory_renamed_away_and_back(walker, cached_by):
    CACHED_BY[cached_by](walker)
    walker.rename("w/c", "w/a/z")
    walker.mkdir("w/c", 0o755)
    walker.rmdir("w/c")
    walker.rename("w/a/z", "w/c")
    assert sorted(walker.listdir("w/c")) == ["f0", "x"]
    walker.rename("w/c", "w/n")
    walker.mkdir("w/c", 0o755)
    assert walker.listdir("w/c") == []
    assert sorted(walker.listdir("w/n")) == ["f0", "x"]
