"""A sweep on Ray Tune: one Tune trial per grid point, each a Ray Train run of gptcore's loop.

Layout in storage (a local folder or an ``s3://`` URI)::

    <storage>/<sweep_id>/sweep.json                 the plan: trials, configs, settings (used by --resume)
    <storage>/<sweep_id>/<trial>/...                Tune's trial files
    <storage>/<sweep_id>/<trial>/train/checkpoint_*  Ray Train checkpoints (gptcore checkpoint folders)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from gptcore.cache import CACHE_ENV, cache_dir
from gptcore.config import JobConfig, nest
from gptcore.corpus import MIRROR_ENV, check_windows, plan_corpus
from gptcore.shards import Manifest, read_manifest
from orchestrator.decode_plan import decode_rows, resolve_checkpoints
from orchestrator.decode_trial import decode_trainable
from orchestrator.decoding import is_decode
from orchestrator.experiment import ASHA, Experiment, ExperimentError, Trial, expand_trials
from orchestrator.prepare import prepare, read_dataset_manifest, stage_locally
from orchestrator.settings import SweepSettings
from orchestrator.storage import absolute_storage, filesystem, read_json, storage_uri, write_json
from orchestrator.storage import join as join_path
from orchestrator.tracking import (
    BEST_CHECKPOINT_TAG,
    HTTP_ENV,
    KIND_TAG,
    NOTE_TAG,
    STATUS_TAG,
    SweepTracker,
    check_reachable,
    cluster_tracking_uri,
    default_artifact_root,
    file_docstring,
    git_commit,
    is_loopback,
    mlflow_status,
    resolve_tracking_uri,
    source_tags,
    wait_until_reachable,
)
from orchestrator.trial import run_trial

# Ray Train V2 polls workers for reports every 2 s by default, which throttles ray.train.report.
CONTROLLER_POLL_S = "0.2"


class SweepError(RuntimeError):
    """The sweep cannot start or continue; the message says how to fix it."""


@dataclass
class SweepOptions:
    """Command-line settings of a sweep (see ``python -m orchestrator run --help``)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    max_concurrent: int | None = None
    resume: str | None = None  # None, "latest" or a sweep id
    workers: int | None = None
    use_gpu: bool | str | None = None
    cpus_per_worker: float | None = None
    experiment_file: str = ""
    workdir: str = field(default_factory=lambda: str(Path.cwd()))


# --------------------------------------------------------------------------- resuming


def saved_settings(saved: dict[str, Any], experiment: Experiment) -> SweepSettings:
    """The settings in a sweep.json; a field an older sweep.json lacks comes from the experiment file."""
    scheduler = asdict(experiment.scheduler) if experiment.scheduler else None
    defaults = {"kind": experiment.kind, "scheduler": scheduler, "max_concurrent": experiment.max_concurrent}
    return SweepSettings(**{**defaults, **saved})


def refuse_changes_on_resume(changes: dict[str, Any]) -> None:
    """A resumed sweep is the one its sweep.json describes: options that would change it (flag -> value given, or
    None) are refused, not ignored."""
    given = [flag for flag, value in changes.items() if value not in (None, {}, [])]
    if given:
        raise SweepError(
            f"--resume continues a sweep as it was started (its trials, scheduler, concurrency and resources are in "
            f"its sweep.json) and cannot take {', '.join(given)}; start a new sweep without --resume to change them"
        )


def find_sweep(storage: str, experiment: str, which: str) -> str:
    """The sweep id to resume: ``which`` itself, or the newest sweep of ``experiment``."""
    fs, root = filesystem(storage)
    if which != "latest":
        if read_json(join_path(storage, which, "sweep.json")) is None:
            raise SweepError(f"no sweep {which!r} in {storage}; run without --resume to start one")
        return which
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        infos = []
    names = sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(f"{experiment}-")
    )
    for name in reversed(names):
        if read_json(join_path(storage, name, "sweep.json")) is not None:
            return name
    raise SweepError(f"nothing to resume: no sweep of {experiment!r} in {storage}; run without --resume")


# --------------------------------------------------------------------------- planning


