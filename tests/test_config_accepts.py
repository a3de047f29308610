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
