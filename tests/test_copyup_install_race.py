"""A change of the name that lands while its copy-up is being built (after the lookup that
found the object, before the copy is put in place): the copy must not land. ``CopyUp._install``
looks the name up again under the namespace lock unless ``Lookup.epoch`` shows that no
change ran since that lookup; these tests make one run there (fault point ``copyup.rename``,
in another thread, as a request racing the copy-up would) and check it is seen. Driven
without FUSE."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from overlaypc import faults
from test_kept_lookups import fs_factory, read_all  # noqa: F401 (a fixture)


def _during_install(fs, change) -> list:
    """Arm ``copyup.rename`` to run ``change()`` once, in another thread (it takes the
    namespace lock, which the copy-up does not hold there), and wait for it."""
    done: list = []

    def hook(point, *args):
        if done:
            return
        done.append(None)
        worker = threading.Thread(target=change)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "the change did not end"
    faults.install("copyup.rename", hook)
    return done


@pytest.fixture(autouse=True)
def _disarm():
    yield
    faults.configure(None)


def test_copy_up_of_a_name_removed_meanwhile_does_not_bring_it_back(fs_factory):
    fs = fs_factory({"f": b"lower\n"})
    done = _during_install(fs, lambda: fs.unlink("f"))
    with pytest.raises(OSError) as e:
        fs.chmod("f", 0o600)
    assert done, "the fault point was not reached"
    assert e.value.errno == errno.ENOENT, e.value
    assert not fs.lookup.lookup("f").exists, "the removed name came back with the copy"
    assert os.listdir(fs.root / "work/work") == []


def test_copy_up_of_a_name_replaced_meanwhile_leaves_the_new_file(fs_factory):
    fs = fs_factory({"f": b"lower\n"})

    def replace():
        fs.unlink("f")
        fh = fs.create("f", os.O_WRONLY, 0o644).fh
        fs.write(fh, b"new\n", 0)
        fs.release(fh)
    done = _during_install(fs, replace)
    fs.chmod("f", 0o600)
    assert done, "the fault point was not reached"
    assert read_all(fs, "f") == b"new\n", "the copy of the old file replaced the new one"
    assert os.stat(fs.root / "upper/f").st_mode & 0o777 == 0o600
    assert os.listdir(fs.root / "work/work") == []