@dataclass
class Plan:
    experiment: Experiment
    trials: list[Trial]
    workers: int
    use_gpu: bool | str
    cpus_per_worker: float
    max_concurrent: int | None


def make_plan(experiment: Experiment, options: SweepOptions) -> Plan:
    """Every trial of the sweep, validated, and its resources; a CPU trial's torch threads are its worker's CPUs
    (``train.num_threads``, unless the experiment sets it), so the loop sets them, once."""
    cpus_per_worker = options.cpus_per_worker or experiment.cpus_per_worker or 1
    trials = [with_threads(t, cpus_per_worker) for t in expand_trials(experiment, options.overrides)]
    plan = Plan(
        experiment=experiment,
        trials=trials,
        workers=options.workers or experiment.workers,
        use_gpu=experiment.use_gpu if options.use_gpu is None else options.use_gpu,
        cpus_per_worker=cpus_per_worker,
        max_concurrent=concurrency_limit(experiment, options),
    )
    check_sharding(plan)
    return plan


def check_sharding(plan: Plan) -> None:
    """FSDP shards the token embedding by rows across the workers: their number must divide its rows."""
    for trial in plan.trials:
        job = trial.job
        if not isinstance(job, JobConfig) or job.train.parallel != "fsdp":
            continue
        rows = job.model.padded_vocab_size
        if rows % plan.workers:
            raise SweepError(
                f"trial {trial.name}: train.parallel=fsdp shards the {rows}-row token embedding across "
                f"{plan.workers} workers, which do not divide it evenly; use a worker count that divides {rows} "
                "(e.g. 2, 4 or 8), or a model.pad_vocab_multiple that the worker count divides"
            )


def with_threads(trial: Trial, cpus_per_worker: float) -> Trial:
    if not isinstance(trial.job, JobConfig) or trial.job.train.num_threads:  # a decode trial, or threads set
        return trial
    threads = max(1, int(cpus_per_worker))
    config = {**trial.config, "train": {**trial.config.get("train", {}), "num_threads": threads}}
    job = dataclasses.replace(trial.job, train=dataclasses.replace(trial.job.train, num_threads=threads))
    return dataclasses.replace(trial, config=config, job=job)


def concurrency_limit(experiment: Experiment, options: SweepOptions) -> int | None:
    """The user's limit on trials at once: ``--max-concurrent``, else the experiment's ``max_concurrent``."""
    return options.max_concurrent or experiment.max_concurrent


