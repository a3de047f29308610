#!/usr/bin/env bash
# Set up everything overlaypc needs on this machine, idempotently:
#   - Debian packages (FUSE 3, filesystem tools, peers to compare with, fio), when root;
#   - /dev/fuse (usable by every user, as Debian's udev rule makes it) and the kernel
#     modules fuse, overlay, loop, xfs (best effort);
#   - with `test`: podman, buildah and a system user for the rootless tests, with
#     subordinate uid/gid ranges;
#   - a virtualenv at .venv with overlaypc installed editable, plus the test extra
#     (and the bench extra when called as `bootstrap.sh bench`), and the package's
#     bytecode compiled (a mount's start otherwise compiles it while the caller waits).
# A second run with nothing changed does no apt and no pip work.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

EXTRAS="test"
CLIENTS=0   # podman, buildah and the rootless test user: only for the test suite
for arg in "$@"; do
    case "$arg" in
        bench) EXTRAS="test,bench" ;;
        test) CLIENTS=1 ;;
        *) echo "usage: $0 [test] [bench]" >&2; exit 2 ;;
    esac
done

APT_PACKAGES=(fuse3 libfuse3-3 xfsprogs btrfs-progs attr acl e2fsprogs util-linux python3-venv
              fuse-overlayfs unionfs-fuse fio kmod)
# tests/test_podman.py: podman and buildah with overlaypc as mount_program
# (runc: crun rejects this machine's cgroup layout; uidmap: newuidmap and
# newgidmap for rootless podman; busybox-static: the image the tests build)
if [ "$CLIENTS" = 1 ]; then
    APT_PACKAGES+=(podman buildah runc conmon uidmap busybox-static passwd)
fi
# The user tests/test_podman.py and tests/test_rootless.py run rootless podman as, and
# its subordinate ID ranges (65536 each, above the ones useradd hands out).
ROOTLESS_USER=overlaypc-rootless
ROOTLESS_SUBIDS=1000000-1065535
VENV="$ROOT/.venv"
STAMP="$VENV/.stamp"

log() { echo "bootstrap: $*"; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a noisy command quietly; show its output only if it fails.
quietly() {
    local out rc=0
    out="$(mktemp)"
    "$@" >"$out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        cat "$out" >&2
        log "failed ($rc): $*" >&2
    fi
    rm -f "$out"
    return "$rc"
}

# --- Debian packages ---------------------------------------------------------
install_apt_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        log "no dpkg-query (not Debian?): install by hand: ${APT_PACKAGES[*]}"
        return 0
    fi
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if ! is_root; then
        log "not root; missing Debian packages (continuing without them): ${missing[*]}"
        return 0
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update
    quietly apt-get install -y --no-install-recommends "${missing[@]}"
}

# --- /dev/fuse and kernel modules -------------------------------------------
ensure_dev_fuse() {
    if [ ! -e /dev/fuse ]; then
        if is_root; then
            log "creating /dev/fuse"
            mknod -m 0666 /dev/fuse c 10 229
        else
            log "/dev/fuse is missing and we are not root: FUSE mounts will fail"
        fi
        return 0
    fi
    # Debian's udev rule makes it 0666: fusermount3 (setuid) opens it for plain users,
    # but a mount program in a user namespace (rootless podman) opens it itself
    if is_root && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
        log "making /dev/fuse usable by every user (0666, as Debian's udev rule does)"
        chmod 0666 /dev/fuse
    fi
}

# --- the rootless test user ----------------------------------------------------
ensure_rootless_user() {
    is_root || return 0
    command -v useradd >/dev/null 2>&1 || { log "no useradd: rootless tests will fail"; return 0; }
    if ! getent passwd "$ROOTLESS_USER" >/dev/null; then
        log "creating system user $ROOTLESS_USER (rootless podman tests)"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin "$ROOTLESS_USER"
    fi
    if ! grep -q "^$ROOTLESS_USER:" /etc/subuid 2>/dev/null; then
        usermod --add-subuids "$ROOTLESS_SUBIDS" "$ROOTLESS_USER"
    fi
    if ! grep -q "^$ROOTLESS_USER:" /etc/subgid 2>/dev/null; then
        usermod --add-subgids "$ROOTLESS_SUBIDS" "$ROOTLESS_USER"
    fi
}

