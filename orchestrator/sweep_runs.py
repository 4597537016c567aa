"""A new sweep's MLflow runs, created on the driver before any trial starts: its parent run, one child run per trial.

The parent run holds the grid, the overrides and the sweep's description; each child run its trial's resolved
config (params and ``config.json``), tags and dataset input. Each trial's `TrialSpec` names its child run.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptcore.shards import Manifest
from orchestrator.experiment import Experiment, Trial
from orchestrator.plan import Plan, SweepOptions
from orchestrator.provenance import file_docstring, git_commit, source_tags
from orchestrator.settings import SweepSettings, trains_in_trial_actor
from orchestrator.tracking import KIND_TAG, NOTE_TAG, WORKERS_TAG, SweepTracker, cluster_tracking_uri
from orchestrator.trial_spec import TrialSpec, job_sections


def start_sweep_run(
    tracker: SweepTracker,
    experiment: Experiment,
    options: SweepOptions,
    plan: Plan,
    sweep_id: str,
    storage: str,
    use_gpu: bool,
) -> SweepSettings:
    """Create the sweep's parent run; returns the settings every trial needs (``use_gpu`` resolved on the cluster)."""
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
            "storage": storage,
            KIND_TAG: experiment.kind,
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
        scheduler=experiment.scheduler_settings(),
        max_concurrent=plan.max_concurrent,
        in_trial_actor=not experiment.is_decode
        and trains_in_trial_actor(
            plan.workers,
            (t.job.train.parallel for t in plan.trials),
            elastic=plan.elastic,
            spot=experiment.spot,
        ),
        min_workers=plan.min_workers if plan.elastic else None,
        elastic_resize_s=experiment.elastic_resize_s,
        spot=experiment.spot,
    )


def sweep_description(experiment: Experiment, plan: Plan, options: SweepOptions) -> str:
    """The parent run's description: the grid, the base model and data, the metric, the overrides."""
    axes = "; ".join(f"{k} in {', '.join(json.dumps(x, default=str) for x in v)}" for k, v in experiment.grid.items())
    lines = [f"{len(plan.trials)} trial(s) of {experiment.name} over {axes}."]
    if not experiment.is_decode:
        lines.append(f"Model {experiment.model}, corpus {experiment.corpus or experiment.data.get('corpus', '')}.")
    lines.append(f"Ranked by {experiment.metric} ({experiment.mode}).")
    if plan.elastic:
        lines.append(f"Elastic trials: {plan.min_workers} to {plan.workers} workers, as many as the cluster has.")
    if options.overrides:
        sets = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in options.overrides.items())
        lines.append(f"Overrides: {sets}.")
    if experiment.description:
        lines.append(experiment.description)
    return " ".join(lines)


def create_trial_runs(
    tracker: SweepTracker, settings: SweepSettings, trials: list[Trial], datasets: dict[str, tuple[str, Manifest]]
) -> dict[str, TrialSpec]:
    """One MLflow child run per trial (status pending, its dataset input logged), created up front; returns each
    trial's spec, by name."""
    specs = {}
    for trial in trials:
        tags = {**trial.tags, **source_tags(settings.experiment_file, settings.git_commit)}
        if settings.kind == "train":
            tags[WORKERS_TAG] = settings.workers_said()
        params = {**trial.job.flat(), **{f"grid.{k}": v for k, v in trial.params.items()}}
        run_id = tracker.child_run(settings.parent_run_id, settings.sweep_id, trial.name, params=params, tags=tags)
        tracker.client.log_dict(run_id, job_sections(trial.job), "config.json")  # the resolved config, as a file
        location = None
        if trial.name in datasets:
            location, manifest = datasets[trial.name]
            _log_dataset(tracker, run_id, trial, location, manifest)
        specs[trial.name] = TrialSpec(trial.name, trial.params, trial.job, run_id, location)
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