def describe_plan(plan: Plan, options: SweepOptions) -> str:
    """The dry-run text: every trial, its grid values and resources, and where results go."""
    gpu = {True: "1 GPU", False: "no GPU", "auto": "GPU if the cluster has one"}[plan.use_gpu]
    lines = [
        f"experiment {plan.experiment.name}: {len(plan.trials)} trial(s), metric {plan.experiment.metric} "
        f"({plan.experiment.mode})",
        f"resources per trial: {plan.workers} worker(s) x ({plan.cpus_per_worker:g} CPU, {gpu})"
        + (f", at most {plan.max_concurrent} concurrent" if plan.max_concurrent else ""),
        f"storage: {absolute_storage(options.storage, options.workdir)}",
        f"tracking: {resolve_tracking_uri(options.tracking_uri, options.workdir)}",
        f"ray: {options.address or 'a local Ray started for this run'}",
    ]
    if plan.experiment.scheduler:
        lines.append(f"scheduler: {plan.experiment.scheduler}")
    keys = list(plan.experiment.grid)
    rows_of = decode_rows if plan.experiment.is_decode else _train_rows
    header, rows = rows_of(plan.trials, keys)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def _train_rows(trials: list[Trial], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for trial in trials:
        job = trial.job
        steps = f"{job.train.epochs} epoch(s)" + (f" <= {job.train.max_steps} steps" if job.train.max_steps else "")
        model = f"{job.model.n_layers}x{job.model.d_model} ctx {job.model.context_length}"
        rows.append([trial.name, *[str(trial.params[k]) for k in keys], model, steps])
    return ["trial", *keys, "model", "steps"], rows


def check_data(trials: list[Trial]) -> None:
    """Before anything starts or is written: each trial's corpus resolved and checked; a small corpus tokenized
    (into the local cache) and both its splits checked to hold a window."""
    staged: dict[str, Manifest | None] = {}
    for trial in trials:
        try:
            plan = plan_corpus(trial.job.data)
            if plan.key not in staged:
                folder = stage_locally(plan)
                staged[plan.key] = read_manifest(folder) if folder else None
            if staged[plan.key] is not None:
                check_windows(trial.job, staged[plan.key])
        except ValueError as exc:
            raise ExperimentError(f"trial {trial.name}: {exc}") from None


def prepare_data(trials: list[Trial], storage: str) -> dict[str, tuple[str, Manifest]]:
    """Prepare each distinct corpus once for the whole sweep, before any trial starts, and check every trial has
    windows in both splits; returns each trial's dataset location and manifest."""
    plans = {trial.name: plan_corpus(trial.job.data) for trial in trials}
    prepared = {}
    for plan in plans.values():
        if plan.key not in prepared:
            location = prepare(plan, storage)
            prepared[plan.key] = (location, read_dataset_manifest(location))
    by_trial = {}
    for trial in trials:
        location, manifest = prepared[plans[trial.name].key]
        try:
            check_windows(trial.job, manifest)
        except ValueError as exc:
            raise ExperimentError(f"trial {trial.name}: {exc}") from None
        by_trial[trial.name] = (location, manifest)
    return by_trial


def resolve_init(trials: list[Trial]) -> list[Trial]:
    """The trials with each local ``train.init_from`` (checkpoint or Hugging Face folder) made absolute, as workers
    run in other directories, and checked to fit its trial's model (headers only, no weights)."""
    if all(trial.job.train.init_from == "scratch" for trial in trials):
        return trials  # (no torch to import)
    from gptcore.checkpoint import META_FILE, CheckpointError, check_fits, init_source_kind
    from gptcore.pretrained import check_compatible, config_from_pretrained

    resolved, seen = [], set()
    for trial in trials:
        source, model = trial.job.train.init_from, trial.job.model
        if init_source_kind(source) in ("scratch", "hub"):  # a Hugging Face model id is downloaded by the trial
            resolved.append(trial)
            continue
        path = Path(source).expanduser().absolute()
        resolved.append(_with_init_from(trial, str(path)))
        if (path, model) in seen:
            continue
        seen.add((path, model))
        try:
            if (path / META_FILE).is_file():
                check_fits(path, model)
            else:
                check_compatible(model, config_from_pretrained(str(path)), source)
        except CheckpointError as exc:
            raise ExperimentError(f"trial {trial.name}: train.init_from: {exc}") from None
    return resolved


def _with_init_from(trial: Trial, init_from: str) -> Trial:
    config = {**trial.config, "train": {**trial.config.get("train", {}), "init_from": init_from}}
    job = dataclasses.replace(trial.job, train=dataclasses.replace(trial.job.train, init_from=init_from))
    return dataclasses.replace(trial, config=config, job=job)


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


# --------------------------------------------------------------------------- Ray


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


def worker_env(local: bool) -> dict[str, str]:
    """Environment of every Ray process of the sweep."""
    env = {
        CACHE_ENV: str(cache_dir()),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": CONTROLLER_POLL_S,
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints reach the console once, not twice
        # Ray Train runs the loop in a thread, and glibc gives a thread its own arena, whose large blocks are fresh
        # mmaps faulted in again on every step (gptcore.train.keep_freed_memory_mapped only tunes the main arena).
        # One arena for every thread: CPU training steps 20 % faster (BENCHMARKS.md, "main job").
        "MALLOC_ARENA_MAX": "1",
        **HTTP_ENV,
    }
    if local:  # one machine: no spot preemption to watch, no Prometheus to feed; two fewer actors per trial
        env.update({"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"})
    if os.environ.get(MIRROR_ENV):
        env[MIRROR_ENV] = str(Path(os.environ[MIRROR_ENV]).absolute())
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def connect_ray(address: str | None, *, dashboard: bool = True) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``, as in a Ray job), or start a local one;
    ``dashboard``: a local Ray with its dashboard (Ray Train's placement-group cleaner reads actor states through it;
    `prepare`'s tasks need none).

    Every Ray process is told which Ray is its own: without it, the placement-group cleaner finds "the" Ray on this
    machine, and with two (two sweeps at once) it fails, or asks the other one, is told its controller does not
    exist, and removes the running trial's placement group."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    local = on_one_machine(address)
    env = worker_env(local=local)
    if address:
        _check_address(address)
        if local and "://" not in address:
            env["RAY_ADDRESS"] = address
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        except ConnectionError as exc:
            raise SweepError(f"cannot join the Ray cluster at {address}: {exc}") from None
    else:  # the dashboard on a port of its own: Ray's 8265 may be another local Ray's
        # Ray starts a worker per CPU for the first driver, to no use here (the trial's actors never took one): idle
        # processes of ~0.6 CPU-s each
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
            f"each Ray Train worker asks for {cpus_per_worker:g} CPUs but the largest node of the Ray cluster has "
            f"{most:g}; pass --cpus-per-worker {max(int(most), 1)}, or --wait-for-resources if larger nodes autoscale"
        )


