"""``python -m orchestrator ui`` stops its MLflow server (and every process the server started) when it is stopped."""

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
from tests.servers import free_port, psutil


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


def test_sigterm_stops_the_mlflow_server_and_its_workers(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "orchestrator", "ui", "--port", str(port)]
    command += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}"]
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        cli = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180  # the server's first start migrates the SQLite store
        while not answers(port):
            assert cli.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        family = psutil.Process(cli.pid).children(recursive=True)
        server = psutil.Process(cli.pid).children()[0]
        assert os.getpgid(server.pid) == server.pid != os.getpgid(cli.pid)  # the server leads its own group
        assert len(group(server.pid)) >= 2  # the server and its uvicorn worker (and MLflow's job runners)

        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=15) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 15
        while (group(server.pid) or not port_free(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group(server.pid) == [], [p.cmdline() for p in group(server.pid)]
        assert port_free(port) and not answers(port)
    finally:
        for p in [psutil.Process(cli.pid), *family] if cli.poll() is None else family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        cli.wait(timeout=10)


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
    assert 1 <= time.monotonic() - started < 8
