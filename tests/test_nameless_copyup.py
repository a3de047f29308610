"""Copy-ups of open files whose names are all gone (nameless21), against the kernel overlay
(``kernel_mount``, each side over its own copy of one lower: ``upper_support.on_both``):

- LINK of a nameless lower hard link under ``index=on`` (soak15's seed 7510): its unlink
  copied it up into the index (``ovl_nlink_start``), and ``linkat`` of its
  ``/proc/self/fd/N`` (AT_SYMLINK_FOLLOW) links that index inode, as the kernel overlay
  does; a lower file not copied up answers ENOENT there and here (its copy-up needs a
  name). Before: ENOENT for the index entry too.
- ``metacopy=on``: a metacopy file (data still below) whose name went, then changed
  through its fd: reopened for writing (``O_RDWR``, ``O_WRONLY|O_TRUNC``) or truncated
  through its magic link. The kernel overlay copies the data into the unlinked upper file;
  so does overlaypc now (``CopyUp.copy_data_nameless``), and every handle of the file reads
  what is written after. Before: EROFS.
- a change of a nameless lower file (fchmod, fchown, utimens, setxattr, truncate): EEXIST,
  the kernel overlay's answer (its copy-up finds the name taken). Before: EROFS. Its
  directory removed too (rmdir, a rename over it; also after a rename of it, or with a new
  directory made at its name; a grandparent gone): ENOENT, the kernel's (its copy-up of the
  removed parent); a directory renamed, not removed: EEXIST still (left26).

(``os.link`` with ``follow_symlinks`` but no ``dst_dir_fd`` calls link(2), which links the
magic link itself: EXDEV from procfs on any filesystem. The scenarios use ``linkat``.)
"""
from __future__ import annotations

import errno
import os
import stat

import pytest

import helpers
from core_driver import REQ, CoreDriver
from overlaypc.engine import protocol as p
from overlaypc.engine.protocol import SetAttr
from test_nameless_file_xattrs import _open_unlinked
from upper_support import is_whiteout, on_both

#: the nameless lower files whose directory goes too (``_parent_gone_changes``)
_PARENT_GONE = ("removed", "merged", "moved_removed", "renamed_over", "recreated", "grand",
                "renamed")
LOWER = {"hl": "hard link\n", "hl2": helpers.HardLink("hl"),
         "gone": "both gone\n", "gone2": helpers.HardLink("gone"), "lo": "lower one\n",
         "mc": "lower metacopy\n", "mt": "metacopy trunc\n", "mx": "metacopy cut\n",
         "mo": "metacopy over\n"}
for _op in ("chmod", "chown", "utime", "setxattr", "truncate"):
    LOWER[f"c_{_op}"] = f"lower {_op}\n"
for _case in _PARENT_GONE:
    for _op in ("chmod", "reopen", "truncate", "setxattr"):
        LOWER[f"p_{_case}_{_op}/d/f"] = f"{_case} {_op}\n"

RUNS = {"plain": ("", ()), "index": ("index=on", ("index=on",)),
        "metacopy": ("metacopy=on,redirect_dir=on", ("redirect_dir=on", "metacopy=on")),
        "mcindex": ("metacopy=on,redirect_dir=on,index=on",
                    ("redirect_dir=on", "metacopy=on", "index=on"))}


def _err(call):
    try:
        call()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def _linkat(m: str, fd: int, name: str) -> str:
    dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _err(lambda: os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd,
                                    follow_symlinks=True))
    finally:
        os.close(dfd)


def _links(m: str) -> list:
    """Nameless files linked through their fd: a lower hard link with another name left, one
    with none, a plain lower file."""
    out = []
    for name, names in (("hl", ["hl"]), ("gone", ["gone", "gone2"]), ("lo", ["lo"])):
        fd = os.open(f"{m}/{name}", os.O_RDONLY)
        try:
            for n in names:
                os.unlink(f"{m}/{n}")
            answer = _linkat(m, fd, f"z{name}")
            row = [name, answer, os.fstat(fd).st_nlink]
            if answer == "ok":
                z = f"{m}/z{name}"
                with open(z, "rb") as f:
                    row.append(f.read())
                row.append(os.stat(z).st_nlink)
                # one inode: the name left below and the new one
                row.append(os.stat(z).st_ino == os.stat(f"{m}/{name}2").st_ino)
                with open(z, "r+b") as f:  # a write through the new name is seen by the fd
                    f.write(b"HL")
                row.append(os.pread(fd, 100, 0))
                with open(f"{m}/{name}2", "rb") as f:
                    row.append(f.read())
            out.append(row)
        finally:
            os.close(fd)
    return out