load_modules() {
    command -v modprobe >/dev/null 2>&1 || return 0
    is_root || return 0
    local mod
    for mod in fuse overlay loop xfs; do
        modprobe -q "$mod" >/dev/null 2>&1 || true
    done
}

# --- virtualenv ----------------------------------------------------------------
ensure_venv() {
    # A venv made without ensurepip has no pip: remake it.
    if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        log "removing broken virtualenv $VENV"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV"
        if ! quietly python3 -m venv "$VENV"; then
            rm -rf "$VENV"
            log "python3 -m venv failed (is python3-venv installed?)" >&2
            return 1
        fi
    fi
}

# The stamp records which extras were installed (first line) and how (second line);
# it is current when it is newer than the packaging files, covers every extra asked
# for now, and the install is the path-entry kind.
stamp_is_current() {
    [ -f "$STAMP" ] || return 1
    [ "$STAMP" -nt setup.cfg ] && [ "$STAMP" -nt pyproject.toml ] || return 1
    [ "$(sed -n 2p "$STAMP")" = "editable_mode=compat" ] || return 1
    local have extra
    have="$(head -n 1 "$STAMP")"
    for extra in ${EXTRAS//,/ }; do
        case ",$have," in *",$extra,"*) ;; *) return 1 ;; esac
    done
}

install_python_packages() {
    if stamp_is_current; then
        return 0
    fi
    log "pip install -e '.[$EXTRAS]' into $VENV"
    # editable_mode=compat: the checkout goes on sys.path through a one-line .pth file.
    # setuptools' default editable install adds an import finder that loads pathlib, re
    # and fnmatch at every interpreter start: ~7 ms more for each mount (measured).
    quietly "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        --config-settings editable_mode=compat -e ".[$EXTRAS]"
    # Write the stamp only once the package itself exists: an editable install made
    # before overlaypc/ existed maps no package and must be redone.
    if [ -f overlaypc/__init__.py ]; then
        printf '%s\neditable_mode=compat\n' "$EXTRAS" >"$STAMP"
    else
        log "warning: overlaypc/ package not found; installed dependencies only"
    fi
}

# The package's bytecode, written once here: an editable install compiles nothing, and
# where PYTHONDONTWRITEBYTECODE is set (this project's CI and sessions set it) Python never
# writes it, so every mount compiled all of overlaypc from source: 182 ms until the mount
# was visible instead of 35 (benchmarks/startup.py, clean checkout). Every run: up to date
# it only reads the headers (~40 ms); a module edited since is compiled again at each
# start until the next run (Python checks each .pyc against its source's mtime and size).
# Only a saving: where it cannot be written (a read-only tree, another user's __pycache__)
# or a module does not compile, say so and go on, as before this step existed.
compile_bytecode() {
    [ -x "$VENV/bin/python" ] && [ -f overlaypc/__init__.py ] || return 0
    quietly "$VENV/bin/python" -m compileall -q overlaypc ||
        log "warning: bytecode not written (above); a mount compiles what is missing at each start"
}

# mount(8) runs helpers (mount.fuse3 -> `sh -c overlaypc ...`) with a default PATH, so
# `mount -t fuse.overlaypc` needs the command in /usr/local/bin. Never replace a real file
# or a link that points somewhere other than a .venv.
link_mount_helper() {
    [ "$(id -u)" -eq 0 ] || return 0
    local target=/usr/local/bin/overlaypc current
    if [ -e "$target" ] || [ -L "$target" ]; then
        [ -L "$target" ] || { log "not touching $target (not a symlink)"; return 0; }
        current="$(readlink "$target")"
        case "$current" in */.venv/bin/overlaypc) ;; *) log "not touching $target -> $current"; return 0 ;; esac
    fi
    ln -sfn "$VENV/bin/overlaypc" "$target"
}

install_apt_packages
ensure_dev_fuse
if [ "$CLIENTS" = 1 ]; then ensure_rootless_user; fi
load_modules
ensure_venv
install_python_packages
compile_bytecode
link_mount_helper
log "ready ($VENV, extras: $EXTRAS)"
