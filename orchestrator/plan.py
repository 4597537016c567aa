"""A sweep's plan, made on the driver before Ray starts: its trials and their resources, checked (the dry run's text
is `orchestrator.dry_run`'s).

A training sweep's corpora are checked (and prepared) here and its ``train.init_from`` sources checked against each
trial's model; a decode sweep's checkpoints are `orchestrator.decode_plan`'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptcore.accounting import budget_steps, param_count, run_length, step_flops, training_flops
from gptcore.config import ConfigError, JobConfig
from gptcore.corpus import check_windows, plan_corpus, window_count
from gptcore.memory import peak_memory
from gptcore.shards import DataError, Manifest, read_manifest
from orchestrator.experiment import Experiment, ExperimentError, Trial, expand_trials, worker_range
from orchestrator.node_types import NodeType, fits, live_node_types, uses_gpu, workers_per_node
from orchestrator.prepare import dataset_location, prepare, read_dataset_manifest, stage_locally
from orchestrator.settings import torch_threads
from orchestrator.sweep_error import SweepError


@dataclass
class SweepOptions:
    """Command-line settings of a sweep (see ``python -m orchestrator run --help``)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    address: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    max_concurrent: int | None = None
    resume: str | None = None  # None, "latest" or a sweep id
    workers: int | tuple[int, int] | None = None  # --workers N or MIN:MAX
    use_gpu: bool | str | None = None
    cpus_per_worker: float | None = None
    experiment_file: str = ""
    workdir: str = field(default_factory=lambda: str(Path.cwd()))
    # the dry run's time and cost estimates (`orchestrator.estimate`)
    peak_flops: float | None = None  # FLOP/s per device, instead of the datasheet table
    mfu: float | None = None  # instead of the measured or assumed one
    prices: str | None = None  # prices file, instead of ./prices.yaml
    calibrate: bool = False  # time a few real training steps here (a CPU has no peak FLOP/s)


@dataclass
class Plan:
    """Every trial of a sweep and the resources each asks for."""

    experiment: Experiment
    trials: list[Trial]
    workers: int  # the most workers a trial has (and asks for)
    use_gpu: bool | str
    cpus_per_worker: float
    max_concurrent: int | None
    min_workers: int | None = None  # an elastic trial's fewest (None: always ``workers``)

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.workers

    @property
    def worker_counts(self) -> range:
        """Every number of workers a trial may train on."""
        return range(self.min_workers if self.elastic else self.workers, self.workers + 1)


def make_plan(experiment: Experiment, options: SweepOptions) -> Plan:
    """Every trial of the sweep, validated, and its resources; a CPU trial's torch threads are its worker's CPUs
    (``train.num_threads``, unless the experiment sets it), so the loop sets them, once."""
    cpus_per_worker = options.cpus_per_worker or experiment.cpus_per_worker or 1
    trials = [with_threads(t, cpus_per_worker) for t in expand_trials(experiment, options.overrides)]
    fewest, most = worker_range(options.workers or experiment.workers)
    plan = Plan(
        experiment=experiment,
        trials=trials,
        workers=most,
        use_gpu=experiment.use_gpu if options.use_gpu is None else options.use_gpu,
        cpus_per_worker=cpus_per_worker,
        max_concurrent=concurrency_limit(experiment, options),
        min_workers=fewest if fewest < most else None,
    )
    check_sharding(plan)
    check_batches(plan)
    check_budgets(plan)
    return plan


def check_batches(plan: Plan) -> None:
    """A ``train.global_batch_size`` a worker count of the plan cannot split into whole micro-batches is refused; an
    elastic trial needs one, so that every count trains the same global batch."""
    for trial in plan.trials:
        if not isinstance(trial.job, JobConfig):
            continue
        train = trial.job.train
        if plan.elastic and train.global_batch_size is None:
            raise ExperimentError(
                f"trial {trial.name}: workers=({plan.min_workers}, {plan.workers}) is elastic, and its global batch "
                f"would change with the worker count; set train.global_batch_size (windows per optimizer step, all "
                f"workers together), e.g. {train.batch_size * math.lcm(*plan.worker_counts)}"
            )
        try:
            for count in plan.worker_counts:
                train.accumulation_steps(count)
        except ConfigError as exc:
            raise ExperimentError(f"trial {trial.name}: {exc}{_elastic_note(plan)}") from None


