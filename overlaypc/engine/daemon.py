"""Running a filesystem: mount, daemonize, serve, and stop cleanly on a signal.

Owns the life of a daemon process around one ``Session``. ``run`` mounts (so a mount
error is reported by the command itself, with its exit status), then, unless in the
foreground, forks: the parent returns only once the child has answered INIT, so the
mount is live when the command exits, and exits 1 if the child could not get there.
SIGTERM, SIGINT and SIGHUP unmount (lazily, as libfuse does); the workers then read
ENODEV and ``run`` returns. ``umount`` by anyone ends it the same way. A plain user's
``auto_unmount`` mount without ``allow_other`` gets the ``autounmount`` watcher as well
(fusermount3's own cannot see such a mount's daemon die).

Test-only: ``OVERLAYPC_DENY_OTHERS=UID`` in the environment makes a daemon run by root
serve as a plain user's ``allow_root`` mount by UID would (``Session``'s ``deny_others``,
the one thing that option changes in the daemon: a root mount is ``allow_other`` already),
so tests reach that mode without a plain user's mount (which needs ``user_allow_other`` in
/etc/fuse.conf). It only ever refuses more.

Benchmark-only: ``OVERLAYPC_BENCH_WORKERS=N`` sets the session's base worker count to N,
at most one per usable CPU (the default), so a benchmark pairs one tree's daemon with one
and with two base workers (``benchmarks/ab_mount.py --env-a``/``--env-b``). It only ever
lowers the count, so the fd bound the command checked (``cli._fds_needed``) still holds.

Caveat: fork happens before any thread starts (the session's threads start after it);
callers must not start threads before ``run``.
"""
from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable

from . import autounmount
from . import channel as ch
from .. import logs
from .ops import Operations
from .pool import usable_cpus
from .session import ProtocolError, Session

try:  # CPython's ``signal`` is this module with enums added: enum costs a start ~1.3 ms
    import _signal as signal
except ImportError:  # not CPython
    import signal

log = logs.get("overlaypc.engine")

#: test-only: the owner uid a root daemon serves as (module docstring)
DENY_OTHERS_ENV = "OVERLAYPC_DENY_OTHERS"
#: benchmark-only: the base worker count, lowered (module docstring)
WORKERS_ENV = "OVERLAYPC_BENCH_WORKERS"


def run(ops: Operations, mountpoint: str, opts: ch.MountOptions, *, foreground: bool = True,
        workers: int | None = None, before_fork: Callable[[], None] | None = None) -> int:
    """Mount ``ops`` at ``mountpoint`` and serve until unmounted. Returns the exit status;
    raises ``OSError`` if the mount itself fails. ``workers``: the session's base worker
    count (default: one per usable CPU)."""
    chan = ch.mount(mountpoint, opts)
    ready_w = None
    if not foreground:
        if before_fork is not None:
            before_fork()
        ready_w = _daemonize()
    deny = os.getuid() if opts.has("allow_root") and os.getuid() != 0 else None
    if deny is None and os.environ.get(DENY_OTHERS_ENV):  # test-only (above)
        deny = int(os.environ[DENY_OTHERS_ENV])
    if os.environ.get(WORKERS_ENV):  # benchmark-only (above)
        workers = max(1, min(int(os.environ[WORKERS_ENV]), workers or usable_cpus()))
    session = Session(ops, chan.fd, clone=chan.clone, close_clone=chan.close_clone, workers=workers,
                      deny_others=deny)
    stopping = []

    def stop(signum, _frame) -> None:
        # No record made here: the handler runs in the main thread between two of its
        # bytecodes, which may be inside its first record's ``import logging`` (``served``:
        # the module half made) or inside ``logs``' set-up lock: a record would raise into
        # that import or wait for itself, and the mount was never unmounted. Records come
        # after ``serve`` returns, or from a thread of their own (``_log_aside``).
        if not stopping:
            stopping.append(signum)
            try:
                chan.unmount()
            except OSError as e:
                _log_aside("signal %d: unmount of %s failed: %s", signum, chan.mountpoint, e)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        try:
            session.handshake()
        except OSError as e:
            if e.errno == errno.ENODEV:  # unmounted (by a signal, or by someone) before INIT
                return 0
            raise
        except ProtocolError as e:
            log.error("%s", e)
            return 1
        if chan.via_fusermount and opts.has("auto_unmount") and not opts.has("allow_other"):
            # fusermount3's own watcher checks for a dead daemon by looking at the mount
            # as root, which the kernel refuses on a mount without allow_other: a killed
            # daemon would leave a dead mount. Ours needs no privilege (see autounmount);
            # started here, in the daemon, before any thread, once the mount is live.
            try:
                autounmount.start(chan.mountpoint)
            except OSError as e:
                log.warning("cannot start the auto-unmount watcher: %s", e)

        def ready() -> None:
            if ready_w is not None:
                os.write(ready_w, b"1")
                os.close(ready_w)

        session.serve(ready)
        if stopping:
            log.info("stopped by signal %d; %s unmounted", stopping[0], chan.mountpoint)
        return 0
    finally:
        chan.close()


def _log_aside(msg: str, *args) -> None:
    """An error record made by a thread of its own (from a signal handler: ``run.stop``);
    it waits there for whatever the main thread was doing with ``logging``."""
    try:
        threading.Thread(target=log.error, args=(msg, *args), name="log-aside",
                         daemon=True).start()
    except RuntimeError:  # no thread to be had: the record is lost, the daemon goes on
        pass


def _daemonize() -> int:
    """Fork; the parent waits for a byte on a pipe (the child's INIT is answered) and
    exits. The child, in a new session with stdio on /dev/null, gets the pipe's end."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        ok = os.read(r, 1)
        os._exit(0 if ok else 1)
    os.close(r)
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the daemon)
    return w
