"""``python -m orchestrator ui`` stops its MLflow server (and every process the server started) when it is stopped.

SIGTERM to a real ``orchestrator ui`` is tested where the studies' UI test already has one running
(tests/test_studies.py, `assert_sigterm_stops_the_server`); here, the group stop itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from orchestrator.cli import stop_process_group
from tests.servers import psutil


def group(pgid: int) -> list[psutil.Process]:
    """The live processes (zombies aside) of process group ``pgid``."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_what_ignores_sigterm_is_killed(tmp_path):
    """stop_process_group: SIGTERM, then SIGKILL after the timeout, to the whole group (a grandchild included)."""
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {stubborn!r}]); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", leader], start_new_session=True)
    deadline = time.monotonic() + 30
    while len(group(proc.pid)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # the grandchild has set its handler
    started = time.monotonic()
    stop_process_group(proc, timeout=1)
    assert group(proc.pid) == [] and proc.returncode == -signal.SIGTERM
    assert 1 <= time.monotonic() - started < 30  # killed, not left to its 60 s sleep
