"""A training sweep's Tune trial: one grid point's Ray Train run (`orchestrator.ray_trainer.ShardTrainer`), to its end.

Runs in a Tune trial actor; module-level imports stay light (the actor unpickles this function).
The trial's MLflow child run is created by the driver beforehand; workers log to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.settings import SweepSettings
    from orchestrator.trial_spec import TrialSpec


def run_trial(config: dict[str, Any], specs: dict[str, TrialSpec], settings: SweepSettings) -> None:
    """Train the trial Tune's ``config`` names, on ``settings.workers`` Ray Train workers, to its end."""
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
            num_workers=settings.workers,
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
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()