def _elastic_note(plan: Plan) -> str:
    """What a refusal of one worker count adds for an elastic trial: every count in its range must do."""
    if not plan.elastic:
        return ""
    return f"; an elastic trial (workers=({plan.min_workers}, {plan.workers})) may train on any count in its range"


def check_sharding(plan: Plan) -> None:
    """FSDP shards the token embedding by rows across the workers: their number must divide its rows."""
    for trial in plan.trials:
        job = trial.job
        if not isinstance(job, JobConfig) or job.train.parallel != "fsdp":
            continue
        rows = job.model.padded_vocab_size
        for count in plan.worker_counts:
            if rows % count:
                raise SweepError(
                    f"trial {trial.name}: train.parallel=fsdp shards the {rows}-row token embedding across "
                    f"{count} workers, which do not divide it evenly; use a worker count that divides {rows} "
                    f"(e.g. 2, 4 or 8), or a model.pad_vocab_multiple that the worker count divides"
                    f"{_elastic_note(plan)}"
                )


#: The model sizes an iso-FLOP profile needs per budget: a parabola in log N through fewer has no minimum to find.
LADDER_SIZES = 3


def check_budgets(plan: Plan) -> None:
    """Each ``train.flops_budget`` buys a trial at least one optimizer step; a ladder (a grid over budgets) gives
    each budget enough model sizes for its iso-FLOP profile."""
    by_budget: dict[float, set[int]] = {}
    for trial in plan.trials:
        job = trial.job
        if not isinstance(job, JobConfig) or job.train.flops_budget is None:
            continue
        if budget_steps(job, plan.workers) == 0:
            raise SweepError(
                f"trial {trial.name}: train.flops_budget={job.train.flops_budget:.3g} buys no optimizer step (one "
                f"step is {step_flops(job, plan.workers):.3g} FLOPs); raise the budget, or shrink the model or "
                "train.batch_size"
            )
        by_budget.setdefault(job.train.flops_budget, set()).add(param_count(job.model).total)
    if "train.flops_budget" not in plan.experiment.grid:
        return
    for budget, sizes in sorted(by_budget.items()):
        if len(sizes) < LADDER_SIZES:
            raise SweepError(
                f"the ladder's budget train.flops_budget={budget:.3g} has {len(sizes)} model size(s); its iso-FLOP "
                f"profile needs {LADDER_SIZES} or more: add model sizes to the grid (e.g. model.d_model values)"
            )


def with_threads(trial: Trial, cpus_per_worker: float) -> Trial:
    """A training trial whose ``train.num_threads`` is unset, given its worker's CPUs as torch threads."""
    if not isinstance(trial.job, JobConfig) or trial.job.train.num_threads:  # a decode trial, or threads set
        return trial
    return with_train(trial, num_threads=torch_threads(cpus_per_worker))


def with_train(trial: Trial, **fields: Any) -> Trial:
    """A training trial with some ``train.*`` fields of its job replaced (and the job validated again)."""
    job = trial.job
    return dataclasses.replace(trial, job=dataclasses.replace(job, train=dataclasses.replace(job.train, **fields)))


def concurrency_limit(experiment: Experiment, options: SweepOptions) -> int | None:
    """The user's limit on trials at once: ``--max-concurrent``, else the experiment's ``max_concurrent``."""
    return options.max_concurrent or experiment.max_concurrent


