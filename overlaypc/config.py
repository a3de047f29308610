"""Mount configuration: the options table, ``-o`` parsing, validation (YAML stack files:
``stackfile``).

Owns: ``MountConfig`` and every check that runs before anything is mounted or written.
Each problem raises ``ConfigError`` with one line naming the bad value; the CLI turns
it into exit status 2.

Layer order: ``lowerdir=A:B:C`` lists lowers top first (A is the top), as the kernel's
overlay does; YAML stack files list ``lowers`` top first too.

``-o`` text is split as mount(8) does: at commas outside double quotes (``context="a,b"``
is one option), empty elements are skipped. Besides overlaypc's own options, every option
of fuse-overlayfs is accepted (podman, buildah and CRI-O pass them through
containers/storage's ``mount_program``): with its meaning where overlaypc has one, else
with a log line at mount saying it has no effect and why (``MountConfig.notes``).
Anything else is refused.
"""
from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable

from .idmap import IdMap, overflow_id
from .records import field, record

CACHE_MODES = ("kernel", "shared")
HANDLE_MODES = ("reopen", "bind-at-open")
#: on: create and follow redirects; follow / off: follow only (the kernel follows
#: redirects under "off" too, with its default redirect_always_follow); nofollow: refuse
#: (a directory with one fails its lookup, EPERM, as the kernel's)
REDIRECT_MODES = ("on", "follow", "off", "nofollow")
DEFAULT_REDIRECT_DIR = "on"


class ConfigError(Exception):
    """Bad input from the user: one line, exit status 2."""


@record
class MountConfig:
    lowers: list[str] = field(default_factory=list)
    upper: str | None = None
    work: str | None = None
    mountpoint: str = ""
    source: str = "overlaypc"
    readonly: bool = False
    cache: str = "kernel"
    handles: str = "reopen"
    userxattr: bool = False
    volatile: bool = False
    logfile: str | None = None
    debug: bool = False
    foreground: bool = False
    sharing: bool = True
    #: FUSE passthrough where no copy-up can happen under the open (``passthrough_opens``)
    passthrough: bool = True
    timeout: float = 30.0
    redirect_dir: str | None = None  # None: "on" with metacopy, else the default
    index: bool = False
    metacopy: bool = False
    #: as given (off, auto, on): inode numbers are the same under each (``stack``), but
    #: ``xino=on`` forbids offline changes of the lower layers (``allows_offline_changes``)
    xino: str = "off"
    generic: list[str] = field(default_factory=list)
    # fuse-overlayfs options (see README, "fuse-overlayfs options")
    uidmapping: IdMap | None = None
    gidmapping: IdMap | None = None
    squash_to_root: bool = False
    squash_to_uid: int | None = None
    squash_to_gid: int | None = None
    static_nlink: bool = False
    noacl: bool = False
    noxattrs: bool = False
    fsync: bool = True
    xattr_permissions: int = 0
    #: an SELinux label for the whole mount, passed to the kernel (``context=``)
    context: str | None = None
    allow_root: bool = False
    #: accepted options that change nothing here: (option as given, why), logged at mount
    notes: list[tuple[str, str]] = field(default_factory=list)
    #: ``lowerdir=`` was given (``lowerdir+=`` may not follow it, as in the kernel)
    lowerdir_given: bool = False
    #: (st_dev, st_ino) of each layer directory (canonical path) as ``validate`` checked
    #: it: the mount refuses a root that is another object when it opens it (``LayerStack``)
    checked: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.readonly


def _split_lowers(value: str) -> list[str]:
    # A literal ':' in a path is written '\:' as the kernel accepts it.
    parts, cur, esc = [], "", False
    for ch in value:
        if esc:
            cur += ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ":":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    if any(not p for p in parts[1:-1]):
        raise ConfigError(f"data-only lower layers are not supported (lowerdir={value!r}: "
                          f"'::' starts them)")
    if not parts[0] or not parts[-1]:
        raise ConfigError(f"empty layer in lowerdir={value!r}")
    return parts


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[MountConfig, str | None], None]:
    def apply(cfg: MountConfig, value: str | None) -> None:
        if value not in choices:
            raise ConfigError(f"bad value {name}={value!r}: expected one of {', '.join(choices)}")
        setattr(cfg, name, value)
    return apply


