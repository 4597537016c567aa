"""The dry run's text: a sweep's plan, each trial's memory against this machine and the cluster's node types, and
its estimated time and cost (`orchestrator.estimate`); nothing starts."""

from __future__ import annotations

import os

from orchestrator.decode_plan import decode_rows
from orchestrator.estimate import describe_estimates
from orchestrator.node_types import node_types_of
from orchestrator.plan import (
    MEMORY_FIX,
    Plan,
    SweepOptions,
    cluster_memory_lines,
    memory_misfits,
    train_rows,
    trial_length,
)
from orchestrator.storage import absolute_storage
from orchestrator.tracking import resolve_tracking_uri


def describe_plan(plan: Plan, options: SweepOptions) -> str:
    """The dry-run text: every trial, its grid values and resources, where results go, its memory against this
    machine and the node types of the cluster, its length and FLOPs, and its time and cost."""
    gpu = {True: "1 GPU", False: "no GPU", "auto": "GPU if the cluster has one"}[plan.use_gpu]
    lines = [
        f"experiment {plan.experiment.name}: {len(plan.trials)} trial(s), metric {plan.experiment.metric} "
        f"({plan.experiment.mode})",
        f"resources per trial: {_workers_said(plan)} x ({plan.cpus_per_worker:g} CPU, {gpu})"
        + (f", at most {plan.max_concurrent} concurrent" if plan.max_concurrent else ""),
        f"storage: {absolute_storage(options.storage, options.workdir)}",
        f"tracking: {resolve_tracking_uri(options.tracking_uri, options.workdir)}",
        f"ray: {options.address or 'a local Ray started for this run'}",
    ]
    if plan.experiment.scheduler:
        lines.append(f"scheduler: {plan.experiment.scheduler}")
    if not (options.address or os.environ.get("RAY_ADDRESS")):
        have, misfits = memory_misfits(plan)
        if misfits:
            needs = ", ".join(f"{name} needs {need:.1f} GiB" for name, need in misfits.items())
            lines.append(f"memory: {have}; does not fit: {needs}; {MEMORY_FIX}")
        elif have:
            lines.append(f"memory: {have}; every trial fits")
    keys = list(plan.experiment.grid)
    if plan.experiment.is_decode:
        header, rows = decode_rows(plan.trials, keys)
    else:
        storage = absolute_storage(options.storage, options.workdir)
        lengths = {trial.name: trial_length(plan, trial, storage) for trial in plan.trials}
        node_types, source = node_types_of(options.address, options.workdir)
        lines += cluster_memory_lines(plan, node_types, source)
        header, rows = train_rows(plan, keys, lengths)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    if not plan.experiment.is_decode:
        lines += describe_estimates(plan, options, lengths, node_types, source)
    return "\n".join(lines)


def _workers_said(plan: Plan) -> str:
    """The workers of a trial, said: "2 worker(s)", or an elastic range."""
    if plan.elastic:
        return f"{plan.min_workers} to {plan.workers} workers (elastic: as many as the cluster has)"
    return f"{plan.workers} worker(s)"
