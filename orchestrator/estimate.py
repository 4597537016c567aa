"""How long each trial of a sweep will train and what it will cost, before it runs: the dry run's estimate table.

The rules, one function each:

- On GPUs (`gpu_seconds`): training FLOPs (`gptcore.accounting`) / (workers x peak FLOP/s of one GPU x MFU). The peak
  is the datasheet's (`gptcore.hardware.peak_flops_of`) unless ``run --peak-flops`` gives one; the MFU is the one the
  experiment's finished trials logged in MLflow (`measured_mfu`), else ``run --mfu``, else `ASSUMED_MFU`, said as
  an assumption.
- On this machine's CPU (`calibrated_seconds`), with ``run --calibrate``: tokens / (workers x the tokens/s a few real
  steps of the trial's model took here, `orchestrator.calibration`); workers are taken to scale linearly, which is
  said. Without it, "unknown": timing steps takes seconds per model, minutes for a large one, so a dry run asks. A
  CPU elsewhere (a cluster's CPU node) has no known speed: "unknown", unless ``--peak-flops`` names one.
- Cost (`cost`): hours x nodes x price per node-hour (`orchestrator.prices`), on-demand and spot, on the node type
  `cheapest` picks among those the trial fits (`orchestrator.plan.node_type_fits`).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from gptcore.accounting import training_flops
from gptcore.config import JobConfig
from gptcore.hardware import peak_flops_of
from orchestrator.node_types import NodeType, nodes_needed, uses_gpu
from orchestrator.plan import Plan, SweepOptions, TrialLength, fitting_node_types, memory_misfits
from orchestrator.prices import NodePrice, prices_path, read_prices

#: The MFU taken when no earlier trial measured one: a well-tuned single-node GPT-2 run reaches 40-50 % on an A100
#: (nanoGPT, llm.c); an assumption, printed as one.
ASSUMED_MFU = 0.40


def gpu_seconds(flops: float, workers: int, peak_per_gpu: float, mfu: float) -> float:
    """Seconds to train ``flops`` FLOPs on ``workers`` GPUs of ``peak_per_gpu`` FLOP/s each, at ``mfu``."""
    return flops / (workers * peak_per_gpu * mfu)


def calibrated_seconds(tokens: float, workers: int, tokens_per_sec_per_worker: float) -> float:
    """Seconds to train on ``tokens`` tokens at a measured speed per worker, ``workers`` scaling linearly."""
    return tokens / (workers * tokens_per_sec_per_worker)


def cost(seconds: float, nodes: int, price_per_node_hour: float) -> float:
    """USD for ``nodes`` nodes held ``seconds`` seconds at ``price_per_node_hour``."""
    return seconds / 3600 * nodes * price_per_node_hour


@dataclass(frozen=True)
class Mfu:
    """The MFU the estimates use, and where it comes from, said in the dry run."""

    value: float
    source: str


def measured_mfu(tracking_uri: str, experiment: str) -> tuple[float, str] | None:
    """The median of the last logged ``mfu`` (`orchestrator.hooks.MlflowLogging`, GPU trials of a known peak) over
    the finished trials of ``experiment`` in MLflow, and what it is the median of; None when there are none, or no
    store yet (a dry run creates none)."""
    from urllib.parse import urlparse

    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("sqlite", "file") and not Path(parsed.path).exists():  # opening a store would create it
        return None
    from mlflow import MlflowClient

    from orchestrator.tracking import ROLE_TAG, STATUS_TAG

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    query = f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STATUS_TAG}` = 'finished'"
    runs = [r for r in client.search_runs([found.experiment_id], query, max_results=10_000) if "mfu" in r.data.metrics]
    if not runs:
        return None
    devices = sorted({r.data.tags.get("device", "?") for r in runs})
    median = statistics.median(r.data.metrics["mfu"] for r in runs)
    return (
        median,
        f"measured: the median of {len(runs)} finished trial(s) of {experiment} in MLflow, on {', '.join(devices)}",
    )


def choose_mfu(options: SweepOptions, plan: Plan) -> Mfu:
    """The user's ``--mfu``, else the experiment's measured MFU, else `ASSUMED_MFU`, each said as what it is."""
    from orchestrator.tracking import TrackingError, check_reachable, resolve_tracking_uri

    if options.mfu is not None:
        return Mfu(options.mfu, "given (--mfu)")
    uri = resolve_tracking_uri(options.tracking_uri, options.workdir)
    try:
        check_reachable(uri)
    except TrackingError:  # a dry run plans without the server; the run itself refuses to start without it
        return Mfu(ASSUMED_MFU, f"assumed: the MLflow server {uri} is unreachable; --mfu sets it")
    measured = measured_mfu(uri, plan.experiment.name)
    if measured:
        return Mfu(*measured)
    return Mfu(ASSUMED_MFU, f"assumed: no finished trial of {plan.experiment.name} in MLflow logged one; --mfu sets it")


@dataclass(frozen=True)
class Estimate:
    """One trial's time (seconds) and cost (USD) on one node type; None where unknown."""

    node: NodeType | None
    nodes: int | None
    seconds: float | None
    on_demand: float | None
    spot: float | None
    unknown: str = ""  # without a node type: why (it fits none, or its length is not known yet)


