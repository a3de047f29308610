"""``overlaypc.records``: the methods it makes behave as dataclasses' do, for every feature
the package declares with it; ``overlaypc.typing_lite.NamedTuple`` makes what
``typing.NamedTuple`` makes; and a mount's imports stay clear of the slow modules."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import pytest

from overlaypc import typing_lite
from overlaypc.records import FrozenInstanceError, field, record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(frozen: bool = False, eq: bool = True):
    """The same declaration made by dataclasses and by records."""
    made = []
    for deco, fld in ((dataclasses.dataclass, dataclasses.field), (record, field)):
        class Thing:
            """A thing."""
            a: int
            b: str = "b"
            tags: list[str] = fld(default_factory=list)
            hidden: int | None = fld(default=None, compare=False, repr=False)
        made.append(deco(frozen=frozen, eq=eq)(Thing))
    return made


@pytest.fixture(params=["generic", "compiled"])
def methods(request, monkeypatch):
    """Every record test runs twice: with the generic methods of a class's first calls,
    and with the compiled ones (made at the first call)."""
    from overlaypc import records
    monkeypatch.setattr(records, "COMPILE_AFTER", 10**9 if request.param == "generic" else 1)
    return request.param


@pytest.mark.parametrize("frozen", [False, True])
def test_init_repr_eq_match_dataclasses(frozen, methods):
    dc, rc = _pair(frozen=frozen)
    for args, kwargs in [((1,), {}), ((1, "x"), {"hidden": 3}), ((), {"a": 2, "tags": ["t"]})]:
        d, r = dc(*args, **kwargs), rc(*args, **kwargs)
        assert repr(r).replace(rc.__qualname__, "X") == repr(d).replace(dc.__qualname__, "X")
        assert [getattr(r, n) for n in ("a", "b", "tags", "hidden")] == \
               [getattr(d, n) for n in ("a", "b", "tags", "hidden")]
    assert rc(1) == rc(1, hidden=9)            # compare=False fields are not compared
    assert rc(1) != rc(2) and rc(1) != rc(1, "c")
    assert rc(1).__eq__(dc(1)) is NotImplemented  # another class is never equal
    assert rc(1).tags is not rc(1).tags        # a fresh default per instance
    with pytest.raises(TypeError):
        rc()                                   # a field without default is required
    with pytest.raises(TypeError):
        rc(1, nope=2)
    with pytest.raises(TypeError):
        rc(1, a=1)
    with pytest.raises(TypeError):
        rc(1, "b", [], 4, 5)


def test_frozen_refuses_assignment_and_hashes_compared_fields(methods):
    _, rc = _pair(frozen=True)
    r = rc(1, "x")
    with pytest.raises(FrozenInstanceError):
        r.a = 2
    with pytest.raises(AttributeError):        # as dataclasses.FrozenInstanceError is
        del r.b
    r, same = rc(1, "x", ()), rc(1, "x", (), hidden=5)   # a tuple: hashable, as dataclasses needs too
    assert hash(r) == hash(same) and {r: 1}[same] == 1


def test_hash_rules_follow_dataclasses(methods):
    dc, rc = _pair(frozen=False)
    assert rc.__hash__ is None and dc.__hash__ is None   # eq without frozen: unhashable
    dc, rc = _pair(eq=False)
    r = rc(1)
    assert r != rc(1) and r == r and hash(r) == object.__hash__(r)  # identity


def test_own_methods_kept_and_post_init_called(methods):
    @record
    class Counted:
        n: int = 0
        lock: threading.Lock = field(default_factory=threading.Lock)

        def __post_init__(self) -> None:
            self.doubled = self.n * 2

        def __repr__(self) -> str:
            return "mine"

    c = Counted(4)
    assert c.doubled == 8 and repr(c) == "mine" and Counted.n == 0
    assert "lock" not in Counted.__dict__       # a factory leaves no class attribute


def test_methods_compiled_after_some_calls_once_across_threads(monkeypatch):
    from overlaypc import records
    monkeypatch.setattr(records, "COMPILE_AFTER", 4)

    @record(frozen=True)
    class Lazy:
        a: int
        b: tuple = ()

    def compiled() -> dict:
        return {name: "<record" in Lazy.__dict__[name].__code__.co_filename
                for name in ("__init__", "__repr__", "__eq__", "__hash__")}

    first = [Lazy(1), Lazy(2, (3,))]
    assert repr(first[1]).endswith(".Lazy(a=2, b=(3,))") and not any(compiled().values())
    made, barrier = [], threading.Barrier(8)

    def use() -> None:
        barrier.wait()
        made.append(Lazy(1, (2,)))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(compiled().values())
    assert len(set(made)) == 1 and made[0] == Lazy(1, (2,)) and first[0] == Lazy(1)
    assert repr(made[0]).endswith(".Lazy(a=1, b=(2,))")


def test_non_default_after_default_is_refused():
    with pytest.raises(TypeError):
        @record
        class Bad:
            a: int = 0
            b: int


def test_named_tuple_matches_typing():
    import typing

    made = []
    for base in (typing.NamedTuple, typing_lite.NamedTuple):
        class Pair(base):
            """Two numbers."""
            a: int
            b: int = 2

            @property
            def total(self) -> int:
                return self.a + self.b

            @classmethod
            def of(cls, n: int) -> "Pair":
                return cls(n, n)
        made.append(Pair)
    ours, theirs = made[1], made[0]
    for cls in (theirs, ours):
        p = cls(1)
        assert p == (1, 2) and p.total == 3 and cls.of(4) == (4, 4) and p._replace(b=5) == (1, 5)
        assert cls._fields == ("a", "b") and cls.__doc__ == "Two numbers." and isinstance(p, tuple)
    assert repr(ours(1)) == repr(theirs(1)) and ours.__qualname__ == theirs.__qualname__
    assert ours.__module__ == theirs.__module__ == __name__
    with pytest.raises(TypeError):
        class Bad(typing_lite.NamedTuple):
            a: int = 0
            b: int


#: standard modules a mount's imports leave out, and why: dataclasses and inspect (~5 ms of
#: start-up, see records), typing (~2 ms, see typing_lite), argparse (~4 ms, cli._plain_args),
#: re and enum (~4 ms beyond what a mount imports anyway: only logging, after the first
#: reply, and a stack file need re), queue and heapq (~0.3 ms: the session takes
#: ``_queue.SimpleQueue``), weakref (~0.7 ms: fdbudget takes ``_weakrefset``), ctypes
#: (~1.3 ms: ``cbind`` takes ``_ctypes``' own classes), contextlib (~0.3 ms: ``scopes``),
#: bisect (~0.06 ms: ``_bisect``), struct (~0.15 ms: ``_struct``, which it only re-exports)
SLOW_STDLIB = ("dataclasses", "inspect", "typing", "argparse", "re", "enum", "queue", "heapq",
               "weakref", "ctypes", "contextlib", "bisect", "struct")


def test_mount_imports_leave_out_slow_standard_modules():
    """What a mount imports (benchmarks/run.py MOUNT_IMPORTS) pulls in none of
    ``SLOW_STDLIB`` (queue and heapq came with the session's notification queue before;
    ctypes with ``sysapi`` and ``engine.channel``, contextlib and bisect with ``core`` and
    ``listings``: failed there with ``'ctypes contextlib bisect' == ''``)."""
    code = ("import sys; before = set(sys.modules); "  # (what site imported is no mount's cost)
            "import overlaypc.cli, overlaypc.core, overlaypc.engine.channel, "
            "overlaypc.engine.daemon, overlaypc.mounting, overlaypc.overlay_ops; "
            f"print(' '.join(m for m in {SLOW_STDLIB!r} if m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=REPO)).stdout.strip()
    assert out == ""


def test_plain_command_lines_read_as_argparse_reads_them():
    """cli._plain_args (the usual mount command lines without argparse) gives argparse's
    answer wherever it answers, and declines whatever argparse refuses."""
    import itertools
    import random

    from overlaypc import cli

    parser = cli._mount_parser()
    tokens = ["-f", "-d", "--foreground", "--debug", "-o", "lowerdir=/l,upperdir=/u", "-oro",
              "-o=x", "--stack", "s.yaml", "--stack=t.yaml", "SRC", "MNT", "", "-", "--", "-fd",
              "--fore", "-x", "-1"]
    samples = [list(t) for n in range(4) for t in itertools.product(tokens, repeat=n)]
    rng = random.Random(17)
    samples += [rng.choices(tokens, k=rng.randint(4, 7)) for _ in range(3000)]
    answered = 0
    for argv in samples:
        ours = cli._plain_args(argv)
        try:
            theirs = parser.parse_args(argv)
        except SystemExit:
            assert ours is None, argv
            continue
        if ours is None:
            continue
        answered += 1
        assert (ours.foreground, ours.debug, ours.options, ours.stack, ours.targets) == \
               (theirs.foreground, theirs.debug, theirs.options, theirs.stack, theirs.targets), argv
    assert answered > 1000
    assert cli._plain_args(["-f", "-o", "lowerdir=/l", "/mnt"]).targets == ["/mnt"]


@pytest.mark.parametrize("phase", ["generic", "compiled"])
def test_named_tuple_construction_matches_collections(phase, monkeypatch):
    """A ``typing_lite.NamedTuple`` class is built without compiling its ``__new__``
    (compiled after ``COMPILE_AFTER`` constructions): both ``__new__``s take the same
    arguments, make the same tuples and refuse the same calls as ``collections.namedtuple``'s,
    and the class has its methods and attributes."""
    import collections
    import pickle

    monkeypatch.setattr(typing_lite, "COMPILE_AFTER", 10**9 if phase == "generic" else 1)

    class Three(typing_lite.NamedTuple):
        a: int
        b: str = "b"
        c: tuple = ()

    class One(typing_lite.NamedTuple):
        only: int

    theirs = collections.namedtuple("Three", ["a", "b", "c"], defaults=["b", ()])
    theirs_one = collections.namedtuple("One", ["only"])
    calls = [((1,), {}), ((1, "x"), {}), ((1, "x", (2,)), {}), ((), {"a": 1, "c": (3,)}),
             ((1,), {"c": 4, "b": "y"}), ((), {}), ((1, 2, 3, 4), {}), ((1,), {"a": 2}),
             ((1,), {"nope": 2}), ((), {"b": 1})]
    for args, kwargs in calls + calls:  # the second round runs the compiled one (phase "compiled")
        try:
            expected = tuple(theirs(*args, **kwargs))
        except TypeError:
            with pytest.raises(TypeError):
                Three(*args, **kwargs)
            continue
        made = Three(*args, **kwargs)
        assert type(made) is Three and tuple(made) == expected
        assert repr(made) == repr(theirs(*args, **kwargs))
    compiled = "<lambda>" in Three.__dict__["__new__"].__func__.__code__.co_name
    assert compiled == (phase == "compiled")
    assert One(5) == (5,) and One(only=6).only == 6 and repr(One(1)) == "One(only=1)"
    with pytest.raises(TypeError):
        One(1, 2)
    t = Three(1)
    assert (t.a, t.b, t.c) == (1, "b", ()) and Three._fields == theirs._fields
    assert Three._field_defaults == theirs._field_defaults and Three.__match_args__ == ("a", "b", "c")
    assert t._replace(b="z") == (1, "z", ()) and type(t._replace(b="z")) is Three
    assert t._asdict() == {"a": 1, "b": "b", "c": ()} and Three._make([1, 2, 3]) == (1, 2, 3)
    with pytest.raises(TypeError):
        Three._make([1])
    with pytest.raises(ValueError):
        t._replace(d=1)
    with pytest.raises(AttributeError):
        t.a = 2
    with pytest.raises(AttributeError):
        t.other = 2                              # __slots__ = (): no instance dict
    assert t.__getnewargs__() == (1, "b", ()) and One(1)._fields == theirs_one._fields
    assert Three.a.__doc__ == theirs.a.__doc__ and Three.__doc__ == theirs.__doc__
    globals()["Three"] = Three                  # pickle finds it by module and name
    Three.__qualname__ = "Three"
    try:
        assert pickle.loads(pickle.dumps(t)) == t
    finally:
        del globals()["Three"]


#: modules a mount imports only when its options need them (``core``)
NOT_AT_START = ("overlaypc.index", "overlaypc.indexroots")
#: modules no mount's start-up imports, whatever its options: each is imported where a
#: request first needs it (``namespace``: the first change of a name, ``core``;
#: ``readdir``: the first listing or removal of a directory, ``core``/``namespace``;
#: ``extents``: the first FIEMAP, ``sharing``; ``fileattrs``: the first lsattr/chattr,
#: ``core``), or only for a command line that asks (``stackfile``:
#: --stack; ``argparse``: help, errors, unusual command lines; ``logging``: the first
#: record, after the first reply)
NEVER_AT_START = ("overlaypc.namespace", "overlaypc.readdir", "overlaypc.extents",
                  "overlaypc.fileattrs", "overlaypc.stackfile", "argparse", "logging")


@pytest.mark.parametrize("options", ["", ",index=on"])
def test_mount_start_up_leaves_out_modules_its_options_do_not_need(tmp_path, options):
    """A default stack's start-up (what ``cli.mount_main`` does before the kernel's first
    request: options, validation, ``OverlayFS()``, ``start()``, ``OverlayOps()``) does not
    import the modules of ``NOT_AT_START``; ``index=on`` imports them there (at the mount,
    where a broken install fails it, not at a later request). Neither imports those of
    ``NEVER_AT_START`` (readdir, extents and fileattrs were imported at every start before:
    ``['overlaypc.readdir', 'overlaypc.extents', 'overlaypc.fileattrs'] == []``)."""
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    opts = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work{options}"
    out = _start_up(["-o", opts, str(tmp_path / "mnt")],
                    f"print(' '.join(m for m in {NOT_AT_START!r} if m in sys.modules))",
                    f"print(' '.join(m for m in {NEVER_AT_START!r} if m in sys.modules))").split("\n")
    assert out[0].split() == ([] if not options else list(NOT_AT_START))
    assert out[1].split() == []


def _start_up(argv: list[str], *then: str) -> str:
    """The output of a fresh interpreter that runs a mount's start-up for the command line
    ``argv`` (as ``cli.mount_main`` does before the kernel's first request: options,
    validation, ``OverlayFS()``, ``start()``, ``OverlayOps()``), then the lines ``then``."""
    code = "\n".join([
        "import sys, " + ", ".join(("overlaypc.cli", "overlaypc.core", "overlaypc.engine.channel",
                                    "overlaypc.engine.daemon", "overlaypc.mounting",
                                    "overlaypc.overlay_ops")),
        "from overlaypc import cli",
        "from overlaypc.core import OverlayFS",
        "from overlaypc.overlay_ops import OverlayOps",
        f"cfg = cli.parse_mount_args({argv!r})",
        "cli.validate(cfg)",
        "fs = OverlayFS(cfg)",
        "fs.start()",
        "OverlayOps(fs)",
        "fs.close()",
        *then,
    ])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=REPO)).stdout


@pytest.mark.parametrize("stack", [False, True])
def test_stack_file_code_is_loaded_only_for_a_stack_file(tmp_path, stack):
    """``stackfile`` (and with it ``yaml`` and ``re``) is imported by the command line that
    names a stack file, not by a plain mount's options, validation and start-up (it was
    part of ``config``, which every mount imports: its code and ``YAML_BOOLEANS`` table
    were loaded at each start)."""
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    opts = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work"
    (tmp_path / "stack.yaml").write_text(f"lowers: [{tmp_path}/lower]\noptions: [{opts}]\n")
    argv = (["--stack", str(tmp_path / "stack.yaml")] if stack else ["-o", opts]) + [str(tmp_path / "mnt")]
    out = _start_up(argv, "print(cfg.lowers == [%r], cfg.writable)" % str(tmp_path / "lower"),
                    "print(' '.join(m for m in ('overlaypc.stackfile', 'yaml', 're') if m in sys.modules))"
                    ).splitlines()
    assert out[0] == "True True"
    assert out[1].split() == (["overlaypc.stackfile", "yaml", "re"] if stack else [])


def test_collector_paused_for_start_up_is_on_when_requests_run(tmp_path, monkeypatch):
    """``python -m overlaypc`` pauses garbage collection for its start-up; the mount runs
    its requests (``daemon.run``) with it on again, start-up's objects frozen. A caller
    of ``cli.main`` that did not pause it (tests, embedding) keeps its own setting."""
    import gc

    from overlaypc import cli
    from overlaypc.engine import daemon

    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    argv = ["-f", "-o", f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work",
            str(tmp_path / "mnt")]
    seen = []
    monkeypatch.setattr(daemon, "run", lambda *a, **k: seen.append((gc.isenabled(), gc.get_freeze_count())) or 0)
    monkeypatch.setattr(cli, "_setup_logging", lambda cfg: None)
    umask = os.umask(0o022)
    try:
        gc.disable()
        monkeypatch.setattr(cli, "gc_paused", True)
        assert cli.main(argv) == 0
        assert seen[-1][0] is True and seen[-1][1] > 0 and cli.gc_paused is False
        gc.disable()                      # a caller's own choice stays as it is
        assert cli.main(argv) == 0 and seen[-1][0] is False
    finally:
        gc.unfreeze()
        gc.enable()
        os.umask(umask)


def test_the_command_pauses_the_collector_and_imports_no_re_before_start_up():
    """The ``overlaypc`` command (what podman runs as its mount_program) is ``bin/overlaypc``,
    installed as a script: it enters through ``entry.main``, which pauses garbage collection
    before ``cli`` and what it imports are loaded, as ``python -m overlaypc`` does; and
    nothing before start-up imports ``re`` (the wrapper installers generate for a
    console_scripts entry point does, and ``enum`` with it: ~4 ms of every mount's start).
    Failed before: setup.cfg declared an entry point (KeyError: 'scripts'), and its
    generated wrapper run here gives ``[(False, ['enum', 're'])]``."""
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    assert cfg["options"]["scripts"].split() == ["bin/overlaypc"]
    assert "options.entry_points" not in cfg
    script = os.path.join(REPO, "bin", "overlaypc")
    assert os.access(script, os.X_OK)
    code = "\n".join([
        "import gc, sys",
        "before = set(sys.modules)",
        "seen = []",
        "class Watch:",
        "    def find_spec(self, name, path=None, target=None):",
        "        if name == 'overlaypc.cli':",
        "            seen.append((gc.isenabled(), sorted({'re', 'enum'} & (set(sys.modules) - before))))",
        "        return None",
        "sys.meta_path.insert(0, Watch())",
        f"sys.argv = [{script!r}, '--help']",
        "try:",
        f"    with open({script!r}) as f:",
        f"        exec(compile(f.read(), {script!r}, 'exec'), {{'__name__': '__main__'}})",
        "except SystemExit:",
        "    pass",
        "print(seen)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=REPO)).stdout.split("\n")
    assert out[-2] == "[(False, [])]", out


def test_a_mount_reads_the_mount_table_once_to_validate_and_once_to_open_its_layers(tmp_path):
    """``validate`` reads /proc/self/mountinfo once for all its checks (stale FUSE layers,
    the mount point in use), and ``OverlayFS()`` once for the idmapped check of all its
    layers: each read costs ~0.3 ms on a host with a few hundred mounts (before: once per
    layer and twice for the mount point in validate, once per layer in ``OverlayFS()``:
    7 and 4 reads for this three-lower stack; fails there with ['7', '4'] != ['1', '1']).
    Counted with an audit hook."""
    for d in ("l1", "l2", "l3", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    opts = (f"lowerdir={tmp_path}/l1:{tmp_path}/l2:{tmp_path}/l3,upperdir={tmp_path}/upper,"
            f"workdir={tmp_path}/work")
    code = "\n".join([
        "import sys",
        "from overlaypc import cli",
        "from overlaypc.core import OverlayFS",
        "reads = []",
        "def hook(event, args):",
        "    if event == 'open' and args[0] == '/proc/self/mountinfo':",
        "        reads.append(1)",
        "sys.addaudithook(hook)",
        f"cfg = cli.parse_mount_args(['-o', {opts!r}, {str(tmp_path / 'mnt')!r}])",
        "cli.validate(cfg)",
        "validated = len(reads)",
        "fs = OverlayFS(cfg)",
        "fs.close()",
        "print(validated, len(reads) - validated)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=REPO)).stdout.split()
    assert out == ["1", "1"]


def test_code_below_a_mount_point_is_the_package_or_the_standard_library(tmp_path):
    """``overlay_ops._code_below``: a mount over the package's directory, one above it,
    or over the standard library's loads the request-only modules before mount(2); a
    mount elsewhere (or at a sibling whose name the package's path merely starts with) does
    not."""
    from overlaypc import overlay_ops
    pkg = os.path.dirname(os.path.realpath(overlay_ops.__file__))
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    assert overlay_ops._code_below(pkg) and overlay_ops._code_below(os.path.dirname(pkg))
    assert overlay_ops._code_below("/") and overlay_ops._code_below(stdlib)
    assert not overlay_ops._code_below(str(tmp_path))
    assert not overlay_ops._code_below(pkg + "-sibling") and not overlay_ops._code_below(pkg[:-1])
