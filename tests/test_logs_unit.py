"""``overlaypc.logs``: a mount's start imports no ``logging`` (nor ``re``, ``traceback``),
and every record still reaches the handlers the command line chose, formatted as before.

Most checks run in a fresh interpreter: pytest has ``logging`` loaded already, which is the
other case (the loggers then forward at once), checked in-process."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from overlaypc import logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=REPO))


def test_mount_start_imports_no_logging():
    """The mount's modules imported and its logging set up (foreground: stderr), with the
    records a start checks for (debug off): ``logging`` is not loaded, nor what it brings,
    nor ``signal``'s enums (engine.daemon takes CPython's ``_signal``), nor ``weakref``
    (fdbudget takes its ``WeakSet`` from ``_weakrefset``)."""
    out = _python(
        "import sys, overlaypc.cli as cli, overlaypc.core, overlaypc.engine.channel, "
        "overlaypc.engine.daemon, overlaypc.mounting, overlaypc.overlay_ops, overlaypc.engine.session\n"
        "from overlaypc.config import MountConfig\n"
        "cli._setup_logging(MountConfig(foreground=True))\n"
        "log = overlaypc.engine.session.log\n"
        "assert not log.isEnabledFor(10) and log.isEnabledFor(20)\n"
        "log.debug('not emitted')\n"
        "print(' '.join(m for m in ('logging', 're', 'traceback', 'enum', 'weakref') if m in sys.modules))").stdout
    assert out.strip() == ""


def test_records_reach_the_configured_handlers_as_before(tmp_path):
    """Foreground with a log file: the first record loads ``logging`` and sets up both
    handlers; lines read ``<asctime> LEVEL name: message``, DEBUG is left out at INFO, and
    ``exception`` writes the traceback being handled."""
    logfile = tmp_path / "daemon.log"
    res = _python(
        "from overlaypc import cli, logs\n"
        "from overlaypc.config import MountConfig\n"
        f"cli._setup_logging(MountConfig(foreground=True, logfile={str(logfile)!r}))\n"
        "log = logs.get('overlaypc.fuse')\n"
        "log.debug('hidden %d', 1)\n"
        "log.info('mounted %s', '/m')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    logs.get('overlaypc.engine').exception('%s failed', 'GETATTR')\n"
        "log.debug('hidden %d', 2)\n")
    for text in (res.stderr, logfile.read_text()):
        assert re.match(rf"{STAMP} INFO overlaypc\.fuse: mounted /m\n"
                        rf"{STAMP} ERROR overlaypc\.engine: GETATTR failed\n"
                        r"Traceback \(most recent call last\):\n(.|\n)*ZeroDivisionError", text), text
        assert "hidden" not in text


def test_without_set_up_warnings_reach_stderr_as_logging_prints_them():
    """No ``configure``: ``logging``'s defaults (WARNING and above, the bare message)."""
    res = _python("from overlaypc import logs\n"
                  "log = logs.get('overlaypc.x')\n"
                  "log.info('not shown')\n"
                  "log.warning('careful: %d', 3)\n")
    assert res.stderr == "careful: 3\n"


def test_set_up_runs_once_before_any_thread_emits():
    """Threads emitting their first records at once: the set-up runs once, and no record
    is handled before it has finished (none reaches ``logging``'s fallback on stderr)."""
    res = _python(
        "import threading, time\n"
        "from overlaypc import logs\n"
        "seen, calls = [], []\n"
        "def setup(logging):\n"
        "    calls.append(1)\n"
        "    time.sleep(0.05)  # the others arrive meanwhile\n"
        "    class Keep(logging.Handler):\n"
        "        def emit(self, record):\n"
        "            seen.append(record.getMessage())\n"
        "    logging.getLogger().addHandler(Keep())\n"
        "    logging.getLogger().setLevel(logging.INFO)\n"
        "logs.configure(logs.INFO, setup)\n"
        "go = threading.Barrier(8)\n"
        "def emit(i):\n"
        "    go.wait()\n"
        "    logs.get(f'overlaypc.t{i % 2}').warning('record %d', i)\n"
        "ts = [threading.Thread(target=emit, args=(i,)) for i in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(len(calls), sorted(seen))\n")
    assert res.stdout.strip() == "1 " + str(sorted(f"record {i}" for i in range(8)))
    assert res.stderr == ""


def test_with_logging_loaded_records_follow_its_levels(caplog):
    """In-process (pytest loaded ``logging``): the loggers are ``logging``'s, levels and
    handlers included."""
    log = logs.get("overlaypc.test_logs")
    with caplog.at_level(logging.WARNING, logger="overlaypc.test_logs"):
        log.info("quiet")
        assert not log.isEnabledFor(logs.INFO)
        log.warning("loud %s", "here")
    with caplog.at_level(logging.DEBUG, logger="overlaypc.test_logs"):
        assert log.isEnabledFor(logs.DEBUG)
        log.debug("detail")
    assert [r.getMessage() for r in caplog.records] == ["loud here", "detail"]
    assert all(r.name == "overlaypc.test_logs" for r in caplog.records)
    assert caplog.records[0].funcName == "test_with_logging_loaded_records_follow_its_levels"


def test_a_daemonized_mount_logs_to_syslog_from_its_first_record(tmp_path):
    """No logfile=, not in the foreground, /dev/log there: the syslog handler (made at the
    first record) sends ``overlaypc[PID]: LEVEL name: message``. /dev/log is stood in
    for by a socket of our own (the connect is redirected in the child)."""
    sock = tmp_path / "log"
    res = _python(
        "import os, socket\n"
        "from overlaypc import cli, logs\n"
        "from overlaypc.config import MountConfig\n"
        f"sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); sink.bind({str(sock)!r})\n"
        "real_exists, real_connect = os.path.exists, socket.socket.connect\n"
        "os.path.exists = lambda p: p == '/dev/log' or real_exists(p)\n"
        f"socket.socket.connect = lambda s, a: real_connect(s, {str(sock)!r} if a == '/dev/log' else a)\n"
        "cli._setup_logging(MountConfig(foreground=False))\n"
        "logs.get('overlaypc.fuse').debug('hidden')\n"
        "logs.get('overlaypc.fuse').info('mounted %s', '/m')\n"
        "print(os.getpid(), sink.recv(4096))\n")
    pid, got = res.stdout.split(" ", 1)
    assert got.strip() == repr(f"<14>overlaypc[{pid}]: INFO overlaypc.fuse: mounted /m\x00".encode())
    assert res.stderr == ""
