"""The Ray Train per-worker entry point.

Kept free of heavy imports at module level: Ray's controller actor unpickles this function by
reference, and should not pay for importing MLflow and gptcore. After a worker failure Ray
restarts the group and `ray.train.get_checkpoint()` resumes from the latest checkpoint.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any


def _quiet_report_logs() -> None:
    """Ray Train logs every report at INFO under a file-path logger name that LoggingConfig misses."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Run gptcore's `train` on this worker: the job of the trial's `TrialSpec` (``loop_config["spec"]``), logged
    to the trial's MLflow run at ``loop_config["tracking_uri"]`` (see `orchestrator.trial.run_trial`)."""
    import ray.train
    import ray.train.torch
    import torch

    from gptcore.hooks import HookList, Hooks
    from gptcore.train import train
    from orchestrator.hooks import ConsoleProgress, MlflowLogging, RayReporter
    from orchestrator.prepare import local_dataset
    from orchestrator.trial_spec import TrialSpec

    _quiet_report_logs()
    spec = TrialSpec.from_dict(loop_config["spec"])
    job = spec.job
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # torch threads on CPU: the job's train.num_threads, set by the loop
    hooks: list[Hooks] = []
    if rank == 0:
        hooks.append(ConsoleProgress(spec.name))
        hooks.append(MlflowLogging(loop_config["tracking_uri"], spec.run_id, loop_config["ray_trial_id"]))
    hooks.append(RayReporter())  # last: its final report ends the trial, after MLflow has its data

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=device)

    # DDP through Ray's prepare_model; FSDP2 is applied by gptcore itself (prepare_model's "fsdp" is FSDP1, which
    # needs CUDA), on the process group Ray Train set up (one rank included)
    ddp = world_size > 1 and job.train.parallel == "ddp"

    data_dir = local_dataset(spec.dataset) if spec.dataset else None
    with ExitStack() as stack:
        checkpoint = ray.train.get_checkpoint()
        resume_from = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        train(
            job,
            HookList(*hooks),
            resume_from=resume_from,
            rank=rank,
            world_size=world_size,
            device=device,
            wrap_model=wrap if ddp else None,
            data_dir=data_dir,
        )