def _path(attr: str) -> Callable[[MountConfig, str | None], None]:
    def apply(cfg: MountConfig, value: str | None) -> None:
        if not value:
            raise ConfigError(f"option {attr}dir needs a path")
        setattr(cfg, attr, value)
    return apply


def _flag(attr: str, on: bool = True) -> Callable[[MountConfig, str | None], None]:
    def apply(cfg: MountConfig, value: str | None) -> None:
        if value is not None:
            raise ConfigError(f"option {attr} takes no value (got {attr}={value!r})")
        setattr(cfg, attr, on)
    return apply


def _on_off(attr: str) -> Callable[[MountConfig, str | None], None]:
    def apply(cfg: MountConfig, value: str | None) -> None:
        if value not in ("on", "off"):
            raise ConfigError(f"bad value {attr}={value!r}: expected on or off")
        setattr(cfg, attr, value == "on")
    return apply


def _seconds(attr: str) -> Callable[[MountConfig, str | None], None]:
    # any non-negative number: fuse-overlayfs's default is 1e9 s; the kernel caps what it keeps
    def apply(cfg: MountConfig, value: str | None) -> None:
        try:
            seconds = float(value or "")
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < float("inf"):
            raise ConfigError(f"bad value {attr}={value!r}: expected a non-negative number of seconds")
        setattr(cfg, attr, seconds)
    return apply


def _integer(name: str, value: str | None) -> int:
    """An option's integer value, as fuse-overlayfs's ``%d`` options take it."""
    text = (value or "").strip()
    if not text.lstrip("-").isdigit():
        raise ConfigError(f"bad value {name}={value!r}: expected an integer" if value is not None
                          else f"option {name} needs an integer value ({name}=N)")
    return int(text)


def _switch(attr: str) -> Callable[[MountConfig, str | None], None]:
    """fuse-overlayfs's ``NAME=N`` switches: 0 is off, anything else on."""
    def apply(cfg: MountConfig, value: str | None) -> None:
        setattr(cfg, attr, _integer(attr, value) != 0)
    return apply


def _id(attr: str) -> Callable[[MountConfig, str | None], None]:
    def apply(cfg: MountConfig, value: str | None) -> None:
        n = _integer(attr, value)
        if not 0 <= n < (1 << 32) - 1:
            raise ConfigError(f"bad value {attr}={value!r}: expected an ID from 0 to {(1 << 32) - 2}")
        setattr(cfg, attr, n)
    return apply


def _idmap(attr: str, kind: str) -> Callable[[MountConfig, str | None], None]:
    def apply(cfg: MountConfig, value: str | None) -> None:
        try:
            mapping = IdMap.parse(value or "", overflow_id(kind))
        except ValueError as e:
            raise ConfigError(f"bad value {attr}={value!r}: {e}") from None
        setattr(cfg, attr, mapping)
    return apply


def _xattr_permissions(cfg: MountConfig, value: str | None) -> None:
    n = _integer("xattr_permissions", value)
    if n not in (0, 1, 2):
        raise ConfigError(f"bad value xattr_permissions={value!r}: expected 0 (off), "
                          f"1 (security.fuseoverlayfs.override_stat) or 2 (user.fuseoverlayfs.override_stat)")
    cfg.xattr_permissions = n


def _context(cfg: MountConfig, value: str | None) -> None:
    if not value:
        raise ConfigError("option context needs an SELinux label (context=\"user:role:type:level\")")
    cfg.context = value  # unquoted; quoted again when passed to the kernel


def _no_effect(name: str, reason: str, kind: str = "flag") -> Callable[[MountConfig, str | None], None]:
    """A fuse-overlayfs option that changes nothing here: its value is checked as
    fuse-overlayfs parses it (``flag``: none, ``int``: ``%d``, ``text``: ``%s``), then it is
    noted with ``reason``, which the daemon logs at mount."""
    def apply(cfg: MountConfig, value: str | None) -> None:
        if kind == "flag" and value is not None:
            raise ConfigError(f"option {name} takes no value (got {name}={value!r})")
        if kind == "int":
            _integer(name, value)
        if kind == "text" and not value:
            raise ConfigError(f"option {name} needs a value ({name}=...)")
        cfg.notes.append((name if value is None else f"{name}={value}", reason))
    return apply