@pytest.mark.parametrize("run", sorted(RUNS))
def test_link_of_a_nameless_lower_hard_link(run, tmp_path, overlay_mount, kernel_mount):
    ours_opts, kernel_opts = RUNS[run]
    kernel, ours = on_both(tmp_path, overlay_mount, kernel_mount, LOWER, ours_opts,
                           kernel_opts, _links)
    indexed = "index" in run
    assert kernel[0][1] == ("ok" if indexed else "ENOENT")  # (the oracle)
    assert kernel[2][1] == "ENOENT"
    assert ours == kernel


def _metacopy_writes(m: str) -> list:
    """Metacopy files (chmodded: data below under metacopy=on) whose names went, changed
    through their fds: what each answers, what every fd of each reads and shows after."""
    out = []
    fds: list[int] = []

    def opened(path: str, flags: int) -> int:
        fd = os.open(path, flags)
        fds.append(fd)
        return fd

    try:
        for name in ("mc", "mt", "mx", "mo"):
            os.chmod(f"{m}/{name}", 0o640)
        # reopened for writing: a read-only fd before, one reopened before the write
        first = opened(f"{m}/mc", os.O_RDONLY)
        os.unlink(f"{m}/mc")
        again = opened(f"/proc/self/fd/{first}", os.O_RDONLY)
        try:
            rw = opened(f"/proc/self/fd/{first}", os.O_RDWR)
            os.pwrite(rw, b"MC", 0)
            out.append(("rw", "ok", [os.pread(fd, 100, 0) for fd in (first, again, rw)],
                        [(oct(os.fstat(fd).st_mode), os.fstat(fd).st_nlink,
                          os.fstat(fd).st_size) for fd in (first, again, rw)]))
            os.pwrite(rw, b"more", 20)  # past the end: the size moves for every fd
            out.append(("grown", [os.pread(fd, 100, 0) for fd in (first, again)],
                        [os.fstat(fd).st_size for fd in (first, again)]))
        except OSError as e:
            out.append(("rw", errno.errorcode[e.errno],
                        [os.pread(fd, 100, 0) for fd in (first, again)]))
        # reopened with O_TRUNC
        first = opened(f"{m}/mt", os.O_RDONLY)
        os.unlink(f"{m}/mt")
        try:
            tr = opened(f"/proc/self/fd/{first}", os.O_WRONLY | os.O_TRUNC)
            os.write(tr, b"cut")
            out.append(("trunc", "ok", os.pread(first, 100, 0), os.fstat(first).st_size))
        except OSError as e:
            out.append(("trunc", errno.errorcode[e.errno], os.pread(first, 100, 0)))
        # truncated through its magic link (SETATTR by node)
        first = opened(f"{m}/mx", os.O_RDONLY)
        os.unlink(f"{m}/mx")
        out.append(("truncate", _err(lambda: os.truncate(f"/proc/self/fd/{first}", 4)),
                    os.pread(first, 100, 0), os.fstat(first).st_size))
        # renamed over, then reopened for writing
        first = opened(f"{m}/mo", os.O_RDONLY)
        with open(f"{m}/new", "w") as f:
            f.write("replacement\n")
        os.rename(f"{m}/new", f"{m}/mo")
        try:
            rw = opened(f"/proc/self/fd/{first}", os.O_RDWR)
            os.pwrite(rw, b"MO", 0)
            out.append(("over", "ok", os.pread(first, 100, 0)))
        except OSError as e:
            out.append(("over", errno.errorcode[e.errno], os.pread(first, 100, 0)))
        with open(f"{m}/mo", "rb") as f:
            out.append(("over name", f.read()))
    finally:
        for fd in fds:
            os.close(fd)
    return out


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_nameless_metacopy_file_changed_through_its_fd(run, tmp_path, overlay_mount,
                                                         kernel_mount):
    """Before (metacopy=on): ``rw``, ``trunc``, ``truncate`` and ``over`` answered EROFS."""
    ours_opts, kernel_opts = RUNS[run]
    kernel, ours = on_both(tmp_path, overlay_mount, kernel_mount, LOWER, ours_opts,
                           kernel_opts, _metacopy_writes)
    assert kernel[0][:3] == ("rw", "ok", [b"MCwer metacopy\n"] * 3)  # (the oracle)
    for k, o in zip(kernel, ours):
        assert o == k
    assert ours == kernel


