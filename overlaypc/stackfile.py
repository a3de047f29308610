"""YAML stack files (``overlaypc --stack FILE``): a mount's layers and options read from a file.

Owns ``load_stack`` and the refusals of hostile or broken files. Kept out of ``config``
(whose options table and validation every mount runs): a mount without a stack file
loads none of this, nor ``yaml`` and ``re`` (``cli`` imports it for ``--stack`` only).
"""
from __future__ import annotations

import errno
import os
import stat

from .config import GENERIC, OPTIONS, ConfigError, MountConfig, _apply_option, _split_commas

STACK_KEYS = {"lowers", "upper", "work", "options"}
#: A stack file is a few lines: anything larger (or a device) is refused, not parsed
MAX_STACK_BYTES = 1 << 20


def load_stack(path: str, cfg: MountConfig) -> None:
    """Fill ``cfg`` from a YAML stack file; relative paths resolve against its directory.

    Hostile files are refused with one line: over ``MAX_STACK_BYTES``, not UTF-8, nested
    too deeply for the parser, a key given twice, or a value of the wrong type. Aliases
    (``&a``/``*a``) share one object, so a "billion laughs" file costs nothing until
    something expands it: nothing here turns a value into text before its type is checked."""
    data = _parse_stack(path)
    if not isinstance(data, dict):
        raise ConfigError(f"stack file {path} must be a mapping with 'lowers' (got {type(data).__name__})")
    unknown = set(data) - STACK_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))} in stack file {path}")
    base = os.path.dirname(os.path.abspath(path))
    lowers = data.get("lowers")
    if isinstance(lowers, str):
        lowers = [lowers]
    if not isinstance(lowers, list) or not lowers or not all(isinstance(x, str) and x for x in lowers):
        raise ConfigError(f"stack file {path}: 'lowers' must be a non-empty list of paths")
    cfg.lowers = [os.path.join(base, p) for p in lowers]
    for key in ("upper", "work"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"stack file {path}: '{key}' must be a path")
        setattr(cfg, key, os.path.join(base, value))
    if any("\0" in p for p in (*cfg.lowers, cfg.upper or "", cfg.work or "")):
        raise ConfigError(f"stack file {path}: a path contains a NUL byte")
    for item in filter(None, _stack_options(path, data.get("options"))):
        _apply_option(cfg, item)
    # the paths its options give (lowerdir=, upperdir=, logfile=...) resolve against its
    # directory too; -o options, applied after it, resolve against the cwd
    cfg.lowers = [os.path.join(base, p) for p in cfg.lowers]
    for attr in ("upper", "work", "logfile"):
        if getattr(cfg, attr):
            setattr(cfg, attr, os.path.join(base, getattr(cfg, attr)))


def _parse_stack(path: str) -> object:
    import yaml

    raw = _read_stack(path)
    if len(raw) > MAX_STACK_BYTES:
        raise ConfigError(f"stack file {path} is too large (over {MAX_STACK_BYTES} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"stack file {path} is not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.load(text, Loader=_stack_loader())  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None)
        what = f": {' '.join(str(problem).split())}" if problem else ""
        raise ConfigError(f"malformed YAML in stack file {path}{where}{what}") from None
    except RecursionError:  # the parser recurses per level of nesting
        raise ConfigError(f"stack file {path} is nested too deeply") from None