def node_type_estimate(
    plan: Plan, flops: float, node: NodeType, gpu: bool, mfu: Mfu, peak: float | None, price: NodePrice | None
) -> Estimate:
    """A trial of ``flops`` training FLOPs on nodes of ``node``: its nodes, time and cost."""
    nodes = nodes_needed(node, plan.workers, plan.cpus_per_worker, gpu)
    peak = peak or (peak_flops_of(node.accelerator) if gpu and node.accelerator else None)
    seconds = gpu_seconds(flops, plan.workers, peak, mfu.value) if peak and nodes else None
    priced = {"on_demand": None, "spot": None}
    if seconds is not None and price is not None:
        for market in priced:
            per_hour = getattr(price, market)
            priced[market] = None if per_hour is None else cost(seconds, nodes, per_hour)
    return Estimate(node, nodes, seconds, **priced)


def cheapest(estimates: list[Estimate]) -> Estimate | None:
    """The estimate of the node type that costs least: on-demand where priced, else spot; then the fastest."""
    unknown = float("inf")

    def order(e: Estimate) -> tuple[float, float, float]:
        return (
            e.on_demand if e.on_demand is not None else unknown,
            e.spot if e.spot is not None else unknown,
            e.seconds if e.seconds is not None else unknown,
        )

    return min(estimates, key=order, default=None)


def priced_node_types(options: SweepOptions, node_types: list[NodeType]) -> list[str]:
    """The node type names a prices file may name: cluster.yaml's (a prices file is written for it, and a running
    cluster's nodes have no such names), else those of ``node_types``."""
    from orchestrator.node_types import cluster_yaml_node_types

    path = Path(options.workdir, "cluster.yaml")
    return [t.name for t in (cluster_yaml_node_types(path) if path.is_file() else node_types)]


def describe_estimates(
    plan: Plan, options: SweepOptions, lengths: dict[str, TrialLength], node_types: list[NodeType], source: str
) -> list[str]:
    """The dry run's estimate of each trial's time and cost, and the sweep's: the lines that say how, then a table
    with, for a local run, the time on this machine, and for a cluster's node types, the cheapest that fits."""
    local = not (options.address or os.environ.get("RAY_ADDRESS"))
    mfu = choose_mfu(options, plan)
    path = prices_path(options.prices, options.workdir)
    prices = read_prices(path, priced_node_types(options, node_types)) if path and node_types else {}
    gpu = uses_gpu(plan.use_gpu, node_types)
    lines = [f"time: training FLOPs / (GPUs x peak FLOP/s x MFU), MFU {mfu.value * 100:.0f} % ({mfu.source})"]
    if options.peak_flops:
        lines.append(f"peak: {options.peak_flops:.3g} FLOP/s per device (--peak-flops)")
    here = here_seconds(plan, lengths, options, mfu, lines) if local else {}
    rows, totals = [], {"here": 0.0, "seconds": 0.0, "on_demand": 0.0, "spot": 0.0}
    for trial in plan.trials:
        length = lengths[trial.name]
        bound = "<= " if length.at_most else ""
        row = [trial.name]
        if local:
            row.append(_duration(here.get(trial.name), bound))
            totals["here"] = _add(totals["here"], here.get(trial.name))
        if node_types:
            best = trial_estimate(plan, trial.job, length, node_types, gpu, mfu, options.peak_flops, prices)
            row += _estimate_cells(best, bound, path)
            for key in ("seconds", "on_demand", "spot"):
                totals[key] = _add(totals[key], getattr(best, key))
        rows.append(row)
    if not local and not node_types:
        return lines
    header = [
        "trial",
        *(["here"] if local else []),
        *(["node type", "nodes", "time", "on-demand", "spot"] * bool(node_types)),
    ]
    if node_types:
        lines.append(
            f"cost: hours x nodes x USD per node-hour ({path.name if path else 'no prices file: add prices.yaml'}); "
            f"node type: the cheapest of {source} whose memory fits the trial"
        )
    bound = "<= " if any(length.at_most for length in lengths.values()) else ""
    total = ["sweep (sum)", *([_duration(totals["here"], bound)] if local else [])]
    if node_types:
        sums = Estimate(None, None, totals["seconds"], totals["on_demand"], totals["spot"])
        total += ["", "", *_estimate_cells(sums, bound, path)[2:]]
    widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(header))]
    for row in [header, *rows, total]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def trial_estimate(
    plan: Plan,
    job: JobConfig,
    length: TrialLength,
    node_types: list[NodeType],
    gpu: bool,
    mfu: Mfu,
    peak: float | None,
    prices: dict[str, NodePrice],
) -> Estimate:
    """A trial's estimate on the cheapest node type its memory fits; nothing known when it fits none, or its length
    is not known yet."""
    fitting = fitting_node_types(plan, job, node_types)
    if not fitting:
        return Estimate(None, None, None, None, None, unknown="fits none")
    if length.tokens is None:
        return Estimate(None, None, None, None, None, unknown="length unknown")
    flops = training_flops(job.model, length.tokens)
    return cheapest([node_type_estimate(plan, flops, t, gpu, mfu, peak, prices.get(t.name)) for t in fitting])


