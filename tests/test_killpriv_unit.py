"""Unit tests of ``overlaypc/killpriv.py``: which bits an unprivileged write strips, and
the writer's groups read from /proc."""
from __future__ import annotations

import os
import stat

from overlaypc.killpriv import groups_of, killed_mode

SUID, SGID = stat.S_ISUID, stat.S_ISGID


def test_setuid_always_goes():
    assert killed_mode(0o4755, 10, frozenset({10})) == 0o755
    assert killed_mode(0o4644, 10, frozenset({10})) == 0o644


def test_setgid_with_group_exec_goes_even_for_a_member():
    assert killed_mode(0o2755, 10, frozenset({10})) == 0o755


def test_setgid_without_group_exec_stays_for_a_member_and_goes_for_others():
    assert killed_mode(0o2644, 10, frozenset({10, 20})) == 0o2644
    assert killed_mode(0o2644, 10, frozenset({20})) == 0o644


def test_other_bits_untouched():
    assert killed_mode(0o1777 | SUID | SGID, 5, frozenset()) == 0o1777


def test_groups_of_this_process():
    assert groups_of(os.getpid(), os.getgid()) >= {os.getgid(), *os.getgroups()}


def test_groups_of_a_process_that_is_gone(tmp_path):
    (tmp_path / "77").mkdir()
    assert groups_of(76, 5, proc=str(tmp_path)) == {5}
    (tmp_path / "77" / "status").write_text("Name:\tx\nGroups:\t3 4 \nNgid:\t0\n")
    assert groups_of(77, 5, proc=str(tmp_path)) == {3, 4, 5}
