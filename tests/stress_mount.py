"""Manual tool (not collected by pytest): concurrency stress through a real overlaypc mount.

Written in hunt5; found the metacopy link mtime and the LOOKUP-during-directory-rename
defects (see test_metacopy, test_moved_paths). Run as root from the checkout:
  python tests/stress_mount.py /tmp/scratch/run1 "cache=shared,metacopy=on,index=on" 21 600 4
Usage: stress_mount.py BASE OPTIONS SEED [OPS_PER_WORKER] [WORKERS] (BASE is deleted first).
Environment: ONLY=k,.. (those writers), NOAUX=1 (no lister/reader), NODIRRENAME=1
(redirect_dir=off), oplogs of failing writers go to BASE/../oplog-K.txt.
Each writer process owns its files (single writer per file) and keeps a model; it checks
every read/stat against the model.  Listing and reader processes run concurrently.
At the end: model vs merged view, stat vs fstat, kernel overlay (ro) on the same layers.
"""
import errno
import multiprocessing as mp
import os
import random
import shutil
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers  # noqa: E402

MODES = [0o644, 0o600, 0o755, 0o640]
UIDS = [0, 1000, 1001]


class Inode:
    def __init__(self, data=b"", mode=0o644, uid=0, gid=0):
        self.data = bytearray(data)
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = None  # known mtime_ns after utime, else None
        self.names = set()


def build(base: Path, workers: int, rng: random.Random):
    lower = base / "lower"
    lower2 = base / "lower2"
    upper = base / "upper"
    work = base / "work"
    for d in (lower, lower2, upper, work):
        d.mkdir(parents=True)
    (lower / "s").mkdir()
    (upper / "s").mkdir()
    (lower2 / "s").mkdir()
    models = []
    for k in range(workers):
        files = {}
        (lower / f"d{k}").mkdir()
        (lower / f"d{k}" / "sub").mkdir()
        for i in range(4):
            for layer, where in ((lower, "L"), (upper, "U"), (lower2, "M")):
                for d in ("", "s/", f"d{k}/", f"d{k}/sub/"):
                    if d.startswith("d") and layer is not lower:
                        continue
                    if rng.random() < 0.5:
                        continue
                    name = f"{d}w{k}{where}{i}"
                    data = os.urandom(rng.choice([0, 10, 4096, 70000]))
                    mode = rng.choice(MODES)
                    p = layer / name
                    p.write_bytes(data)
                    os.chmod(p, mode)
                    ino = Inode(data, mode)
                    ino.names.add(name)
                    files[name] = ino
        models.append(files)
    return lower, lower2, upper, work, models


class Failure(Exception):
    pass


