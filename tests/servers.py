"""Real servers for tests on free ports: moto's S3 and an MLflow tracking server on 127.0.0.1, a Ray cluster.

Each is a child process started in its own session and stopped, with everything it spawned, by process id
(never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psutil
except ModuleNotFoundError:  # the venv's psutil may be the one Ray ships (ray/thirdparty_files), on sys.path after ray
    import ray  # noqa: F401

    psutil = importlib.import_module("psutil")

BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A port free now and never handed out before in this process: the kernel may give a port just released
    to the next ``bind(0)``, and two components of one server on one port fail to start (CI, 63c3e1e)."""
    with _handed_out_lock:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.args[:3]} not listening on port {port} after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, timeout: float = 5) -> None:
    """Terminate a process started here and every process it spawned (by pid; SIGKILL what lingers)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def _serve(command: list[str], port: int, log: Path, env: dict[str, str] | None = None, timeout: float = 60):
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
    try:
        _wait_for_port(port, proc, log, timeout)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def moto_s3(tmp: Path, bucket: str) -> Iterator[str]:
    """moto's S3 server with ``bucket`` created; yields its endpoint URL (credentials: `S3_ENV`)."""
    import boto3

    port = free_port()
    with _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, tmp / "moto.log"):
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_REGION"],
        )
        client.create_bucket(Bucket=bucket)
        yield endpoint


@contextlib.contextmanager
def mlflow_server(tmp: Path, port: int | None = None) -> Iterator[str]:
    """``mlflow server`` with a SQLite store and a local artifact folder in ``tmp``; yields its http:// URI.

    Started again with the same ``tmp`` and ``port``, it serves the same runs (a server restarted after an outage).
    """
    port = port or free_port()
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "art")]
    from orchestrator.tracking import mlflow_server_env  # as `orchestrator ui` starts it: no job runner

    with _serve(command, port, tmp / "mlflow-server.log", env=mlflow_server_env(), timeout=120):
        yield f"http://127.0.0.1:{port}"


@dataclass
class RayCluster:
    """A head and worker nodes started with ``ray start --block``; `env` lets a process join it (token auth)."""

    address: str
    env: dict[str, str]
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)  # custom resource name -> ray start process
    temp_dirs: list[Path] = field(default_factory=list)

    def node_of(self, pid: int) -> str | None:
        """The node (its custom resource name) whose ``ray start`` process spawned process ``pid``."""
        for name, proc in self.nodes.items():
            with contextlib.suppress(psutil.Error):
                if pid in {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}:
                    return name
        return None

    def processes(self, title: str) -> list[psutil.Process]:
        """This cluster's processes whose command line contains ``title`` (e.g. ray::RayTrainWorker)."""
        found = []
        for proc in self.nodes.values():
            with contextlib.suppress(psutil.Error):
                for p in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if title in " ".join(p.cmdline()):
                            found.append(p)
        return found


def _ray_start(cluster: RayCluster, args: list[str], name: str, tmp: Path, cpus: int = 1) -> None:
    """One node: ``cpus`` CPUs, a custom resource ``name``, its own temp dir and random ports (nodes share a host)."""
    temp_dir = Path(f"/tmp/ray-{name}-{secrets.token_hex(3)}")  # short: Unix socket paths are limited to 107 bytes
    cluster.temp_dirs.append(temp_dir)
    command = [str(BIN / "ray"), "start", "--block", *args, "--num-cpus", str(cpus), "--num-gpus", "0"]
    command += ["--resources", json.dumps({name: 1}), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    command += ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
    with (tmp / f"ray-{name}.log").open("w") as out:
        cluster.nodes[name] = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **cluster.env}, start_new_session=True
        )


def _wait_for_node(cluster: RayCluster, name: str, tmp: Path, timeout: float = 90) -> None:
    log, proc = tmp / f"ray-{name}.log", cluster.nodes[name]
    deadline = time.monotonic() + timeout
    while "Ray runtime started." not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Ray node {name} did not start (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def ray_cluster(tmp: Path, workers: int = 1, head_cpus: int = 1) -> Iterator[RayCluster]:
    """A head node (resource ``head``, ``head_cpus`` CPUs) and ``workers`` joined nodes (``node1``...) of 1 CPU,
    token auth."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    cluster = RayCluster(address, env)
    try:
        # a port of its own for the dashboard it does not start: `ray start` still refuses a taken 8265 (another test's
        # local Ray, in the other test process)
        head = ["--head", "--port", str(port), "--include-dashboard", "false", "--dashboard-port", str(free_port())]
        _ray_start(cluster, [*head, "--ray-client-server-port", str(free_port())], "head", tmp, head_cpus)
        _wait_for_port(port, cluster.nodes["head"], tmp / "ray-head.log", 60)
        for i in range(1, workers + 1):
            _ray_start(cluster, ["--address", address], f"node{i}", tmp)
        for name in cluster.nodes:
            _wait_for_node(cluster, name, tmp)
        yield cluster
    finally:
        for proc in reversed(cluster.nodes.values()):
            stop(proc)
        for temp_dir in cluster.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def enter_concurrently(stack: contextlib.ExitStack, *managers: contextlib.AbstractContextManager) -> list:
    """Enter context managers on ``stack`` in parallel threads (servers start together); returns their values."""
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(stack.enter_context, m) for m in managers]
    return [f.result() for f in futures]


# --------------------------------------------------------------------------- the CLI in the background


class Cli:
    """``python -m orchestrator ...`` in the background; stdout and stderr go to a file the test polls."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.log = cwd / f"cli-{time.monotonic_ns()}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", *args],
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the CLI output (rc {self.proc.poll()}):\n{self.output()[-5000:]}")

    def finish(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the CLI did not finish in {timeout}s:\n{self.output()[-5000:]}") from None

    def kill_tree(self) -> None:
        """Kill the CLI and every process it started (a local Ray cluster included)."""
        with _suppress_gone():
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
            for p in procs:
                with _suppress_gone():
                    p.kill()
        self.proc.wait(30)


class _suppress_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, psutil.NoSuchProcess)