def _read_stack(path: str) -> bytes:
    """The first ``MAX_STACK_BYTES + 1`` bytes of the regular file at ``path``. Anything else
    is refused by ``fstat`` of the opened fd; ``O_NONBLOCK`` keeps the open of a FIFO from
    waiting for a writer (a socket cannot be opened at all: ENXIO, also named)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a device with no driver behind it
            raise ConfigError(f"stack file {path} is not a regular file") from None
        raise ConfigError(f"cannot read stack file {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a file")
            raise ConfigError(f"stack file {path} is not a regular file (a {kind})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_STACK_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read stack file {path}: {e.strerror}") from None
    finally:
        os.close(fd)


_FILE_KINDS = {stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device",
               stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}


def _stack_options(path: str, options: object) -> list[str]:
    """The ``options`` of a stack file, one option per item: a list of option strings (or
    numbers) and one string split at commas as ``-o`` is; a mapping of names to scalar
    values gives one option per key, its value whole (``context: "...:c1,c2"`` holds a
    comma that separates nothing); booleans: ``_boolean_option``."""
    if options is None:
        return []
    if isinstance(options, str):
        return _split_commas(options)
    scalar = (str, int, float)  # (bool is an int)
    if isinstance(options, dict):
        if all(isinstance(k, str) and isinstance(v, scalar) for k, v in options.items()):
            return [_boolean_option(path, k, v) if isinstance(v, bool) else f"{k}={v}"
                    for k, v in options.items()]
    elif isinstance(options, list) and all(isinstance(o, scalar) for o in options):
        return [item for o in options for item in _split_commas(str(o))]
    raise ConfigError(f"stack file {path}: 'options' must be a list of strings like [cache=shared]")


def _yaml_booleans() -> dict[str, tuple[str, str | None]]:
    """How a YAML boolean is written for each option that takes one: (true, false);
    a false of None is refused (a flag with no opposite: leave it out)."""
    table: dict[str, tuple[str, str | None]] = {
        name: (f"{name}=on", f"{name}=off")
        for name in ("sharing", "passthrough", "index", "metacopy", "xino", "redirect_dir")}
    table.update({name: (f"{name}=1", f"{name}=0") for name in ("noxattrs", "fsync")})
    table.update({name: (name, None) for name in ("userxattr", "volatile", "squash_to_root",
                                                  "static_nlink", "noacl", "allow_root", "ino32_t")})
    for name in ("ro", *GENERIC):
        opposite = {"ro": "rw", "rw": "ro"}.get(name) or (
            "no" + name if "no" + name in GENERIC else
            name[2:] if name.startswith("no") and name[2:] in GENERIC else None)
        table[name] = (name, opposite)
    table["rw"] = ("rw", "ro")
    return table


#: YAML 1.1 reads unquoted true/false, yes/no and on/off as booleans (``index: on``)
YAML_BOOLEANS = _yaml_booleans()


def _boolean_option(path: str, name: str, value: bool) -> str:
    """A stack file's ``NAME: <boolean>`` as the option's own spelling: ``index: on`` is
    index=on, ``fsync: no`` fsync=0, ``ro: yes`` ro, ``nodev: no`` dev. Refused where a
    boolean means nothing (``lowerdir: yes``, ``volatile: no``)."""
    spelling = YAML_BOOLEANS[name][0 if value else 1] if name in YAML_BOOLEANS else None
    if spelling is None and value and name not in OPTIONS:
        return name  # an option unknown here (refused later) or x-* / comment
    if spelling is None:
        raise ConfigError(f"stack file {path}: option {name} does not take a boolean "
                          f"({name}: {'true' if value else 'false'}; YAML reads unquoted "
                          f"yes/no/on/off as booleans too: quote the value, or leave a flag out)")
    return spelling


_LOADER: list[type] = []


def _stack_loader() -> type:
    """yaml's SafeLoader that refuses a mapping key given twice (YAML says keys are
    unique; PyYAML would keep the last silently)."""
    if _LOADER:
        return _LOADER[0]
    import re  # (only here: a mount without a stack file imports neither re nor yaml)

    import yaml

    class StackLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: set[str] = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key.value!r} is given twice", key.start_mark)
                    seen.add(key.value)
            return super().construct_mapping(node, deep)

    # YAML 1.1 reads digits joined by colons as base 60 (1:10:5 is 4205, 1:30 is 90): an
    # ID mapping or a time would change silently. Such scalars stay text (the first
    # resolver that matches decides); quoted ones always were.
    colon_digits = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-9_]*)+(?:\.[0-9_]*)?$")
    resolvers = {first: list(found) for first, found in StackLoader.yaml_implicit_resolvers.items()}
    for first in "-+0123456789":
        resolvers[first] = [("tag:yaml.org,2002:str", colon_digits), *resolvers.get(first, [])]
    StackLoader.yaml_implicit_resolvers = resolvers
    _LOADER.append(StackLoader)
    return StackLoader
