"""Invocations valid before the overlap and data-only checks are still accepted (layers given with
trailing slashes and ``./``, relative paths, symlinked layers that resolve to distinct
directories, a layer named like a sibling's prefix, ``lowerdir+=``, a stack file with a YAML
merge key in its options and ``~`` for no upper), and the refusals match the kernel's
(a layer given twice, also through a symlink; one inside another). Parsing and validation
only (``cli.parse_mount_args``, ``config.validate``)."""
from __future__ import annotations

import os

import pytest

from overlaypc.cli import parse_mount_args
from overlaypc.config import ConfigError, validate


@pytest.fixture
def base(tmp_path, monkeypatch):
    for d in ("a/sub", "ab", "b", "u", "w", "m"):
        (tmp_path / d).mkdir(parents=True)
    os.symlink("a", tmp_path / "la")
    os.symlink("b", tmp_path / "lb")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _config(args):
    cfg = parse_mount_args(args)
    validate(cfg)
    return cfg


@pytest.mark.parametrize("opts, lowers", [
    ("lowerdir=a/:./b,upperdir=u/,workdir=./w/", ["a", "b"]),
    ("lowerdir=la:lb,upperdir=u,workdir=w", ["a", "b"]),
    ("lowerdir=a:ab", ["a", "ab"]),
    ("lowerdir=./a/./sub:b", ["a/sub", "b"]),
    ("lowerdir+=a,lowerdir+=b", ["a", "b"]),
])
def test_valid_invocations_are_accepted(base, opts, lowers):
    cfg = _config(["-o", opts, "overlay", "m"])
    assert cfg.lowers == [str(base / p) for p in lowers]


@pytest.mark.parametrize("opts", ["lowerdir=a:la", "lowerdir=a:a/", "lowerdir=a/sub:a",
                                  "lowerdir=a:a/sub", "lowerdir=a,lowerdir+=b"])
def test_overlapping_layers_are_refused_as_the_kernel(base, opts):
    with pytest.raises(ConfigError):
        _config(["-o", opts, "overlay", "m"])


def test_stack_file_merge_key_and_no_upper(base):
    (base / "s.yaml").write_text("lowers: [a/sub, b]\nupper: ~\n"
                                 "options: {<<: {cache: shared}, timeout: 5}\n")
    cfg = _config(["--stack", str(base / "s.yaml"), "m"])
    assert cfg.lowers == [str(base / "a/sub"), str(base / "b")]
    assert cfg.upper is None and cfg.cache == "shared" and cfg.timeout == 5


@pytest.mark.parametrize("yaml_options, expected", [
    ("{index: on, metacopy: yes}", dict(index=True, metacopy=True, redirect_dir="on")),
    ("{index: off, sharing: no, passthrough: false, xino: off}",
     dict(index=False, sharing=False, passthrough=False)),
    ("{redirect_dir: off}", dict(redirect_dir="off")),
    ("{fsync: no, noxattrs: yes}", dict(fsync=False, noxattrs=True)),
    ("{ro: yes, volatile: true, static_nlink: on}", dict(readonly=True, volatile=True,
                                                         static_nlink=True)),
    ("{rw: no}", dict(readonly=True)),
    ("{nodev: yes, suid: no}", dict(generic=["nodev", "nosuid"])),
])
def test_stack_file_yaml_booleans(base, yaml_options, expected):
    """In the mapping form of a stack file's options, YAML 1.1 turns unquoted on/off/yes/no
    into booleans: each is written as the option's own spelling (index: on is index=on)."""
    (base / "s.yaml").write_text(f"lowers: [a]\nupper: u\nwork: w\noptions: {yaml_options}\n")
    cfg = _config(["--stack", str(base / "s.yaml"), "m"])
    assert {name: getattr(cfg, name) for name in expected} == expected


def test_stack_file_option_paths_resolve_against_its_directory(base, monkeypatch):
    """Relative paths in a stack file resolve against its directory, also those its
    options give (they resolved against the cwd: upperdir ../u did not exist)."""
    (base / "a" / "sub" / "s.yaml").write_text(
        "lowers: [..]\noptions: [upperdir=../../u, 'workdir=../../w', lowerdir+=../../b]\n")
    monkeypatch.chdir("/")
    cfg = _config(["--stack", str(base / "a" / "sub" / "s.yaml"), str(base / "m")])
    assert (cfg.upper, cfg.work) == (str(base / "u"), str(base / "w"))
    assert cfg.lowers == [str(base / "a"), str(base / "b")]


def test_stack_file_colon_numbers_are_text(base):
    """YAML 1.1 reads 1:10:5 as a base-60 number (4205): an ID mapping in a stack file's
    options mapping must reach the option as it was written."""
    (base / "s.yaml").write_text("lowers: [a]\noptions: {uidmapping: 1:10:5, gidmapping: '1:10:5'}\n")
    cfg = _config(["--stack", str(base / "s.yaml"), "m"])
    given = _config(["-o", "lowerdir=a,uidmapping=1:10:5,gidmapping=1:10:5", "m"])
    assert (cfg.uidmapping, cfg.gidmapping) == (given.uidmapping, given.gidmapping)