# --------------------------------------------------------------------------- the sweep


@dataclass
class SweepOutcome:
    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    storage: str
    experiment: str
    statuses: dict[str, str]  # trial -> finished | diverged | failed | stopped | pending
    interrupted: bool


def run_sweep(
    experiment: Experiment, options: SweepOptions, *, plan: Plan | None = None, wait_for_resources: bool = False
) -> SweepOutcome:
    """Run (or resume) a sweep to the end and record it in MLflow; returns each trial's status.

    ``plan`` is the one `make_plan` made of ``experiment`` and ``options`` (made here if not given); a resumed sweep
    runs what its sweep.json says instead."""
    import ray

    storage = absolute_storage(options.storage, options.workdir)
    if options.resume:
        sweep_id, specs, settings, tracker = _reopen(experiment, options, storage, wait_for_resources)
    else:
        sweep_id, specs, settings, tracker = _open(experiment, options, plan, storage, wait_for_resources)
    try:
        print(f"sweep {sweep_id}: MLflow parent run {settings.parent_run_id} at {settings.tracking_uri}", flush=True)
        grid = _tuner(specs, settings, join_path(storage, sweep_id), options).fit()
        wait_until_reachable(settings.tracking_uri)  # a server that went down mid-sweep: record the results once back
        statuses = _reconcile(tracker, settings, grid, list(specs))
    finally:
        ray.shutdown()
    interrupted = any(s == "pending" for s in statuses.values())
    tracker.finish(
        settings.parent_run_id, "interrupted" if interrupted else ("finished" if all_ended_well(statuses) else "failed")
    )
    return SweepOutcome(
        sweep_id, settings.parent_run_id, settings.tracking_uri, storage, experiment.name, statuses, interrupted
    )


def _reopen(
    experiment: Experiment, options: SweepOptions, storage: str, wait_for_resources: bool
) -> tuple[str, dict[str, dict], SweepSettings, SweepTracker]:
    """A sweep to resume, as its sweep.json says (flags that would change it are refused): Ray connected with the
    resources it needs, its parent run running again."""
    import ray

    refuse_changes_on_resume(
        {
            "--set": options.overrides,
            "--workers": options.workers,
            "--use-gpu": options.use_gpu,
            "--cpus-per-worker": options.cpus_per_worker,
            "--max-concurrent": options.max_concurrent,
        }
    )
    sweep_id = find_sweep(storage, experiment.name, options.resume)
    saved = read_json(join_path(storage, sweep_id, "sweep.json"))
    specs, settings = saved["trials"], saved_settings(saved["settings"], experiment)
    check_reachable(settings.tracking_uri)
    tracker = SweepTracker(settings.tracking_uri, settings.experiment, artifact_root=settings.artifact_root)
    print(f"resuming sweep {sweep_id}: {len(specs)} trial(s)", flush=True)
    connect_ray(options.address)
    try:
        resolve_gpu(settings.use_gpu, wait_for_resources)
        check_cpus(settings.cpus_per_worker, wait_for_resources)
        tracker.client.update_run(settings.parent_run_id, status="RUNNING")
    except BaseException:
        ray.shutdown()
        raise
    return sweep_id, specs, settings, tracker


