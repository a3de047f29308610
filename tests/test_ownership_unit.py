"""ID mapping, squashing and override-stat values, and the parsing of fuse-overlayfs's
options, without a mount (issue 14, items 2-4)."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from overlaypc import cli
from overlaypc.attrs import Attr
from overlaypc.config import OPTIONS, ConfigError, MountConfig, apply_options
from overlaypc.copyup import is_private_xattr
from overlaypc.idmap import IdMap, mount_options, on_idmapped_mount
from overlaypc.ownership import (OVERRIDE_NAMES, Ownership, Stored, format_override,
                                 parse_override)


# -- IdMap -----------------------------------------------------------------------------------
def test_mapping_shows_stored_ids_shifted_and_stores_shown_ids_back():
    m = IdMap.parse("0:100000:65536")
    assert [m.to_shown(i) for i in (0, 5, 65535)] == [100000, 100005, 165535]
    assert [m.to_disk(i) for i in (100000, 100005, 165535)] == [0, 5, 65535]
    assert m.to_shown(65536) == 65534 and m.to_shown(70000) == 65534  # the overflow ID
    assert m.to_disk(0) is None and m.to_disk(99999) is None and m.to_disk(165536) is None


def test_mapping_with_several_ranges_and_the_leading_colon_of_containers_storage():
    m = IdMap.parse(":0:1000:1:1:100000:65536", overflow=4242)
    assert str(m) == "0:1000:1:1:100000:65536"
    assert [m.to_shown(i) for i in (0, 1, 2, 65536, 65537)] == [1000, 100000, 100001, 165535, 4242]
    assert [m.to_disk(i) for i in (1000, 100000, 165535, 1001, 0)] == [0, 1, 65536, None, None]


@pytest.mark.parametrize("text, reason", [
    ("", "triples"), (":", "triples"), ("0:1", "triples"), ("0:1:2:3", "triples"),
    ("0:a:1", "'a'"), ("0:-1:5", "'-1'"), ("0:1:0", "empty range"), ("0::5", "''"),
    ("0:100:10:5:200:10", "overlaps"), ("0:100:10:50:105:10", "overlaps"),
    ("4294967290:0:10", "largest ID"), ("0:100:10::", "triples"),
])
def test_bad_mappings_are_refused_with_the_reason(text, reason):
    with pytest.raises(ValueError, match=reason):
        IdMap.parse(text)


# -- override values ---------------------------------------------------------------------------
def test_override_values_as_fuse_overlayfs_and_containers_storage_write_them():
    assert parse_override(b"1000:1000:755") == (1000, 1000, 0o755)
    assert parse_override(b"0:0:0644:file") == (0, 0, 0o644)      # containers/storage 1.5x
    assert parse_override(b"5:6:104755") == (5, 6, 0o4755)        # a mode with type bits
    assert parse_override(b"5:6:2775\0") == (5, 6, 0o2775)
    for bad in (b"", b"1:2", b"a:b:755", b"1:2:9", b"1:2:3:4:5", b"-1:0:755"):
        assert parse_override(bad) is None, bad
    assert format_override(7, 8, stat.S_IFREG | 0o4750) == b"7:8:4750"


def test_override_xattrs_are_private():
    for name in OVERRIDE_NAMES:
        assert is_private_xattr(name)
    assert not is_private_xattr("user.containers.other")


# -- Ownership ---------------------------------------------------------------------------------
def _attr(uid: int, gid: int, mode: int) -> Attr:
    st = os.stat_result((mode, 1, 2, 3, uid, gid, 0, 0, 0, 0))
    return Attr(st, 1)


def test_show_maps_then_squashes():
    cfg = MountConfig()
    apply_options(cfg, "uidmapping=0:100000:65536,gidmapping=0:200000:10")
    own = Ownership.for_mount(cfg, [])
    a = own.show(_attr(1, 2, stat.S_IFREG | 0o600), Stored(5, 3, stat.S_IFREG | 0o640))
    assert (a.st_uid, a.st_gid, oct(a.st_mode)) == (100005, 200003, oct(stat.S_IFREG | 0o640))
    a = own.show(_attr(1, 2, stat.S_IFREG), Stored(70000, 10, stat.S_IFREG))
    assert (a.st_uid, a.st_gid) == (65534, 65534)

    apply_options(cfg, "squash_to_root")
    own = Ownership.for_mount(cfg, [])
    a = own.show(_attr(1, 2, stat.S_IFDIR | 0o755), Stored(5, 3, stat.S_IFDIR | 0o755))
    assert (a.st_uid, a.st_gid, a.st_nlink) == (0, 0, 3)
    apply_options(cfg, "squash_to_uid=1000,static_nlink")
    own = Ownership.for_mount(cfg, [])
    a = own.show(_attr(1, 2, stat.S_IFDIR | 0o755), Stored(5, 3, stat.S_IFDIR | 0o755))
    assert (a.st_uid, a.st_gid, a.st_nlink) == (1000, 0, 1)


def test_ids_of_an_idmapped_layer_are_shown_as_they_are_and_stored_mapped_back():
    """``Stored.shown``: IDs the kernel's idmapped mount mapped already. Shown unmapped
    (squashing still applies); ``on_disk`` maps them back for the upper, an ID outside the
    mapping as the overflow ID; container-side values pass unchanged."""
    cfg = MountConfig()
    apply_options(cfg, "uidmapping=0:100000:65536,gidmapping=0:200000:10")
    own = Ownership.for_mount(cfg, [])
    host = Stored(100005, 200003, stat.S_IFREG | 0o640, shown=True)
    a = own.show(_attr(1, 2, stat.S_IFREG), host)
    assert (a.st_uid, a.st_gid) == (100005, 200003)
    assert own.shown_gid(host) == 200003 and own.shown_gid(Stored(3, 3, 0)) == 200003
    assert own.on_disk(host) == Stored(5, 3, stat.S_IFREG | 0o640)
    assert own.on_disk(Stored(65534, 7, stat.S_IFDIR, shown=True)) == Stored(65534, 65534, stat.S_IFDIR)
    plain = Stored(5, 3, stat.S_IFREG)
    assert own.on_disk(plain) is plain
    apply_options(cfg, "squash_to_root")
    a = Ownership.for_mount(cfg, []).show(_attr(1, 2, stat.S_IFREG), host)
    assert (a.st_uid, a.st_gid) == (0, 0)


def test_idmapped_mount_found_by_mount_id_in_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("24 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
                    "431 24 254:0 /srv/l /x/mapped/0 rw,relatime,idmapped shared:2 - ext4 /dev/vda rw\n"
                    "4310 24 0:5 / /idmapped rw shared:3 - tmpfs tmpfs rw\n")
    assert mount_options(431, str(info)) == ["rw", "relatime", "idmapped"]
    assert mount_options(4310, str(info)) == ["rw"]  # a path naming it is no option
    assert mount_options(43, str(info)) is None
    fd = os.open(tmp_path, os.O_PATH)
    try:
        assert not on_idmapped_mount(fd)
    finally:
        os.close(fd)


def test_written_ids_are_mapped_back():
    cfg = MountConfig()
    apply_options(cfg, "uidmapping=:0:100000:65536,gidmapping=:0:100000:65536,squash_to_root")
    own = Ownership.for_mount(cfg, [])
    assert own.chown_ids(100005, -1) == (5, -1)
    assert own.chown_ids(-1, 165535) == (-1, 65535)
    with pytest.raises(OSError) as e:
        own.chown_ids(0, -1)
    assert e.value.errno == errno.EOVERFLOW
    # a new object of a caller outside the mapping: the overflow ID, as fuse-overlayfs
    assert own.new_owner(0, 0) == (65534, 65534)
    assert own.new_owner(100007, 100008) == (7, 8)
    assert Ownership.for_mount(MountConfig(), []).new_owner(3, 4) == (3, 4)
    assert not Ownership.for_mount(MountConfig(), []).active


# -- options -----------------------------------------------------------------------------------
FUSE_OVERLAYFS_OPTIONS = [
    "uidmapping=0:100000:65536", "gidmapping=:0:100000:65536", "squash_to_root",
    "squash_to_uid=1000", "squash_to_gid=1000", "static_nlink", "noacl", "fsync=0",
    "threaded=1", "xattr_permissions=2", "noxattrs=1", "plugins=/usr/libexec/fuse-overlayfs",
    "max_idle_threads=10", "fast_ino=1", "writeback=0", "ino32_t", "allow_root",
    "timeout=1000000000", 'context="system_u:object_r:container_file_t:s0:c1,c2"',
]


def test_every_fuse_overlayfs_option_is_in_the_options_table():
    for item in FUSE_OVERLAYFS_OPTIONS:
        assert item.partition("=")[0] in OPTIONS


def test_fuse_overlayfs_options_take_effect_or_are_noted():
    cfg = MountConfig()
    apply_options(cfg, ",".join(FUSE_OVERLAYFS_OPTIONS))
    assert str(cfg.uidmapping) == str(cfg.gidmapping) == "0:100000:65536"
    assert cfg.squash_to_root and cfg.squash_to_uid == 1000 and cfg.squash_to_gid == 1000
    assert cfg.static_nlink and cfg.noacl and cfg.noxattrs and not cfg.fsync
    assert cfg.xattr_permissions == 2 and cfg.allow_root and cfg.timeout == 1e9
    assert cfg.context == "system_u:object_r:container_file_t:s0:c1,c2"
    noted = [option for option, _ in cfg.notes]
    assert noted == ["threaded=1", "plugins=/usr/libexec/fuse-overlayfs", "max_idle_threads=10",
                     "fast_ino=1", "writeback=0", "ino32_t"]
    assert all(reason for _, reason in cfg.notes)


def test_containers_storage_option_strings():
    cfg = MountConfig()
    apply_options(cfg, "lowerdir=l/A:l/B,upperdir=U,workdir=W,,volatile,")
    assert (cfg.lowers, cfg.upper, cfg.work, cfg.volatile) == (["l/A", "l/B"], "U", "W", True)
    cfg = MountConfig()
    apply_options(cfg, "lowerdir=ID/diff:ID2/diff,")
    assert cfg.lowers == ["ID/diff", "ID2/diff"] and cfg.upper is None


def test_quotes_protect_commas_as_in_mount8():
    cfg = MountConfig()
    apply_options(cfg, 'context="a:b:c:s0:c1,c2",fsync=0,lowerdir="/x/y"')
    assert cfg.context == "a:b:c:s0:c1,c2" and not cfg.fsync and cfg.lowers == ["/x/y"]


@pytest.mark.parametrize("text, named", [
    ("uidmapping=0:1", "uidmapping='0:1'"), ("gidmapping=0:x:1", "gidmapping='0:x:1'"),
    ("squash_to_uid=abc", "squash_to_uid='abc'"), ("squash_to_gid=-3", "squash_to_gid='-3'"),
    ("squash_to_uid", "squash_to_uid"), ("xattr_permissions=3", "xattr_permissions='3'"),
    ("fsync=yes", "fsync='yes'"), ("noxattrs", "noxattrs"), ("threaded=x", "threaded='x'"),
    ("ino32_t=1", "ino32_t"), ("static_nlink=1", "static_nlink"), ("context=", "context"),
    ("timeout=-1", "timeout='-1'"), ("timeout=inf", "timeout='inf'"), ("plugins=", "plugins"),
    ('context="a,b', "unbalanced"), ("uidmaping=0:1:1", "uidmaping=0:1:1"),
    ("squash_to_nobody", "squash_to_nobody"),
])
def test_bad_values_and_unknown_options_are_refused_by_name(text, named):
    with pytest.raises(ConfigError) as e:
        apply_options(MountConfig(), text)
    assert named in str(e.value)


def test_context_goes_to_the_kernel_only_with_selinux(tmp_path, monkeypatch, caplog):
    cfg = MountConfig()
    apply_options(cfg, 'context="system_u:object_r:container_file_t:s0:c1,c2",threaded=1')
    monkeypatch.setattr(cli, "SELINUX_ENFORCE", str(tmp_path / "enforce"))
    with caplog.at_level("INFO", logger="overlaypc"):
        assert cli._fuse_overlayfs_flags(cfg) == []
    assert "context=system_u:object_r:container_file_t:s0:c1,c2 has no effect: SELinux" in caplog.text
    assert "option threaded=1 has no effect" in caplog.text
    (tmp_path / "enforce").write_text("1")
    # libfuse passes kernel options on to mount(2) as they are: the quotes keep c1,c2 together
    assert cli._fuse_overlayfs_flags(cfg) == ['context="system_u:object_r:container_file_t:s0:c1,c2"']


def test_idmapped_mount_ids_are_read_from_the_options_field_only(tmp_path):
    """``idmapped_mount_ids`` (one read of the mount table for all layers) finds the mounts
    whose per-mount options say ``idmapped``, not a path or a superblock option that does."""
    from overlaypc.idmap import idmapped_mount_ids
    info = tmp_path / "mountinfo"
    info.write_text("24 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
                    "431 24 254:0 /srv/l /x/mapped/0 rw,relatime,idmapped shared:2 - ext4 /dev/vda rw\n"
                    "4310 24 0:5 / /idmapped rw shared:3 - tmpfs tmpfs rw,idmapped\n"
                    "432 24 254:0 /srv/m /y idmapped - ext4 /dev/vda rw\n")
    assert idmapped_mount_ids(str(info)) == {431, 432}
    assert idmapped_mount_ids(str(tmp_path / "none")) == frozenset()
    fd = os.open(tmp_path, os.O_PATH)
    try:
        assert not on_idmapped_mount(fd, frozenset())
        assert not on_idmapped_mount(fd, idmapped_mount_ids())
    finally:
        os.close(fd)
