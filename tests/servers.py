"""Real servers for tests on free ports: moto's S3 and an MLflow tracking server on 127.0.0.1, a Ray cluster.

Each is a child process started in its own session and stopped, with everything it spawned, by process id
(never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import fcntl
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
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psutil
except ModuleNotFoundError:  # the venv's psutil may be the one Ray ships (ray/thirdparty_files), on sys.path after ray
    import ray  # noqa: F401

    psutil = importlib.import_module("psutil")

BIN = Path(sys.executable).parent
# How long a test waits for what a quiet machine does in seconds (a trial's start, a sweep's end): a guard against a
# hang, not a measure of speed, with room for a 2-core machine that has a CPU burner on one core and the other test
# process training on the other.
PATIENCE_S = 900
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A port free now and never handed out before in this process: the kernel may give a port just released
    to the next ``bind(0)``, and two components of one server on one port fail to start."""
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
def _serve(command: list[str], port: int, log: Path, env: dict[str, str] | None = None, timeout: float = 300):
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

    with _serve(command, port, tmp / "mlflow-server.log", env=mlflow_server_env()):
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

    def node_id(self, name: str) -> str:
        """The Ray node id of node ``name`` (its custom resource), asked of the cluster by a short-lived driver."""
        code = f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); " + (
            "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **self.env}, capture_output=True, text=True, check=True
        )
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        return next(node for node, resources in nodes.items() if name in resources)

    def drain_for_preemption(self, node_id: str, deadline_s: int) -> None:
        """What a cloud's spot reclaim does through Ray: drain the node, killed ``deadline_s`` from now."""
        command = [str(BIN / "ray"), "drain-node", "--address", self.address, "--node-id", node_id]
        command += ["--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot"]
        command += ["--deadline-remaining-seconds", str(deadline_s)]
        subprocess.run(command, env={**os.environ, **self.env}, check=True, capture_output=True)

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of node ``name`` at once, as a reclaimed instance vanishes."""
        proc = self.nodes.pop(name)
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        proc.wait(10)


NODE_START_ATTEMPTS = 3
# `ray start` gives a node's raylet a fixed 30 s to register with the GCS (Ray 2.60, `raylet_start_wait_time_s` in
# ray/_private/node.py, no knob); on a busy 2-core machine a start can miss it, and the next one usually does not.
STARTS_LOCK = Path(tempfile.gettempdir()) / "gpt-orchestrator-tests-ray-start.lock"


@contextlib.contextmanager
def one_start_at_a_time() -> Iterator[None]:
    """Hold the machine-wide lock of node starts: the suite's two processes never start Ray nodes at once (a start is
    a burst of a dozen Python processes importing Ray; two bursts on 2 cores starve both GCSs)."""
    with STARTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class NodeStartError(RuntimeError):
    """A Ray node that did not start; the message says which node, how each attempt ended, and its log."""


def _ray_start(cluster: RayCluster, args: list[str], name: str, tmp: Path, cpus: int) -> Path:
    """Spawn one node: ``cpus`` CPUs, a custom resource ``name``, its own temp dir and random ports (nodes share a
    host); returns its log."""
    temp_dir = Path(f"/tmp/ray-{name}-{secrets.token_hex(3)}")  # short: Unix socket paths are limited to 107 bytes
    cluster.temp_dirs.append(temp_dir)
    command = [str(BIN / "ray"), "start", "--block", *args, "--num-cpus", str(cpus), "--num-gpus", "0"]
    command += ["--resources", json.dumps({name: 1}), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    command += ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
    log = tmp / f"{temp_dir.name}.log"  # a log per attempt and per cluster
    with log.open("w") as out:
        cluster.nodes[name] = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **cluster.env}, start_new_session=True
        )
    return log


def _wait_for_node(proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started." not in log.read_text():
        if proc.poll() is not None:
            raise NodeStartError(f"`ray start` exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise NodeStartError(f"no 'Ray runtime started.' after {timeout:.0f} s")
        time.sleep(0.2)


def _start_node(cluster: RayCluster, args: Callable[[], list[str]], name: str, tmp: Path, cpus: int) -> None:
    """Start node ``name`` (``args()``: its ``ray start`` arguments, fresh ports each attempt), retrying a start that
    fails; `NodeStartError` after `NODE_START_ATTEMPTS`, naming the node and why each attempt failed."""
    failures = []
    for attempt in range(1, NODE_START_ATTEMPTS + 1):
        with one_start_at_a_time():
            log = _ray_start(cluster, args(), name, tmp, cpus)
            try:
                _wait_for_node(cluster.nodes[name], log, timeout=120)
                return
            except NodeStartError as exc:
                stop(cluster.nodes.pop(name))
                shutil.rmtree(cluster.temp_dirs.pop(), ignore_errors=True)
                failures.append(f"attempt {attempt}: {exc} (load average {os.getloadavg()[0]:.1f})")
    raise NodeStartError(
        f"Ray node {name} of the test cluster did not start in {NODE_START_ATTEMPTS} attempts:\n"
        + "\n".join(failures)
        + f"\nlast log ({log}):\n{log.read_text()[-3000:]}"
    )


@contextlib.contextmanager
def ray_cluster(tmp: Path, workers: int = 1, head_cpus: int = 1) -> Iterator[RayCluster]:
    """A head node (resource ``head``, ``head_cpus`` CPUs) and ``workers`` joined nodes (``node1``...) of 1 CPU,
    token auth; each node started one at a time, a failed start retried."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    cluster = RayCluster("", env)

    def head() -> list[str]:
        # a port of its own for the dashboard it does not start: `ray start` still refuses a taken 8265 (another test's
        # local Ray, in the other test process)
        port = free_port()
        cluster.address = f"127.0.0.1:{port}"
        args = ["--head", "--port", str(port), "--include-dashboard", "false", "--dashboard-port", str(free_port())]
        return [*args, "--ray-client-server-port", str(free_port())]

    try:
        _start_node(cluster, head, "head", tmp, head_cpus)
        for i in range(1, workers + 1):
            _start_node(cluster, lambda: ["--address", cluster.address], f"node{i}", tmp, 1)
        yield cluster
    finally:
        for proc in reversed(cluster.nodes.values()):
            stop(proc)
        for temp_dir in cluster.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def start_node(cluster: RayCluster, name: str, tmp: Path, cpus: int = 1) -> None:
    """Join one more node ``name`` (a custom resource of that name, ``cpus`` CPUs) to ``cluster``: a node that comes
    back, or a new one the autoscaler would start."""
    _start_node(cluster, lambda: ["--address", cluster.address], name, tmp, cpus)