def _open(
    experiment: Experiment, options: SweepOptions, plan: Plan | None, storage: str, wait_for_resources: bool
) -> tuple[str, dict[str, dict], SweepSettings, SweepTracker]:
    """A new sweep: checked, Ray connected, then its parent and trial runs created and its sweep.json written."""
    import ray

    plan = plan or make_plan(experiment, options)
    uri = resolve_tracking_uri(options.tracking_uri, options.workdir)
    check_reachable(uri)
    if experiment.is_decode:
        plan.trials = resolve_checkpoints(plan.trials, uri)
    else:
        check_data(plan.trials)
        plan.trials = resolve_init(plan.trials)
    check_local_gpu(plan.use_gpu, options.address, wait_for_resources)
    sweep_id = f"{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    artifact_root = None if options.tracking_uri else default_artifact_root(options.workdir)
    connect_ray(options.address)
    try:  # nothing is written (tracking store, storage) until Ray is up with the resources the sweep needs
        use_gpu = resolve_gpu(plan.use_gpu, wait_for_resources)
        check_cpus(plan.cpus_per_worker, wait_for_resources)
        datasets = {} if experiment.is_decode else prepare_data(plan.trials, storage)
        tracker = SweepTracker(uri, experiment.name, artifact_root=artifact_root)
        settings = _start(tracker, experiment, options, plan, sweep_id, storage, use_gpu)
        specs = _create_trial_runs(tracker, settings, plan.trials, datasets)
        write_json(join_path(storage, sweep_id, "sweep.json"), {"trials": specs, "settings": asdict(settings)})
    except BaseException:
        ray.shutdown()
        raise
    return sweep_id, specs, settings, tracker


def _tuner(specs: dict[str, dict], settings: SweepSettings, sweep_dir: str, options: SweepOptions):
    """The Tuner of the sweep: restored from ``sweep_dir`` when resuming one Tune saved, else new."""
    import ray.tune

    if is_decode(settings.kind):  # inference in the Tune trial itself
        trainable = decode_trainable(specs, settings)
    else:
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(run_trial, specs=specs, settings=settings),
            {"memory": 1},  # the trial's driver function is light; Train workers hold the CPUs/GPUs
        )
    if options.resume and ray.tune.Tuner.can_restore(sweep_dir):
        return ray.tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    return _new_tuner(trainable, list(specs), settings, options.address)


def _start(tracker, experiment, options, plan, sweep_id, storage, use_gpu: bool) -> SweepSettings:
    """Create the sweep's parent run; ``use_gpu`` is already resolved against the cluster."""
    # the commit of the repository holding the experiment file (else of the working directory)
    commit = git_commit(Path(options.experiment_file).parent if options.experiment_file else options.workdir)
    parent = tracker.parent_run(
        sweep_id,
        params={
            "experiment": experiment.name,
            "trials": len(plan.trials),
            **{f"grid.{k}": json.dumps(v) for k, v in experiment.grid.items()},
            **{f"set.{k}": v for k, v in options.overrides.items()},
        },
        tags={
            "experiment_file": options.experiment_file,
            "storage": storage,
            KIND_TAG: experiment.kind,
            **({"git_commit": commit} if commit else {}),
            **source_tags(options.experiment_file, commit),
            NOTE_TAG: sweep_description(experiment, plan, options),
        },
    )
    tracker.describe_experiment(file_docstring(options.experiment_file) or experiment.description)
    tracking_uri = tracker.uri
    if options.address:  # trials may run on other nodes, where the driver's loopback is not this machine
        import ray.util

        tracking_uri = cluster_tracking_uri(tracking_uri, ray.util.get_node_ip_address())
    return SweepSettings(
        sweep_id=sweep_id,
        experiment=experiment.name,
        experiment_file=options.experiment_file,
        storage=storage,
        tracking_uri=tracking_uri,
        artifact_root=tracker.artifact_root,
        parent_run_id=parent,
        workers=plan.workers,
        use_gpu=use_gpu,
        cpus_per_worker=plan.cpus_per_worker,
        max_failures=experiment.max_failures,
        checkpoints_to_keep=experiment.checkpoints_to_keep,
        metric=experiment.metric,
        mode=experiment.mode,
        git_commit=commit,
        kind=experiment.kind,
        scheduler=asdict(experiment.scheduler) if experiment.scheduler else None,
        max_concurrent=plan.max_concurrent,
    )


