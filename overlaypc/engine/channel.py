"""The channel to the kernel: /dev/fuse, mounting, unmounting, cloned fds.

Owns how a FUSE connection comes to exist and goes away. ``mount`` tries mount(2) first
(root, and uid 0 of a user namespace that owns its mount namespace, as rootless podman
runs its mount program), and on EPERM falls back to the setuid ``fusermount3``, which
mounts for a plain user and hands the /dev/fuse fd back over a socket (``_FUSE_COMMFD``),
as libfuse does. With ``auto_unmount`` fusermount3 stays behind, holding that socket: when
the daemon exits, the socket closes and fusermount3 unmounts. ``clone`` gives a worker its
own fd on the same connection (each fd has its own reply queue).

Caveats: mount(2) options follow libfuse's defaults (``nosuid,nodev`` unless ``suid``/
``dev`` are given); ``context=`` is passed to the kernel as it is. The kernel sends INIT
only after mount(2) returns, so the session reads it after ``mount``.
"""
from __future__ import annotations

import errno
import fcntl
import os
import _struct as struct  # (struct.py only re-exports _struct: ~0.15 ms of a start)

from . import protocol
from .. import cbind, logs
from ..records import field, record
from ..typing_lite import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

log = logs.get("overlaypc.engine")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_DIRSYNC, MS_NOATIME = 128, 1024
MNT_DETACH = 2

#: generic mount options and the mount(2) flag each sets (+) or clears (-)
_FLAG_OPTIONS = {
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True), "noatime": (MS_NOATIME, True),
}
#: options the FUSE kernel module itself takes in mount(2)'s data
_KERNEL_DATA = ("allow_other", "default_permissions")

# the process's own libc (ctypes.util.find_library would run ldconfig: ~10 ms at start)
_libc = cbind.Library()
_libc.mount.argtypes = [cbind.c_char_p, cbind.c_char_p, cbind.c_char_p, cbind.c_ulong,
                        cbind.c_char_p]
_libc.umount2.argtypes = [cbind.c_char_p, cbind.c_int]


@record
class MountOptions:
    """What to mount: the source and subtype shown in mountinfo, and options in
    libfuse's spelling (``allow_other``, ``default_permissions``, ``auto_unmount``,
    ``allow_root``, generic flags such as ``ro``/``nodev``, ``context=...``)."""
    fsname: str
    subtype: str = "overlaypc"
    options: list[str] = field(default_factory=list)
    max_read: int | None = None

    def has(self, name: str) -> bool:
        return name in self.options


@record
class Channel:
    """A live connection: its fd, where it is mounted, and how (for unmounting)."""
    fd: int
    mountpoint: str
    via_fusermount: bool
    #: fusermount3's socket, kept open for the daemon's lifetime (auto_unmount)
    comm: socket.socket | None = None
    clones: list[int] = field(default_factory=list)

    def clone(self) -> int:
        """A new fd on this connection (``FUSE_DEV_IOC_CLONE``)."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, protocol.DEV_IOC_CLONE, struct.pack("I", self.fd))
        except OSError:
            os.close(fd)
            raise
        self.clones.append(fd)
        return fd

    def close_clone(self, fd: int) -> None:
        """Close a clone made by ``clone`` (a retired worker's) and forget it."""
        self.clones.remove(fd)  # first: ``close`` must never close its number again
        os.close(fd)

    def unmount(self) -> None:
        """Detach the mount (lazily: open files keep being served until closed)."""
        if not self.via_fusermount:
            if _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH) == 0:
                return
            e = cbind.get_errno()
            if e in (errno.EINVAL, errno.ENOENT):  # already gone
                return
            if e != errno.EPERM:
                raise OSError(e, os.strerror(e), self.mountpoint)
        import subprocess  # loaded already when fusermount3 mounted it
        subprocess.run([_fusermount(), "-u", "-q", "-z", "--", self.mountpoint],
                       stdin=subprocess.DEVNULL, capture_output=True)

    def close(self) -> None:
        for fd in [*self.clones, self.fd]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.clones.clear()
        if self.comm is not None:
            self.comm.close()
            self.comm = None