def _lower_changes(m: str) -> list:
    out = []
    for op, change in (("chmod", lambda fd: os.fchmod(fd, 0o600)),
                       ("chown", lambda fd: os.fchown(fd, 123, 456)),
                       ("utime", lambda fd: os.utime(fd, ns=(10**18, 10**18))),
                       ("setxattr", lambda fd: os.setxattr(fd, "user.x", b"v")),
                       ("truncate", lambda fd: os.truncate(f"/proc/self/fd/{fd}", 3))):
        fd = os.open(f"{m}/c_{op}", os.O_RDONLY)
        try:
            os.unlink(f"{m}/c_{op}")
            st = os.fstat(fd)
            out.append((op, _err(lambda: change(fd)), os.pread(fd, 100, 0),
                        (st.st_mode, st.st_uid, st.st_gid, st.st_size) == (
                            os.fstat(fd).st_mode, os.fstat(fd).st_uid, os.fstat(fd).st_gid,
                            os.fstat(fd).st_size)))
        finally:
            os.close(fd)
    return out


@pytest.mark.parametrize("run", ["plain", "metacopy"])
def test_a_change_of_a_nameless_lower_file(run, tmp_path, overlay_mount, kernel_mount):
    """Before: EROFS for each (errno only: nothing changed on either side)."""
    ours_opts, kernel_opts = RUNS[run]
    kernel, ours = on_both(tmp_path, overlay_mount, kernel_mount, LOWER, ours_opts,
                           kernel_opts, _lower_changes)
    assert kernel[0][1] == "EEXIST"  # (the oracle)
    assert ours == kernel


def _parent_gone_changes(m: str) -> list:
    """A lower file open, unlinked, then its directory removed (or moved, see
    ``_PARENT_GONE``), then changed through its fd: the answer, and its data and
    attributes as they stay."""
    changes = {"chmod": lambda fd: os.fchmod(fd, 0o600),
               "reopen": lambda fd: os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR)),
               "truncate": lambda fd: os.truncate(f"/proc/self/fd/{fd}", 3),
               "setxattr": lambda fd: os.setxattr(fd, "user.x", b"v")}
    out = []
    for case in _PARENT_GONE:
        for op, change in changes.items():
            top = f"{m}/p_{case}_{op}"
            d = f"{top}/d"
            fd = os.open(f"{d}/f", os.O_RDONLY)
            try:
                if case == "merged":  # (its directory copied up first)
                    os.mknod(f"{d}/x")
                    os.unlink(f"{d}/x")
                os.unlink(f"{d}/f")
                if case in ("moved_removed", "renamed"):
                    os.rename(d, f"{top}/e")
                    d = f"{top}/e"
                if case == "renamed_over":
                    os.mkdir(f"{top}/o")
                    os.rename(f"{top}/o", d)
                elif case != "renamed":
                    os.rmdir(d)
                if case == "grand":
                    os.rmdir(top)
                if case == "recreated":
                    os.mkdir(d)
                st = os.fstat(fd)
                out.append((case, op, _err(lambda: change(fd)), os.pread(fd, 100, 0),
                            (st.st_mode, st.st_size) == (os.fstat(fd).st_mode,
                                                         os.fstat(fd).st_size)))
            finally:
                os.close(fd)
    return out


@pytest.mark.parametrize("index", ["", "index=on"])
def test_a_change_of_a_nameless_lower_file_whose_directory_went(index, tmp_path, overlay_mount,
                                                                 kernel_mount):
    """Before: EEXIST where the kernel answers ENOENT (errno only: nothing changes on either
    side). Also with index=on (review27: a guard, it agreed already)."""
    opts = ("redirect_dir=on",) + ((index,) if index else ())
    kernel, ours = on_both(tmp_path, overlay_mount, kernel_mount, LOWER, ",".join(opts),
                           opts, _parent_gone_changes)
    assert kernel[0][2] == "ENOENT" and kernel[-1][2] == "EEXIST"  # (the oracle)
    for k, o in zip(kernel, ours):
        assert o == k
    assert ours == kernel