@pytest.mark.parametrize("opts, lowers, upper", [
    ("lowerdir=x\\\\y:b", ["x\\y", "b"], None),
    ("lowerdir=p\\,q:b", ["p,q", "b"], None),
    ("lowerdir+=p\\,q,lowerdir+=b", ["p\\,q", "b"], None),
    ("lowerdir=b,upperdir=ux\\\\y,workdir=w", ["b"], "ux\\y"),
    ("lowerdir=b,upperdir=u\\,q,workdir=w", ["b"], "u,q"),
])
def test_backslashes_in_option_values_as_the_kernel(base, opts, lowers, upper):
    """Backslash escapes as the kernel's overlay reads them (checked with mount -t overlay
    on 6.18): a comma after a backslash never splits options; lowerdir= and upperdir=
    unescape their paths (\\\\ is one backslash), lowerdir+= takes its path as it is. Two
    backslashes were unescaped twice (x\\\\y was xy), and lowerdir+= lost its backslashes."""
    for d in ("x\\y", "p,q", "p\\,q", "ux\\y", "u,q"):
        (base / d).mkdir()
    cfg = _config(["-o", opts, "overlay", "m"])
    assert cfg.lowers == [str(base / p) for p in lowers]
    assert cfg.upper == (upper and str(base / upper))


@pytest.mark.parametrize("opts, lowers, upper", [
    ('lowerdir=q\\"x:b', ['q"x', "b"], None),
    ('lowerdir+=q\\"x,lowerdir+=b', ['q\\"x', "b"], None),
    ('lowerdir=b,upperdir=u\\"x,workdir=w', ["b"], 'u"x'),
    ('lowerdir="b",upperdir="u,x",workdir=w', ["b"], "u,x"),
])
def test_an_escaped_double_quote_is_part_of_the_path(base, opts, lowers, upper):
    """A double quote after a backslash is a character of the path, not a quote mount(8)
    would remove (``_split_commas`` does not take it as one either): review19, the quotes
    were removed after the unescaping, so ``q\\"x`` named the directory ``qx``, another
    layer than the one given (the kernel refuses such a path outright)."""
    for d in ('q"x', "qx", 'q\\"x', 'u"x', "ux", "u,x"):
        (base / d).mkdir()
    cfg = _config(["-o", opts, "overlay", "m"])
    assert cfg.lowers == [str(base / p) for p in lowers]
    assert cfg.upper == (upper and str(base / upper))


def test_stack_file_mapping_values_keep_their_commas(base):
    """In the mapping form of a stack file's options a value is one option's value: an SELinux
    context with categories (``c1,c2``) or a path with a comma was split at the comma (the
    mapping was joined into ``name=value`` text and read as ``-o``: unknown option 'c2')."""
    (base / "u,q").mkdir()
    (base / "s.yaml").write_text("lowers: [a]\noptions: {upperdir: 'u,q', workdir: w,\n"
                                 "  context: 'system_u:object_r:container_file_t:s0:c1,c2'}\n")
    cfg = _config(["--stack", str(base / "s.yaml"), "m"])
    given = _config(["-o", 'lowerdir=a,upperdir=u\\,q,workdir=w,'
                     'context="system_u:object_r:container_file_t:s0:c1,c2"', "m"])
    assert cfg.upper == str(base / "u,q") == given.upper
    assert cfg.generic == given.generic and cfg.context == given.context


def test_stack_file_option_strings_split_as_dash_o(base):
    """A list item or a single string of options is split at commas as ``-o`` is."""
    (base / "s.yaml").write_text("lowers: [a]\noptions: ['upperdir=u,workdir=w', ',cache=shared,']\n")
    cfg = _config(["--stack", str(base / "s.yaml"), "m"])
    assert (cfg.upper, cfg.work, cfg.cache) == (str(base / "u"), str(base / "w"), "shared")


@pytest.mark.parametrize("field, value", [("cache", "keep"), ("handles", "keep"), ("cache", None),
                                          ("redirect_dir", "yes")])
def test_a_config_built_in_code_with_a_bad_choice_is_refused(base, field, value):
    """A ``MountConfig`` made by a program, not parsed from options or a stack file (whose
    parsers check each choice), is checked by ``validate`` too: ``handles="keep"`` was
    accepted and ran as bind-at-open (anything but "reopen" did)."""
    from overlaypc.config import MountConfig
    cfg = MountConfig(lowers=["a"], upper="u", work="w", mountpoint="m", **{field: value})
    with pytest.raises(ConfigError, match=f"bad value {field}="):
        validate(cfg)