def _set_lowers(cfg: MountConfig, value: str | None) -> None:
    # as the kernel's: it replaces the layers given so far (also by lowerdir+=)
    if not value:
        raise ConfigError("option lowerdir needs at least one path")
    cfg.lowers = _split_lowers(value)
    cfg.lowerdir_given = True


def _add_lower(cfg: MountConfig, value: str | None) -> None:
    """``lowerdir+=PATH`` (kernel 6.8+): one more layer below those given, the path as it
    is (no ':' escaping). As the kernel's, it cannot follow ``lowerdir=``."""
    if not value:
        raise ConfigError("option lowerdir+ needs a path (lowerdir+=DIR)")
    if cfg.lowerdir_given:
        raise ConfigError(f"lowerdir+={value} cannot follow lowerdir=: give every layer one way")
    cfg.lowers.append(value)


def _data_only(cfg: MountConfig, value: str | None) -> None:
    raise ConfigError(f"data-only lower layers are not supported (datadir+={value})")


def _set_logfile(cfg: MountConfig, value: str | None) -> None:
    if not value:
        raise ConfigError("option logfile needs a path")
    cfg.logfile = value


def _xino(cfg: MountConfig, value: str | None) -> None:
    if value is None:
        return  # (a bare ``xino`` was always taken as no change)
    if value not in ("off", "auto", "on"):
        raise ConfigError(f"option xino={value} is not supported (off, auto or on)")
    cfg.xino = value


def allows_offline_changes(cfg: MountConfig) -> bool:
    """The kernel's ``ovl_allow_offline_changes``: whether the lower layers may change while
    unmounted, i.e. none of redirect_dir=on, index=on, metacopy=on, xino=on is used (the
    options as they take effect: metacopy implies redirect_dir=on; an index the upper
    cannot keep is off). Where they may not, the kernel makes a directory made in a merged
    parent opaque (``Namespace.mkdir``)."""
    return not (cfg.index or cfg.metacopy or cfg.redirect_dir == "on" or cfg.xino == "on")


#: The one table of overlay options: name -> how it changes the config.
OPTIONS: dict[str, Callable[[MountConfig, str | None], None]] = {
    "lowerdir": _set_lowers,
    "lowerdir+": _add_lower,
    "datadir+": _data_only,
    "upperdir": _path("upper"),
    "workdir": _path("work"),
    "ro": _flag("readonly"),
    "rw": _flag("readonly", False),
    "cache": _choice("cache", CACHE_MODES),
    "handles": _choice("handles", HANDLE_MODES),
    "userxattr": _flag("userxattr"),
    "volatile": _flag("volatile"),
    "sharing": _on_off("sharing"),
    "passthrough": _on_off("passthrough"),
    "logfile": _set_logfile,
    "timeout": _seconds("timeout"),
    "redirect_dir": _choice("redirect_dir", REDIRECT_MODES),
    "index": _on_off("index"),
    "metacopy": _on_off("metacopy"),
    "xino": _xino,
    # -- fuse-overlayfs's options (containers/storage passes them as mount_program options) --
    "uidmapping": _idmap("uidmapping", "uid"),
    "gidmapping": _idmap("gidmapping", "gid"),
    "squash_to_root": _flag("squash_to_root"),
    "squash_to_uid": _id("squash_to_uid"),
    "squash_to_gid": _id("squash_to_gid"),
    "static_nlink": _flag("static_nlink"),
    "noacl": _flag("noacl"),
    "noxattrs": _switch("noxattrs"),
    "fsync": _switch("fsync"),
    "xattr_permissions": _xattr_permissions,
    "context": _context,
    "allow_root": _flag("allow_root"),
    "threaded": _no_effect("threaded", "requests are always served by worker threads, one per "
                           "CPU and more while requests block, each on its own cloned /dev/fuse "
                           "fd", "int"),
    "max_idle_threads": _no_effect("max_idle_threads", "one worker per CPU lives as long as the "
                                   "mount; those added while requests block retire once nothing "
                                   "blocks", "int"),
    "plugins": _no_effect("plugins", "fuse-overlayfs's layer plugins are not supported; lower "
                          "layers are plain directories", "text"),
    "fast_ino": _no_effect("fast_ino", "inode numbers always come from the layers (with xino bits "
                           "across filesystems), stable across copy-up and remount", "int"),
    "writeback": _no_effect("writeback", "the kernel's writeback cache is never used: it would hold "
                            "writes in one name's page cache, so another name of a hard link "
                            "could read stale data", "int"),
    "ino32_t": _no_effect("ino32_t", "inode numbers are not folded to 32 bits: folding could make "
                          "two files show one number"),
}