# -- in-process (core_driver) -----------------------------------------------------------------
def test_nameless_metacopy_data_copy_up_moves_every_handle(tmp_path):
    """The data copy-up of a nameless metacopy file moves the inode to its upper file and
    switches every handle there (two read-only ones on the lower data); the upper file
    loses its metacopy mark; the lower file is untouched."""
    helpers.build_layer(tmp_path / "lower", {"f": "lower data\n"})
    drv = CoreDriver.in_dir(tmp_path, metacopy=True, redirect_dir="on")
    try:
        from core_driver import Walker
        w = Walker(drv)
        w.setattr("f", mode=0o640)
        assert os.getxattr(tmp_path / "upper" / "f", "trusted.overlay.metacopy") == b""
        fro = w.open("f", os.O_RDONLY)
        nodeid, fro2 = _open_unlinked(drv, "f", os.O_RDONLY)
        inode = drv.fs.handles.get(fro).inode
        assert not inode.in_upper and inode.meta_file is not None
        fh = drv.ops.open(REQ, nodeid, os.O_RDWR).fh
        drv._open[fh] = nodeid
        assert inode.in_upper
        assert drv.write(fh, b"NEW", 0) == 3
        for h in (fro, fro2, fh):
            assert drv.read(h, 100, 0) == b"NEWer data\n"
            assert drv.fs.handles.get(h).bound_generation == inode.generation
        meta = drv.fs.handles.get(fh).bound_fd
        assert "trusted.overlay.metacopy" not in os.listxattr(meta)
        assert os.fstat(meta).st_nlink == 0
        assert drv.ops.getattr(REQ, nodeid).attr.nlink == 0
        assert (tmp_path / "lower" / "f").read_bytes() == b"lower data\n"
        assert is_whiteout(tmp_path / "upper" / "f")
        for h in (fro, fro2, fh):
            drv.release(h)
        drv.settle()
        assert drv.fs.inodes.meta_fds == 0
    finally:
        drv.close()


def test_link_of_an_index_entry_with_no_name_left_in_process(tmp_path):
    """LINK of the node of a lower hard link whose names are all gone (index=on: its
    index entry, count 0): ENOENT, nothing linked (the kernel refuses it before asking,
    by the count 0 the node shows)."""
    helpers.build_layer(tmp_path / "lower", {"hl": "x\n", "hl2": helpers.HardLink("hl")})
    drv = CoreDriver.in_dir(tmp_path, index=True)
    try:
        from core_driver import Walker
        nodeid, fh = _open_unlinked(drv, "hl", os.O_RDONLY)
        Walker(drv).unlink("hl2")
        assert drv.ops.getattr(REQ, nodeid).attr.nlink == 0
        with pytest.raises(OSError) as e:
            drv.ops.link(REQ, nodeid, 1, b"z")
        assert e.value.errno == errno.ENOENT
        assert not (tmp_path / "upper" / "z").exists()
        drv.release(fh)
        drv.settle()
    finally:
        drv.close()