def train_rows(plan: Plan, keys: list[str], lengths: dict[str, TrialLength]) -> tuple[list[str], list[list[str]]]:
    """Per trial: its grid values, model, length, and what it costs: parameters, the tokens it trains on and their
    training FLOPs (`gptcore.accounting`), and its peak memory per worker (`gptcore.memory`, live tensors); a length
    that depends on a corpus not prepared yet is said to."""
    rows = []
    for trial in plan.trials:
        job = trial.job
        steps = f"{job.train.epochs} epoch(s)" + (f" <= {job.train.max_steps} steps" if job.train.max_steps else "")
        model = f"{job.model.n_layers}x{job.model.d_model} ctx {job.model.context_length}"
        length = lengths[trial.name]
        bound = "<= " if length.at_most else ""
        if length.tokens is None:
            steps_total, tokens, flops = "?", "after preparation", "?"
        else:
            steps_total, tokens = f"{bound}{length.steps}", f"{bound}{_si(length.tokens)}"
            flops = f"{bound}{training_flops(job.model, length.tokens):.2e}"
        params = _si(param_count(job.model).total)
        row = [model, params, steps, steps_total, tokens, flops, f"{worker_memory(plan, job) / 2**30:.2f} GiB"]
        rows.append([trial.name, *[str(trial.params[k]) for k in keys], *row])
    header = ["model", "params", "length", "steps", "tokens", "FLOPs", "memory/worker"]
    return ["trial", *keys, *header], rows


@dataclass(frozen=True)
class TrialLength:
    """The optimizer steps and tokens a trial trains for, as far as the plan knows them."""

    steps: int | None
    tokens: int | None  # None: known once its corpus is prepared
    at_most: bool  # an upper bound (from train.max_steps or a budget), the corpus not being known here


def trial_length(plan: Plan, trial: Trial, storage: str) -> TrialLength:
    """The length of ``trial``: exact when its corpus is tokenized here or prepared in ``storage``, else at most the
    full steps of ``train.max_steps`` or its budget, else unknown."""
    job = trial.job
    windows = _train_windows(job, storage)
    bounds = [s for s in (job.train.max_steps, budget_steps(job, plan.workers)) if s]
    if windows is None and bounds:  # at most so many full steps, whatever the corpus
        most = min(bounds) * job.train.windows_per_step(plan.workers) * job.model.context_length
        return TrialLength(min(bounds), most, at_most=True)
    if windows is None:
        return TrialLength(None, None, at_most=False)
    try:
        length = run_length(job, windows, plan.workers)
    except ValueError as exc:  # as the run refuses it (`check_data`)
        raise ExperimentError(f"trial {trial.name}: {exc}") from None
    return TrialLength(length.total_steps, length.tokens, at_most=False)


def worker_memory(plan: Plan, job: JobConfig, device_type: str | None = None) -> int:
    """Bytes one worker of ``job`` holds at its peak (`gptcore.memory`: live tensors), on ``device_type`` (default:
    the plan's device)."""
    device_type = device_type or _device_type(plan)
    return peak_memory(job, plan.workers, device_type, bf16_faster=_native_bf16(device_type)).total


def _device_type(plan: Plan) -> str:
    return "cuda" if plan.use_gpu is True else "cpu"


MEMORY_FIX = (
    "lower train.batch_size (raise train.grad_accum_steps to keep the batch), set train.activation_checkpointing=true "
    "or pick a smaller model, or run on a cluster with --address"
)


def memory_misfits(plan: Plan) -> tuple[str, dict[str, float]]:
    """What a local Ray has for a trial's workers, said ("this machine has 23.6 GiB"; on GPUs, one per worker), and
    the GiB each training trial needs that does not fit it (none for a decode sweep)."""
    import psutil

    if plan.experiment.is_decode:
        return "", {}
    gpu = _device_type(plan) == "cuda"
    if gpu:
        import torch

        if not torch.cuda.is_available():
            return "", {}  # refused as such (`orchestrator.cluster.check_local_gpu`)
        have, where = torch.cuda.get_device_properties(0).total_memory, "each GPU of this machine"
    else:
        have, where = psutil.virtual_memory().total, "this machine"
    misfits = {}
    for trial in plan.trials:
        need = worker_memory(plan, trial.job) * (1 if gpu else plan.workers)  # a local Ray runs every worker here
        if need > have:
            misfits[trial.name] = need / 2**30
    return f"{where} has {have / 2**30:.1f} GiB", misfits