def sweep_description(experiment: Experiment, plan: Plan, options: SweepOptions) -> str:
    """The parent run's description: the grid, the base model and data, the metric, the overrides."""
    axes = "; ".join(f"{k} in {', '.join(json.dumps(x, default=str) for x in v)}" for k, v in experiment.grid.items())
    lines = [f"{len(plan.trials)} trial(s) of {experiment.name} over {axes}."]
    if not experiment.is_decode:
        lines.append(f"Model {experiment.model}, corpus {experiment.corpus or experiment.data.get('corpus', '')}.")
    lines.append(f"Ranked by {experiment.metric} ({experiment.mode}).")
    if options.overrides:
        sets = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in options.overrides.items())
        lines.append(f"Overrides: {sets}.")
    if experiment.description:
        lines.append(experiment.description)
    return " ".join(lines)


def _create_trial_runs(
    tracker: SweepTracker, settings: SweepSettings, trials: list[Trial], datasets: dict[str, tuple[str, Manifest]]
) -> dict[str, dict]:
    """One MLflow child run per trial (status pending, its dataset input logged), created up front; returns the
    trial specs."""
    specs = {}
    for trial in trials:
        flat = trial.job.flat()
        tags = {
            **trial.tags,
            "experiment_file": settings.experiment_file,
            **({"git_commit": settings.git_commit} if settings.git_commit else {}),
            **source_tags(settings.experiment_file, settings.git_commit),
        }
        params = {**flat, **{f"grid.{k}": v for k, v in trial.params.items()}}
        run_id = tracker.child_run(settings.parent_run_id, settings.sweep_id, trial.name, params=params, tags=tags)
        specs[trial.name] = {"params": trial.params, "config": trial.config, "run_id": run_id}
        tracker.client.log_dict(run_id, nest(flat), "config.json")  # the resolved config, as a file
        if trial.name in datasets:
            location, manifest = datasets[trial.name]
            specs[trial.name]["dataset"] = location
            _log_dataset(tracker, run_id, trial, location, manifest)
    return specs


def _log_dataset(tracker: SweepTracker, run_id: str, trial: Trial, location: str, manifest: Manifest) -> None:
    corpus = trial.job.data.corpus
    name = corpus if isinstance(corpus, str) else f"{corpus[0]} (+{len(corpus) - 1})"
    val_tokens = min(manifest.tokens("val"), trial.job.data.val_tokens or manifest.tokens("val"))
    profile = {
        "train_tokens": manifest.tokens("train"),
        "val_tokens": val_tokens,
        "documents": manifest.documents,
        "shards": len(manifest.shards),
        "split": manifest.split,
    }
    tracker.log_dataset(run_id, name=Path(name).name or name, key=manifest.key, location=location, profile=profile)


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


def _new_tuner(trainable, names, settings: SweepSettings, address: str | None):
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if settings.scheduler:
        a = ASHA(**settings.scheduler)
        scheduler = ASHAScheduler(
            time_attr=a.time_attr,
            max_t=a.max_t,
            grace_period=a.grace_period,
            reduction_factor=a.reduction_factor,
            stop_last_trials=False,  # a trial reaching max_t ends on its own (with its final report)
        )
    return ray.tune.Tuner(
        trainable,
        param_space={"trial": ray.tune.grid_search(names)},
        tune_config=ray.tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            scheduler=scheduler,
            max_concurrent_trials=max_concurrent_trials(settings, address),
            # a trial's actor (its process, Ray Train imported) runs the next trial: ≈2.5 s less per trial. Not
            # with a scheduler: a trial it stops is still inside TorchTrainer.fit, and Tune errors the next trial.
            reuse_actors=scheduler is None,
            trial_name_creator=lambda t: t.config["trial"],
            trial_dirname_creator=lambda t: t.config["trial"],
        ),
        run_config=ray.tune.RunConfig(
            name=settings.sweep_id,
            storage_path=settings.storage,
            failure_config=ray.tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )


