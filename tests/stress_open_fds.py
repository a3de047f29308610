"""Manual tool (not collected by pytest): 900 files open through a real overlaypc mount,
the client and the daemon under ``ulimit -n 1024``, while another process renames their
directories and renames files over them (copy-ups), with a walk now and then.

Written in hunt7: found that a handle kept each fd a copy-up replaced until its release
(EMFILE; see test_limits.test_150_open_files_renamed_under_them_at_256_fds). Run as root:
  python tests/stress_open_fds.py /tmp/scratch/fds "redirect_dir=on" 1
Usage: stress_open_fds.py BASE OPTIONS SEED (BASE is deleted first). The client reads,
fstats and (30% of the files, opened O_RDWR) writes every fd in rounds and checks each
against its own model; prints the daemon's fd peak by kind and any error in its log.
"""
import errno
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers  # noqa: E402

NDIR, NFILE = 30, 30

def client(mnt, seed, q, go, stop):
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    rng = random.Random(seed)
    fds = []
    try:
        for i in range(NDIR):
            for j in range(NFILE):
                rw = rng.random() < 0.3
                fd = os.open(f"{mnt}/d{i:02d}/f{j:02d}", os.O_RDWR if rw else os.O_RDONLY)
                fds.append([fd, rw, bytearray(b"%02d/%02d:" % (i, j) + b"x" * (j * 37))])
        q.put(("opened", len(fds)))
        go.set()
        n = 0
        while not stop.is_set() or n < 3:
            for rec in fds:
                fd, rw, data = rec
                if rw and rng.random() < 0.2:
                    off = rng.randint(6, len(data) + 10)
                    chunk = os.urandom(rng.choice([1, 50, 5000]))
                    os.pwrite(fd, chunk, off)
                    if off > len(data):
                        data.extend(b"\0" * (off - len(data)))
                    data[off:off + len(chunk)] = chunk
                got = os.pread(fd, len(data) + 10, 0)
                if got != bytes(data):
                    raise AssertionError(f"fd {fd} ({bytes(data[:6])!r}): read {len(got)} bytes {got[:6]!r}, want {len(data)}")
                st = os.fstat(fd)
                if st.st_size != len(data):
                    raise AssertionError(f"fd {fd} ({bytes(data[:6])!r}): fstat size {st.st_size} want {len(data)}")
            n += 1
        for fd, _, _ in fds:
            os.close(fd)
        q.put(("client", f"ok {n} rounds"))
    except BaseException as e:
        q.put(("client", f"FAIL {type(e).__name__}: {e}\n{traceback.format_exc()}"))
        go.set()

def renamer(mnt, seed, q, go, stop, rounds):
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    rng = random.Random(seed + 1)
    go.wait(120)
    moved = {}
    nd = nf = 0
    try:
        for _ in range(rounds):
            i = rng.randrange(NDIR)
            cur = moved.get(i, f"d{i:02d}")
            if rng.random() < 0.5:
                new = f"d{i:02d}" if cur != f"d{i:02d}" else f"d{i:02d}x"
                try:
                    os.rename(f"{mnt}/{cur}", f"{mnt}/{new}")
                    moved[i] = new
                    nd += 1
                except OSError as e:
                    if e.errno != errno.EXDEV: raise
            else:  # a file renamed over another (the other's fd stays open), or to a new name
                names = os.listdir(f"{mnt}/{cur}")
                a, b = rng.choice(names), rng.choice(names + ["new%d" % rng.randrange(1000)])
                if a != b:
                    os.rename(f"{mnt}/{cur}/{a}", f"{mnt}/{cur}/{b}")
                    nf += 1
            if rng.random() < 0.1:
                for dp, ds, fs in os.walk(mnt):
                    for f in fs:
                        try:
                            os.lstat(os.path.join(dp, f))
                        except FileNotFoundError:
                            pass
        stop.set()
        q.put(("renamer", f"ok {nd} dir renames, {nf} file renames"))
    except BaseException as e:
        stop.set()
        q.put(("renamer", f"FAIL {type(e).__name__}: {e}\n{traceback.format_exc()}"))

def main():
    base, options, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    shutil.rmtree(base, ignore_errors=True)
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    for i in range(NDIR):
        (lower / f"d{i:02d}").mkdir()
        for j in range(NFILE):
            (lower / f"d{i:02d}" / f"f{j:02d}").write_bytes(b"%02d/%02d:" % (i, j) + b"x" * (j * 37))
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}" + ("," + options if options else "")
    m = helpers.Mount(base / "mnt", opts, log_dir=base, nofile=1024)
    m.start()
    problems = []
    try:
        q, go, stop = mp.Queue(), mp.Event(), mp.Event()
        ps = [mp.Process(target=client, args=(str(m.path), seed, q, go, stop)),
              mp.Process(target=renamer, args=(str(m.path), seed, q, go, stop, 3000))]
        for p in ps:
            p.start()
        dpid = m.proc.pid if getattr(m, "proc", None) else None
        peak = [0, None]
        def sample():
            while not stop.is_set():
                try:
                    fds = os.listdir(f"/proc/{dpid}/fd")
                except OSError:
                    return
                if len(fds) > peak[0]:
                    kinds = {}
                    for f in fds:
                        try:
                            t = os.readlink(f"/proc/{dpid}/fd/{f}")
                        except OSError:
                            continue
                        k = next((w for w in ("lower", "upper", "work") if f"/{w}" in t), t[:20])
                        kinds[k] = kinds.get(k, 0) + 1
                    peak[:] = [len(fds), kinds]
                time.sleep(0.05)
        threading.Thread(target=sample, daemon=True).start()
        out = [q.get(timeout=600) for _ in range(3)]
        print("daemon fd peak", peak)
        for p in ps:
            p.join(60)
        for who, what in out:
            what = str(what)
            print(who, what[:3000])
            if "FAIL" in what:
                problems.append(who)
    finally:
        problems += m.unmount(check=False)
    log = (base / "mnt.overlaypc.log").read_text() if (base / "mnt.overlaypc.log").exists() else ""
    bad = [x for x in log.splitlines() if "ERROR" in x or "Traceback" in x or "EMFILE" in x]
    print(f"options={options!r} seed={seed}: problems {problems} daemon log errors {len(bad)}")
    for line in bad[:10]:
        print("  ", line)
    return 1 if problems or bad else 0

if __name__ == "__main__":
    sys.exit(main())