#: Options mount(8), fstab and mount.fuse3 pass along; accepted and left to the kernel/VFS.
GENERIC = {"defaults", "nofail", "noatime", "relatime", "atime", "strictatime", "nodiratime",
           "diratime", "lazytime", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "_netdev",
           "auto", "noauto", "user", "nouser", "users", "owner", "group", "async", "sync",
           "allow_other", "default_permissions", "silent", "loud"}


#: options whose values keep their backslashes, as the kernel's: ``lowerdir=`` unescapes
#: each layer itself (after splitting at ``:``), ``lowerdir+=`` takes its path as it is
RAW_VALUES = {"lowerdir", "lowerdir+", "datadir+"}


def apply_options(cfg: MountConfig, text: str) -> None:
    for item in filter(None, _split_commas(text)):
        _apply_option(cfg, item)


def _apply_option(cfg: MountConfig, item: str) -> None:
    """One option, ``name`` or ``name=value``, its value still quoted and escaped."""
    name, eq, value = item.partition("=")
    if name in OPTIONS:
        value = _unquote(value)  # (before the unescaping: a ``\"`` is no quote)
        if name not in RAW_VALUES:
            value = _unescape_value(value)
        OPTIONS[name](cfg, value if eq else None)
    elif name in GENERIC or name.startswith(("x-", "comment=")) or name == "comment":
        cfg.generic.append(item)
    else:
        raise ConfigError(f"unknown option {item!r}")


def _split_commas(text: str) -> list[str]:
    """Options at commas, as mount(8) and the kernel split them: not inside double quotes,
    not after a backslash. Escapes are kept: each option unescapes its value (or not)."""
    out, cur, esc, quoted = [], "", False, False
    for ch in text:
        if esc:
            cur += "\\" + ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
            cur += ch
        elif ch == "," and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if quoted:
        raise ConfigError(f"unbalanced double quote in options {text!r}")
    out.append(cur)
    return out


def _unescape_value(value: str) -> str:
    """``value`` with each backslash escape replaced by the character it escapes, as the
    kernel does for ``upperdir=``/``workdir=`` (``\\,`` is a comma, ``\\\\`` a backslash)."""
    if "\\" not in value:
        return value
    out, esc = "", False
    for ch in value:
        if esc or ch != "\\":
            out += ch
            esc = False
        else:
            esc = True
    return out


def _unquote(value: str) -> str:
    """A value with its double quotes removed (mount(8) quotes values that hold commas);
    a quote after a backslash is no quote (as ``_split_commas`` reads it) and stays, with
    the escape: review19, ``q\\"x`` named the directory ``qx``."""
    if '"' not in value:
        return value
    out, esc = "", False
    for ch in value:
        if esc:
            out += "\\" + ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch != '"':
            out += ch
    return out + "\\" if esc else out