def enter_concurrently(stack: contextlib.ExitStack, *managers: contextlib.AbstractContextManager) -> list:
    """Enter context managers on ``stack`` in parallel threads (servers start together); returns their values."""
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(stack.enter_context, m) for m in managers]
    return [f.result() for f in futures]


# --------------------------------------------------------------------------- the CLI in the background


class Cli:
    """``python -m orchestrator ...`` in the background; stdout and stderr go to a file the test polls.

    A ``run`` that starts a local Ray (no ``--address``) holds the lock of node starts until its Ray is up
    (`one_start_at_a_time`)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.log = cwd / f"cli-{time.monotonic_ns()}.log"
        starts_ray = args[0] == "run" and "--address" not in args
        starting = contextlib.ExitStack()
        if starts_ray:
            starting.enter_context(one_start_at_a_time())
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", *args],
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        if starts_ray:
            threading.Thread(target=self._release_once_ray_is_up, args=(starting,), daemon=True).start()

    def _release_once_ray_is_up(self, starting: contextlib.ExitStack) -> None:
        with starting:
            deadline = time.monotonic() + PATIENCE_S
            while "Started a local Ray instance" not in self.output() and self.proc.poll() is None:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = PATIENCE_S) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the CLI output (rc {self.proc.poll()}):\n{self.output()[-5000:]}")

    def finish(self, timeout: float = 2 * PATIENCE_S) -> int:
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


def wait_while_running(condition, process: subprocess.Popen, what: str, timeout: float = PATIENCE_S):
    """``condition()``'s first truthy value, asked every 0.1 s while ``process`` runs; an AssertionError naming
    ``what`` when it exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"no {what} (the process exited {process.poll()})")
