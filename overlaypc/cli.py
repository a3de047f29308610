"""Command line: ``overlaypc [-f] [-d] [-o OPTS] [--stack FILE] [SOURCE] MOUNTPOINT``
and ``overlaypc stats MOUNTPOINT [--json]``.

Owns: argument parsing (also in the form mount(8) uses for helpers: ``overlaypc SOURCE
MOUNTPOINT -o OPTS``), logging set-up, and exit statuses: bad input prints one line
``overlaypc: error: ...`` and exits 2 with nothing mounted and nothing written.
A daemonized mount logs to ``-o logfile=PATH``, else to syslog, else (no ``/dev/log``)
to ``/var/log/overlaypc.log``. A mount raises its soft fd limit to the hard limit first
(``fdbudget``), since its caches' budgets come from it.
"""
from __future__ import annotations

import errno
import os
import sys

from . import faults, fdbudget, logs
from .config import ConfigError, MountConfig, apply_options, validate

USAGE = """overlaypc [-f] [-d] [-o lowerdir=A:B,upperdir=U,workdir=W[,opt...]] [SOURCE] MOUNTPOINT
       overlaypc --stack FILE.yaml [-f] [-d] [-o opt,...] MOUNTPOINT
       overlaypc stats MOUNTPOINT [--json]"""

EPILOG = """layer order: lowerdir=A:B:C lists lower layers TOP FIRST (A is the topmost), as the
kernel's overlay does; stack files list 'lowers' top first too.

overlay options:
  lowerdir=A:B      lower layers, top first (read-only)
  lowerdir+=A       one lower layer more, below those given (path as it is: no ':' escaping)
  upperdir=U        writable upper layer (needs workdir; without it the mount is read-only)
  workdir=W         empty dir on the same filesystem as upperdir
  ro / rw           read-only / read-write mount
  cache=kernel      (default) FUSE page cache per file: fastest warm reads, MAP_SHARED works
  cache=shared      direct_io: reads served from the layers' own page cache, one copy for
                    many mounts; MAP_SHARED works (DIRECT_IO_ALLOW_MMAP, kernel >= 6.6)
  passthrough=on|off  (default on) the kernel reads and writes upper files (and every file
                    of a read-only mount) itself, at page-cache speed (kernel >= 6.9, root)
  sharing=on|off    (default on) read reflinked (shared) extents from one canonical
                    lower file, so their pages are cached once
  handles=reopen    (default) open files follow copy-up; bind-at-open reproduces the old
                    stale-read bug on purpose (debugging, demos)
  redirect_dir=on   (default) rename of lower directories records trusted.overlay.redirect
                    (kernel format; an upper with redirects needs redirect_dir=on or follow
                    to be read by the kernel); off/follow: EXDEV on such renames
  index=on          hard links survive copy-up (workdir/index, kernel format)
  metacopy=on       attribute changes copy up metadata only; data follows on first write.
                    Only for trusted layers (crafted xattrs could point files at any lower
                    data); refused with userxattr and with redirect_dir other than on
  userxattr         use user.overlay.* instead of trusted.overlay.* (as the kernel)
  volatile          skip fsyncs in copy-up (as the kernel's option): faster, not crash-safe
  timeout=SECONDS   how long the kernel caches names and attributes (default 30)
  logfile=PATH      log warnings and errors (everything with -d) to PATH
fuse-overlayfs options (as containers/storage's mount_program passes them):
  uidmapping=C:H:N[:...], gidmapping=...   layers hold IDs C..C+N-1, shown as H..H+N-1
  squash_to_root, squash_to_uid=N, squash_to_gid=N   show every object as owned by N
  static_nlink      directories show st_nlink 1
  noacl, noxattrs=1 no POSIX ACLs / no xattrs through the mount
  fsync=0           no fsync (copy-up or caller's): faster, not crash-safe
  xattr_permissions=1|2   owner and mode in security.|user.fuseoverlayfs.override_stat
  context="LABEL"   SELinux label of the mount (dropped when SELinux is off)
  threaded=, max_idle_threads=, plugins=, fast_ino=, writeback=, ino32_t, allow_root
                    accepted; logged as having no effect (see README)
generic mount options (defaults, nofail, noatime, nodev, nosuid, noexec, _netdev, x-*,
...) are accepted."""

