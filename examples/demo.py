#!/usr/bin/env python3
"""The README's demo (``make demo``): mount the sample stack, look, write, measure, compare.

1. Resets ``.demo-state/upper`` and ``.demo-state/work`` (the writable half of
   ``layers/demo.yaml``; ``.demo-state/`` is git-ignored).
2. Mounts ``layers/demo.yaml`` (lowers hotfix, app, base, top first) at a temporary
   mountpoint with ``python -m overlaypc -f --stack layers/demo.yaml MNT``.
3. Prints the merged tree (type, mode, size, the layer each file comes from), and checks
   that the sample's deletions took effect: OCI whiteouts hide ``etc/app/legacy.conf`` and
   ``usr/share/doc/base/README``, the opaque ``var/cache/old`` shows only ``fresh.bin``.
4. Appends a line to ``etc/motd`` (a lower file): copy-up. Shows the upper afterwards.
5. Prints ``overlaypc stats MNT``, unmounts.
6. Runs ``examples/stale_read.py``: the open-foo scenario on overlaypc and its peers.

Needs root. Exit status 0 when everything above went as expected.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from stale_read import (mount_points, signals_deferred, stop_overlaypc,  # same directory
                        wait_mounted)

REPO = Path(__file__).resolve().parent.parent
STACK = REPO / "layers" / "demo.yaml"
STATE = REPO / ".demo-state"


def rule(title: str) -> None:
    print(f"\n-- {title} " + "-" * max(0, 70 - len(title)))


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def load_stack() -> tuple[list[Path], Path, Path]:
    spec = yaml.safe_load(STACK.read_text())
    here = STACK.parent
    lowers = [(here / p).resolve() for p in spec["lowers"]]
    return lowers, (here / spec["upper"]).resolve(), (here / spec["work"]).resolve()


def reset_state(upper: Path, work: Path) -> None:
    for d in (upper, work):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)


def kind(mode: int) -> str:
    return ("d" if stat.S_ISDIR(mode) else "l" if stat.S_ISLNK(mode) else
            "c" if stat.S_ISCHR(mode) else "f" if stat.S_ISREG(mode) else "?")


def origin(rel: str, layers: list[tuple[str, Path]]) -> str:
    """The topmost layer holding `rel` (what the merged view shows for a file)."""
    return next((name for name, root in layers if os.path.lexists(root / rel)), "?")


def print_tree(root: Path, layers: list[tuple[str, Path]] = (), rel: str = "") -> None:
    """Depth-first and sorted, like `find`: type, mode, size, and the layer of each file."""
    for name in sorted(os.listdir(root / rel) if rel else os.listdir(root)):
        sub = f"{rel}/{name}" if rel else name
        path = root / sub
        st = os.lstat(path)
        k = kind(st.st_mode)
        shown = sub + ("/" if k == "d" else f" -> {os.readlink(path)}" if k == "l" else "")
        size = f"{st.st_size:>5} B" if k == "f" else ""
        if k == "c":
            size = f"{os.major(st.st_rdev)}/{os.minor(st.st_rdev)}"
        src = origin(sub, layers) if layers and k != "d" else ""
        if k == "d" and not os.listdir(path):
            src = "(empty)"
        print(f"  {k} {stat.S_IMODE(st.st_mode):04o} {size:>7}  {shown:<34} {src}".rstrip())
        if k == "d":
            print_tree(root, layers, sub)


def check_deletions(mnt: Path) -> bool:
    checks = [
        ("etc/app/legacy.conf", not os.path.lexists(mnt / "etc/app/legacy.conf"),
         "absent: whited out by app (.wh.legacy.conf)"),
        ("usr/share/doc/base/README", not os.path.lexists(mnt / "usr/share/doc/base/README"),
         "absent: whited out by hotfix (.wh.README)"),
        ("var/cache/old/", sorted(os.listdir(mnt / "var/cache/old")) == ["fresh.bin"],
         "only fresh.bin: opaque in app, base's a.bin and b.bin hidden"),
        ("no .wh.* names", not any(n.startswith(".wh.") for _, ds, fs in os.walk(mnt)
                                   for n in ds + fs), "no whiteout file is visible"),
    ]
    for what, ok, note in checks:
        print(f"  {'ok ' if ok else 'BAD'} {what:<27} {note if ok else '(unexpected!)'}")
    return all(ok for _, ok, _ in checks)


def write_and_show_copy_up(mnt: Path, upper: Path, lowers: list[Path]) -> bool:
    motd = mnt / "etc/motd"
    lower_motd = next(p / "etc/motd" for p in lowers if (p / "etc/motd").exists())
    before = lower_motd.read_bytes()
    print(f"  $ echo 'hello from the upper layer' >> {motd.relative_to(mnt)}")
    with open(motd, "a") as f:
        f.write("hello from the upper layer\n")
    print("  upper layer now holds:")
    print_tree(upper)
    unchanged = lower_motd.read_bytes() == before
    copied = (upper / "etc/motd").read_bytes() == before + b"hello from the upper layer\n"
    print(f"  {'ok ' if copied else 'BAD'} upper etc/motd = lower content + the new line")
    print(f"  {'ok ' if unchanged else 'BAD'} {lower_motd.relative_to(REPO)} unchanged")
    return copied and unchanged


def demo(mnt: Path) -> bool:
    lowers, upper, work = load_stack()
    reset_state(upper, work)
    layers = [("upper", upper)] + [(p.name, p) for p in lowers]
    cmd = [sys.executable, "-m", "overlaypc", "-f", "--stack", str(STACK), str(mnt)]
    print(f"$ python -m overlaypc -f --stack {STACK.relative_to(REPO)} {mnt}")
    print(f"  lowers (top first): {', '.join(p.name for p in lowers)}; "
          f"upper: {upper.relative_to(REPO)}")
    log_path = STATE / "overlaypc.log"
    with signals_deferred(), open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=str(REPO), env=env(),
                                start_new_session=True)
    try:
        try:
            wait_mounted(mnt, proc)
        except RuntimeError as e:
            print(f"overlaypc did not mount: {e}\n{log_path.read_text(errors='replace')}",
                  file=sys.stderr)
            return False
        rule("merged tree (type, mode, size, layer it comes from)")
        print_tree(mnt, layers)
        rule("whiteouts and opaque directories")
        ok = check_deletions(mnt)
        rule("one write: copy-up")
        ok = write_and_show_copy_up(mnt, upper, lowers) and ok
        rule(f"python -m overlaypc stats {mnt}")
        r = subprocess.run([sys.executable, "-m", "overlaypc", "stats", str(mnt)],
                           capture_output=True, text=True, env=env(), cwd=str(REPO))
        print("\n".join("  " + line for line in (r.stdout + r.stderr).splitlines()))
        ok = ok and r.returncode == 0
    finally:
        with signals_deferred():
            stop_overlaypc(proc, mnt)
    print(f"\nunmounted {mnt} (daemon exit status {proc.returncode})")
    return ok and proc.returncode == 0


def main() -> int:
    if os.geteuid() != 0:
        print("demo.py: run as root (it mounts FUSE and kernel overlays)", file=sys.stderr)
        return 2
    import signal
    for sig in (signal.SIGTERM, signal.SIGHUP):      # unwind like Ctrl-C: unmount first
        signal.signal(sig, signal.default_int_handler)
    STATE.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="overlaypc-demo-"))
    mnt = tmp / "mnt"
    mnt.mkdir()
    try:
        ok = demo(mnt)
    finally:
        if str(mnt) not in mount_points():
            shutil.rmtree(tmp, ignore_errors=True)
    rule("examples/stale_read.py: the open-foo scenario, side by side")
    sys.stdout.flush()
    r = subprocess.run([sys.executable, str(REPO / "examples" / "stale_read.py")], env=env())
    return 0 if ok and r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