def check_memory(plan: Plan, address: str | None) -> None:
    """Before a local Ray starts: a trial whose peak memory (the estimate of its live tensors, a lower bound of what
    the process takes) exceeds this machine's would die mid-run, so it is refused, naming what to change. The
    nodes of a cluster (``address``) are not known here."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    have, misfits = memory_misfits(plan)
    if misfits:
        name, need = next(iter(misfits.items()))
        job = next(t.job for t in plan.trials if t.name == name)
        raise SweepError(
            f"trial {name} needs {need:.1f} GiB of memory at its peak ({plan.workers} worker(s): weights, gradients, "
            f"AdamW state and the activations of {job.train.batch_size} x {job.model.context_length} tokens) but "
            f"{have}; {MEMORY_FIX}"
        )


def node_type_fits(plan: Plan, job: JobConfig, node_types: list[NodeType]) -> dict[str, bool | None]:
    """Whether ``job``'s workers fit each node type that holds one of them (`orchestrator.node_types.fits`: on GPUs
    in a GPU's memory, on CPUs in a node's RAM; None where that memory is not known)."""
    gpu = uses_gpu(plan.use_gpu, node_types)
    need = worker_memory(plan, job, "cuda" if gpu else "cpu")
    return {
        t.name: fits(t, need, plan.workers, plan.cpus_per_worker, gpu)
        for t in node_types
        if workers_per_node(t, plan.cpus_per_worker, gpu)
    }


def fitting_node_types(plan: Plan, job: JobConfig, node_types: list[NodeType]) -> list[NodeType]:
    """The node types ``job``'s workers are known to fit."""
    verdicts = node_type_fits(plan, job, node_types)
    return [t for t in node_types if verdicts.get(t.name)]


def cluster_misfits(plan: Plan, node_types: list[NodeType]) -> dict[str, float]:
    """The training trials that fit none of the ``node_types`` that hold their workers (each one's memory known and
    too small), with the GiB one worker needs."""
    if plan.experiment.is_decode:
        return {}
    device = "cuda" if uses_gpu(plan.use_gpu, node_types) else "cpu"
    misfits = {}
    for trial in plan.trials:
        verdicts = node_type_fits(plan, trial.job, node_types)
        if verdicts and all(v is False for v in verdicts.values()):
            misfits[trial.name] = worker_memory(plan, trial.job, device) / 2**30
    return misfits


CLUSTER_MEMORY_FIX = (
    "lower train.batch_size (raise train.grad_accum_steps to keep the batch), set train.activation_checkpointing=true, "
    "shard it with train.parallel=fsdp over more workers, pick a smaller model, or add a node type with more memory"
)


def cluster_memory_lines(plan: Plan, node_types: list[NodeType], source: str) -> list[str]:
    """The dry run's fit of each trial's peak memory per worker against the node types of ``source``: per type,
    how many trials fit, and the trials that fit none, with the fix."""
    if not node_types or plan.experiment.is_decode:
        return []
    gpu = uses_gpu(plan.use_gpu, node_types)
    verdicts = [node_type_fits(plan, trial.job, node_types) for trial in plan.trials]
    lines = [f"memory per worker ({'on a GPU' if gpu else 'in RAM'}) vs the node types of {source}:"]
    for node in node_types:
        said = [v[node.name] for v in verdicts if node.name in v]
        if not said:
            fit = f"holds no worker ({plan.cpus_per_worker:g} CPU{', 1 GPU' if gpu else ''} each)"
        elif any(v is None for v in said):
            fit = "memory unknown"
        elif all(said):
            fit = "every trial fits"
        else:
            fit = f"{sum(said)} of {len(said)} trial(s) fit"
        lines.append(f"  {node.describe()}: {fit}")
    misfits = cluster_misfits(plan, node_types)
    if misfits:
        needs = ", ".join(f"{name} needs {need:.1f} GiB" for name, need in misfits.items())
        lines.append(f"  fits no node type: {needs}; {CLUSTER_MEMORY_FIX}")
    return lines