@pytest.mark.parametrize("change", ["truncate", "chmod"])
def test_a_nameless_metacopy_file_with_handles_bound_to_its_lower_data(tmp_path, change):
    """``handles=bind-at-open`` (soak23 seed 9210, stress_extra's ``reopen_meta``): a
    metacopy file opened read-only (its handle bound to the lower data), unlinked, then
    truncated by node (``truncate("/proc/self/fd/N")``): its data is copied into its held
    upper file, which the truncate then cuts, as the kernel overlay answers it (ok). A
    later change by node (chmod) reaches that upper file too; the handle keeps the lower
    data (the stale read bind-at-open is for), the lower file is untouched. Before:
    ENOENT (no handle on the current backing)."""
    helpers.build_layer(tmp_path / "lower", {"f": "lower data\n"})
    drv = CoreDriver.in_dir(tmp_path, metacopy=True, redirect_dir="on", handles="bind-at-open")
    try:
        from core_driver import Walker
        Walker(drv).setattr("f", mode=0o640)
        nodeid, fro = _open_unlinked(drv, "f", os.O_RDONLY)
        inode = drv.fs.handles.get(fro).inode
        assert not inode.in_upper and inode.meta_file is not None
        sa = SetAttr(p.FATTR_SIZE, None, 5, 0, 0, 0, 0, 0)
        assert drv.ops.setattr(REQ, nodeid, sa).attr.size == 5
        assert inode.in_upper
        if change == "chmod":
            sa = SetAttr(p.FATTR_MODE, None, 0, 0, 0, stat.S_IFREG | 0o600, 0, 0)
            assert drv.ops.setattr(REQ, nodeid, sa).attr.mode & 0o7777 == 0o600
        fh = drv.ops.open(REQ, nodeid, os.O_RDONLY).fh
        drv._open[fh] = nodeid
        assert drv.read(fh, 100, 0) == b"lower"
        st = os.fstat(drv.fs.handles.get(fh).bound_fd)
        assert (st.st_size, st.st_nlink, stat.S_IMODE(st.st_mode)) == (
            5, 0, 0o600 if change == "chmod" else 0o640)
        assert drv.read(fro, 100, 0) == b"lower data\n"
        assert (tmp_path / "lower" / "f").read_bytes() == b"lower data\n"
        for h in (fro, fh):
            drv.release(h)
        drv.settle()
        assert drv.fs.inodes.meta_fds == 0
    finally:
        drv.close()


# -- review22 ---------------------------------------------------------------------------------
def _bound_changes(m: str) -> list:
    """A nameless metacopy file (data below) whose only handle stays bound to the lower data
    (``handles=bind-at-open`` on our side) changed through it by node: a truncate of its
    magic link (its data copied up first), then a chmod and a setxattr; what a new handle
    of it reads and shows after."""
    os.chmod(f"{m}/mb", 0o640)
    fd = os.open(f"{m}/mb", os.O_RDONLY)
    try:
        os.unlink(f"{m}/mb")
        out = [("truncate", _err(lambda: os.truncate(f"/proc/self/fd/{fd}", 4))),
               ("chmod", _err(lambda: os.fchmod(fd, 0o600))),
               ("setxattr", _err(lambda: os.setxattr(fd, "user.k", b"v")))]
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            st = os.fstat(again)
            out.append(("again", os.pread(again, 100, 0), oct(st.st_mode), st.st_size,
                        _err(lambda: os.getxattr(again, "user.k"))))
        finally:
            os.close(again)
    finally:
        os.close(fd)
    return out


def test_a_nameless_metacopy_file_changed_with_its_handle_bound_at_open(tmp_path, overlay_mount,
                                                                       kernel_mount):
    """review22: under ``handles=bind-at-open`` the file's handles stay on the lower data
    after its data copy-up, and a change by node went only through a handle on the current
    backing: the truncate copied the data up, then answered ENOENT, as did every change
    after (the held upper file, which ``Files.open_inode`` reopens, was not tried). Failed
    before: ``At index 0 diff: ('truncate', 'ENOENT') != ('truncate', 'ok')``."""
    lower = {"mb": "metacopy bound\n"}
    kernel, ours = on_both(tmp_path, overlay_mount, kernel_mount, lower,
                           RUNS["metacopy"][0] + ",handles=bind-at-open", RUNS["metacopy"][1],
                           _bound_changes)
    assert kernel[0] == ("truncate", "ok")  # (the oracle)
    assert ours == kernel


def _kernel_linked_metacopy(base, kernel_mount):
    """Layers where ``f`` and ``g`` are upper hard links of one metacopy file, as the
    kernel overlay's ``ln`` of a metacopy file leaves them (an absolute redirect on the
    file, its data still below): (lower, upper, work)."""
    lower = helpers.build_layer(base / "lower", {"f": "lower data\n" * 3, "p": "plain\n"})
    upper, work = base / "upper", base / "work"
    upper.mkdir()
    work.mkdir()
    k = kernel_mount([lower], upper, work, RUNS["metacopy"][1])
    try:
        os.chmod(k / "f", 0o640)
        os.chmod(k / "p", 0o640)  # (a metacopy file with one name)
        os.link(k / "f", k / "g")
    finally:
        helpers.force_unmount(k)
    assert os.lstat(upper / "g").st_nlink == 2
    assert "trusted.overlay.metacopy" in os.listxattr(upper / "g")
    return lower, upper, work


