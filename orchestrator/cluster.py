"""The Ray cluster of a sweep: joined, or started locally; every Ray process's environment; what trials ask of it.

Every check here runs before anything of the sweep is written: a cluster that cannot hold its trials is refused with
the fix, not waited on.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from pathlib import Path

from gptcore.cache import CACHE_ENV, cache_dir
from gptcore.corpus import MIRROR_ENV
from orchestrator.decoding import is_decode
from orchestrator.settings import SweepSettings
from orchestrator.sweep_error import SweepError
from orchestrator.tracking import HTTP_ENV, is_loopback

# Ray Train V2 polls workers for reports every 2 s by default, which throttles ray.train.report.
CONTROLLER_POLL_S = "0.2"


def _parsed_address(address: str) -> urllib.parse.ParseResult:
    """A Ray address, ``HOST:PORT`` or ``ray://HOST:PORT``, parsed."""
    return urllib.parse.urlparse(address if "://" in address else f"tcp://{address}")


def _check_address(address: str) -> None:
    if address in ("auto", "local"):
        return
    parsed = _parsed_address(address)
    if not parsed.hostname or not parsed.port:
        raise SweepError(f"--address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or ray://HOST:PORT")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=5):
            pass
    except OSError as exc:
        raise SweepError(
            f"Ray cluster at {address} is unreachable ({exc}); check the address (ray status on the head node), "
            "or leave --address out to start a local Ray"
        ) from None


def on_one_machine(address: str | None) -> bool:
    """True when the Ray cluster cannot span machines: a local Ray, or a head on a loopback address (which no other
    machine can join)."""
    if address in (None, "local"):
        return True
    return is_loopback(_parsed_address(address).hostname)