# -- validation ------------------------------------------------------------------------------
def _is_within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _dir(path: str, what: str, mounts: list[tuple[str, str]],
         checked: dict[str, tuple[int, int]] | None = None) -> str:
    """``path``'s canonical form, refused unless it is a directory (and not a stale FUSE
    mount: ``mounts`` is the mount table ``validate`` read once); its (st_dev, st_ino)
    into ``checked``, under that form."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except ValueError:  # a NUL byte (a stack file's path)
        raise ConfigError(f"{what} {path!r} contains a NUL byte") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise ConfigError(f"{what} {path} is a stale FUSE mount; recover with "
                              f"'umount -l {path}' or 'fusermount3 -u -z {path}'") from None
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise ConfigError(f"{what} {path} is not a directory")
    real = os.path.realpath(path)
    if _stale_fuse_mount(real, mounts):
        raise ConfigError(f"{what} {real} is a stale FUSE mount (its daemon is gone); recover "
                          f"with 'umount -l {real}' or 'fusermount3 -u -z {real}'")
    if checked is not None:
        checked[real] = (st.st_dev, st.st_ino)
    return real


def _stale_fuse_mount(path: str, mounts: list[tuple[str, str]], timeout: float = 2.0) -> bool:
    """Whether ``path`` is the root of a FUSE mount (in ``mounts``, from ``_mounts``) whose
    daemon is gone. ``stat`` of such a root may still succeed from cached attributes;
    ``statfs`` always asks the daemon, and gets ENOTCONN once the connection is aborted.
    Asked from a thread, so a live but hung daemon cannot hang the CLI (it is then simply
    "in use")."""
    if not any(mnt == path and fstype.startswith("fuse") for mnt, fstype in mounts):
        return False
    result: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            result.append(0)
        except OSError as e:
            result.append(e.errno or 0)

    t = threading.Thread(target=probe, name="overlaypc-stale-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result == [errno.ENOTCONN]


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount in /proc/self/mountinfo (``unescape_mountinfo``)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            out.append((unescape_mountinfo(left.split()[4]), right.split()[0] if right else ""))
    return out


def unescape_mountinfo(field_: str) -> str:
    """A field of /proc/self/mountinfo as the path or value it shows. Its paths are bytes
    (read as ``os.fsdecode`` would), with what the kernel escapes written as ``\\ooo``
    (space, tab, newline and backslash; in a filesystem's options ``,`` and ``=`` too):
    each ``\\ooo`` is undone, never ``\\x`` sequences (an escaped backslash comes first as
    ``\\134``, so the digits after it stay)."""
    if "\\" not in field_:
        return field_
    parts = field_.split("\\")
    out = [parts[0]]
    for part in parts[1:]:
        code = part[:3]
        if len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)) + part[3:])
        else:
            out.append("\\" + part)
    return "".join(out)


def _check_lowers_apart(lowers: list[str]) -> None:
    """Refuse a lower layer given twice or inside another (the kernel: ELOOP). A nested one
    would show its objects at two paths with one inode number, and a copy-up through one
    path would leave the other showing the lower data. Sorted by components, a directory's
    descendants follow it at once, so comparing neighbours finds every nesting."""
    ordered = sorted(lowers, key=lambda p: p.split("/"))
    for outer, inner in zip(ordered, ordered[1:]):
        if inner == outer:
            raise ConfigError(f"lowerdir {inner} is given twice")
        if _is_within(inner, outer):
            raise ConfigError(f"lowerdir {inner} is inside lowerdir {outer}")


def _check_distinct(named: list[tuple[str, str]]) -> None:
    """Refuse one directory given as two layers at different paths (a bind mount of it, or
    a path through another mount of its filesystem): the same (st_dev, st_ino) at two of
    ``named`` ((what, canonical path) pairs, in order). The kernel refuses these as
    conflicting paths; paths alone cannot tell (``_check_lowers_apart`` compares those).
    Caveat: a layer nested inside another through a bind mount is not found."""
    seen: dict[tuple[int, int], tuple[str, str]] = {}
    for what, path in named:
        st = os.stat(path)
        first = seen.setdefault((st.st_dev, st.st_ino), (what, path))
        if first != (what, path):
            raise ConfigError(f"{what} {path} is {first[0]} {first[1]} at another path "
                              f"(a bind mount?): one directory cannot be two layers")


def validate(cfg: MountConfig) -> None:
    """Check and canonicalize ``cfg``; raise ConfigError on the first problem.

    The mount table is read once, here, for every directory's checks (it was read once per
    layer and twice for the mount point: on a host with a few hundred mounts each read
    costs ~0.3 ms). A mount made or removed while this runs was a race these checks could
    lose before as well: one snapshot moves their moment by well under a millisecond."""
    if not cfg.lowers:
        raise ConfigError("no lower layer: give -o lowerdir=DIR[:DIR...] or --stack FILE")
    for name, choices in (("cache", CACHE_MODES), ("handles", HANDLE_MODES)):
        if getattr(cfg, name) not in choices:  # (options and stack files check at parsing)
            raise ConfigError(f"bad value {name}={getattr(cfg, name)!r}: expected one of "
                              f"{', '.join(choices)}")
    if cfg.redirect_dir is not None and cfg.redirect_dir not in REDIRECT_MODES:
        raise ConfigError(f"bad value redirect_dir={cfg.redirect_dir!r}: expected one of "
                          f"{', '.join(REDIRECT_MODES)}")
    if (cfg.upper is None) != (cfg.work is None):
        missing = "workdir" if cfg.work is None else "upperdir"
        raise ConfigError(f"{missing} is missing: upperdir and workdir go together")
    mounts = _mounts()
    cfg.lowers = [_dir(p, "lowerdir", mounts, cfg.checked) for p in cfg.lowers]
    _check_lowers_apart(cfg.lowers)
    _check_distinct([("lowerdir", p) for p in cfg.lowers])
    if cfg.upper is not None and cfg.work is not None:
        cfg.upper = _dir(cfg.upper, "upperdir", mounts, cfg.checked)
        cfg.work = _dir(cfg.work, "workdir", mounts, cfg.checked)
        if os.stat(cfg.upper).st_dev != os.stat(cfg.work).st_dev:
            raise ConfigError(f"upperdir {cfg.upper} and workdir {cfg.work} are on different filesystems")
        if _is_within(cfg.work, cfg.upper) or _is_within(cfg.upper, cfg.work):
            raise ConfigError(f"workdir {cfg.work} and upperdir {cfg.upper} must be separate subtrees")
        for path, what in ((cfg.upper, "upperdir"), (cfg.work, "workdir")):
            if os.statvfs(path).f_flag & os.ST_RDONLY:  # also for -o ro, as the kernel
                raise ConfigError(f"{what} {path} is on a read-only filesystem")
        for lower in cfg.lowers:
            if _is_within(cfg.upper, lower) or _is_within(lower, cfg.upper):
                raise ConfigError(f"upperdir {cfg.upper} overlaps lowerdir {lower}")
            if _is_within(cfg.work, lower):
                raise ConfigError(f"workdir {cfg.work} is inside lowerdir {lower}")
            if _is_within(lower, cfg.work):  # its work/ and index/ are emptied at mount
                raise ConfigError(f"lowerdir {lower} is inside workdir {cfg.work}")
        _check_distinct([("upperdir", cfg.upper), ("workdir", cfg.work),
                         *(("lowerdir", p) for p in cfg.lowers)])
    if cfg.metacopy:
        if cfg.userxattr:
            raise ConfigError("metacopy=on cannot be used with userxattr: metadata-only copies "
                              "trust the layers' xattrs, which unprivileged users could forge")
        if cfg.redirect_dir in ("off", "nofollow", "follow"):  # the kernel refuses these too
            raise ConfigError(f"metacopy=on needs redirect_dir=on (got redirect_dir={cfg.redirect_dir})")
        cfg.redirect_dir = "on"
    if cfg.redirect_dir is None:
        cfg.redirect_dir = DEFAULT_REDIRECT_DIR
    if cfg.xattr_permissions and cfg.upper is None:
        cfg.notes.append((f"xattr_permissions={cfg.xattr_permissions}", "a mount without upperdir "
                          "changes no owner or mode; override xattrs in the layers are still shown"))
    if not cfg.mountpoint:
        raise ConfigError("no mountpoint given")
    mnt = _dir(cfg.mountpoint, "mountpoint", mounts)
    if any(path == mnt for path, _ in mounts):
        raise ConfigError(f"mountpoint {mnt} is already in use by another mount")
    cfg.mountpoint = mnt
    if cfg.logfile:
        cfg.logfile = os.path.abspath(cfg.logfile)