def _write_nameless_linked(m: str) -> list:
    """``f`` of the kernel-linked metacopy pair opened, unlinked (``g`` left: a name the
    mount has not looked up), reopened for writing through its fd, written."""
    fd = os.open(f"{m}/f", os.O_RDONLY)
    try:
        os.unlink(f"{m}/f")
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        os.pwrite(rw, b"NEW", 0)
        os.close(rw)
        out = [os.pread(fd, 100, 0)]
    finally:
        os.close(fd)
    with open(f"{m}/g", "rb") as f:
        out.append((f.read(), os.stat(f"{m}/g").st_nlink))
    return out


def _on_both_kernel_linked(tmp_path, overlay_mount, kernel_mount, scenario, ours_extra: str,
                           remounted) -> list:
    """``scenario(mountpoint)`` on the kernel overlay, then on overlaypc (metacopy=on, plus
    ``ours_extra``), each over its own kernel-linked metacopy pair
    (``_kernel_linked_metacopy``); each result ends with ``remounted(a kernel overlay over
    the same layers after)``: [kernel's, ours]."""
    from upper_support import stack_options
    results = []
    for side in ("kernel", "ours"):
        lower, upper, work = _kernel_linked_metacopy(tmp_path / side, kernel_mount)
        if side == "kernel":
            k = kernel_mount([lower], upper, work, RUNS["metacopy"][1])
            results.append(scenario(str(k)))
            helpers.force_unmount(k)
        else:
            mo = overlay_mount(stack_options([lower], upper, work, RUNS["metacopy"][0] + ours_extra))
            results.append(scenario(str(mo.path)))
            mo.unmount()
        k = kernel_mount([lower], upper, work, RUNS["metacopy"][1])
        results[-1].append(remounted(k))
        helpers.force_unmount(k)
    return results


def test_a_nameless_metacopy_file_with_an_upper_link_written(tmp_path, overlay_mount,
                                                             kernel_mount):
    """The upper file of a nameless metacopy file keeps a name the mount never looked up
    (the kernel's ``ln`` made it): its data copy-up and a write through the fd, seen by
    that name, then by the kernel overlay over the same layers after."""
    results = _on_both_kernel_linked(
        tmp_path, overlay_mount, kernel_mount, _write_nameless_linked, "",
        lambda k: ("remounted", (k / "g").read_bytes(), sorted(os.listdir(k))))
    assert results[0][0].startswith(b"NEW")  # (the oracle)
    assert results[1] == results[0]


def _link_nameless_linked(m: str) -> list:
    """``f`` of the kernel-linked metacopy pair, and ``p``, a metacopy file with no other
    name, each opened, unlinked and linked again through its fd."""
    out = []
    for name in ("f", "p"):
        fd = os.open(f"{m}/{name}", os.O_RDONLY)
        try:
            os.unlink(f"{m}/{name}")
            out.append((name, os.fstat(fd).st_nlink, _linkat(m, fd, f"z{name}"),
                        os.fstat(fd).st_nlink, os.pread(fd, 100, 0)))
        finally:
            os.close(fd)
    for name in sorted(os.listdir(m)):
        with open(f"{m}/{name}", "rb") as f:
            out.append((name, f.read(), os.stat(f"{m}/{name}").st_nlink,
                        os.stat(f"{m}/{name}").st_ino == os.stat(f"{m}/g").st_ino))
    return out


@pytest.mark.parametrize("handles", ["reopen", "bind-at-open"])
def test_link_of_a_nameless_metacopy_file_with_an_upper_link(handles, tmp_path, overlay_mount,
                                                             kernel_mount):
    """review22: LINK through the fd of a metacopy file (data below) whose name went while
    its upper file keeps another (the kernel's ``ln`` made it): the kernel overlay links
    it, as README says overlaypc does (nameless21 dropped the caveat) (here its data is
    copied in first, ``Files.copy_data_to_link``); one with no name
    left answers ENOENT on both. Failed before: ``At index 0 diff: ('f', 1, 'ENOENT', 1,
    ...) != ('f', 1, 'ok', 2, ...)``."""
    results = _on_both_kernel_linked(
        tmp_path, overlay_mount, kernel_mount, _link_nameless_linked, f",handles={handles}",
        lambda k: ("remounted", sorted(
            (n, os.stat(k / n).st_nlink, (k / n).read_bytes()) for n in os.listdir(k))))
    assert results[0][:2] == [("f", 1, "ok", 2, b"lower data\n" * 3),
                              ("p", 0, "ENOENT", 0, b"plain\n")]  # (the oracle)
    assert results[1] == results[0]