def worker_env(local: bool, preemptible: bool = False) -> dict[str, str]:
    """Environment of every Ray process of the sweep; ``preemptible``: its trials hear of node drains even when the
    cluster is on one machine (spot or elastic trials: nodes of one machine may still be drained, as in tests)."""
    env = {
        CACHE_ENV: str(cache_dir()),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": CONTROLLER_POLL_S,
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints reach the console once, not twice
        # Ray Train runs the loop in a thread, and glibc gives a thread its own arena, whose large blocks are fresh
        # mmaps faulted in again on every step (gptcore.runtime.keep_freed_memory_mapped only tunes the main arena).
        # One arena for every thread puts the loop's thread on the tuned one.
        "MALLOC_ARENA_MAX": "1",
        **HTTP_ENV,
    }
    if local:  # one machine: no Prometheus to feed, and no spot preemption to watch (unless asked): fewer actors
        env["RAY_TRAIN_METRICS_ENABLED"] = "0"
        if not preemptible:
            env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    if os.environ.get(MIRROR_ENV):
        env[MIRROR_ENV] = str(Path(os.environ[MIRROR_ENV]).absolute())
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def connect_ray(address: str | None, *, dashboard: bool = True, preemptible: bool = False) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``, as in a Ray job), or start a local one;
    ``dashboard``: a local Ray with its dashboard (Ray Train's placement-group cleaner reads actor states through it;
    `prepare`'s tasks need none); ``preemptible``: trials that must hear of node drains (`worker_env`).

    Every Ray process is told which Ray is its own: without it, the placement-group cleaner finds "the" Ray on this
    machine, and with two (two sweeps at once) it fails, or asks the other one, is told its controller does not
    exist, and removes the running trial's placement group."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    local = on_one_machine(address)
    env = worker_env(local=local, preemptible=preemptible)
    if address:
        _check_address(address)
        if local and "://" not in address:
            env["RAY_ADDRESS"] = address
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        except ConnectionError as exc:
            raise SweepError(f"cannot join the Ray cluster at {address}: {exc}") from None
    else:  # the dashboard on a port of its own: Ray's 8265 may be another local Ray's
        # Ray starts a worker per CPU for the first driver, to no use here (the trial's actors never take one): idle
        # processes that each pay Ray's imports
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        start_local_ray(env, dashboard)


LOCAL_RAY_START_ATTEMPTS = 3


def start_local_ray(env: dict[str, str], dashboard: bool) -> None:
    """``ray.init`` of a local Ray whose processes get ``env``, tried again when it misses Ray's start deadline.

    Ray 2.60 gives a starting node's raylet a fixed 30 s to register with the GCS (no setting raises it); on a busy
    machine a start can miss it while the next one does not. A failed attempt's processes are killed before the next.
    """
    import psutil
    import ray

    for attempt in range(1, LOCAL_RAY_START_ATTEMPTS + 1):
        port = _free_port() if dashboard else None
        if port is not None:
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(
                runtime_env={"env_vars": env},
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                log_to_driver=True,
            )
            return
        except Exception as exc:  # Ray raises a bare Exception for a missed start deadline
            if not _is_start_timeout(exc):
                raise
            last = exc
            ray.shutdown()
            _kill_processes_started_since(before)
            print(f"The local Ray did not start (attempt {attempt} of {LOCAL_RAY_START_ATTEMPTS}): {exc}", flush=True)
    load = os.getloadavg()[0]
    raise SweepError(
        f"the local Ray did not start in {LOCAL_RAY_START_ATTEMPTS} attempts on this machine (load average "
        f"{load:.1f} on {os.cpu_count()} CPUs): {last}; run again when the machine is less busy, or start Ray "
        "yourself (`ray start --head`) and pass its address with --address"
    )


def _is_start_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is Ray giving up on a node that did not come up in time (not a bad setting)."""
    text = str(exc)
    return isinstance(exc, TimeoutError) or "timed out during startup" in text or "Deadline Exceeded" in text


def _kill_processes_started_since(before: set[int]) -> None:
    """Kill this process's descendants that are not in ``before`` (what a failed ``ray.init`` left running)."""
    import psutil

    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for proc in started:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(started, timeout=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resolve_gpu(use_gpu: bool | str, wait_for_resources: bool = False) -> bool:
    """'auto' becomes True when the cluster has a GPU; True on a GPU-less cluster is an error (no hang)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if use_gpu == "auto":
        return gpus >= 1
    if use_gpu and gpus < 1 and not wait_for_resources:
        raise SweepError(
            "use_gpu is set but the Ray cluster has no GPU; run without --use-gpu (CPU training), join a GPU "
            "cluster with --address, or pass --wait-for-resources if GPU nodes autoscale from zero"
        )
    return bool(use_gpu)


def check_cpus(cpus_per_worker: float, wait_for_resources: bool = False) -> None:
    """A worker asking for more CPUs than any node has would wait forever: refuse it, unless told to wait."""
    import ray

    most = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if cpus_per_worker > most and not wait_for_resources:
        raise SweepError(
            f"each worker asks for {cpus_per_worker:g} CPUs but the largest node of the Ray cluster has "
            f"{most:g}; pass --cpus-per-worker {max(int(most), 1)}, or --wait-for-resources if larger nodes autoscale"
        )


def check_local_gpu(use_gpu: bool | str, address: str | None, wait_for_resources: bool = False) -> None:
    """A local Ray has this machine's GPUs: ``use_gpu`` without one fails before Ray starts, not after."""
    if use_gpu is not True or address or os.environ.get("RAY_ADDRESS") or wait_for_resources:
        return
    import torch

    if torch.cuda.device_count() == 0:
        raise SweepError(
            "use_gpu is set but this machine has no GPU (and a local Ray only has this machine's); "
            "run with --use-gpu no or auto to train on CPU, or join a GPU cluster with --address"
        )


def trials_that_fit(resources: dict[str, float], workers: int, cpus_per_worker: float, use_gpu: bool) -> int:
    """How many trials' worker groups a cluster of ``resources`` (``ray.cluster_resources()``) holds at once."""
    fits = resources.get("CPU", 0) // (workers * cpus_per_worker)
    if use_gpu:
        fits = min(fits, resources.get("GPU", 0) // workers)
    return max(1, int(fits))


def max_concurrent_trials(settings: SweepSettings, address: str | None) -> int | None:
    """The user's limit; on a local Ray, else, as many trials as its CPUs (GPUs) hold at once.

    Tune would start every trial's controller at once, and those that find no free CPUs wait, polling, with a
    traceback a minute from Ray Train. On a cluster (``--address``) nodes may still join, so no limit is implied.
    """
    import ray

    limit = settings.max_concurrent
    if limit or address or is_decode(settings.kind):
        return limit
    return trials_that_fit(ray.cluster_resources(), settings.workers, settings.cpus_per_worker, settings.use_gpu)