def _trial_states(grid, sweep_dir: str) -> dict[str, tuple[str, dict[str, Any], Any]]:
    """Tune's view of each trial: (status, last metrics, result).

    The status is the one Tune saved in the sweep's state, as ``--resume`` reads it: a trial still running when the
    sweep was interrupted is saved RUNNING (to train again), though Tune then ends it as TERMINATED in memory, the
    status of a trial the scheduler stopped.
    """
    from ray.tune import ExperimentAnalysis

    states = {}
    analysis = getattr(grid, "_experiment_analysis", None)
    tune_status = {t.config.get("trial"): t.status for t in getattr(analysis, "trials", [])}
    try:
        tune_status.update({t.config.get("trial"): t.status for t in ExperimentAnalysis(sweep_dir).trials})
    except Exception as exc:  # no saved state: keep the statuses in memory
        print(f"warning: could not read the sweep state in {sweep_dir} ({exc}); trial statuses as Tune ended them")
    for result in grid:
        name = (result.config or {}).get("trial")
        if name:
            states[name] = (tune_status.get(name, "PENDING"), result.metrics or {}, result)
    return states


def _reconcile(tracker: SweepTracker, settings: SweepSettings, grid, names: list[str]) -> dict[str, str]:
    """Give every trial's MLflow run a final status and best checkpoint, from Tune's results.

    finished / diverged: the trial reported its end; stopped: ended early by the scheduler;
    failed: errored; pending: not finished (interrupted sweep) and resumable.
    """
    states = _trial_states(grid, join_path(settings.storage, settings.sweep_id))
    runs = {r.data.tags.get("orchestrator.trial"): r for r in tracker.child_runs(settings.parent_run_id)}
    statuses = {}
    for name in names:
        tune_status, metrics, result = states.get(name, ("PENDING", {}, None))
        if metrics.get("final"):
            status = str(metrics.get("status", "finished"))
        elif tune_status == "ERROR":
            status = "failed"
        elif tune_status == "TERMINATED":
            status = "stopped"
        else:
            status = "pending"
        statuses[name] = status
        run = runs.get(name)
        if run is None:
            continue
        best = _best_checkpoint(result, settings) if result is not None else None
        tags = {BEST_CHECKPOINT_TAG: best} if best and not run.data.tags.get(BEST_CHECKPOINT_TAG) else {}
        if status == "pending":
            for key, value in {**tags, STATUS_TAG: "interrupted"}.items():
                tracker.client.set_tag(run.info.run_id, key, value)
            tracker.client.set_terminated(run.info.run_id, "KILLED")
        elif run.data.tags.get(STATUS_TAG) != status or run.info.status != mlflow_status(status) or tags:
            # e.g. a trial that finished in a resumed sweep whose driver was then killed before it got here
            tracker.finish(run.info.run_id, status, tags)
    return statuses


def _best_checkpoint(result, settings: SweepSettings) -> str | None:
    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df or settings.metric not in df:
        return None
    rows = df[df["checkpoint_path"].notna()]
    if rows.empty:
        return None
    best = rows[settings.metric].idxmin() if settings.mode == "min" else rows[settings.metric].idxmax()
    return storage_uri(settings.storage, str(rows.loc[best, "checkpoint_path"]))


ENDED_WELL = ("finished", "diverged", "stopped")  # a diverged or stopped trial is a result, not an error


def all_ended_well(statuses: dict[str, str]) -> bool:
    """True when no trial failed or is still pending."""
    return all(s in ENDED_WELL for s in statuses.values())


def exit_code(outcome: SweepOutcome) -> int:
    """130 for an interrupted sweep, 1 when a trial failed, else 0."""
    if outcome.interrupted:
        return 130
    return 0 if all_ended_well(outcome.statuses) else 1