def _estimate_cells(e: Estimate, bound: str, prices: Path | None) -> list[str]:
    """Node type, nodes, time, on-demand and spot cost of an estimate, as the table shows them."""
    node = e.node.name if e.node else e.unknown
    nodes = "" if e.nodes is None else str(e.nodes)
    if e.seconds is None:
        return [node, nodes, "unknown", "unknown", "unknown"]
    return [
        node,
        nodes,
        _duration(e.seconds, bound),
        _dollars(e.on_demand, bound, prices),
        _dollars(e.spot, bound, prices),
    ]


def here_seconds(
    plan: Plan, lengths: dict[str, TrialLength], options: SweepOptions, mfu: Mfu, lines: list[str]
) -> dict[str, float | None]:
    """Each trial's seconds on this machine (a local Ray): on its GPUs from their peak and the MFU, on its CPU from a
    calibration of each distinct model (``--calibrate``) or ``--peak-flops``; None for a trial that does not fit
    here, or a CPU not calibrated. Says how in ``lines``."""
    from orchestrator.calibration import CALIBRATION_STEPS, calibrate, calibration_job

    gpu_name = _local_gpu(plan)
    if plan.use_gpu is True and gpu_name is None:
        lines.append("here: unknown, this machine has no GPU for trials that need one")
        return {trial.name: None for trial in plan.trials}
    _, misfits = memory_misfits(plan)
    calibrated: set[JobConfig] = set()
    started = time.perf_counter()
    seconds: dict[str, float | None] = {}
    for trial in plan.trials:
        job, length = trial.job, lengths[trial.name]
        if length.tokens is None or trial.name in misfits:
            seconds[trial.name] = None
            continue
        flops = training_flops(job.model, length.tokens)
        peak = options.peak_flops or (peak_flops_of(gpu_name) if gpu_name else None)
        if peak:
            seconds[trial.name] = gpu_seconds(flops, plan.workers, peak, mfu.value)
        elif gpu_name or not options.calibrate:
            seconds[trial.name] = None  # a GPU of no known peak (no calibration on GPUs), or a CPU not timed
        else:
            calibrated.add(calibration_job(job))
            seconds[trial.name] = calibrated_seconds(length.tokens, plan.workers, calibrate(job))
    if calibrated:
        scaling = f"; {plan.workers} workers taken to scale linearly" if plan.workers > 1 else ""
        lines.append(
            f"here: this machine's CPU, {CALIBRATION_STEPS - 1} of {CALIBRATION_STEPS} real training steps of each "
            f"model timed ({len(calibrated)} model(s), {time.perf_counter() - started:.0f} s){scaling}"
        )
    elif gpu_name and not (options.peak_flops or peak_flops_of(gpu_name)):
        lines.append(f"here: {gpu_name} has no known peak FLOP/s; --peak-flops gives one")
    elif not gpu_name and not options.peak_flops:
        lines.append(
            f"here: unknown, a CPU has no peak FLOP/s; --calibrate times {CALIBRATION_STEPS} real training steps of "
            "each model here (seconds for small models, ~10 s for a gpt2-small on 2 cores)"
        )
    return seconds


def _local_gpu(plan: Plan) -> str | None:
    """The name of this machine's first GPU when a local run trains on it, else None."""
    if plan.use_gpu is False:
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _add(total: float | None, value: float | None) -> float | None:
    return None if total is None or value is None else total + value


def _duration(seconds: float | None, bound: str = "") -> str:
    """``seconds`` in a readable unit: 42 s, 3.1 min, 5.2 h, 2.0 days; "unknown" for None."""
    if seconds is None:
        return "unknown"
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{bound}{seconds / size:.1f} {unit}"
    return f"{bound}{seconds:.2g} s" if seconds < 10 else f"{bound}{seconds:.0f} s"


def _dollars(usd: float | None, bound: str, prices: Path | None) -> str:
    """``usd`` as $1,234.56 or $0.0012 (3 digits); "no price" without one."""
    if usd is None:
        return "no price" if prices is None else "-"
    return f"{bound}${usd:,.2f}" if usd >= 1 else f"{bound}${usd:.2g}"