def writer(k, root: str, files: dict, seed: int, nops: int, q):
    rng = random.Random(seed)
    root = Path(root)
    dirname = f"d{k}"  # current name of own dir
    fds = []  # (fd, inode)
    names = [f"{d}w{k}{t}{i}" for t in "LUMN" for i in range(6)
             for d in ("", "s/", "@/", "@/sub/")]
    log = []

    def path(name):
        return root / name.replace("@", dirname)

    def mname(name):  # model key uses d{k}
        return name.replace("@", f"d{k}")

    def check_content(got, ino, what):
        if bytes(got) != bytes(ino.data):
            raise Failure(f"{what}: content len {len(got)} != model len {len(ino.data)}; "
                          f"first diff at {next((i for i, (a, b) in enumerate(zip(got, ino.data)) if a != b), min(len(got), len(ino.data)))}")

    def check_stat(st, ino, what):
        want = (stat.S_IMODE(ino.mode), ino.uid, ino.gid, len(ino.data), len(ino.names))
        have = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink)
        if what.startswith("fstat") and not ino.names:
            want = want[:4] + (0,)
        if want != have:
            raise Failure(f"{what}: stat {have} != model {want}")
        if ino.mtime is not None and st.st_mtime_ns != ino.mtime:
            raise Failure(f"{what}: mtime {st.st_mtime_ns} != {ino.mtime}")

    try:
        for step in range(nops):
            name = rng.choice(names)
            key = mname(name)
            ino = files.get(key)
            op = rng.choice(["open", "write", "write", "append", "truncate", "chmod", "chown",
                             "utime", "rename", "unlink", "link", "read", "read", "stat",
                             "fsync", "create", "close", "dirrename", "fdop", "fdop", "fdop"])
            log.append((op, key))
            if op == "fdop":
                if not fds:
                    continue
                fd, fino = rng.choice(fds)
                sub = rng.choice(["pwrite", "read", "fstat", "ftruncate", "fchmod", "fchown",
                                  "futime", "fsync"])
                log[-1] = ("fd" + sub, sorted(fino.names))
                if sub == "pwrite":
                    off = rng.randint(0, len(fino.data) + 100)
                    data = os.urandom(rng.choice([1, 100, 5000, 70000]))
                    os.pwrite(fd, data, off)
                    if off > len(fino.data):
                        fino.data.extend(b"\0" * (off - len(fino.data)))
                    fino.data[off:off + len(data)] = data
                    fino.mtime = None
                elif sub == "read":
                    got = os.pread(fd, len(fino.data) + 10, 0)
                    check_content(got, fino, f"fd read of {sorted(fino.names)}")
                elif sub == "fstat":
                    check_stat(os.fstat(fd), fino, f"fstat of {sorted(fino.names)}")
                elif sub == "ftruncate":
                    n = rng.randint(0, len(fino.data) + 100)
                    os.ftruncate(fd, n)
                    fino.data = (fino.data + bytearray(max(0, n - len(fino.data))))[:n]
                    fino.mtime = None
                elif sub == "fchmod":
                    m = rng.choice(MODES)
                    os.fchmod(fd, m)
                    fino.mode = m
                elif sub == "fchown":
                    u = rng.choice(UIDS)
                    os.fchown(fd, u, u)
                    fino.uid = fino.gid = u
                elif sub == "futime":
                    t = rng.randint(10**18, 2 * 10**18)
                    os.utime(fd, ns=(t, t))
                    fino.mtime = t
                else:
                    os.fsync(fd)
                continue
            if op == "close":
                if fds:
                    fd, _ = fds.pop(rng.randrange(len(fds)))
                    os.close(fd)
                continue
            if op == "dirrename":
                if os.environ.get("NODIRRENAME"):
                    continue
                new = f"d{k}x" if dirname == f"d{k}" else f"d{k}"
                os.rename(root / dirname, root / new)
                dirname = new
                continue
            if op == "create":
                if ino is not None:
                    continue
                m = rng.choice(MODES)
                fd = os.open(path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, m)
                os.fchmod(fd, m)
                ino = Inode(b"", m)
                ino.names.add(key)
                files[key] = ino
                if len(fds) < 6:
                    fds.append((fd, ino))
                else:
                    os.close(fd)
                continue
            if ino is None:
                if op in ("link", "rename"):
                    pass
                else:
                    try:
                        os.lstat(path(name))
                    except FileNotFoundError:
                        continue
                    raise Failure(f"{name} exists but model says no")
            if op == "open":
                if len(fds) >= 6:
                    continue
                fd = os.open(path(name), os.O_RDWR)
                fds.append((fd, ino))
            elif op == "write":
                off = rng.randint(0, len(ino.data) + 100)
                data = os.urandom(rng.choice([1, 100, 5000, 70000]))
                fd = os.open(path(name), os.O_WRONLY)
                try:
                    os.pwrite(fd, data, off)
                finally:
                    os.close(fd)
                if off > len(ino.data):
                    ino.data.extend(b"\0" * (off - len(ino.data)))
                ino.data[off:off + len(data)] = data
                ino.mtime = None
            elif op == "append":
                data = os.urandom(rng.choice([1, 100, 5000]))
                with open(path(name), "ab") as f:
                    f.write(data)
                ino.data.extend(data)
                ino.mtime = None
            elif op == "truncate":
                n = rng.randint(0, len(ino.data) + 100)
                os.truncate(path(name), n)
                ino.data = (ino.data + bytearray(max(0, n - len(ino.data))))[:n]
                ino.mtime = None
            elif op == "chmod":
                m = rng.choice(MODES)
                os.chmod(path(name), m)
                ino.mode = m
            elif op == "chown":
                u = rng.choice(UIDS)
                os.chown(path(name), u, u)
                ino.uid = ino.gid = u
            elif op == "utime":
                t = rng.randint(10**18, 2 * 10**18)
                os.utime(path(name), ns=(t, t))
                ino.mtime = t
            elif op == "read":
                check_content(path(name).read_bytes(), ino, f"read {name}")
            elif op == "stat":
                check_stat(os.lstat(path(name)), ino, f"stat {name}")
            elif op == "fsync":
                fd = os.open(path(name), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            elif op in ("rename", "link"):
                src = rng.choice([n for n in names if mname(n) in files] or [None])
                if src is None or mname(src) == key:
                    continue
                sino = files[mname(src)]
                log[-1] = (op, mname(src), key)
                if op == "link":
                    if ino is not None:
                        continue
                    os.link(path(src), path(name))
                    sino.names.add(key)
                    files[key] = sino
                else:
                    if ino is sino:
                        os.rename(path(src), path(name))  # same inode: no-op
                        continue
                    os.rename(path(src), path(name))
                    if ino is not None:
                        ino.names.discard(key)
                    sino.names.discard(mname(src))
                    del files[mname(src)]
                    sino.names.add(key)
                    files[key] = sino
            elif op == "unlink":
                os.unlink(path(name))
                ino.names.discard(key)
                del files[key]
        # final: everything by name and by fd
        for fd, fino in fds:
            check_content(os.pread(fd, len(fino.data) + 10, 0), fino, f"final fd read {sorted(fino.names)}")
            check_stat(os.fstat(fd), fino, f"fstat final {sorted(fino.names)}")
            os.close(fd)
        for key, ino in files.items():
            p = path(key.replace(f"d{k}/", "@/", 1) if key.startswith(f"d{k}/") else key)
            check_content(p.read_bytes(), ino, f"final read {key}")
            check_stat(os.lstat(p), ino, f"final stat {key}")
            fd = os.open(p, os.O_RDONLY)
            check_stat(os.fstat(fd), ino, f"fstat final open {key}")
            os.close(fd)
        # report the final model (in d{k} naming: rename dir back)
        if dirname != f"d{k}":
            os.rename(root / dirname, root / f"d{k}")
        out = {key: (bytes(i.data), i.mode, i.uid, i.mtime, len(i.names)) for key, i in files.items()}
        q.put((k, "ok", out))
    except BaseException as e:  # noqa
        q.put((k, "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}\nlast ops: {log[-12:]}"))
        with open(Path(root).parent.parent / f"oplog-{k}.txt", "w") as f:
            f.write("\n".join(map(repr, log)))


def lister(root: str, stop, q, idx):
    n = 0
    try:
        while not stop.is_set():
            for dirpath, dirnames, filenames in os.walk(root):
                for e in list(dirnames) + filenames:
                    try:
                        st = os.lstat(os.path.join(dirpath, e))
                    except FileNotFoundError:
                        continue
                    if e.startswith(".wh.") or e.startswith("#"):
                        raise Failure(f"internal name listed {dirpath}/{e}")
                try:
                    with os.scandir(dirpath) as it:
                        for de in it:
                            try:
                                de.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                pass
                except FileNotFoundError:
                    pass
                n += 1
        q.put((f"lister{idx}", "ok", n))
    except BaseException as e:  # noqa
        q.put((f"lister{idx}", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def reader(root: str, stop, q, seed):
    rng = random.Random(seed)
    n = 0
    try:
        while not stop.is_set():
            for dirpath, dirnames, filenames in os.walk(root):
                for f in filenames:
                    if rng.random() < 0.3:
                        try:
                            with open(os.path.join(dirpath, f), "rb") as fh:
                                fh.read()
                                os.fstat(fh.fileno())
                        except FileNotFoundError:
                            pass
                        n += 1
        q.put(("reader", "ok", n))
    except BaseException as e:  # noqa
        q.put(("reader", "fail", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def snapshot_model(models_out):
    snap = {}
    for k, files in models_out.items():
        for key, v in files.items():
            snap[key] = v
    return snap


def main():
    base = Path(sys.argv[1])
    options = sys.argv[2]
    seed = int(sys.argv[3])
    nops = int(sys.argv[4]) if len(sys.argv) > 4 else 400
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    rng = random.Random(seed)
    lower, lower2, upper, work, models = build(base, workers, rng)
    opts = f"lowerdir={lower2}:{lower},upperdir={upper},workdir={work}"
    if options:
        opts += "," + options
    mnt = base / "mnt"
    problems = []
    m = helpers.Mount(mnt, opts, log_dir=base)
    m.start()
    results = {}
    try:
        q = mp.Queue()
        stop = mp.Event()
        only = os.environ.get("ONLY")
        ks = [int(x) for x in only.split(",")] if only else range(workers)
        procs = [mp.Process(target=writer, args=(k, str(mnt), models[k], seed * 100 + k, nops, q))
                 for k in ks]
        aux = [] if os.environ.get("NOAUX") else [mp.Process(target=lister, args=(str(mnt), stop, q, 0)),
               mp.Process(target=reader, args=(str(mnt), stop, q, seed))]
        for p in procs + aux:
            p.start()
        for _ in procs:
            k, status, out = q.get(timeout=600)
            results[k] = (status, out)
        stop.set()
        for _ in aux:
            k, status, out = q.get(timeout=120)
            results[k] = (status, out)
        for p in procs + aux:
            p.join(30)
        for k, (status, out) in results.items():
            if status != "ok":
                problems.append(f"{k}: {out}")
        try:
            merged_before = helpers.tree_snapshot(mnt, xattrs=False, times=True)
        except FileNotFoundError as e:
            problems.append(f"snapshot: {e}")
            root_list = sorted(os.listdir(mnt))
            problems.append(f"root listing now: {root_list}")
            time.sleep(2)
            problems.append(f"root listing 2s later: {sorted(os.listdir(mnt))}")
            merged_before = helpers.tree_snapshot(mnt, xattrs=False, times=True, ignore_vanished=True)
        # model vs merged view (for writers that finished ok)
        for k in range(workers):
            st_, out = results.get(k, ("fail", None))
            if st_ != "ok":
                continue
            for key, (data, mode, uid, mtime, nlink) in out.items():
                e = merged_before.get(key)
                if e is None:
                    problems.append(f"model file {key} missing in merged view")
        # no stray owned names
        for key in merged_before:
            base_name = key.rsplit("/", 1)[-1]
            if base_name.startswith("w") and len(base_name) >= 4:
                k = int(base_name[1])
                st_, out = results.get(k, ("fail", None))
                if st_ == "ok" and key not in out:
                    problems.append(f"merged view has {key}, model does not")
    finally:
        p2 = m.unmount(check=False)
        problems += p2
    # workdir empty (work/work), index entries allowed
    for sub in work.iterdir():
        if sub.name == "work":
            left = list(sub.iterdir())
            if left:
                problems.append(f"workdir not empty: {left[:5]}")
        elif sub.name != "index":
            problems.append(f"unexpected in workdir: {sub}")
    # kernel overlay on the same layers (read-only: the upper as a lower on top)
    kopts = ["metacopy=on", "redirect_dir=on"] if "metacopy=on" in options else (
        ["redirect_dir=on"] if "redirect_dir=off" not in options else ["redirect_dir=follow"])
    kmnt = base / "kmnt"
    try:
        with helpers.kernel_overlay(kmnt, [upper, lower2, lower], None, None, kopts) as km:
            ksnap = helpers.tree_snapshot(km, xattrs=False, times=True, ignore_vanished=True)
    except AssertionError as e:
        problems.append(f"kernel mount: {e}")
        ksnap = None
    if ksnap is not None and ksnap != merged_before:
        problems.append("kernel view differs from overlaypc's:\n" +
                        helpers.diff_snapshots(ksnap, merged_before, ("kernel", "overlaypc"))[:4000])
    if ksnap is not None:  # the model against the kernel's view of the layers
        for k in range(workers):
            st_, out = results.get(k, ("fail", None))
            if st_ != "ok":
                continue
            for key, (data, mode, uid, mtime, nlink) in out.items():
                e = ksnap.get(key)
                if e is None:
                    problems.append(f"kernel: {key} missing")
                    continue
                import hashlib
                want = data if len(data) <= 4096 else "sha256:" + hashlib.sha256(data).hexdigest()
                if (e.content, e.mode, e.uid, e.gid) != (want, mode, uid, uid):
                    problems.append(f"kernel: {key}: {(e.mode, e.uid, e.gid, e.size)} vs model "
                                    f"{(mode, uid, uid, len(data))}, content same: {e.content == want}")
                if mtime is not None and e.mtime_ns != mtime:
                    problems.append(f"kernel: {key}: mtime {e.mtime_ns} vs model {mtime}")
    print(f"options={options!r} seed={seed}: {len(problems)} problems; results "
          + ", ".join(f"{k}:{v[0]}" for k, v in results.items()))
    for p in problems:
        print("PROBLEM:", p[:6000])
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
