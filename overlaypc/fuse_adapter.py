"""The FUSE adapter: the only module that imports the binding (mfusepy on libfuse3).

Owns: translating FUSE calls into ``OverlayFS`` calls and back. It holds no policy:
paths lose their leading slash, the caller's uid/gid come from the request context,
``OSError`` becomes the errno answer, and any other exception is logged with its
traceback and answered with EIO, so the daemon keeps serving (mfusepy itself would
answer EINVAL).

Traps from docs/ARCHITECTURE.md §6 handled here: ``FUSE_LIBRARY_NAME=fuse3`` is set before the
import (8); rename flags, dropped by mfusepy on libfuse3, are passed through (2);
readdir entries carry ``st_ino`` and ``st_mode`` (3); no ``copy_file_range``/``lseek``/
``write_buf`` ops (5, 6); no attribute of the ``Operations`` object is named like a
FUSE op (7); UTIME_NOW/OMIT are mapped in ``attrs`` (11). Trap 10 is handled without
``hard_remove``, which breaks ``fstat`` of open unlinked files (libfuse then hides them;
the node-based ``overlay_ops`` replaces this adapter).
Reads go straight into libfuse's buffer (``preadv``), with no Python-level copy.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import threading

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy  # noqa: E402  (must follow the environment set-up above)

from . import autounmount  # noqa: E402
from .mounting import mount_mode, raise_readahead  # noqa: E402
from .core import OverlayFS  # noqa: E402
from .namespace import Caller  # noqa: E402

log = logging.getLogger("overlaypc.fuse")


def _rel(path: str | None) -> str:
    return "" if path is None else path.lstrip("/")


def _op(func):
    """Log the call at debug level; map OSError to its errno and anything else to EIO."""
    name = func.__name__

    @functools.wraps(func)
    def wrapper(self, *args):
        try:
            result = func(self, *args)
        except OSError as e:
            code = e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s%r -> %s", name, _short(args), errno.errorcode.get(code, code))
            raise mfusepy.FuseOSError(code) from None
        except Exception:
            log.exception("unexpected error in %s%r; answering EIO", name, _short(args))
            self._fs.stats.add("errors")
            raise mfusepy.FuseOSError(errno.EIO) from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r -> %s", name, _short(args), _short_result(result))
        return result

    return wrapper


def _short(args: tuple) -> tuple:
    return tuple(f"<{len(a)} bytes>" if isinstance(a, (bytes, memoryview)) else
                 getattr(a, "fh", a) if isinstance(a, mfusepy.fuse_file_info) else a for a in args)


def _short_result(result: object) -> object:
    if isinstance(result, (bytes, bytearray)):
        return f"<{len(result)} bytes>"
    if isinstance(result, list) and len(result) > 8:
        return f"<{len(result)} entries>"
    return result


def _caller() -> Caller:
    ctx = _libfuse.fuse_get_context().contents
    return Caller(ctx.uid, ctx.gid, ctx.pid, ctx.umask)  # umask: set for create/mknod/mkdir


def _fh(fi) -> int | None:
    if fi is None:
        return None
    return fi.fh or None  # 0: a directory handle or none of ours


class OverlayOperations(mfusepy.Operations):
    """FUSE operations over an ``OverlayFS``; state lives only in ``_fs``/``_fuse_ptr``."""

    use_ns = True
    flag_nopath = True
    flag_nullpath_ok = True

    def __init__(self, fs: OverlayFS, *, watch_unmount: bool = False) -> None:
        self._fs = fs
        self._fuse_ptr: ctypes.c_void_p | None = None
        #: a plain user's mount without allow_other: libfuse's auto_unmount cannot tell
        #: that the daemon died (see ``autounmount``), so a watcher of ours does
        self._watch_unmount = watch_unmount
        fs.invalidate_path = self._invalidate_path

    # -- lifecycle --------------------------------------------------------------------------
    def init_with_config(self, conn, config) -> None:
        ctx = mfusepy._libfuse.fuse_get_context()
        self._fuse_ptr = ctypes.c_void_p(ctx.contents.fuse)
        if conn is not None:
            # READDIRPLUS for every chunk of a listing, not only the first ("auto" mode):
            # each entry then arrives with its attributes and needs no LOOKUP round trip
            conn.want &= ~FUSE_CAP_READDIRPLUS_AUTO
            cfg = self._fs.config
            if cfg.noacl or cfg.noxattrs:  # fuse-overlayfs's options: mode bits alone decide
                log.info("POSIX ACLs not enforced (%s)", "noacl" if cfg.noacl else "noxattrs=1")
            else:
                negotiate_acls(conn)
        log.info("mounted %s", self._fs.config.mountpoint)
        for note in self._fs.format.notes:
            log.info("%s", note)
        if self._watch_unmount:
            try:
                autounmount.start(self._fs.config.mountpoint)
            except OSError as e:
                log.warning("cannot start the auto-unmount watcher: %s", e)
        # Raising the readahead of the mount's bdi needs the mount to be visible, which it
        # is only after this callback returns: do it from a short-lived thread.
        threading.Thread(target=raise_readahead, args=(self._fs.config.mountpoint,),
                         name="overlaypc-readahead", daemon=True).start()

    def destroy(self, path) -> None:
        log.info("unmounting %s", self._fs.config.mountpoint)

    def _invalidate_path(self, rel: str) -> None:
        if self._fuse_ptr is None:
            return
        ret = _invalidate(self._fuse_ptr, os.fsencode("/" + rel))
        if ret not in (0, -errno.ENOENT):
            log.debug("fuse_invalidate_path(/%s) -> %d", rel, ret)

    # -- attributes -----------------------------------------------------------------------------
    @_op
    def getattr(self, path, fh=None):
        return self._fs.getattr(_rel(path), _fh(fh))

    @_op
    def readlink(self, path):
        return self._fs.readlink(_rel(path))

    @_op
    def opendir(self, path):
        return self._fs.opendir(_rel(path))

    @_op
    def releasedir(self, path, fh):
        self._fs.releasedir(fh)
        return 0

    @_op
    def readdir(self, path, fh, plus=False, offset=0):
        return self._fs.readdir(fh=fh, plus=plus, offset=offset)

    @_op
    def dot_inos(self, fh):
        return self._fs.dot_inos(fh)

    @_op
    def statfs(self, path):
        return self._fs.statfs()

    @_op
    def access(self, path, amode):
        self._fs.access(_rel(path), amode)
        return 0

    @_op
    def chmod(self, path, mode):
        self._fs.chmod(_rel(path), mode)
        return 0

    @_op
    def chown(self, path, uid, gid):
        self._fs.chown(_rel(path), uid, gid)
        return 0

    @_op
    def utimens(self, path, times=None):
        self._fs.utimens(_rel(path), None if times is None else (int(times[0]), int(times[1])))
        return 0

    @_op
    def truncate(self, path, length, fh=None):
        self._fs.truncate(_rel(path), length, _fh(fh))
        return 0

    @_op
    def getxattr(self, path, name, position=0):
        return self._fs.getxattr(_rel(path), name)

    @_op
    def listxattr(self, path):
        return self._fs.listxattr(_rel(path))

    @_op
    def setxattr(self, path, name, value, options, position=0):
        self._fs.setxattr(_rel(path), name, value, options)
        return 0

    @_op
    def removexattr(self, path, name):
        self._fs.removexattr(_rel(path), name)
        return 0

    # -- files ------------------------------------------------------------------------------------
    def _fill(self, fi, result) -> int:
        fi.fh = result.fh
        fi.keep_cache = 1 if result.keep_cache else 0
        fi.direct_io = 1 if result.direct_io else 0
        return 0

    @_op
    def open(self, path, fi):
        return self._fill(fi, self._fs.open(_rel(path), fi.flags))

    @_op
    def create(self, path, mode, fi):
        return self._fill(fi, self._fs.create(_rel(path), fi.flags, mode, _caller()))

    @_op
    def read(self, path, size, offset, fi):
        # registers the FUSE read callback; OverlayFUSE.read serves it through readinto
        return self._fs.read(fi.fh, size, offset)

    @_op
    def readinto(self, fh, buf, offset):
        return self._fs.files.readinto(fh, buf, offset)

    @_op
    def write(self, path, data, offset, fi):
        return self._fs.write(fi.fh, data, offset)

    @_op
    def fallocate(self, path, mode, offset, size, fi):
        self._fs.fallocate(fi.fh, mode, offset, size)
        return 0

    @_op
    def fsync(self, path, datasync, fi):
        self._fs.fsync(fi.fh, bool(datasync))
        return 0

    @_op
    def flush(self, path, fi):
        self._fs.flush(fi.fh)
        return 0

    @_op
    def release(self, path, fi):
        self._fs.release(fi.fh)
        return 0

    # -- namespace --------------------------------------------------------------------------------
    @_op
    def mknod(self, path, mode, dev):
        self._fs.mknod(_rel(path), mode, dev, _caller())
        return 0

    @_op
    def mkdir(self, path, mode):
        self._fs.mkdir(_rel(path), mode, _caller())
        return 0

    @_op
    def symlink(self, target, source):
        # mfusepy passes (link path, link text)
        self._fs.symlink(source, _rel(target), _caller())
        return 0

    @_op
    def link(self, target, source):
        # mfusepy passes (new name, existing name)
        self._fs.link(_rel(source), _rel(target))
        return 0

    @_op
    def unlink(self, path):
        self._fs.unlink(_rel(path))
        return 0

    @_op
    def rmdir(self, path):
        self._fs.rmdir(_rel(path))
        return 0

    @_op
    def rename(self, old, new, flags=0):
        self._fs.rename(_rel(old), _rel(new), flags)
        return 0


_libfuse = mfusepy._libfuse
_libfuse.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_libfuse.fuse_invalidate_path.restype = ctypes.c_int


def _invalidate(fuse_ptr: ctypes.c_void_p, path: bytes) -> int:
    return _libfuse.fuse_invalidate_path(fuse_ptr, path)


FUSE_CAP_DONT_MASK = 1 << 6  # libfuse3 fuse_common.h
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_CAP_POSIX_ACL = 1 << 19
FUSE_READDIR_PLUS = 1  # enum fuse_readdir_flags
FUSE_FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags


def negotiate_acls(conn) -> None:
    """POSIX ACLs enforced by the kernel: with FUSE_CAP_POSIX_ACL its permission checks
    read ``system.posix_acl_access`` (through getxattr) instead of the mode bits alone.
    The kernel then leaves the umask to the filesystem, but would apply it itself even
    under a parent with a default ACL; FUSE_CAP_DONT_MASK stops that, and ``namespace``
    applies the caller's umask only where Linux does."""
    if conn.capable & FUSE_CAP_POSIX_ACL and conn.capable & FUSE_CAP_DONT_MASK:
        conn.want |= FUSE_CAP_POSIX_ACL | FUSE_CAP_DONT_MASK
    else:
        log.warning("the kernel offers no FUSE POSIX ACL support: ACLs are not enforced")