FALLBACK_LOG = "/var/log/overlaypc.log"
KERNEL_FLAGS = {"nodev", "nosuid", "noexec", "noatime", "dirsync", "sync"}


def _parser(**kwargs):
    """An ``argparse`` parser whose errors are one line and exit 2 (argparse is imported
    only here: a mount's usual command line needs none, see ``_plain_args``)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one line, exit 2
            print(f"overlaypc: error: {message}", file=sys.stderr)
            sys.exit(2)

    return Parser(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def _mount_parser():
    p = _parser(prog="overlaypc", usage=USAGE, epilog=EPILOG,
                description="Mount an overlay of stacked layers (kernel overlayfs format) with FUSE.")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="log every operation (Python logging)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="comma-separated options (see below)")
    p.add_argument("--stack", metavar="FILE", help="YAML stack file (lowers, upper, work, options)")
    p.add_argument("--version", action="version", version="overlaypc " + _version())
    p.add_argument("targets", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    return p


def _version() -> str:
    from . import __version__
    return __version__


class _Args:
    """What the mount command line says (argparse's ``Namespace`` has the same names)."""
    __slots__ = ("foreground", "debug", "options", "stack", "targets")

    def __init__(self) -> None:
        self.foreground = False
        self.debug = False
        self.options: list[str] = []
        self.stack: str | None = None
        self.targets: list[str] = []


def _plain_args(argv: list[str]) -> _Args | None:
    """The command lines mounts use, read without argparse (importing and setting it up
    costs a mount ~4 ms: argparse, gettext, locale, shutil): ``-f``, ``-d``,
    ``--foreground``, ``--debug``, ``-o OPTS``, ``-oOPTS``, ``--stack FILE``,
    ``--stack=FILE`` and one run of arguments not starting with ``-``. None for anything
    else (help, version, combined or abbreviated flags, ``--``, errors): argparse reads
    those, so every answer is argparse's (tests/test_startup_unit.py compares them)."""
    args = _Args()
    run_ended = False  # argparse takes the targets as one run; a second run is an error
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-"):
            if run_ended:
                return None
            args.targets.append(arg)
            continue
        if args.targets:
            run_ended = True
        if arg in ("-f", "--foreground"):
            args.foreground = True
        elif arg in ("-d", "--debug"):
            args.debug = True
        elif arg in ("-o", "--stack"):
            if i == len(argv) or argv[i].startswith("-"):
                return None
            if arg == "-o":
                args.options.append(argv[i])
            else:
                args.stack = argv[i]
            i += 1
        elif arg.startswith("-o") and not arg.startswith("-o="):
            args.options.append(arg[2:])
        elif arg.startswith("--stack="):
            args.stack = arg[len("--stack="):]
        else:
            return None
    return args if args.targets else None


def parse_mount_args(argv: list[str]) -> MountConfig:
    args = _plain_args(argv) or _mount_parser().parse_args(argv)
    cfg = MountConfig(foreground=args.foreground, debug=args.debug)
    if len(args.targets) > 2:
        raise ConfigError(f"too many arguments: {' '.join(args.targets)}")
    if len(args.targets) == 2:
        cfg.source = args.targets[0]
    cfg.mountpoint = args.targets[-1]
    if args.stack:
        from .stackfile import load_stack  # (only with a stack file: not at a plain mount)
        load_stack(args.stack, cfg)
    for text in args.options:
        apply_options(cfg, text)
    return cfg


def _setup_logging(cfg: MountConfig) -> None:
    """Decide where the mount logs and create its log file now (so a failure is reported
    here, and the file exists with our mode); ``logging`` itself and its handlers come at
    the first record (``logs``)."""
    level = logs.DEBUG if cfg.debug else logs.INFO
    files: list[str] = []
    if cfg.logfile:
        files.append(_log_file(cfg.logfile))
    syslog = False
    if not cfg.foreground and not cfg.logfile:
        if os.path.exists("/dev/log"):
            syslog = True
        else:
            try:  # no syslog daemon here: keep warnings in a well-known file instead
                files.append(_log_file(FALLBACK_LOG))
            except OSError:
                print("overlaypc: warning: no syslog (/dev/log) and no -o logfile=PATH: "
                      "the daemon's warnings will be lost", file=sys.stderr)
    stderr = sys.stderr if cfg.foreground else None

    def setup(logging) -> None:
        root = logging.getLogger()
        root.setLevel(level)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        handlers = [logging.FileHandler(path) for path in files]
        if stderr is not None:
            handlers.append(logging.StreamHandler(stderr))
        if syslog:
            from logging.handlers import SysLogHandler
            # (it raises nothing when /dev/log refuses: emit then reports to stderr, as before)
            handler = SysLogHandler(address="/dev/log")
            handler.setFormatter(logging.Formatter(
                "overlaypc[%(process)d]: %(levelname)s %(name)s: %(message)s"))
            handler.setLevel(level)
            root.addHandler(handler)
        for h in handlers:
            h.setFormatter(fmt)
            root.addHandler(h)

    logs.configure(level, setup)


def _log_file(path: str) -> str:
    """Create ``path`` 0640 if new and return it (the ``logging.FileHandler`` that appends
    to it comes later): the daemon runs with umask 0 (new objects get the caller's mode),
    which must not make its log world-writable."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640))
    return path


SELINUX_ENFORCE = "/sys/fs/selinux/enforce"


def _fuse_overlayfs_flags(cfg: MountConfig) -> list[str]:
    """Mount options for the kernel from fuse-overlayfs's options, and a log line for each
    accepted option that has no effect here."""
    log = logs.get("overlaypc")
    flags = []
    notes = list(cfg.notes)
    if cfg.context is not None:
        if os.path.exists(SELINUX_ENFORCE):
            # libfuse hands it to mount(2) as it is; the quotes keep its commas together
            flags.append(f'context="{cfg.context}"')
        else:
            notes.append((f"context={cfg.context}", "SELinux is not enabled (no "
                          f"{SELINUX_ENFORCE}), and the kernel takes no label without it"))
    if cfg.allow_root:
        if os.geteuid() == 0:
            notes.append(("allow_root", "a mount by root is allow_other already"))
        else:
            flags.append("allow_root")
    for option, reason in notes:
        log.info("option %s has no effect: %s", option, reason)
    return flags


#: set by ``__main__``, which paused garbage collection for the start-up's imports
gc_paused = False


def resume_gc() -> None:
    """Turn garbage collection back on, if ``__main__`` paused it, once the mount is built:
    what start-up made first goes to the collector's permanent generation (``gc.freeze``:
    it lives as long as the mount, and no collection ever walks it again; collecting it
    now would cost what pausing saved). Caveat: cyclic garbage start-up left stays."""
    global gc_paused
    if gc_paused:
        import gc
        gc.freeze()
        gc.enable()
        gc_paused = False


def _fds_needed(cfg: MountConfig, workers: int) -> int:
    """``fdbudget.mount_needs`` of ``cfg``'s stack: its layers, upper and workdir counted
    (a lookup searches the lowers and the upper)."""
    upper = 1 if cfg.upper else 0
    return fdbudget.mount_needs(len(cfg.lowers) + 2 * upper, len(cfg.lowers) + upper,
                                2 * upper, workers)


def _too_many_layers(cfg: MountConfig, limit: int, workers: int) -> str:
    """The error for a stack that needs more fds than the limit: both numbers."""
    need = _fds_needed(cfg, workers)
    layers = len(cfg.lowers) + (2 if cfg.upper else 0)
    return (f"{layers} layers{' (upper and workdir counted)' if cfg.upper else ''} need at "
            f"least {need} open files, more than the fd limit of {limit} (ulimit -n) allows: "
            f"raise the hard limit (ulimit -Hn, LimitNOFILE=) or mount fewer layers")


def _check_bench_workers() -> None:
    """``OVERLAYPC_BENCH_WORKERS`` (benchmark-only, read by ``engine.daemon`` after the
    mount) is a whole number, checked before anything is mounted."""
    value = os.environ.get("OVERLAYPC_BENCH_WORKERS")
    if value:
        try:
            int(value)
        except ValueError:
            raise ConfigError(f"OVERLAYPC_BENCH_WORKERS={value!r} is not a whole number") from None


def mount_main(argv: list[str]) -> int:
    try:
        cfg = parse_mount_args(argv)
        validate(cfg)
        _check_bench_workers()
    except ConfigError as e:
        print(f"overlaypc: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a layer removed or changed while it was checked
        print(f"overlaypc: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    os.umask(0)
    limit = fdbudget.raise_limit()  # before OverlayFS: its caches' budgets come from the limit
    from .engine.pool import MAX_EXTRA, usable_cpus
    workers = usable_cpus() + MAX_EXTRA  # the session's bound: base workers and extra ones
    if _fds_needed(cfg, workers) > limit:
        print(f"overlaypc: error: {_too_many_layers(cfg, limit, workers)}", file=sys.stderr)
        return 2
    faults.configure(os.environ.get("OVERLAYPC_FAULTS"))
    from .core import OverlayFS  # imports the binding only when mounting
    # before the layers are opened: what the mount decides there is logged (idmapped layers)
    _setup_logging(cfg)
    try:
        fs = OverlayFS(cfg, workers=workers)
    except OSError as e:
        if e.errno == errno.EMFILE:  # (its filename would be /proc/self/fd/N)
            print(f"overlaypc: error: {_too_many_layers(cfg, limit, workers)}", file=sys.stderr)
        else:
            print(f"overlaypc: error: cannot open layer {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        fs.start()
    except OSError as e:
        fs.close()
        print(f"overlaypc: error: {e.strerror if e.filename is None and e.strerror else e}", file=sys.stderr)
        return 2
    from .engine import channel, daemon
    from .mounting import mount_mode
    from .overlay_ops import OverlayOps
    flags = [g for g in cfg.generic if g in KERNEL_FLAGS] + _fuse_overlayfs_flags(cfg)
    if os.geteuid() == 0:
        flags += [f for f in ("dev", "suid") if "no" + f not in flags]
    if not cfg.writable:  # -o ro, or no upper: the kernel answers EROFS (also to access(W_OK))
        flags.append("ro")
    mode = mount_mode(os.geteuid())
    flags += ["default_permissions"] + [name for name, on in mode.items() if on]
    ops = OverlayOps(fs)
    opts = channel.MountOptions(fsname=cfg.source.replace(",", "_"), options=flags)
    from . import ownmount
    ownmount.shield(cfg.mountpoint)  # (its fds stay open while the mount is served)
    resume_gc()  # before the mount: requests run with the collector on
    try:
        return daemon.run(ops, cfg.mountpoint, opts, foreground=cfg.foreground)
    except OSError as e:
        logs.get("overlaypc").error("mount of %s failed: %s", cfg.mountpoint, e)
        print(f"overlaypc: error: mount of {cfg.mountpoint} failed: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        fs.close()


def stats_main(argv: list[str]) -> int:
    import json
    p = _parser(prog="overlaypc stats", description="Show the counters of a live overlaypc mount.")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        raw = os.getxattr(args.mountpoint, "user.overlaypc.stats")
    except OSError as e:
        print(f"overlaypc: error: {args.mountpoint} is not an overlaypc mount ({e.strerror})", file=sys.stderr)
        return 2
    data = json.loads(raw)
    if args.json:
        return _emit(json.dumps(data, indent=2, sort_keys=True) + "\n")
    width = max(map(len, data))
    lines = []
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
        lines.append(f"{key:<{width}}  {value}\n")
    return _emit("".join(lines))


def _emit(text: str) -> int:
    """Write ``text`` to stdout; a reader that stopped early (``| head``) ends it quietly,
    with status 0, as the rest was not wanted."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the interpreter flushes stdout again at exit: point it at /dev/null first
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "stats":
        return stats_main(argv[1:])
    return mount_main(argv)


if __name__ == "__main__":
    sys.exit(main())