def test_a_named_data_copy_up_racing_a_nameless_one_keeps_the_write(tmp_path, kernel_mount):
    """review22: the data copy-ups of one metacopy upper file through two of its names (the
    nameless ``f``, ``copy_data_nameless``, and its upper hard link ``g``,
    ``_copy_data_in_place``) took different stripe locks, so both copied the lower data
    in: ``g``'s, past its look at the mark before ``f``'s copy dropped it, copied over a
    write through ``f``'s new handle. Paused with fault hooks: ``f``'s copy in its data
    step, ``g``'s open of the upper file (its look at the mark done), then ``f``'s copy
    let go and written through, then ``g``'s. Now one data copy-up per upper file at a
    time, the mark looked at under that lock (``CopyUp._filling``). Failed before:
    ``assert b'lower data\\nlower...' == b'NEWer data\\nlower...'``."""
    import sys
    import threading

    from overlaypc import faults
    from overlaypc.config import MountConfig, validate
    from core_driver import Walker

    lower, upper, work = _kernel_linked_metacopy(tmp_path, kernel_mount)
    (tmp_path / "mnt").mkdir()
    cfg = MountConfig(lowers=[str(lower)], upper=str(upper), work=str(work),
                      mountpoint=str(tmp_path / "mnt"), metacopy=True, redirect_dir="on")
    validate(cfg)
    drv = CoreDriver(cfg)
    # the pauses below need f's and g's copy-ups on two stripe locks (``CopyUp._stripe``:
    # hash(rel) % their count, and str hashes change per process: with PYTHONHASHSEED=83
    # both names share one, and g waited for f's lock before its open, 1 run in 64)
    copyup = drv.fs.copyup
    n = len(copyup._stripes)
    while hash("f") % n == hash("g") % n:
        n += 1
    copyup._stripes = [threading.Lock() for _ in range(n)]
    events = {k: threading.Event() for k in ("in_f", "go_f", "go_g", "g_opens")}

    def copying(point, tmp, rel, *rest):
        if rel == "f":
            events["in_f"].set()
        if rel in ("f", "g"):
            assert events["go_" + rel].wait(20)

    def opening(point, layer, rel):
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "_copy_data_in_place":
                events["g_opens"].set()
            frame = frame.f_back

    faults.install("copyup.data", copying)
    faults.install("layer.open", opening)
    got: dict = {}

    def run(key, call):
        try:
            got[key] = call()
        except BaseException as e:  # (reported by the asserts below)
            got[key] = e

    try:
        nodeid, fro = _open_unlinked(drv, "f", os.O_RDONLY)

        def write_f():
            fh = drv.ops.open(REQ, nodeid, os.O_RDWR).fh
            drv._open[fh] = nodeid
            drv.write(fh, b"NEW", 0)
            return fh
        a = threading.Thread(target=run, args=("f", write_f))
        a.start()
        assert events["in_f"].wait(20)
        b = threading.Thread(target=run, args=("g", lambda: Walker(drv).open("g", os.O_RDWR)))
        b.start()
        assert events["g_opens"].wait(20)
        events["go_f"].set()
        a.join(20)
        assert isinstance(got["f"], int), got
        events["go_g"].set()
        b.join(20)
        assert isinstance(got["g"], int), got
        for fh in (fro, got["f"], got["g"]):
            assert drv.read(fh, 100, 0) == b"NEWer data\n" + b"lower data\n" * 2
        assert "trusted.overlay.metacopy" not in os.listxattr(upper / "g")
        for fh in (fro, got["f"], got["g"]):
            drv.release(fh)
        drv.settle()
    finally:
        for event in events.values():
            event.set()
        faults.configure(None)
        drv.close()
    assert (upper / "g").read_bytes() == b"NEWer data\n" + b"lower data\n" * 2