def _fill_stat(s, attr) -> None:
    """Fill a C ``struct stat`` from an ``Attr``."""
    ctypes.memset(ctypes.byref(s), 0, ctypes.sizeof(s))
    st = attr.st
    s.st_ino = attr.ino
    # (the hottest path of all: Attr's fields tested inline, not through its properties)
    s.st_mode = st.st_mode if attr.mode is None else attr.mode
    s.st_nlink = st.st_nlink if attr.nlink is None else attr.nlink
    s.st_uid = st.st_uid if attr.uid is None else attr.uid
    s.st_gid = st.st_gid if attr.gid is None else attr.gid
    s.st_rdev = st.st_rdev
    s.st_size = st.st_size
    s.st_blksize = st.st_blksize
    s.st_blocks = st.st_blocks if attr.blocks is None else attr.blocks
    s.st_atimespec.tv_sec, s.st_atimespec.tv_nsec = divmod(st.st_atime_ns, 1_000_000_000)
    s.st_mtimespec.tv_sec, s.st_mtimespec.tv_nsec = divmod(st.st_mtime_ns, 1_000_000_000)
    s.st_ctimespec.tv_sec, s.st_ctimespec.tv_nsec = divmod(st.st_ctime_ns, 1_000_000_000)


_pinned = threading.local()
_PyGILState_Ensure = ctypes.pythonapi.PyGILState_Ensure
_PyGILState_Ensure.restype = ctypes.c_int