def _fusermount() -> str:
    import shutil
    path = shutil.which("fusermount3")
    if path is None:
        raise OSError(errno.ENOENT, "fusermount3 not found (Debian package fuse3)")
    return path


def _flags(opts: MountOptions) -> tuple[int, list[str]]:
    """mount(2) flags and the remaining options."""
    flags = MS_NOSUID | MS_NODEV  # libfuse's defaults
    rest = []
    for opt in opts.options:
        if opt in _FLAG_OPTIONS:
            bit, on = _FLAG_OPTIONS[opt]
            flags = flags | bit if on else flags & ~bit
        else:
            rest.append(opt)
    return flags, rest


def mount(mountpoint: str, opts: MountOptions) -> Channel:
    """Mount a new FUSE connection at ``mountpoint``; mount(2) first, fusermount3 on EPERM."""
    mountpoint = os.path.abspath(mountpoint)
    flags, rest = _flags(opts)
    st = os.stat(mountpoint)  # before /dev/fuse is opened: a missing mountpoint leaks no fd
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = [f"fd={fd}", f"rootmode={st.st_mode & 0o170000:o}", f"user_id={os.getuid()}",
            f"group_id={os.getgid()}"]
    data += [o for o in rest if o in _KERNEL_DATA or o.startswith("context=")]
    if "allow_root" in rest and "allow_other" not in data:
        data.append("allow_other")  # the session refuses others (libfuse's deny_others)
    if opts.max_read:
        data.append(f"max_read={opts.max_read}")
    fstype = f"fuse.{opts.subtype}"
    if _libc.mount(os.fsencode(opts.fsname), os.fsencode(mountpoint), fstype.encode(), flags,
                   ",".join(data).encode()) == 0:
        return Channel(fd, mountpoint, via_fusermount=False)
    e = cbind.get_errno()
    os.close(fd)
    if e != errno.EPERM:
        raise OSError(e, f"mount(2) of {mountpoint}: {os.strerror(e)}", mountpoint)
    return _mount_fusermount(mountpoint, opts, flags, rest)


def _mount_fusermount(mountpoint: str, opts: MountOptions, flags: int, rest: list[str]) -> Channel:
    # imported here: a mount by root (mount(2) itself) needs none of them, and they
    # cost start-up time
    import socket
    import subprocess
    import tempfile
    words = ["ro" if flags & MS_RDONLY else "rw"]
    words += [name for name, (bit, on) in _FLAG_OPTIONS.items()
              if on and bit != MS_RDONLY and flags & bit and name != "sync"]
    words += rest
    words += [f"fsname={opts.fsname}", f"subtype={opts.subtype}"]
    if opts.max_read:
        words.append(f"max_read={opts.max_read}")
    program = _fusermount()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # with auto_unmount fusermount3 outlives this command: its output goes to a file of
    # its own, never to our stdout/stderr (a caller reading them to EOF would wait for
    # the mount to end); closed here whatever happens, as ``theirs`` (fusermount3's end)
    errors = None
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        errors = tempfile.TemporaryFile()
        proc = subprocess.Popen([program, "-o", ",".join(words), "--", mountpoint],
                                env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errors)
        theirs.close()
        _msg, fds, _flags_, _addr = socket.recv_fds(ours, 1, 1)
        if not fds:
            status = proc.wait()
            errors.seek(0)
            why = errors.read().decode(errors="replace").strip() or f"status {status}"
            raise OSError(errno.EPERM, f"fusermount3 could not mount {mountpoint}: {why}",
                          mountpoint)
        if "auto_unmount" not in words:
            proc.wait()
            ours.close()
            comm = None
        else:
            comm = ours  # fusermount3 stays, watching this socket
        os.set_inheritable(fds[0], False)
        return Channel(fds[0], mountpoint, via_fusermount=True, comm=comm)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        if errors is not None:
            errors.close()
