"""A training sweep's Tune trial: one grid point trained to its end, in the trial actor itself (`train_in_trial_actor`)
or by a Ray Train run of its own (`run_trial`); `trainable` picks as the sweep's settings say.

Runs in a Tune trial actor; module-level imports stay light (the actor unpickles these functions).
The trial's MLflow child run is created by the driver beforehand; the trial (or its workers) logs to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.settings import SweepSettings
    from orchestrator.trial_spec import TrialSpec


def trainable(specs: dict[str, TrialSpec], settings: SweepSettings):
    """The sweep's Tune trainable, with its specs and the resources each trial asks for: a worker's, when the trial
    trains in its actor (`orchestrator.settings.trains_in_trial_actor`); else next to none, its Train workers
    holding the CPUs and GPUs (on the head node, for spot or elastic trials)."""
    import ray.tune
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    if settings.in_trial_actor:
        return ray.tune.with_resources(
            ray.tune.with_parameters(train_in_trial_actor, specs=specs, settings=settings),
            settings.worker_resources(),
        )
    resources = {"memory": 1}
    if settings.preemptible:
        # The trial actor, and the Ray Train controller Ray places beside it, on the head node: never a spot node, so
        # a reclaim takes workers only (a lost controller would end the trial). Next to nothing of the head's one
        # unit: every trial fits.
        resources[HEAD_NODE_RESOURCE_NAME] = 0.001
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, specs=specs, settings=settings), resources)


def train_in_trial_actor(config: dict[str, Any], specs: dict[str, TrialSpec], settings: SweepSettings) -> None:
    """Train the trial Tune's ``config`` names here, in the trial actor, from Tune's latest checkpoint of it (after
    a failure, or when a sweep resumes); reports and checkpoints go to Tune."""
    import ray.tune
    import torch

    from orchestrator.hooks import TuneReporter
    from orchestrator.worker import train_trial

    spec = specs[config["trial"]]
    trial_id = ray.tune.get_context().get_trial_id()
    # the GPU Ray gave this actor (the only one it sees), else the CPU, whatever else the machine has: as a Ray
    # Train worker's device is
    device = torch.device("cuda" if settings.use_gpu else "cpu")
    train_trial(spec, settings.tracking_uri, trial_id, TuneReporter(), ray.tune.get_checkpoint(), device=device)


def run_trial(config: dict[str, Any], specs: dict[str, TrialSpec], settings: SweepSettings) -> None:
    """Train the trial Tune's ``config`` names on ``settings.workers`` Ray Train workers (elastic: between
    ``settings.min_workers`` and those, as many as the cluster has), to its end."""
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.ray_trainer import ShardTrainer
    from orchestrator.storage import join_uri
    from orchestrator.worker import train_loop_per_worker

    spec = specs[config["trial"]]
    trainer = ShardTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.to_dict(),
            "tracking_uri": settings.tracking_uri,
            "ray_trial_id": ray.tune.get_context().get_trial_id(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers(),
            elastic_resize_monitor_interval_s=settings.elastic_resize_s,
            use_gpu=bool(settings.use_gpu),
            resources_per_worker=settings.worker_resources(),
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=join_uri(settings.storage, settings.sweep_id, spec.name),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=settings.checkpoints_to_keep,
                checkpoint_score_attribute=settings.metric,
                checkpoint_score_order=settings.mode,
            ),
            # a spot reclaim is no failure of the trial's: it counts against max_preemption_failures (no limit)
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures, max_preemption_failures=-1),
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()