def check_cluster_memory(plan: Plan, use_gpu: bool, address: str | None) -> None:
    """Once a joined cluster (``address``, or ``RAY_ADDRESS``) is up, before anything of the sweep is written: a trial
    whose workers fit none of its node types (on GPUs or CPUs, as ``use_gpu`` was resolved) would never be placed, or
    die mid-run, so it is refused, naming what to change."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or plan.experiment.is_decode:
        return
    node_types, resolved = live_node_types(), dataclasses.replace(plan, use_gpu=use_gpu)
    misfits = cluster_misfits(resolved, node_types)
    if misfits:
        name, need = next(iter(misfits.items()))
        kinds = ", ".join(t.describe() for t in node_types if workers_per_node(t, plan.cpus_per_worker, use_gpu))
        raise SweepError(
            f"trial {name} needs {need:.1f} GiB per worker at its peak ({'on a GPU' if use_gpu else 'in RAM'}), more "
            f"than any node type of the Ray cluster at {address} has ({kinds}); {CLUSTER_MEMORY_FIX}"
        )


def _native_bf16(device_type: str) -> bool:
    """Whether the workers train faster in bf16, for ``train.precision=auto``: GPUs are taken to (every GPU since the
    A100 does); CPUs are taken to be this machine's kind, as its measurement says (`gptcore.runtime.bf16_faster`)."""
    if device_type == "cuda":
        return True
    import torch

    from gptcore.runtime import bf16_faster

    return bf16_faster(torch.device("cpu"), "train")


def _train_windows(job: JobConfig, storage: str) -> int | None:
    """The train split's windows of ``job``, when its corpus is small enough to tokenize here (into the cache, as a
    run checks it before it starts) or already prepared in ``storage``; None for a corpus that needs the cluster, or
    that this machine cannot read (a cluster's path: the run itself checks it)."""
    try:
        corpus = plan_corpus(job.data)
        folder = stage_locally(corpus)
    except DataError:
        return None
    manifest = read_manifest(folder) if folder else read_dataset_manifest(dataset_location(storage, corpus.key))
    if manifest is None:
        return None
    return window_count(manifest.tokens("train"), job.model.context_length, job.stride)


def _si(count: float) -> str:
    """``count`` in a few digits: 1.62M, 87.0k, 124M."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= factor:
            return f"{count / factor:.3g}{suffix}"
    return f"{count:g}"


def check_data(trials: list[Trial], workers: int = 1) -> None:
    """Before anything starts or is written: each trial's corpus resolved and checked; a small corpus tokenized
    (into the local cache), both its splits checked to hold a window and its train split a batch of ``workers``."""
    staged: dict[str, Manifest | None] = {}
    for trial in trials:
        job = trial.job
        try:
            plan = plan_corpus(job.data)
            if plan.key not in staged:
                folder = stage_locally(plan)
                staged[plan.key] = read_manifest(folder) if folder else None
            manifest = staged[plan.key]
            if manifest is not None:
                check_windows(job, manifest)
                run_length(job, window_count(manifest.tokens("train"), job.model.context_length, job.stride), workers)
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
    from gptcore.checkpoint import check_fits, init_source_kind
    from gptcore.checkpoint_format import META_FILE, CheckpointError
    from gptcore.load_pretrained import check_compatible, config_from_pretrained

    resolved, seen = [], set()
    for trial in trials:
        source, model = trial.job.train.init_from, trial.job.model
        if init_source_kind(source) in ("scratch", "hub"):  # a Hugging Face model id is downloaded by the trial
            resolved.append(trial)
            continue
        path = Path(source).expanduser().absolute()
        resolved.append(with_train(trial, init_from=str(path)))
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
