"""Run a sweep on Ray Tune to its end, new or resumed, and record each trial's outcome in MLflow.

One Tune trial per grid point: gptcore's loop in the trial actor, or in a Ray Train run of its own when the trial
has several workers or a sharded model (`orchestrator.trial`); for a decode sweep a sampling run
(`orchestrator.decode_trial`). Planning, the cluster, sweep.json and the MLflow runs it starts from are
`orchestrator.plan`, `orchestrator.cluster`, `orchestrator.resume` and `orchestrator.sweep_runs`.

Layout in storage (a local folder or an ``s3://`` URI)::

    <storage>/<sweep_id>/sweep.json                   the plan: trials, configs, settings (used by --resume)
    <storage>/<sweep_id>/<trial>/...                  Tune's trial files
    <storage>/<sweep_id>/<trial>/checkpoint_*         a trial's checkpoints, trained in the trial actor (Tune's)
    <storage>/<sweep_id>/<trial>/train/checkpoint_*   a trial's checkpoints, trained by Ray Train workers

Either way a checkpoint is a gptcore checkpoint folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.cluster import check_cpus, check_local_gpu, connect_ray, max_concurrent_trials, resolve_gpu
from orchestrator.decode_plan import resolve_checkpoints
from orchestrator.decode_trial import decode_trainable
from orchestrator.decoding import is_decode
from orchestrator.experiment import ASHA, Experiment
from orchestrator.plan import (
    Plan,
    SweepOptions,
    check_cluster_memory,
    check_data,
    check_memory,
    make_plan,
    prepare_data,
    resolve_init,
)
from orchestrator.resume import find_sweep, read_sweep, refuse_changes_on_resume, write_sweep
from orchestrator.settings import SweepSettings
from orchestrator.storage import absolute_storage, storage_uri
from orchestrator.storage import join as join_path
from orchestrator.sweep_runs import create_trial_runs, start_sweep_run
from orchestrator.tracking import (
    BEST_CHECKPOINT_TAG,
    STATUS_TAG,
    SweepTracker,
    check_reachable,
    default_artifact_root,
    mlflow_status,
    resolve_tracking_uri,
    wait_until_reachable,
)
from orchestrator.trial import trainable as trial_trainable
from orchestrator.trial_spec import TrialSpec


@dataclass
class SweepOutcome:
    """How a sweep ended: where its results are, and each trial's status."""

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
) -> tuple[str, dict[str, TrialSpec], SweepSettings, SweepTracker]:
    """A sweep to resume, as its sweep.json says (flags that would change it are refused): Ray connected with the
    resources it needs, its parent run running again."""
    import ray

    refuse_changes_on_resume(vars(options))
    sweep_id = find_sweep(storage, experiment.name, options.resume)
    specs, settings = read_sweep(storage, sweep_id, experiment)
    check_reachable(settings.tracking_uri)
    tracker = SweepTracker(settings.tracking_uri, settings.experiment, artifact_root=settings.artifact_root)
    print(f"resuming sweep {sweep_id}: {len(specs)} trial(s)", flush=True)
    connect_ray(options.address, preemptible=settings.preemptible)
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
) -> tuple[str, dict[str, TrialSpec], SweepSettings, SweepTracker]:
    """A new sweep: checked, Ray connected, then its parent and trial runs created and its sweep.json written."""
    import ray

    plan = plan or make_plan(experiment, options)
    uri = resolve_tracking_uri(options.tracking_uri, options.workdir)
    check_reachable(uri)
    if experiment.is_decode:
        plan.trials = resolve_checkpoints(plan.trials, uri)
    else:
        check_data(plan.trials, plan.workers)
        plan.trials = resolve_init(plan.trials)
    check_local_gpu(plan.use_gpu, options.address, wait_for_resources)
    check_memory(plan, options.address)
    sweep_id = f"{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    artifact_root = None if options.tracking_uri else default_artifact_root(options.workdir)
    connect_ray(options.address, preemptible=experiment.spot or plan.elastic)
    try:  # nothing is written (tracking store, storage) until Ray is up with the resources the sweep needs
        use_gpu = resolve_gpu(plan.use_gpu, wait_for_resources)
        check_cluster_memory(plan, use_gpu, options.address)
        check_cpus(plan.cpus_per_worker, wait_for_resources)
        datasets = {} if experiment.is_decode else prepare_data(plan.trials, storage)
        tracker = SweepTracker(uri, experiment.name, artifact_root=artifact_root)
        settings = start_sweep_run(tracker, experiment, options, plan, sweep_id, storage, use_gpu)
        specs = create_trial_runs(tracker, settings, plan.trials, datasets)
        write_sweep(specs, settings)
    except BaseException:
        ray.shutdown()
        raise
    return sweep_id, specs, settings, tracker


