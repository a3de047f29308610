"""Manual tool (not collected by pytest): one client holds NOPEN lower files open through a
real overlaypc mount whose daemon runs under ``ulimit -n NOFILE`` (1024), while another holds
360 directories open (and 40 half-read listings) and lists them, and a third does copy-ups
(chmod, write, truncate, mmap), renames, hard links and mkdir, checking data against its
model. Afterwards the merged view and the kernel overlay mounted read-only on the layers
are compared with the model.

Written in hunt8a: at NOPEN 1150 every other client's request failed with EMFILE (see
test_limits.test_files_held_to_the_limit_leave_other_requests_their_fds). Now the holder's
opens past the daemon's open-file bound get ENFILE (so do the mutator's opens then, counted
as expected), and nothing else fails. Run as root from the checkout:
  python tests/stress_held_fds.py /tmp/scratch/held "cache=shared,metacopy=on,index=on" 1150
Usage: stress_held_fds.py BASE OPTIONS NOPEN [NOFILE] (BASE is deleted first).
"""
import errno, mmap, multiprocessing as mp, os, random, resource, shutil, subprocess, sys, traceback
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import helpers

ND, NF = 40, 30   # 1200 lower files

def raise_nofile():
    """The clients' own soft RLIMIT_NOFILE up to 8192 as the hard limit allows (soak19: under
    ``ulimit -n 1024``, which sets the hard limit too, setrlimit to 8192 raised ValueError
    in the holders, before their try, and main waited 900 s for their answers)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

def content(i, j):
    return (b"%02d/%02d:" % (i, j)) * (1 + j * 7)

def holder(mnt, nopen, q, go, stop):
    raise_nofile()
    fds, errs = [], {}
    try:
        k = 0
        for i in range(ND):
            for j in range(NF):
                if k >= nopen:
                    break
                k += 1
                try:
                    fd = os.open(f"{mnt}/d{i:02d}/f{j:02d}", os.O_RDONLY)
                except OSError as e:
                    errs[e.errno] = errs.get(e.errno, 0) + 1
                    continue
                fds.append((fd, i, j))
        q.put(("holder", f"opened {len(fds)} errors {errs}"))
        go.set()
        rounds = 0
        bad = []
        while not stop.is_set() or rounds < 2:
            for fd, i, j in fds:
                try:
                    got = os.pread(fd, 1 << 16, 0)
                except OSError as e:
                    bad.append(f"pread d{i}/f{j}: {e}")
                    continue
                if i >= 20 or j >= 10:  # untouched by the mutator (it changes d<20/f<10)
                    if got != content(i, j):
                        bad.append(f"data d{i}/f{j}: {got[:20]!r} len {len(got)}")
            rounds += 1
            if bad:
                break
        for fd, _, _ in fds:
            os.close(fd)
        q.put(("holder", f"{'FAIL' if bad else 'ok'} {rounds} rounds {bad[:5]}"))
    except BaseException as e:
        go.set()
        q.put(("holder", f"FAIL {e!r}\n{traceback.format_exc()}"))

def dirholder(mnt, q, go, stop):
    raise_nofile()
    go.wait(300)
    fds, errs = [], {}
    try:
        for i in range(ND):
            for sub in ["", *(f"/s{k}" for k in range(8))]:
                try:
                    fds.append(os.open(f"{mnt}/d{i:02d}{sub}", os.O_RDONLY | os.O_DIRECTORY))
                except OSError as e:
                    errs[e.errno] = errs.get(e.errno, 0) + 1
        its = []
        for i in range(ND):
            try:
                it = os.scandir(f"{mnt}/d{i:02d}")
                next(it)
                its.append(it)
            except OSError as e:
                errs[e.errno] = errs.get(e.errno, 0) + 1
        n = 0
        while not stop.is_set():
            for fd in fds[:50]:
                try:
                    os.listdir(fd)
                except OSError as e:
                    errs[e.errno] = errs.get(e.errno, 0) + 1
            n += 1
        rest = {}
        for it in its:
            for e in it:
                rest[e.name] = 1
            it.close()
        for fd in fds:
            os.close(fd)
        q.put(("dirholder", f"{'FAIL' if errs else 'ok'} {len(fds)} dirs {n} rounds errors {errs}"))
    except BaseException as e:
        q.put(("dirholder", f"FAIL {e!r}\n{traceback.format_exc()}"))

def mutator(mnt, seed, q, go, stop, rounds):
    rng = random.Random(seed)
    go.wait(300)
    errs, errs_ok = {}, {}
    model = {}
    def err(what, e):
        errs.setdefault(f"{what}:{errno.errorcode.get(e.errno, e.errno)}", 0)
        errs[f"{what}:{errno.errorcode.get(e.errno, e.errno)}"] += 1
    try:
        for r in range(rounds):
            i, j = rng.randrange(20), rng.randrange(10)
            p = f"{mnt}/d{i:02d}/f{j:02d}"
            op = rng.choice(["chmod", "write", "trunc", "rename", "link", "mmap", "ls", "mkdir"])
            try:
                cur = model.get((i, j), content(i, j))
                if op == "chmod":
                    os.chmod(p, rng.choice([0o600, 0o644, 0o640]))
                elif op == "write":
                    fd = os.open(p, os.O_WRONLY)
                    try:
                        off = rng.randrange(len(cur) + 1)
                        data = os.urandom(rng.choice([1, 100, 3000]))
                        os.pwrite(fd, data, off)
                    finally:
                        os.close(fd)
                    b = bytearray(cur); b[off:off + len(data)] = data; model[(i, j)] = bytes(b)
                elif op == "trunc":
                    n = rng.randrange(len(cur) + 10)
                    os.truncate(p, n)
                    model[(i, j)] = (cur + b"\0" * n)[:n] if n > len(cur) else cur[:n]
                elif op == "rename":
                    os.rename(p, p + ".x"); os.rename(p + ".x", p)
                elif op == "link":
                    os.link(p, p + f".l{r}")
                    if rng.random() < 0.5:
                        os.unlink(p + f".l{r}")
                elif op == "mmap":
                    fd = os.open(p, os.O_RDWR)
                    try:
                        if len(cur):
                            m = mmap.mmap(fd, len(cur))
                            m[0:1] = b"M"; m.flush(); m.close()
                            model[(i, j)] = b"M" + cur[1:]
                    finally:
                        os.close(fd)
                elif op == "ls":
                    os.listdir(f"{mnt}/d{i:02d}")
                elif op == "mkdir":
                    os.makedirs(f"{mnt}/d{i:02d}/new{r % 5}", exist_ok=True)
                try:
                    with open(p, "rb") as f:
                        got = f.read()
                except OSError as e:
                    if e.errno != errno.ENFILE:
                        raise
                    errs_ok["verify:ENFILE"] = errs_ok.get("verify:ENFILE", 0) + 1
                    continue
                want = model.get((i, j), content(i, j))
                if got != want:
                    errs.setdefault("WRONGDATA", []).append((op, i, j, len(got), len(want)))
            except OSError as e:
                if e.errno == errno.ENFILE and op in ("write", "mmap"):
                    errs_ok[op] = errs_ok.get(op, 0) + 1
                else:
                    err(op, e)
        stop.set()
        q.put(("mutator", f"{'FAIL' if errs else 'ok'} errors {errs} expected ENFILE {errs_ok}"))
        q.put(("model", {f"d{i:02d}/f{j:02d}": v for (i, j), v in model.items()}))
    except BaseException as e:
        stop.set()
        q.put(("mutator", f"FAIL {e!r}\n{traceback.format_exc()}"))
        q.put(("model", None))

def main():
    base, options, nopen = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    nofile = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
    shutil.rmtree(base, ignore_errors=True)
    lower, upper, work = base / "lower", base / "upper", base / "work"
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    for i in range(ND):
        for k in range(8):
            (lower / f"d{i:02d}" / f"s{k}").mkdir(parents=True)
        for j in range(NF):
            (lower / f"d{i:02d}" / f"f{j:02d}").write_bytes(content(i, j))
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}" + ("," + options if options else "")
    m = helpers.Mount(base / "mnt", opts, log_dir=base, nofile=nofile)
    m.start()
    problems, model = [], None
    try:
        q, go, stop = mp.Queue(), mp.Event(), mp.Event()
        ps = [mp.Process(target=holder, args=(str(m.path), nopen, q, go, stop)),
              mp.Process(target=dirholder, args=(str(m.path), q, go, stop)),
              mp.Process(target=mutator, args=(str(m.path), 7, q, go, stop, 1500))]
        for p in ps:
            p.start()
        out = []
        while len(out) < 5:
            who, what = q.get(timeout=900)
            if who == "model":
                model = what
                out.append((who, "-"))
                continue
            print(who, str(what)[:3000], flush=True)
            out.append((who, what))
            if "FAIL" in str(what):
                problems.append(who)
        for p in ps:
            p.join(60)
        alive = helpers.pid_alive(m.proc.pid)
        print("daemon alive", alive)
        if model is not None:
            for rel, want in model.items():
                if (m.path / rel).read_bytes() != want:
                    problems.append(f"merged {rel}")
    finally:
        problems += m.unmount(check=False)
    log = m.log_text()
    bad = [x for x in log.splitlines() if "ERROR" in x or "Traceback" in x or "EMFILE" in x or "WARNING" in x]
    print(f"problems {problems}; daemon log lines {len(bad)}")
    for line in bad[:15]:
        print("  ", line[:300])
    # the kernel overlay, read-only on the layers
    kmnt = base / "kmnt"
    kmnt.mkdir()
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={upper}:{lower},metacopy=on,redirect_dir=follow", str(kmnt)],
                       capture_output=True, text=True)
    if r.returncode:
        print("kernel mount failed", r.stderr); return 1
    try:
        diffs = []
        for i in range(ND):
            for j in range(NF):
                rel = f"d{i:02d}/f{j:02d}"
                want = (model or {}).get(rel, content(i, j))
                got = (kmnt / rel).read_bytes()
                if got != want:
                    diffs.append(rel)
        print("kernel ro diffs", diffs[:10], len(diffs))
    finally:
        subprocess.run(["umount", str(kmnt)])
    return 1 if problems or diffs else 0

if __name__ == "__main__":
    sys.exit(main())