def _pin_thread_state() -> None:
    """Keep a Python thread state for this libfuse worker thread for good.

    ctypes creates a thread state for every callback from a foreign thread and destroys it
    on return (an mmap, munmap and more per FUSE request); one extra, never released
    ``PyGILState_Ensure`` keeps the first one, and later callbacks reuse it. The GIL is
    still released after each callback: ctypes' own release restores the state it found.
    """
    if not getattr(_pinned, "done", False):
        _PyGILState_Ensure()
        _pinned.done = True


class OverlayFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with five fixes: rename flags and ftruncate's fh are passed on,
    reads land in libfuse's buffer without an intermediate bytes object, getattr fills the
    C stat struct straight from an ``Attr`` (no dict, no per-key setattr), and worker
    threads keep their Python thread state between requests."""

    def _wrapper(self, func, *args, **kwargs):
        _pin_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    def opendir(self, path: bytes, fip) -> int:
        # Let the kernel cache listings across opens: it drops them itself whenever the
        # directory changes through the mount, and layers change only through the mount.
        fi = fip.contents
        fi.fh = self.operations.opendir(path.decode(self.encoding, self.errors))
        fi.cache_readdir = 1
        fi.keep_cache = 1
        return 0

    def readdir_fuse_3(self, path, buf, filler, offset: int, fip, flags: int) -> int:
        """Listings with ``st_ino`` and ``st_mode`` (trap 3) and, for READDIRPLUS, full
        attributes, so the kernel creates the entries without a LOOKUP per name.

        Entries go out with offsets (position + 1): only in that mode does libfuse take
        the attributes given here instead of calling getattr for every entry."""
        plus = bool(flags & FUSE_READDIR_PLUS)
        entries = self.operations.readdir(None, fip.contents.fh, plus, offset)
        dots = self.operations.dot_inos(fip.contents.fh) if offset < 2 else (0, 0)
        st = mfusepy.c_stat()
        for pos in range(offset, len(entries) + 2):
            if pos < 2:
                ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
                st.st_mode, st.st_ino = stat.S_IFDIR, dots[pos]
                name, fill_flags = b"." * (pos + 1), 0
            else:
                e = entries[pos - 2]
                name = e.name.encode(self.encoding, self.errors)
                if plus and e.attr is not None:
                    _fill_stat(st, e.attr)
                    fill_flags = FUSE_FILL_DIR_PLUS
                else:
                    ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
                    st.st_mode, st.st_ino = e.mode, e.ino
                    fill_flags = 0
            if filler(buf, name, st, pos + 1, fill_flags) != 0:
                break
        return 0

    def fgetattr(self, path, buf, fip) -> int:
        attr = self.operations.getattr(None if path is None else path.decode(self.encoding, self.errors),
                                       fip.contents if fip else None)
        _fill_stat(buf.contents, attr)
        return 0


    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)

    def truncate_fuse_3(self, path, length: int, fip) -> int:
        fi = fip.contents if fip else None
        return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                        length, fi)

    def read(self, path, buf, size: int, offset: int, fip) -> int:
        addr = ctypes.cast(buf, ctypes.c_void_p).value
        view = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
        return self.operations.readinto(fip.contents.fh, view, offset)

    def write(self, path, buf, size: int, offset: int, fip) -> int:
        addr = ctypes.cast(buf, ctypes.c_void_p).value
        view = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
        return self.operations.write(None, view, offset, fip.contents)


def serve(fs: OverlayFS, *, foreground: bool, mount_flags: list[str]) -> None:
    """Mount and serve until unmounted (daemonizing first unless ``foreground``)."""
    cfg = fs.config
    kwargs = dict(
        foreground=foreground,
        raw_fi=True,
        fsname=cfg.source.replace(",", "_"),
        subtype="overlaypc",
        default_permissions=True,
        use_ino=True,
        # Layers change only through the mount, and changes made through one name of a
        # multiply-linked file invalidate its other names (linknames.py): long kernel
        # caching of names and attributes is safe, as with the kernel's own overlay.
        entry_timeout=cfg.timeout,
        attr_timeout=cfg.timeout,
        negative_timeout=cfg.timeout,
    )
    kwargs.update(mount_mode(os.geteuid()))
    for flag in mount_flags:
        kwargs[flag] = True
    watch = "auto_unmount" in kwargs and "allow_other" not in kwargs
    OverlayFUSE(OverlayOperations(fs, watch_unmount=watch), cfg.mountpoint, **kwargs)