def _tuner(specs: dict[str, TrialSpec], settings: SweepSettings, sweep_dir: str, options: SweepOptions):
    """The Tuner of the sweep: restored from ``sweep_dir`` when resuming one Tune saved, else new."""
    import ray.tune

    if settings.in_trial_actor:
        # Tune restores such a trial from the latest checkpoint its saved state names, and saves that state every
        # 10 s or more ("auto"): a driver killed in between would resume trials from an older checkpoint (or from
        # scratch), one that Tune may even have deleted since. (A TorchTrainer saves its own at every report.)
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # inference in the Tune trial itself
    trainable = decode_trainable(specs, settings) if is_decode(settings.kind) else trial_trainable(specs, settings)
    if options.resume and ray.tune.Tuner.can_restore(sweep_dir):
        return ray.tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    return _new_tuner(trainable, list(specs), settings, options.address)


def _new_tuner(trainable, names: list[str], settings: SweepSettings, address: str | None):
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
            # a trial's actor runs the next trial, which then starts no process and imports no Ray Train. Not with
            # a scheduler: a trial it stops is still inside TorchTrainer.fit, and Tune errors the next trial.
            reuse_actors=scheduler is None,
            trial_name_creator=lambda t: t.config["trial"],
            trial_dirname_creator=lambda t: t.config["trial"],
        ),
        run_config=ray.tune.RunConfig(
            name=settings.sweep_id,
            storage_path=settings.storage,
            # A trial in its actor is Tune's to restart and checkpoint; a TorchTrainer restarts its own workers
            failure_config=ray.tune.FailureConfig(max_failures=settings.max_failures if settings.in_trial_actor else 0),
            checkpoint_config=ray.tune.CheckpointConfig(
                num_to_keep=settings.checkpoints_to_keep,
                checkpoint_score_attribute=settings.metric,
                checkpoint_score_order=settings.mode,
            ),
            verbose=1,
        ),
    )


def _trial_states(grid, sweep_dir: str) -> dict[str, tuple[str, dict[str, Any], Any]]:
    """Tune's view of each trial: (status, last metrics, result).

    The status is the one Tune saved in the sweep's state, as ``--resume`` reads it: a trial still running when the
    sweep was interrupted is saved RUNNING (to train again), though Tune then ends it as TERMINATED in memory, the
    status of a trial the scheduler stopped. A trial Tune gave up on is ERROR whatever the saved state says: Tune may
    save its state before the trial's last failure is processed (then RUNNING, to be retried).
    """
    from ray.tune import ExperimentAnalysis

    states = {}
    analysis = getattr(grid, "_experiment_analysis", None)
    tune_status = {t.config.get("trial"): t.status for t in getattr(analysis, "trials", [])}
    try:
        saved = {t.config.get("trial"): t.status for t in ExperimentAnalysis(sweep_dir).trials}
        tune_status.update({name: s for name, s in saved.items() if tune_status.get(name) != "ERROR"})
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
    """The URI of the trial's checkpoint of the best ``settings.metric``: one Tune kept (named by its folder in the
    trial's), or one its Ray Train run did (by its path, as TuneReportCallback reported it)."""
    df = result.metrics_dataframe
    column = "checkpoint_dir_name" if settings.in_trial_actor else "checkpoint_path"
    if df is None or column not in df or settings.metric not in df:
        return None
    rows = df[df[column].notna()]
    if rows.empty:
        return None
    scores = rows[settings.metric]
    best = str(rows.loc[scores.idxmin() if settings.mode == "min" else scores.idxmax(), column])
    if settings.in_trial_actor:
        return join_path(settings.storage, settings.sweep_id, str(result.config["trial"]), best)
    return storage_uri(settings.storage, best)


ENDED_WELL = ("finished", "diverged", "stopped")  # a diverged or stopped trial is a result, not an error


def all_ended_well(statuses: dict[str, str]) -> bool:
    """True when no trial failed or is still pending."""
    return all(s in ENDED_WELL for s in statuses.values())


def exit_code(outcome: SweepOutcome) -> int:
    """130 for an interrupted sweep, 1 when a trial failed, else 0."""
    if outcome.interrupted:
        return 130
    return 0 if all_ended_well(outcome.statuses) else 1
